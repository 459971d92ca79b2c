"""Tests of fips_ref.models: hand-computed pieces, timm conventions, invariants and errors.

No torch needed (the timm oracle is tests/test_models_timm.py). Convention numbers refer to
the list in docs/checkpoint-format.md; docs/models.md maps each to its function and test here.
"""
import math
import sys
import types

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from fips_ref.backend import BackendError, load_backend
from fips_ref.checkpoint import Checkpoint, InputError, json_entry, save_npz_atomic
from fips_ref.models import (dense_mlp_fn, factored_mlp_fn, forward, forward_model,
                             prepare_model, swin, vit)
from fips_ref.models.layers import attention, layer_norm, linear, math_layout, patchify
from model_fixtures import make_swin_checkpoint, make_vit_checkpoint, random_images

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)
settings.register_profile("models", deadline=None, max_examples=40, derandomize=True)


def _backends():
    names = ["numpy"]
    try:
        load_backend("cupy")
        names.append("cupy")
    except BackendError:
        pass
    return names


@pytest.fixture(params=_backends())
def xp(request):
    return load_backend(request.param)


def with_tensors(ckpt, **changes):
    """A copy of ckpt with tensors replaced (value) or removed (None)."""
    t = dict(ckpt.tensors)
    for k, v in changes.items():
        k = k.replace("__", ".")
        t.pop(k) if v is None else t.__setitem__(k, v)
    return Checkpoint(path=ckpt.path, config=dict(ckpt.config), tensors=t, extra=dict(ckpt.extra))


def with_config(ckpt, drop=(), **changes):
    """A copy of ckpt with config fields changed or dropped."""
    config = {k: v for k, v in ckpt.config.items() if k not in drop}
    config.update(changes)
    return Checkpoint(path=ckpt.path, config=config, tensors=dict(ckpt.tensors),
                      extra=dict(ckpt.extra))


# ----------------------------------------------------------------------------- attention
def test_attention_one_head_by_hand():
    """q = k = v = x (identity qkv), 1 head, 3 tokens: out_i = Σ_j softmax_j(x_i·x_j/√2) x_j."""
    x = np.array([[[1.0, 2.0], [0.5, -1.0], [0.0, 1.0]]])
    I2 = np.eye(2)
    out = attention(x, np.hstack([I2, I2, I2]), np.zeros(6), I2, np.zeros(2), num_heads=1)
    rows = x[0].tolist()
    for i, xi in enumerate(rows):
        s = [(xi[0] * xj[0] + xi[1] * xj[1]) / math.sqrt(2) for xj in rows]
        e = [math.exp(v) for v in s]
        w = [v / sum(e) for v in e]
        want = [sum(w[j] * rows[j][c] for j in range(3)) for c in range(2)]
        assert out[0, i].tolist() == pytest.approx(want, rel=1e-12)


def test_attention_heads_split_qkv_then_heads():
    """Convention 3/4: qkv columns are (3, heads, Dh) — q first; scale is Dh^-0.5, not D^-0.5."""
    rng = np.random.default_rng(0)
    B, N, D, H = 2, 3, 6, 3
    Dh = D // H
    x, Wp, bp = rng.standard_normal((B, N, D)), rng.standard_normal((D, D)), rng.standard_normal(D)
    Wqkv, bqkv = rng.standard_normal((D, 3 * D)), rng.standard_normal(3 * D)
    got = attention(x, Wqkv, bqkv, Wp, bp, num_heads=H)
    for b in range(B):
        qkv = x[b] @ Wqkv + bqkv
        heads = []
        for h in range(H):
            cols = slice(h * Dh, (h + 1) * Dh)
            q, k, v = qkv[:, :D][:, cols], qkv[:, D:2 * D][:, cols], qkv[:, 2 * D:][:, cols]
            s = np.array([[q[i] @ k[j] / math.sqrt(Dh) for j in range(N)] for i in range(N)])
            p = np.exp(s) / np.exp(s).sum(1, keepdims=True)
            heads.append(p @ v)
        want = np.concatenate(heads, axis=1) @ Wp + bp  # heads merge as (heads, Dh)
        np.testing.assert_allclose(got[b], want, **F64)


def test_layer_norm_biased_variance_eps_inside_sqrt():
    """Convention 1: (x − mean)/√(biased var + eps)·w + b."""
    x = np.array([[1.0, 2.0, 4.0]])
    w, b, eps = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, -1.0]), 0.5
    mean = 7 / 3
    var = sum((v - mean) ** 2 for v in x[0]) / 3
    want = [(v - mean) / math.sqrt(var + eps) * w[i] + b[i] for i, v in enumerate(x[0])]
    assert layer_norm(x, w, b, eps)[0].tolist() == pytest.approx(want, rel=1e-12)


def test_dense_mlp_uses_exact_gelu():
    """Convention 2: GELU(z) = z·Φ(z) with erf, not the tanh approximation."""
    f = dense_mlp_fn(np.eye(1), np.zeros(1), np.eye(1), np.zeros(1))
    y = f(np.array([[1.0]]))[0, 0]
    assert y == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), rel=1e-14)
    assert abs(y - 0.8411919906082768) > 1e-4  # the tanh approximation's value


