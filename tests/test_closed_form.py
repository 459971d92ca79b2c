"""Tests of the closed-form options (fips_ref.stats, fips_ref.closed_form, fips_ref.als; docs/closed-form.md).

Oracles: the gradient of Eq. (1) (it must vanish at a minimiser), a dense Kronecker solve of the
U-step's normal equations built here, sharing.svd_init (identity statistics), moments computed
directly with NumPy, and planted weights U0 @ V0.
"""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from fips_ref.als import als_levels, als_sweep, fill_zero_columns, run_als  # noqa: E402
from fips_ref.backend import to_numpy  # noqa: E402
from fips_ref.closed_form import (LayerTerm, objective, objective_grads, u_step, v_step,  # noqa: E402
                                  whitened_init)
from fips_ref.local_stage import FiPSConfig, dense_weights, run_local_stage  # noqa: E402
from fips_ref.mlp import gelu  # noqa: E402
from fips_ref.sharing import svd_init  # noqa: E402
from fips_ref.sparsity import keep_count, prune_to  # noqa: E402
from fips_ref.stats import block_stats, metric  # noqa: E402
from model_fixtures import mlp_weights  # noqa: E402


def _spd(rng, n, kind):  # None | [n] | [n, n] with a spread of eigenvalues
    if kind == "none":
        return None
    if kind == "diag":
        return rng.uniform(0.1, 3.0, n)
    A = rng.standard_normal((n, n)) * rng.uniform(0.1, 3.0, n)
    return A @ A.T / n + 0.05 * np.eye(n)


def _terms(rng, rows, cols, n_layers, kinds, xp, dtype=np.float64):
    """Random layer terms: each layer has a full metric on one side, like fc1/fc2 in a group."""
    out = []
    for j in range(n_layers):
        P = _spd(rng, rows, kinds[j % len(kinds)])
        Q = _spd(rng, cols, kinds[(j + 1) % len(kinds)])
        cast = lambda a: None if a is None else xp.asarray(a, dtype=dtype)   # noqa: E731
        out.append(LayerTerm(f"l{j}", xp.asarray(rng.standard_normal((rows, cols)), dtype=dtype),
                             cast(P), cast(Q), None))
    return out


def _masks(rng, n_layers, R, cols, density, xp):
    return [xp.asarray(rng.random((R, cols)) < density) for _ in range(n_layers)]


shapes = st.tuples(st.integers(2, 7), st.integers(1, 6), st.integers(2, 7), st.integers(1, 4),
                   st.sampled_from(["none", "diag", "full"]), st.floats(0.2, 1.0), st.integers(0, 2**31))


# ----------------------------------------------------------------------------- exact minimisers
@settings(max_examples=25)
@given(shapes)
def test_u_step_zeroes_the_gradient_of_eq1(xp, case):
    rows, R, cols, n_layers, kind, density, seed = case
    rng = np.random.default_rng(seed)
    terms = _terms(rng, rows, cols, n_layers, [kind, "full"], xp)
    Vs = [xp.asarray(rng.standard_normal((R, cols))) * m
          for m in _masks(rng, n_layers, R, cols, density, xp)]
    U = u_step(xp.asarray(rng.standard_normal((rows, R))), Vs, terms, tol=1e-13, maxiter=10 * rows * R)
    dU, _ = objective_grads(U, Vs, terms)
    scale = float(xp.abs(objective_grads(0 * U, Vs, terms)[0]).max()) + 1e-12   # gradient at U = 0
    assert float(xp.abs(dU).max()) <= 1e-7 * scale


