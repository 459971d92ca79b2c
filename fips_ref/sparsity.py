"""Sparsity of the V slices: schedules, exact top-k masks, GMP pruning and RigL (docs/authors-code.md §5).

Masks are bool arrays under the same keys as the V they mask. Selection is either *global*
(one threshold over the flat concatenation of every V in the model, in layer order) or
*uniform* (per tensor). Counts are exact: ``keep_count`` entries survive, and ties in the score
are broken by the lower flat index (of the concatenation, for global selection).
A bare § below is a section of docs/authors-code.md.
"""
import math

from .backend import get_xp

PAPER_SPARSIFIERS = ("dense", "static", "gmp", "rigl")            # paper §5, Table 3
SPARSIFIERS = PAPER_SPARSIFIERS + ("set", "srigl", "nm")           # the last three: structured.py


# ----------------------------------------------------------------------------- schedules
def cubic_sparsity(step, *, t_end, delta_t, t_accel, initial, accelerated, final, variant="authors"):
    """AcceleratedCubicScheduler value at the k-th sparsifier step (docs/authors-code.md §5.3), or None.

    authors: final + (accel − final)·(1 − (k − t_accel)/t_end)³  (never reaches ``final``);
    paper:   the same with denominator (t_end − t_accel)           (reaches ``final`` at t_end).
    """
    if step > t_end or step % delta_t != 0:
        return None
    if step < t_accel:
        return initial
    span = t_end if variant == "authors" else t_end - t_accel
    if span <= 0:                                   # paper variant with t_accel = t_end
        return final
    return final + (accelerated - final) * (1.0 - (step - t_accel) / span) ** 3


def rigl_drop_fraction(step, *, q, t_end, delta_t):
    """CosineDecayScheduler drop fraction ρ_k = q/2·(1 + cos(πk/t_end)) on update steps (§5.5), else None."""
    if step > t_end or step % delta_t != 0:
        return None
    return q / 2.0 * (1.0 + math.cos(math.pi * step / t_end))


# ----------------------------------------------------------------------------- exact top-k
def keep_count(numel, sparsity):
    """Entries kept at a sparsity: int(numel·(1 − s)) in double precision (§5.1)."""
    return int(numel * (1.0 - sparsity))


def topk_mask(score, k):  # [N] -> [N] bool
    """Exactly k largest scores; among equal scores the lower index wins."""
    xp = get_xp(score)
    score = xp.where(xp.isnan(score), -xp.inf, score)   # NaN ranks last, so exactly k are kept
    n = score.shape[0]
    k = max(0, min(int(k), n))
    if k == 0 or k == n:
        return xp.full(n, k == n, dtype=bool)
    kth = xp.partition(score, n - k)[n - k]          # the k-th largest value
    mask = score > kth
    ties = xp.flatnonzero(score == kth)[: k - int(mask.sum())]
    mask[ties] = True
    return mask


def _flat(arrays):  # {key: [R, F]} -> [N]
    xp = get_xp(*arrays.values())
    return xp.concatenate([a.reshape(-1) for a in arrays.values()])


def _unflat(flat, like):  # [N] -> {key: [R, F]}
    out, start = {}, 0
    for k, a in like.items():
        out[k] = flat[start:start + a.size].reshape(a.shape)
        start += a.size
    return out


def _selection_sets(keys, global_pruning):
    """Global: one set of every key; uniform: one set per key."""
    return [list(keys)] if global_pruning else [[k] for k in keys]


# ----------------------------------------------------------------------------- magnitude pruning
def prune_to(V, masks, sparsity, *, global_pruning=True):
    """Masks keeping the keep_count(N, s) largest |V| among active entries; inactive never revive (§5.1)."""
    out = {}
    for keys in _selection_sets(masks, global_pruning):
        v, m = _flat({k: V[k] for k in keys}), _flat({k: masks[k] for k in keys})
        xp = get_xp(v)
        k_keep = min(keep_count(v.size, sparsity), int(m.sum()))
        keep = topk_mask(xp.where(m, xp.abs(v), -xp.inf), k_keep)
        out.update(_unflat(keep, {k: masks[k] for k in keys}))
    return out


def initial_masks(V, sparsity, *, global_pruning=True):
    """prepare(): magnitude-prune the SVD-initialised V to ``sparsity`` (§5.2–5.5)."""
    xp = get_xp(*V.values())
    ones = {k: xp.ones(v.shape, dtype=bool) for k, v in V.items()}
    return prune_to(V, ones, sparsity, global_pruning=global_pruning)


# ----------------------------------------------------------------------------- RigL
def rigl_update(V, masks, dense_grads, drop_fraction, sparsity, *, global_pruning=True):
    """One RigL drop/grow (§5.5): returns (new masks, {key: bool grown-entry mask}).

    Drop: keep the int(N·(1 − target)) active entries of largest |V|, with
    target = round(ρ·(1 − s_cur) + s_cur, 6). Grow: activate the keep_count(N, s) − nnz inactive
    entries (those just dropped included) of largest |dense gradient|.
    """
    new_masks, grown = {}, {}
    for keys in _selection_sets(masks, global_pruning):
        sub = {k: masks[k] for k in keys}
        v, m, g = _flat({k: V[k] for k in keys}), _flat(sub), _flat({k: dense_grads[k] for k in keys})
        xp = get_xp(v)
        n, nnz = v.size, int(m.sum())
        s_cur = 1.0 - nnz / n
        target = round(drop_fraction * (1.0 - s_cur) + s_cur, 6)
        keep = topk_mask(xp.where(m, xp.abs(v), -xp.inf), min(int(n * (1.0 - target)), nnz))
        n_grow = keep_count(n, sparsity) - int(keep.sum())
        grow = topk_mask(xp.where(keep, -xp.inf, xp.abs(g)), n_grow)
        assert not bool((grow & keep).any()), "RigL grew an entry it kept"
        new_masks.update(_unflat(keep | grow, sub))
        grown.update(_unflat(grow, sub))
    return new_masks, grown


def density(masks):
    """Fraction of active entries over every mask together (1.0 for no masks)."""
    if not masks:
        return 1.0
    total = sum(m.size for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values())) / total


def describe(masks):
    """{key: density} per mask, for reports."""
    return {k: float(int(m.sum()) / m.size) for k, m in masks.items()}
