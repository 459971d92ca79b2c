"""Each block's MLP as a trainable layer: a forward returning (y, cache) and a backward that adds
its parameter gradients to a dict, for the dense timm MLP and for the FiPS-factored one.

Letters: M tokens (batch x tokens), D width, F hidden, R rank. Derivations: docs/backward.md.

Gradient keys (the layout of each is that of ``Model.params`` / the factor, see grad.py):
  dense block:   ``{prefix}.mlp.fc1.weight`` [D, F] (math layout), ``.bias``, same for fc2;
  FiPS block:    ``fips.U.{g}`` [rows, R], summed over the group's layers (paper §3, shared U);
                 ``fips.V.{layer key}`` [R, cols], the dense gradient dL/d(V ⊙ M): the stored V
                 is zero off the mask and enters the weight as it is, so this is the gradient
                 RigL's regrowth ranks (paper §3.2); biases under their timm keys.
"""
from typing import Callable, NamedTuple

from ..codec import fips_meta, group_factors
from ..mlp import gelu_with_grad, lowrank_backward, lowrank_mlp_forward
from ..sharing import layer_factors
from .ops import add_grad, linear_backward, linear_forward


class MLPLayer(NamedTuple):
    """A block's MLP for training: forward(h) -> (y, cache); backward(dy, cache, grads) -> dh."""
    forward: Callable
    backward: Callable


# ----------------------------------------------------------------------------- dense (timm Mlp)
def dense_mlp_forward(h, W1, b1, W2, b2):  # [..., D] -> [..., D]
    """timm Mlp fc2(GELU(fc1(h))), the values of mlp.dense_mlp; cache (h, GELU(z), GELU'(z))."""
    z, _ = linear_forward(h, W1, b1)                 # [..., D] -> [..., F]
    a, g = gelu_with_grad(z.reshape(-1, z.shape[-1]))  # [M, F] each
    y, _ = linear_forward(a.reshape(z.shape), W2, b2)  # [..., F] -> [..., D]
    return y, (h, a, g)


def dense_mlp_backward(dy, cache, W1, W2):  # [..., D] -> ([..., D], (dW1, db1, dW2, db2))
    """da = dy W2ᵀ, dz = da ⊙ GELU'(z), dh = dz W1ᵀ; weight grads xᵀ·d(out) in math layout."""
    h, a, g = cache
    D = dy.shape[-1]
    da, dW2, db2 = linear_backward(dy.reshape(-1, D), a, W2)   # [M, D] -> [M, F]
    da *= g                                                     # dz = da ⊙ GELU'(z)
    dh, dW1, db1 = linear_backward(da, h, W1)                   # [M, F] -> [M, D]
    return dh.reshape(dy.shape), (dW1, db1, dW2, db2)


def dense_layer(params, prefix):
    """MLPLayer of a dense block from math-layout params (keys ``{prefix}.mlp.fc1.weight`` ...)."""
    keys = [f"{prefix}.mlp.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    W1, b1, W2, b2 = (params[k] for k in keys)

    def backward(dy, cache, grads):
        dh, gs = dense_mlp_backward(dy, cache, W1, W2)
        for k, g in zip(keys, gs):
            add_grad(grads, k, g)
        return dh
    return MLPLayer(lambda h: dense_mlp_forward(h, W1, b1, W2, b2), backward)


# ----------------------------------------------------------------------------- FiPS-factored
def factored_mlp_forward(h, fc1, fc2):  # [..., D] -> [..., D]
    """mlp.lowrank_mlp_forward on the flattened tokens; fc = (A, B, b) with W = A @ B."""
    y, cache = lowrank_mlp_forward(h.reshape(-1, h.shape[-1]), fc1, fc2)  # [M, D]
    return y.reshape(h.shape[:-1] + (y.shape[-1],)), cache


def factored_mlp_backward(dy, cache, fc1, fc2):  # [..., D] -> ([..., D], ((dA1, dB1, db1), ...))
    """mlp.lowrank_mlp_backward plus the input gradient (the MLP is inside the model here)."""
    da, dA2, dB2, db2 = lowrank_backward(dy.reshape(-1, dy.shape[-1]), cache.fc2, *fc2[:2])
    da *= cache.g                                               # dz = da ⊙ GELU'(z)
    dh, dA1, dB1, db1 = lowrank_backward(da, cache.fc1, *fc1[:2])
    return dh.reshape(dy.shape), ((dA1, dB1, db1), (dA2, dB2, db2))


def factor_grads(dA, dB, layer):  # -> (dU [rows, R], dV [R, cols])
    """Chain rule through sharing.layer_factors: (A, B) = (U, V), or (Vᵀ, Uᵀ)."""
    return (dA, dB) if layer.basis_first else (dB.T, dA.T)


def factored_layer(U, Vs, biases, layers, group):
    """MLPLayer of a FiPS block: fc1 and fc2 from the group's U and their own V (sharing.py)."""
    fcs = [layer_factors(U, V, l) + (b,) for V, b, l in zip(Vs, biases, layers)]

    def backward(dy, cache, grads):
        dh, gs = factored_mlp_backward(dy, cache, *fcs)
        for (dA, dB, db), layer in zip(gs, layers):
            dU, dV = factor_grads(dA, dB, layer)
            add_grad(grads, f"fips.U.{group}", dU)
            add_grad(grads, f"fips.V.{layer.key}", dV)
            add_grad(grads, f"{layer.key}.bias", db)
        return dh
    return MLPLayer(lambda h: factored_mlp_forward(h, *fcs), backward)


def train_mlps(model, ckpt, params=None):
    """{global block index: MLPLayer} for a prepared Model and its checkpoint.

    Dense blocks read the math-layout weights build_mlps put in ``model.params``; FiPS blocks
    read U and the dense V (zero off the mask) from the codec, in the model's dtype. With a dict
    ``params``, the factor arrays the layers read are also stored there under their gradient keys
    (``fips.U.{g}``, ``fips.V.{layer key}``, ``{layer key}.bias``), so a training loop can update
    them in place (adamw_step) and the layers see the new values.
    """
    xp, dtype = model.xp, model.dtype
    out, params = {}, {} if params is None else params
    for g in (fips_meta(ckpt)["groups"] if "fips" in ckpt.extra else ()):
        U, Vs, layers = group_factors(ckpt, g)
        U = params[f"fips.U.{g['index']}"] = xp.asarray(U, dtype=dtype)
        per_block = {}
        for V, layer in zip(Vs, layers):
            V = params[f"fips.V.{layer.key}"] = xp.asarray(V, dtype=dtype)
            b = params[f"{layer.key}.bias"] = xp.array(ckpt.tensors[f"{layer.key}.bias"], dtype=dtype)
            per_block.setdefault(layer.block, []).append((V, b, layer))
        for block, fcs in per_block.items():
            Vb, bb, lb = zip(*fcs)                   # fc1 then fc2, in group order
            out[block] = factored_layer(U, Vb, bb, lb, g["index"])
    arch_blocks = _arch(model).blocks(model.cfg)
    for i, (prefix, _) in enumerate(arch_blocks):
        if i not in out:
            out[i] = dense_layer(model.params, prefix)
    return out


def _arch(model):
    from . import swin, vit
    return {"vit": vit, "swin": swin}[model.arch]
