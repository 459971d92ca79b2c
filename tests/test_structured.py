"""Tests of fips_ref.structured: constant fan-in (SET, SRigL with ablation) and N:M + SR-STE (docs/deployment.md §2).

Oracles: a per-unit Python sort by (−|score|, index) for the selections, counts for the invariants.
"""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from fips_ref.backend import to_numpy
from fips_ref.sharing import Group, Layer
from fips_ref.sparsity import keep_count
from fips_ref.structured import (constant_fan_in_mask, fan_in_axes, fan_in_counts, fan_in_k,
                                 nm_groups, nm_mask, nm_sparsity, row_topk, set_update,
                                 srigl_update, srste_grad, unit_view)

shape_st = st.tuples(st.integers(2, 12), st.integers(2, 12))


def _oracle_topk_rows(score, k):  # [U, n] -> [U, n] bool, Python sort per row
    out = np.zeros(score.shape, dtype=bool)
    for u, row in enumerate(score):
        order = sorted(range(row.size), key=lambda i: (-row[i], i))
        out[u, order[:k]] = True
    return out


def _draw(rng, shape, ties):
    """Random weights; with ``ties`` a few distinct values only, so equal scores are common."""
    return rng.integers(-2, 3, shape).astype(np.float64) if ties else rng.standard_normal(shape)


def test_fan_in_axes_follow_layer_orientation():
    """Basis-first layers (fc1 in 'long') read V_j along its rows' axis 0; the others along axis 1."""
    g = Group(0, (0,), 4, 16, 3, (Layer("b.0.fc1", 0, True), Layer("b.0.fc2", 0, False)))
    assert fan_in_axes([g]) == {"b.0.fc1.V": 0, "b.0.fc2.V": 1}


@given(seed=st.integers(0, 2**32 - 1), shape=shape_st, ties=st.booleans(), data=st.data())
def test_row_topk_matches_sorted_oracle(xp, seed, shape, ties, data):
    """row_topk keeps the k largest per row, equal scores to the lower index."""
    score = _draw(np.random.default_rng(seed), shape, ties)
    k = data.draw(st.integers(0, shape[1]))
    got = to_numpy(row_topk(xp.asarray(score), k))
    assert (got == _oracle_topk_rows(score, k)).all()


@given(seed=st.integers(0, 2**32 - 1), shape=shape_st, axis=st.sampled_from([0, 1]),
       ties=st.booleans(), data=st.data())
def test_constant_fan_in_mask_exact_k_per_unit(xp, seed, shape, axis, ties, data):
    """Every unit keeps exactly k entries: its k largest |V| (oracle), in V's own orientation."""
    V = _draw(np.random.default_rng(seed), shape, ties)
    k = data.draw(st.integers(0, unit_view(V, axis).shape[1]))
    m = to_numpy(constant_fan_in_mask(xp.asarray(V), k, axis))
    assert m.shape == V.shape
    assert (fan_in_counts(m, axis) == k).all()
    assert (unit_view(m, axis) == _oracle_topk_rows(np.abs(unit_view(V, axis)), k)).all()


def test_fan_in_k_and_nm_sparsity():
    assert fan_in_k(682, 0.75) == 170 and fan_in_k(3072, 0.75) == 768
    assert fan_in_k(682, 0.75, 3072) == 170 and fan_in_k(3072, 0.75, 682) == 768
    assert nm_sparsity(1, 4) == 0.75 and nm_sparsity(2, 4) == 0.5


# ----------------------------------------------------------------------------- SET
@given(seed=st.integers(0, 2**32 - 1), shape=shape_st, axis=st.sampled_from([0, 1]),
       rho=st.floats(0.0, 1.0), steps=st.integers(1, 4), data=st.data())
def test_set_constant_fan_in_exact_k_after_every_update(xp, seed, shape, axis, rho, steps, data):
    """SET --fan-in constant: exactly k per unit after every update; grown entries were inactive
    after the drop; a unit drops k − int(k(1−ρ)) of its smallest |V|."""
    rng = np.random.default_rng(seed)
    V = xp.asarray(rng.standard_normal(shape))
    k = data.draw(st.integers(1, unit_view(V, axis).shape[1]))
    m = constant_fan_in_mask(V, k, axis)
    for _ in range(steps):
        new, grown = set_update({"a": V}, {"a": m}, rho, 0.0, rng=rng, axes={"a": axis})
        new, grown, old = to_numpy(new["a"]), to_numpy(grown["a"]), to_numpy(m)
        assert (fan_in_counts(new, axis) == k).all()
        kept = new & ~grown
        assert (fan_in_counts(kept, axis) == int(k * (1 - rho))).all()
        assert not (kept & ~old).any()                                  # kept ⊆ old
        absV = np.abs(to_numpy(V))
        for u_kept, u_old, u_v in zip(unit_view(kept, axis), unit_view(old, axis), unit_view(absV, axis)):
            dropped = u_old & ~u_kept
            if dropped.any() and u_kept.any():
                assert u_v[dropped].max() <= u_v[u_kept].min()          # smallest |V| dropped
        m = xp.asarray(new)