@settings(max_examples=25)
@given(shapes)
def test_v_step_zeroes_the_masked_gradient_of_eq1(xp, case):
    rows, R, cols, _, kind, density, seed = case
    rng = np.random.default_rng(seed)
    term = _terms(rng, rows, cols, 1, [kind, "full"], xp)[0]
    mask = _masks(rng, 1, R, cols, density, xp)[0]
    U = xp.asarray(rng.standard_normal((rows, R)))
    V = v_step(U, xp.asarray(rng.standard_normal((R, cols))), mask, term, tol=1e-13, maxiter=10 * R * cols)
    assert not bool(xp.any(V[~mask] != 0))
    _, (dV,) = objective_grads(U, [V], [term])
    _, (dV0,) = objective_grads(U, [0 * V], [term])
    assert float(xp.abs(dV * mask).max()) <= 1e-7 * (float(xp.abs(dV0).max()) + 1e-12)


def test_u_step_matches_a_kronecker_solve_of_the_normal_equations():
    """Oracle: vec(Σ_l P U M_l) = Σ_l (M_lᵀ ⊗ P_l) vec(U), solved densely."""
    rng = np.random.default_rng(3)
    rows, R, cols = 5, 4, 6
    terms = _terms(rng, rows, cols, 4, ["full", "none", "diag"], np)
    Vs = [rng.standard_normal((R, cols)) * m for m in _masks(rng, 4, R, cols, 0.6, np)]
    full = lambda P, n: np.eye(n) if P is None else (np.diag(P) if P.ndim == 1 else P)   # noqa: E731
    K = sum(np.kron(full(t.P, rows), (V @ full(t.Q, cols) @ V.T).T) for V, t in zip(Vs, terms))
    rhs = sum(full(t.P, rows) @ t.C @ full(t.Q, cols) @ V.T for V, t in zip(Vs, terms))
    U_ref = np.linalg.solve(K, rhs.reshape(-1)).reshape(rows, R)          # row-major vec
    U = u_step(np.zeros((rows, R)), Vs, terms, tol=1e-14, maxiter=500)
    np.testing.assert_allclose(U, U_ref, rtol=1e-8, atol=1e-10)


def test_float32_solves_reach_float32_tolerance(xp):
    rng = np.random.default_rng(5)
    terms = _terms(rng, 6, 9, 4, ["full", "none"], xp, dtype=np.float32)
    Vs = [xp.asarray(rng.standard_normal((5, 9)), dtype=np.float32) for _ in range(4)]
    U = u_step(xp.asarray(rng.standard_normal((6, 5)), dtype=np.float32), Vs, terms, tol=1e-6)
    assert U.dtype == np.float32
    dU, _ = objective_grads(U, Vs, terms)
    dU0, _ = objective_grads(0 * U, Vs, terms)
    assert float(xp.abs(dU).max()) <= 1e-3 * float(xp.abs(dU0).max())


# ----------------------------------------------------------------------------- init
@pytest.mark.parametrize("rank", [3, 8, 20])
def test_whitened_init_is_svd_init_under_identity_statistics(xp, rank):
    rng = np.random.default_rng(rank)
    rows, cols, n = 8, 5, 4
    Cs = [rng.standard_normal((rows, cols)) for _ in range(n)]
    terms = [LayerTerm(f"l{j}", xp.asarray(C), None, None, None) for j, C in enumerate(Cs)]
    U, Vs = whitened_init(terms, rank, tau=32.0)
    U_ref, V_ref = svd_init(np.concatenate(Cs, axis=1), rank, tau=32.0)
    np.testing.assert_allclose(to_numpy(U), U_ref, atol=1e-10)
    np.testing.assert_allclose(np.concatenate([to_numpy(V) for V in Vs], axis=1), V_ref, atol=1e-10)


def test_whitened_init_beats_svd_init_on_eq1_under_anisotropic_statistics():
    rng = np.random.default_rng(0)
    rows, cols, rank = 12, 16, 5
    terms = _terms(rng, rows, cols, 4, ["full", "none"], np)
    U, Vs = whitened_init(terms, rank)
    U0, V0 = svd_init(np.concatenate([t.C for t in terms], axis=1), rank)
    V0s = np.split(V0, 4, axis=1)
    assert objective(U, Vs, terms) < 0.9 * objective(U0, V0s, terms)


