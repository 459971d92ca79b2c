"""Model plumbing shared by the ViT/DeiT and Swin forwards: the Model record, per-block MLP
callables, tensor shape checks and layout, config fields. The layers' math is in ops.py.

Letters: B batch, C channels, N tokens, D embed, H heads, Dh head dim, F MLP hidden,
K classes, nW windows, Ws window area, P patch area (C·ph·pw), T recorded tokens.

Weights live in math layout ``y = x @ W + b`` with W [in, out]; the transpose from PyTorch's
[out, in] happens once, in :func:`math_layout`, after a shape check of every tensor against
the shape the config predicts (:func:`check_shapes`).
"""
from typing import NamedTuple

import numpy as np

from ..checkpoint import InputError
from ..mlp import dense_mlp, lowrank_mlp
from .ops import (attention, layer_norm, linear, merge_heads, patch_embed,  # noqa: F401
                  patchify, softmax, split_heads)  # re-exported: the layers' math is in ops.py

class Model(NamedTuple):
    """A checkpoint made ready to run: parsed config, math-layout weights, one MLP per block."""
    arch: str        # 'vit' or 'swin'
    cfg: object      # ViTConfig or SwinConfig
    params: dict     # timm key -> xp array, linear weights [in, out]
    mlps: dict       # global block index -> callable [..., D] -> [..., D]
    xp: object       # array module
    dtype: object    # np.float32 or np.float64
    path: str        # the checkpoint, for messages


# ----------------------------------------------------------------------------- MLP per block
def dense_mlp_fn(W1, b1, W2, b2):  # W1 [D, F], W2 [F, D] -> callable [..., D] -> [..., D]
    """Original timm Mlp (fc1, exact GELU, fc2) as a callable, weights in math layout."""
    def mlp(h):  # [..., D] -> [..., D]
        y = dense_mlp(h.reshape(-1, h.shape[-1]), W1, b1, W2, b2)   # one GEMM: NumPy's stacked
        return y.reshape(h.shape[:-1] + (y.shape[-1],))           # [B, T, D] @ W is ~6x slower
    return mlp


def factored_mlp_fn(fc1, fc2, path=None, cost=None):  # fc1, fc2 -> callable [..., D] -> [..., D]
    """Compressed MLP. fc1, fc2: infer.InferLayer (codec.factored_mlps) run by infer.mlp_forward,
    each layer by ``path`` or, per batch size, the path infer.choose_path picks under ``cost``
    (docs/deployment.md §3); or plain (A, B, b) triples, y = x @ A @ B + b, by mlp.lowrank_mlp."""
    from ..infer import InferLayer, inference_mlp_fn
    if isinstance(fc1, InferLayer):
        return inference_mlp_fn(fc1, fc2, path, cost)

    def mlp(h):  # [..., D] -> [..., D]
        y = lowrank_mlp(h.reshape(-1, h.shape[-1]), fc1, fc2)   # [..., D] -> [M, D]
        return y.reshape(h.shape[:-1] + (y.shape[-1],))         # [M, D] -> [..., D]
    return mlp


def factored_dims(fc):  # -> (in, out)
    """Input and output width of a factored layer: an infer.InferLayer or an (A, B, b) triple."""
    from ..infer import InferLayer, layer_dims
    return layer_dims(fc) if isinstance(fc, InferLayer) else (fc[0].shape[0], fc[1].shape[1])


def tapped(mlp, index, tap):  # callable -> callable, same shapes
    """Wrap an MLP so ``tap(index, h)`` sees its input h after the MLP has consumed it."""
    def f(h):  # [B, T, D] -> [B, T, D]
        y = mlp(h)
        tap(index, h)
        return y
    return f