@given(seed=st.integers(0, 2**32 - 1), shapes=st.lists(shape_st, min_size=1, max_size=3),
       s=st.floats(0.0, 0.95), rho=st.floats(0.0, 1.0), glob=st.booleans())
def test_set_unstructured_keeps_count(xp, seed, shapes, s, rho, glob):
    """Unstructured SET lands on keep_count(N, s) (global) or per tensor; grown ⊆ new mask."""
    rng = np.random.default_rng(seed)
    V = {f"l{i}.V": xp.asarray(rng.standard_normal(sh)) for i, sh in enumerate(shapes)}
    from fips_ref.sparsity import initial_masks
    m = initial_masks(V, s, global_pruning=glob)
    new, grown = set_update(V, m, rho, s, rng=rng, global_pruning=glob)
    counts = {k: int(to_numpy(v).sum()) for k, v in new.items()}
    if glob:
        assert sum(counts.values()) == keep_count(sum(v.size for v in V.values()), s)
    else:
        assert counts == {k: keep_count(v.size, s) for k, v in V.items()}
    for k in V:
        assert not (to_numpy(grown[k]) & ~to_numpy(new[k])).any()


def test_set_regrowth_is_random_and_seeded():
    """Same seed, same regrowth; another seed, (almost surely) another one."""
    V = {"a": np.random.default_rng(1).standard_normal((40, 50))}
    m = {"a": constant_fan_in_mask(V["a"], 10, 0)}
    run = lambda seed: set_update(V, m, 0.5, 0.0, rng=np.random.default_rng(seed), axes={"a": 0})[0]["a"]
    assert (run(3) == run(3)).all() and (run(3) != run(4)).any()


def test_set_constant_fan_in_refuses_global():
    V = {"a": np.ones((4, 4))}
    with pytest.raises(ValueError, match="global"):
        set_update(V, {"a": V["a"] > 0}, 0.1, 0.5, rng=np.random.default_rng(0), axes={"a": 0},
                   global_pruning=True)


# ----------------------------------------------------------------------------- SRigL
@given(seed=st.integers(0, 2**32 - 1), shape=shape_st, axis=st.sampled_from([0, 1]),
       s=st.floats(0.0, 0.95), rho=st.floats(0.0, 1.0), gamma=st.sampled_from([None, 0.3, 0.9]),
       steps=st.integers(1, 4))