# ----------------------------------------------------------------------------- ALS
@settings(max_examples=15)
@given(shapes)
def test_als_sweeps_never_increase_eq1(xp, case):
    rows, R, cols, n_layers, kind, density, seed = case
    rng = np.random.default_rng(seed)
    terms = _terms(rng, rows, cols, n_layers, [kind, "full"], xp)
    keys = [t.key for t in terms]
    masks = dict(zip(keys, _masks(rng, n_layers, R, cols, density, xp)))
    Vs = {k: xp.asarray(rng.standard_normal((R, cols))) * masks[k] for k in keys}
    U = xp.asarray(rng.standard_normal((rows, R)))
    last = float(objective(U, [Vs[k] for k in keys], terms))
    for iters in (1, 3, 50):                               # cut-short solves too
        U = als_sweep(U, Vs, masks, terms, keys, iters)
        now = float(objective(U, [Vs[k] for k in keys], terms))
        assert now <= last * (1 + 1e-10) + 1e-12
        last = now


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_als_recovers_planted_shared_basis_times_sparse_v(seed):
    """C_l = U0 V0_l with V0 sparse, random metrics on both sides: ALS on the planted support, from
    a start 10% off U0, recovers the weights (the factors only up to the model's own symmetries)."""
    rng = np.random.default_rng(seed)
    rows, R, cols, n = 10, 6, 12, 4
    U0 = rng.standard_normal((rows, R))
    masks0 = [rng.random((R, cols)) < 0.5 for _ in range(n)]
    V0 = [rng.standard_normal((R, cols)) * m for m in masks0]
    terms = [LayerTerm(t.key, U0 @ V, t.P, t.Q, None)
             for t, V in zip(_terms(rng, rows, cols, n, ["full", "none"], np), V0)]
    keys = [t.key for t in terms]
    U = U0 + 0.1 * rng.standard_normal(U0.shape)
    Vs, masks = {k: np.zeros((R, cols)) for k in keys}, dict(zip(keys, masks0))
    for _ in range(300):                                  # ALS converges linearly here
        U = als_sweep(U, Vs, masks, terms, keys, 400)
    for k, t in zip(keys, terms):
        np.testing.assert_allclose(U @ Vs[k], t.C, atol=1e-3 * np.abs(t.C).max())


