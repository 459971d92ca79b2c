"""Swin Transformer (v1) forward and backward in timm >= 0.9 parameter naming (timm
``SwinTransformer``); each ``*_forward`` has its ``*_backward`` next to it (docs/backward.md).

Letters: B batch, C channels (stage width), H heads, Hs/Ws stage height/width in tokens,
wh/ww window, Ws window area wh·ww, nW windows per image, K classes, P patch area.

    x = norm(patch_embed(img))                         [B, Hs, Ws, C], NHWC throughout
    per stage s: (s >= 1: patch merging 2x2 -> 2C), then blocks j = 0, 1, ...
        x = x + W-MSA(norm1(x))    shifted by window//2 on odd j (unless Hs <= window)
        x = x + mlp(norm2(x))      on [B, Hs·Ws, C], tokens row-major
    logits = head.fc(mean_{h,w} norm(x))
"""
from dataclasses import dataclass
from typing import NamedTuple

from ..backend import get_xp
from ..checkpoint import InputError
from .layers import check_heads, config_pair, config_positive, config_value, patch_grid
from .ops import (add_grad, layer_norm_backward, layer_norm_forward, linear_backward,
                  linear_forward, no_cache, patch_embed, patch_embed_backward,  # noqa: F401
                  patch_embed_forward)
from .swin_attention import (MASK_VALUE, pad_to_multiple, relative_position_bias,  # noqa: F401
                             relative_position_index, shift_mask, window_attention_backward,
                             window_attention_forward, window_partition, window_reverse)
# (patch_embed, MASK_VALUE and the window geometry are re-exported: tests and readers use them
# as swin.*)

NORM_EPS = 1e-5   # timm Swin norm_layer = nn.LayerNorm (torch default eps) in every norm

REFUSED = (
    ("absolute_pos_embed", "absolute position embedding (ape)"),
    ("layers.0.downsample.", "patch merging at the end of a stage is the timm < 0.9 layout; "
                             "merging must sit at the start of stages >= 1"),
    ("head.weight", "timm < 0.9 head naming; expected 'head.fc.weight'"),
)


class Stage(NamedTuple):
    """One stage's geometry from the config (timm SwinTransformerStage, _calc_window_shift)."""
    resolution: tuple  # (Hs, Ws) tokens after this stage's patch merging
    dim: int           # C = embed_dim · 2^s
    heads: int
    window: tuple      # (wh, ww) = min(resolution, window_size) per axis
    shift: tuple       # shift of odd blocks: window_size // 2, or 0 where resolution <= window


@dataclass(frozen=True)
class SwinConfig:
    """The config fields the Swin forward reads (timm names; see docs/models.md)."""
    img_size: tuple
    patch_size: tuple
    grid: tuple
    in_chans: int
    embed_dim: int
    depths: tuple
    num_heads: tuple
    window_size: tuple
    num_classes: int
    qkv_bias: bool
    norm_eps: float
    stages: tuple  # of Stage


