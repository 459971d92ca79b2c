"""Tests of the paper's §5 ablation options and the block-structured strategies II/III (fips_ref/ablations.py).

Oracles: the original weights (exact reconstruction at full rank), closed-form variances of He
initialisation, finite differences of the loss (float64, a random direction), and the product
of the factors before export against the compressed file's decoded weights.
"""
import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fips_ref.ablations import (expand_grid, fold_scaling, grow, he_init, m_key, normalise_columns,
                                scaled_v)
from fips_ref.backend import to_numpy
from fips_ref.budget import rank_for_shape
from fips_ref.checkpoint import Checkpoint, InputError, json_entry, load_checkpoint
from fips_ref.codec import decompressed_tensors, encode
from fips_ref.local_stage import (FiPSConfig, compressed_layers, init_factors, loss_and_grads,
                                  plan_groups, run_local_stage)
from fips_ref.sharing import (STRATEGIES, build_groups, concat_group, layer_factors, strategy_name,
                              svd_init, v_keys)
from model_fixtures import mlp_weights

F64 = dict(rtol=1e-9, atol=1e-9)
GRID = ("by-type", "by-block")


def _layer_weights(params, masks, groups):  # {key: math weight [in, out]}
    out = {}
    for g in groups:
        for b in g.blocks:
            layers = [l for l in g.layers if l.block == b]
            for l, (A, B, _) in zip(layers, compressed_layers(params, masks, g, b)):
                out[l.key] = A @ B
    return out


# ----------------------------------------------------------------------------- strategies II / III
def test_strategy_names_and_numerals():
    assert [strategy_name(s) for s in ("I", "II", "III", "IV")] == ["long", "by-type", "by-block", "short"]
    assert all(strategy_name(s) == s for s in STRATEGIES)
    with pytest.raises(InputError, match="--concat"):
        strategy_name("V")


def test_grid_layouts_place_each_block():
    """II: rows fc1 | fc2, a column block per block; III: a row block per block, columns fc1 | fc2."""
    d, F = 3, 8
    w, blocks = mlp_weights(np.random.default_rng(0), 2, d, F)
    W = {k: w[f"{k}.weight"].T for k in ("blocks.0.mlp.fc1", "blocks.1.mlp.fc1")}      # [d, F]
    W.update({k: w[f"{k}.weight"] for k in ("blocks.0.mlp.fc2", "blocks.1.mlp.fc2")})   # fc2ᵀ [d, F]
    g2 = build_groups(blocks, [[0, 1]], budget=0.5, sparsity=0.75, strategy="by-type")[0]
    C2 = concat_group(w, g2)
    assert C2.shape == (2 * d, 2 * F) and (g2.rows, g2.cols) == (2 * d, F)
    assert np.array_equal(C2, np.block([[W["blocks.0.mlp.fc1"], W["blocks.1.mlp.fc1"]],
                                        [W["blocks.0.mlp.fc2"], W["blocks.1.mlp.fc2"]]]))
    assert v_keys(g2) == ["blocks.0.mlp.V", "blocks.1.mlp.V"]
    g3 = build_groups(blocks, [[0, 1]], budget=0.5, sparsity=0.75, strategy="by-block")[0]
    C3 = concat_group(w, g3)
    assert np.array_equal(C3, np.block([[W["blocks.0.mlp.fc1"], W["blocks.0.mlp.fc2"]],
                                        [W["blocks.1.mlp.fc1"], W["blocks.1.mlp.fc2"]]]))
    assert v_keys(g3) == ["group0.fc1.V", "group0.fc2.V"]
    # neither is a transpose of I (long) or IV (short): different shapes for n = 3 blocks
    w3, b3 = mlp_weights(np.random.default_rng(1), 3, d, F)
    shapes = {s: concat_group(w3, build_groups(b3, [[0, 1, 2]], budget=0.5, sparsity=0.75,
                                               strategy=s)[0]).shape for s in STRATEGIES}
    flat = {shapes["long"], shapes["long"][::-1], shapes["short"], shapes["short"][::-1]}
    assert shapes["by-type"] not in flat and shapes["by-block"] not in flat


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3), d=st.integers(2, 5), ratio=st.integers(1, 4),
       strategy=st.sampled_from(GRID), extra=st.integers(0, 3))
