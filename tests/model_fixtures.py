"""Tiny random ViT/DeiT and Swin checkpoints in timm key naming and PyTorch layout.

Every tensor is written the way ``timm.create_model(...).state_dict()`` holds it ([out, in]
linear weights, [D, C, ph, pw] patch conv), so the forward's one transpose is exercised.
Weights are O(1)-scaled random draws (not timm's init: zero biases and unit LayerNorm
weights would hide ordering mistakes). Shapes here are written out independently of
fips_ref.models, so a wrong geometry there fails the shape check rather than agreeing.
"""
import os

import numpy as np

from fips_ref.checkpoint import Checkpoint, json_entry, load_checkpoint, save_npz_atomic


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _randn(rng, *shape, scale=1.0, mean=0.0):
    """Scaled normal draw, stored as float32 like timm checkpoints."""
    return (mean + scale * rng.standard_normal(shape)).astype(np.float32)


def _linear(rng, t, key, n_out, n_in, bias=True):
    t[f"{key}.weight"] = _randn(rng, n_out, n_in, scale=n_in ** -0.5)  # nn.Linear [out, in]
    if bias:
        t[f"{key}.bias"] = _randn(rng, n_out, scale=0.1)


def _norm(rng, t, key, n):
    t[f"{key}.weight"] = _randn(rng, n, scale=0.1, mean=1.0)
    t[f"{key}.bias"] = _randn(rng, n, scale=0.1)


def _mlp(rng, t, prefix, d, mlp_ratio):
    f = int(d * mlp_ratio)
    _linear(rng, t, f"{prefix}.mlp.fc1", f, d)
    _linear(rng, t, f"{prefix}.mlp.fc2", d, f)


def _finish(path, config, tensors, name):
    """Return a Checkpoint; with ``path`` (file or folder) save it and load it back."""
    if path is None:
        return Checkpoint(path=f"<{name}>", config=config, tensors=tensors)
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, f"{name}.npz")
    save_npz_atomic(path, {**tensors, "config": json_entry(config)})
    return load_checkpoint(path)


def make_vit_checkpoint(path=None, *, img_size=8, patch_size=4, in_chans=3, embed_dim=16,
                        depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5, qkv_bias=True,
                        distilled=False, layerscale=False, norm_eps=1e-6, seed=0):
    """A random timm-layout ViT (or distilled DeiT, or with LayerScale) checkpoint."""
    rng, t, D = np.random.default_rng(seed), {}, embed_dim
    (ih, iw), (ph, pw) = _pair(img_size), _pair(patch_size)
    n = (2 if distilled else 1) + (ih // ph) * (iw // pw)
    t["patch_embed.proj.weight"] = _randn(rng, D, in_chans, ph, pw,
                                          scale=(in_chans * ph * pw) ** -0.5)
    t["patch_embed.proj.bias"] = _randn(rng, D, scale=0.1)
    t["cls_token"] = _randn(rng, 1, 1, D, scale=0.5)
    if distilled:
        t["dist_token"] = _randn(rng, 1, 1, D, scale=0.5)
    t["pos_embed"] = _randn(rng, 1, n, D, scale=0.5)
    for i in range(depth):
        b = f"blocks.{i}"
        _norm(rng, t, f"{b}.norm1", D)
        _linear(rng, t, f"{b}.attn.qkv", 3 * D, D, bias=qkv_bias)
        _linear(rng, t, f"{b}.attn.proj", D, D)
        _norm(rng, t, f"{b}.norm2", D)
        _mlp(rng, t, b, D, mlp_ratio)
        if layerscale:
            t[f"{b}.ls1.gamma"] = _randn(rng, D, scale=0.1, mean=0.5)
            t[f"{b}.ls2.gamma"] = _randn(rng, D, scale=0.1, mean=0.5)
    _norm(rng, t, "norm", D)
    _linear(rng, t, "head", num_classes, D)
    if distilled:
        _linear(rng, t, "head_dist", num_classes, D)
    config = dict(arch="vit", img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                  embed_dim=D, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                  qkv_bias=qkv_bias, norm_eps=norm_eps, class_token=True, distilled=distilled,
                  num_classes=num_classes)
    return _finish(path, config, t, "vit")


def swin_resolutions(img_size, patch_size, n_stages):
    """Token resolution of each stage: patch grid, then ceil-halved by each patch merging."""
    (ih, iw), (ph, pw) = _pair(img_size), _pair(patch_size)
    res = [(ih // ph, iw // pw)]
    for _ in range(n_stages - 1):
        res.append(((res[-1][0] + 1) // 2, (res[-1][1] + 1) // 2))
    return res


def make_swin_checkpoint(path=None, *, img_size=16, patch_size=2, in_chans=3, embed_dim=8,
                         depths=(2, 2), num_heads=(1, 2), window_size=4, mlp_ratio=2.0,
                         num_classes=5, qkv_bias=True, norm_eps=1e-5, stale_buffers=False,
                         seed=0):
    """A random timm >= 0.9 layout Swin checkpoint (merging at the start of stages >= 1).

    ``stale_buffers`` adds garbage ``relative_position_index`` / ``attn_mask`` entries, as old
    checkpoints carry; the forward must derive them and ignore these.
    """
    rng, t, C0 = np.random.default_rng(seed), {}, embed_dim
    ph, pw = _pair(patch_size)
    wh, ww = _pair(window_size)
    t["patch_embed.proj.weight"] = _randn(rng, C0, in_chans, ph, pw,
                                          scale=(in_chans * ph * pw) ** -0.5)
    t["patch_embed.proj.bias"] = _randn(rng, C0, scale=0.1)
    _norm(rng, t, "patch_embed.norm", C0)
    resolutions = swin_resolutions(img_size, patch_size, len(depths))
    for s, ((rh, rw), heads) in enumerate(zip(resolutions, num_heads)):
        C = C0 * 2 ** s
        if s > 0:
            _norm(rng, t, f"layers.{s}.downsample.norm", 2 * C)
            _linear(rng, t, f"layers.{s}.downsample.reduction", C, 2 * C, bias=False)
        cwh, cww = min(rh, wh), min(rw, ww)  # window clamped to the stage resolution
        for j in range(depths[s]):
            b = f"layers.{s}.blocks.{j}"
            _norm(rng, t, f"{b}.norm1", C)
            _linear(rng, t, f"{b}.attn.qkv", 3 * C, C, bias=qkv_bias)
            _linear(rng, t, f"{b}.attn.proj", C, C)
            t[f"{b}.attn.relative_position_bias_table"] = _randn(
                rng, (2 * cwh - 1) * (2 * cww - 1), heads, scale=0.5)
            _norm(rng, t, f"{b}.norm2", C)
            _mlp(rng, t, b, C, mlp_ratio)
            if stale_buffers:
                t[f"{b}.attn.relative_position_index"] = np.zeros((cwh * cww,) * 2, np.int64)
                t[f"{b}.attn_mask"] = np.full((4, cwh * cww, cwh * cww), 50.0, np.float32)
    last = C0 * 2 ** (len(depths) - 1)
    _norm(rng, t, "norm", last)
    _linear(rng, t, "head.fc", num_classes, last)
    config = dict(arch="swin", img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                  embed_dim=C0, depths=list(depths), num_heads=list(num_heads),
                  window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  norm_eps=norm_eps, num_classes=num_classes)
    return _finish(path, config, t, "swin")


def random_images(ckpt, n, seed=0):
    """[n, C, H, W] float32 standard-normal images matching a checkpoint's config."""
    c = ckpt.config
    h, w = _pair(c["img_size"])
    shape = (n, c["in_chans"], h, w)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
