"""Tests of fips_ref.budget: the authors' rank formula, budget accounting and storage bits.

Published numbers are the tables of docs/authors-code.md §2 and §6 (s = 0.75); everything else is a
property checked in exact rational arithmetic (Fraction of the float inputs).
"""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fips_ref.budget import (original_bits, rank_for_shape, sparse_rank, storage_bits,
                             storage_ratio)
from fips_ref.checkpoint import Checkpoint, MLPBlock
from fips_ref.codec import encode
from fips_ref.local_stage import FiPSConfig, run_local_stage

BUDGETS = (0.10, 0.25, 0.40, 0.50, 0.75)
DEIT_RANKS = (273, 682, 1092, 1365, 2048)                  # docs/authors-code.md §2, n = 4, d = 768
DEIT_ACHIEVED = (0.09998, 0.24976, 0.3999, 0.49988, 0.75)   # (U + int(δ·V)) / orig, as printed
SWIN_GROUPS = ((192, 2), (384, 2), (768, 6), (768, 6), (768, 6), (1536, 2))   # (d, n)
SWIN_RANKS = {                                               # docs/authors-code.md §2, per (d, n)
    (192, 2): (61, 153, 245, 307, 460),
    (384, 2): (122, 307, 491, 614, 921),
    (768, 6): (283, 708, 1134, 1417, 2126),
    (1536, 2): (491, 1228, 1966, 2457, 3686),
}
STORAGE = {"deit": (0.1222, 0.3053, 0.4888, 0.6110, 0.9167),   # docs/authors-code.md §6 at s = 0.75
           "swin": (0.1219, 0.3049, 0.4882, 0.6101, 0.9153)}
DEIT_GROUPS = ((768, 4),) * 3


# ----------------------------------------------------------------------------- published ranks
@pytest.mark.parametrize("p, rank", list(zip(BUDGETS, DEIT_RANKS)))
def test_sparse_rank_deit_table(p, rank):
    assert sparse_rank(4, 768, p, 0.75) == rank


@pytest.mark.parametrize("dn", sorted(SWIN_RANKS))
def test_sparse_rank_swin_table(dn):
    d, n = dn
    assert [sparse_rank(n, d, p, 0.75) for p in BUDGETS] == list(SWIN_RANKS[dn])


def test_original_mlp_weight_counts():
    """docs/authors-code.md §2: DeiT-B 56,623,104 and Swin-L 125,632,512 MLP weights (d·D per group)."""
    assert sum(d * 8 * n * d for d, n in DEIT_GROUPS) == 56_623_104
    assert sum(d * 8 * n * d for d, n in SWIN_GROUPS) == 125_632_512


