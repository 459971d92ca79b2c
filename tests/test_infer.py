"""Tests of fips_ref.infer: every path gives the same MLP output; MAC counts; per-batch choice (docs/deployment.md §3).

Oracle for the outputs: the dense MLP with the materialised weights W1 = U (V1 ⊙ M1) and
W2 = (U (V2 ⊙ M2))ᵀ (mlp.dense_mlp), computed in float64.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from fips_ref.backend import to_numpy
from fips_ref.condensed import encode
from fips_ref.infer import (PATHS, CostModel, InferLayer, available_paths, calibrate, choose_path,
                            default_paths, inference_mlp_fn, layer_forward, macs_dense, macs_lowrank,
                            macs_materialised, mlp_forward, path_macs, prepare_condensed,
                            prepare_layer)
from fips_ref.mlp import dense_mlp
from fips_ref.sparsity import initial_masks
from fips_ref.structured import constant_fan_in_mask, nm_mask, unit_view


def _paths_for(xp):
    return default_paths(xp)


def _mlp(rng, d, f, r, kind, dtype=np.float64):
    """U, (V1, M1, b1), (V2, M2, b2) with masks of ``kind``: constant fan-in, N:M, unstructured, ablated."""
    U = rng.standard_normal((d, r)).astype(dtype)
    out = []
    for axis, bias_n in ((0, f), (1, d)):                          # fc1 basis-first, fc2 not ('long')
        V = rng.standard_normal((r, f)).astype(dtype)
        fan_in = unit_view(V, axis).shape[1]
        if kind == "nm":
            M = nm_mask(V, 1, 4, axis)
        elif kind == "unstructured":
            M = initial_masks({"v": V}, 0.7, global_pruning=False)["v"]
        else:
            M = constant_fan_in_mask(V, max(1, fan_in // 3), axis)
            if kind == "ablated":
                unit_view(M, axis)[1:3] = False
        out.append((V, M, rng.standard_normal(bias_n).astype(dtype)))
    return U, out[0], out[1]


def _reference(x, U, fc1, fc2):
    (V1, M1, b1), (V2, M2, b2) = fc1, fc2
    W1, W2 = U @ np.where(M1, V1, 0), (U @ np.where(M2, V2, 0)).T
    return dense_mlp(x, W1, b1, W2, b2)


@given(seed=st.integers(0, 2**32 - 1), m=st.sampled_from([1, 2, 7]), dims=st.sampled_from(
    [(8, 32, 4), (12, 48, 16), (16, 24, 20)]), kind=st.sampled_from(["fan_in", "nm", "unstructured", "ablated"]),
    threads=st.integers(1, 3))
def test_every_path_gives_the_same_output(xp, seed, m, dims, kind, threads):
    """materialised, low-rank, gather and CSR agree with the dense MLP of U·(V ⊙ M) (float64)."""
    rng = np.random.default_rng(seed)
    d, f, r = dims
    U, fc1, fc2 = _mlp(rng, d, f, r, kind)
    x = rng.standard_normal((m, d))
    want = _reference(x, U, fc1, fc2)
    paths = _paths_for(xp)
    a = lambda t: tuple(xp.asarray(v) for v in t)
    l1 = prepare_layer(xp.asarray(U), *a(fc1[:2]), xp.asarray(fc1[2]), True, threads=threads)
    l2 = prepare_layer(xp.asarray(U), *a(fc2[:2]), xp.asarray(fc2[2]), False, threads=threads)
    assert available_paths(l1) == available_paths(l2) == paths
    for p in paths:
        got = to_numpy(mlp_forward(xp.asarray(x), l1, l2, path=p))
        assert got.shape == (m, d)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=p)


def test_paths_agree_in_float32_at_deit_like_widths():
    """float32, D 96, F 384, R 85 (rank not a multiple of anything): paths within float tolerance."""
    rng = np.random.default_rng(0)
    U, fc1, fc2 = _mlp(rng, 96, 384, 85, "fan_in", np.float32)
    x = rng.standard_normal((33, 96)).astype(np.float32)
    want = _reference(x.astype(np.float64), U.astype(np.float64),
                      *[(V.astype(np.float64), M, b.astype(np.float64)) for V, M, b in (fc1, fc2)])
    l1, l2 = prepare_layer(U, *fc1, True), prepare_layer(U, *fc2, False)
    for p in PATHS:
        got = mlp_forward(x, l1, l2, path=p)
        assert got.dtype == np.float32
        scale = np.abs(want).max()                                      # unscaled weights: |y| ~ 1e4
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=p)


@pytest.mark.parametrize("kind", ["fan_in", "nm", "ablated"])
def test_prepare_condensed_equals_prepare_layer(kind):
    """The layer built from condensed storage gives the same outputs, without a dense V."""
    rng = np.random.default_rng(1)
    U, fc1, fc2 = _mlp(rng, 12, 48, 16, kind)
    x = rng.standard_normal((3, 12))
    for (V, M, b), bf, axis in ((fc1, True, 0), (fc2, False, 1)):
        c = encode(V, M, axis, m=4 if kind == "nm" else 0)
        lean = prepare_condensed(U, c, b, bf)
        assert lean.V is None and available_paths(lean) == ("gather", "csr")
        full = prepare_layer(U, V, M, b, bf)
        xin = x if bf else rng.standard_normal((3, 48))
        for p in ("gather", "csr"):
            np.testing.assert_allclose(layer_forward(xin, lean, p), layer_forward(xin, full, "materialised"),
                                       rtol=1e-12, atol=1e-12)


def test_csr_threads_do_not_change_bits():
    rng = np.random.default_rng(2)
    U, fc1, fc2 = _mlp(rng, 16, 64, 24, "fan_in", np.float32)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    outs = [mlp_forward(x, prepare_layer(U, *fc1, True, threads=t), prepare_layer(U, *fc2, False, threads=t),
                        path="csr") for t in (1, 2, 5)]
    assert all((o == outs[0]).all() for o in outs)


def test_inference_mlp_fn_keeps_leading_shape_and_refuses_unknown_path():
    rng = np.random.default_rng(3)
    U, fc1, fc2 = _mlp(rng, 8, 32, 4, "fan_in")
    l1, l2 = prepare_layer(U, *fc1, True), prepare_layer(U, *fc2, False)
    h = rng.standard_normal((2, 5, 8))
    y = inference_mlp_fn(l1, l2)(h)
    assert y.shape == (2, 5, 8)
    np.testing.assert_allclose(y.reshape(10, 8), _reference(h.reshape(10, 8), U, fc1, fc2), rtol=1e-10)
    with pytest.raises(ValueError, match="unknown inference path 'sparse'"):
        prepare_layer(U, *fc1, True, paths=("sparse",))
    only_csr = prepare_layer(U, *fc1, True, paths=("csr",))
    with pytest.raises(ValueError, match="'gather' is not prepared for this layer .prepared: csr."):
        layer_forward(h[0], only_csr, "gather")


# ----------------------------------------------------------------------------- MACs (paper §3)
def test_mac_ratios_match_paper_section_3_for_deit_b():
    """Low-rank MACs / original = r(1 + 4δ')/(4d) (docs/authors-code.md §6): DeiT-B, p 0.5, r 1365,
    δ 0.25: 0.889 with a sparse kernel, 2.22 with dense V; full rank adds δ·4d²·r once."""
    d, f, r, delta = 768, 3072, 1365, 0.25
    nnz = int(delta * r * f)
    assert macs_lowrank(1, d, r, f, nnz) / macs_dense(1, d, f) == pytest.approx(0.889, abs=5e-4)
    assert macs_lowrank(1, d, r, f) / macs_dense(1, d, f) == pytest.approx(2.22, abs=5e-3)
    assert macs_materialised(197, d, r, f, nnz) == delta * 4 * d**2 * r + 197 * 4 * d**2
    assert macs_materialised(197, d, r, f) == 4 * d**2 * r + 197 * 4 * d**2


@pytest.mark.parametrize("basis_first", [True, False])
def test_path_macs_match_the_shapes_of_the_products(basis_first):
    """Each path's MACs = Σ (rows × inner × cols) of the matrix products it performs, and the
    gather's = the U product plus the size of its gathered [M, A, k] tensor."""
    rng = np.random.default_rng(4)
    d, f, r, m = 12, 40, 10, 3
    U, V = rng.standard_normal((d, r)), rng.standard_normal((r, f))
    axis = 0 if basis_first else 1
    M = constant_fan_in_mask(V, 3 if basis_first else 7, axis)
    lay = prepare_layer(U, V, M, np.zeros(f if basis_first else d), basis_first)
    n_in, n_out = (d, f) if basis_first else (f, d)
    assert path_macs("materialised", m, lay) == d * r * f + m * n_in * n_out
    assert path_macs("lowrank", m, lay) == m * d * r + m * r * f
    t = rng.standard_normal((m, r if basis_first else f))
    gathered = np.take(t, lay.idx, axis=1)
    assert path_macs("gather", m, lay) == m * d * r + gathered.size == path_macs("csr", m, lay)
    assert gathered.size == m * int(M.sum())


def _deit_layer(budget_rank, density, basis_first, csr_blocks=2):
    """A stand-in InferLayer with DeiT-B shapes (no data: the choice only reads shapes)."""
    d, f = 768, 3072
    fan_in = budget_rank if basis_first else f
    n_units = f if basis_first else budget_rank
    k = int(fan_in * density)
    return InferLayer(np.empty((d, budget_rank), np.float32), np.empty(0), None, basis_first,
                      np.empty(0), None, None, (None,) * csr_blocks, n_units, f, n_units * k, n_units * k)


@pytest.mark.parametrize("basis_first", [True, False])
def test_choice_per_batch_size_at_deit_b_shapes(basis_first):
    """With the default cost model: one token takes a sparse low-rank path; 25,216 tokens at a 50%
    budget (R 1365 > D) take the materialised W: fewer MACs than low rank with dense V (1.06 vs
    2.22 of the original), and the sparse paths' 0.89 run far below the GEMM rate."""
    small = _deit_layer(682, 0.25, basis_first)
    assert choose_path(1, small) in ("gather", "csr")
    big = _deit_layer(1365, 0.25, basis_first)
    assert choose_path(25216, big) == "materialised"
    assert path_macs("materialised", 25216, big) < path_macs("lowrank", 25216, big)


def test_choice_follows_the_cost_model():
    """A machine with (nearly) free GEMMs never takes a sparse path; one with free CSR always takes it."""
    lay = _deit_layer(682, 0.25, True)
    for m in (1, 16, 25216):
        assert choose_path(m, lay, CostModel(gemm_macs_per_s=1e30, bytes_per_s=1e30)) in ("materialised", "lowrank")
    free_csr = CostModel(csr_ns_per_entry=0.0, csr_ns_per_entry_token=0.0)
    assert choose_path(25216, lay, free_csr) == "csr"


def test_calibrate_measures_positive_rates_usable_by_the_choice():
    cost = calibrate(repeats=1)
    for name in ("gemm_macs_per_s", "bytes_per_s", "csr_ns_per_entry", "gather_ns_per_mac"):
        value = getattr(cost, name)
        assert np.isfinite(value) and value > 0, name
    assert cost.csr_ns_per_entry_token >= 0
    assert choose_path(1, _deit_layer(682, 0.25, True), cost) in PATHS
