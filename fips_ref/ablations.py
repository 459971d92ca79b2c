"""The paper's §5 ablations as options of the local stage: random init, rank growth, scaling vectors.

Letters: rows × cols the shape of a group's concatenation C, q = min(rows, cols), R the rank.

- ``--init random`` (paper §5 "random initialisation"): U and V drawn with He (Kaiming normal,
  fan-in) variance instead of the truncated SVD of C: U ~ N(0, 2/rows), V ~ N(0, 2/R).
- ``--growth`` (paper §5, R > q): how the R − q rank units past the SVD's start. ``hybrid``: the
  authors' code (zero U columns, the largest V rows divided by τ; docs/authors-code.md §3);
  ``random``: zero U columns and He-initialised V rows, N(0, 2/R); ``split``: Net2Net neuron
  splitting, unit i copied into a new U column and its V row shared equally among the copies.
  All three keep U V = C exactly at init.
- ``--scaling-vectors`` (paper §5, DoRA-style): C = C_n diag(m) with m the column norms of C; the
  SVD is taken of C_n and every V slice gets a trained magnitude vector m_j [cols], so a layer's
  block is U V_j diag(m_j). At export m_j is folded into V_j's columns (``fold_scaling``).
- ``expand_grid``: the block-structured strategies by-type / by-block (sharing.py) rewritten at
  export in the one-basis, one-V-per-layer form the compressed file stores (docs/options.md).
"""
import math

import numpy as np

from .checkpoint import InputError
from .sharing import GRID_STRATEGIES, Group, Layer, v_keys, v_param

INITS = ("svd", "random", "whitened")
GROWTHS = ("hybrid", "random", "split")


