"""Tests of fips_ref.local_stage: the whole local stage on tiny models (docs/authors-code.md §4, §5).

Tiny ViT-like MLPs (d = 8, F = 32), weights as timm keys in PyTorch layout, activations of
64 samples × 2 tokens. Expected sparsity histories are recomputed step by step from the
schedule functions and keep_count, not hard-coded.
"""
from dataclasses import replace

import numpy as np
import pytest

from fips_ref.adamw import adamw_init, adamw_step, cosine_lr
from fips_ref.backend import to_numpy
from fips_ref.budget import sparse_rank
from fips_ref.checkpoint import InputError, MLPBlock
from fips_ref.local_stage import (FiPSConfig, Schedule, rigl_gradients, cached_targets, dense_weights,
                                  epoch_batches, gather, init_factors, loss_and_grads,
                                  reference_outputs, relative_errors, resolve_schedule, run_local_stage,
                                  sparsifier_masks, sparsifier_step)
from fips_ref.sharing import build_groups
from fips_ref.sparsity import (cubic_sparsity, initial_masks, keep_count, rigl_drop_fraction,
                               rigl_update)
from model_fixtures import mlp_weights

D, F = 8, 32


def _blocks(n_blocks):
    return [MLPBlock(i, f"blocks.{i}", 0, D, F) for i in range(n_blocks)]


def _random_model(seed, n_blocks=2, n=64, tokens=2):
    """float32 tensors, as checkpoints hold them; most runs compute in float64 (no aliasing)."""
    rng = np.random.default_rng(seed)
    weights, _ = mlp_weights(rng, n_blocks, D, F, scaled=True)
    acts = {i: rng.standard_normal((n, tokens, D)) for i in range(n_blocks)}
    return _f32(weights), _blocks(n_blocks), _f32(acts)


def _f32(d):
    return {k: np.asarray(v, dtype=np.float32) for k, v in d.items()}


def _copy(d):
    return {k: v.copy() for k, v in d.items()}


def _run(weights, acts, groups, cfg, blocks, **kw):
    """run_local_stage on a private copy of the weights, float64 unless told otherwise."""
    kw.setdefault("dtype", np.float64)
    return run_local_stage(_copy(weights), acts, groups, cfg, blocks=blocks, **kw)


def _planted(U0, V0, rng, n=64, tokens=2):
    """Two blocks whose 'long' concatenation C = [fc1_b0ᵀ | fc2_b0 | fc1_b1ᵀ | fc2_b1] is U0 @ V0."""
    C = U0 @ V0                                                   # [D, 4F]
    weights = {}
    for i, b in enumerate(_blocks(2)):
        weights[b.key("mlp.fc1.weight")] = C[:, (2 * i) * F:(2 * i + 1) * F].T.copy()
        weights[b.key("mlp.fc2.weight")] = C[:, (2 * i + 1) * F:(2 * i + 2) * F].copy()
        weights[b.key("mlp.fc1.bias")] = 0.1 * rng.standard_normal(F)
        weights[b.key("mlp.fc2.bias")] = 0.1 * rng.standard_normal(D)
    acts = {i: rng.standard_normal((n, tokens, D)) for i in range(2)}
    return _f32(weights), _blocks(2), _f32(acts)


def _cfg(**kw):
    base = dict(budget=0.25, sparsity=0.75, epochs=15, batch_size=16, lr=1e-3, seed=0)
    return FiPSConfig(**{**base, **kw})


def _v(params):
    return {k: v for k, v in params.items() if k.endswith(".V")}


def _same(a, b):
    return set(a) == set(b) and all(np.array_equal(to_numpy(a[k]), to_numpy(b[k])) for k in a)


