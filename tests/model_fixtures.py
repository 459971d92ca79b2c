"""Tiny random ViT/DeiT and Swin checkpoints in timm key naming and PyTorch layout.

Every tensor is written the way ``timm.create_model(...).state_dict()`` holds it ([out, in]
linear weights, [D, C, ph, pw] patch conv), so the forward's one transpose is exercised.
Weights are O(1)-scaled random draws (not timm's init: zero biases and unit LayerNorm
weights would hide ordering mistakes). Shapes here are written out independently of
fips_ref.models, so a wrong geometry there fails the shape check rather than agreeing.
"""
import json
import os

import numpy as np

from fips_ref.checkpoint import Checkpoint, MLPBlock, json_entry, load_checkpoint, save_npz_atomic


def mlp_weights(rng, n_blocks, d, f, *, scaled=False):
    """Just the MLPs of ``n_blocks`` ViT blocks: ({timm key: float64 [out, in] / [out]}, [MLPBlock]).

    ``scaled``: weights / √fan-in and biases × 0.1 (outputs O(1)); else unit normal draws.
    """
    w_in, w_hidden, b_scale = (d**0.5, f**0.5, 0.1) if scaled else (1.0, 1.0, 1.0)
    weights, blocks = {}, []
    for i in range(n_blocks):
        b = MLPBlock(i, f"blocks.{i}", 0, d, f)
        weights[b.key("mlp.fc1.weight")] = rng.standard_normal((f, d)) / w_in
        weights[b.key("mlp.fc1.bias")] = b_scale * rng.standard_normal(f)
        weights[b.key("mlp.fc2.weight")] = rng.standard_normal((d, f)) / w_hidden
        weights[b.key("mlp.fc2.bias")] = b_scale * rng.standard_normal(d)
        blocks.append(b)
    return weights, blocks


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


# ----------------------------------------------------------------------------- timm oracle cases
# Small timm models compared against fips_ref.models, live (tests/test_models_timm.py, needs
# torch + timm) and through stored outputs (tests/test_timm_fixtures.py, made by
# weights/make_timm_fixtures.py). name -> (distilled, timm kwargs, our config fields beyond
# those derived from the kwargs).
TIMM_VIT_CASES = {
    # vit_tiny-like; norm_eps left out of the config: the ViT default must be 1e-6
    "vit": (False, dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                        num_classes=10), {}),
    # non-square image and patch, no qkv bias, LayerScale
    "vit_rect_ls": (False, dict(img_size=(32, 24), patch_size=(8, 4), embed_dim=24, depth=2,
                                num_heads=3, num_classes=7, qkv_bias=False, init_values=0.5,
                                mlp_ratio=3.0), {"norm_eps": 1e-6}),
    "deit_distilled": (True, dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                  num_classes=10), {"distilled": True, "norm_eps": 1e-6}),
}
# name -> timm SwinTransformer kwargs
TIMM_SWIN_CASES = {
    # swin_tiny-like; last stage 4x4 = window 4 (no shift); norm_eps default must be 1e-5
    "swin": dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2),
                 num_heads=(1, 2, 4), window_size=4, num_classes=10),
    # window 2 on 16x16, 8x8, 4x4: every stage larger than the window, so every second block
    # of every stage runs shifted windows (shift 1) with the attention mask
    "swin_shift": dict(img_size=32, patch_size=2, embed_dim=8, depths=(2, 2, 2),
                       num_heads=(1, 2, 4), window_size=2, num_classes=5),
    # window 6: stage 0 12x12 shifted by 3, stage 1 6x6 = window, stage 2 3x3 clamps to 3
    "swin_clamp": dict(img_size=48, patch_size=4, embed_dim=8, depths=(2, 2, 2),
                       num_heads=(2, 2, 4), window_size=6, num_classes=5),
    # grid 10 not divisible by window 4 (padded windows), odd 5x5 stage (padded merging)
    "swin_pad": dict(img_size=40, patch_size=4, embed_dim=8, depths=(2, 2, 2),
                     num_heads=(1, 2, 2), window_size=4, num_classes=5),
    # non-square image: stage 1 is 4x6, so only the width shifts; [H, W] config fields
    "swin_rect": dict(img_size=(32, 48), patch_size=4, embed_dim=8, depths=(2, 4),
                      num_heads=(1, 2), window_size=4, num_classes=6),
    # non-square window [4, 2]: relative position index and mask per axis; stage 1 (4x4)
    # keeps the 4x2 window and shifts only along the width
    "swin_rect_window": dict(img_size=32, patch_size=4, embed_dim=8, depths=(2, 2),
                             num_heads=(1, 2), window_size=(4, 2), num_classes=4),
}
# the cases stored as fixtures under tests/data/timm_<name>.npz
TIMM_FIXTURE_CASES = ("vit", "deit_distilled", "swin_shift", "swin_clamp")


