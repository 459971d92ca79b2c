"""Alternating least squares on Eq. (1), and the closed-form start of the local stage (docs/closed-form.md §5–7).

Letters: D model width, F hidden width, R rank.

``--init whitened`` replaces the SVD initialisation by closed_form.whitened_init; ``--solver als``
replaces the AdamW steps by ALS sweeps (exact V-steps per layer, exact U-step per group) while a
cubic schedule of global prunes by removal cost reaches exactly the target sparsity;
``--solver als+adam`` runs ALS and then the usual AdamW steps on the MLP output loss with the
ALS masks. Every one of these ends at exactly the requested budget (``exact_budget``).
"""
import numpy as np

from .closed_form import LayerTerm, group_terms, objective, refit_bias, removal_cost, u_step, v_step, whitened_init
from .sharing import layer_factors

ALS_SWEEPS = 1        # most sweeps (V-steps + U-step) per pruning round (docs/closed-form.md §5)
ALS_TOL = 0.0         # stop a round's sweeps once one lowers Eq. (1) by less than this fraction
ALS_ITERS = 10        # CG iterations per solve inside the local stage (warm-started; §5)
INITS = ("svd", "whitened")
SOLVERS = ("adam", "als", "als+adam")


def als_levels(target, rounds):
    """Sparsity after each pruning round: target·(1 − (1 − k/rounds)³), k = 1..rounds; the last is the target."""
    if rounds < 1 or target <= 0:
        return []
    return [target * (1.0 - (1.0 - k / rounds) ** 3) for k in range(1, rounds + 1)]


def als_sweep(U, Vs, masks, terms, keys, iters):  # one group: V-steps then the U-step
    """Exact (to CG tolerance) V-step of every layer, then the group's U-step (docs/closed-form.md §3–4)."""
    for k, t in zip(keys, terms):
        Vs[k] = v_step(U, Vs[k], masks.get(k), t, maxiter=iters)
    return u_step(U, [Vs[k] for k in keys], terms, maxiter=iters)


def run_als(Us, Vs, terms, keys, sparsity, *, rounds, sweeps=ALS_SWEEPS, tol=ALS_TOL, global_pruning=True,
            iters=ALS_ITERS, history=None):
    """ALS with pruning by removal cost (paper Eq. (1); docs/closed-form.md §5).

    Us {g: U [rows, R]}, Vs {layer key: V [R, cols]}, terms/keys {g: [LayerTerm]/[layer key]}.
    Each round prunes, then sweeps at most ``sweeps`` times, fewer once a sweep lowers Eq. (1) by
    less than the fraction ``tol``. Returns (Us, Vs, masks) with masks at exactly
    keep_count(N, sparsity) over all V (global) or per V (uniform). ``history`` (a list)
    receives Eq. (1) after every round. Inputs may be float32 or float64; the solves run in
    float64 (the normal equations square the condition number: in float32 the scale U·a, V/a
    drifts along their near-null directions until it overflows) and the results come back in
    the inputs' dtype.
    """
    xp = _xp(Vs)
    dtype = next(iter(Vs.values())).dtype                 # solves in float64 (docstring), back at the end
    Us = {g: U.astype(np.float64) for g, U in Us.items()}
    Vs = {k: V.astype(np.float64) for k, V in Vs.items()}
    terms = {g: [as_float64(t) for t in ts] for g, ts in terms.items()}
    masks = {k: xp.ones(V.shape, dtype=bool) for k, V in Vs.items()}
    g_of = {k: g for g, ks in keys.items() for k in ks}
    t_of = {k: t for g in keys for k, t in zip(keys[g], terms[g])}
    eq1 = lambda: sum(float(objective(Us[g], [Vs[k] for k in keys[g]], terms[g])) for g in keys)  # noqa: E731
    for s in als_levels(sparsity, rounds) or [None]:
        if s is not None:
            cost = {k: removal_cost(Us[g_of[k]], Vs[k], t_of[k]) for k in Vs}
            masks = prune_by_cost(cost, masks, s, global_pruning=global_pruning)
            Vs = {k: V * masks[k] for k, V in Vs.items()}
        last = eq1() if tol > 0 else None
        for _ in range(sweeps):
            for g in keys:
                Us[g] = als_sweep(Us[g], Vs, masks, terms[g], keys[g], iters)
            if tol > 0:
                now = eq1()
                done, last = last - now < tol * last, now
                if done:
                    break
        if history is not None:
            history.append(last if last is not None else eq1())
    return ({g: U.astype(dtype) for g, U in Us.items()}, {k: V.astype(dtype) for k, V in Vs.items()},
            masks)


def as_float64(t):  # LayerTerm -> LayerTerm in float64
    f = lambda a: None if a is None else a.astype(np.float64)             # noqa: E731
    return LayerTerm(t.key, f(t.C), f(t.P), f(t.Q), f(t.mu_in))


