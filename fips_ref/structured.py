"""Structured sparsifiers of the V slices: SET, SRigL (constant fan-in, neuron ablation), N:M + SR-STE.

Units and fan-in (docs/deployment.md §1). A layer's V product multiplies its input by V in
math layout [in, out]: V_j itself for a basis-first layer (fc1 in 'long': t = x U, y = t V_j,
in = R) and V_jᵀ otherwise (fc2 in 'long': t = h V_jᵀ, in = F). A *unit* is an output of that
product and its *fan-in* the inputs it reads, so with V_j stored [R, cols]:

    basis-first layer:  units = columns of V_j, fan-in along axis 0 (R)   ->  fan_in_axis 0
    other layers:       units = rows of V_j,    fan-in along axis 1 (cols) ->  fan_in_axis 1

Every function here views V as ``[units, fan_in]`` (``unit_view``) and returns masks in V's
own [R, cols] orientation. Selections are exact: the k largest scores of a unit (or an N:M
group) are kept and equal scores go to the lower fan-in index. Nothing mutates its inputs.
Random draws use an explicit ``np.random.Generator`` on the host (backend.py).
"""
import argparse

import numpy as np

from .backend import get_xp
from .sparsity import keep_count, rigl_update, topk_mask

# --help text for the CLI flags these sparsifiers need (docs/deployment.md §2)
HELP = {
    "set": "SET: magnitude drop, uniform random regrowth on RigL's schedule (Mocanu et al. 2018); "
           "global or per layer, or per unit with --fan-in constant",
    "srigl": "SRigL: constant fan-in per unit of V, RigL drop/grow, neuron ablation below "
             "--gamma-sal (Lasby et al. 2024); per layer only, refuses --global-pruning",
    "nm": "N:M along each unit's fan-in with SR-STE (Zhou et al. 2021), e.g. --nm 1:4 (sparsity "
          "0.75); per layer only, refuses --global-pruning; the rank must be a multiple of M",
    "fan_in": "'constant': every unit of V keeps exactly k = int(fan_in·(1 − s)) entries (set); "
              "constant fan-in fixes each layer's count, so it cannot be allocated globally",
    "gamma_sal": "SRigL's saliency threshold γ_sal (default 0.3, sparsimony's); 'none' disables ablation",
}


def nm_pattern(text):
    """argparse type of --nm N:M: (n, m) with 1 <= N < M <= 256."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M such as 1:4, got {text!r}") from None
    if not 1 <= n < m <= 256:
        raise argparse.ArgumentTypeError(f"needs 1 <= N < M <= 256, got {text!r}")
    return (n, m)


def gamma_sal(text):
    """argparse type of --gamma-sal: a number in [0, 1], or 'none' (no ablation)."""
    if text.lower() == "none":
        return None
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'none': {text!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return x


# ----------------------------------------------------------------------------- views and ranks
def fan_in_axis(basis_first):
    """Axis of V_j [R, cols] that holds a unit's fan-in: 0 for basis-first layers, else 1."""
    return 0 if basis_first else 1


def fan_in_axes(groups):
    """{'{layer}.V': fan-in axis} of every compressed layer of ``groups`` (sharing.Group)."""
    return {f"{l.key}.V": fan_in_axis(l.basis_first) for g in groups for l in g.layers}


def unit_view(a, axis):  # [R, cols] -> [units, fan_in]
    """V_j (or its mask or gradient) as [units, fan_in]: a transposed view for axis 0."""
    return a.T if axis == 0 else a


def _rank_in_row(score):  # [U, n] -> [U, n] int
    """Position of each entry in its row sorted by descending score; ties: lower index first."""
    xp = get_xp(score)
    order = xp.argsort(-score, axis=1, kind="stable")          # [U, n], best first
    return xp.argsort(order, axis=1, kind="stable")            # inverse permutation


def row_topk(score, k):  # [U, n], int or [U] -> [U, n] bool
    """Exactly k[u] largest scores in each row u (NaN ranks last, ties to the lower index)."""
    xp = get_xp(score)
    score = xp.where(xp.isnan(score), -xp.inf, score)
    k = xp.asarray(k)
    return _rank_in_row(score) < (k[:, None] if k.ndim else k)


def fan_in_counts(mask, axis):  # [R, cols] -> [units]
    """Active entries of each unit."""
    return unit_view(mask, axis).sum(axis=1)


