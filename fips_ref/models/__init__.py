"""Model forwards (ViT/DeiT and Swin) from a checkpoint, in batches, on NumPy or CuPy.

Letters: N images, B batch, C channels, T tokens of a block's MLP input, D its width,
K classes. Entry point::

    logits = forward("weights/deit_s.npz", images)                       # [N, K]
    logits, acts = forward(ckpt, images, record_mlp_inputs=True)         # acts[i]: [N, T, D]
    logits, grads = vjp(ckpt, images, dlogits)    # grads[key]: dLoss/dTensor (docs/backward.md)

The MLP of each block is looked up from ``Model.mlps`` ({global block index: callable}), so
a compressed checkpoint (``"fips"`` in ``ckpt.extra``) or a test can swap in factored weights.
See docs/models.md for the timm conventions each function implements.
"""
import numpy as np

from ..backend import load_backend, to_numpy
from ..checkpoint import Checkpoint, InputError, load_checkpoint, refuse_undeclared_blocks
from . import swin, vit
from .grad import model_vjp, vjp
from .layers import (Model, check_shapes, dense_mlp_fn, dense_mlp_keys,
                     dense_mlp_shapes, factored_dims, factored_mlp_fn, math_layout, refuse_keys,
                     tapped)

ARCHS = {"vit": vit, "swin": swin}
DTYPES = (np.float32, np.float64)

__all__ = ["forward", "forward_model", "prepare_model", "Model", "ARCHS",
           "dense_mlp_fn", "factored_mlp_fn", "vjp", "model_vjp"]


def forward(checkpoint, images, *, batch_size=64, record_mlp_inputs=False,
            on_mlp_input=None, dtype=None, xp=None):  # [N, C, H, W] -> [N, K]
    """Logits of a ViT/DeiT or Swin checkpoint on normalised images.

    Parameters
    ----------
    checkpoint : str, os.PathLike or Checkpoint
        An .npz in the format of docs/checkpoint-format.md, or one already loaded.
    images : array [N, C, H, W]
        Normalised float images on the host (a memmap is fine: read one batch at a time).
    batch_size : int
        Images per batch; device memory is bounded by one batch.
    record_mlp_inputs : bool
        Also return {global block index: [N, T, D]} of every block's MLP input (norm2 output).
    on_mlp_input : callable, optional
        ``on_mlp_input(block_index, start, h)`` per batch, h a host array [b, T, D].
    dtype : float32 (default) or float64
    xp : array module (default ``backend.load_backend()``) or backend name

    Returns
    -------
    logits : np.ndarray [N, K], or ``(logits, acts)`` when record_mlp_inputs.
    """
    model = prepare_model(checkpoint, dtype=dtype, xp=xp)
    return forward_model(model, images, batch_size=batch_size,
                         record_mlp_inputs=record_mlp_inputs, on_mlp_input=on_mlp_input)


def prepare_model(checkpoint, *, dtype=None, xp=None, mlp_path=None, cost=None):
    """Parse the config, shape-check every tensor, move weights to xp in math layout, build MLPs.
    ``mlp_path``, ``cost``: the compressed MLPs' inference path (None: per batch, infer.choose_path
    under the infer.CostModel ``cost``; docs/deployment.md §3)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    xp = load_backend(xp) if xp is None or isinstance(xp, str) else xp
    dtype = resolve_dtype(dtype)
    arch_name = ckpt.config.get("arch")
    if arch_name not in ARCHS:
        raise InputError(f"{ckpt.path}: config field 'arch' must be 'vit' or 'swin', "
                         f"got {arch_name!r}")
    arch = ARCHS[arch_name]
    cfg = arch.parse_config(ckpt.path, ckpt.config)
    refuse_keys(ckpt.path, ckpt.tensors, arch.REFUSED)
    refuse_undeclared_blocks(ckpt.path, ckpt.tensors, [prefix for prefix, _ in arch.blocks(cfg)])
    shapes, optional = arch.param_shapes(cfg)
    if arch_name == "vit":
        vit.check_pos_embed(ckpt.path, ckpt.tensors, cfg)
    check_shapes(ckpt.path, ckpt.tensors, shapes, optional)
    params = math_layout(ckpt.tensors, shapes, xp=xp, dtype=dtype)
    mlps = build_mlps(ckpt, arch.blocks(cfg), params, xp=xp, dtype=dtype, mlp_path=mlp_path, cost=cost)
    return Model(arch_name, cfg, params, mlps, xp, dtype, ckpt.path)


def resolve_dtype(dtype):
    """None -> float32; otherwise float32 or float64."""
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt.type not in DTYPES:
        raise InputError(f"dtype must be float32 or float64, got {dt}")
    return dt.type


def build_mlps(ckpt, block_list, params, *, xp, dtype, mlp_path=None, cost=None):
    """{global block index: MLP callable}: factored from the codec where compressed, else dense.

    Dense weights are added to ``params`` in math layout (W1 [D, F], W2 [F, D]).
    """
    factored = _factored(ckpt, xp, dtype, mlp_path)
    mlps = {}
    for i, (prefix, d) in enumerate(block_list):
        if i in factored:
            mlps[i] = _checked_factored(ckpt.path, prefix, d, factored[i], mlp_path, cost)
            continue
        shapes = dense_mlp_shapes(ckpt.path, ckpt.tensors, prefix, d)
        check_shapes(ckpt.path, ckpt.tensors, shapes)
        params.update(math_layout(ckpt.tensors, shapes, xp=xp, dtype=dtype))
        mlps[i] = dense_mlp_fn(*(params[k] for k in dense_mlp_keys(prefix)))
    return mlps


def _factored(ckpt, xp, dtype, mlp_path=None):
    """The codec's factored MLPs of a compressed checkpoint ({} for an original one)."""
    if "fips" not in ckpt.extra:
        return {}
    from ..codec import factored_mlps  # lazy: only compressed checkpoints need the codec
    return factored_mlps(ckpt, xp, dtype, **({} if mlp_path is None else {"paths": (mlp_path,)}))


