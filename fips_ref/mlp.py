"""The MLP of a transformer block, original and FiPS-compressed, with hand-written backward.

Letters: M tokens, D model width, F hidden width, R rank. Weights are in math layout
``y = x @ W + b`` with W [in, out]; PyTorch's [out, in] is transposed once, at the edges.

A FiPS layer stores a low-rank product ``W = A @ B`` (A [in, R], B [R, out]); which of the
shared basis U and the sparse slice V plays A or B depends on the layer (see sharing.py).
Derivations: docs/derivations.md.
"""
from typing import NamedTuple

from .backend import get_xp, normal_cdf_pdf, row_slabs


# ----------------------------------------------------------------------------- GELU (exact erf)
def gelu(z):  # [..., F] -> [..., F]
    """Exact GELU, z·Φ(z) = ½ z (1 + erf(z/√2)), as torch.nn.GELU() (timm default)."""
    xp = get_xp(z)
    a = xp.empty(z.shape, z.dtype)
    z2, a2 = z.reshape(-1, z.shape[-1]), a.reshape(-1, z.shape[-1])    # [..., F] -> [M, F]
    for s in row_slabs(z2.shape[0], z2.shape[1], xp):
        xp.multiply(z2[s], normal_cdf_pdf(z2[s], pdf=False)[0], out=a2[s])
    return a


def gelu_with_grad(z):  # [M, F] -> ([M, F], [M, F])
    """GELU(z) and its derivative Φ(z) + z·φ(z), computed together and kept for the backward.

    Row slab by row slab (backend.row_slabs), so on the CPU the temporaries stay in cache.
    """
    xp = get_xp(z)
    a, g = xp.empty_like(z), xp.empty_like(z)
    for s in row_slabs(z.shape[0], z.shape[1], xp):
        zs = z[s]
        cdf, pdf = normal_cdf_pdf(zs)
        xp.multiply(zs, cdf, out=a[s])                 # GELU(z) = z Φ(z)
        pdf *= zs
        xp.add(pdf, cdf, out=g[s])                     # GELU'(z) = Φ(z) + z φ(z)
    return a, g


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
        y = t @ B                      # [M, R] -> [M, out]
    else:
        t, W = None, A @ B             # [in, R] @ [R, out] -> [in, out]
        y = x @ W                      # [M, in] -> [M, out]
    y += bias                          # in place: y is ours
    return y, LowRankCache(x, t, None if factored else W)


def lowrank_backward(dout, cache, A, B, need_dx=True):  # [M, out] -> ([M, in], dA, dB, db)
    """Backward of lowrank_forward: returns (dx or None, dA [in, R], dB [R, out], db [out]).

    dA and dB come out in the memory order of A and B (see matmul_like).
    """
    db = dout.sum(axis=0)
    if cache.t is not None:            # factored: t = x A, y = t B
        dB = matmul_like(cache.t.T, dout, B)    # [R, M] @ [M, out]
        dt = dout @ B.T                         # [M, out] @ [out, R]
        dA = matmul_like(cache.x.T, dt, A)      # [in, M] @ [M, R]
        dx = dt @ A.T if need_dx else None
    else:                              # materialised: W = A B, y = x W
        dW = cache.x.T @ dout                   # [in, M] @ [M, out]
        dA = matmul_like(dW, B.T, A)            # [in, out] @ [out, R]
        dB = matmul_like(A.T, dW, B)            # [R, in] @ [in, out]
        dx = dout @ cache.W.T if need_dx else None
    return dx, dA, dB, db


def matmul_like(a, b, like):  # [m, k] @ [k, n] -> [m, n]
    """a @ b stored in the memory order of ``like``: as (bᵀ aᵀ)ᵀ when ``like`` is a transposed view.

    A factor that is a transposed view (fc2's Vᵀ and Uᵀ) then gets a gradient that is a
    transposed view too, so the gradient of the stored V or U is contiguous, as the parameter.
    """
    if like.flags.f_contiguous and not like.flags.c_contiguous:
        return (b.T @ a.T).T
    return a @ b


# ----------------------------------------------------------------------------- the MLP
class MLPCache(NamedTuple):
    fc1: LowRankCache
    g: object   # [M, F] GELU'(z) at the pre-activation z
    fc2: LowRankCache


def dense_mlp(x, W1, b1, W2, b2):  # [M, D] -> [M, D]
    """Original timm Mlp: fc2(GELU(fc1(x))) with W1 [D, F], W2 [F, D] in math layout."""
    z = x @ W1                         # [M, D] -> [M, F]
    z += b1
    y = gelu(z) @ W2                   # [M, F] -> [M, D]
    y += b2
    return y


def lowrank_mlp(x, fc1, fc2):  # [M, D] -> [M, D]
    """Compressed MLP, forward only (evaluation): fc2(GELU(fc1(x))), each layer x @ A @ B + b."""
    z = lowrank_forward(x, *fc1)[0]                  # [M, D] -> [M, F]
    return lowrank_forward(gelu(z), *fc2)[0]         # [M, F] -> [M, D]


def lowrank_mlp_forward(x, fc1, fc2, factored=None):  # [M, D] -> [M, D]
    """Compressed MLP: fc1 = (A1, B1, b1), fc2 = (A2, B2, b2), each W = A @ B."""
    z, c1 = lowrank_forward(x, *fc1, factored=factored)        # [M, D] -> [M, F]
    a, g = gelu_with_grad(z)
    y, c2 = lowrank_forward(a, *fc2, factored=factored)        # [M, F] -> [M, D]
    return y, MLPCache(c1, g, c2)


def lowrank_mlp_backward(dout, cache, fc1, fc2):  # [M, D] -> grads of fc1 and fc2 factors
    """Backward of lowrank_mlp_forward: ((dA1, dB1, db1), (dA2, dB2, db2)); no dx (inputs fixed)."""
    da, dA2, dB2, db2 = lowrank_backward(dout, cache.fc2, fc2[0], fc2[1])
    da *= cache.g                                               # dz = da ⊙ GELU'(z), in place
    _, dA1, dB1, db1 = lowrank_backward(da, cache.fc1, fc1[0], fc1[1], need_dx=False)
    return (dA1, dB1, db1), (dA2, dB2, db2)


# ----------------------------------------------------------------------------- per-layer (paper Eq. 1)
class FCCache(NamedTuple):
    fc1: LowRankCache
    fc2: LowRankCache


def lowrank_fc_forward(x, a, fc1, fc2, factored=None):  # [M, D], [M, F] -> ([M, F], [M, D])
    """Each compressed layer on its own ORIGINAL input (paper Eq. 1): z = fc1_c(x), y = fc2_c(a).

    ``a`` is the original model's GELU(fc1(x)), so an error of fc1 does not reach fc2.
    """
    z, c1 = lowrank_forward(x, *fc1, factored=factored)        # [M, D] -> [M, F]
    y, c2 = lowrank_forward(a, *fc2, factored=factored)        # [M, F] -> [M, D]
    return (z, y), FCCache(c1, c2)


def lowrank_fc_backward(dz, dy, cache, fc1, fc2):  # [M, F], [M, D] -> grads of fc1 and fc2 factors
    """Backward of lowrank_fc_forward: ((dA1, dB1, db1), (dA2, dB2, db2)); the layers are independent."""
    _, dA1, dB1, db1 = lowrank_backward(dz, cache.fc1, fc1[0], fc1[1], need_dx=False)
    _, dA2, dB2, db2 = lowrank_backward(dy, cache.fc2, fc2[0], fc2[1], need_dx=False)
    return (dA1, dB1, db1), (dA2, dB2, db2)
