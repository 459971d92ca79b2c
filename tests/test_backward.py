"""Random-direction VJP checks (float64) of every layer backward in fips_ref.models and of the
whole model (models.vjp) for ViT, distilled DeiT and Swin, plus the vjp entry point's contract.

For f with backward b: ⟨v, (f(x + εu) − f(x − εu)) / 2ε⟩ ≈ Σ_i ⟨b(v)_i, u_i⟩ for random u, v,
with directions drawn jointly over all inputs and per input (so a wrong gradient of one input
cannot hide behind another's). Compressed checkpoints are checked against the chain rule
through a dense float64 copy of the same weights, whose own gradients are FD-checked here.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from fips_ref.backend import get_xp, to_numpy
from fips_ref.checkpoint import Checkpoint, InputError, json_entry, load_checkpoint, save_npz_atomic
from fips_ref.codec import encode
from fips_ref.models import forward, vjp
from fips_ref.models import ops, swin, swin_attention, vit
from fips_ref.models.train_mlps import (dense_layer, dense_mlp_backward, dense_mlp_forward,
                                        factored_layer)
from fips_ref.sharing import Group, Layer
from model_fixtures import make_swin_checkpoint, make_vit_checkpoint, random_images

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

EPS, RTOL = 1e-6, 1e-6


def _dot(a, b):
    return float(np.sum(to_numpy(a) * to_numpy(b)))


def check_vjp(f, inputs, grads, v, seed=0, eps=EPS, rtol=RTOL):
    """FD check of ``grads`` ({name: dL/dinput}) for f({name: array}) and upstream v.

    Inputs without a gradient are held fixed. Checks the joint direction, then each input.
    Besides rtol, an absolute slack 1e-8·‖v‖·‖f(x)‖: 100x the rounding of f (1e-16·‖f‖) seen
    through the difference quotient (÷ ε) and the product with v, for directions where ⟨v, df⟩
    happens to be tiny.
    """
    xp = get_xp(*inputs.values())
    rng = np.random.default_rng(seed)
    us = {k: xp.asarray(rng.standard_normal(inputs[k].shape)) for k in grads}
    assert set(grads) <= set(inputs), set(grads) - set(inputs)
    atol = 1e-8 * float(np.linalg.norm(to_numpy(v))) * float(np.linalg.norm(to_numpy(f(inputs))))
    for which in [list(grads)] + [[k] for k in grads]:
        def at(s):
            return f({k: x + s * eps * us[k] if k in which else x for k, x in inputs.items()})
        lhs = _dot(v, (at(1) - at(-1)) / (2 * eps))
        rhs = sum(_dot(grads[k], us[k]) for k in which)
        assert abs(lhs - rhs) <= rtol * max(abs(lhs), abs(rhs)) + atol, (which, lhs, rhs)


def _randn(xp, rng, *shape, scale=1.0):
    return xp.asarray(scale * rng.standard_normal(shape))


# ----------------------------------------------------------------------------- ops.py layers
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward(xp, bias):
    rng = np.random.default_rng(0)
    ins = {"x": _randn(xp, rng, 2, 3, 4), "W": _randn(xp, rng, 4, 5)}
    if bias:
        ins["b"] = _randn(xp, rng, 5)
    v = _randn(xp, rng, 2, 3, 5)
    dx, dW, db = ops.linear_backward(v, ins["x"], ins["W"], has_bias=bias)
    grads = {"x": dx, "W": dW, **({"b": db} if bias else {})}
    check_vjp(lambda p: ops.linear_forward(p["x"], p["W"], p.get("b"))[0], ins, grads, v)
    assert (db is None) == (not bias)


def test_layer_norm_backward(xp):
    rng = np.random.default_rng(1)
    ins = {"x": _randn(xp, rng, 2, 3, 6, scale=3.0) + 1.5, "w": _randn(xp, rng, 6),
           "b": _randn(xp, rng, 6)}
    v = _randn(xp, rng, 2, 3, 6)
    y, c = ops.layer_norm_forward(ins["x"], ins["w"], ins["b"], 1e-5)
    dx, dw, db = ops.layer_norm_backward(v, c)
    check_vjp(lambda p: ops.layer_norm_forward(p["x"], p["w"], p["b"], 1e-5)[0], ins,
              {"x": dx, "w": dw, "b": db}, v)
    # LayerNorm is invariant to a shift of x along the last axis: dx sums to zero there
    np.testing.assert_allclose(to_numpy(dx.sum(axis=-1)), 0, atol=1e-12)


def test_softmax_backward(xp):
    rng = np.random.default_rng(2)
    x, v = _randn(xp, rng, 3, 4, 5, scale=2.0), _randn(xp, rng, 3, 4, 5)
    dx = ops.softmax_backward(v, ops.softmax(x))
    check_vjp(lambda p: ops.softmax(p["x"]), {"x": x}, {"x": dx}, v)


@given(B=st.integers(1, 2), N=st.integers(1, 5), H=st.integers(1, 3), Dh=st.integers(1, 3),
       qkv_bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_attention_backward(xp, B, N, H, Dh, qkv_bias, seed):
    """Whole attention incl. qkv split, scale, two additive logit biases (Swin's), softmax, proj."""
    rng, D = np.random.default_rng(seed), H * Dh
    ins = {"x": _randn(xp, rng, B, N, D), "Wqkv": _randn(xp, rng, D, 3 * D),
           "Wproj": _randn(xp, rng, D, D), "bproj": _randn(xp, rng, D),
           "bias": _randn(xp, rng, 1, H, N, N)}
    if qkv_bias:
        ins["bqkv"] = _randn(xp, rng, 3 * D)
    mask = xp.asarray(np.where(rng.random((B, 1, N, N)) < 0.3, -100.0, 0.0))

    def f(p):
        return ops.attention_forward(p["x"], p["Wqkv"], p.get("bqkv"), p["Wproj"], p["bproj"], H,
                                     (p["bias"], mask))
    v = _randn(xp, rng, B, N, D)
    dx, (dWqkv, dbqkv, dWproj, dbproj), dlogits = ops.attention_backward(
        v, f(ins)[1], ins["Wqkv"], ins["Wproj"], qkv_bias)
    grads = {"x": dx, "Wqkv": dWqkv, "Wproj": dWproj, "bproj": dbproj,
             "bias": dlogits.sum(axis=0, keepdims=True)}
    if qkv_bias:
        grads["bqkv"] = dbqkv
    check_vjp(lambda p: f(p)[0], ins, grads, v, seed=seed)


def test_patch_embed_backward(xp):
    rng = np.random.default_rng(3)
    ins = {"img": _randn(xp, rng, 2, 3, 8, 12), "W": _randn(xp, rng, 3 * 4 * 2, 5),
           "b": _randn(xp, rng, 5)}
    y, patches = ops.patch_embed_forward(ins["img"], ins["W"], ins["b"], (4, 2))
    v = _randn(xp, rng, *y.shape)
    dW, db = ops.patch_embed_backward(v, patches, ins["W"])
    check_vjp(lambda p: ops.patch_embed_forward(p["img"], p["W"], p["b"], (4, 2))[0], ins,
              {"W": dW, "b": db}, v)


def test_layer_scale_backward(xp):
    rng = np.random.default_rng(4)
    ins, v = {"y": _randn(xp, rng, 2, 3, 4), "g": _randn(xp, rng, 4)}, _randn(xp, rng, 2, 3, 4)
    dy, dg = ops.layer_scale_backward(v, ins["y"], ins["g"])
    check_vjp(lambda p: ops.layer_scale(p["y"], p["g"]), ins, {"y": dy, "g": dg}, v)
    dy, dg = ops.layer_scale_backward(v, ins["y"], None)   # absent γ: identity
    assert dy is v and dg is None


# ----------------------------------------------------------------------------- MLPs
def test_dense_mlp_backward(xp):
    rng = np.random.default_rng(5)
    ins = {"h": _randn(xp, rng, 2, 3, 4), "W1": _randn(xp, rng, 4, 8), "b1": _randn(xp, rng, 8),
           "W2": _randn(xp, rng, 8, 4), "b2": _randn(xp, rng, 4)}

    def f(p):
        return dense_mlp_forward(p["h"], p["W1"], p["b1"], p["W2"], p["b2"])
    v = _randn(xp, rng, 2, 3, 4)
    dh, (dW1, db1, dW2, db2) = dense_mlp_backward(v, f(ins)[1], ins["W1"], ins["W2"])
    check_vjp(lambda p: f(p)[0], ins, {"h": dh, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2}, v)


@pytest.mark.parametrize("tokens", [(2, 3), (4, 10)])   # factored / materialised product order
@pytest.mark.parametrize("strategy", ["long", "short"])
def test_factored_mlp_backward(xp, strategy, tokens):
    """FiPS block: fc1, fc2 = U V1, V2 in either orientation, V masked; dU summed, dV dense."""
    rng, D, F, R = np.random.default_rng(6), 4, 8, 3
    long = strategy == "long"
    rows, cols = (D, F) if long else (F, D)
    layers = (Layer("b.mlp.fc1", 0, long), Layer("b.mlp.fc2", 0, not long))
    masks = [xp.asarray(rng.random((R, cols)) < 0.6) for _ in layers]
    ins = {"h": _randn(xp, rng, *tokens, D), "U": _randn(xp, rng, rows, R),
           "V1": _randn(xp, rng, R, cols) * masks[0], "V2": _randn(xp, rng, R, cols) * masks[1],
           "b1": _randn(xp, rng, F), "b2": _randn(xp, rng, D)}

    def mlp(p):
        return factored_layer(p["U"], (p["V1"], p["V2"]), (p["b1"], p["b2"]), layers, 7)
    y, cache = mlp(ins).forward(ins["h"])
    v, grads = _randn(xp, rng, *y.shape), {}
    dh = mlp(ins).backward(v, cache, grads)
    names = {"fips.U.7": "U", "fips.V.b.mlp.fc1": "V1", "fips.V.b.mlp.fc2": "V2",
             "b.mlp.fc1.bias": "b1", "b.mlp.fc2.bias": "b2"}
    assert set(grads) == set(names)
    check_vjp(lambda p: mlp(p).forward(p["h"])[0], ins,
              {"h": dh, **{names[k]: g for k, g in grads.items()}}, v)
    off = ~to_numpy(masks[0])        # the dense gradient of V ⊙ M reaches masked entries too
    assert np.any(to_numpy(grads["fips.V.b.mlp.fc1"])[off] != 0)


# ----------------------------------------------------------------------------- ViT pieces
def _params(ckpt, xp):
    """Math-layout float64 params of a fixture checkpoint (as prepare_model makes them)."""
    from fips_ref.models import prepare_model
    return prepare_model(ckpt, dtype=np.float64, xp=xp)


@pytest.mark.parametrize("distilled", [False, True])
def test_vit_embed_and_head_backward(xp, distilled):
    model = _params(make_vit_checkpoint(distilled=distilled, img_size=(8, 12)), xp)
    cfg, p, rng = model.cfg, model.params, np.random.default_rng(7)
    img = _randn(xp, rng, 2, 3, 8, 12)
    t, patches = vit.embed_forward(img, p, cfg)
    v, grads = _randn(xp, rng, *t.shape), {}
    vit.embed_backward(v, patches, p, cfg, grads)
    keys = ["pos_embed", "cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert set(grads) == set(keys + (["dist_token"] if distilled else []))
    check_vjp(lambda q: vit.embed_forward(img, {**p, **q}, cfg)[0], dict(p), grads, v)

    t = _randn(xp, rng, *t.shape)
    logits, cache = vit.head_forward(t, p, cfg)
    v, grads = _randn(xp, rng, *logits.shape), {}
    dt = vit.head_backward(v, cache, p, cfg, grads)
    check_vjp(lambda q: vit.head_forward(q["t"], {**p, **q}, cfg)[0], {**p, "t": t},
              {**grads, "t": dt}, v)


@pytest.mark.parametrize("layerscale, qkv_bias", [(False, True), (True, False)])
def test_vit_block_backward(xp, layerscale, qkv_bias):
    ckpt = make_vit_checkpoint(layerscale=layerscale, qkv_bias=qkv_bias, depth=1)
    model = _params(ckpt, xp)
    cfg, p, rng = model.cfg, model.params, np.random.default_rng(8)
    x = _randn(xp, rng, 2, 5, cfg.embed_dim)

    def run(q):
        q = {**p, **q}
        mlp = dense_layer(q, "blocks.0")
        return vit.block_forward(q["x"], q, "blocks.0", cfg, mlp.forward), mlp
    (y, cache), mlp = run({"x": x})
    v, grads = _randn(xp, rng, *y.shape), {}
    dx = vit.block_backward(v, cache, p, "blocks.0", mlp.backward, grads)
    block_keys = {k for k in p if k.startswith("blocks.0.")}
    assert set(grads) == block_keys
    check_vjp(lambda q: run(q)[0][0], {**p, "x": x}, {**grads, "x": dx}, v)


# ----------------------------------------------------------------------------- Swin pieces
def _attn_params(xp, rng, C, heads, window, qkv_bias=True):
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    p = {"a.qkv.weight": _randn(xp, rng, C, 3 * C, scale=C ** -0.5),
         "a.proj.weight": _randn(xp, rng, C, C, scale=C ** -0.5), "a.proj.bias": _randn(xp, rng, C),
         "a.relative_position_bias_table": _randn(xp, rng, rows, heads)}
    if qkv_bias:
        p["a.qkv.bias"] = _randn(xp, rng, 3 * C)
    return p


@pytest.mark.parametrize("size, window, shift", [
    ((8, 8), (4, 4), (2, 2)),      # shifted, 4 windows with the -100 mask
    ((5, 6), (4, 4), (2, 2)),      # padded to 8 x 8, shifted
    ((5, 6), (4, 2), (0, 1)),      # non-square window, shift on one axis
    ((3, 3), (3, 3), (0, 0)),      # window clamped to the map, no shift
])
def test_window_attention_backward(xp, size, window, shift):
    rng, C, heads = np.random.default_rng(9), 4, 2
    p = _attn_params(xp, rng, C, heads, window, qkv_bias=shift != (0, 1))
    x = _randn(xp, rng, 2, *size, C)

    def f(q):
        q = {**p, **q}
        return swin_attention.window_attention_forward(q["x"], q, "a", heads, window, shift)
    y, cache = f({"x": x})
    v, grads = _randn(xp, rng, *y.shape), {}
    dx = swin_attention.window_attention_backward(v, cache, p, "a", window, shift, grads)
    assert set(grads) == set(p)
    check_vjp(lambda q: f(q)[0], {**p, "x": x}, {**grads, "x": dx}, v)


@given(H=st.integers(1, 7), W=st.integers(1, 7), wh=st.integers(1, 4), ww=st.integers(1, 4),
       shifted=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_window_attention_backward_any_geometry(xp, H, W, wh, ww, shifted, seed):
    """Window, shift and padding as swin.stage_geometry derives them for an H x W stage."""
    rng, C, heads = np.random.default_rng(seed), 2, 2
    g = swin.stage_geometry((H, W), C, (heads,), (wh, ww))[0]
    shift = g.shift if shifted else (0, 0)
    p = _attn_params(xp, rng, C, heads, g.window)
    x = _randn(xp, rng, 1, H, W, C)

    def f(q):
        q = {**p, **q}
        return swin_attention.window_attention_forward(q["x"], q, "a", heads, g.window, shift)
    y, cache = f({"x": x})
    v, grads = _randn(xp, rng, *y.shape), {}
    dx = swin_attention.window_attention_backward(v, cache, p, "a", g.window, shift, grads)
    check_vjp(lambda q: f(q)[0], {**p, "x": x}, {**grads, "x": dx}, v, seed=seed)


@given(wh=st.integers(1, 4), ww=st.integers(1, 4), heads=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_relative_position_bias_backward_is_adjoint(xp, wh, ww, heads, seed):
    """The gather table -> bias is linear: ⟨bias(t), d⟩ = ⟨t, bias_backward(d)⟩ exactly-ish."""
    rng, rows = np.random.default_rng(seed), (2 * wh - 1) * (2 * ww - 1)
    t, d = _randn(xp, rng, rows, heads), _randn(xp, rng, heads, wh * ww, wh * ww)
    lhs = _dot(swin_attention.relative_position_bias(t, (wh, ww)), d)
    rhs = _dot(t, swin_attention.relative_position_bias_backward(d, (wh, ww), rows))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("size", [(4, 6), (5, 3)])   # even; odd sizes are zero-padded
def test_patch_merging_backward(xp, size):
    rng, C = np.random.default_rng(10), 3
    p = {"m.norm.weight": 1 + _randn(xp, rng, 4 * C, scale=0.1),
         "m.norm.bias": _randn(xp, rng, 4 * C), "m.reduction.weight": _randn(xp, rng, 4 * C, 2 * C)}
    x = _randn(xp, rng, 2, *size, C)
    y, cache = swin.patch_merging_forward(x, p, "m", 1e-5)
    v, grads = _randn(xp, rng, *y.shape), {}
    dx = swin.patch_merging_backward(v, cache, p, "m", grads)
    assert dx.shape == x.shape and set(grads) == set(p)
    check_vjp(lambda q: swin.patch_merging_forward(q["x"], {**p, **q}, "m", 1e-5)[0],
              {**p, "x": x}, {**grads, "x": dx}, v)


def test_swin_block_and_head_backward(xp):
    model = _params(make_swin_checkpoint(img_size=(20, 24)), xp)   # 10 x 12 tokens, window 4
    cfg, p, rng = model.cfg, model.params, np.random.default_rng(11)
    stage, prefix = cfg.stages[0], "layers.0.blocks.1"              # the shifted block
    x = _randn(xp, rng, 2, *stage.resolution, stage.dim)

    def run(q):
        q = {**p, **q}
        mlp = dense_layer(q, prefix)
        return swin.block_forward(q["x"], q, prefix, stage, True, mlp.forward, 1e-5), mlp
    (y, cache), mlp = run({"x": x})
    v, grads = _randn(xp, rng, *y.shape), {}
    dx = swin.block_backward(v, cache, p, prefix, stage, mlp.backward, grads)
    assert set(grads) == {k for k in p if k.startswith(prefix + ".")}
    check_vjp(lambda q: run(q)[0][0], {**p, "x": x}, {**grads, "x": dx}, v)

    t = _randn(xp, rng, 2, 3, 4, cfg.stages[-1].dim)
    logits, hc = swin.head_forward(t, p, cfg)
    v, grads = _randn(xp, rng, *logits.shape), {}
    dt = swin.head_backward(v, hc, p, cfg, grads)
    check_vjp(lambda q: swin.head_forward(q["t"], {**p, **q}, cfg)[0], {**p, "t": t},
              {**grads, "t": dt}, v)


# ----------------------------------------------------------------------------- whole model
MODELS = {
    "vit_layerscale": lambda: make_vit_checkpoint(layerscale=True, img_size=(8, 12)),
    "deit_distilled_no_qkv_bias": lambda: make_vit_checkpoint(distilled=True, qkv_bias=False),
    "swin_shifted": lambda: make_swin_checkpoint(),
    # 10 x 12 grid: padded windows; 5 x 6 stage: odd merging, shifted; 3 x 3: clamped window
    "swin_padded_clamped": lambda: make_swin_checkpoint(img_size=(20, 24), depths=(2, 2, 2),
                                                         num_heads=(1, 2, 2)),
    "swin_rect_window": lambda: make_swin_checkpoint(window_size=(4, 2), qkv_bias=False),
}


def _float64(ckpt):
    return Checkpoint(ckpt.path, ckpt.config,
                      {k: v.astype(np.float64) for k, v in ckpt.tensors.items()}, dict(ckpt.extra))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_model_vjp(xp, name):
    """dLoss/dTensor of every checkpoint tensor against central differences of models.forward."""
    ckpt = _float64(MODELS[name]())
    images = random_images(ckpt, 3).astype(np.float64)
    rng = np.random.default_rng(12)
    dlogits = rng.standard_normal((3, ckpt.config["num_classes"]))
    logits, grads = vjp(ckpt, images, dlogits, dtype=np.float64, xp=xp, batch_size=2)
    assert set(grads) == set(ckpt.tensors)
    for k, g in grads.items():
        assert g.shape == ckpt.tensors[k].shape and g.dtype == np.float64, k

    def f(q):
        return forward(Checkpoint(ckpt.path, ckpt.config, {**ckpt.tensors, **q}), images,
                       dtype=np.float64, xp=xp)
    check_vjp(f, dict(ckpt.tensors), grads, dlogits, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vjp_logits_are_the_forward(dtype):
    """The training forward is the inference forward's code: same logits, bit for bit."""
    for make in (MODELS["deit_distilled_no_qkv_bias"], MODELS["swin_padded_clamped"]):
        ckpt = make()
        images = random_images(ckpt, 3)
        dl = np.ones((3, ckpt.config["num_classes"]))
        logits, _ = vjp(ckpt, images, dl, dtype=dtype, batch_size=2)
        np.testing.assert_array_equal(logits, forward(ckpt, images, dtype=dtype, batch_size=2))


def test_vjp_sums_over_batches_and_is_linear_in_dlogits():
    ckpt = MODELS["vit_layerscale"]()
    images, rng = random_images(ckpt, 5), np.random.default_rng(13)
    d1, d2 = rng.standard_normal((2, 5, ckpt.config["num_classes"]))
    _, g_all = vjp(ckpt, images, d1, dtype=np.float64)
    _, g_one = vjp(ckpt, images, d1, dtype=np.float64, batch_size=1)
    _, g2 = vjp(ckpt, images, d2, dtype=np.float64, batch_size=2)
    _, g12 = vjp(ckpt, images, 2 * d1 - d2, dtype=np.float64, batch_size=3)
    for k in g_all:
        np.testing.assert_allclose(g_one[k], g_all[k], rtol=1e-10, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(g12[k], 2 * g_all[k] - g2[k], rtol=1e-9, atol=1e-11, err_msg=k)


@pytest.mark.parametrize("bad", [lambda d: d[:, :-1], lambda d: d[:-1], lambda d: d[0]])
def test_vjp_refuses_misshaped_dlogits(bad):
    ckpt = MODELS["vit_layerscale"]()
    images = random_images(ckpt, 2)
    with pytest.raises(InputError, match="dlogits must be"):
        vjp(ckpt, images, bad(np.zeros((2, ckpt.config["num_classes"]))))


# ----------------------------------------------------------------------------- compressed
def _compressed(tmp_path, rng):
    """A 4-block ViT: group 0 = blocks 0, 1 ('long': fc1 = U V), group 1 = block 2 ('short':
    fc2 = U V), block 3 dense. V masked at ~50 %. Returns (compressed ckpt, its dense twin,
    {group: (U, [V...], [Layer...])}) with the twin's fc weights = the factors' products."""
    base = make_vit_checkpoint(depth=4)
    D, F, R = 16, 32, 5
    spec = {0: ((0, 1), True, D, F), 1: ((2,), False, F, D)}
    groups, params, masks, factors = [], {}, {}, {}
    for g, (blocks, long, rows, cols) in spec.items():
        layers = tuple(Layer(f"blocks.{b}.mlp.{fc}", b, long == (fc == "fc1"))
                       for b in blocks for fc in ("fc1", "fc2"))
        groups.append(Group(g, blocks, rows, cols, R, layers))
        U = (rng.standard_normal((rows, R)) / 2).astype(np.float32)
        params[f"U.{g}"] = U
        Vs = []
        for l in layers:
            m = rng.random((R, cols)) < 0.5
            params[f"{l.key}.V"] = (rng.standard_normal((R, cols)) * m / 2).astype(np.float32)
            params[f"{l.key}.bias"] = base.tensors[f"{l.key}.bias"]
            masks[f"{l.key}.V"] = m
            Vs.append(params[f"{l.key}.V"])
        factors[g] = (U, Vs, layers)
    result = SimpleNamespace(groups=groups, params=params, masks=masks)
    arrays, meta = encode(base, result, {}, storage_dtype=np.float32)
    path = tmp_path / "c.fips.npz"
    save_npz_atomic(path, {**arrays, "config": json_entry(base.config),
                           "fips": json_entry(meta)})
    dense = dict(_float64(base).tensors)
    for U, Vs, layers in factors.values():
        for V, l in zip(Vs, layers):
            W = U.astype(np.float64) @ V.astype(np.float64)          # [rows, cols]
            dense[f"{l.key}.weight"] = W.T if l.basis_first else W   # math [in, out] -> torch
    return load_checkpoint(path), Checkpoint("<dense twin>", base.config, dense), factors


def test_compressed_vjp_is_the_chain_rule_through_the_dense_twin(tmp_path):
    """dU = Σ_layers dW·Vᵀ (oriented per layer), dV = Uᵀ·dW dense (nonzero off the mask),
    every other key equal to the dense twin's gradient."""
    comp, dense, factors = _compressed(tmp_path, np.random.default_rng(14))
    images = random_images(comp, 3)
    dl = np.random.default_rng(15).standard_normal((3, comp.config["num_classes"]))
    logits_c, gc = vjp(comp, images, dl, dtype=np.float64, batch_size=2)
    logits_d, gd = vjp(dense, images, dl, dtype=np.float64)
    np.testing.assert_allclose(logits_c, logits_d, rtol=1e-10, atol=1e-12)
    fips_keys = {k for k in gc if k.startswith("fips.")}
    assert set(gc) - fips_keys == {k for k in comp.tensors if not k.startswith("fips.")}
    for k in set(gc) - fips_keys:
        np.testing.assert_allclose(gc[k], gd[k], rtol=1e-9, atol=1e-12, err_msg=k)
    assert fips_keys == {f"fips.U.{g}" for g in factors} | {
        f"fips.V.{l.key}" for _, _, layers in factors.values() for l in layers}
    for g, (U, Vs, layers) in factors.items():
        dU = np.zeros(U.shape)
        for V, l in zip(Vs, layers):
            G = gd[f"{l.key}.weight"].T            # dL/dW_math [in, out]
            GUV = G if l.basis_first else G.T      # dL/d(U V)
            dU += GUV @ V.T
            np.testing.assert_allclose(gc[f"fips.V.{l.key}"], U.T @ GUV, rtol=1e-9, atol=1e-11)
            assert np.any(gc[f"fips.V.{l.key}"][V == 0] != 0)   # not masked
        np.testing.assert_allclose(gc[f"fips.U.{g}"], dU, rtol=1e-9, atol=1e-11)