# ----------------------------------------------------------------------------- patch embedding
def test_patch_embed_is_the_conv_with_row_major_tokens():
    """Convention 5: conv k = s = patch == patchify @ W.reshape(D, C·ph·pw).T; tokens h-outer."""
    rng = np.random.default_rng(1)
    B, C, Hi, Wi, (ph, pw), D = 2, 3, 4, 9, (2, 3), 5
    x, bias = rng.standard_normal((B, C, Hi, Wi)), rng.standard_normal(D)
    w = rng.standard_normal((D, C, ph, pw))
    p = math_layout({"k.weight": w, "k.bias": bias}, ["k.weight", "k.bias"], xp=np,
                    dtype=np.float64)
    got = linear(patchify(x, (ph, pw)), p["k.weight"], p["k.bias"])
    for b in range(B):
        for i in range(Hi // ph):
            for j in range(Wi // pw):
                patch = x[b, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                want = np.array([(patch * w[d]).sum() for d in range(D)]) + bias
                np.testing.assert_allclose(got[b, i, j], want, **F64)
    tokens = got.reshape(B, -1, D)
    np.testing.assert_allclose(tokens[:, 1 * (Wi // pw) + 2], got[:, 1, 2], **F64)


def test_vit_concat_prefix_then_add_pos_embed():
    """Convention 6: tokens = [cls, dist, patches] + pos_embed (rows for the prefix first)."""
    ckpt = make_vit_checkpoint(distilled=True, img_size=(8, 12), patch_size=4)
    m = prepare_model(ckpt, dtype=np.float64)
    x = random_images(ckpt, 2).astype(np.float64)
    t = vit.embed(x, m.params, m.cfg)
    pos, T = m.params["pos_embed"][0], ckpt.tensors
    assert t.shape == (2, 2 + 2 * 3, 16)
    for b in range(2):
        np.testing.assert_allclose(t[b, 0], T["cls_token"][0, 0] + pos[0], rtol=1e-6)
        np.testing.assert_allclose(t[b, 1], T["dist_token"][0, 0] + pos[1], rtol=1e-6)
    patches = vit.patch_embed(x, m.params, "patch_embed.proj", (4, 4)).reshape(2, 6, 16)
    np.testing.assert_allclose(t[:, 2:], patches + pos[2:], **F64)


# ----------------------------------------------------------------------------- Swin geometry
@settings(settings.get_profile("models"))
@given(b=st.integers(1, 3), nh=st.integers(1, 3), nw=st.integers(1, 3), wh=st.integers(1, 4),
       ww=st.integers(1, 4), c=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_window_partition_reverse_round_trip(b, nh, nw, wh, ww, c, seed):
    """window_reverse(window_partition(x)) == x, and windows are batch-outer, row-major."""
    x = np.random.default_rng(seed).standard_normal((b, nh * wh, nw * ww, c))
    win = swin.window_partition(x, (wh, ww))
    assert win.shape == (b * nh * nw, wh, ww, c)
    assert np.array_equal(swin.window_reverse(win, (wh, ww), nh * wh, nw * ww), x)
    k = (b - 1) * nh * nw + (nh - 1) * nw + (nw - 1)  # last window of the last image
    assert np.array_equal(win[k], x[b - 1, (nh - 1) * wh:, (nw - 1) * ww:])


def _region(i, n, w, s):
    """Which of the three shifted-window bands pixel i falls in (one band when s = 0)."""
    if s == 0:
        return 0
    return 0 if i < n - w else (1 if i < n - s else 2)


@settings(settings.get_profile("models"))
@given(nh=st.integers(1, 3), nw=st.integers(1, 3), wh=st.integers(1, 4), ww=st.integers(1, 4),
       data=st.data())
def test_shift_mask_matches_per_pixel_construction(nh, nw, wh, ww, data):
    """Convention 10: 9 region labels per pixel; −100.0 exactly between different labels."""
    sh = data.draw(st.integers(0, wh - 1))
    sw = data.draw(st.integers(0, ww - 1))
    assume(sh or sw)
    H, W = nh * wh, nw * ww
    mask = swin.shift_mask(H, W, (wh, ww), (sh, sw))
    assert mask.shape == (nh * nw, wh * ww, wh * ww)
    label = [[3 * _region(i, H, wh, sh) + _region(j, W, ww, sw) for j in range(W)]
             for i in range(H)]
    for r in range(nh):
        for c in range(nw):
            toks = [label[r * wh + a][c * ww + e] for a in range(wh) for e in range(ww)]
            want = [[0.0 if p == q else -100.0 for q in toks] for p in toks]
            assert mask[r * nw + c].tolist() == want


def test_relative_position_index_formula_non_square():
    """Convention 11: index = (Δh + wh − 1)(2ww − 1) + (Δw + ww − 1), Δ = query − key."""
    wh, ww = 3, 2
    idx = swin.relative_position_index(wh, ww)
    toks = [(h, w) for h in range(wh) for w in range(ww)]
    for a, (ha, wa) in enumerate(toks):
        for b, (hb, wb) in enumerate(toks):
            assert idx[a, b] == (ha - hb + wh - 1) * (2 * ww - 1) + (wa - wb + ww - 1)
    table = np.arange((2 * wh - 1) * (2 * ww - 1) * 2, dtype=float).reshape(-1, 2)
    bias = swin.relative_position_bias(table, (wh, ww))
    assert bias.shape == (2, 6, 6) and bias[1, 4, 1] == table[idx[4, 1], 1]


def test_stage_geometry_clamps_and_stops_shifting():
    """Convention 9: window = min(res, window); no shift once res <= window; ceil-halved res."""
    st_ = swin.stage_geometry((8, 8), 4, (1, 2, 4), (4, 4))
    assert [(g.resolution, g.window, g.shift, g.dim) for g in st_] == [
        ((8, 8), (4, 4), (2, 2), 4), ((4, 4), (4, 4), (0, 0), 8), ((2, 2), (2, 2), (0, 0), 16)]
    assert [g.resolution for g in swin.stage_geometry((10, 7), 4, (1, 1, 1), (4, 4))] == [
        (10, 7), (5, 4), (3, 2)]
    rect = swin.stage_geometry((4, 12), 4, (1,), (4, 4))[0]
    assert rect.window == (4, 4) and rect.shift == (0, 2)  # only the width shifts


def _block_pair(ckpt, stage, block):
    m = prepare_model(ckpt, dtype=np.float64)
    g = m.cfg.stages[stage]
    x = np.random.default_rng(3).standard_normal((2, *g.resolution, g.dim))
    prefix = f"layers.{stage}.blocks.{block}"
    i = sum(m.cfg.depths[:stage]) + block
    run = [swin.block(x, m.params, prefix, g, s, m.mlps[i], m.cfg.norm_eps) for s in (False, True)]
    return run, x, m, g, prefix


def test_stage_at_window_resolution_never_shifts():
    """Stage 1 is 4x4 with window 4: its odd block is unshifted; stage 0 (8x8) does shift."""
    ckpt = make_swin_checkpoint(img_size=16, patch_size=2, window_size=4)  # stages 8x8, 4x4
    (plain, shifted), *_ = _block_pair(ckpt, 1, 1)
    assert np.array_equal(plain, shifted)
    (plain, shifted), *_ = _block_pair(ckpt, 0, 1)
    assert np.abs(plain - shifted).max() > 1e-3


def test_clamped_window_is_global_attention_with_clamped_table():
    """Window 8 on a 4x4 stage clamps to 4: one window = full attention + (2·4−1)² bias table."""
    ckpt = make_swin_checkpoint(img_size=16, patch_size=2, window_size=8)  # stages 8x8, 4x4
    table = "layers.1.blocks.1.attn.relative_position_bias_table"
    assert ckpt.tensors[table].shape == (49, 2)
    m = prepare_model(ckpt, dtype=np.float64)
    g = m.cfg.stages[1]
    assert g.window == (4, 4) and g.shift == (0, 0)
    x = np.random.default_rng(4).standard_normal((2, 4, 4, g.dim))
    p, pre = m.params, "layers.1.blocks.1.attn"
    got = swin.window_attention(x, p, pre, g.heads, g.window, (0, 0))
    bias = swin.relative_position_bias(p[f"{pre}.relative_position_bias_table"], (4, 4))
    want = attention(x.reshape(2, 16, g.dim), p[f"{pre}.qkv.weight"], p[f"{pre}.qkv.bias"],
                     p[f"{pre}.proj.weight"], p[f"{pre}.proj.bias"], g.heads, [bias])
    np.testing.assert_allclose(got, want.reshape(2, 4, 4, g.dim), **F64)
    unclamped = with_tensors(ckpt, **{table.replace(".", "__"): np.zeros((225, 2), np.float32)})
    with pytest.raises(InputError, match=r"relative_position_bias_table.*\(225, 2\).*\(49, 2\)"):
        prepare_model(unclamped)


def _brute_window_attention(x, p, pre, heads, window, shift):  # [B, H, W, C] -> [B, H, W, C]
    """Per pixel: pixel (i, j) sits at rolled position ((i − sh) % H, (j − sw) % W) of a map
    zero-padded to a multiple of the window, and attends to its window there, with the
    relative position bias and −100 between different shift regions."""
    B, H, W, C = x.shape
    (wh, ww), (sh, sw), Dh = window, shift, C // heads
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    y = np.zeros((B, Hp, Wp, C))
    for a in range(H):
        for b in range(W):
            y[:, a, b] = x[:, (a + sh) % H, (b + sw) % W]
    qkv = y @ p[f"{pre}.qkv.weight"] + p[f"{pre}.qkv.bias"]
    table = p[f"{pre}.relative_position_bias_table"]
    label = lambda a, b: 3 * _region(a, Hp, wh, sh) + _region(b, Wp, ww, sw)  # noqa: E731
    out = np.zeros((B, H, W, C))
    for i in range(H):
        for j in range(W):
            a, b = (i - sh) % H, (j - sw) % W
            keys = [(a // wh * wh + u, b // ww * ww + v) for u in range(wh) for v in range(ww)]
            for h in range(heads):
                hs = slice(h * Dh, (h + 1) * Dh)
                q = qkv[:, a, b, :C][:, hs]
                s = np.stack([(q * qkv[:, k0, k1, C:2 * C][:, hs]).sum(-1) / math.sqrt(Dh)
                              + table[(a - k0 + wh - 1) * (2 * ww - 1) + (b - k1 + ww - 1), h]
                              + (0.0 if label(a, b) == label(k0, k1) else -100.0)
                              for k0, k1 in keys], axis=1)
                w = np.exp(s - s.max(1, keepdims=True))
                w /= w.sum(1, keepdims=True)
                vals = np.stack([qkv[:, k0, k1, 2 * C:][:, hs] for k0, k1 in keys], axis=1)
                out[:, i, j, hs] = (w[:, :, None] * vals).sum(1)
    return out @ p[f"{pre}.proj.weight"] + p[f"{pre}.proj.bias"]


@pytest.mark.parametrize("hw,window,shift", [((8, 8), (4, 4), (2, 2)), ((6, 6), (4, 4), (2, 2)),
                                             ((6, 5), (4, 2), (2, 1)), ((4, 6), (4, 4), (0, 2)),
                                             ((6, 7), (4, 4), (0, 0))])
def test_window_attention_matches_per_pixel_reference(hw, window, shift):
    """Conventions 10/11: roll −shift, pad, window, bias + mask, reverse, crop, roll +shift."""
    rng = np.random.default_rng(9)
    C, heads, pre = 4, 2, "a"
    n_table = (2 * window[0] - 1) * (2 * window[1] - 1)
    shapes = {"qkv.weight": (C, 3 * C), "qkv.bias": (3 * C,), "proj.weight": (C, C),
              "proj.bias": (C,), "relative_position_bias_table": (n_table, heads)}
    p = {f"{pre}.{k}": rng.standard_normal(s) for k, s in shapes.items()}
    x = rng.standard_normal((2, *hw, C))
    got = swin.window_attention(x, p, pre, heads, window, shift)
    np.testing.assert_allclose(got, _brute_window_attention(x, p, pre, heads, window, shift), **F64)


def test_shifted_attention_is_batch_independent():
    """Convention 10: the mask tiles over the batch (windows batch outer)."""
    ckpt = make_swin_checkpoint()
    m = prepare_model(ckpt, dtype=np.float64)
    g = m.cfg.stages[0]
    x = np.random.default_rng(5).standard_normal((3, 8, 8, g.dim))
    args = (m.params, "layers.0.blocks.1.attn", g.heads, g.window, g.shift)
    whole = swin.window_attention(x, *args)
    for b in range(3):
        np.testing.assert_allclose(whole[b:b + 1], swin.window_attention(x[b:b + 1], *args), **F64)


def test_patch_merging_concat_order_and_odd_padding():
    """Convention 8: concat x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]; pad odd."""
    rng = np.random.default_rng(6)
    B, H, W, C = 2, 5, 4, 3
    x = rng.standard_normal((B, H, W, C))
    p = {"d.norm.weight": rng.standard_normal(4 * C), "d.norm.bias": rng.standard_normal(4 * C),
         "d.reduction.weight": rng.standard_normal((4 * C, 2 * C))}
    got = swin.patch_merging(x, p, "d", 1e-5)
    assert got.shape == (B, 3, 2, 2 * C)
    xp_ = np.zeros((B, 6, 4, C))
    xp_[:, :5] = x
    for i in range(3):
        for j in range(2):
            cat = np.concatenate([xp_[:, 2 * i, 2 * j], xp_[:, 2 * i + 1, 2 * j],
                                  xp_[:, 2 * i, 2 * j + 1], xp_[:, 2 * i + 1, 2 * j + 1]], -1)
            normed = layer_norm(cat, p["d.norm.weight"], p["d.norm.bias"], 1e-5)
            np.testing.assert_allclose(got[:, i, j], normed @ p["d.reduction.weight"], **F64)


def test_swin_head_is_mean_of_normed_tokens():
    """Conventions 7/12: NHWC features, final norm per token, mean over positions, head.fc."""
    ckpt = make_swin_checkpoint()
    m = prepare_model(ckpt, dtype=np.float64)
    x = random_images(ckpt, 2).astype(np.float64)
    t = swin.features(m.cfg, m.params, m.mlps, x)
    assert t.shape == (2, 4, 4, 16)
    T = ckpt.tensors
    want = t.reshape(2, 16, 16).mean(1) @ T["head.fc.weight"].T + T["head.fc.bias"]
    np.testing.assert_allclose(forward_model(m, x), want, rtol=1e-6)


def test_stale_buffers_are_ignored():
    """relative_position_index / attn_mask in a checkpoint are derived from the config, not read."""
    clean = forward(make_swin_checkpoint(), random_images(make_swin_checkpoint(), 2))
    stale_ckpt = make_swin_checkpoint(stale_buffers=True)
    assert any(k.endswith("relative_position_index") for k in stale_ckpt.tensors)
    assert np.array_equal(forward(stale_ckpt, random_images(stale_ckpt, 2)), clean)


# ----------------------------------------------------------------------------- ViT head, LayerScale
def test_distilled_deit_averages_the_two_heads():
    """Convention 6: eval logits = (head(t0) + head_dist(t1)) / 2 on the final-normed tokens."""
    ckpt = make_vit_checkpoint(distilled=True)
    m = prepare_model(ckpt, dtype=np.float64)
    x = random_images(ckpt, 3).astype(np.float64)
    t = vit.features(m.cfg, m.params, m.mlps, x)
    T = ckpt.tensors
    cls = t[:, 0] @ T["head.weight"].T + T["head.bias"]
    dist = t[:, 1] @ T["head_dist.weight"].T + T["head_dist.bias"]
    got = forward_model(m, x)
    np.testing.assert_allclose(got, (cls + dist) / 2, rtol=1e-6)
    assert np.abs(got - cls).max() > 1e-3


def _gammas(ckpt, value):
    return {k.replace(".", "__"): np.full_like(v, value) for k, v in ckpt.tensors.items()
            if k.endswith("gamma")}


def test_layerscale_gamma_one_equals_no_layerscale():
    ckpt = make_vit_checkpoint(layerscale=True)
    x = random_images(ckpt, 2)
    ones = forward(with_tensors(ckpt, **_gammas(ckpt, 1.0)), x, dtype=np.float64)
    no_ls = with_tensors(ckpt, **{k: None for k in _gammas(ckpt, 1.0)})
    absent = forward(no_ls, x, dtype=np.float64)
    assert np.array_equal(ones, absent)
    assert np.abs(forward(ckpt, x, dtype=np.float64) - absent).max() > 1e-3


def test_layerscale_zero_skips_every_block():
    """gamma = 0 makes each residual branch vanish: logits = head(norm(embed(x)))."""
    ls = make_vit_checkpoint(layerscale=True)
    m = prepare_model(with_tensors(ls, **_gammas(ls, 0.0)), dtype=np.float64)
    p, x = m.params, random_images(ls, 2).astype(np.float64)
    t = layer_norm(vit.embed(x, p, m.cfg), p["norm.weight"], p["norm.bias"], 1e-6)
    np.testing.assert_allclose(forward_model(m, x), vit.head(t, p, m.cfg), **F64)


def test_layerscale_scales_its_branch_linearly():
    """With ls2 = 0, block(x) − x = ls1 ⊙ attn-branch: doubling ls1 doubles the update."""
    m = prepare_model(make_vit_checkpoint(layerscale=True), dtype=np.float64)
    x = np.random.default_rng(7).standard_normal((2, 5, 16))
    p = dict(m.params)
    p["blocks.0.ls2.gamma"] = np.zeros(16)
    g = p["blocks.0.ls1.gamma"]
    one = vit.block(x, p, "blocks.0", m.cfg, m.mlps[0]) - x
    p["blocks.0.ls1.gamma"] = 2 * g
    two = vit.block(x, p, "blocks.0", m.cfg, m.mlps[0]) - x
    np.testing.assert_allclose(two, 2 * one, **F64)


# ----------------------------------------------------------------------------- numerics, batching
@pytest.mark.parametrize("make", [make_vit_checkpoint, make_swin_checkpoint])
def test_float32_agrees_with_float64(make):
    ckpt = make()
    x = random_images(ckpt, 3)
    l32, l64 = forward(ckpt, x), forward(ckpt, x, dtype=np.float64)
    assert l32.dtype == np.float32 and l64.dtype == np.float64
    np.testing.assert_allclose(l32, l64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [make_vit_checkpoint, make_swin_checkpoint])
def test_batch_size_does_not_change_logits(make):
    ckpt = make()
    x = random_images(ckpt, 5)
    m = prepare_model(ckpt, dtype=np.float64)
    ref = forward_model(m, x, batch_size=5)
    for bs in (1, 2, 3, 64):
        np.testing.assert_allclose(forward_model(m, x, batch_size=bs), ref, **F64)


def test_backend_matches_numpy(xp):
    """The same array code on each available backend (CuPy where installed and usable)."""
    for ckpt in (make_vit_checkpoint(distilled=True), make_swin_checkpoint()):
        x = random_images(ckpt, 2)
        got = forward(ckpt, x, xp=xp, dtype=np.float64)
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, forward(ckpt, x, dtype=np.float64), rtol=1e-9, atol=1e-11)


def test_memmap_images(tmp_path):
    ckpt = make_vit_checkpoint()
    x = random_images(ckpt, 3)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert np.array_equal(forward(ckpt, mm, batch_size=2), forward(ckpt, x, batch_size=2))


# ----------------------------------------------------------------------------- recorded MLP inputs
def test_recorded_vit_mlp_inputs_reproduce_the_blocks():
    """acts[i] = norm2(x + ls1·attn(norm1(x))); fed to the MLP, it rebuilds the residual stream."""
    ckpt = make_vit_checkpoint(layerscale=True, depth=3)
    x = random_images(ckpt, 5).astype(np.float64)
    streamed = []
    logits, acts = forward(ckpt, x, batch_size=2, record_mlp_inputs=True, dtype=np.float64,
                           on_mlp_input=lambda i, s, h: streamed.append((i, s, h.copy())))
    m = prepare_model(ckpt, dtype=np.float64)
    p, eps = m.params, m.cfg.norm_eps
    t = vit.embed(x, p, m.cfg)
    assert sorted(acts) == [0, 1, 2]
    for i in range(3):
        b = f"blocks.{i}"
        a = attention(layer_norm(t, p[f"{b}.norm1.weight"], p[f"{b}.norm1.bias"], eps),
                      p[f"{b}.attn.qkv.weight"], p[f"{b}.attn.qkv.bias"],
                      p[f"{b}.attn.proj.weight"], p[f"{b}.attn.proj.bias"], 2)
        t = t + a * p[f"{b}.ls1.gamma"]
        h = layer_norm(t, p[f"{b}.norm2.weight"], p[f"{b}.norm2.bias"], eps)
        assert acts[i].shape == (5, 5, 16)
        np.testing.assert_allclose(acts[i], h, **F64)
        t = t + m.mlps[i](acts[i]) * p[f"{b}.ls2.gamma"]
    t = layer_norm(t, p["norm.weight"], p["norm.bias"], eps)
    np.testing.assert_allclose(logits, vit.head(t, p, m.cfg), **F64)
    assert [(i, s, h.shape[0]) for i, s, h in streamed] == [
        (i, s, n) for s, n in ((0, 2), (2, 2), (4, 1)) for i in range(3)]
    for i, s, h in streamed:
        assert np.array_equal(h, acts[i][s:s + h.shape[0]])


def test_recorded_swin_mlp_inputs_reproduce_the_blocks():
    """Swin: acts in forward order (stages then blocks), T = Hs·Ws row-major, = norm2 outputs."""
    ckpt = make_swin_checkpoint(img_size=12, depths=(2, 1, 2), num_heads=(1, 2, 2))  # 6x6, 3x3, 2x2
    x = random_images(ckpt, 3).astype(np.float64)
    logits, acts = forward(ckpt, x, batch_size=2, record_mlp_inputs=True, dtype=np.float64)
    shapes = [acts[i].shape for i in sorted(acts)]
    assert shapes == [(3, 36, 8)] * 2 + [(3, 9, 16)] + [(3, 4, 32)] * 2
    m = prepare_model(ckpt, dtype=np.float64)
    p, eps, i = m.params, m.cfg.norm_eps, 0
    t = layer_norm(swin.patch_embed(x, p, "patch_embed.proj", (2, 2)), p["patch_embed.norm.weight"],
                   p["patch_embed.norm.bias"], eps)
    for s, g in enumerate(m.cfg.stages):
        t = swin.patch_merging(t, p, f"layers.{s}.downsample", eps) if s else t
        for j in range(m.cfg.depths[s]):
            b = f"layers.{s}.blocks.{j}"
            h = layer_norm(t, p[f"{b}.norm1.weight"], p[f"{b}.norm1.bias"], eps)
            shift = g.shift if j % 2 else (0, 0)
            t = t + swin.window_attention(h, p, f"{b}.attn", g.heads, g.window, shift)
            h = layer_norm(t, p[f"{b}.norm2.weight"], p[f"{b}.norm2.bias"], eps)
            np.testing.assert_allclose(acts[i], h.reshape(3, -1, g.dim), **F64)
            t = t + m.mlps[i](acts[i]).reshape(t.shape)
            i += 1
    pooled = layer_norm(t, p["norm.weight"], p["norm.bias"], eps).mean((1, 2))
    np.testing.assert_allclose(logits, pooled @ p["head.fc.weight"] + p["head.fc.bias"], **F64)


def test_callback_without_recording_returns_logits_only():
    ckpt = make_swin_checkpoint()
    seen = []
    out = forward(ckpt, random_images(ckpt, 3), batch_size=2,
                  on_mlp_input=lambda i, s, h: seen.append((i, s, h.shape)))
    assert isinstance(out, np.ndarray) and out.shape == (3, 5)
    assert seen[:4] == [(0, 0, (2, 64, 8)), (1, 0, (2, 64, 8)),
                        (2, 0, (2, 16, 16)), (3, 0, (2, 16, 16))]
    assert len(seen) == 8 and seen[-1] == (3, 2, (1, 16, 16))


# ----------------------------------------------------------------------------- compressed MLPs
def _identity_split(m, prefix):
    """fc = (W, I, b): a factored MLP exactly equal to the dense one."""
    W1, b1 = m.params[f"{prefix}.mlp.fc1.weight"], m.params[f"{prefix}.mlp.fc1.bias"]
    W2, b2 = m.params[f"{prefix}.mlp.fc2.weight"], m.params[f"{prefix}.mlp.fc2.bias"]
    eye = lambda n: np.eye(n, dtype=W1.dtype)  # noqa: E731
    return (W1, eye(W1.shape[1]), b1), (W2, eye(W2.shape[1]), b2)


@pytest.mark.parametrize("make", [make_vit_checkpoint, make_swin_checkpoint])
def test_factored_identity_split_gives_identical_logits(make):
    ckpt = make()
    m = prepare_model(ckpt)
    arch = vit if m.arch == "vit" else swin
    fact = {i: factored_mlp_fn(*_identity_split(m, pre))
            for i, (pre, _) in enumerate(arch.blocks(m.cfg))}
    x = random_images(ckpt, 3)
    # not bit-equal: W @ I is exact, but BLAS may sum x @ W in another order for another layout
    np.testing.assert_allclose(forward_model(m._replace(mlps=fact), x), forward_model(m, x),
                               **F32)


def test_factored_random_low_rank_split_matches_dense():
    """fc1 = A @ B of rank R (A [D, R], B [R, F]): factored and dense paths agree."""
    rng = np.random.default_rng(8)
    base = make_vit_checkpoint()
    splits, changes = {}, {}
    for i in range(2):
        A, B = rng.standard_normal((16, 3)) / 4, rng.standard_normal((3, 32)) / 2
        A2, B2 = rng.standard_normal((32, 5)) / 6, rng.standard_normal((5, 16)) / 2
        changes[f"blocks__{i}__mlp__fc1__weight"] = (A @ B).T
        changes[f"blocks__{i}__mlp__fc2__weight"] = (A2 @ B2).T
        splits[i] = ((A, B), (A2, B2))
    m = prepare_model(with_tensors(base, **changes), dtype=np.float64)
    p = m.params
    fact = {i: factored_mlp_fn((A, B, p[f"blocks.{i}.mlp.fc1.bias"]),
                               (A2, B2, p[f"blocks.{i}.mlp.fc2.bias"]))
            for i, ((A, B), (A2, B2)) in splits.items()}
    x = random_images(base, 3).astype(np.float64)
    np.testing.assert_allclose(forward_model(m._replace(mlps=fact), x), forward_model(m, x),
                               rtol=1e-9, atol=1e-11)


def _fake_codec(monkeypatch, splits, calls):
    mod = types.ModuleType("fips_ref.codec")

    def factored_mlps(ckpt, xp, dtype):
        calls.append((ckpt.path, xp, dtype))
        return splits
    mod.factored_mlps = factored_mlps
    monkeypatch.setitem(sys.modules, "fips_ref.codec", mod)


def test_compressed_checkpoint_uses_codec_factors(monkeypatch):
    """'fips' in ckpt.extra: MLPs come from codec.factored_mlps; fc weights may be absent."""
    ckpt = make_swin_checkpoint()
    dense = prepare_model(ckpt)
    splits = {i: _identity_split(dense, pre) for i, (pre, _) in enumerate(swin.blocks(dense.cfg))}
    calls = []
    _fake_codec(monkeypatch, splits, calls)
    gone = {f"{pre}.mlp.{k}".replace(".", "__"): None for pre, _ in swin.blocks(dense.cfg)
            for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    comp = with_tensors(ckpt, **gone)
    comp.extra["fips"] = json_entry({"format": "test"})
    x = random_images(ckpt, 2)
    np.testing.assert_allclose(forward(comp, x), forward_model(dense, x), **F32)
    assert calls == [(ckpt.path, np, np.float32)]
    _fake_codec(monkeypatch, {0: splits[0]}, calls)  # block 1 neither factored nor dense
    with pytest.raises(InputError, match=r"layers\.0\.blocks\.1\.mlp\.fc1\.weight"):
        forward(comp, x)


# ----------------------------------------------------------------------------- config and errors
VIT_FIELDS = ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes"]
SWIN_FIELDS = ["img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size",
               "num_classes"]


@pytest.mark.parametrize("make,field", [(make_vit_checkpoint, f) for f in VIT_FIELDS]
                         + [(make_swin_checkpoint, f) for f in SWIN_FIELDS])
def test_missing_config_field_names_file_and_field(make, field):
    ckpt = with_config(make(), drop=(field,))
    with pytest.raises(InputError) as e:
        forward(ckpt, random_images(make(), 1))
    msg = str(e.value)
    assert f"'{field}'" in msg and ckpt.path in msg and "\n" not in msg


def test_missing_field_in_a_file(tmp_path):
    ckpt = make_vit_checkpoint()
    config = {k: v for k, v in ckpt.config.items() if k != "num_heads"}
    path = tmp_path / "no_heads.npz"
    save_npz_atomic(path, {**ckpt.tensors, "config": json_entry(config)})
    with pytest.raises(InputError, match=r"no_heads\.npz: config field 'num_heads' is missing"):
        forward(path, random_images(ckpt, 1))


@pytest.mark.parametrize("make", [make_vit_checkpoint, make_swin_checkpoint])
def test_ill_typed_config_fields(make):
    for change in ({"img_size": "224"}, {"embed_dim": 16.0}, {"qkv_bias": 1},
                   {"patch_size": [4, 4, 4]}, {"norm_eps": "1e-6"}):
        with pytest.raises(InputError, match=f"'{next(iter(change))}'"):
            prepare_model(with_config(make(), **change))


@pytest.mark.parametrize("make,size,patch", [(make_vit_checkpoint, 10, 4),
                                             (make_swin_checkpoint, 11, 2)])
def test_indivisible_image_size_names_size_and_patch(make, size, patch):
    pattern = rf"image size \[{size}, {size}\].*patch_size \[{patch}, {patch}\]"
    with pytest.raises(InputError, match=pattern):
        prepare_model(with_config(make(), img_size=size))


def test_image_shape_mismatch():
    ckpt = make_vit_checkpoint()
    for shape in ((1, 3, 8, 12), (1, 1, 8, 8), (3, 8, 8)):
        with pytest.raises(InputError, match="images"):
            forward(ckpt, np.zeros(shape, np.float32))


def test_missing_or_misshapen_tensor_is_named():
    ckpt = make_vit_checkpoint()
    with pytest.raises(InputError, match=r"missing key 'blocks\.1\.attn\.proj\.weight'"):
        prepare_model(with_tensors(ckpt, blocks__1__attn__proj__weight=None))
    with pytest.raises(InputError, match=r"'pos_embed' has shape \(1, 3, 16\), expected \(1, 5, "):
        prepare_model(with_tensors(ckpt, pos_embed=np.zeros((1, 3, 16), np.float32)))
    with pytest.raises(InputError, match=r"'blocks\.0\.mlp\.fc2\.weight'"):
        prepare_model(with_tensors(ckpt, blocks__0__mlp__fc2__weight=np.zeros((16, 7), np.float32)))


def test_unsupported_layouts_are_refused():
    old = with_tensors(make_swin_checkpoint(),
                       layers__0__downsample__reduction__weight=np.zeros((16, 32), np.float32))
    with pytest.raises(InputError, match="timm < 0.9 layout"):
        prepare_model(old)
    with pytest.raises(InputError, match="register tokens"):
        prepare_model(with_tensors(make_vit_checkpoint(),
                                   reg_token=np.zeros((1, 4, 16), np.float32)))
    with pytest.raises(InputError, match="class_token"):
        prepare_model(with_config(make_vit_checkpoint(), class_token=False))
    with pytest.raises(InputError, match="'arch'"):
        prepare_model(with_config(make_vit_checkpoint(), arch="resnet"))
    with pytest.raises(InputError, match="dtype"):
        prepare_model(make_vit_checkpoint(), dtype=np.float16)
    with pytest.raises(InputError, match="batch_size"):
        forward(make_vit_checkpoint(), random_images(make_vit_checkpoint(), 1), batch_size=0)


def test_norm_eps_defaults_and_is_read():
    """Convention 1: default eps 1e-6 (ViT/DeiT) and 1e-5 (Swin); a config value is used."""
    v, s = make_vit_checkpoint(), make_swin_checkpoint()
    assert prepare_model(with_config(v, drop=("norm_eps",))).cfg.norm_eps == 1e-6
    assert prepare_model(with_config(s, drop=("norm_eps",))).cfg.norm_eps == 1e-5
    x = random_images(v, 2)
    assert np.abs(forward(with_config(v, norm_eps=0.5), x) - forward(v, x)).max() > 1e-3


def test_unknown_config_fields_are_ignored_and_file_path_works(tmp_path):
    ckpt = make_vit_checkpoint(tmp_path, distilled=True)
    assert ckpt.path.endswith("vit.npz")
    x = random_images(ckpt, 2)
    extra = with_config(ckpt, timm_name="deit_tiny_distilled_patch16_224", some_tool={"a": 1})
    assert np.array_equal(forward(extra, x), forward(ckpt.path, x))


def test_empty_batch():
    ckpt = make_swin_checkpoint()
    logits, acts = forward(ckpt, np.zeros((0, 3, 16, 16), np.float32), record_mlp_inputs=True)
    assert logits.shape == (0, 5) and acts[3].shape == (0, 16, 16)


def test_no_embed_class_layout_is_refused_by_name():
    """DeiT-III's pos_embed has rows for the patches only (timm no_embed_class): a named refusal."""
    ckpt = make_vit_checkpoint()
    with pytest.raises(InputError, match="no_embed_class"):
        prepare_model(with_tensors(ckpt, pos_embed=np.zeros((1, 4, 16), np.float32)))


@pytest.mark.parametrize("make, field, value", [(make_vit_checkpoint, "depth", 1),
                                                (make_swin_checkpoint, "depths", [2, 1]),
                                                (make_swin_checkpoint, "depths", [2])])
def test_tensors_of_blocks_the_config_lacks_are_refused(make, field, value):
    """A config declaring fewer blocks or stages than the tensors hold would silently drop them."""
    kw = {field: value}
    if field == "depths" and len(value) == 1:
        kw["num_heads"] = [1]
    with pytest.raises(InputError, match="belongs to no block"):
        prepare_model(with_config(make(), **kw))


def test_bundled_demo_forward_matches_torch():
    """weights/digits_test.npz holds torch's eval logits of the demo ViT: same logits, same top-1."""
    from fips_ref.checkpoint import load_npz
    from fips_ref.compress import DEMO_CKPT, DEMO_TEST
    test = load_npz(DEMO_TEST)
    logits = forward(str(DEMO_CKPT), test["images"])
    np.testing.assert_allclose(logits, test["torch_logits"], rtol=0, atol=5e-5)
    assert np.array_equal(logits.argmax(1), test["torch_logits"].argmax(1))
