"""Tests of fips_ref.sharing: SVD initialisation, the concatenated matrix C, groups (docs/authors-code.md §1, §3).

SVD factors are unique only up to sign, so reconstructions U @ V are compared, plus the
sign-independent structure of the grown part (zero U columns, V rows copied from the top).
"""
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fips_ref.budget import sparse_rank
from fips_ref.checkpoint import InputError, MLPBlock
from fips_ref.sharing import (build_groups, check_groups, concat_group, default_groups,
                              layer_factors, parse_groups, split_v, svd_init)
from model_fixtures import mlp_weights

F64 = dict(rtol=1e-10, atol=1e-10)


def _low_rank(rng, rows, cols, k):
    """A random [rows, cols] matrix of rank exactly min(k, rows, cols) (generic draws)."""
    return rng.standard_normal((rows, k)) @ rng.standard_normal((k, cols))


def _max_err(a, b):
    return float(np.max(np.abs(a - b))) if a.size else 0.0


# ----------------------------------------------------------------------------- svd_init
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 9), cols=st.integers(1, 9),
       k=st.integers(0, 9), extra=st.integers(0, 20), tau=st.sampled_from([32.0, 2.0, 7.5]))
def test_svd_init_reconstructs_when_rank_at_least_rank_of_C(seed, rows, cols, k, extra, tau):
    """U @ V = C whenever R ≥ rank(C), also for R > min(rows, cols) (growth)."""
    rng = np.random.default_rng(seed)
    C = _low_rank(rng, rows, cols, k)
    rank_c = min(k, rows, cols)
    R = max(rank_c, 1) + extra
    U, V = svd_init(C, R, tau=tau)
    assert U.shape == (rows, R) and V.shape == (R, cols)
    scale = max(1.0, float(np.abs(C).max()))
    assert np.allclose(U @ V, C, rtol=0, atol=1e-10 * scale), _max_err(U @ V, C)


@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 7), cols=st.integers(1, 7),
       extra=st.integers(1, 25), tau=st.sampled_from([32.0, 3.0]))
def test_svd_init_growth_structure(seed, rows, cols, extra, tau):
    """Grown U columns are zero; grown V row q+i is row (i mod q) of diag(S)Vh divided by τ once."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((rows, cols))
    q = min(rows, cols)
    R = q + extra
    U, V = svd_init(C, R, tau=tau)
    assert np.all(U[:, q:] == 0)
    S = np.linalg.svd(C, compute_uv=False)
    assert np.allclose(np.linalg.norm(V[:q], axis=1), S, **F64)   # singular values sit in V
    src = np.arange(extra) % q                                        # cycle through rows 0..q-1
    assert np.allclose(V[q:], V[src] / tau, rtol=1e-13, atol=0), _max_err(V[q:], V[src] / tau)
    assert np.allclose(U @ V, C, **F64)


@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(2, 9), cols=st.integers(2, 9),
       data=st.data())
def test_svd_init_truncation_is_best_rank_r(seed, rows, cols, data):
    """R < q: ‖C − U V‖²_F = Σ of the discarded squared singular values (Eckart–Young)."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((rows, cols))
    q = min(rows, cols)
    R = data.draw(st.integers(1, q - 1))
    U, V = svd_init(C, R)
    S = np.linalg.svd(C, compute_uv=False)
    err = float(np.sum((C - U @ V) ** 2))
    assert err == pytest.approx(float(np.sum(S[R:] ** 2)), rel=1e-9, abs=1e-12)
    assert np.allclose(U.T @ U, np.eye(R), **F64)                     # orthonormal basis


@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 9), cols=st.integers(1, 9),
       extra=st.integers(0, 5))
def test_svd_init_canonical_signs(seed, rows, cols, extra):
    """The largest-|.| entry of each (non-grown) U column is positive."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((rows, cols))
    q = min(rows, cols)
    U, V = svd_init(C, q + extra)
    for i in range(q):
        j = int(np.argmax(np.abs(U[:, i])))
        assert U[j, i] > 0, (i, U[:, i])


def test_svd_init_signs_do_not_depend_on_input_sign():
    """Flipping C flips V and leaves U unchanged, since U's signs are canonical."""
    C = np.random.default_rng(1).standard_normal((5, 7))
    U1, V1 = svd_init(C, 5)
    U2, V2 = svd_init(-C, 5)
    assert np.allclose(U1, U2, **F64) and np.allclose(V1, -V2, **F64)


