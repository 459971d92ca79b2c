"""The layers of the ViT/DeiT and Swin forwards, each a ``*_forward`` -> (out, cache) and a
``*_backward`` from that cache, written once against ``xp`` (llm.c style; derivations in
docs/backward.md). The plain names (``layer_norm``, ``attention``, ...) are the inference
forwards: the same code with the cache dropped, so evaluation and training agree bit for bit.

Letters: B batch, N tokens, D width, H heads, Dh head dim, P patch area (C·ph·pw).
Weights are in math layout ``y = x @ W + b``, W [in, out]. Backwards return the gradient of
the layer input (or None where the input is the image) and the parameter gradients in the
parameters' own (math) layout; models/grad.py maps them back to PyTorch layout.
"""
from typing import NamedTuple

from ..backend import get_xp


# ----------------------------------------------------------------------------- linear
def linear_forward(x, W, b=None):  # [..., in] -> [..., out]
    """nn.Linear with W in math layout [in, out]; b may be None (bias=False). Cache: x."""
    y = x @ W                                            # [..., in] -> [..., out]
    if b is not None:
        y += b                                           # in place: y is ours
    return y, x


def linear_backward(dy, x, W, need_dx=True, has_bias=True):  # [..., out] -> ([..., in], dW, db)
    """dx = dy Wᵀ, dW = xᵀ dy summed over all leading axes, db = Σ dy (None without bias)."""
    d_in, d_out = W.shape
    dy2 = dy.reshape(-1, d_out)                          # [M, out]
    dW = x.reshape(-1, d_in).T @ dy2                     # [in, M] @ [M, out] -> [in, out]
    db = dy2.sum(axis=0) if has_bias else None           # [out]
    dx = dy @ W.T if need_dx else None                   # [..., out] -> [..., in]
    return dx, dW, db


def linear(x, W, b=None):  # [..., in] -> [..., out]
    """Inference nn.Linear (see linear_forward)."""
    return linear_forward(x, W, b)[0]


# ----------------------------------------------------------------------------- LayerNorm
class NormCache(NamedTuple):
    xhat: object   # [..., D] normalised input
    rstd: object   # [..., 1] 1 / sqrt(var + eps)
    w: object      # [D]


def layer_norm_forward(x, w, b, eps):  # [..., D] -> [..., D]
    """torch.nn.LayerNorm: biased variance, eps inside the square root (timm norm_layer)."""
    xp = get_xp(x)
    D = x.shape[-1]
    xhat = x - x.mean(axis=-1, keepdims=True)            # [..., D], centred; ours from here on
    var = xp.einsum("...i,...i->...", xhat, xhat)[..., None] / D  # [..., 1], no [..., D] square
    rstd = 1 / xp.sqrt(var + eps)                        # [..., 1]
    xhat *= rstd                                         # in place: x̂ = (x − μ)·rstd
    y = xhat * w
    y += b
    return y, NormCache(xhat, rstd, w)


def layer_norm_backward(dy, c):  # [..., D] -> ([..., D], dw [D], db [D])
    """dx = rstd·(g − mean(g) − x̂·mean(g ⊙ x̂)) with g = dy ⊙ w; dw = Σ dy ⊙ x̂; db = Σ dy."""
    xp = get_xp(dy)
    D = dy.shape[-1]
    dw = xp.einsum("nd,nd->d", dy.reshape(-1, D), c.xhat.reshape(-1, D))  # Σ dy ⊙ x̂
    db = dy.reshape(-1, D).sum(axis=0)
    g = dy * c.w                                                  # [..., D]
    gx = xp.einsum("...i,...i->...", g, c.xhat)[..., None] / D    # mean(g ⊙ x̂) [..., 1]
    dx = c.xhat * gx                                              # in-place passes from here
    xp.subtract(g, dx, out=dx)
    dx -= g.mean(axis=-1, keepdims=True)
    dx *= c.rstd
    return dx, dw, db


def layer_norm(x, w, b, eps):  # [..., D] -> [..., D]
    """Inference LayerNorm (see layer_norm_forward)."""
    return layer_norm_forward(x, w, b, eps)[0]


# ----------------------------------------------------------------------------- softmax
def softmax(x):  # [..., N] -> [..., N]
    """Softmax over the last axis, max-subtracted (nn.Softmax(dim=-1))."""
    return softmax_(x - x.max(axis=-1, keepdims=True), shifted=True)