def test_grid_strategies_reconstruct_exactly_at_full_rank(seed, n, d, ratio, strategy, extra):
    """At rank ≥ min(rows, cols) of C, every layer's U_l V = its original math weight."""
    w, blocks = mlp_weights(np.random.default_rng(seed), n, d, ratio * d)
    g = build_groups(blocks, [list(range(n))], budget=1.0, sparsity=0.9, strategy=strategy)[0]
    g = replace(g, rank=min(concat_group(w, g).shape) + extra)
    params = init_factors(w, [g], xp=np, dtype=np.float64, tau=32.0)
    for key, W in _layer_weights(params, {}, [g]).items():
        np.testing.assert_allclose(W, w[f"{key}.weight"].T, **F64)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("budget,sparsity", [(0.5, 0.75), (0.25, 0.9), (0.4, 0.0)])
def test_rank_is_the_largest_within_budget(strategy, budget, sparsity):
    """Dense U + density·(every V slice) ≤ p·(2n·D·F), and one more rank unit would not fit."""
    n, d, F = 3, 16, 64
    w, blocks = mlp_weights(np.random.default_rng(0), n, d, F)
    g = build_groups(blocks, [[0, 1, 2]], budget=budget, sparsity=sparsity, strategy=strategy)[0]
    params = init_factors(w, [g], xp=np, dtype=np.float64, tau=32.0)
    U, Vs = params["U.0"], [params[k] for k in v_keys(g)]
    cost = lambda r: U.shape[0] * r + (1 - sparsity) * r * sum(v.shape[1] for v in Vs)
    assert U.shape[1] == g.rank
    assert cost(g.rank) <= budget * 2 * n * d * F + 1e-6 < cost(g.rank + 1)


def test_grid_ranks_from_the_shape_of_c():
    _, blocks = mlp_weights(np.random.default_rng(0), 4, 8, 32)
    g2, = build_groups(blocks, [[0, 1, 2, 3]], budget=0.5, sparsity=0.75, strategy="II")
    g3, = build_groups(blocks, [[0, 1, 2, 3]], budget=0.5, sparsity=0.75, strategy="III")
    assert g2.rank == rank_for_shape(16, 128, 0.5, 0.75) and g3.rank == rank_for_shape(32, 64, 0.5, 0.75)


@pytest.mark.parametrize("strategy", GRID)
def test_expand_grid_keeps_every_layer_weight_and_its_nonzeros(xp, strategy):
    """The file's form (one U, a V per layer) gives the same weights, masks keep each layer's nnz."""
    rng = np.random.default_rng(4)
    w, blocks = mlp_weights(rng, 3, 4, 8)
    g = build_groups(blocks, [[0, 1, 2]], budget=0.5, sparsity=0.5, strategy=strategy)[0]
    params = init_factors(w, [g], xp=xp, dtype=np.float64, tau=32.0)
    masks = {k: xp.asarray(rng.random(params[k].shape) < 0.5) for k in v_keys(g)}
    host = lambda d: {k: to_numpy(v) for k, v in d.items()}              # noqa: E731
    before = _layer_weights(host(params), host(masks), [g])
    groups, p2, m2 = expand_grid([g], params, masks, xp)
    (g2,) = groups
    assert g2.rows == 4 and all(l.u_rows is None and l.v_key is None for l in g2.layers)
    assert p2["U.0"].shape == (4, g2.rank) and g2.rank == (g.rows // 4) * g.rank
    after = _layer_weights(host(p2), host(m2), groups)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], **F64)
    for l in g.layers:
        assert int(m2[f"{l.key}.V"].sum()) == int(masks[f"{(l.v_key)}.V"].sum())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3), d=st.integers(2, 4), ratio=st.integers(1, 3))
def test_every_strategy_holds_every_weight_exactly_once(seed, n, d, ratio):
    """C of I-IV is a rearrangement of the same 2n·D·F weights, so their relative errors compare."""
    w, blocks = mlp_weights(np.random.default_rng(seed), n, d, ratio * d)
    Cs = [concat_group(w, build_groups(blocks, [list(range(n))], budget=1.0, sparsity=0.9, strategy=s)[0])
          for s in STRATEGIES]
    assert all(C.size == 2 * n * d * ratio * d for C in Cs)
    assert all(np.array_equal(np.sort(C.ravel()), np.sort(Cs[0].ravel())) for C in Cs)


