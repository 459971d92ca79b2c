"""timm model names -> our checkpoint configs, and the state_dict shapes each config implies.

Every number below is read off timm 1.0 (huggingface/pytorch-image-models):

- ``timm/models/deit.py``: ``deit_*_patch16_224`` and ``deit_*_distilled_patch16_224``
  (``model_args = dict(patch_size=16, embed_dim=..., depth=12, num_heads=...)``), built on
  ``VisionTransformer`` with its defaults ``mlp_ratio=4.``, ``qkv_bias=True``,
  ``class_token=True`` and ``LayerNorm(eps=1e-6)``; distilled models add ``dist_token`` and
  ``head_dist`` (``VisionTransformerDistilled``).
- ``timm/models/vision_transformer.py``: ``vit_base_patch16_224`` (768, 12, 12) and
  ``vit_large_patch16_224`` (1024, 24, 16); their pretrained cfg (``_cfg``) normalises with
  ``IMAGENET_INCEPTION_MEAN/STD`` = 0.5, unlike DeiT and Swin (``IMAGENET_DEFAULT_MEAN/STD``).
- ``timm/models/swin_transformer.py``: ``swin_{tiny,small,base,large}_patch4_window7_224``
  (``patch_size=4, window_size=7, embed_dim=..., depths=..., num_heads=...``), defaults
  ``mlp_ratio=4.``, ``qkv_bias=True``, ``nn.LayerNorm`` (eps 1e-5); stage widths
  ``int(embed_dim * 2 ** i)``; ``PatchMerging`` at the start of stage i >= 1 with a bias-free
  ``reduction``; ``head.fc`` classifier (``ClassifierHead``).

``mean``/``std`` and ``crop_pct`` are extra config fields (ignored by the model code) that
``evaluate`` uses to preprocess images the way the pretrained weights expect. ``crop_pct`` is
each file's ``_cfg`` default: ``'crop_pct': .9`` in ``deit.py``, ``vision_transformer.py`` and
``swin_transformer.py`` alike (none of the 224-px names above overrides it).
"""
import copy

from .checkpoint import InputError

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)   # timm/data/constants.py
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)

# Buffers that timm registers with persistent=False; older .pth files still carry them.
DROPPED_BUFFERS = ("relative_position_index", "attn_mask")

# Resize 256 -> CenterCrop 224: the FiPS test transform, and the timm default for models
# without a pretrained cfg (timm/data/constants.py DEFAULT_CROP_PCT)
FALLBACK_CROP_PCT = 0.875


def _vit(name, embed_dim, depth, num_heads, *, distilled=False, inception_norm=False):
    """Config of a timm ViT/DeiT at 224 px, patch 16, ImageNet-1k head."""
    return {
        "arch": "vit", "timm_name": name, "img_size": 224, "patch_size": 16, "in_chans": 3,
        "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": 4.0,
        "qkv_bias": True, "norm_eps": 1e-6, "class_token": True, "distilled": distilled,
        "num_classes": 1000, "crop_pct": 0.9,           # deit.py / vision_transformer.py _cfg
        "mean": list(IMAGENET_INCEPTION_MEAN if inception_norm else IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_INCEPTION_STD if inception_norm else IMAGENET_DEFAULT_STD),
    }


def _swin(name, embed_dim, depths, num_heads):
    """Config of a timm Swin at 224 px, patch 4, window 7, ImageNet-1k head."""
    return {
        "arch": "swin", "timm_name": name, "img_size": 224, "patch_size": 4, "in_chans": 3,
        "embed_dim": embed_dim, "depths": list(depths), "num_heads": list(num_heads),
        "window_size": 7, "mlp_ratio": 4.0, "qkv_bias": True, "norm_eps": 1e-5,
        "num_classes": 1000, "crop_pct": 0.9,           # swin_transformer.py _cfg
        "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
    }