# ----------------------------------------------------------------------------- C and layers
def test_concat_long_order_and_blocks():
    d, F = 3, 12
    weights, blocks = mlp_weights(np.random.default_rng(0), 4, d, F)
    g = build_groups(blocks, [[2, 3], [0, 1]], budget=0.5, sparsity=0.75)[0]
    assert [l.key for l in g.layers] == ["blocks.2.mlp.fc1", "blocks.2.mlp.fc2",
                                         "blocks.3.mlp.fc1", "blocks.3.mlp.fc2"]
    assert [l.block for l in g.layers] == [2, 2, 3, 3]
    assert (g.rows, g.cols) == (d, F)
    C = concat_group(weights, g)
    assert C.shape == (d, 2 * 2 * F)
    expected = [weights["blocks.2.mlp.fc1.weight"].T, weights["blocks.2.mlp.fc2.weight"],
                weights["blocks.3.mlp.fc1.weight"].T, weights["blocks.3.mlp.fc2.weight"]]
    for j, block in enumerate(expected):
        assert np.array_equal(C[:, j * F:(j + 1) * F], block), j


def test_concat_short_order_and_blocks():
    d, F = 3, 12
    weights, blocks = mlp_weights(np.random.default_rng(0), 2, d, F)
    g = build_groups(blocks, [[0, 1]], budget=0.5, sparsity=0.75, strategy="short")[0]
    assert [l.key for l in g.layers] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                                         "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert (g.rows, g.cols) == (F, d)
    C = concat_group(weights, g)
    assert C.shape == (F, 2 * 2 * d)
    expected = [weights["blocks.0.mlp.fc1.weight"], weights["blocks.0.mlp.fc2.weight"].T,
                weights["blocks.1.mlp.fc1.weight"], weights["blocks.1.mlp.fc2.weight"].T]
    for j, block in enumerate(expected):
        assert np.array_equal(C[:, j * d:(j + 1) * d], block), j


@pytest.mark.parametrize("strategy", ["long", "short"])
@pytest.mark.parametrize("extra", [0, 3, 40])
def test_layer_factors_reproduce_math_weights_at_full_rank(strategy, extra):
    """A @ B of every layer = its math weight [in, out]: fc1.weight.T, fc2.weight.T."""
    d, F = 4, 16
    weights, blocks = mlp_weights(np.random.default_rng(3), 3, d, F)
    g = build_groups(blocks, [[0, 1, 2]], budget=0.5, sparsity=0.75, strategy=strategy)[0]
    C = concat_group(weights, g)
    g = replace(g, rank=min(C.shape) + extra)
    U, V = svd_init(C, g.rank)
    Vs = split_v(V, g)
    assert len(Vs) == 6 and all(v.shape == (g.rank, g.cols) for v in Vs)
    assert all(v.flags.c_contiguous for v in Vs)
    for layer, v in zip(g.layers, Vs):
        A, B = layer_factors(U, v, layer)
        W = weights[f"{layer.key}.weight"].T                     # [out, in] -> [in, out]
        assert A.shape == (W.shape[0], g.rank) and B.shape == (g.rank, W.shape[1])
        assert np.allclose(A @ B, W, **F64), (layer.key, _max_err(A @ B, W))


def test_build_groups_ranks_swin_large():
    """docs/authors-code.md §2: Swin-L ranks at p = 0.4 are 245, 491, 1134 ×3, 1966 (groups of the authors)."""
    groups = parse_groups("0-1,2-3,4-9,10-15,16-21,22-23")
    plan = build_groups(_swin_l_blocks(), groups, budget=0.4, sparsity=0.75)
    assert [g.rank for g in plan] == [245, 491, 1134, 1134, 1134, 1966]
    assert [g.rows for g in plan] == [192, 384, 768, 768, 768, 1536]