def prune_by_cost(cost, masks, sparsity, *, global_pruning=True):
    """sparsity.prune_to on the active entries only (same result: exact top-k, ties by index).

    Gathering the active costs first avoids the long runs of −inf that make a partition of the
    whole array slow (10× on the demo, where most entries are pruned).
    """
    from .sparsity import keep_count, topk_mask
    xp = _xp(cost)
    out = {}
    for keys in ([list(masks)] if global_pruning else [[k] for k in masks]):
        m = xp.concatenate([masks[k].reshape(-1) for k in keys])                # [N]
        c = xp.concatenate([cost[k].reshape(-1) for k in keys])                 # [N]
        active = xp.flatnonzero(m)
        keep = xp.zeros(m.shape, dtype=bool)
        keep[active] = topk_mask(c[active], min(keep_count(m.size, sparsity), int(active.size)))
        start = 0
        for k in keys:
            out[k] = keep[start:start + masks[k].size].reshape(masks[k].shape)
            start += masks[k].size
    return out


def _xp(arrays):
    from .backend import get_xp
    return get_xp(*arrays.values())


def fill_zero_columns(U, seed):  # [rows, R] -> [rows, R]
    """Give the τ-grown (all-zero) columns of U random directions of the mean column norm (§5).

    ALS needs them non-zero: a zero column has zero removal cost and a zero U-step gradient at
    full density, so it would never be used. Drawn on the host (same seed, same result).
    """
    xp = _xp({0: U})
    norms = xp.sqrt((U * U).sum(axis=0))                                  # [R]
    zero = np.flatnonzero(np.asarray(_host(norms)) == 0)
    if zero.size == 0:
        return U
    rng = np.random.default_rng(seed)
    fill = rng.standard_normal((U.shape[0], zero.size))
    fill *= float(norms.sum()) / max(U.shape[1] - zero.size, 1) / np.linalg.norm(fill, axis=0)
    U = U.copy()
    U[:, xp.asarray(zero)] = xp.asarray(fill, dtype=U.dtype)
    return U


def _host(a):
    from .backend import to_numpy
    return to_numpy(a)


# ----------------------------------------------------------------------------- the local stage's start
def closed_form_start(cfg, sched, plan, weights, acts, blocks, params, masks, order, *, xp, dtype,
                      history=None):
    """(params, masks, order) for the local stage under --init / --solver (docs/closed-form.md §7).

    Statistics come from one streamed pass over ``acts``; solves run in float64 and the result is
    cast to ``dtype``. --solver als leaves no AdamW steps (order becomes []).
    """
    from .local_stage import dense_weights, sparsifier_masks
    from .stats import block_stats
    dense = dense_weights(weights, blocks, xp=xp, dtype=np.float64)
    stats = block_stats(acts, dense, xp=xp)
    gammas = {b: dense[b][4] for b in dense if dense[b][4] is not None}
    Us, Vs, terms, keys = {}, {}, {}, {}
    for g in plan:
        terms[g.index] = group_terms(weights, g, stats, gammas, xp=xp)
        keys[g.index] = [f"{l.key}.V" for l in g.layers]
        if cfg.init == "whitened":
            U, vs = whitened_init(terms[g.index], g.rank, cfg.tau)
        else:
            U = xp.asarray(params[f"U.{g.index}"], dtype=np.float64)
            vs = [xp.asarray(params[k], dtype=np.float64) for k in keys[g.index]]
        Us[g.index] = U
        Vs.update(zip(keys[g.index], vs))
    if cfg.solver == "adam":
        masks = sparsifier_masks(cfg, sched, Vs)
    else:
        target = 0.0 if cfg.sparsifier == "dense" else cfg.sparsity
        Us = {g: fill_zero_columns(U, cfg.seed) for g, U in Us.items()}
        Us, Vs, masks = run_als(Us, Vs, terms, keys, target, rounds=cfg.als_rounds if target else 0,
                                sweeps=cfg.als_sweeps, tol=cfg.als_tol, iters=cfg.als_iters,
                                global_pruning=cfg.global_pruning, history=history)
        masks = masks if cfg.sparsifier != "dense" else {}
        order = [] if cfg.solver == "als" else order
    out = dict(params)
    for g in plan:
        out[f"U.{g.index}"] = xp.asarray(Us[g.index], dtype=dtype)
        for l, t in zip(g.layers, terms[g.index]):
            V = Vs[f"{l.key}.V"]
            out[f"{l.key}.V"] = xp.asarray(V, dtype=dtype)
            A, B = layer_factors(Us[g.index], V * masks[f"{l.key}.V"] if masks else V, l)
            W = xp.asarray(weights[f"{l.key}.weight"], dtype=np.float64).T          # [in, out]
            b = xp.asarray(weights[f"{l.key}.bias"], dtype=np.float64)
            out[f"{l.key}.bias"] = xp.asarray(refit_bias(b, W, A @ B, t.mu_in), dtype=dtype)
    masks = {k: xp.asarray(m) for k, m in masks.items()}
    return out, masks, order


def exact_budget(cfg, params, masks):
    """Masks pruned by |V| to exactly the target sparsity where a schedule stopped short (§7)."""
    if not masks or cfg.sparsifier == "dense":
        return masks
    return prune_by_cost({k: abs(params[k]) for k in masks}, masks, cfg.sparsity,
                         global_pruning=cfg.global_pruning)
