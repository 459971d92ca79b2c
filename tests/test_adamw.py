"""Tests of fips_ref.adamw: torch AdamW semantics, moment masking and the cosine schedule (docs/authors-code.md §4.4, §5.1).

The scalar oracle below is written from the torch.optim.AdamW formula, element by element in
Python floats, independently of the vectorised update.
"""
import math

import numpy as np
import pytest

from fips_ref.adamw import adamw_init, adamw_step, cosine_lr
from fips_ref.backend import to_numpy
from fips_ref.checkpoint import MLPBlock
from fips_ref.local_stage import FiPSConfig, init_factors, run_local_stage
from fips_ref.sharing import build_groups

BETAS, EPS = (0.9, 0.999), 9.999e-9


def _scalar_adamw(p, grads, lr, wd, betas=BETAS, eps=EPS):
    """torch AdamW on one float: p *= 1−lr·wd; m, v moments; bias-corrected step."""
    b1, b2 = betas
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        p *= 1 - lr * wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr / (1 - b1 ** t) * m / (math.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
    return p


def test_constant_gradient_moves_by_lr_sign(xp):
    """No decay, constant g: m̂ = g, v̂ = g², so each step is −lr·g/(|g| + ε)."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 4))
    g[0, 0] = 1e-9                                      # |g| ~ ε: the step is then about lr/2
    p0 = rng.standard_normal((3, 4))
    params, grads = {"w": xp.asarray(p0.copy())}, {"w": xp.asarray(g)}
    state = adamw_init(params)
    lr = 0.01
    for t in range(1, 6):
        adamw_step(params, grads, state, lr, weight_decay=0.0)
        expected = p0 - t * lr * g / (np.abs(g) + EPS)
        assert np.allclose(to_numpy(params["w"]), expected, rtol=1e-12, atol=1e-15), t
    assert state.step == 5


def test_matches_scalar_oracle_with_weight_decay(xp):
    """5 steps, random gradients, weight decay on, float64: identical to the scalar loop."""
    rng = np.random.default_rng(1)
    shapes = {"U": (3, 2), "V": (2, 5), "b": (5,)}
    p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    gs = [{k: rng.standard_normal(s) * 10.0 ** rng.integers(-3, 2) for k, s in shapes.items()}
          for _ in range(5)]
    lrs = [1e-2, 8e-3, 5e-3, 2e-3, 1e-3]
    params = {k: xp.asarray(v.copy()) for k, v in p0.items()}
    state = adamw_init(params)
    for lr, g in zip(lrs, gs):
        adamw_step(params, {k: xp.asarray(v) for k, v in g.items()}, state, lr, weight_decay=0.05)
    for k in shapes:
        got = to_numpy(params[k])
        for idx in np.ndindex(shapes[k]):
            # the oracle with a varying lr: run it step by step
            p, m, v = p0[k][idx], 0.0, 0.0
            for t, (lr, g) in enumerate(zip(lrs, gs), start=1):
                gi = g[k][idx]
                p *= 1 - lr * 0.05
                m = 0.9 * m + 0.1 * gi
                v = 0.999 * v + 0.001 * gi * gi
                p -= lr / (1 - 0.9 ** t) * m / (math.sqrt(v) / math.sqrt(1 - 0.999 ** t) + EPS)
            assert got[idx] == pytest.approx(p, rel=1e-12, abs=1e-15), (k, idx)


def test_scalar_oracle_constant_lr():
    """Same check through the compact oracle, constant lr, different betas/eps."""
    rng = np.random.default_rng(2)
    p0, gs = rng.standard_normal(6), rng.standard_normal((5, 6))
    params = {"w": p0.copy()}
    state = adamw_init(params)
    for g in gs:
        adamw_step(params, {"w": g}, state, 3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    want = [_scalar_adamw(p0[i], gs[:, i], 3e-3, 0.1, (0.8, 0.99), 1e-6) for i in range(6)]
    assert np.allclose(params["w"], want, rtol=1e-12, atol=0)


def test_adamw_init_zero_moments_not_aliasing():
    params = {"a": np.ones((2, 2)), "b": np.arange(3.0)}
    state = adamw_init(params)
    assert state.step == 0
    for k in params:
        assert np.all(state.m[k] == 0) and np.all(state.v[k] == 0)
        assert state.m[k] is not state.v[k] and not np.shares_memory(state.m[k], params[k])


def test_masks_zero_inactive_moments_and_mask_the_gradient(xp):
    """moment_masks zeroes exactly the inactive moments after the update; grad_masks equals
    passing g ⊙ M; keys without a mask are dense (docs/authors-code.md §5.1)."""
    rng = np.random.default_rng(3)
    params = {"V": rng.standard_normal((40, 6)), "b": rng.standard_normal(6)}
    grads = [{k: rng.standard_normal(p.shape) for k, p in params.items()} for _ in range(2)]
    old, new = rng.random((40, 6)) < 0.5, rng.random((40, 6)) < 0.4
    runs = []
    for fused in (True, False):
        p = {k: xp.asarray(v) for k, v in params.items()}
        state = adamw_init(p)
        for g in grads:
            g = {k: xp.asarray(v) for k, v in g.items()}
            if fused:
                adamw_step(p, g, state, 1e-3, grad_masks={"V": xp.asarray(old)},
                           moment_masks={"V": xp.asarray(new)})
            else:
                g["V"] = g["V"] * xp.asarray(old)
                adamw_step(p, g, state, 1e-3)
                state.m["V"] *= xp.asarray(new)
                state.v["V"] *= xp.asarray(new)
        runs.append((p, state))
    (p1, s1), (p2, s2) = runs
    for k in params:
        np.testing.assert_array_equal(to_numpy(p1[k]), to_numpy(p2[k]))
        np.testing.assert_array_equal(to_numpy(s1.m[k]), to_numpy(s2.m[k]))
        np.testing.assert_array_equal(to_numpy(s1.v[k]), to_numpy(s2.v[k]))
    m = to_numpy(s1.m["V"])
    assert np.all(m[~new] == 0) and np.all(m[new & old] != 0)
    assert np.all(to_numpy(s1.m["b"]) != 0)


def _tiny(rng, d=8, n_blocks=2, n=32, tokens=2):
    weights, blocks = {}, []
    for i in range(n_blocks):
        pre = f"blocks.{i}"
        weights[f"{pre}.mlp.fc1.weight"] = rng.standard_normal((4 * d, d)) / d**0.5
        weights[f"{pre}.mlp.fc1.bias"] = 0.1 * rng.standard_normal(4 * d)
        weights[f"{pre}.mlp.fc2.weight"] = rng.standard_normal((d, 4 * d)) / (4 * d)**0.5
        weights[f"{pre}.mlp.fc2.bias"] = 0.1 * rng.standard_normal(d)
        blocks.append(MLPBlock(i, pre, 0, d, 4 * d))
    acts = {i: rng.standard_normal((n, tokens, d)) for i in range(n_blocks)}
    return weights, blocks, acts


@pytest.mark.parametrize("sparsifier", ["static", "gmp"])
def test_inactive_v_entries_decay_under_local_stage(xp, sparsifier):
    """One local-stage step: an inactive stored V entry becomes init × (1 − lr·wd) (docs/authors-code.md §5.1)."""
    weights, blocks, acts = _tiny(np.random.default_rng(4))
    cfg = FiPSConfig(budget=0.3, sparsity=0.75, sparsifier=sparsifier, epochs=1, batch_size=32,
                     lr=1e-2, weight_decay=0.05, gmp_initial=0.5)
    res = run_local_stage(weights, acts, [[0, 1]], cfg, blocks=blocks, xp=xp, dtype=np.float64,
                          errors=False)
    assert res.schedule.total_steps == 1
    plan = build_groups(blocks, [[0, 1]], budget=0.3, sparsity=0.75)
    init = init_factors(weights, plan, xp=np, dtype=np.float64, tau=32.0)
    decay = 1 - cfg.lr * cfg.weight_decay
    n_inactive = 0
    for k, mask in res.masks.items():
        mask, got = to_numpy(mask), to_numpy(res.params[k])
        assert np.allclose(got[~mask], init[k][~mask] * decay, rtol=1e-14, atol=0)
        assert not np.allclose(got[mask], init[k][mask] * decay, rtol=1e-6, atol=0)
        n_inactive += int((~mask).sum())
    assert n_inactive > 0


def test_cosine_lr_closed_form():
    lr, eta_min, T = 1e-3, 1e-6, 600
    assert cosine_lr(0, lr=lr, eta_min=eta_min, t_max=T) == pytest.approx(lr, rel=1e-15)
    assert cosine_lr(T, lr=lr, eta_min=eta_min, t_max=T) == pytest.approx(eta_min, rel=1e-12)
    assert cosine_lr(T // 2, lr=lr, eta_min=eta_min, t_max=T) == pytest.approx((lr + eta_min) / 2,
                                                                               rel=1e-14)
    ks = range(T + 1)
    vals = [cosine_lr(k, lr=lr, eta_min=eta_min, t_max=T) for k in ks]
    assert all(b <= a for a, b in zip(vals, vals[1:]))


def test_cosine_lr_matches_torch_recursion():
    """docs/authors-code.md §4.4: the closed form equals torch's CosineAnnealingLR to ~1e-15."""
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60, eta_min=1e-6)
    for k in range(61):
        assert opt.param_groups[0]["lr"] == pytest.approx(
            cosine_lr(k, lr=1e-3, eta_min=1e-6, t_max=60), rel=1e-12, abs=1e-18), k
        opt.step()
        sched.step()


def test_matches_torch_adamw():
    """Our adamw_step vs torch.optim.AdamW, 5 steps, float64, varying lr, weight decay on."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p0 = {"U": rng.standard_normal((4, 3)), "V": rng.standard_normal((3, 7))}
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.05)
    params = {k: v.copy() for k, v in p0.items()}
    state = adamw_init(params)
    for t in range(5):
        lr = 1e-2 / (t + 1)
        grads = {k: rng.standard_normal(v.shape) for k, v in p0.items()}
        for k, p in tp.items():
            p.grad = torch.tensor(grads[k])
        opt.param_groups[0]["lr"] = lr
        opt.step()
        adamw_step(params, grads, state, lr, betas=BETAS, eps=EPS, weight_decay=0.05)
        for k in p0:
            want = tp[k].detach().numpy()
            assert np.allclose(params[k], want, rtol=1e-12, atol=1e-14), \
                (k, t, float(np.max(np.abs(params[k] - want))))
            assert np.allclose(state.m[k], opt.state[tp[k]]["exp_avg"].numpy(), rtol=1e-12, atol=0)
            assert np.allclose(state.v[k], opt.state[tp[k]]["exp_avg_sq"].numpy(), rtol=1e-12, atol=0)