# ----------------------------------------------------------------------------- planted structure
def test_planted_dense_is_exact_at_init_and_stays(xp):
    """C = U0 V0 of rank 3, V0 25 % dense; dense sparsifier with SVD rank 3: error ~ 0."""
    rng = np.random.default_rng(0)
    U0 = rng.standard_normal((D, 3))
    V0 = rng.standard_normal((3, 4 * F)) * (rng.random((3, 4 * F)) < 0.25)
    weights, blocks, acts = _planted(U0, V0, rng)
    cfg = _cfg(budget=0.5, sparsifier="dense", lr=1e-5, weight_decay=0.0, epochs=5)
    assert sparse_rank(2, D, 0.5, 0.0) == 3
    res = _run(weights, acts, [[0, 1]], cfg, blocks=blocks, xp=xp, dtype=np.float64)
    assert res.groups[0].rank == 3 and res.masks == {}
    assert max(res.error_init.values()) < 1e-12
    assert max(res.error_final.values()) < 1e-6
    bad = _run(weights, acts, [[0, 1]], replace(cfg, budget=0.3), blocks=blocks, xp=xp,
               batch_order=[])
    assert bad.groups[0].rank == 2 and min(bad.error_init.values()) > 1e-4   # rank < planted


@pytest.mark.parametrize("sparsifier", ["static", "gmp", "rigl"])
def test_planted_sparse_basis_is_found_and_kept(xp, sparsifier):
    """U0 orthonormal [D, 4], V0 rows of disjoint supports (exactly 25 % dense): the SVD init
    recovers V0, magnitude pruning at s = 0.75 finds its support, and training (weight decay
    on) keeps the relative error near 0; the budget gives rank 6 ≥ 4."""
    rng = np.random.default_rng(1)
    U0 = np.linalg.qr(rng.standard_normal((D, 4)))[0]
    owner = rng.permutation(np.arange(4 * F) % 4)                    # one row per column
    V0 = np.zeros((4, 4 * F))
    V0[owner, np.arange(4 * F)] = (owner + 1.0) * rng.choice([-1.0, 1.0], 4 * F) \
        * rng.uniform(0.8, 1.2, 4 * F)
    assert (V0 != 0).mean() == 0.25
    weights, blocks, acts = _planted(U0, V0, rng)
    cfg = _cfg(sparsifier=sparsifier, epochs=8, lr=1e-3)
    res = _run(weights, acts, [[0, 1]], cfg, blocks=blocks, xp=xp, dtype=np.float64)
    assert res.groups[0].rank == 6
    assert max(res.error_final.values()) < 1e-5, res.error_final
    if sparsifier == "static":
        assert max(res.error_init.values()) < 1e-12
    support = V0[::-1] != 0              # SVD rows come largest-norm first: V0 rows 3, 2, 1, 0
    for j, layer in enumerate(res.groups[0].layers):
        mask = to_numpy(res.masks[f"{layer.key}.V"])
        assert np.all(mask[:4][support[:, j * F:(j + 1) * F]]), layer.key   # planted entries kept


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_result_different_seed_different_order():
    weights, blocks, acts = _random_model(2)
    cfg = _cfg(sparsifier="rigl", epochs=5)
    a = _run(weights, acts, [[0, 1]], cfg, blocks=blocks, errors=False, dtype=np.float32)
    b = _run(weights, acts, [[0, 1]], cfg, blocks=blocks, errors=False, dtype=np.float32)
    assert _same(a.params, b.params) and _same(a.masks, b.masks)
    assert a.history == b.history
    c = _run(weights, acts, [[0, 1]], replace(cfg, seed=1), blocks=blocks, errors=False,
             dtype=np.float32)
    assert a.history["loss"] != c.history["loss"]
    order0, order1 = epoch_batches(64, 16, 5, 0), epoch_batches(64, 16, 5, 1)
    assert any(not np.array_equal(x, y) for e0, e1 in zip(order0, order1) for x, y in zip(e0, e1))