# ----------------------------------------------------------------------------- growth
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 6), cols=st.integers(1, 6), extra=st.integers(1, 14),
       growth=st.sampled_from(("hybrid", "random", "split")))
def test_every_growth_keeps_the_product(seed, rows, cols, extra, growth):
    C = np.random.default_rng(seed).standard_normal((rows, cols))
    q = min(rows, cols)
    U, V = grow(*svd_init(C, q), q + extra, growth, 32.0, np.random.default_rng(seed))
    assert U.shape == (rows, q + extra) and V.shape == (q + extra, cols)
    np.testing.assert_allclose(U @ V, C, **F64)


def test_hybrid_growth_is_the_authors_svd_init():
    C = np.random.default_rng(0).standard_normal((5, 9))
    U, V = grow(*svd_init(C, 5), 13, "hybrid", 32.0)
    U0, V0 = svd_init(C, 13, 32.0)
    assert np.array_equal(U, U0) and np.array_equal(V, V0)


def test_split_growth_is_net2net():
    """Unit i and its copies: equal U columns, V rows summing to the SVD's row i."""
    C = np.random.default_rng(1).standard_normal((3, 8))
    U0, V0 = svd_init(C, 3)
    U, V = grow(U0, V0, 3 + 7, "split")                 # units 0, 1, 2, 0, 1, 2, 0 copied
    src = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert all(np.array_equal(U[:, j], U0[:, i]) for j, i in enumerate(src))
    for i in range(3):
        copies = [j for j, s in enumerate(src) if s == i]
        np.testing.assert_allclose(V[copies].sum(axis=0), V0[i], **F64)
        assert all(np.allclose(V[j], V0[i] / len(copies)) for j in copies)


def test_random_growth_has_he_variance():
    C = np.random.default_rng(2).standard_normal((40, 3000))
    R = 200
    U, V = grow(*svd_init(C, 40), R, "random", rng=np.random.default_rng(3))
    new = V[40:]                                        # 160·3000 He draws, var 2/R
    assert not U[:, 40:].any()
    assert abs(new.var() / (2.0 / R) - 1) < 0.02 and abs(new.mean()) < 3 * np.sqrt(2.0 / R / new.size)


def test_random_init_has_he_variance():
    U, V = he_init(500, 800, 300, np.random.default_rng(0))
    assert abs(U.var() * 500 / 2 - 1) < 0.02 and abs(V.var() * 300 / 2 - 1) < 0.02


def test_random_init_does_not_start_from_the_weights_and_is_seeded():
    w, blocks = mlp_weights(np.random.default_rng(0), 2, 4, 16)
    g = build_groups(blocks, [[0, 1]], budget=0.5, sparsity=0.75)[0]
    a = init_factors(w, [g], xp=np, dtype=np.float64, tau=32.0, init="random", seed=5)
    b = init_factors(w, [g], xp=np, dtype=np.float64, tau=32.0, init="random", seed=5)
    svd = init_factors(w, [g], xp=np, dtype=np.float64, tau=32.0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.allclose(a["U.0"] @ a["blocks.0.mlp.fc1.V"], svd["U.0"] @ svd["blocks.0.mlp.fc1.V"])


# ----------------------------------------------------------------------------- scaling vectors
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 2), d=st.integers(2, 4),
       strategy=st.sampled_from(STRATEGIES))
def test_scaling_vectors_reconstruct_at_full_rank(seed, n, d, strategy):
    """U V_j diag(m_j) = every layer's weight at full rank; m the column norms of C."""
    w, blocks = mlp_weights(np.random.default_rng(seed), n, d, 4 * d)
    g = build_groups(blocks, [list(range(n))], budget=1.0, sparsity=0.9, strategy=strategy)[0]
    C = concat_group(w, g)
    g = replace(g, rank=min(C.shape))
    params = init_factors(w, [g], xp=np, dtype=np.float64, tau=32.0, scaling_vectors=True)
    m = np.concatenate([params[m_key(k)] for k in v_keys(g)])
    np.testing.assert_allclose(m, np.linalg.norm(C, axis=0), **F64)
    for key, W in _layer_weights(params, {}, [g]).items():
        np.testing.assert_allclose(W, w[f"{key}.weight"].T, **F64)