@pytest.mark.parametrize("p", BUDGETS)
def test_round_to_rounds_down_to_multiple(p):
    plain = sparse_rank(4, 768, p, 0.75)
    rounded = sparse_rank(4, 768, p, 0.75, round_to=64)
    assert rounded % 64 == 0
    assert plain - 64 < rounded <= plain
    assert rounded == 64 * (plain // 64)


def test_round_to_example():
    """1365 (DeiT-B, p = 0.5) -> 1344; 2048 is already a multiple of 64."""
    assert sparse_rank(4, 768, 0.5, 0.75, round_to=64) == 1344
    assert sparse_rank(4, 768, 0.75, 0.75, round_to=64) == 2048


# ----------------------------------------------------------------------------- largest rank property
def _is_largest_within(r, rows, cols, p, s):
    """rows·r + δ·r·cols ≤ p·rows·cols (1e-9 relative slack) and r + 1 violates it."""
    cap = Fraction(p) * rows * cols
    unit = rows + (1 - Fraction(s)) * cols
    return r >= 0 and unit * r <= cap * (1 + Fraction(1, 10**9)) \
        and unit * (r + 1) > cap * (1 - Fraction(1, 10**9))


budgets = st.floats(0.001, 1.0, allow_nan=False)
sparsities = st.floats(0.0, 0.99, allow_nan=False)


@given(n=st.integers(1, 12), d=st.integers(1, 2048), p=budgets, s=sparsities)
def test_sparse_rank_is_largest_within_budget(n, d, p, s):
    """sparse_rank is the largest r with d·r + δ·r·D ≤ p·d·D, D = 8·n·d."""
    r = sparse_rank(n, d, p, s)
    assert isinstance(r, int)
    assert _is_largest_within(r, d, 8 * n * d, p, s), r


@given(n=st.integers(1, 12), d=st.integers(1, 512), p=budgets, s=sparsities,
       ratio=st.sampled_from([2, 3, 4]))
def test_sparse_rank_mlp_ratio_generalises(n, d, p, s, ratio):
    """With hidden width F = ratio·d the concatenation is [d, 2n·ratio·d]."""
    r = sparse_rank(n, d, p, s, mlp_ratio=ratio)
    assert _is_largest_within(r, d, 2 * n * ratio * d, p, s), r


@given(rows=st.integers(1, 4096), cols=st.integers(1, 40000), p=budgets, s=sparsities)
def test_rank_for_shape_is_largest_within_budget(rows, cols, p, s):
    r = rank_for_shape(rows, cols, p, s)
    assert isinstance(r, int)
    assert _is_largest_within(r, rows, cols, p, s), r


@given(n=st.integers(1, 12), d=st.integers(1, 2048), p=budgets, s=sparsities)
def test_rank_for_shape_agrees_with_sparse_rank(n, d, p, s):
    """The generic formula and the authors' one differ at most by float rounding (one unit)."""
    assert abs(rank_for_shape(d, 8 * n * d, p, s) - sparse_rank(n, d, p, s)) <= 1


# ----------------------------------------------------------------------------- achieved budget
@pytest.mark.parametrize("r, printed", list(zip(DEIT_RANKS, DEIT_ACHIEVED)))
def test_achieved_budget_deit_table(r, printed):
    d, D = 768, 8 * 4 * 768
    achieved = (d * r + int(0.25 * r * D)) / (d * D)
    assert round(achieved, 5) == pytest.approx(printed, abs=1e-12), achieved


# ----------------------------------------------------------------------------- storage
@given(d=st.integers(1, 1024), n=st.integers(1, 8), r=st.integers(1, 4096),
       eighths=st.integers(0, 8))
def test_storage_ratio_closed_form_equals_bits(d, n, r, eighths):
    """At nnz = δ·r·D exactly and p the achieved budget, p + r/(16d) = bits / original bits."""
    D = 8 * n * d
    delta = Fraction(eighths, 8)
    nnz = delta * r * D
    assert nnz.denominator == 1
    p = (d * r + nnz) / (d * D)                      # budget met with equality
    ratio = Fraction(storage_bits(d, r, D, int(nnz))) / original_bits(d, D)
    assert storage_ratio(float(p), r, d) == pytest.approx(float(ratio), rel=1e-12)
    assert ratio == p + Fraction(r, 16 * d)          # and exactly, in rationals


def _model_storage_ratio(groups, p, s=0.75):
    bits = orig = 0
    for d, n in groups:
        r, D = sparse_rank(n, d, p, s), 8 * n * d
        bits += storage_bits(d, r, D, int((1 - s) * r * D))
        orig += original_bits(d, D)
    return bits / orig


@pytest.mark.parametrize("model, groups", [("deit", DEIT_GROUPS), ("swin", SWIN_GROUPS)])
def test_storage_ratio_tables(model, groups):
    got = [round(_model_storage_ratio(groups, p), 4) for p in BUDGETS]
    assert got == pytest.approx(STORAGE[model], abs=1e-12), got


@pytest.mark.parametrize("p, printed", list(zip(BUDGETS, STORAGE["deit"])))
def test_storage_ratio_formula_deit(p, printed):
    """The closed form at the achieved budget gives the same table (one group shape)."""
    d, D = 768, 8 * 4 * 768
    r = sparse_rank(4, d, p, 0.75)
    achieved = (d * r + 0.25 * r * D) / (d * D)
    assert round(storage_ratio(achieved, r, d), 4) == pytest.approx(printed, abs=1e-12)


# ----------------------------------------------------------------------------- bits actually written
def _tiny(rng, d=8, n_blocks=2, n_samples=32, tokens=2):
    weights, blocks = {}, []
    F = 4 * d
    for i in range(n_blocks):
        pre = f"blocks.{i}"
        weights[f"{pre}.mlp.fc1.weight"] = (rng.standard_normal((F, d)) / d**0.5).astype(np.float32)
        weights[f"{pre}.mlp.fc1.bias"] = (0.1 * rng.standard_normal(F)).astype(np.float32)
        weights[f"{pre}.mlp.fc2.weight"] = (rng.standard_normal((d, F)) / F**0.5).astype(np.float32)
        weights[f"{pre}.mlp.fc2.bias"] = (0.1 * rng.standard_normal(d)).astype(np.float32)
        blocks.append(MLPBlock(i, pre, 0, d, F))
    acts = {i: rng.standard_normal((n_samples, tokens, d)).astype(np.float32)
            for i in range(n_blocks)}
    return weights, blocks, acts


@pytest.mark.parametrize("sparsifier, strategy", [("static", "long"), ("gmp", "long"),
                                                  ("dense", "long"), ("static", "short")])
@pytest.mark.parametrize("dtype, value_bits", [(np.float16, 16), (np.float32, 32)])
def test_storage_bits_equal_bits_written(sparsifier, strategy, dtype, value_bits):
    """Σ_groups storage_bits(rows, R, 2n·cols, nnz) = 8 × bytes of the fips.* arrays encoded."""
    rng = np.random.default_rng(0)
    weights, blocks, acts = _tiny(rng, n_blocks=4)
    cfg = FiPSConfig(budget=0.4, sparsity=0.6, sparsifier=sparsifier, strategy=strategy,
                     epochs=1, batch_size=16, lr=1e-3)
    result = run_local_stage(weights, acts, [[0, 1], [2, 3]], cfg, blocks=blocks, errors=False)
    ckpt = Checkpoint(path="<tiny>", config={"arch": "vit", "depth": 4}, tensors=weights)
    arrays, _ = encode(ckpt, result, {}, storage_dtype=dtype)
    expected = 0
    for g in result.groups:
        D = len(g.layers) * g.cols
        assert (g.rank * D) % 8 == 0                  # no padding bits in the packed mask
        nnz = sum(int(np.asarray(result.masks[f"{l.key}.V"]).sum()) if result.masks
                  else g.rank * g.cols for l in g.layers)
        expected += storage_bits(g.rows, g.rank, D, nnz, value_bits=value_bits)
    written = 8 * sum(a.nbytes for k, a in arrays.items() if k.startswith("fips."))
    assert written == expected
    assert len(result.groups) == 2 and sum(k.startswith("fips.") for k in arrays) == 6