# ----------------------------------------------------------------------------- constant fan-in
def fan_in_k(fan_in, sparsity, n_units=1):
    """Per-unit keep count of a constant fan-in layer: keep_count(units·fan_in, s) // units, i.e.
    int(fan_in·(1 − s)) (SRigL's FFI init), computed as srigl_update's k' so the two agree exactly."""
    return keep_count(n_units * fan_in, sparsity) // n_units


def constant_fan_in_mask(V, k, axis):  # [R, cols] -> [R, cols] bool
    """Keep the k largest |V| of every unit (SRigL init, Lasby et al. ICLR 2024; sparsimony FFIPruner)."""
    xp = get_xp(V)
    return xp.ascontiguousarray(unit_view(row_topk(xp.abs(unit_view(V, axis)), k), axis))


def _per_unit_drop_grow(V, mask, grow_score, keep_k, target_k, axis):  # -> ([R, cols], [R, cols]) bool
    """Keep each unit's keep_k largest active |V|, then grow to target_k[u] by grow_score (grown ∉ kept)."""
    xp = get_xp(V)
    v, m, g = unit_view(V, axis), unit_view(mask, axis), unit_view(grow_score, axis)
    keep = row_topk(xp.where(m, xp.abs(v), -xp.inf), keep_k) & m       # [U, n]
    need = xp.asarray(target_k) - keep.sum(axis=1)                      # [U]
    g = xp.where(xp.isnan(g), -1.0, g)                                  # NaN grows last but before kept
    grow = row_topk(xp.where(keep, -xp.inf, g), xp.maximum(need, 0)) & ~keep
    return (xp.ascontiguousarray(unit_view(keep | grow, axis)),
            xp.ascontiguousarray(unit_view(grow, axis)))


# ----------------------------------------------------------------------------- SET
def set_update(V, masks, drop_fraction, sparsity, *, rng, axes=None, global_pruning=False):
    """One SET drop / random regrowth (Mocanu et al. 2018; sparsimony dst/set.py): (masks, grown).

    Unstructured (``axes`` None): RigL's drop rule and counts (sparsity.rigl_update, docs/authors-code.md
    §5.5) with a uniform random grow score, so regrowth is uniform over all inactive entries,
    those just dropped included (sparsimony's RandomScorer); global or per tensor.
    Constant fan-in (``axes`` = {key: fan-in axis}; per layer only, never global): each unit keeps
    its int(k·(1 − ρ)) largest |V| and regrows random inactive entries back to exactly k.
    """
    scores = {key: get_xp(v).asarray(rng.random(v.shape)) for key, v in V.items()}
    if axes is None:
        return rigl_update(V, masks, scores, drop_fraction, sparsity, global_pruning=global_pruning)
    if global_pruning:
        raise ValueError("set: --fan-in constant is per layer; global allocation is not possible")
    new, grown = {}, {}
    for key, m in masks.items():
        k = int(fan_in_counts(m, axes[key]).max())
        keep_k = int(k * (1.0 - drop_fraction))
        new[key], grown[key] = _per_unit_drop_grow(V[key], m, scores[key], keep_k, k, axes[key])
    return new, grown


