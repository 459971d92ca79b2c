"""The sparsifiers as the local stage calls them: their schedule, prepare() and step() (paper §3
"Sparsity", docs/authors-code.md §5).

``resolve_schedule`` turns a config and a run length into step counts; ``sparsifier_masks`` is a
sparsifier's prepare() (initial masks), ``sparsifier_step`` its step() at step k, and
``rigl_gradients`` the dense gradients RigL grows by. The mask primitives live in sparsity.py.
"""
from dataclasses import dataclass

import numpy as np

from .checkpoint import InputError
from .sharing import GRID_STRATEGIES
from .sparsity import cubic_sparsity, initial_masks, prune_to, rigl_drop_fraction, rigl_update
from .structured import (constant_fan_in_mask, fan_in_axes, fan_in_k, nm_mask, nm_sparsity,
                         set_update, srigl_update, srste_grad, unit_view)

STRUCTURED = ("srigl", "nm")     # always per layer; 'set' too with fan_in 'constant' (structured.py)

AUTHORS_STEPS = 600          # 20 epochs × 30 batches (docs/authors-code.md §4.1)
AUTHORS_T_ACCEL = 240        # swin_large_config.yaml, of 600 steps
AUTHORS_DELTA_T = 50         # every vision config, of 600 steps


@dataclass(frozen=True)
class Schedule:
    """Step counts of one run, resolved from the config and the run length (docs/options.md)."""
    total_steps: int
    t_end: int
    t_accel: int
    delta_t: int
    gmp_initial: float