def dense_mlp_keys(prefix):
    """The four timm keys of a block's dense MLP (fc1/fc2 weight/bias)."""
    return tuple(f"{prefix}.mlp.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))


def dense_mlp_shapes(path, tensors, prefix, d):
    """{key: PyTorch shape} of a dense MLP of width d, hidden width read from fc1."""
    w1 = tensors.get(f"{prefix}.mlp.fc1.weight")
    if w1 is None or w1.ndim != 2:
        got = "missing" if w1 is None else f"shape {w1.shape}"
        raise InputError(f"{path}: key '{prefix}.mlp.fc1.weight' is {got}, expected [F, {d}]")
    f = w1.shape[0]
    return dict(zip(dense_mlp_keys(prefix), ((f, d), (f,), (d, f), (d,))))


# ----------------------------------------------------------------------------- tensors
def check_shapes(path, tensors, shapes, optional=()):
    """Every key of ``shapes`` present with its PyTorch shape; ``optional`` keys may be absent."""
    for key, shape in shapes.items():
        if key not in tensors:
            if key in optional:
                continue
            raise InputError(f"{path}: missing key {key!r}")
        a = tensors[key]
        if tuple(a.shape) != tuple(shape):
            raise InputError(f"{path}: key {key!r} has shape {tuple(a.shape)}, "
                             f"expected {tuple(shape)}")
        if a.dtype.kind != "f":
            raise InputError(f"{path}: key {key!r} has dtype {a.dtype}, expected floating point")


def refuse_keys(path, tensors, patterns):
    """Raise on a key naming a timm feature this forward does not implement."""
    for key in tensors:
        for pattern, why in patterns:
            if pattern in key:
                raise InputError(f"{path}: key {key!r} is not supported ({why})")


def math_layout(tensors, keys, *, xp, dtype):  # {key: PyTorch layout} -> {key: math layout}
    """``keys`` to xp in dtype: nn.Linear [out, in] -> [in, out]; conv [D, C, ph, pw] -> [P, D]."""
    out = {}
    for key in keys:
        if key not in tensors:
            continue
        a = tensors[key]
        if a.ndim == 4:                                  # conv kernel [D, C, ph, pw]
            a = a.reshape(a.shape[0], -1).T              # -> [P, D]
        elif a.ndim == 2 and key.endswith(".weight"):    # nn.Linear [out, in]
            a = a.T                                      # -> [in, out]
        out[key] = xp.asarray(np.ascontiguousarray(a), dtype=dtype)
    return out


# ----------------------------------------------------------------------------- config fields
def config_value(path, config, name, kinds, default=None, required=True):
    """config[name] checked against ``kinds``; missing -> default, or InputError if required."""
    if name not in config or config[name] is None:
        if required:
            raise InputError(f"{path}: config field {name!r} is missing")
        return default
    value = config[name]
    if isinstance(value, bool) and bool not in kinds:
        raise InputError(f"{path}: config field {name!r} must be {_names(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise InputError(f"{path}: config field {name!r} must be {_names(kinds)}, got {value!r}")
    return value


def _names(kinds):
    return " or ".join(k.__name__ for k in kinds)


def config_pair(path, config, name, required=True, default=None):
    """An int or [H, W] config field as a tuple (h, w) of positive ints."""
    value = config_value(path, config, name, (int, list, tuple), default, required)
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                 for v in pair):
        raise InputError(f"{path}: config field {name!r} must be a positive int or [H, W], "
                         f"got {value!r}")
    return pair


def config_positive(path, config, name, required=True, default=None):
    """A positive int config field."""
    value = config_value(path, config, name, (int,), default, required)
    if value <= 0:
        raise InputError(f"{path}: config field {name!r} must be a positive int, got {value!r}")
    return value


def patch_grid(path, img_size, patch):
    """(gh, gw) = img_size / patch; InputError naming both when the patch grid does not divide."""
    if img_size[0] % patch[0] or img_size[1] % patch[1]:
        raise InputError(f"{path}: image size {list(img_size)} is not divisible by "
                         f"patch_size {list(patch)}")
    return img_size[0] // patch[0], img_size[1] // patch[1]


def check_heads(path, name, dim, heads):
    """Head count must divide the width (timm head_dim = dim // num_heads)."""
    if dim % heads:
        raise InputError(f"{path}: config field {name!r} ({heads}) does not divide "
                         f"the width {dim}")

