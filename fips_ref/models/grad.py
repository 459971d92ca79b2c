"""Gradients of the whole model: ``vjp(checkpoint, images, dlogits) -> (logits, grads)``.

The vector-Jacobian product of the logits: for the upstream gradient dlogits = dLoss/dlogits
[N, K], grads[key] = dLoss/dTensor for every trainable tensor, under its checkpoint key in the
checkpoint's layout (timm names, PyTorch [out, in] / [D, C, ph, pw]). Eval-mode semantics: no
dropout or drop-path; a distilled DeiT's logits are timm's eval output (head + head_dist) / 2.
For a compressed checkpoint the MLP factors are ``fips.U.{g}`` and ``fips.V.{layer key}``
(train_mlps.py). Layers and derivations: ops.py, vit.py, swin.py, docs/backward.md.
"""
import numpy as np

from ..backend import to_numpy
from ..checkpoint import Checkpoint, InputError, load_checkpoint
from .train_mlps import train_mlps


def vjp(checkpoint, images, dlogits, *, dtype=None, xp=None, batch_size=64):
    """Logits and dLoss/dTensor of every trainable tensor for the upstream gradient ``dlogits``.

    The gradient of FiPS's global stage, which trains every parameter (paper §3 and
    Algorithm 1, global error minimisation; docs/authors-code.md §7).

    Parameters
    ----------
    checkpoint : str, os.PathLike or Checkpoint (original or compressed ``*.fips.npz``)
    images : array [N, C, H, W], normalised, on the host
    dlogits : array [N, K], dLoss/dlogits
    dtype : float32 (default) or float64
    xp : array module or backend name (default ``backend.load_backend()``)
    batch_size : images per forward/backward; caches are held for one batch only

    Returns
    -------
    logits : np.ndarray [N, K]
    grads : {key: np.ndarray}, each in the shape and layout of the checkpoint tensor (dense V
        for ``fips.V.*``: the gradient of V ⊙ M, nonzero off the mask too)
    """
    from . import check_images, prepare_model   # the package imports this module
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = prepare_model(ckpt, dtype=dtype, xp=xp)
    check_images(model, images)
    n, k = images.shape[0], model.cfg.num_classes
    if tuple(getattr(dlogits, "shape", ())) != (n, k):
        raise InputError(f"dlogits must be [N, K] = [{n}, {k}], got shape "
                         f"{tuple(getattr(dlogits, 'shape', ()))}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    mlps = train_mlps(model, ckpt)
    logits, grads = np.empty((n, k), dtype=model.dtype), {}
    for start in range(0, n, batch_size):
        x = model.xp.asarray(images[start:start + batch_size], dtype=model.dtype)  # [B, C, H, W]
        dl = model.xp.asarray(dlogits[start:start + batch_size], dtype=model.dtype)  # [B, K]
        logits[start:start + x.shape[0]] = to_numpy(model_vjp(model, mlps, x, dl, grads))
    return logits, torch_layout(grads, ckpt)


def model_vjp(model, mlps, x, dlogits, grads, params=None):  # [B, C, H, W], [B, K] -> [B, K]
    """One batch on the device: forward with caches, backward; adds math-layout grads to ``grads``.

    ``mlps`` are train_mlps.MLPLayer per block. ``dlogits`` is the array [B, K], or a callable
    logits -> dlogits for a loss of this forward's logits (a training step: loss gradient between
    the forward and the backward). ``params``: the arrays the forward reads (default
    ``model.params``; a training loop passes its own). The entry point for training loops, which
    keep parameters and gradients on the device (see torch_layout for the checkpoint layout).
    """
    from . import ARCHS
    arch, cfg = ARCHS[model.arch], model.cfg
    p = model.params if params is None else params
    t, cache = arch.features_forward(cfg, p, {i: m.forward for i, m in mlps.items()}, x)
    logits, head_cache = arch.head_forward(t, p, cfg)                  # [B, K]
    dl = dlogits(logits) if callable(dlogits) else dlogits
    dt = arch.head_backward(dl, head_cache, p, cfg, grads)
    arch.features_backward(dt, cache, p, cfg, {i: m.backward for i, m in mlps.items()}, grads)
    return logits


def torch_layout(grads, ckpt):  # {key: math layout on xp} -> {key: checkpoint layout, host}
    """Inverse of layers.math_layout: [in, out] -> [out, in], [P, D] -> [D, C, ph, pw].

    ``fips.*`` factor grads are already in the stored layout (U [rows, R], V [R, cols]).
    """
    out = {}
    for key, g in grads.items():
        g = to_numpy(g)
        if not key.startswith("fips."):
            shape = ckpt.tensors[key].shape
            if len(shape) == 4:                          # conv kernel [P, D] -> [D, C, ph, pw]
                g = g.T.reshape(shape)
            elif len(shape) == 2 and key.endswith(".weight"):
                g = g.T                                  # nn.Linear [in, out] -> [out, in]
            g = g.reshape(shape)
        out[key] = np.ascontiguousarray(g)
    return out