def _checked_factored(path, prefix, d, layers, mlp_path=None, cost=None):
    """factored_mlp_fn after checking that fc1 reads and fc2 writes the block width d."""
    fc1, fc2 = layers
    (i1, o1), (i2, o2) = factored_dims(fc1), factored_dims(fc2)
    if i1 != d or o2 != d or o1 != i2:
        raise InputError(f"{path}: factored MLP of {prefix} maps {i1} -> {o1} -> {i2} -> {o2}; "
                         f"width must be {d}")
    return factored_mlp_fn(fc1, fc2, mlp_path, cost)


def check_images(model, images):
    """images [N, C, H, W] with C = in_chans and (H, W) = the config's img_size."""
    cfg = model.cfg
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4:
        raise InputError(f"images must be [N, C, H, W], got shape {shape}")
    if shape[1] != cfg.in_chans or shape[2:] != tuple(cfg.img_size):
        raise InputError(f"{model.path}: images are {shape[1]}x{shape[2]}x{shape[3]} "
                         f"(C x H x W) but the checkpoint expects {cfg.in_chans}x"
                         f"{cfg.img_size[0]}x{cfg.img_size[1]} (patch_size "
                         f"{list(cfg.patch_size)})")


def forward_model(model, images, *, batch_size=64, record_mlp_inputs=False,
                  on_mlp_input=None):  # [N, C, H, W] -> [N, K]
    """Run a prepared Model over ``images`` in batches; same returns as :func:`forward`."""
    check_images(model, images)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    arch, n = ARCHS[model.arch], images.shape[0]
    acts = _allocate_acts(arch, model, n) if record_mlp_inputs else None
    logits = np.empty((n, model.cfg.num_classes), dtype=model.dtype)
    for start in range(0, n, batch_size):
        x = model.xp.asarray(images[start:start + batch_size], dtype=model.dtype)  # [B, C, H, W]
        mlps = _tapped_mlps(model.mlps, start, acts, on_mlp_input)
        logits[start:start + x.shape[0]] = to_numpy(arch.forward(model.cfg, model.params, mlps, x))
    return (logits, acts) if record_mlp_inputs else logits


def _allocate_acts(arch, model, n):
    """{block index: host array [N, T, D]} to fill batch by batch."""
    shapes = arch.mlp_token_shapes(model.cfg)
    return {i: np.empty((n, t, d), dtype=model.dtype) for i, (t, d) in enumerate(shapes)}


def _tapped_mlps(mlps, start, acts, on_mlp_input):
    """The model's MLPs, wrapped to copy their inputs to ``acts`` and/or the callback."""
    if acts is None and on_mlp_input is None:
        return mlps

    def tap(index, h):  # h [B, T, D] on the device
        host = to_numpy(h)
        if acts is not None:
            acts[index][start:start + host.shape[0]] = host
        if on_mlp_input is not None:
            on_mlp_input(index, start, host)
    return {i: tapped(f, i, tap) for i, f in mlps.items()}