def test_epoch_batches():
    """A fresh permutation per epoch; n // bs full batches, the remainder dropped."""
    order = epoch_batches(70, 16, 3, 7)
    assert len(order) == 3 and all(len(e) == 4 for e in order)
    for e in order:
        flat = np.concatenate(e)
        assert len(flat) == 64 and len(set(flat.tolist())) == 64 and flat.max() < 70
    assert not np.array_equal(np.concatenate(order[0]), np.concatenate(order[1]))


def test_explicit_batch_order_replays_bit_identical():
    weights, blocks, acts = _random_model(3)
    cfg = _cfg(sparsifier="gmp", epochs=15)
    a = _run(weights, acts, [[0, 1]], cfg, blocks=blocks)
    order = epoch_batches(64, cfg.batch_size, cfg.epochs, cfg.seed)
    b = _run(weights, acts, [[0, 1]], cfg, blocks=blocks, batch_order=order)
    assert _same(a.params, b.params) and _same(a.masks, b.masks)
    assert a.history == b.history and a.error_final == b.error_final
    rev = [e[::-1] for e in order]                                    # another order differs
    c = _run(weights, acts, [[0, 1]], cfg, blocks=blocks, batch_order=rev)
    assert c.history["loss"] != a.history["loss"]


# ----------------------------------------------------------------------------- step order
def test_static_masks_never_change_and_lr_follows_cosine():
    weights, blocks, acts = _random_model(4, n_blocks=4)
    cfg = _cfg(sparsifier="static", lr=1e-2)
    res = _run(weights, acts, [[0, 1], [2, 3]], cfg, blocks=blocks, errors=False)
    plan = build_groups(blocks, [[0, 1], [2, 3]], budget=cfg.budget, sparsity=cfg.sparsity)
    init = init_factors(weights, plan, xp=np, dtype=np.float64, tau=cfg.tau)
    assert _same(res.masks, initial_masks(_v(init), 0.75))
    assert not np.allclose(res.params["U.0"], init["U.0"])             # it trained
    N = sum(v.size for v in _v(init).values())
    assert res.history["sparsity"] == [1 - keep_count(N, 0.75) / N] * 60
    T = res.schedule.total_steps
    assert res.history["lr"] == [cosine_lr(k, lr=cfg.lr, eta_min=cfg.eta_min, t_max=T)
                                 for k in range(T)]


@pytest.mark.parametrize("variant", ["authors", "paper"])
@pytest.mark.parametrize("glob", [True, False])
def test_gmp_sparsity_history(variant, glob):
    """Masks shrink only on schedule steps, to keep_count(N, s_k); monotone; final = s at t_end."""
    weights, blocks, acts = _random_model(5, n_blocks=4)
    cfg = _cfg(sparsifier="gmp", variant=variant, global_pruning=glob)
    res = _run(weights, acts, [[0, 1], [2, 3]], cfg, blocks=blocks, errors=False)
    sch = res.schedule
    assert (sch.total_steps, sch.t_end, sch.delta_t) == (60, 45, 5)
    sizes = {k: v.size for k, v in _v(res.params).items()}
    sets = [list(sizes)] if glob else [[k] for k in sizes]
    nnz = [keep_count(sum(sizes[k] for k in s), sch.gmp_initial) for s in sets]
    N = sum(sizes.values())
    expected = []
    for k in range(1, 61):
        s_k = cubic_sparsity(k, t_end=45, delta_t=5, t_accel=sch.t_accel, initial=sch.gmp_initial,
                             accelerated=cfg.gmp_accelerated, final=0.75, variant=variant)
        if s_k is not None and s_k != sch.gmp_initial:
            nnz = [min(keep_count(sum(sizes[k] for k in s), s_k), c) for s, c in zip(sets, nnz)]
        expected.append(1 - sum(nnz) / N)
    assert res.history["sparsity"] == pytest.approx(expected, abs=1e-12)
    hist = res.history["sparsity"]
    assert all(b >= a for a, b in zip(hist, hist[1:]))
    s_end = cubic_sparsity(45, t_end=45, delta_t=5, t_accel=sch.t_accel, initial=sch.gmp_initial,
                           accelerated=cfg.gmp_accelerated, final=0.75, variant=variant)
    for s in sets:
        assert sum(int(res.masks[k].sum()) for k in s) == keep_count(sum(sizes[k] for k in s), s_end)
    if variant == "paper":
        assert s_end == 0.75