def test_srigl_constant_fan_in_and_count_after_every_update(xp, seed, shape, axis, s, rho, gamma, steps):
    """After every SRigL update: each live unit has exactly k' = min(fan_in, keep_count(N, s) //
    live units) entries, ablated units none, so nnz ∈ (target − live, target]; without ablation
    the non-zero count never changes; ablated units stay ablated; grown ⊆ new ∖ kept."""
    rng = np.random.default_rng(seed)
    V = xp.asarray(rng.standard_normal(shape))
    n_units, fan_in = unit_view(V, axis).shape
    k = fan_in_k(fan_in, s, n_units)
    assume(k >= 1)
    m = constant_fan_in_mask(V, k, axis)
    target = keep_count(V.size, s)
    dead = np.zeros(n_units, dtype=bool)
    for _ in range(steps):
        G = xp.asarray(rng.standard_normal(shape))
        nnz_before = int(to_numpy(m).sum())
        m, grown, ablated = srigl_update(V, m, G, rho, s, axis=axis, gamma_sal=gamma)
        m, grown, ablated = to_numpy(m), to_numpy(grown), to_numpy(ablated)
        live = int((~ablated).sum())
        assert live >= 1
        k_new = min(fan_in, target // live)
        assert (fan_in_counts(m, axis)[~ablated] == k_new).all()
        assert (fan_in_counts(m, axis)[ablated] == 0).all()
        assert (ablated | ~dead).all() and not (dead & ~ablated).any()   # ablation is permanent
        assert target - live < int(m.sum()) <= target
        if gamma is None:
            assert int(m.sum()) == nnz_before
        assert not (grown & ~m).any()
        dead = ablated
        m = xp.asarray(m)


def test_srigl_ablates_unsalient_units_and_keeps_nnz():
    """Units with tiny weights and zero gradient are ablated (γ_sal 0.3); the others' fan-in grows
    from 2 to 3 so the layer keeps its 12 non-zeros (6 units · 2 → 4 units · 3)."""
    V = np.array([1.5, 1e-6, 2.0, 2.5, 1e-6, 3.0])[:, None] * np.ones(8)   # [units, fan_in], axis 1
    G = np.zeros((6, 8))
    G[[0, 2, 3, 5], 6:] = 1.0
    # K = 6: the largest active |V| are units 5, 3, 2, the largest |grad| units 0, 2, 3 (ties to
    # the lower index): units 1 and 4 have no salient entry, 0 < 0.3·2
    m = constant_fan_in_mask(V, 2, 1)
    s = 1 - 12 / 48
    new, grown, ablated = srigl_update(V, m, G, 0.5, s, axis=1, gamma_sal=0.3)
    assert ablated.tolist() == [False, True, False, False, True, False]
    assert fan_in_counts(new, 1).tolist() == [3, 0, 3, 3, 0, 3]
    assert int(new.sum()) == 12


def test_srigl_ablation_never_exceeds_fan_in():
    """If every unit were unsalient, only as many go as leave k' ≤ fan_in (here 2 of 4 must stay)."""
    V, G = np.full((4, 4), 1e-9), np.zeros((4, 4))
    m = constant_fan_in_mask(V, 2, 1)
    V = V + np.arange(16).reshape(4, 4) * 1e-12                      # break ties: unit 3 largest
    new, _, ablated = srigl_update(V, m, G, 0.9, 0.5, axis=1, gamma_sal=10.0)
    assert int((~ablated).sum()) == 2 and int(new.sum()) == 8
    assert (fan_in_counts(new, 1)[~ablated] == 4).all()


def test_srigl_grows_by_dense_gradient_within_unit():
    """Drop the smallest |V| layer-wide, regrow inside that unit the largest |grad| (just dropped included)."""
    V = np.array([[4.0, 3.0, 0.1, 0.0], [5.0, 6.0, 0.0, 0.0]])         # units = rows (axis 1)
    m = np.array([[True, False, True, False], [True, True, False, False]])
    G = np.array([[0.0, 1.0, 0.0, 5.0], [0.0, 0.0, 9.0, 0.0]])
    new, grown, abl = srigl_update(V, m, G, 0.25, 0.5, axis=1, gamma_sal=None)
    # nnz 4, drop ρ·nnz = 1: the 0.1 entry; unit 0 grows its largest |grad| among inactive: col 3
    assert new.tolist() == [[True, False, False, True], [True, True, False, False]]
    assert grown.tolist() == [[False, False, False, True], [False] * 4]


# ----------------------------------------------------------------------------- N:M
@given(seed=st.integers(0, 2**32 - 1), units=st.integers(1, 8), groups=st.integers(1, 5),
       nm=st.sampled_from([(1, 4), (2, 4), (1, 2), (3, 8)]), axis=st.sampled_from([0, 1]),
       ties=st.booleans())
def test_nm_mask_every_group_keeps_n_largest(xp, seed, units, groups, nm, axis, ties):
    """Exactly N per group of M consecutive fan-in entries, the N largest |V| (oracle)."""
    n, m = nm
    fan_in = groups * m
    shape = (fan_in, units) if axis == 0 else (units, fan_in)
    V = _draw(np.random.default_rng(seed), shape, ties)
    mask = to_numpy(nm_mask(xp.asarray(V), n, m, axis))
    g = nm_groups(mask, m, axis)
    assert (g.sum(axis=2) == n).all()
    want = _oracle_topk_rows(np.abs(nm_groups(V, m, axis)).reshape(-1, m), n)
    assert (g.reshape(-1, m) == want).all()
    assert mask.sum() == round(V.size * (1 - nm_sparsity(n, m)))


def test_nm_refuses_fan_in_not_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of M = 4"):
        nm_mask(np.ones((682, 8)), 1, 4, 0)                           # DeiT-B rank 682 at p = 0.25


def test_srste_grad_closed_form():
    """SR-STE: active entries get the dense gradient; pruned ones the gradient plus 2e-4·w."""
    V = np.array([[1.0, -2.0], [3.0, 4.0]], dtype=np.float32)
    mask = np.array([[True, False], [False, True]])
    g = np.array([[0.5, 0.5], [0.5, 0.5]], dtype=np.float32)
    out = srste_grad(g, V, mask)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.5, 0.5 - 4e-4], [0.5 + 6e-4, 0.5]], rtol=1e-6)


def test_srste_decays_pruned_weights_toward_zero():
    """With zero task gradient, SGD on the SR-STE gradient shrinks only the pruned weights."""
    rng = np.random.default_rng(0)
    V = rng.standard_normal((8, 16))
    mask = nm_mask(V, 2, 4, 1)
    V1 = V - 100.0 * srste_grad(np.zeros_like(V), V, mask)
    assert (V1[mask] == V[mask]).all()
    assert (np.abs(V1[~mask]) < np.abs(V[~mask])).all()
