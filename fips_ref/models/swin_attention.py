"""Swin window attention (timm ``WindowAttention`` inside ``SwinTransformerBlock._attn``): the
window geometry, relative position bias and shift mask, and the (out, cache) forward with its
backward. Derivations: docs/backward.md.

Letters: B batch, C channels, H heads, wh/ww window, Ws window area wh·ww, nW windows per
image, Hp/Wp the padded map.
"""
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ..backend import get_xp
from .ops import add_grad, attention_backward, attention_forward

MASK_VALUE = -100.0  # timm SwinTransformerBlock.get_attn_mask: masked_fill(!= 0, -100.0)


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


def relative_position_bias_backward(dbias, window, n_rows):  # [H, Ws, Ws] -> [rows, H]
    """Scatter-add of the bias gradient into the table rows: Σ over (i, j) with index[i, j] = r."""
    xp = get_xp(dbias)
    H = dbias.shape[0]
    index = xp.asarray(relative_position_index(*window)).reshape(-1)  # [Ws²]
    flat = (index[None, :] + n_rows * xp.arange(H)[:, None]).reshape(-1)  # [H·Ws²], head-major
    d = xp.bincount(flat, weights=dbias.reshape(-1), minlength=H * n_rows)  # [H·rows]
    return d.reshape(H, n_rows).T.astype(dbias.dtype)   # -> [rows, H]


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


def pad_to_multiple(x, multiple):  # [B, H, W, C] -> [B, Hp, Wp, C]
    """Zero-pad bottom/right so H, W divide by ``multiple`` (timm F.pad in _attn / PatchMerging)."""
    xp = get_xp(x)
    ph, pw = (-x.shape[1]) % multiple[0], (-x.shape[2]) % multiple[1]
    if not (ph or pw):
        return x
    return xp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))


class WindowCache(NamedTuple):
    attn: object     # ops.AttnCache over the windows
    size: tuple      # (H, W) before padding
    padded: tuple    # (Hp, Wp)


def window_attention_forward(x, p, prefix, heads, window, shift):  # [B, H, W, C] -> [B, H, W, C]
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
    out, cache = attention_forward(win, p[f"{prefix}.qkv.weight"], p.get(f"{prefix}.qkv.bias"),
                                   p[f"{prefix}.proj.weight"], p[f"{prefix}.proj.bias"], heads,
                                   biases)
    out = window_reverse(out.reshape(-1, wh, ww, C), window, Hp, Wp)  # -> [B, Hp, Wp, C]
    out = out[:, :H, :W]                                 # -> [B, H, W, C]
    out = xp.roll(out, shift, axis=(1, 2)) if any(shift) else out
    return out, WindowCache(cache, (H, W), (Hp, Wp))


def window_attention_backward(dy, c, p, prefix, window, shift, grads):  # [B, H, W, C] -> same
    """The permutations run backwards (roll −s, zero-pad, partition; reverse, crop, roll +s);
    the table gets the scatter-add of dlogits summed over windows (the mask is a constant)."""
    xp = get_xp(dy)
    (H, W), (Hp, Wp), C = c.size, c.padded, dy.shape[-1]
    wh, ww = window
    if any(shift):
        dy = xp.roll(dy, (-shift[0], -shift[1]), axis=(1, 2))
    dy = pad_to_multiple(dy, window)                     # crop's adjoint -> [B, Hp, Wp, C]
    dwin = window_partition(dy, window).reshape(-1, wh * ww, C)  # -> [B·nW, Ws, C]
    dx, attn_grads, dlogits = attention_backward(
        dwin, c.attn, p[f"{prefix}.qkv.weight"], p[f"{prefix}.proj.weight"],
        f"{prefix}.qkv.bias" in p)
    table = f"{prefix}.relative_position_bias_table"
    add_grad(grads, table, relative_position_bias_backward(
        dlogits.sum(axis=0), window, p[table].shape[0]))  # [B·nW, H, Ws, Ws] -> [rows, H]
    for name, g in zip(("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"), attn_grads):
        add_grad(grads, f"{prefix}.{name}", g)
    dx = window_reverse(dx.reshape(-1, wh, ww, C), window, Hp, Wp)[:, :H, :W]  # [B, H, W, C]
    return xp.roll(dx, shift, axis=(1, 2)) if any(shift) else dx