# ----------------------------------------------------------------------------- SRigL
def srigl_update(V, mask, dense_grad, drop_fraction, sparsity, *, axis, gamma_sal=0.3):
    """One SRigL update of a layer (Lasby et al. ICLR 2024; sparsimony dst/srigl.py): (mask, grown, ablated).

    1. Drop (RigL, layer-wide, unstructured): keep the int(N·(1 − target)) largest active |V|,
       target = round(ρ·(1 − s_cur) + s_cur, 6) as in docs/authors-code.md §5.5.
    2. Ablation (``gamma_sal`` not None): an active unit whose salient count, its entries among
       the layer's K largest active |V| or the K largest |dense gradient| (K = the drop's keep
       count), is below γ_sal·k (k its current fan-in) is removed for good; at most as many as
       leave every entry count reachable (fan-in ≤ its length), fewest salient first.
    3. Grow: every surviving unit grows by |dense gradient| among its inactive entries (those
       just dropped included) to the new fan-in k' = min(fan_in, keep_count(N, s) // units left),
       so the layer keeps its non-zero count up to the rounding to a multiple of the units.
    ``ablated`` is bool [units], True for units with no active entry afterwards.
    """
    xp = get_xp(V)
    v, m, g = unit_view(V, axis), unit_view(mask, axis), xp.abs(unit_view(dense_grad, axis))
    n_units, fan_in = m.shape
    nnz = int(m.sum())
    s_cur = 1.0 - nnz / m.size
    n_keep = min(int(m.size * (1.0 - round(drop_fraction * (1.0 - s_cur) + s_cur, 6))), nnz)
    alive = m.any(axis=1)                                                # [U]
    if gamma_sal is not None:
        alive = alive & ~_ablate(v, m, g, n_keep, gamma_sal, alive, keep_count(m.size, sparsity))
    m = m & alive[:, None]
    flat = xp.where(m, xp.abs(v), -xp.inf).reshape(-1)                   # [U·n]
    keep = topk_mask(flat, min(n_keep, int(m.sum()))).reshape(m.shape) & m
    n_alive = int(alive.sum())
    k_new = min(fan_in, keep_count(m.size, sparsity) // max(n_alive, 1))
    target = xp.where(alive, k_new, 0)
    score = xp.where(xp.isnan(g), -1.0, g)
    grow = row_topk(xp.where(keep | ~alive[:, None], -xp.inf, score),
                    xp.maximum(target - keep.sum(axis=1), 0)) & ~keep & alive[:, None]
    return (xp.ascontiguousarray(unit_view(keep | grow, axis)),
            xp.ascontiguousarray(unit_view(grow, axis)), ~alive)


def _ablate(v, m, g, n_keep, gamma_sal, alive, target_nnz):  # [U, n] x3 -> [U] bool
    """Units to ablate: salient count < γ_sal·k, fewest salient first, never below ⌈target/fan_in⌉ units."""
    xp = get_xp(v)
    n_units, fan_in = m.shape
    k = max(int(m.sum()) // max(int(alive.sum()), 1), 1)                 # current fan-in
    by_mag = topk_mask(xp.where(m, xp.abs(v), -xp.inf).reshape(-1), n_keep)
    by_grad = topk_mask(xp.where(alive[:, None], g, -xp.inf).reshape(-1), n_keep)
    salient = (by_mag | by_grad).reshape(m.shape).sum(axis=1)            # [U]
    weak = alive & (salient < gamma_sal * k)
    max_ablate = int(alive.sum()) - -(-target_nnz // fan_in)            # keep k' ≤ fan_in
    if int(weak.sum()) <= max_ablate:
        return weak
    order = xp.argsort(xp.where(weak, salient, xp.iinfo(np.int64).max), kind="stable")
    out = xp.zeros(n_units, dtype=bool)
    out[order[:max(max_ablate, 0)]] = True
    return out


# ----------------------------------------------------------------------------- N:M
def nm_sparsity(n, m):
    """Sparsity of an N:M pattern, 1 − N/M (1:4 → 0.75, 2:4 → 0.5)."""
    return 1.0 - n / m


def nm_groups(a, m, axis):  # [R, cols] -> [units, G, M]
    """A unit's fan-in cut into G = fan_in / M groups of M consecutive entries."""
    u = unit_view(a, axis)
    if u.shape[1] % m:
        raise ValueError(f"N:M: fan-in {u.shape[1]} is not a multiple of M = {m}; round the "
                         f"rank (--round-to) or use a fan-in that M divides")
    return u.reshape(u.shape[0], u.shape[1] // m, m)


def nm_mask(V, n, m, axis):  # [R, cols] -> [R, cols] bool
    """Keep the N largest |V| of every group of M along each unit's fan-in (Zhou et al. ICLR 2021)."""
    xp = get_xp(V)
    grp = nm_groups(xp.abs(V), m, axis)                                   # [U, G, M]
    keep = row_topk(grp.reshape(-1, m), n).reshape(grp.shape)
    u = keep.reshape(grp.shape[0], -1)                                    # [U, G, M] -> [U, fan_in]
    return xp.ascontiguousarray(unit_view(u, axis))


def srste_grad(dense_grad, V, mask, decay=2e-4):  # [R, cols] -> [R, cols]
    """SR-STE gradient (Zhou et al. ICLR 2021): the dense gradient passed straight through to
    every entry plus λ_W·(¬mask ⊙ V), λ_W = 2e-4 (docs/authors-code.md §5.6, the code's value)."""
    xp = get_xp(V)
    return dense_grad + decay * xp.where(mask, 0.0, V).astype(V.dtype)