def test_pruned_entries_only_decay_after_pruning():
    """Moments are masked after every step: an entry pruned at step 30 then only shrinks by
    (1 − lr·wd) per step. GMP with accelerated = final prunes once, at step 30; lr is constant
    (eta_min = lr), so a 30-step run gives the values at the pruning step."""
    weights, blocks, acts = _random_model(15)
    cfg = _cfg(sparsifier="gmp", gmp_initial=0.2, gmp_accelerated=0.6, sparsity=0.6,
               t_accel=30, delta_t=5, t_end_coeff=1.0, lr=1e-2, eta_min=1e-2, epochs=10)
    order = epoch_batches(64, 16, 10, 0)
    short = _run(weights, acts, [[0, 1]], cfg, blocks, batch_order=order[:7] + [order[7][:2]])
    full = _run(weights, acts, [[0, 1]], cfg, blocks, batch_order=order)
    assert short.schedule.total_steps == 30 and full.schedule.total_steps == 40
    hist = full.history["sparsity"]
    assert hist[28] < hist[29] == hist[-1]                        # one pruning event, at step 30
    plan = build_groups(blocks, [[0, 1]], budget=cfg.budget, sparsity=cfg.sparsity)
    before = initial_masks(_v(init_factors(weights, plan, xp=np, dtype=np.float64, tau=cfg.tau)),
                           0.2)
    decay = (1 - cfg.lr * cfg.weight_decay) ** 10
    n_pruned = 0
    for k, m in full.masks.items():
        assert np.array_equal(m, short.masks[k])
        pruned = before[k] & ~m                                    # active until step 30
        n_pruned += int(pruned.sum())
        assert np.allclose(full.params[k][pruned], short.params[k][pruned] * decay,
                           rtol=1e-12, atol=0), k
    assert n_pruned > 0


@pytest.mark.parametrize("glob", [True, False])
def test_rigl_keeps_count_and_updates(glob):
    weights, blocks, acts = _random_model(6, n_blocks=4)
    cfg = _cfg(sparsifier="rigl", rigl_drop_fraction=0.3, lr=1e-2, global_pruning=glob)
    res = _run(weights, acts, [[0, 1], [2, 3]], cfg, blocks=blocks, errors=False)
    sizes = {k: v.size for k, v in _v(res.params).items()}
    N = sum(sizes.values())
    if glob:
        target = 1 - keep_count(N, 0.75) / N
    else:
        target = 1 - sum(keep_count(n, 0.75) for n in sizes.values()) / N
        assert all(int(res.masks[k].sum()) == keep_count(n, 0.75) for k, n in sizes.items())
    assert res.history["sparsity"] == pytest.approx([target] * 60, abs=1e-15)
    plan = build_groups(blocks, [[0, 1], [2, 3]], budget=cfg.budget, sparsity=cfg.sparsity)
    init = init_factors(weights, plan, xp=np, dtype=np.float64, tau=cfg.tau)
    assert not _same(res.masks, initial_masks(_v(init), 0.75, global_pruning=glob))