def _as_list(v):
    return list(v) if isinstance(v, tuple) else v


def import_timm_reference():
    """The timm_reference module, or skip the calling test module where torch or timm is missing
    or cannot be imported (timm_reference stubs a broken torchvision first)."""
    import importlib
    import importlib.util

    import pytest
    pytest.importorskip("torch")
    if importlib.util.find_spec("timm") is None:
        pytest.skip("could not import 'timm': not installed", allow_module_level=True)
    try:
        return importlib.import_module("timm_reference")
    except Exception as e:  # e.g. a torchvision built for another torch: RuntimeError on import
        pytest.skip(f"timm is not importable here: {type(e).__name__}: {e}", allow_module_level=True)


def timm_vit_config(kw, extra):
    """Our checkpoint config of a timm VisionTransformer(**kw)."""
    config = dict(arch="vit", img_size=_as_list(kw["img_size"]),
                  patch_size=_as_list(kw["patch_size"]), in_chans=3, embed_dim=kw["embed_dim"],
                  depth=kw["depth"], num_heads=kw["num_heads"],
                  mlp_ratio=kw.get("mlp_ratio", 4.0), qkv_bias=kw.get("qkv_bias", True),
                  class_token=True, distilled=False, num_classes=kw["num_classes"])
    return {**config, **extra}


def timm_swin_config(kw):
    """Our checkpoint config of a timm SwinTransformer(**kw)."""
    return dict(arch="swin", img_size=_as_list(kw["img_size"]), patch_size=kw["patch_size"],
                in_chans=3, embed_dim=kw["embed_dim"], depths=list(kw["depths"]),
                num_heads=list(kw["num_heads"]), window_size=_as_list(kw["window_size"]),
                mlp_ratio=4.0, qkv_bias=True, num_classes=kw["num_classes"])


def timm_case_config(name):
    """Our config of any TIMM_VIT_CASES / TIMM_SWIN_CASES entry."""
    if name in TIMM_VIT_CASES:
        _, kw, extra = TIMM_VIT_CASES[name]
        return timm_vit_config(kw, extra)
    return timm_swin_config(TIMM_SWIN_CASES[name])


def timm_case_images(name, n=3, seed=0):
    """[n, 3, H, W] float32 standard-normal inputs of a case."""
    kw = TIMM_VIT_CASES[name][1] if name in TIMM_VIT_CASES else TIMM_SWIN_CASES[name]
    h, w = _pair(kw["img_size"])
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def timm_fixture_path(name):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"timm_{name}.npz")


def load_timm_fixture(name):
    """(Checkpoint, images, timm float64 logits, [timm float64 MLP input of every block], provenance).

    The file holds the timm state_dict under ``w/{key}`` (float32, PyTorch layout), the config
    as JSON, the inputs and timm's outputs (weights/make_timm_fixtures.py).
    """
    with np.load(timm_fixture_path(name), allow_pickle=False) as z:
        tensors = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
        n_blocks = sum(k.startswith("mlp_in.") for k in z.files)
        mlp_in = [z[f"mlp_in.{i}"] for i in range(n_blocks)]
        config = json.loads(str(z["config"]))
        ckpt = Checkpoint(path=f"<timm fixture {name}>", config=config, tensors=tensors)
        return ckpt, z["images"], z["logits"], mlp_in, str(z["provenance"])