def test_build_groups_ranks_deit_b():
    blocks = [MLPBlock(i, f"blocks.{i}", 0, 768, 3072) for i in range(12)]
    plan = build_groups(blocks, default_groups(blocks, 4), budget=0.5, sparsity=0.75)
    assert [g.rank for g in plan] == [1365] * 3
    assert [g.blocks for g in plan] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]


def test_build_groups_short_rank_from_its_shape():
    blocks = [MLPBlock(i, f"blocks.{i}", 0, 8, 32) for i in range(2)]
    g = build_groups(blocks, [[0, 1]], budget=0.5, sparsity=0.75, strategy="short")[0]
    r = g.rank                                # C is [32, 32]: 32 r + 0.25·r·32 ≤ 0.5·32·32
    assert 32 * r + 8 * r <= 512 < 32 * (r + 1) + 8 * (r + 1)
    long_ = build_groups(blocks, [[0, 1]], budget=0.5, sparsity=0.75)[0]
    assert long_.rank == sparse_rank(2, 8, 0.5, 0.75)


# ----------------------------------------------------------------------------- groups
def _swin_l_blocks():
    blocks, index = [], 0
    for stage, (depth, d) in enumerate(zip([2, 2, 18, 2], [192, 384, 768, 1536])):
        for j in range(depth):
            blocks.append(MLPBlock(index, f"layers.{stage}.blocks.{j}", stage, d, 4 * d))
            index += 1
    return blocks


def test_default_groups():
    vit = [MLPBlock(i, f"blocks.{i}", 0, 8, 32) for i in range(12)]
    assert default_groups(vit, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert default_groups(vit, 1) == [[i] for i in range(12)]
    swin = _swin_l_blocks()
    assert default_groups(swin, 2) == [[i, i + 1] for i in range(0, 24, 2)]
    check_groups(default_groups(swin, 2), swin)


@pytest.mark.parametrize("size", [4, 6, 5, 0])
def test_default_groups_size_not_dividing_a_stage(size):
    """Swin-L stages hold 2, 2, 18, 2 blocks: sizes other than 1 and 2 fail, naming the flag."""
    with pytest.raises(InputError, match="--group-size"):
        default_groups(_swin_l_blocks(), size)


def test_parse_groups():
    assert parse_groups("0-3,4-7") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert parse_groups("5") == [[5]]
    assert parse_groups(" 0 - 1 , 2 ") == [[0, 1], [2]]


@pytest.mark.parametrize("spec", ["3-1", "a", "0-3,", "1--2", "-1", "0-3;4-7", ""])
def test_parse_groups_rejects(spec):
    with pytest.raises(InputError, match="--groups"):
        parse_groups(spec)


def test_authors_swin_large_grouping_is_expressible_and_valid():
    groups = parse_groups("0-1,2-3,4-9,10-15,16-21,22-23")
    assert groups == [[0, 1], [2, 3], list(range(4, 10)), list(range(10, 16)),
                      list(range(16, 22)), [22, 23]]
    check_groups(groups, _swin_l_blocks())          # no error


@pytest.mark.parametrize("spec, what", [
    ("0-1,2-3,4-9,10-15,16-21,22", "block 23"),        # missing block
    ("0-1,2-3,4-9,9-15,16-21,22-23", "block 9"),       # repeated block
    ("0-2,3,4-9,10-15,16-21,22-23", "mixes"),          # crosses stage 0 -> 1 (192 vs 384)
    ("0-1,2-3,4-9,10-15,16-22,23", "mixes"),           # crosses stage 2 -> 3
    ("0-1,2-3,4-9,10-15,16-21,22-24", "block 24"),     # nonexistent block
])
def test_check_groups_errors(spec, what):
    with pytest.raises(InputError, match="--groups") as e:
        check_groups(parse_groups(spec), _swin_l_blocks())
    assert what in str(e.value)
    assert "\n" not in str(e.value)


def test_check_groups_mixed_widths_same_stage():
    """Two blocks of one stage with different hidden widths cannot share a basis."""
    blocks = [MLPBlock(0, "blocks.0", 0, 8, 32), MLPBlock(1, "blocks.1", 0, 8, 24)]
    with pytest.raises(InputError, match="--groups"):
        check_groups([[0, 1]], blocks)
    check_groups([[0], [1]], blocks)
