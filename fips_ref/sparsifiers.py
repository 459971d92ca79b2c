"""The sparsifiers as the local stage calls them: their schedule, prepare() and step() (paper §3
"Sparsity", docs/authors-code.md §5).

``resolve_schedule`` turns a config and a run length into step counts; ``sparsifier_masks`` is a
sparsifier's prepare() (initial masks), ``sparsifier_step`` its step() at step k, and
``rigl_gradients`` the dense gradients RigL grows by. The mask primitives live in sparsity.py.
"""
from dataclasses import dataclass

from .checkpoint import InputError
from .sparsity import cubic_sparsity, initial_masks, prune_to, rigl_drop_fraction, rigl_update

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


def sparsifier_masks(cfg, sched, V):
    """prepare(): initial masks of each sparsifier (docs/authors-code.md §5.2–5.5); {} for dense."""
    start = {"dense": None, "static": cfg.sparsity, "rigl": cfg.sparsity, "gmp": sched.gmp_initial}
    s = start[cfg.sparsifier]
    return {} if s is None else initial_masks(V, s, global_pruning=cfg.global_pruning)


def sparsifier_step(cfg, sched, step, params, masks, dense_grads):
    """sparsifier.step() at the k-th step: new masks (and zeroed regrowth for the paper variant)."""
    V = {k: params[k] for k in masks}
    if cfg.sparsifier == "gmp":
        s = cubic_sparsity(step, t_end=sched.t_end, delta_t=sched.delta_t, t_accel=sched.t_accel,
                           initial=sched.gmp_initial, accelerated=cfg.gmp_accelerated,
                           final=cfg.sparsity, variant=cfg.variant)
        if s is None or s == sched.gmp_initial:
            return masks
        return prune_to(V, masks, s, global_pruning=cfg.global_pruning)
    if cfg.sparsifier == "rigl":
        rho = rigl_drop_fraction(step, q=cfg.rigl_drop_fraction, t_end=sched.t_end,
                                 delta_t=sched.delta_t)
        if rho is None:
            return masks
        masks, grown = rigl_update(V, masks, dense_grads, rho, cfg.sparsity,
                                   global_pruning=cfg.global_pruning)
        if cfg.variant == "paper":                               # D3: grown weights start at 0
            for k, g in grown.items():
                params[k][g] = 0
    return masks


def rigl_gradients(cfg, sched, step, grads, masks, rigl_sum):
    """Dense gradients RigL grows by: summed over steps 1..Δt for the first update, then the step's own (B5)."""
    if cfg.sparsifier != "rigl":
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
