"""Swin Transformer (v1) forward in timm >= 0.9 parameter naming (timm ``SwinTransformer``).

Letters: B batch, C channels (stage width), H heads, Hs/Ws stage height/width in tokens,
wh/ww window, Ws window area wh·ww, nW windows per image, K classes, P patch area.

    x = norm(patch_embed(img))                         [B, Hs, Ws, C], NHWC throughout
    per stage s: (s >= 1: patch merging 2x2 -> 2C), then blocks j = 0, 1, ...
        x = x + W-MSA(norm1(x))    shifted by window//2 on odd j (unless Hs <= window)
        x = x + mlp(norm2(x))      on [B, Hs·Ws, C], tokens row-major
    logits = head.fc(mean_{h,w} norm(x))
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ..backend import get_xp
from ..checkpoint import InputError
from .layers import (attention, check_heads, config_pair, config_positive, config_value,
                     layer_norm, linear, patch_embed, patch_grid)

NORM_EPS = 1e-5   # timm Swin norm_layer = nn.LayerNorm (torch default eps) in every norm
MASK_VALUE = -100.0  # timm SwinTransformerBlock.get_attn_mask: masked_fill(!= 0, -100.0)

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


# ----------------------------------------------------------------------------- windows
def window_partition(x, window):  # [B, Hp, Wp, C] -> [B·nW, wh, ww, C]
    """timm window_partition: windows ordered batch outer, then window row, then window column."""
    B, H, W, C = x.shape
    wh, ww = window
    t = x.reshape(B, H // wh, wh, W // ww, ww, C)        # -> [B, Hp/wh, wh, Wp/ww, ww, C]
    t = t.transpose(0, 1, 3, 2, 4, 5)                    # -> [B, Hp/wh, Wp/ww, wh, ww, C]
    return t.reshape(-1, wh, ww, C)                      # -> [B·nW, wh, ww, C]


def window_reverse(windows, window, H, W):  # [B·nW, wh, ww, C] -> [B, H, W, C]
    """timm window_reverse: inverse of window_partition for an H x W map."""
    wh, ww = window
    C = windows.shape[-1]
    t = windows.reshape(-1, H // wh, W // ww, wh, ww, C)  # -> [B, H/wh, W/ww, wh, ww, C]
    t = t.transpose(0, 1, 3, 2, 4, 5)                    # -> [B, H/wh, wh, W/ww, ww, C]
    return t.reshape(-1, H, W, C)                        # -> [B, H, W, C]


@lru_cache(maxsize=64)
def relative_position_index(wh, ww):  # -> [Ws, Ws] int (host)
    """timm get_relative_position_index: (Δh + wh − 1)(2ww − 1) + (Δw + ww − 1), Δ = query − key."""
    hh, ww_ = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    coords = np.stack([hh.reshape(-1), ww_.reshape(-1)])  # [2, Ws], row-major
    d = coords[:, :, None] - coords[:, None, :]            # -> [2, Ws, Ws]
    index = (d[0] + wh - 1) * (2 * ww - 1) + (d[1] + ww - 1)
    index.flags.writeable = False
    return index


def relative_position_bias(table, window):  # [(2wh−1)(2ww−1), H] -> [H, Ws, Ws]
    """timm WindowAttention._get_rel_pos_bias: table[index] permuted to heads first."""
    xp = get_xp(table)
    index = xp.asarray(relative_position_index(*window))  # [Ws, Ws]
    n = index.shape[0]
    bias = table[index.reshape(-1)].reshape(n, n, -1)    # -> [Ws, Ws, H]
    return bias.transpose(2, 0, 1)                       # -> [H, Ws, Ws]


@lru_cache(maxsize=64)
def shift_mask(hp, wp, window, shift):  # -> [nW, Ws, Ws] float64 (host), 0 or -100
    """timm get_attn_mask: 9 region labels on the padded map, −100 between different labels."""
    labels = np.zeros((1, hp, wp, 1))
    (wh, ww), (sh, sw), cnt = window, shift, 0
    for h in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for w in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            labels[:, h, w, :] = cnt
            cnt += 1
    win = window_partition(labels, window).reshape(-1, wh * ww)  # -> [nW, Ws]
    diff = win[:, None, :] - win[:, :, None]                       # -> [nW, Ws, Ws]
    mask = np.where(diff != 0, MASK_VALUE, 0.0)
    mask.flags.writeable = False
    return mask


# ----------------------------------------------------------------------------- forward
def pad_to_multiple(x, multiple):  # [B, H, W, C] -> [B, Hp, Wp, C]
    """Zero-pad bottom/right so H, W divide by ``multiple`` (timm F.pad in _attn / PatchMerging)."""
    xp = get_xp(x)
    ph, pw = (-x.shape[1]) % multiple[0], (-x.shape[2]) % multiple[1]
    if not (ph or pw):
        return x
    return xp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))


def window_attention(x, p, prefix, heads, window, shift):  # [B, H, W, C] -> [B, H, W, C]
    """timm SwinTransformerBlock._attn: roll −s, pad, partition, W-MSA, reverse, crop, roll +s."""
    xp = get_xp(x)
    B, H, W, C = x.shape
    wh, ww = window
    if any(shift):
        x = xp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    x = pad_to_multiple(x, window)                       # -> [B, Hp, Wp, C]
    Hp, Wp = x.shape[1], x.shape[2]
    win = window_partition(x, window).reshape(-1, wh * ww, C)  # -> [B·nW, Ws, C]
    table = p[f"{prefix}.relative_position_bias_table"]
    biases = [relative_position_bias(table, window)[None]]  # [1, H, Ws, Ws]
    if any(shift):
        mask = xp.asarray(shift_mask(Hp, Wp, window, shift), dtype=x.dtype)  # [nW, Ws, Ws]
        biases.append(xp.tile(mask, (B, 1, 1))[:, None])  # -> [B·nW, 1, Ws, Ws], batch outer
    out = attention(win, p[f"{prefix}.qkv.weight"], p.get(f"{prefix}.qkv.bias"),
                    p[f"{prefix}.proj.weight"], p[f"{prefix}.proj.bias"], heads, biases)
    out = window_reverse(out.reshape(-1, wh, ww, C), window, Hp, Wp)  # -> [B, Hp, Wp, C]
    out = out[:, :H, :W]                                 # -> [B, H, W, C]
    return xp.roll(out, shift, axis=(1, 2)) if any(shift) else out


def block(x, p, prefix, stage, shifted, mlp, eps):  # [B, H, W, C] -> [B, H, W, C]
    """timm SwinTransformerBlock.forward: x + attn(norm1(x)); x + mlp(norm2(x)) on [B, H·W, C]."""
    B, H, W, C = x.shape
    shift = stage.shift if shifted else (0, 0)
    h = layer_norm(x, p[f"{prefix}.norm1.weight"], p[f"{prefix}.norm1.bias"], eps)
    x = x + window_attention(h, p, f"{prefix}.attn", stage.heads, stage.window, shift)
    t = x.reshape(B, H * W, C)                           # -> [B, T, C], row-major tokens
    h = layer_norm(t, p[f"{prefix}.norm2.weight"], p[f"{prefix}.norm2.bias"], eps)
    return (t + mlp(h)).reshape(B, H, W, C)              # -> [B, H, W, C]


def patch_merging(x, p, prefix, eps):  # [B, H, W, C] -> [B, ⌈H/2⌉, ⌈W/2⌉, 2C]
    """timm PatchMerging: pad odd sizes; concat x[0::2,0::2], x[1::2,0::2], x[0::2,1::2],
    x[1::2,1::2] on channels; LayerNorm(4C); bias-free reduction to 2C."""
    xp = get_xp(x)
    x = pad_to_multiple(x, (2, 2))
    x = xp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                        x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)  # -> [B, H/2, W/2, 4C]
    x = layer_norm(x, p[f"{prefix}.norm.weight"], p[f"{prefix}.norm.bias"], eps)
    return linear(x, p[f"{prefix}.reduction.weight"])    # [.., 4C] -> [.., 2C], no bias


def features(cfg, p, mlps, x):  # [B, C_in, Hi, Wi] -> [B, Hs, Ws, C]
    """timm forward_features: patch embed + LN (NHWC), stages (merging first if s >= 1), norm."""
    eps = cfg.norm_eps
    t = patch_embed(x, p, "patch_embed.proj", cfg.patch_size)  # -> [B, gh, gw, C0]
    t = layer_norm(t, p["patch_embed.norm.weight"], p["patch_embed.norm.bias"], eps)
    i = 0
    for s, stage in enumerate(cfg.stages):
        if s > 0:
            t = patch_merging(t, p, f"layers.{s}.downsample", eps)  # -> [B, Hs, Ws, C]
        for j in range(cfg.depths[s]):
            t = block(t, p, f"layers.{s}.blocks.{j}", stage, j % 2 == 1, mlps[i], eps)
            i += 1
    return layer_norm(t, p["norm.weight"], p["norm.bias"], eps)


def head(t, p, cfg):  # [B, Hs, Ws, C] -> [B, K]
    """timm ClassifierHead(pool 'avg', NHWC): mean over positions, then head.fc."""
    pooled = t.mean(axis=(1, 2))                         # -> [B, C]
    return linear(pooled, p["head.fc.weight"], p["head.fc.bias"])


def forward(cfg, p, mlps, x):  # [B, C_in, Hi, Wi] -> [B, K]
    """Logits of a Swin; ``mlps[i]`` is global block i's MLP callable [..., C] -> [..., C]."""
    return head(features(cfg, p, mlps, x), p, cfg)