# ----------------------------------------------------------------------------- RigL gradients
def testrigl_gradients_accumulate_until_first_update():
    cfg = FiPSConfig(sparsifier="rigl")
    sched = Schedule(total_steps=20, t_end=15, t_accel=0, delta_t=3, gmp_initial=0.05)
    masks = {"a.V": np.ones((2, 3), bool)}
    rng = np.random.default_rng(7)
    gs = [{"a.V": rng.standard_normal((2, 3)), "a.bias": rng.standard_normal(3)} for _ in range(5)]
    acc = {}
    out = [rigl_gradients(cfg, sched, k, gs[k - 1], masks, acc) for k in range(1, 6)]
    assert set(out[2]) == {"a.V"}
    assert np.allclose(out[2]["a.V"], gs[0]["a.V"] + gs[1]["a.V"] + gs[2]["a.V"], rtol=1e-15)
    assert np.array_equal(out[3]["a.V"], gs[3]["a.V"]) and np.array_equal(out[4]["a.V"], gs[4]["a.V"])
    assert not np.shares_memory(out[2]["a.V"], gs[0]["a.V"])         # the sum owns its buffer
    assert rigl_gradients(replace(cfg, sparsifier="gmp"), sched, 1, gs[0], masks, {}) is None


def _manual_rigl(weights, blocks, acts, cfg, order, grads_for_update):
    """The local-stage loop written out for one RigL update at step delta_t = len(order)."""
    plan = build_groups(blocks, [[0, 1]], budget=cfg.budget, sparsity=cfg.sparsity)
    params = init_factors(weights, plan, xp=np, dtype=np.float64, tau=cfg.tau)
    masks = initial_masks(_v(params), cfg.sparsity)
    dense = dense_weights(weights, blocks, xp=np, dtype=np.float64)
    state, seen = adamw_init(params), []
    for step, idx in enumerate(order, start=1):
        h = {b: gather(acts[b], idx, xp=np, dtype=np.float64) for b in dense}
        y = {b: reference_outputs(dense, b, h[b]) for b in dense}
        _, grads = loss_and_grads(params, masks, plan, h, y, {b: None for b in dense})
        seen.append({k: grads[k].copy() for k in masks})
        grads = {k: g * masks[k] if k in masks else g for k, g in grads.items()}
        if step == len(order):
            use = {k: sum(s[k] for s in seen) for k in masks} if grads_for_update == "sum" \
                else seen[-1]
            rho = rigl_drop_fraction(step, q=cfg.rigl_drop_fraction, t_end=2 * len(order),
                                     delta_t=len(order))
            masks, _ = rigl_update(_v(params), masks, use, rho, cfg.sparsity)
        adamw_step(params, grads, state, cosine_lr(step - 1, lr=cfg.lr, eta_min=cfg.eta_min,
                                                   t_max=len(order)),
                   eps=cfg.eps, weight_decay=cfg.weight_decay)
        for k, m in masks.items():                              # sparsimony's post-step hook
            state.m[k] *= m
            state.v[k] *= m
    return params, masks


def test_rigl_first_update_uses_gradients_summed_over_delta_t_steps():
    """B5: the update at step Δt grows by Σ_{k ≤ Δt} dense gradients, not the last one's."""
    weights, blocks, acts = _random_model(8)
    cfg = _cfg(sparsifier="rigl", rigl_drop_fraction=0.6, delta_t=3, t_end_coeff=2.0, lr=3e-2)
    order = epoch_batches(64, 16, 1, 0)[0][:3]
    res = _run(weights, acts, [[0, 1]], cfg, blocks=blocks, batch_order=[order],
                          dtype=np.float64, errors=False)
    assert (res.schedule.t_end, res.schedule.delta_t) == (6, 3)
    p_sum, m_sum = _manual_rigl(weights, blocks, acts, cfg, order, "sum")
    _, m_last = _manual_rigl(weights, blocks, acts, cfg, order, "last")
    assert not _same(m_sum, m_last)                   # the two readings are distinguishable
    assert _same(res.masks, m_sum)
    for k in p_sum:
        assert np.allclose(res.params[k], p_sum[k], rtol=1e-12, atol=1e-14), k


