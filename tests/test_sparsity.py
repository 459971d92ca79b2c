"""Tests of fips_ref.sparsity: schedules, exact top-k masks, magnitude pruning and RigL (docs/authors-code.md §5).

Top-k semantics are checked against an independent oracle: a stable sort by (−score, index),
i.e. the k largest scores, ties to the lower (flat, concatenated) index.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fips_ref.backend import to_numpy
from fips_ref.sparsity import (cubic_sparsity, density, initial_masks, keep_count, prune_to,
                               rigl_drop_fraction, rigl_update, topk_mask)


# ----------------------------------------------------------------------------- GMP schedule
GMP_CONFIGS = [  # docs/authors-code.md §5.3: (t_accel, t_end, initial, accel, final, sparsity at t_end)
    (240, 450, 0.05, 0.5, 0.75, 0.7121),     # swin_large yaml
    (150, 900, 0.05, 0.5, 0.75, 0.7488),     # swin_base yaml
    (150, 450, 0.25, 0.5, 0.75, 0.7407),     # paper A.2.2 reading
    (240, 450, 0.05, 0.30, 0.50, 0.4697),    # deit yaml fields, 600 steps
]
PAPER_READING = {150: 0.5, 200: 0.5744, 250: 0.6324, 300: 0.6759, 350: 0.7071, 400: 0.7281,
                 450: 0.7407}


def _cubic(step, t_accel, t_end, initial, accel, final, delta_t=50, variant="authors"):
    return cubic_sparsity(step, t_end=t_end, delta_t=delta_t, t_accel=t_accel, initial=initial,
                          accelerated=accel, final=final, variant=variant)


@pytest.mark.parametrize("t_accel, t_end, initial, accel, final, at_end", GMP_CONFIGS)
def test_cubic_sparsity_at_t_end(t_accel, t_end, initial, accel, final, at_end):
    assert round(_cubic(t_end, t_accel, t_end, initial, accel, final), 4) == \
        pytest.approx(at_end, abs=1e-12)
    assert _cubic(t_end, t_accel, t_end, initial, accel, final) < final      # B3: never reached


def test_cubic_sparsity_paper_reading_table():
    got = {k: round(_cubic(k, 150, 450, 0.25, 0.5, 0.75), 4) for k in PAPER_READING}
    assert got == pytest.approx(PAPER_READING, abs=1e-12)


def test_cubic_sparsity_before_accel_off_grid_and_after_end():
    args = (240, 450, 0.05, 0.5, 0.75)
    assert _cubic(0, *args) == 0.05
    assert _cubic(200, *args) == 0.05
    assert _cubic(250, *args) > 0.5                      # first grid step ≥ t_accel jumps past accel
    assert _cubic(240, 240, 450, 0.05, 0.5, 0.75, delta_t=40) == 0.5
    for k in (1, 49, 151, 449, 451, 500, 900):
        assert _cubic(k, *args) is None, k


@pytest.mark.parametrize("t_accel, t_end, initial, accel, final, at_end", GMP_CONFIGS)
def test_cubic_sparsity_paper_variant_reaches_final(t_accel, t_end, initial, accel, final, at_end):
    assert _cubic(t_end, t_accel, t_end, initial, accel, final, variant="paper") == final


@given(t_end=st.integers(2, 1000), frac=st.floats(0.0, 0.999), delta_t=st.integers(1, 60),
       lvl=st.lists(st.floats(0.0, 0.99), min_size=3, max_size=3),
       variant=st.sampled_from(["authors", "paper"]))
def test_cubic_sparsity_monotone_on_grid(t_end, frac, delta_t, lvl, variant):
    """Non-decreasing over the delta_t grid 0..t_end, within [initial, final]."""
    t_accel = min(int(frac * t_end), t_end - 1)
    initial, accel, final = sorted(lvl)
    vals = [_cubic(k, t_accel, t_end, initial, accel, final, delta_t, variant)
            for k in range(0, t_end + 1, delta_t)]
    assert None not in vals
    assert all(b >= a - 1e-15 for a, b in zip(vals, vals[1:])), vals
    assert all(initial - 1e-15 <= v <= final + 1e-15 for v in vals), vals
    if variant == "paper" and t_end % delta_t == 0:
        assert vals[-1] == pytest.approx(final, abs=1e-15)


# ----------------------------------------------------------------------------- RigL schedule
RIGL_TABLE = {50: 0.09698, 100: 0.0883, 150: 0.075, 200: 0.05868, 250: 0.04132, 300: 0.025,
              350: 0.0117, 400: 0.00302, 450: 0.0}   # docs/authors-code.md §5.5, q = 0.1, t_end = 450


def test_rigl_drop_fraction_table():
    """The published ρ_k, printed to 5 decimal places."""
    got = {k: round(rigl_drop_fraction(k, q=0.1, t_end=450, delta_t=50), 5) for k in RIGL_TABLE}
    assert got == pytest.approx(RIGL_TABLE, abs=1e-12)


def test_rigl_drop_fraction_off_grid():
    for k in (1, 49, 51, 449, 451, 500):
        assert rigl_drop_fraction(k, q=0.1, t_end=450, delta_t=50) is None, k
    assert rigl_drop_fraction(0, q=0.1, t_end=450, delta_t=50) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- top-k
def _oracle_topk(score, k):
    """k largest, ties to the lower index: the first k of a stable sort by −score."""
    order = np.lexsort((np.arange(score.size), -score))
    out = np.zeros(score.size, dtype=bool)
    out[order[:k]] = True
    return out


@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=60), data=st.data())
def test_topk_mask_exact_count_and_ties(xp, values, data):
    """Exactly k kept; equals the oracle even with many ties."""
    score = np.array(values, dtype=np.float64)
    k = data.draw(st.integers(0, score.size))
    mask = to_numpy(topk_mask(xp.asarray(score), k))
    assert mask.dtype == bool and mask.shape == score.shape
    assert int(mask.sum()) == k
    assert np.array_equal(mask, _oracle_topk(score, k)), (score, k, mask)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), data=st.data())
def test_topk_mask_keeps_largest(xp, seed, n, data):
    score = np.random.default_rng(seed).standard_normal(n)
    k = data.draw(st.integers(0, n))
    mask = to_numpy(topk_mask(xp.asarray(score), k))
    assert int(mask.sum()) == k
    if 0 < k < n:
        assert score[mask].min() > score[~mask].max()


def test_topk_mask_ties_to_lower_index(xp):
    mask = to_numpy(topk_mask(xp.asarray(np.array([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])), 2))
    assert mask.tolist() == [False, True, True, False, False, False]
    mask = to_numpy(topk_mask(xp.asarray(np.array([-np.inf, 5.0, -np.inf, -np.inf])), 3))
    assert mask.tolist() == [True, True, True, False]


# ----------------------------------------------------------------------------- magnitude pruning
def _random_v(rng, shapes, ties=False):
    if ties:
        return {f"l{i}.V": rng.integers(-3, 4, size=s).astype(np.float64) for i, s in enumerate(shapes)}
    return {f"l{i}.V": rng.standard_normal(s) for i, s in enumerate(shapes)}


def _cat(d):
    return np.concatenate([to_numpy(a).ravel() for a in d.values()])


shapes_st = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 12)), min_size=1, max_size=4)


@given(seed=st.integers(0, 2**32 - 1), shapes=shapes_st, s=st.floats(0.0, 1.0),
       ties=st.booleans())
def test_initial_masks_global_exact_count_and_oracle(xp, seed, shapes, s, ties):
    """Global: keep_count(N, s) largest |V| over the concatenation, ties to the lower flat index."""
    V = _random_v(np.random.default_rng(seed), shapes, ties)
    masks = initial_masks({k: xp.asarray(v) for k, v in V.items()}, s, global_pruning=True)
    assert list(masks) == list(V)
    flat = _cat(masks)
    assert int(flat.sum()) == keep_count(flat.size, s)
    assert np.array_equal(flat, _oracle_topk(np.abs(_cat(V)), keep_count(flat.size, s)))
    for k in V:
        assert masks[k].shape == V[k].shape and masks[k].dtype == bool


@given(seed=st.integers(0, 2**32 - 1), shapes=shapes_st, s=st.floats(0.0, 1.0),
       ties=st.booleans())
def test_initial_masks_uniform_per_tensor(xp, seed, shapes, s, ties):
    V = _random_v(np.random.default_rng(seed), shapes, ties)
    masks = initial_masks({k: xp.asarray(v) for k, v in V.items()}, s, global_pruning=False)
    for k, v in V.items():
        m = to_numpy(masks[k]).ravel()
        assert int(m.sum()) == keep_count(v.size, s)
        assert np.array_equal(m, _oracle_topk(np.abs(v).ravel(), keep_count(v.size, s)))


@given(seed=st.integers(0, 2**32 - 1), shapes=shapes_st,
       s=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), glob=st.booleans())
def test_prune_to_monotone_never_revives(xp, seed, shapes, s, glob):
    """Pruning only drops active entries: successive masks are nested; counts exact."""
    rng = np.random.default_rng(seed)
    V = {k: xp.asarray(v) for k, v in _random_v(rng, shapes).items()}
    masks = initial_masks(V, s[0], global_pruning=glob)
    # make the big inactive entries the largest: they must still stay inactive
    V = {k: xp.where(m, v, 100.0 + xp.abs(v)) for (k, v), m in zip(V.items(), masks.values())}
    for target in s[1:]:
        new = prune_to(V, masks, target, global_pruning=glob)
        for k in masks:
            assert not np.any(to_numpy(new[k]) & ~to_numpy(masks[k])), "revived an entry"
        sets = [list(masks)] if glob else [[k] for k in masks]
        for keys in sets:
            n = sum(masks[k].size for k in keys)
            nnz_old = sum(int(masks[k].sum()) for k in keys)
            assert sum(int(new[k].sum()) for k in keys) == min(keep_count(n, target), nnz_old)
        masks = new


def test_global_vs_uniform_differ(xp):
    """Small-magnitude tensor a, large b: global at s = 0.5 keeps all of b, uniform half of each."""
    V = {"a.V": xp.asarray(np.full((2, 4), 0.1) + np.arange(8).reshape(2, 4) * 1e-3),
         "b.V": xp.asarray(np.full((2, 4), 5.0) + np.arange(8).reshape(2, 4))}
    glob = initial_masks(V, 0.5, global_pruning=True)
    unif = initial_masks(V, 0.5, global_pruning=False)
    assert int(glob["a.V"].sum()) == 0 and int(glob["b.V"].sum()) == 8
    assert int(unif["a.V"].sum()) == 4 and int(unif["b.V"].sum()) == 4
    assert to_numpy(unif["a.V"]).ravel().tolist() == [False] * 4 + [True] * 4
    assert density(glob) == density(unif) == 0.5


def test_density():
    masks = {"a": np.array([True, False]), "b": np.array([[True, True], [False, False]])}
    assert density(masks) == pytest.approx(0.5)
    assert density({}) == 1.0


# ----------------------------------------------------------------------------- RigL
def _check_rigl(V, old, grads, new, grown, rho, s, glob):
    """The RigL invariants of one update, checked on the host per selection set."""
    sets = [list(old)] if glob else [[k] for k in old]
    for keys in sets:
        v = np.abs(np.concatenate([V[k].ravel() for k in keys]))
        g = np.abs(np.concatenate([grads[k].ravel() for k in keys]))
        o = np.concatenate([old[k].ravel() for k in keys])
        nw = np.concatenate([to_numpy(new[k]).ravel() for k in keys])
        gr = np.concatenate([to_numpy(grown[k]).ravel() for k in keys])
        n, nnz = o.size, int(o.sum())
        keep = nw & ~gr
        assert not np.any(keep & ~o), "kept an inactive entry"
        s_cur = 1.0 - nnz / n
        target = round(rho * (1.0 - s_cur) + s_cur, 6)
        n_keep = min(int(n * (1.0 - target)), nnz)
        assert int(keep.sum()) == n_keep
        if n_keep <= keep_count(n, s):
            assert int(nw.sum()) == keep_count(n, s)
        else:   # masks denser than s and a drop too small to reach s: nothing is grown
            assert not gr.any() and int(nw.sum()) == n_keep
        dropped = o & ~keep
        if keep.any() and dropped.any():             # dropped = the smallest |w| of the active
            assert v[keep].min() >= v[dropped].max()
        assert not np.any(gr & keep), "drop and grow overlap"
        assert np.array_equal(nw, keep | gr)
        rest = ~keep & ~gr
        if gr.any() and rest.any():                  # grown = largest |grad| of the not kept
            assert g[gr].min() >= g[rest].max()


@given(seed=st.integers(0, 2**32 - 1), shapes=shapes_st, s=st.floats(0.0, 0.95),
       s0=st.floats(0.0, 0.95), rho=st.floats(0.0, 0.5), glob=st.booleans())
def test_rigl_update_invariants(xp, seed, shapes, s, s0, rho, glob):
    """Active count = keep_count(N, s) after the update; drop smallest |w|; grow largest |g|.

    Starting masks are drawn at any sparsity s0; when s0 < s and the drop does not reach s,
    the update grows nothing (checked in _check_rigl)."""
    rng = np.random.default_rng(seed)
    V = _random_v(rng, shapes)
    grads = {k: rng.standard_normal(v.shape) for k, v in V.items()}
    old = {k: to_numpy(m) for k, m in
           initial_masks({k: xp.asarray(v) for k, v in V.items()}, s0, global_pruning=glob).items()}
    new, grown = rigl_update({k: xp.asarray(v) for k, v in V.items()},
                             {k: xp.asarray(m) for k, m in old.items()},
                             {k: xp.asarray(g) for k, g in grads.items()}, rho, s,
                             global_pruning=glob)
    _check_rigl(V, old, grads, new, grown, rho, s, glob)


def test_rigl_regrows_just_dropped_entry():
    """A dropped entry with the largest gradient is grown back (drop ranks it among the inactive)."""
    V = {"a.V": np.array([[1.0, 2.0, 3.0, 4.0, 0.5, 0.6, 0.7, 0.8]])}
    old = {"a.V": np.array([[True] * 4 + [False] * 4])}
    grads = {"a.V": np.array([[9.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0]])}
    new, grown = rigl_update(V, old, grads, 0.5, 0.5)
    # target = 0.5·0.5 + 0.5 = 0.75 -> keep 2 (3.0, 4.0); grow 2: entry 0 (grad 9) and 5 (grad 2)
    assert new["a.V"].ravel().tolist() == [True, False, True, True, False, True, False, False]
    assert grown["a.V"].ravel().tolist() == [True] + [False] * 4 + [True, False, False]


def test_rigl_rounding_of_target():
    """target = round(ρ(1−s_cur)+s_cur, 6): here the unrounded value would keep one entry fewer."""
    n, nnz, rho = 1000, 300, None
    for cand in np.linspace(0.001, 0.5, 500):          # find a case where rounding matters
        raw = cand * (1 - (1 - nnz / n)) + (1 - nnz / n)
        if int(n * (1 - raw)) != int(n * (1 - round(raw, 6))):
            rho = float(cand)
            break
    assert rho is not None
    raw = rho * (nnz / n) + (1 - nnz / n)
    rng = np.random.default_rng(0)
    V = {"a.V": rng.standard_normal((10, 100))}
    old = {"a.V": np.zeros(n, dtype=bool)}
    old["a.V"][rng.permutation(n)[:nnz]] = True
    old["a.V"] = old["a.V"].reshape(10, 100)
    grads = {"a.V": rng.standard_normal((10, 100))}
    new, grown = rigl_update(V, old, grads, rho, 0.7)
    kept = int((new["a.V"] & ~grown["a.V"]).sum())
    assert kept == int(n * (1 - round(raw, 6))) != int(n * (1 - raw))
    assert int(new["a.V"].sum()) == 300


@pytest.mark.parametrize("glob", [True, False])
def test_rigl_lands_on_target_from_denser_masks(xp, glob):
    """Masks denser than s (a GMP checkpoint at 0.74, docs/authors-code.md §7): one update lands exactly on s."""
    rng = np.random.default_rng(5)
    V = _random_v(rng, [(8, 32), (8, 32), (6, 20)])
    grads = {k: rng.standard_normal(v.shape) for k, v in V.items()}
    old = {k: to_numpy(m) for k, m in initial_masks(V, 0.74, global_pruning=glob).items()}
    assert density(old) > 0.25
    new, grown = rigl_update({k: xp.asarray(v) for k, v in V.items()},
                             {k: xp.asarray(m) for k, m in old.items()},
                             {k: xp.asarray(g) for k, g in grads.items()}, 0.05, 0.75,
                             global_pruning=glob)
    _check_rigl(V, old, grads, new, grown, 0.05, 0.75, glob)
    if glob:
        assert sum(int(m.sum()) for m in new.values()) == keep_count(8 * 32 * 2 + 120, 0.75)
    else:
        assert [int(m.sum()) for m in new.values()] == [keep_count(256, 0.75)] * 2 + \
            [keep_count(120, 0.75)]


def test_rigl_zero_drop_fraction_is_identity_at_target():
    rng = np.random.default_rng(2)
    V = _random_v(rng, [(4, 16), (4, 16)])
    masks = initial_masks(V, 0.75)
    grads = {k: rng.standard_normal(v.shape) for k, v in V.items()}
    new, grown = rigl_update(V, masks, grads, 0.0, 0.75)
    assert all(np.array_equal(new[k], masks[k]) for k in masks)
    assert not any(g.any() for g in grown.values())
    assert math.isclose(density(new), 0.25)


def test_topk_mask_keeps_exactly_k_with_nan_scores():
    """A NaN score (a diverged weight) ranks below every number, and exactly k are still kept."""
    score = np.array([1.0, np.nan, 3.0, 2.0, 0.5, np.nan])
    for k in range(7):
        m = topk_mask(score, k)
        assert int(m.sum()) == k
    assert topk_mask(score, 3).tolist() == [True, False, True, True, False, False]
    assert topk_mask(score, 5).tolist() == [True, True, True, True, True, False]   # NaN ties: lower index


def test_paper_cubic_with_t_accel_at_t_end_gives_final():
    assert cubic_sparsity(6, t_end=6, delta_t=1, t_accel=6, initial=0.25, accelerated=0.5,
                          final=0.75, variant="paper") == 0.75