def stage_geometry(grid, embed_dim, num_heads, window_size):
    """Per stage: resolution ceil-halved from stage 1 on; window clamped; no shift once res <= w."""
    stages, res = [], tuple(grid)
    for s, heads in enumerate(num_heads):
        if s > 0:
            res = tuple((r + 1) // 2 for r in res)  # PatchMerging pads odd sizes
        window = tuple(min(r, w) for r, w in zip(res, window_size))
        shift = tuple(0 if r <= w else w // 2 for r, w in zip(res, window_size))
        stages.append(Stage(res, embed_dim * 2 ** s, heads, window, shift))
    return tuple(stages)


def _int_list(path, config, name):
    value = config_value(path, config, name, (list, tuple))
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                            for v in value):
        raise InputError(f"{path}: config field {name!r} must be a list of positive ints")
    return tuple(value)


def parse_config(path, config):
    """SwinConfig from a checkpoint config; InputError naming the file and the field."""
    img = config_pair(path, config, "img_size")
    patch = config_pair(path, config, "patch_size")
    grid = patch_grid(path, img, patch)
    dim = config_positive(path, config, "embed_dim")
    depths = _int_list(path, config, "depths")
    heads = _int_list(path, config, "num_heads")
    if len(heads) != len(depths):
        raise InputError(f"{path}: config field 'num_heads' has {len(heads)} entries "
                         f"but 'depths' has {len(depths)}")
    window = config_pair(path, config, "window_size")
    stages = stage_geometry(grid, dim, heads, window)
    for g in stages:
        check_heads(path, "num_heads", g.dim, g.heads)
    return SwinConfig(
        img_size=img, patch_size=patch, grid=grid, embed_dim=dim, depths=depths,
        in_chans=config_positive(path, config, "in_chans", required=False, default=3),
        num_heads=heads, window_size=window,
        num_classes=config_positive(path, config, "num_classes"),
        qkv_bias=config_value(path, config, "qkv_bias", (bool,), True, required=False),
        norm_eps=float(config_value(path, config, "norm_eps", (int, float), NORM_EPS,
                                    required=False)),
        stages=stages)


def blocks(cfg):
    """[(prefix, C)] of every block in forward order: stages in order, then blocks."""
    return [(f"layers.{s}.blocks.{j}", g.dim)
            for s, g in enumerate(cfg.stages) for j in range(cfg.depths[s])]


def mlp_token_shapes(cfg):
    """[(T, C)] of each block's MLP input, T = Hs·Ws of its stage."""
    return [(g.resolution[0] * g.resolution[1], g.dim)
            for s, g in enumerate(cfg.stages) for _ in range(cfg.depths[s])]


def param_shapes(cfg):
    """({key: PyTorch shape} of every non-MLP tensor, optional keys); MLPs are checked per block."""
    C0, (ph, pw), last = cfg.embed_dim, cfg.patch_size, cfg.stages[-1].dim
    shapes = {"patch_embed.proj.weight": (C0, cfg.in_chans, ph, pw),
              "patch_embed.proj.bias": (C0,), "patch_embed.norm.weight": (C0,),
              "patch_embed.norm.bias": (C0,), "norm.weight": (last,), "norm.bias": (last,),
              "head.fc.weight": (cfg.num_classes, last), "head.fc.bias": (cfg.num_classes,)}
    for s, g in enumerate(cfg.stages):
        C = g.dim
        if s > 0:
            d = f"layers.{s}.downsample"
            shapes.update({f"{d}.norm.weight": (2 * C,), f"{d}.norm.bias": (2 * C,),
                           f"{d}.reduction.weight": (C, 2 * C)})
        table = ((2 * g.window[0] - 1) * (2 * g.window[1] - 1), g.heads)
        for j in range(cfg.depths[s]):
            b = f"layers.{s}.blocks.{j}"
            shapes.update({f"{b}.{k}": v for k, v in (
                ("norm1.weight", (C,)), ("norm1.bias", (C,)), ("attn.qkv.weight", (3 * C, C)),
                ("attn.proj.weight", (C, C)), ("attn.proj.bias", (C,)),
                ("attn.relative_position_bias_table", table),
                ("norm2.weight", (C,)), ("norm2.bias", (C,)))})
            if cfg.qkv_bias:
                shapes[f"{b}.attn.qkv.bias"] = (3 * C,)
    return shapes, ()


# ----------------------------------------------------------------------------- forward / backward
# Each *_forward returns (out, cache); its *_backward takes d(out) and the cache, adds parameter
# gradients (math layout, timm keys) to ``grads`` and returns d(input). ``mlps[i]`` is block i's
# MLP as h -> (y, cache) (ops.no_cache for inference), its backward a train_mlps.MLPLayer's.
class BlockCache(NamedTuple):
    norm1: object
    attn: object    # swin_attention.WindowCache
    shift: tuple
    norm2: object
    mlp: object


def block_forward(x, p, prefix, stage, shifted, mlp, eps):  # [B, H, W, C] -> [B, H, W, C]
    """timm SwinTransformerBlock.forward: x + attn(norm1(x)); x + mlp(norm2(x)) on [B, H·W, C]."""
    B, H, W, C = x.shape
    shift = stage.shift if shifted else (0, 0)
    h, n1 = layer_norm_forward(x, p[f"{prefix}.norm1.weight"], p[f"{prefix}.norm1.bias"], eps)
    a, ca = window_attention_forward(h, p, f"{prefix}.attn", stage.heads, stage.window, shift)
    x = x + a
    t = x.reshape(B, H * W, C)                           # -> [B, T, C], row-major tokens
    h, n2 = layer_norm_forward(t, p[f"{prefix}.norm2.weight"], p[f"{prefix}.norm2.bias"], eps)
    m, cm = mlp(h)
    return (t + m).reshape(B, H, W, C), BlockCache(n1, ca, shift, n2, cm)  # -> [B, H, W, C]


def block_backward(dy, c, p, prefix, stage, mlp_backward, grads):  # [B, H, W, C] -> same
    """Residuals pass dy through; each branch adds its sublayer and norm backward."""
    B, H, W, C = dy.shape
    dt = dy.reshape(B, H * W, C)                         # -> [B, T, C]
    dx2, dw2, db2 = layer_norm_backward(mlp_backward(dt, c.mlp, grads), c.norm2)
    dx = (dt + dx2).reshape(B, H, W, C)
    dh = window_attention_backward(dx, c.attn, p, f"{prefix}.attn", stage.window, c.shift, grads)
    dx1, dw1, db1 = layer_norm_backward(dh, c.norm1)
    for name, g in (("norm2.weight", dw2), ("norm2.bias", db2),
                    ("norm1.weight", dw1), ("norm1.bias", db1)):
        add_grad(grads, f"{prefix}.{name}", g)
    return dx + dx1


def patch_merging_forward(x, p, prefix, eps):  # [B, H, W, C] -> [B, ⌈H/2⌉, ⌈W/2⌉, 2C]
    """timm PatchMerging: pad odd sizes; concat x[0::2,0::2], x[1::2,0::2], x[0::2,1::2],
    x[1::2,1::2] on channels; LayerNorm(4C); bias-free reduction to 2C."""
    xp = get_xp(x)
    size = x.shape[1:3]
    x = pad_to_multiple(x, (2, 2))
    x = xp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                        x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)  # -> [B, H/2, W/2, 4C]
    x, nc = layer_norm_forward(x, p[f"{prefix}.norm.weight"], p[f"{prefix}.norm.bias"], eps)
    y, x = linear_forward(x, p[f"{prefix}.reduction.weight"])  # [.., 4C] -> [.., 2C], no bias
    return y, (nc, x, size)