def test_normalise_columns_zero_column():
    C = np.array([[3.0, 0.0], [4.0, 0.0]])
    Cn, m = normalise_columns(C)
    assert np.array_equal(m, [5.0, 1.0]) and np.allclose(Cn * m, C)


@pytest.mark.parametrize("strategy", ["long", "short", "by-type"])
def test_gradients_of_magnitudes_shared_u_and_shared_v_by_finite_differences(strategy):
    """Directional derivative of the loss along a random direction of every parameter (m, U, V, b)."""
    rng = np.random.default_rng(7)
    w, blocks = mlp_weights(rng, 2, 3, 6)
    g = build_groups(blocks, [[0, 1]], budget=0.9, sparsity=0.5, strategy=strategy)[0]
    params = init_factors(w, [g], xp=np, dtype=np.float64, tau=32.0, scaling_vectors=True)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}
    masks = {k: rng.random(params[k].shape) < 0.7 for k in v_keys(g)}
    inputs = {b: rng.standard_normal((5, 3)) for b in (0, 1)}
    targets = {b: rng.standard_normal((5, 3)) for b in (0, 1)}
    gammas = {0: None, 1: None}
    _, grads = loss_and_grads(params, masks, [g], inputs, targets, gammas)
    assert set(grads) == set(params) and any(k.endswith(".m") for k in grads)
    u = {k: rng.standard_normal(v.shape) * masks.get(k, 1.0) for k, v in params.items()}   # dV is of V ⊙ M
    f = lambda e: float(loss_and_grads({k: params[k] + e * u[k] for k in params}, masks, [g], inputs,
                                       targets, gammas)[0])
    eps = 1e-6
    fd = (f(eps) - f(-eps)) / (2 * eps)
    analytic = sum(float((grads[k] * u[k]).sum()) for k in params)
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("basis_first", [True, False])
def test_folding_keeps_the_mask_and_the_weight_in_both_orientations(basis_first):
    """V diag(m) has V's zeros: the mask holds whether the layer is U V or (U V)ᵀ."""
    rng = np.random.default_rng(3)
    from fips_ref.sharing import Layer
    layer = Layer("blocks.0.mlp.fc1", 0, basis_first)
    U, V, m = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    M = rng.random((3, 5)) < 0.5
    folded = fold_scaling({"x.V": V * M, "x.m": m})
    assert set(folded) == {"x.V"} and np.array_equal(folded["x.V"] != 0, (V * M != 0) & (m != 0))
    A, B = layer_factors(U, folded["x.V"], layer)
    A_ref, B_ref = layer_factors(U, scaled_v(V * M, m), layer)
    np.testing.assert_allclose(A @ B, A_ref @ B_ref, **F64)


# ----------------------------------------------------------------------------- end to end
def _train(strategy, scaling, init="svd", growth="hybrid", budget=0.5):
    rng = np.random.default_rng(0)
    w, blocks = mlp_weights(rng, 4, 8, 32)
    acts = {b.index: rng.standard_normal((16, 8)).astype(np.float32) for b in blocks}
    cfg = FiPSConfig(budget=budget, strategy=strategy, scaling_vectors=scaling, init=init, growth=growth,
                     epochs=2, batch_size=8, delta_t=1, t_accel=1)
    last = {}

    def keep(state, loss, lr):
        last["params"] = {k: v.copy() for k, v in state.params.items()}
        last["masks"] = {k: v.copy() for k, v in state.masks.items()}
    groups = [[0, 1], [2, 3]]
    result = run_local_stage(w, acts, groups, cfg, blocks=blocks, dtype=np.float64, callback=keep)
    trained = _layer_weights(last["params"], last["masks"], plan_groups(cfg, blocks, groups))
    return w, result, trained


@pytest.mark.parametrize("strategy,scaling", [("by-type", False), ("by-block", False), ("short", True),
                                              ("by-type", True), ("long", True)])
