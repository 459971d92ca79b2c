"""Calibration statistics for the closed-form options: per-block moments of the MLP's two inputs.

Letters: M tokens, D model width, F hidden width.

One streamed pass over the calibration samples (in memory, calib.DiskArray or backend arrays)
accumulates, per block and in float64, the token count n, the sums Σx [D], Σh [F] and the second
moments XᵀX [D, D] and HᵀH [F, F] of the MLP input x (the norm2 output) and of the original
hidden activation h = GELU(x W1 + b1). Memory: one chunk of samples plus D² + F² per block.
Every closed-form solve (fips_ref.closed_form) reads only these (docs/closed-form.md §1).
"""
from dataclasses import dataclass

import numpy as np

from .backend import get_xp
from .mlp import gelu

RIDGE = 1e-6     # λ of the metric regularisation Σ + λ·(tr Σ / dim)·I (docs/closed-form.md §1)


@dataclass
class Moments:
    """Sums of one input over n tokens: s = Σ_m x_m [dim], xx = Σ_m x_m x_mᵀ [dim, dim] (float64)."""
    n: int
    s: object
    xx: object


@dataclass
class BlockStats:
    """The two inputs of a block's MLP: fc1's x and fc2's original h = GELU(x W1 + b1)."""
    x: Moments
    h: Moments


def _add(mom, a):  # a [M, dim] float64
    mom.n += a.shape[0]
    mom.s += a.sum(axis=0)
    mom.xx += a.T @ a                                  # [dim, M] @ [M, dim] -> [dim, dim]


def block_stats(acts, dense, *, xp, chunk=64):
    """{block: BlockStats} in one pass over ``acts`` ({block: [N, T, D] or [N, D]}).

    ``dense`` is local_stage.dense_weights (math layout W1 [D, F], b1 [F]); h is computed from the
    chunk in float64, so the moments are exact up to float64 rounding whatever the run's dtype.
    """
    from .local_stage import gather                    # (local_stage imports closed_form lazily)
    out = {}
    for b, a in acts.items():
        W1, b1 = (xp.asarray(t, dtype=xp.float64) for t in dense[b][:2])
        D, F = W1.shape
        st = BlockStats(Moments(0, xp.zeros(D), xp.zeros((D, D))),
                        Moments(0, xp.zeros(F), xp.zeros((F, F))))
        for s in range(0, a.shape[0], chunk):
            x = gather(a, np.arange(s, min(s + chunk, a.shape[0])), xp=xp, dtype=xp.float64)
            _add(st.x, x)                              # [M, D]
            z = x @ W1                                 # [M, D] -> [M, F]
            z += b1
            _add(st.h, gelu(z))                        # [M, F]
        out[b] = st
    return out


def mean(mom):  # -> [dim]
    """Mean input μ = Σx / n."""
    return mom.s / max(mom.n, 1)


def metric(mom, centered=True, ridge=RIDGE):  # -> [dim, dim]
    """The metric of a layer's error, (X − 1μᵀ)ᵀ(X − 1μᵀ) / n (centered) or XᵀX / n, plus a ridge.

    Centering is the exact elimination of the layer's bias from Eq. (1) (docs/closed-form.md §2).
    Dividing by n makes blocks comparable; the ridge λ·(tr Σ / dim)·I makes a singular moment
    (LayerNorm outputs span at most D − 1 directions after centering) positive definite.
    """
    xp = get_xp(mom.xx)
    sigma = mom.xx / max(mom.n, 1)
    if centered:
        mu = mean(mom)
        sigma = sigma - xp.outer(mu, mu)
    dim = sigma.shape[0]
    lam = ridge * float(xp.trace(sigma)) / dim if ridge else 0.0
    return sigma + lam * xp.eye(dim)
