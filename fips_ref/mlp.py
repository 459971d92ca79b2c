"""The MLP of a transformer block, original and FiPS-compressed, with hand-written backward.

Letters: M tokens, D model width, F hidden width, R rank. Weights are in math layout
``y = x @ W + b`` with W [in, out]; PyTorch's [out, in] is transposed once, at the edges.

A FiPS layer stores a low-rank product ``W = A @ B`` (A [in, R], B [R, out]); which of the
shared basis U and the sparse slice V plays A or B depends on the layer (see sharing.py).
Derivations: docs/derivations.md.
"""
import math
from typing import NamedTuple

from .backend import erf, get_xp

SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ----------------------------------------------------------------------------- GELU (exact erf)
def gelu(z):  # [M, F] -> [M, F]
    """Exact GELU, z·Φ(z) = ½ z (1 + erf(z/√2)), as torch.nn.GELU() (timm default)."""
    return 0.5 * z * (1.0 + erf(z * SQRT_HALF))


def gelu_backward(dout, z):  # [M, F], [M, F] -> [M, F]
    """d gelu / dz = Φ(z) + z·φ(z); Φ recomputed from z rather than cached."""
    xp = get_xp(z)
    cdf = 0.5 * (1.0 + erf(z * SQRT_HALF))
    pdf = INV_SQRT_2PI * xp.exp(-0.5 * z * z)
    return dout * (cdf + z * pdf)


# ----------------------------------------------------------------------------- low-rank linear
def factored_is_cheaper(m, n_in, rank, n_out):
    """FLOP rule: (x @ A) @ B costs m·R·(in+out); x @ (A @ B) costs in·R·out + m·in·out."""
    return m * rank * (n_in + n_out) < n_in * rank * n_out + m * n_in * n_out


class LowRankCache(NamedTuple):
    x: object        # [M, in]
    t: object        # [M, R] (factored path) or None
    W: object        # [in, out] (materialised path) or None


def lowrank_forward(x, A, B, bias, factored=None):  # [M, in] -> [M, out]
    """y = x @ A @ B + b, by whichever association costs fewer FLOPs (or as forced)."""
    if factored is None:
        factored = factored_is_cheaper(x.shape[0], A.shape[0], A.shape[1], B.shape[1])
    if factored:
        t = x @ A                      # [M, in] -> [M, R]
        return t @ B + bias, LowRankCache(x, t, None)
    W = A @ B                          # [in, R] @ [R, out] -> [in, out]
    return x @ W + bias, LowRankCache(x, None, W)


def lowrank_backward(dout, cache, A, B, need_dx=True):  # [M, out] -> ([M, in], dA, dB, db)
    """Backward of lowrank_forward: returns (dx or None, dA [in, R], dB [R, out], db [out])."""
    db = dout.sum(axis=0)
    if cache.t is not None:            # factored: t = x A, y = t B
        dB = cache.t.T @ dout          # [R, M] @ [M, out]
        dt = dout @ B.T                # [M, out] @ [out, R]
        dA = cache.x.T @ dt            # [in, M] @ [M, R]
        dx = dt @ A.T if need_dx else None
    else:                              # materialised: W = A B, y = x W
        dW = cache.x.T @ dout          # [in, M] @ [M, out]
        dA = dW @ B.T                  # [in, out] @ [out, R]
        dB = A.T @ dW                  # [R, in] @ [in, out]
        dx = dout @ cache.W.T if need_dx else None
    return dx, dA, dB, db


# ----------------------------------------------------------------------------- the MLP
class MLPCache(NamedTuple):
    fc1: LowRankCache
    z: object   # [M, F] pre-activation
    fc2: LowRankCache


def dense_mlp(x, W1, b1, W2, b2):  # [M, D] -> [M, D]
    """Original timm Mlp: fc2(GELU(fc1(x))) with W1 [D, F], W2 [F, D] in math layout."""
    return gelu(x @ W1 + b1) @ W2 + b2


def lowrank_mlp_forward(x, fc1, fc2, factored=None):  # [M, D] -> [M, D]
    """Compressed MLP: fc1 = (A1, B1, b1), fc2 = (A2, B2, b2), each W = A @ B."""
    z, c1 = lowrank_forward(x, *fc1, factored=factored)        # [M, D] -> [M, F]
    y, c2 = lowrank_forward(gelu(z), *fc2, factored=factored)  # [M, F] -> [M, D]
    return y, MLPCache(c1, z, c2)


def lowrank_mlp_backward(dout, cache, fc1, fc2):  # [M, D] -> grads of fc1 and fc2 factors
    """Backward of lowrank_mlp_forward: ((dA1, dB1, db1), (dA2, dB2, db2)); no dx (inputs fixed)."""
    da, dA2, dB2, db2 = lowrank_backward(dout, cache.fc2, fc2[0], fc2[1])
    dz = gelu_backward(da, cache.z)
    _, dA1, dB1, db1 = lowrank_backward(dz, cache.fc1, fc1[0], fc1[1], need_dx=False)
    return (dA1, dB1, db1), (dA2, dB2, db2)
