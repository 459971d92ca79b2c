"""AdamW with torch.optim.AdamW semantics, and the cosine learning-rate schedule (fips-spec §4.4).

State is a plain dataclass of dicts you can print. The update works in place on the parameter
and moment arrays (as torch.optim does): at DeiT-B scale a functional copy of every tensor per
step would double the optimizer's memory traffic.
"""
import math
from dataclasses import dataclass, field

from .backend import get_xp


@dataclass
class AdamWState:
    step: int = 0
    m: dict = field(default_factory=dict, repr=False)   # exp_avg per parameter key
    v: dict = field(default_factory=dict, repr=False)   # exp_avg_sq per parameter key


def adamw_init(params):
    """Zero moments shaped like every parameter (torch initialises lazily to zeros)."""
    return AdamWState(0, {k: p * 0 for k, p in params.items()}, {k: p * 0 for k, p in params.items()})


def adamw_step(params, grads, state, lr, *, betas=(0.9, 0.999), eps=9.999e-9, weight_decay=0.05):
    """One torch AdamW step (decoupled decay, bias correction, eps added after sqrt(v̂)); in place.

    p ← p·(1 − lr·λ);  m ← m + (1−β₁)(g − m);  v ← β₂v + (1−β₂)g²;
    p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)
    """
    b1, b2 = betas
    state.step += 1
    step_size = lr / (1.0 - b1 ** state.step)
    bc2_sqrt = math.sqrt(1.0 - b2 ** state.step)
    for k, p in params.items():
        g, m, v = grads[k], state.m[k], state.v[k]
        p *= 1.0 - lr * weight_decay
        m += (1.0 - b1) * (g - m)           # torch: exp_avg.lerp_(grad, 1 - beta1)
        v *= b2
        v += (1.0 - b2) * (g * g)
        p -= step_size * (m / (get_xp(v).sqrt(v) / bc2_sqrt + eps))


def mask_moments(state, masks):
    """Zero the moments of inactive V entries after every step (sparsimony's post-step hook, §5.1)."""
    for k, mask in masks.items():
        state.m[k] *= mask
        state.v[k] *= mask


def cosine_lr(k, *, lr, eta_min, t_max):
    """CosineAnnealingLR closed form after k steps: η_min + (η₀ − η_min)(1 + cos(πk/T))/2."""
    return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * k / t_max)) / 2.0