def test_the_file_decodes_to_the_trained_product(strategy, scaling):
    """Train (magnitudes, shared V) → export → encode → decode: the dense weights are the trained U V diag(m)."""
    w, result, trained = _train(strategy, scaling)
    assert not any(k.endswith(".m") for k in result.params)
    ckpt = Checkpoint(path="<test>", config={"arch": "vit", "depth": 4}, tensors=w)
    arrays, meta = encode(ckpt, result, {}, storage_dtype=np.float32)
    arrays["fips"] = json_entry(meta)
    dense = decompressed_tensors(Checkpoint(path="<test>", config={"arch": "vit", "depth": 4}, tensors=arrays,
                                            extra={"fips": arrays["fips"]}))
    for key, W in trained.items():
        np.testing.assert_allclose(dense[f"{key}.weight"].T, W, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags", [["--init", "random", "--growth", "split"], ["--scaling-vectors"],
                                   ["--growth", "random", "--budget", "0.95"]])
def test_options_reach_the_config(flags):
    from fips_ref.compress import build_parser, fips_config
    cfg = fips_config(build_parser().parse_args(flags))
    d = dict(zip(flags[::2], flags[1::2])) if "--scaling-vectors" not in flags else {}
    assert cfg.scaling_vectors == ("--scaling-vectors" in flags)
    assert cfg.init == d.get("--init", "svd") and cfg.growth == d.get("--growth", "hybrid")


def test_bad_combinations_are_one_line_errors():
    w, blocks = mlp_weights(np.random.default_rng(0), 2, 4, 16)
    acts = {b.index: np.zeros((8, 4), np.float32) for b in blocks}
    for cfg, needle in [(FiPSConfig(init="random", scaling_vectors=True), "--scaling-vectors"),
                        (FiPSConfig(solver="als", strategy="by-type"), "--concat by-type"),
                        (FiPSConfig(growth="grafted"), "--growth")]:
        with pytest.raises(InputError, match=needle):
            run_local_stage(w, acts, [[0, 1]], replace(cfg, batch_size=4), blocks=blocks)


@pytest.mark.parametrize("concat", ["II", "III", "short", "I"])
def test_compress_then_decompress_per_strategy(tmp_path, concat, capsys):
    """A tiny CLI run per strategy: the file decompresses, and its forward is the compressed model's."""
    from fips_ref.calib import acts_key
    from fips_ref.checkpoint import save_npz_atomic
    from fips_ref.compress import main as compress_main
    from fips_ref.decompress import main as decompress_main
    from fips_ref.models import forward
    from model_fixtures import make_vit_checkpoint, random_images
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, embed_dim=8, mlp_ratio=4.0)
    rng = np.random.default_rng(1)
    save_npz_atomic(tmp_path / "acts.npz", {acts_key(i): rng.standard_normal((16, 5, 8)).astype(np.float32)
                                            for i in range(2)})
    out, dense, rep = tmp_path / "c.npz", tmp_path / "d.npz", tmp_path / "r.json"
    assert compress_main([ckpt.path, "--calib-acts", str(tmp_path / "acts.npz"), "--out", str(out),
                          "--report", str(rep), "--concat", concat, "--epochs", "1", "--batch-size", "8",
                          "--storage-dtype", "float32", "--quiet"]) == 0
    assert json.loads(rep.read_text())["config"]["strategy"] == strategy_name(concat)
    assert decompress_main([str(out), str(dense)]) == 0
    capsys.readouterr()
    x = random_images(ckpt, 3)
    np.testing.assert_allclose(forward(str(dense), x), forward(str(out), x), rtol=1e-4, atol=1e-5)
    assert load_checkpoint(dense).tensors["blocks.1.mlp.fc2.weight"].shape == (8, 32)


def test_refused_combination_is_one_line_exit_2_before_any_output(tmp_path, capsys):
    from fips_ref.compress import main as compress_main
    from model_fixtures import make_vit_checkpoint
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, embed_dim=8, mlp_ratio=4.0)
    code = compress_main([ckpt.path, "--out", str(tmp_path / "c.npz"), "--concat", "II", "--solver", "als",
                          "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--concat by-type" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.npz"]