# ----------------------------------------------------------------------------- growth
def grow(U, V, rank, growth="hybrid", tau=32.0, rng=None):  # [rows, q], [q, cols] -> [rows, R], [R, cols]
    """Paper §5 rank growth past q = U.shape[1]: R − q new units, U V unchanged (docs/options.md)."""
    q, k = U.shape[1], rank - U.shape[1]
    if k <= 0:
        return U[:, :rank].copy(), V[:rank].copy()
    if growth == "hybrid":                      # authors' code, docs/authors-code.md §3
        grown = V[:min(k, q)] / tau                                        # [min(k, q), cols]
        V_new = np.tile(grown, (-(-k // grown.shape[0]), 1))[:k]           # cycled if k > q
        return np.concatenate([U, np.zeros((U.shape[0], k))], axis=1), np.concatenate([V, V_new])
    if growth == "random":                      # He (fan-in R) rows of V, zero columns of U
        rng = rng if rng is not None else np.random.default_rng(0)
        V_new = rng.standard_normal((k, V.shape[1])) * math.sqrt(2.0 / rank)
        return np.concatenate([U, np.zeros((U.shape[0], k))], axis=1), np.concatenate([V, V_new])
    if growth == "split":                       # Net2Net: unit i in c_i copies, each V[i] / c_i
        src = np.arange(k) % q                                              # largest units first
        counts = 1 + np.bincount(src, minlength=q)                          # [q]
        V = V / counts[:, None]
        return np.concatenate([U, U[:, src]], axis=1), np.concatenate([V, V[src]])
    raise InputError(f"--growth: unknown {growth!r} (choose from {', '.join(GROWTHS)})")


# ----------------------------------------------------------------------------- random init
def he_init(rows, cols, rank, rng):  # -> U [rows, R], V [R, cols]
    """Paper §5 random initialisation: He normal with fan-in, U ~ N(0, 2/rows), V ~ N(0, 2/R)."""
    U = rng.standard_normal((rows, rank)) * math.sqrt(2.0 / rows)
    V = rng.standard_normal((rank, cols)) * math.sqrt(2.0 / rank)
    return U, V


# ----------------------------------------------------------------------------- scaling vectors
def normalise_columns(C):  # [rows, cols] -> (C_n [rows, cols], m [cols])
    """DoRA's decomposition C = C_n diag(m), m the column norms (1 for a zero column)."""
    m = np.linalg.norm(C, axis=0)
    m[m == 0] = 1.0
    return C / m, m


def m_key(vkey):
    """'….V' -> '….m', the magnitude vector of a V slice."""
    return vkey[:-2] + ".m"


def scaled_v(V, m):  # V [R, cols], m [cols] or None -> V diag(m)
    """A V slice with its magnitudes applied: column c scaled by m[c] (V itself without them)."""
    return V if m is None else V * m[None, :]


def scaling_grads(dV_eff, V, m):  # -> (dV [R, cols], dm [cols])
    """Chain rule of V_eff = V diag(m): dV = dV_eff diag(m), dm = Σ_rows dV_eff ⊙ V."""
    return dV_eff * m[None, :], (dV_eff * V).sum(axis=0)


def fold_scaling(params):
    """Export: V_j ← V_j diag(m_j) and the m_j dropped. Scaling columns never makes a zero non-zero,
    so every V keeps its mask, whatever the layer's orientation (basis_first or not)."""
    out = {k: v for k, v in params.items() if not k.endswith(".m")}
    for k in params:
        if k.endswith(".m"):
            vk = k[:-2] + ".V"
            out[vk] = scaled_v(params[vk], params[k])
    return out


# ----------------------------------------------------------------------------- by-type / by-block
def expand_grid(groups, params, masks, xp):
    """Rewrite by-type / by-block groups as one-basis groups with a V per layer (App. A.1).

    A grid group's U [k·d, R] has k row blocks U_0 … U_{k−1}; a layer reading row block j and
    the shared slice V is exactly U' V'_l with U' = [U_0 | … | U_{k−1}] [d, k·R] and V'_l [k·R,
    cols] zero except rows j·R:(j+1)·R = V. The zero blocks are masked out, so the file stores
    each layer's non-zeros; a V shared by two layers is stored once per layer. Returns (groups,
    params, masks) with the layers' own '{layer}.V' keys; other groups pass through unchanged.
    """
    params, masks = dict(params), dict(masks)
    out = []
    for g in groups:
        if g.strategy not in GRID_STRATEGIES:
            out.append(g)
            continue
        d = g.layers[0].u_rows[1] - g.layers[0].u_rows[0]
        k, R = g.rows // d, g.rank
        U = params.pop(f"U.{g.index}")
        params[f"U.{g.index}"] = xp.concatenate([U[j * d:(j + 1) * d] for j in range(k)], axis=1)
        shared = {vk: (params[vk], masks.get(vk)) for vk in v_keys(g)}
        for l in g.layers:
            V, M = shared[v_param(l)]
            j = l.u_rows[0] // d
            V2 = xp.zeros((k * R, g.cols), dtype=V.dtype)
            M2 = xp.zeros((k * R, g.cols), dtype=bool)
            V2[j * R:(j + 1) * R] = V
            M2[j * R:(j + 1) * R] = True if M is None else M
            params[f"{l.key}.V"], masks[f"{l.key}.V"] = V2, M2
        for vk in shared:
            params.pop(vk)
            masks.pop(vk, None)
        layers = tuple(Layer(l.key, l.block, l.basis_first) for l in g.layers)
        out.append(Group(g.index, g.blocks, d, g.cols, k * R, layers, "long"))
    return out, params, masks


# ----------------------------------------------------------------------------- checks
def check_ablation_options(cfg):
    """One clear line for option combinations the local stage does not implement."""
    if cfg.init not in INITS:
        raise InputError(f"--init: unknown {cfg.init!r} (choose from {', '.join(INITS)})")
    if cfg.growth not in GROWTHS:
        raise InputError(f"--growth: unknown {cfg.growth!r} (choose from {', '.join(GROWTHS)})")
    closed_form = cfg.init == "whitened" or cfg.solver != "adam"
    if closed_form and (cfg.scaling_vectors or cfg.strategy in GRID_STRATEGIES):
        what = "--scaling-vectors" if cfg.scaling_vectors else f"--concat {cfg.strategy}"
        raise InputError(f"{what} works with --init svd|random and --solver adam only")
    if cfg.init == "random" and cfg.scaling_vectors:
        raise InputError("--scaling-vectors normalises C before its SVD: use it with --init svd")