@pytest.mark.parametrize("variant", ["authors", "paper"])
def test_sparsifier_step_regrown_weights(variant):
    """paper: grown entries are 0 right after the update; authors (B4): stored values kept."""
    rng = np.random.default_rng(9)
    params = {f"l{i}.V": rng.standard_normal((4, 16)) + 3.0 for i in range(2)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    masks = initial_masks(params, 0.75)
    cfg = FiPSConfig(sparsifier="rigl", variant=variant, rigl_drop_fraction=0.5)
    sched = Schedule(total_steps=100, t_end=100, t_accel=25, delta_t=10, gmp_initial=0.25)
    before = {k: v.copy() for k, v in params.items()}
    rho = rigl_drop_fraction(10, q=0.5, t_end=100, delta_t=10)
    want, grown = rigl_update(before, masks, grads, rho, 0.75)
    assert sum(int(g.sum()) for g in grown.values()) > 0
    new = sparsifier_step(cfg, sched, 10, params, masks, grads)
    assert _same(new, want)
    for k in params:
        if variant == "paper":
            assert np.all(params[k][grown[k]] == 0)
            assert np.array_equal(params[k][~grown[k]], before[k][~grown[k]])
        else:
            assert np.array_equal(params[k], before[k])
    assert sparsifier_step(cfg, sched, 11, params, new, grads) is new     # off the grid


def test_sparsifier_masks_per_kind():
    rng = np.random.default_rng(10)
    V = {"a.V": rng.standard_normal((4, 20))}
    sched = resolve_schedule(FiPSConfig(), 600)
    assert sparsifier_masks(FiPSConfig(sparsifier="dense"), sched, V) == {}
    for kind, s in [("static", 0.75), ("rigl", 0.75), ("gmp", 0.05)]:
        m = sparsifier_masks(FiPSConfig(sparsifier=kind), sched, V)
        assert int(m["a.V"].sum()) == keep_count(80, s), kind


# ----------------------------------------------------------------------------- schedule and budget
def test_resolve_schedule_scaling():
    s = resolve_schedule(FiPSConfig(), 600)
    assert (s.total_steps, s.t_accel, s.delta_t, s.t_end, s.gmp_initial) == (600, 240, 50, 450, 0.05)
    p = resolve_schedule(FiPSConfig(variant="paper"), 600)
    assert (p.t_accel, p.delta_t, p.t_end, p.gmp_initial) == (150, 50, 450, 0.25)
    s = resolve_schedule(FiPSConfig(), 60)
    assert (s.t_accel, s.delta_t, s.t_end) == (24, 5, 45)
    s = resolve_schedule(FiPSConfig(), 80)                   # 80 · 50/600 = 6.67: floored
    assert (s.t_accel, s.delta_t, s.t_end) == (32, 6, 60)
    s = resolve_schedule(FiPSConfig(t_accel=7, delta_t=3, gmp_initial=0.1, t_end_coeff=0.5), 60)
    assert (s.t_accel, s.delta_t, s.t_end, s.gmp_initial) == (7, 3, 30, 0.1)
    assert resolve_schedule(FiPSConfig(), 3).delta_t == 1


def test_dense_sparsifier_keeps_the_budget():
    """B12: the dense baseline's rank uses sparsity 0, so its parameter count stays within p."""
    weights, blocks, acts = _random_model(11)
    cfg = _cfg(sparsifier="dense", budget=0.9, epochs=1)
    res = _run(weights, acts, [[0, 1]], cfg, blocks=blocks, errors=False)
    r = res.groups[0].rank
    assert r == sparse_rank(2, D, 0.9, 0.0) != sparse_rank(2, D, 0.9, 0.75)
    assert res.masks == {}
    params = sum(v.size for k, v in res.params.items() if not k.endswith(".bias"))
    assert params <= 0.9 * 4 * D * F
    static = _run(weights, acts, [[0, 1]], replace(cfg, sparsifier="static"),
                             blocks=blocks, errors=False)
    assert static.groups[0].rank == sparse_rank(2, D, 0.9, 0.75)


def test_loss_decreases():
    weights, blocks, acts = _random_model(12)
    cfg = _cfg(sparsifier="static", budget=0.5, sparsity=0.5, lr=1e-2, epochs=10)
    res = _run(weights, acts, [[0, 1]], cfg, blocks=blocks)
    loss = res.history["loss"]
    assert len(loss) == 40 and all(np.isfinite(loss))
    assert np.mean(loss[-4:]) < 0.75 * np.mean(loss[:4]), (loss[:4], loss[-4:])
    assert all(res.error_final[b] < res.error_init[b] for b in (0, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_run_leaves_inputs_and_reference_alone(dtype):
    """The caller's weights are not modified, and the target stays the original MLP: the
    reported final error equals one recomputed against an untouched copy of the weights.
    (Run in the weights' own dtype, where xp.asarray returns the caller's arrays.)"""
    weights, blocks, acts = _random_model(14)
    weights, acts = ({k: v.astype(dtype) for k, v in d.items()} for d in (weights, acts))
    pristine = _copy(weights)
    cfg = _cfg(sparsifier="static", budget=0.5, sparsity=0.5, lr=1e-2, epochs=3)
    res = run_local_stage(weights, acts, [[0, 1]], cfg, blocks=blocks, dtype=dtype)
    changed = [k for k in weights if not np.array_equal(weights[k], pristine[k])]
    dense = dense_weights(pristine, blocks, xp=np, dtype=dtype)
    again = relative_errors(res.params, res.masks, res.groups, dense, acts, xp=np, dtype=dtype)
    assert changed == []
    assert again == pytest.approx(res.error_final, rel=1e-5)


def test_bad_inputs():
    weights, blocks, acts = _random_model(13)
    with pytest.raises(InputError, match="--sparsifier"):
        run_local_stage(weights, acts, [[0, 1]], _cfg(sparsifier="magic"), blocks=blocks)
    with pytest.raises(InputError, match="block 1"):
        run_local_stage(weights, {0: acts[0]}, [[0, 1]], _cfg(), blocks=blocks)
    with pytest.raises(InputError, match="sample counts"):
        run_local_stage(weights, {0: acts[0], 1: acts[1][:10]}, [[0, 1]], _cfg(), blocks=blocks)


# ----------------------------------------------------------------------------- fast paths
@pytest.mark.parametrize("sparsifier", ["gmp", "rigl"])
def test_cached_targets_give_the_recomputed_run(xp, sparsifier):
    """Targets computed once (default), given explicitly, or recomputed every step: one result."""
    weights, blocks, acts = _random_model(15)
    cfg = _cfg(sparsifier=sparsifier, epochs=6, delta_t=3)
    dense = dense_weights(weights, blocks, xp=xp, dtype=np.float64)
    given = cached_targets(dense, acts, xp=xp, dtype=np.float64)
    runs = [_run(weights, acts, [[0, 1]], cfg, blocks, xp=xp, targets=t)
            for t in ("cache", "recompute", given)]
    assert runs[0].masks and (sparsifier == "rigl" or
                              runs[0].history["sparsity"][-1] > runs[0].history["sparsity"][0])
    for other in runs[1:]:
        assert set(other.masks) == set(runs[0].masks)
        assert all(np.array_equal(to_numpy(other.masks[k]), to_numpy(runs[0].masks[k]))
                   for k in other.masks)
        for k in runs[0].params:
            np.testing.assert_allclose(to_numpy(other.params[k]), to_numpy(runs[0].params[k]),
                                       rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(other.history["loss"], runs[0].history["loss"], rtol=1e-10)


def test_cached_targets_are_the_original_mlp_outputs():
    weights, blocks, acts = _random_model(16, n=70)       # 70: not a multiple of the chunk
    dense = dense_weights(weights, blocks, xp=np, dtype=np.float64)
    got = cached_targets(dense, acts, xp=np, dtype=np.float64, chunk=64)
    for b, a in acts.items():
        want = reference_outputs(dense, b, a.reshape(-1, D).astype(np.float64))
        assert got[b].shape == a.shape
        np.testing.assert_allclose(got[b].reshape(-1, D), want, rtol=1e-12, atol=1e-12)
