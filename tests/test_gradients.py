"""Random-direction VJP checks of every hand-written backward (float64).

For f with backward b: ⟨v, (f(x + εu) − f(x − εu)) / 2ε⟩ ≈ ⟨b(v), u⟩ for random u, v.
Directions are drawn jointly over all inputs, and also per input so a wrong gradient of one
argument cannot hide behind another's.
"""
from dataclasses import replace

import numpy as np
import pytest

from fips_ref.backend import to_numpy
from fips_ref.checkpoint import MLPBlock
from fips_ref.local_stage import block_loss_and_grads, loss_and_grads
from fips_ref.mlp import (gelu, gelu_with_grad, lowrank_backward, lowrank_forward,
                          lowrank_mlp_backward, lowrank_mlp_forward)
from fips_ref.sharing import build_groups

EPS, RTOL = 1e-6, 1e-6


def _dot(a, b):
    return float(np.sum(to_numpy(a) * to_numpy(b)))


def _fd(f, xs, us, eps=EPS):
    """Central difference of f along direction us (a list, None = not perturbed)."""
    plus = f([x if u is None else x + eps * u for x, u in zip(xs, us)])
    minus = f([x if u is None else x - eps * u for x, u in zip(xs, us)])
    return (plus - minus) / (2 * eps)


def _check(lhs, rhs, rtol=RTOL):
    assert abs(lhs - rhs) <= rtol * max(abs(lhs), abs(rhs), 1e-8), (lhs, rhs, abs(lhs - rhs))


def _directions(rng, xs, xp, which=None):
    """Random directions for the inputs in ``which`` (all if None), None elsewhere."""
    return [xp.asarray(rng.standard_normal(x.shape)) if which is None or i in which else None
            for i, x in enumerate(xs)]


# ----------------------------------------------------------------------------- GELU
def test_gelu_backward(xp):
    """The derivative gelu_with_grad keeps for the backward is the derivative of gelu."""
    rng = np.random.default_rng(0)
    z = xp.asarray(rng.standard_normal((7, 5)) * 3)
    v, u = xp.asarray(rng.standard_normal((7, 5))), xp.asarray(rng.standard_normal((7, 5)))
    lhs = _dot(v, _fd(lambda a: gelu(a[0]), [z], [u]))
    a, g = gelu_with_grad(z)
    _check(lhs, _dot(v * g, u))
    np.testing.assert_array_equal(to_numpy(a), to_numpy(gelu(z)))


def test_gelu_values():
    """Exact erf GELU: gelu(0) = 0, gelu(1) = Φ(1), gelu(−∞) → 0, gelu'(0) = ½."""
    assert gelu(np.array([0.0]))[0] == 0.0
    assert gelu(np.array([1.0]))[0] == pytest.approx(0.8413447460685429, rel=1e-14)
    assert gelu(np.array([-40.0]))[0] == pytest.approx(0.0, abs=1e-300)
    assert gelu_with_grad(np.array([[0.0]]))[1][0, 0] == pytest.approx(0.5, rel=1e-15)


# ----------------------------------------------------------------------------- low-rank linear
def _lowrank_inputs(rng, xp, m=6, n_in=5, r=3, n_out=4):
    return [xp.asarray(rng.standard_normal(s)) for s in ((m, n_in), (n_in, r), (r, n_out), (n_out,))]


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("which", [None, {0}, {1}, {2}, {3}])
def test_lowrank_backward(xp, factored, which):
    rng = np.random.default_rng(1)
    xs = _lowrank_inputs(rng, xp)
    v = xp.asarray(rng.standard_normal((6, 4)))
    us = _directions(rng, xs, xp, which)
    f = lambda a: lowrank_forward(*a, factored=factored)[0]
    _, cache = lowrank_forward(*xs, factored=factored)
    assert (cache.t is not None) == factored and (cache.W is not None) != factored
    grads = lowrank_backward(v, cache, xs[1], xs[2])          # (dx, dA, dB, db)
    rhs = sum(_dot(g, u) for g, u in zip(grads, us) if u is not None)
    _check(_dot(v, _fd(f, xs, us)), rhs)


def test_lowrank_backward_need_dx_false(xp):
    rng = np.random.default_rng(2)
    xs = _lowrank_inputs(rng, xp)
    v = xp.asarray(rng.standard_normal((6, 4)))
    for factored in (True, False):
        _, cache = lowrank_forward(*xs, factored=factored)
        full = lowrank_backward(v, cache, xs[1], xs[2])
        part = lowrank_backward(v, cache, xs[1], xs[2], need_dx=False)
        assert part[0] is None
        assert all(np.array_equal(to_numpy(a), to_numpy(b)) for a, b in zip(full[1:], part[1:]))


