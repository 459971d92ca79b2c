"""AdamW with torch.optim.AdamW semantics, and the cosine learning-rate schedule (docs/authors-code.md §4.4).

State is a plain dataclass of dicts you can print. The update works in place on the parameter
and moment arrays (as torch.optim does): at DeiT-B scale a functional copy of every tensor per
step would double the optimizer's memory traffic.
"""
import math
from dataclasses import dataclass, field

from .backend import get_xp, row_slabs


@dataclass
class AdamWState:
    step: int = 0
    m: dict = field(default_factory=dict, repr=False)   # exp_avg per parameter key
    v: dict = field(default_factory=dict, repr=False)   # exp_avg_sq per parameter key


def adamw_init(params):
    """Zero moments shaped like every parameter (torch initialises lazily to zeros)."""
    return AdamWState(0, {k: p * 0 for k, p in params.items()}, {k: p * 0 for k, p in params.items()})


def adamw_step(params, grads, state, lr, *, betas=(0.9, 0.999), eps=9.999e-9, weight_decay=0.05,
               grad_masks=None, moment_masks=None):
    """One torch AdamW step (decoupled decay, bias correction, eps added after sqrt(v̂)); in place.

    g ← g ⊙ M_grad;  p ← p·(1 − lr·λ);  m ← m + (1−β₁)(g − m);  v ← β₂v + (1−β₂)g²;
    p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε);  m, v ← m ⊙ M_mom, v ⊙ M_mom

    The masks ({key: bool array}, keys without one are dense) are sparsimony's, docs/authors-code.md §5.1:
    the stored V gets the gradient of V ⊙ M for the mask the forward used, and a post-step hook
    zeroes the moments of the entries inactive after this step's mask update. They are applied
    here, row slab by row slab (backend.row_slabs), so every array is read and written once.
    """
    b1, b2 = betas
    state.step += 1
    step_size = lr / (1.0 - b1 ** state.step)
    bc2_sqrt = math.sqrt(1.0 - b2 ** state.step)
    grad_masks, moment_masks = grad_masks or {}, moment_masks or {}
    for k in params:
        gm, mm = grad_masks.get(k), moment_masks.get(k)
        rows = [None if a is None else _rows(a)
                for a in (params[k], grads[k], state.m[k], state.v[k], gm, mm)]
        xp = get_xp(rows[0])
        for s in row_slabs(rows[0].shape[0], rows[0].shape[1], xp):
            p, g, m, v, gms, mms = (None if a is None else a[s] for a in rows)
            if gms is not None:
                g = g * gms
            p *= 1.0 - lr * weight_decay
            m += (1.0 - b1) * (g - m)       # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= b2
            v += (1.0 - b2) * (g * g)
            d = xp.sqrt(v)
            d /= bc2_sqrt
            d += eps                        # denominator √v̂ + ε
            update = m / d
            update *= step_size
            p -= update
            if mms is not None:
                m *= mms
                v *= mms


def _rows(a):  # [R, C] -> [R, C]; [C] -> [1, C] (views, so slabs update the arrays themselves)
    return a.reshape(1, -1) if a.ndim == 1 else a


def cosine_lr(k, *, lr, eta_min, t_max):
    """CosineAnnealingLR closed form after k steps: η_min + (η₀ − η_min)(1 + cos(πk/T))/2."""
    return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * k / t_max)) / 2.0