def patch_merging_backward(dy, c, p, prefix, grads):  # [B, H/2, W/2, 2C] -> [B, H, W, C]
    """Reduction and norm backward, then the four channel blocks go back to their pixels."""
    xp = get_xp(dy)
    nc, x, (H, W) = c
    dx, dW, _ = linear_backward(dy, x, p[f"{prefix}.reduction.weight"], has_bias=False)
    dx, dw, db = layer_norm_backward(dx, nc)             # -> [B, H/2, W/2, 4C]
    B, h, w, C4 = dx.shape
    C = C4 // 4
    dpad = xp.empty((B, 2 * h, 2 * w, C), dtype=dx.dtype)  # every pixel is written once
    for j, (r, s) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        dpad[:, r::2, s::2] = dx[..., j * C:(j + 1) * C]
    for name, g in (("reduction.weight", dW), ("norm.weight", dw), ("norm.bias", db)):
        add_grad(grads, f"{prefix}.{name}", g)
    return dpad[:, :H, :W]                               # pad's adjoint: crop


def features_forward(cfg, p, mlps, x, keep=True):  # [B, C_in, Hi, Wi] -> [B, Hs, Ws, C]
    """timm forward_features: patch embed + LN (NHWC), stages (merging first if s >= 1), norm.

    keep=False drops the caches as it goes (inference)."""
    eps = cfg.norm_eps
    t, patches = patch_embed_forward(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"],
                                     cfg.patch_size)     # -> [B, gh, gw, C0]
    t, nc0 = layer_norm_forward(t, p["patch_embed.norm.weight"], p["patch_embed.norm.bias"], eps)
    caches, i = [], 0
    for s, stage in enumerate(cfg.stages):
        if s > 0:
            t, c = patch_merging_forward(t, p, f"layers.{s}.downsample", eps)  # -> [B, Hs, Ws, C]
            caches.append(c if keep else None)
            del c                                        # inference: free it now
        for j in range(cfg.depths[s]):
            t, c = block_forward(t, p, f"layers.{s}.blocks.{j}", stage, j % 2 == 1, mlps[i], eps)
            caches.append(c if keep else None)
            del c                                        # inference: free it now
            i += 1
    t, nc = layer_norm_forward(t, p["norm.weight"], p["norm.bias"], eps)
    return t, (patches, nc0, caches, nc)