@settings(max_examples=12, deadline=None)
@given(st.integers(4, 6), st.integers(4, 10), st.integers(2, 4), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**31))
def test_als_from_scratch_recovers_planted_weights(rows, cols, n, dtype, seed):
    """C_l = U0 V0_l over an overcomplete basis (R = 4·rows, FiPS's regime R > rows), every column
    of V0 with R/2 non-zeros, random metrics on both sides: from the whitened init (neither the
    planted factors nor their support), ALS pruning to the planted sparsity recovers every weight.

    Tolerance 1e-3: convergence is linear (docs/closed-form.md §5); a failure is 1e-2 or worse.
    rows ≥ 4: with 3 rows and few columns the pruning sometimes starves a column (§5).
    """
    rng = np.random.default_rng(seed)
    R = 4 * rows
    U0 = rng.standard_normal((rows, R))
    V0 = [rng.standard_normal((R, cols)) * (np.argsort(rng.random((R, cols)), axis=0) < R // 2)
          for _ in range(n)]
    terms = [LayerTerm(t.key, (U0 @ V).astype(dtype), t.P, t.Q, None)
             for t, V in zip(_terms(rng, rows, cols, n, ["full", "none"], np, dtype), V0)]
    keys = {0: [t.key for t in terms]}
    U, Vs = whitened_init(terms, R)
    Us, Vd, masks = run_als({0: fill_zero_columns(U, seed)}, dict(zip(keys[0], Vs)), {0: terms}, keys,
                            0.5, rounds=10, sweeps=30, iters=60)
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(n * R * cols, 0.5)
    assert Us[0].dtype == dtype and all(V.dtype == dtype for V in Vd.values())
    for k, t in zip(keys[0], terms):
        assert np.linalg.norm(Us[0] @ Vd[k] - t.C) <= 1e-3 * np.linalg.norm(t.C)


def test_run_als_prunes_to_exactly_the_budget_and_beats_magnitude_pruning():
    rng = np.random.default_rng(4)
    rows, R, cols, n = 10, 12, 16, 4
    terms = _terms(rng, rows, cols, n, ["full", "none"], np)
    keys = {0: [t.key for t in terms]}
    U, Vs = whitened_init(terms, R)
    Vd = dict(zip(keys[0], Vs))
    pruned = prune_to(Vd, {k: np.ones(V.shape, bool) for k, V in Vd.items()}, 0.6)
    before = objective(U, [Vd[k] * pruned[k] for k in keys[0]], terms)
    hist = []
    Us, Vs, masks = run_als({0: U.copy()}, dict(Vd), {0: terms}, keys, 0.6, rounds=4, history=hist)
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(n * R * cols, 0.6)
    assert all(not np.any(Vs[k][~masks[k]]) for k in keys[0])
    assert hist[-1] == pytest.approx(objective(Us[0], [Vs[k] for k in keys[0]], terms))
    assert hist[-1] < 0.5 * before


def test_als_tol_ends_a_round_after_the_first_sweep_that_lowers_eq1_too_little():
    rng = np.random.default_rng(7)
    terms = _terms(rng, 6, 8, 2, ["full", "none"], np)
    keys = {0: [t.key for t in terms]}
    U, Vs = whitened_init(terms, 9)
    run = lambda **kw: run_als({0: U.copy()}, dict(zip(keys[0], Vs)), {0: terms}, keys, 0.5,   # noqa: E731
                               rounds=2, **kw)
    one, capped, three = run(sweeps=1), run(sweeps=5, tol=1.0), run(sweeps=3)
    np.testing.assert_array_equal(capped[0][0], one[0][0])          # tol 1: every round stops at once
    assert not np.array_equal(three[0][0], one[0][0])


@settings(max_examples=25)
@given(st.integers(0, 2**31), st.floats(0.0, 0.95), st.booleans())
def test_prune_by_cost_equals_prune_to(seed, sparsity, global_pruning):
    """Oracle: sparsity.prune_to (exact top-k over the active entries, ties by index)."""
    from fips_ref.als import prune_by_cost
    rng = np.random.default_rng(seed)
    V = {k: np.round(rng.standard_normal((3, 5)), 1) for k in "abc"}         # rounding makes ties
    masks = {k: rng.random((3, 5)) < 0.7 for k in V}
    ref = prune_to(V, masks, sparsity, global_pruning=global_pruning)
    got = prune_by_cost({k: np.abs(v) for k, v in V.items()}, masks, sparsity, global_pruning=global_pruning)
    for k in V:
        np.testing.assert_array_equal(got[k], ref[k])


def test_als_levels_end_exactly_at_the_target():
    levels = als_levels(0.75, 7)
    assert len(levels) == 7 and levels[-1] == 0.75 and all(np.diff(levels) > 0)
    assert als_levels(0.0, 5) == [] and als_levels(0.5, 0) == []


# ----------------------------------------------------------------------------- statistics
def _tiny(seed, n_blocks=2, D=6, F=12, n=10, tokens=3):
    rng = np.random.default_rng(seed)
    w, blocks = mlp_weights(rng, n_blocks, D, F, scaled=True)
    acts = {b.index: (rng.standard_normal((n, tokens, D)) * rng.uniform(0.2, 3, D) + 0.5)
            for b in blocks}
    return {k: v.astype(np.float32) for k, v in w.items()}, blocks, \
        {k: v.astype(np.float32) for k, v in acts.items()}


def test_streamed_moments_equal_direct_ones():
    w, blocks, acts = _tiny(0)
    stats = block_stats(acts, dense_weights(w, blocks, xp=np, dtype=np.float64), xp=np, chunk=3)
    for b in blocks:
        X = acts[b.index].reshape(-1, b.d).astype(np.float64)
        H = gelu(X @ w[b.key("mlp.fc1.weight")].T.astype(np.float64) + w[b.key("mlp.fc1.bias")])
        np.testing.assert_allclose(stats[b.index].x.xx, X.T @ X, rtol=1e-12)
        np.testing.assert_allclose(stats[b.index].h.xx, H.T @ H, rtol=1e-12)
        Xc = X - X.mean(0)
        np.testing.assert_allclose(metric(stats[b.index].x, ridge=0), Xc.T @ Xc / len(X), atol=1e-12)


@pytest.mark.parametrize("solver", ["als", "als+adam"])
@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_local_stage_options_end_at_exactly_the_budget(init, solver):
    w, blocks, acts = _tiny(1, n=16)
    cfg = FiPSConfig(budget=0.6, sparsity=0.6, init=init, solver=solver, epochs=2, batch_size=4,
                     als_rounds=3)
    r = run_local_stage({k: v.copy() for k, v in w.items()}, acts, [[0, 1]], cfg, blocks=blocks,
                        dtype=np.float64)
    n = sum(m.size for m in r.masks.values())
    assert sum(int(m.sum()) for m in r.masks.values()) == keep_count(n, 0.6)
    assert len(r.history["loss"]) == (0 if solver == "als" else 8)
    assert np.mean(list(r.error_final.values())) < 0.5


def test_whitened_init_with_usual_stage_ends_at_exactly_the_budget():
    w, blocks, acts = _tiny(2, n=16)
    cfg = FiPSConfig(budget=0.6, sparsity=0.6, init="whitened", epochs=2, batch_size=4)
    r = run_local_stage(w, acts, [[0, 1]], cfg, blocks=blocks, dtype=np.float32)
    n = sum(m.size for m in r.masks.values())
    assert sum(int(m.sum()) for m in r.masks.values()) == keep_count(n, 0.6)


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("flags", [["--als-sweeps", "3", "--als-tol", "0.01", "--als-iters", "5", "--solver", "als"],
                                   ["--init", "whitened", "--solver", "als+adam"]])
def test_cli_closed_form_options_end_to_end(tmp_path, capsys, flags):
    """A LayerScale ViT compressed with the new flags: written, exact budget, better than init."""
    import json
    from model_fixtures import make_vit_checkpoint
    from fips_ref.checkpoint import load_checkpoint
    from fips_ref.compress import main
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, embed_dim=16, mlp_ratio=4.0, layerscale=True)
    out, rep = tmp_path / "c.npz", tmp_path / "r.json"
    code = main([ckpt.path, "--synthetic-samples", "16", "--group-size", "2", "--out", str(out),
                 "--report", str(rep), "--epochs", "2", "--batch-size", "8", "--quiet",
                 "--sparsity", "0.6", "--als-rounds", "3"] + flags)
    capsys.readouterr()
    assert code == 0 and load_checkpoint(out).tensors
    report = json.loads(rep.read_text())
    assert report["config"]["solver"] == flags[-1]
    if "--als-tol" in flags:
        assert (report["config"]["als_sweeps"], report["config"]["als_tol"], report["config"]["als_iters"]) == (3, 0.01, 5)
    n = sum(1 for _ in report["layer_density"])
    assert n == 4 and 1 - report["params"]["v_density"] == pytest.approx(0.6, abs=1e-3)
    assert all(b["rel_error_final"] < 0.5 for b in report["blocks"])


@pytest.mark.parametrize("flags", [["--solver", "lbfgs"], ["--als-tol", "1.5"], ["--als-iters", "0"]])
def test_cli_rejects_bad_closed_form_flags(tmp_path, capsys, flags):
    from fips_ref.compress import main
    assert main(flags) == 2
    assert flags[0] in capsys.readouterr().err