def softmax_(x, shifted=False):  # [..., N] -> the same array, overwritten
    """softmax in place on an array the caller owns (attention's logits): no [..., N] temporaries.

    The same operations in the same order as softmax, so the same bits."""
    xp = get_xp(x)
    if not shifted:
        x -= x.max(axis=-1, keepdims=True)
    xp.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def softmax_backward(dp, p):  # [..., N] -> [..., N]
    """From the output p: dx = p ⊙ (dp − Σ_j dp_j p_j)."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def softmax_backward_(dp, p):  # [..., N] -> dp, overwritten with dx
    """softmax_backward in place on a dp the caller owns; the row sums Σ_j dp_j p_j by einsum
    (a dot per row, no [..., N] product array)."""
    xp = get_xp(dp)
    dp -= xp.einsum("...j,...j->...", dp, p)[..., None]
    dp *= p
    return dp


# ----------------------------------------------------------------------------- attention
def split_heads(qkv, num_heads):  # [B, N, 3D] -> ([B, H, N, Dh],) * 3
    """timm fused qkv: reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4), q rows first."""
    B, N, _ = qkv.shape
    t = qkv.reshape(B, N, 3, num_heads, -1)              # [B, N, 3D] -> [B, N, 3, H, Dh]
    t = t.transpose(2, 0, 3, 1, 4)                       # -> [3, B, H, N, Dh]
    return t[0], t[1], t[2]


def merge_heads(x):  # [B, H, N, Dh] -> [B, N, D]
    """Inverse of split_heads: transpose(1, 2).reshape(B, N, H·Dh), as timm before proj."""
    B, H, N, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * Dh)  # [B, H, N, Dh] -> [B, N, D]


def unmerge_heads(x, num_heads):  # [B, N, D] -> [B, H, N, Dh]
    """Inverse of merge_heads (the backward of the merge)."""
    B, N, D = x.shape
    return x.reshape(B, N, num_heads, D // num_heads).transpose(0, 2, 1, 3)


class AttnCache(NamedTuple):
    x: object      # [B, N, D] input
    q: object      # [B, H, N, Dh] scaled by Dh^-0.5 (contiguous)
    k: object      # [B, H, N, Dh] (a view into the qkv output)
    v: object      # [B, H, N, Dh] (a view into the qkv output)
    p: object      # [B, H, N, N] attention probabilities
    o: object      # [B, N, D] merged heads (proj input)


def attention_forward(x, Wqkv, bqkv, Wproj, bproj, num_heads, biases=()):  # [B, N, D] -> [B, N, D]
    """timm Attention / WindowAttention: softmax(q·Dh^-0.5 @ kᵀ + Σ biases) @ v, then proj.

    ``biases`` are additive logit terms broadcastable to [B, H, N, N], added in order
    (Swin: relative position bias, then the shift mask). Speed (docs/backward.md "Speed"): the
    logits are one fresh array that the biases and the softmax update in place, and p @ v is
    written straight into the merged-head layout, so no [B, H, N, N] temporaries and no copy.
    """
    xp = get_xp(x)
    q, k, v = split_heads(linear(x, Wqkv, bqkv), num_heads)  # [B, N, D] -> 3 x [B, H, N, Dh]
    B, H, N, Dh = q.shape
    q = q * Dh ** -0.5                                   # [B, H, N, Dh], contiguous
    logits = q @ k.transpose(0, 1, 3, 2)                 # -> [B, H, N, N]
    for bias in biases:
        logits += bias
    p = softmax_(logits)
    o = xp.empty((B, N, H, Dh), dtype=p.dtype)           # merge_heads' layout
    xp.matmul(p, v, out=o.transpose(0, 2, 1, 3))         # [B, H, N, N] @ [B, H, N, Dh]
    o = o.reshape(B, N, H * Dh)                          # -> [B, N, D]
    return linear(o, Wproj, bproj), AttnCache(x, q, k, v, p, o)


def attention_backward(dy, c, Wqkv, Wproj, has_qkv_bias):  # [B, N, D] -> (dx, grads, dlogits)
    """Backward of attention_forward: (dx, (dWqkv, dbqkv, dWproj, dbproj), dlogits [B, H, N, N]).

    dlogits is also the gradient of every additive bias (before broadcasting), for Swin's
    relative position bias table. With the cached q already scaled, dk = dlogitsᵀ @ q·Dh^-0.5
    needs no extra scaling; dq = dlogits @ k · Dh^-0.5. dq, dk, dv are written straight into
    split_heads' [B, N, 3, H, Dh] layout (no stacking copy).
    """
    xp = get_xp(dy)
    B, H, N, Dh = c.q.shape
    do, dWproj, dbproj = linear_backward(dy, c.o, Wproj)        # -> [B, N, D]
    do = unmerge_heads(do, H)                                   # -> [B, H, N, Dh]
    dqkv = xp.empty((B, N, 3, H, Dh), dtype=dy.dtype)          # split_heads' layout
    dq, dk, dv = (dqkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))  # [B, H, N, Dh] views
    xp.matmul(c.p.transpose(0, 1, 3, 2), do, out=dv)           # [B, H, N, N] @ [B, H, N, Dh]
    dlogits = softmax_backward_(do @ c.v.transpose(0, 1, 3, 2), c.p)  # -> [B, H, N, N]
    xp.matmul(dlogits, c.k, out=dq)                             # -> [B, H, N, Dh]
    dq *= Dh ** -0.5
    xp.matmul(dlogits.transpose(0, 1, 3, 2), c.q, out=dk)      # -> [B, H, N, Dh]
    dqkv = dqkv.reshape(B, N, 3 * H * Dh)                       # -> [B, N, 3D]
    dx, dWqkv, dbqkv = linear_backward(dqkv, c.x, Wqkv, has_bias=has_qkv_bias)
    return dx, (dWqkv, dbqkv, dWproj, dbproj), dlogits


def attention(x, Wqkv, bqkv, Wproj, bproj, num_heads, biases=()):  # [B, N, D] -> [B, N, D]
    """Inference attention (see attention_forward)."""
    return attention_forward(x, Wqkv, bqkv, Wproj, bproj, num_heads, biases)[0]


# ----------------------------------------------------------------------------- patch embedding
def patchify(x, patch):  # [B, C, Hi, Wi] -> [B, gh, gw, P]
    """Conv with stride = kernel = patch as a reshape: patch rows flatten as (C, ph, pw)."""
    B, C, Hi, Wi = x.shape
    ph, pw = patch
    t = x.reshape(B, C, Hi // ph, ph, Wi // pw, pw)      # -> [B, C, gh, ph, gw, pw]
    t = t.transpose(0, 2, 4, 1, 3, 5)                    # -> [B, gh, gw, C, ph, pw]
    return t.reshape(B, Hi // ph, Wi // pw, C * ph * pw)  # -> [B, gh, gw, P]


def patch_embed_forward(x, W, b, patch):  # [B, C, Hi, Wi] -> [B, gh, gw, D]
    """timm PatchEmbed.proj (Conv2d k = s = patch), kernel stored as [P, D]. Cache: patches."""
    return linear_forward(patchify(x, patch), W, b)


def patch_embed_backward(dy, patches, W):  # [B, gh, gw, D] -> (dW [P, D], db [D])
    """Kernel and bias gradients; the image is an input, so no dx."""
    _, dW, db = linear_backward(dy, patches, W, need_dx=False)
    return dW, db


def patch_embed(x, p, prefix, patch):  # [B, C, Hi, Wi] -> [B, gh, gw, D]
    """Inference patch embedding from the parameter dict (see patch_embed_forward)."""
    return patch_embed_forward(x, p[f"{prefix}.weight"], p[f"{prefix}.bias"], patch)[0]


# ----------------------------------------------------------------------------- LayerScale
def layer_scale(y, gamma):  # [..., D] -> [..., D]
    """timm LayerScale (ls1/ls2.gamma, per channel); an absent gamma is nn.Identity."""
    return y if gamma is None else y * gamma


def layer_scale_backward(dout, y, gamma):  # [..., D] -> ([..., D], dgamma [D] or None)
    """d y = dout ⊙ γ, dγ = Σ dout ⊙ y; identity when γ is absent."""
    if gamma is None:
        return dout, None
    return dout * gamma, (dout * y).reshape(-1, y.shape[-1]).sum(axis=0)


# ----------------------------------------------------------------------------- gradient dicts
def add_grad(grads, key, g):
    """grads[key] += g (created on first use); None is skipped (an absent bias or γ)."""
    if g is None:
        return
    grads[key] = grads[key] + g if key in grads else g


def no_cache(mlp):  # callable h -> y  ->  callable h -> (y, None)
    """An inference MLP callable in the (out, cache) convention of the block forwards."""
    return lambda h: (mlp(h), None)