def features_backward(dt, cache, p, cfg, mlp_backwards, grads):  # [B, Hs, Ws, C] -> None
    """Backward of features_forward: stages and blocks in reverse order."""
    patches, nc0, caches, nc = cache
    dt, dw, db = layer_norm_backward(dt, nc)
    add_grad(grads, "norm.weight", dw)
    add_grad(grads, "norm.bias", db)
    i = sum(cfg.depths)
    for s in reversed(range(len(cfg.stages))):
        for j in reversed(range(cfg.depths[s])):
            i -= 1
            dt = block_backward(dt, caches.pop(), p, f"layers.{s}.blocks.{j}", cfg.stages[s],
                                mlp_backwards[i], grads)
        if s > 0:
            dt = patch_merging_backward(dt, caches.pop(), p, f"layers.{s}.downsample", grads)
    dt, dw, db = layer_norm_backward(dt, nc0)
    dW, dbp = patch_embed_backward(dt, patches, p["patch_embed.proj.weight"])
    for name, g in (("norm.weight", dw), ("norm.bias", db), ("proj.weight", dW),
                    ("proj.bias", dbp)):
        add_grad(grads, f"patch_embed.{name}", g)


def head_forward(t, p, cfg):  # [B, Hs, Ws, C] -> [B, K]
    """timm ClassifierHead(pool 'avg', NHWC): mean over positions, then head.fc."""
    pooled = t.mean(axis=(1, 2))                         # -> [B, C]
    logits, _ = linear_forward(pooled, p["head.fc.weight"], p["head.fc.bias"])
    return logits, (pooled, t.shape)


def head_backward(dlogits, c, p, cfg, grads):  # [B, K] -> [B, Hs, Ws, C]
    """head.fc backward, then the mean spreads dpooled / (Hs·Ws) over every position."""
    xp = get_xp(dlogits)
    pooled, shape = c
    dpooled, dW, db = linear_backward(dlogits, pooled, p["head.fc.weight"])  # -> [B, C]
    add_grad(grads, "head.fc.weight", dW)
    add_grad(grads, "head.fc.bias", db)
    return xp.broadcast_to((dpooled / (shape[1] * shape[2]))[:, None, None], shape)


# ----------------------------------------------------------------------------- inference
# The same functions with the caches dropped; ``mlp`` / ``mlps[i]`` are plain callables here.
def window_attention(x, p, prefix, heads, window, shift):  # [B, H, W, C] -> [B, H, W, C]
    return window_attention_forward(x, p, prefix, heads, window, shift)[0]


def block(x, p, prefix, stage, shifted, mlp, eps):  # [B, H, W, C] -> [B, H, W, C]
    return block_forward(x, p, prefix, stage, shifted, no_cache(mlp), eps)[0]


def patch_merging(x, p, prefix, eps):  # [B, H, W, C] -> [B, ⌈H/2⌉, ⌈W/2⌉, 2C]
    return patch_merging_forward(x, p, prefix, eps)[0]


def features(cfg, p, mlps, x):  # [B, C_in, Hi, Wi] -> [B, Hs, Ws, C]
    return features_forward(cfg, p, {i: no_cache(f) for i, f in mlps.items()}, x, keep=False)[0]


def head(t, p, cfg):  # [B, Hs, Ws, C] -> [B, K]
    return head_forward(t, p, cfg)[0]


def forward(cfg, p, mlps, x):  # [B, C_in, Hi, Wi] -> [B, K]
    """Logits of a Swin; ``mlps[i]`` is global block i's MLP callable [..., C] -> [..., C]."""
    return head(features(cfg, p, mlps, x), p, cfg)