@pytest.mark.parametrize("shape", [(6, 5, 3, 4), (1, 9, 2, 7), (40, 4, 8, 16), (3, 16, 20, 4)])
def test_factored_equals_materialised(xp, shape):
    """Both associations give the same forward and the same backward (incl. rank > width)."""
    rng = np.random.default_rng(3)
    xs = _lowrank_inputs(rng, xp, *shape)
    v = xp.asarray(rng.standard_normal((shape[0], shape[3])))
    y1, c1 = lowrank_forward(*xs, factored=True)
    y2, c2 = lowrank_forward(*xs, factored=False)
    assert np.allclose(to_numpy(y1), to_numpy(y2), rtol=1e-12, atol=1e-12), \
        float(np.max(np.abs(to_numpy(y1 - y2))))
    for g1, g2 in zip(lowrank_backward(v, c1, xs[1], xs[2]), lowrank_backward(v, c2, xs[1], xs[2])):
        assert np.allclose(to_numpy(g1), to_numpy(g2), rtol=1e-12, atol=1e-12), \
            float(np.max(np.abs(to_numpy(g1 - g2))))
    y0, _ = lowrank_forward(*xs)                               # automatic choice: same values
    assert np.allclose(to_numpy(y0), to_numpy(y1), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- MLP
def _mlp_inputs(rng, xp, m=6, d=4, F=10, r=3):
    x = xp.asarray(rng.standard_normal((m, d)))
    fc1 = [xp.asarray(rng.standard_normal(s)) for s in ((d, r), (r, F), (F,))]
    fc2 = [xp.asarray(rng.standard_normal(s) / 2) for s in ((F, r), (r, d), (d,))]
    return x, fc1, fc2


@pytest.mark.parametrize("factored", [True, False, None])
@pytest.mark.parametrize("which", [None, {0}, {1}, {2}, {3}, {4}, {5}])
def test_lowrank_mlp_backward(xp, factored, which):
    rng = np.random.default_rng(4)
    x, fc1, fc2 = _mlp_inputs(rng, xp)
    v = xp.asarray(rng.standard_normal((6, 4)))
    xs = fc1 + fc2
    us = _directions(rng, xs, xp, which)
    f = lambda a: lowrank_mlp_forward(x, a[:3], a[3:], factored=factored)[0]
    _, cache = lowrank_mlp_forward(x, fc1, fc2, factored=factored)
    g1, g2 = lowrank_mlp_backward(v, cache, fc1, fc2)
    rhs = sum(_dot(g, u) for g, u in zip(list(g1) + list(g2), us) if u is not None)
    _check(_dot(v, _fd(f, xs, us)), rhs)


@pytest.mark.parametrize("layerscale", [False, True])
@pytest.mark.parametrize("which", [None, {0}, {1}, {2}, {3}, {4}, {5}])
def test_block_loss_and_grads(xp, layerscale, which):
    """Scalar loss mean((γ ⊙ (mlp_c(h) − y_ref))²): directional derivative = ⟨grads, u⟩."""
    rng = np.random.default_rng(5)
    h, fc1, fc2 = _mlp_inputs(rng, xp)
    y_ref = xp.asarray(rng.standard_normal((6, 4)))
    gamma = xp.asarray(rng.standard_normal(4)) if layerscale else None
    xs = fc1 + fc2
    us = _directions(rng, xs, xp, which)
    f = lambda a: float(block_loss_and_grads(h, y_ref, gamma, a[:3], a[3:])[0])
    loss, (g1, g2) = block_loss_and_grads(h, y_ref, gamma, fc1, fc2)
    y = lowrank_mlp_forward(h, fc1, fc2)[0]
    e = to_numpy(y - y_ref) * (1.0 if gamma is None else to_numpy(gamma))
    assert float(loss) == pytest.approx(float(np.mean(e ** 2)), rel=1e-13)
    rhs = sum(_dot(g, u) for g, u in zip(list(g1) + list(g2), us) if u is not None)
    _check(_fd(f, xs, us), rhs)


# ----------------------------------------------------------------------------- the local-stage loss
def _group_problem(rng, xp, strategy, d=4, F=16, rank=3, m=5, layerscale=True):
    blocks = [MLPBlock(i, f"blocks.{i}", 0, d, F) for i in range(2)]
    g = build_groups(blocks, [[0, 1]], budget=0.5, sparsity=0.5, strategy=strategy)[0]
    g = replace(g, rank=rank)
    params = {f"U.{g.index}": rng.standard_normal((g.rows, rank))}
    masks = {}
    for layer in g.layers:
        params[f"{layer.key}.V"] = rng.standard_normal((rank, g.cols))
        masks[f"{layer.key}.V"] = rng.random((rank, g.cols)) < 0.5
        n_out = F if layer.key.endswith("fc1") else d
        params[f"{layer.key}.bias"] = rng.standard_normal(n_out)
    inputs = {b: rng.standard_normal((m, d)) for b in (0, 1)}
    targets = {b: rng.standard_normal((m, d)) for b in (0, 1)}
    gammas = {0: rng.standard_normal(d) if layerscale else None, 1: None}
    put = lambda dct: {k: None if v is None else xp.asarray(v) for k, v in dct.items()}
    return [g], put(params), put(masks), put(inputs), put(targets), put(gammas)


@pytest.mark.parametrize("strategy", ["long", "short"])
@pytest.mark.parametrize("part", ["all", "U", "V", "bias"])
def test_loss_and_grads_stored_params(xp, strategy, part):
    """Through the masks: the gradient of the stored V is dV ⊙ M; U and biases as they are."""
    rng = np.random.default_rng(6)
    groups, params, masks, inputs, targets, gammas = _group_problem(rng, xp, strategy)
    kind = lambda k: "U" if k.startswith("U.") else k.rsplit(".", 1)[1]
    keys = [k for k in params if part in ("all", kind(k))]
    assert keys
    names = list(params)
    us = {k: xp.asarray(rng.standard_normal(params[k].shape)) if k in keys else None for k in names}
    f = lambda a: float(loss_and_grads(dict(zip(names, a)), masks, groups, inputs, targets,
                                       gammas)[0])
    loss, grads = loss_and_grads(params, masks, groups, inputs, targets, gammas)
    assert set(grads) == set(params)
    assert all(grads[k].shape == params[k].shape for k in params)
    rhs = sum(_dot(grads[k] * masks[k] if k in masks else grads[k], us[k]) for k in keys)
    _check(_fd(f, [params[k] for k in names], [us[k] for k in names]), rhs)


@pytest.mark.parametrize("strategy", ["long", "short"])
def test_loss_and_grads_v_is_dense_gradient_of_effective_v(xp, strategy):
    """dV is w.r.t. the effective V ⊙ M: a direction on masked entries gives the dense gradient."""
    rng = np.random.default_rng(7)
    groups, params, masks, inputs, targets, gammas = _group_problem(rng, xp, strategy)
    vkeys = [k for k in params if k.endswith(".V")]
    eff = {k: params[k] * masks[k] if k in masks else params[k] for k in params}
    us = {k: xp.asarray(rng.standard_normal(params[k].shape) * ~to_numpy(masks[k])) for k in vkeys}
    f = lambda a: float(loss_and_grads({**eff, **dict(zip(vkeys, a))}, {}, groups, inputs,
                                       targets, gammas)[0])
    _, grads = loss_and_grads(params, masks, groups, inputs, targets, gammas)
    rhs = sum(_dot(grads[k], us[k]) for k in vkeys)
    assert abs(rhs) > 1e-6                     # masked entries really carry gradient
    _check(_fd(f, [eff[k] for k in vkeys], [us[k] for k in vkeys]), rhs)
    loss_m, _ = loss_and_grads(params, masks, groups, inputs, targets, gammas)
    loss_e, _ = loss_and_grads(eff, {}, groups, inputs, targets, gammas)
    assert float(loss_m) == pytest.approx(float(loss_e), rel=1e-14)


def test_loss_is_sum_over_blocks(xp):
    """Σ_b: the total equals the sum of the blocks' losses computed one at a time."""
    rng = np.random.default_rng(8)
    groups, params, masks, inputs, targets, gammas = _group_problem(rng, xp, "long")
    total, _ = loss_and_grads(params, masks, groups, inputs, targets, gammas)
    parts = [float(loss_and_grads(params, masks, [replace(groups[0], blocks=(b,))],
                                  inputs, targets, gammas)[0]) for b in (0, 1)]
    assert float(total) == pytest.approx(sum(parts), rel=1e-13)
    assert min(parts) > 0


@pytest.mark.parametrize("strategy", ["long", "short"])
@pytest.mark.parametrize("m", [5, 400])          # factored and materialised products
def test_factor_gradients_are_contiguous_like_the_parameters(xp, strategy, m):
    """matmul_like: dU and every dV are C-contiguous like U and V, so the masked AdamW update
    never walks a transposed view (fc2's factors are the transposed views Vᵀ, Uᵀ)."""
    rng = np.random.default_rng(9)
    groups, params, masks, inputs, targets, gammas = _group_problem(rng, xp, strategy, m=m)
    _, grads = loss_and_grads(params, masks, groups, inputs, targets, gammas)
    assert all(grads[k].flags.c_contiguous for k in params), \
        [k for k in params if not grads[k].flags.c_contiguous]