def resolve_schedule(cfg, total_steps):
    """Step counts of a run (docs/options.md "Schedule lengths"): the authors' absolute t_accel 240
    and Δt 50 from 600 steps on, their fractions of 600 steps below; explicit values as given."""
    paper = cfg.variant == "paper"
    short = total_steps < AUTHORS_STEPS                  # only runs shorter than 600 steps scale
    t_accel = cfg.t_accel
    if t_accel is None and paper:
        t_accel = int(total_steps * 0.25)                # paper A.2.2: "at the 25% mark"
    elif t_accel is None:
        t_accel = total_steps * AUTHORS_T_ACCEL // AUTHORS_STEPS if short else AUTHORS_T_ACCEL
    # floor, not round: t_end = 0.75·total stays (close to) a multiple of delta_t, so the last
    # mask update lands at t_end as the authors' 450 = 9·50 does (docs/options.md)
    delta_t = cfg.delta_t or (max(1, total_steps * AUTHORS_DELTA_T // AUTHORS_STEPS) if short
                              else AUTHORS_DELTA_T)
    initial = cfg.gmp_initial if cfg.gmp_initial is not None else (0.25 if paper else 0.05)
    return Schedule(total_steps, int(cfg.t_end_coeff * total_steps), t_accel, delta_t, initial)


def constant_fan_in(cfg):
    """True when the sparsifier keeps every unit of V at exactly k entries (srigl, set --fan-in constant)."""
    return cfg.sparsifier == "srigl" or (cfg.sparsifier == "set" and cfg.fan_in == "constant")


def per_layer_only(cfg):
    """True for the sparsifiers whose structure fixes each layer's count (no global allocation)."""
    return cfg.sparsifier == "nm" or constant_fan_in(cfg)


def check_structured(cfg, plan):
    """InputError naming the flag for a structured sparsifier the config or the ranks cannot run
    (docs/deployment.md §2): global allocation, a fan-in N:M does not divide, k = 0, --solver als."""
    if cfg.fan_in not in ("any", "constant"):
        raise InputError(f"--fan-in: unknown {cfg.fan_in!r} (choose from any, constant)")
    if cfg.fan_in == "constant" and cfg.sparsifier not in ("set", "srigl"):
        raise InputError(f"--fan-in constant: only for --sparsifier set (srigl is always constant), "
                         f"not {cfg.sparsifier}")
    if not per_layer_only(cfg):
        return
    what = "nm" if cfg.sparsifier == "nm" else f"{cfg.sparsifier} (constant fan-in)"
    if cfg.global_pruning:
        raise InputError(f"--global-pruning: --sparsifier {what} keeps each layer's count (constant "
                         f"fan-in / N:M is per layer); use --uniform-pruning")
    if cfg.solver != "adam" or cfg.init == "whitened":
        flag = f"--solver {cfg.solver}" if cfg.solver != "adam" else f"--init {cfg.init}"
        raise InputError(f"{flag}: the closed-form path prunes without structure; --sparsifier "
                         f"{what} needs --solver adam and --init svd or random")
    if cfg.strategy in GRID_STRATEGIES:             # a V shared by several layers has no one fan-in
        raise InputError(f"--concat {cfg.strategy}: --sparsifier {what} needs one V per layer "
                         f"(--concat long or short)")
    if cfg.sparsifier == "nm":
        n, m = cfg.nm
        if not 1 <= n < m:
            raise InputError(f"--nm {n}:{m}: needs 1 <= N < M")
        if abs(cfg.sparsity - nm_sparsity(n, m)) > 1e-12:
            raise InputError(f"--sparsity {cfg.sparsity}: --nm {n}:{m} fixes the sparsity at "
                             f"{nm_sparsity(n, m)}")
    for g in plan:
        for layer in g.layers:
            fan_in = g.rank if layer.basis_first else g.cols
            units = g.cols if layer.basis_first else g.rank
            if cfg.sparsifier == "nm" and fan_in % cfg.nm[1]:
                raise InputError(f"--nm {cfg.nm[0]}:{cfg.nm[1]}: layer {layer.key} has fan-in "
                                 f"{fan_in} (rank {g.rank} or width {g.cols}), not a multiple of M; "
                                 f"set --round-to {cfg.nm[1]}")
            if cfg.sparsifier != "nm" and fan_in_k(fan_in, cfg.sparsity, units) < 1:
                raise InputError(f"--sparsity {cfg.sparsity}: layer {layer.key} would keep 0 of "
                                 f"its fan-in {fan_in} per unit; lower the sparsity or raise --budget")


def sparsifier_masks(cfg, sched, V, plan=None):
    """prepare(): initial masks of each sparsifier (docs/authors-code.md §5.2–5.5; structured:
    docs/deployment.md §2, SRigL's constant fan-in init and N:M by magnitude); {} for dense.
    ``plan`` (the sharing.Group list) gives each layer's fan-in axis; structured sparsifiers need it."""
    if per_layer_only(cfg):
        axes = fan_in_axes(plan)
        if cfg.sparsifier == "nm":
            return {k: nm_mask(v, *cfg.nm, axes[k]) for k, v in V.items()}
        return {k: constant_fan_in_mask(v, fan_in_k(unit_view(v, axes[k]).shape[1], cfg.sparsity,
                                                     unit_view(v, axes[k]).shape[0]), axes[k])
                for k, v in V.items()}
    start = {"dense": None, "static": cfg.sparsity, "rigl": cfg.sparsity, "gmp": sched.gmp_initial,
             "set": cfg.sparsity}
    s = start[cfg.sparsifier]
    return {} if s is None else initial_masks(V, s, global_pruning=cfg.global_pruning)


def sparsifier_step(cfg, sched, step, params, masks, dense_grads, plan=None, rng=None):
    """sparsifier.step() at the k-th step: new masks (and zeroed regrowth for the paper variant).
    ``rng``: the np.random.Generator SET regrows with (TrainState.rng)."""
    V = {k: params[k] for k in masks}
    if cfg.sparsifier == "gmp":
        s = cubic_sparsity(step, t_end=sched.t_end, delta_t=sched.delta_t, t_accel=sched.t_accel,
                           initial=sched.gmp_initial, accelerated=cfg.gmp_accelerated,
                           final=cfg.sparsity, variant=cfg.variant)
        if s is None or s == sched.gmp_initial:
            return masks
        return prune_to(V, masks, s, global_pruning=cfg.global_pruning)
    if cfg.sparsifier in ("rigl", "set", "srigl"):              # RigL's schedule (§5.5)
        rho = rigl_drop_fraction(step, q=cfg.rigl_drop_fraction, t_end=sched.t_end,
                                 delta_t=sched.delta_t)
        if rho is None:
            return masks
        masks, grown = _drop_grow(cfg, V, masks, dense_grads, rho, plan, rng)
        if cfg.variant == "paper":                               # D3: grown weights start at 0
            for k, g in grown.items():
                params[k][g] = 0
    return masks


def _drop_grow(cfg, V, masks, dense_grads, rho, plan, rng):  # -> (masks, grown)
    """One drop/grow of rigl, set or srigl (sparsity.rigl_update, structured.set_update / srigl_update)."""
    if cfg.sparsifier == "rigl":
        return rigl_update(V, masks, dense_grads, rho, cfg.sparsity, global_pruning=cfg.global_pruning)
    axes = fan_in_axes(plan) if constant_fan_in(cfg) else None
    if cfg.sparsifier == "set":
        return set_update(V, masks, rho, cfg.sparsity, rng=rng, axes=axes,
                          global_pruning=cfg.global_pruning)
    new, grown = {}, {}
    for k in masks:                                              # srigl: per layer (Lasby et al.)
        new[k], grown[k], _ = srigl_update(V[k], masks[k], dense_grads[k], rho, cfg.sparsity,
                                           axis=axes[k], gamma_sal=cfg.gamma_sal)
    return new, grown


def nm_step_masks(cfg, params, plan):
    """N:M masks re-selected by magnitude before every forward (SR-STE, Zhou et al. ICLR 2021)."""
    axes = fan_in_axes(plan)
    return {k: nm_mask(params[k], *cfg.nm, a) for k, a in axes.items()}


def srste_grads(grads, params, masks):
    """SR-STE in place: every V's gradient, unmasked, plus λ_W·(¬mask ⊙ V) (structured.srste_grad)."""
    for k, m in masks.items():
        grads[k] = srste_grad(grads[k], params[k], m)


def set_rng(cfg):
    """SET's regrowth generator, seeded from cfg.seed on a stream apart from the batch order's."""
    return np.random.default_rng([cfg.seed, 0x5E7])


def rigl_gradients(cfg, sched, step, grads, masks, rigl_sum):
    """Dense gradients RigL grows by: summed over steps 1..Δt for the first update, then the step's own (B5)."""
    if cfg.sparsifier not in ("rigl", "srigl"):
        return None
    if step > sched.delta_t:
        return {k: grads[k] for k in masks}
    for k in masks:
        rigl_sum[k] = grads[k] + rigl_sum[k] if k in rigl_sum else grads[k].copy()
    return rigl_sum


def check_gmp_levels(cfg, sched):
    """GMP never revives entries, so its levels must rise: initial ≤ accelerated ≤ final."""
    if cfg.sparsifier == "gmp" and not sched.gmp_initial <= cfg.gmp_accelerated <= cfg.sparsity:
        raise InputError(f"--gmp-initial {sched.gmp_initial}, --gmp-accelerated {cfg.gmp_accelerated}, "
                         f"--sparsity {cfg.sparsity}: GMP needs initial <= accelerated <= final")