TIMM_CONFIGS = {
    # timm/models/deit.py
    "deit_tiny_patch16_224": _vit("deit_tiny_patch16_224", 192, 12, 3),
    "deit_small_patch16_224": _vit("deit_small_patch16_224", 384, 12, 6),
    "deit_base_patch16_224": _vit("deit_base_patch16_224", 768, 12, 12),
    "deit_tiny_distilled_patch16_224": _vit("deit_tiny_distilled_patch16_224", 192, 12, 3,
                                            distilled=True),
    "deit_small_distilled_patch16_224": _vit("deit_small_distilled_patch16_224", 384, 12, 6,
                                             distilled=True),
    "deit_base_distilled_patch16_224": _vit("deit_base_distilled_patch16_224", 768, 12, 12,
                                            distilled=True),
    # timm/models/vision_transformer.py
    "vit_base_patch16_224": _vit("vit_base_patch16_224", 768, 12, 12, inception_norm=True),
    "vit_large_patch16_224": _vit("vit_large_patch16_224", 1024, 24, 16, inception_norm=True),
    # timm/models/swin_transformer.py
    "swin_tiny_patch4_window7_224": _swin("swin_tiny_patch4_window7_224", 96,
                                          (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_small_patch4_window7_224": _swin("swin_small_patch4_window7_224", 96,
                                           (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_base_patch4_window7_224": _swin("swin_base_patch4_window7_224", 128,
                                          (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_large_patch4_window7_224": _swin("swin_large_patch4_window7_224", 192,
                                           (2, 2, 18, 2), (6, 12, 24, 48)),
}


def timm_config(name, *, num_classes=None):
    """A fresh copy of the config for timm model ``name`` (InputError if unknown)."""
    if name not in TIMM_CONFIGS:
        known = ", ".join(sorted(TIMM_CONFIGS))
        raise InputError(f"unknown timm model name {name!r} (known: {known})")
    config = copy.deepcopy(TIMM_CONFIGS[name])
    if num_classes is not None:
        config["num_classes"] = int(num_classes)
    return config


def default_crop_pct(config):
    """(crop_pct, where it came from) for evaluating a checkpoint of ``config``: the config's own
    ``crop_pct``, else that of its ``timm_name`` in TIMM_CONFIGS, else 0.875 (unknown model)."""
    if isinstance(config.get("crop_pct"), (int, float)) and 0 < config["crop_pct"] <= 1:
        return float(config["crop_pct"]), "config"
    known = TIMM_CONFIGS.get(config.get("timm_name"))
    if known is not None:
        return known["crop_pct"], f"timm {config['timm_name']}"
    return FALLBACK_CROP_PCT, "fallback (model unknown)"


def is_dropped_buffer(key):
    """True for a non-persistent buffer key that conversion drops."""
    return key.rsplit(".", 1)[-1] in DROPPED_BUFFERS


def _pair(v):
    """int or [H, W] -> (H, W)."""
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _linear(prefix, n_out, n_in, bias=True):
    """Shapes of an nn.Linear: weight [out, in], bias [out]."""
    shapes = {f"{prefix}.weight": (n_out, n_in)}
    if bias:
        shapes[f"{prefix}.bias"] = (n_out,)
    return shapes


def _norm(prefix, dim):
    """Shapes of a LayerNorm: weight [D], bias [D]."""
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _block(prefix, dim, hidden, qkv_bias):
    """Shapes shared by ViT and Swin blocks (norms, qkv, proj, MLP)."""
    shapes = {}
    shapes.update(_norm(f"{prefix}.norm1", dim))
    shapes.update(_linear(f"{prefix}.attn.qkv", 3 * dim, dim, qkv_bias))
    shapes.update(_linear(f"{prefix}.attn.proj", dim, dim))
    shapes.update(_norm(f"{prefix}.norm2", dim))
    shapes.update(_linear(f"{prefix}.mlp.fc1", hidden, dim))
    shapes.update(_linear(f"{prefix}.mlp.fc2", dim, hidden))
    return shapes


def _hidden(c, d, fc1_key, tensors):
    """MLP hidden width F of a block: int(d · mlp_ratio), or, without ``mlp_ratio`` in the
    config, the first dimension of the block's fc1 weight [F, d] in ``tensors``."""
    if "mlp_ratio" in c:
        return int(d * c["mlp_ratio"])
    w = (tensors or {}).get(fc1_key)
    if w is None or len(w.shape) != 2:
        raise InputError(f"config has no 'mlp_ratio' and key {fc1_key!r} gives no hidden width")
    return int(w.shape[0])


def _vit_shapes(c, tensors=None):
    """timm VisionTransformer(/Distilled) state_dict shapes."""
    D, K = c["embed_dim"], c["num_classes"]
    (H, W), (ph, pw) = _pair(c["img_size"]), _pair(c["patch_size"])
    distilled = bool(c.get("distilled", False))
    prefix = int(bool(c.get("class_token", True))) + int(distilled)
    shapes = {"patch_embed.proj.weight": (D, c["in_chans"], ph, pw), "patch_embed.proj.bias": (D,),
              "pos_embed": (1, prefix + (H // ph) * (W // pw), D)}
    if c.get("class_token", True):
        shapes["cls_token"] = (1, 1, D)
    if distilled:
        shapes["dist_token"] = (1, 1, D)
    for i in range(c["depth"]):
        hidden = _hidden(c, D, f"blocks.{i}.mlp.fc1.weight", tensors)
        shapes.update(_block(f"blocks.{i}", D, hidden, c.get("qkv_bias", True)))
    shapes.update(_norm("norm", D))
    if K > 0:
        shapes.update(_linear("head", K, D))
        if distilled:
            shapes.update(_linear("head_dist", K, D))
    return shapes


def swin_stage_resolutions(config):
    """[(H_s, W_s)] token grid of each Swin stage (after its patch merging)."""
    (H, W), (ph, pw) = _pair(config["img_size"]), _pair(config["patch_size"])
    res, out = (H // ph, W // pw), []
    for s in range(len(config["depths"])):
        if s > 0:
            res = ((res[0] + 1) // 2, (res[1] + 1) // 2)  # timm SwinTransformerStage
        out.append(res)
    return out


def _swin_shapes(c, tensors=None):
    """timm SwinTransformer state_dict shapes (timm >= 0.9 layout)."""
    C0, K = c["embed_dim"], c["num_classes"]
    ph, pw = _pair(c["patch_size"])
    win = _pair(c["window_size"])
    dims = [int(C0 * 2 ** s) for s in range(len(c["depths"]))]
    shapes = {"patch_embed.proj.weight": (C0, c["in_chans"], ph, pw),
              "patch_embed.proj.bias": (C0,)}
    shapes.update(_norm("patch_embed.norm", C0))
    for s, (depth, heads, res) in enumerate(zip(c["depths"], c["num_heads"],
                                                swin_stage_resolutions(c))):
        d = dims[s]
        if s > 0:
            shapes.update(_norm(f"layers.{s}.downsample.norm", 4 * dims[s - 1]))
            shapes.update(_linear(f"layers.{s}.downsample.reduction", d, 4 * dims[s - 1],
                                  bias=False))
        wh, ww = min(res[0], win[0]), min(res[1], win[1])  # window clamped to the stage grid
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}"
            shapes.update(_block(p, d, _hidden(c, d, f"{p}.mlp.fc1.weight", tensors),
                                 c.get("qkv_bias", True)))
            shapes[f"{p}.attn.relative_position_bias_table"] = ((2 * wh - 1) * (2 * ww - 1), heads)
    shapes.update(_norm("norm", dims[-1]))
    if K > 0:
        shapes.update(_linear("head.fc", K, dims[-1]))
    return shapes


def expected_shapes(config, tensors=None):
    """Every key -> shape of the timm state_dict that ``config`` describes (no buffers).

    Without ``mlp_ratio`` in the config, each block's hidden width is read off its fc1 weight in
    ``tensors`` (a checkpoint written by hand or by another tool may omit the field).
    """
    if config.get("arch") == "vit":
        return _vit_shapes(config, tensors)
    if config.get("arch") == "swin":
        return _swin_shapes(config, tensors)
    raise InputError(f"config field 'arch' must be 'vit' or 'swin', got {config.get('arch')!r}")
