"""Studies on the weights alone (paper §2, weight reconstruction error; no calibration data used):
sparse-factor (§2.1), concat (§2.2), pairs (§2.3).

Every error here is the relative Frobenius error ‖W − Ŵ‖² / ‖W‖² of the weights themselves.
"""
import numpy as np

from ..sharing import STRATEGIES, build_groups, concat_group, svd_init
from ..sparsity import initial_masks
from .context import consecutive_groups
from .registry import Study, grid

# The concatenation strategies the study compares: every one the library has, the paper's I-IV
# (App. A.1): 'long' and 'short' are I and IV, 'by-type' and 'by-block' the block-structured II
# and III, in this project's reading (docs/algorithm.md "Strategies of concatenation").
CONCAT_STRATEGIES = STRATEGIES
STRATEGY_LABELS = {"long": "I (long)", "by-type": "II (by-type)", "by-block": "III (by-block)",
                   "short": "IV (short)"}


def rel_error(W, W_hat):  # [rows, cols] x2 -> float
    """‖W − Ŵ‖² / ‖W‖² in float64."""
    diff = np.asarray(W, np.float64) - W_hat
    return float((diff * diff).sum() / max(float((np.asarray(W, np.float64) ** 2).sum()), 1e-300))


def tail_energy(C, rank):  # [rows, cols] -> float
    """Relative error of the best rank-r approximation (Eckart-Young): Σ_{k>r} σ² / Σ σ²."""
    s = np.linalg.svd(np.asarray(C, np.float64), compute_uv=False)
    return float((s[rank:] ** 2).sum() / max(float((s ** 2).sum()), 1e-300))


def math_weight(ckpt, block, name="fc1"):  # -> [in, out]
    """A block's fc weight in math layout x @ W (the torch weight transposed)."""
    return np.asarray(ckpt.tensors[block.key(f"mlp.{name}.weight")], np.float64).T


# ----------------------------------------------------------------------------- sparse-factor
FACTOR_MODES = ("U", "V", "both")


def factor_rank(mode, rows, cols, nnz_budget, s):
    """Largest rank whose factors keep at most ``nnz_budget`` non-zeros with sparsity s in ``mode``."""
    per_rank = {"U": rows * (1 - s) + cols, "V": rows + cols * (1 - s), "both": (rows + cols) * (1 - s)}
    return min(int(nnz_budget / per_rank[mode]), min(rows, cols))


def sparse_factor_error(W, mode, s, nnz_budget):
    """§2.1, Fig. 2a-b: truncated SVD of one layer (S folded into V as in §3), magnitude-pruned to
    sparsity s in U, V or both, at a constant number of non-zeros; returns (rank, error)."""
    rows, cols = W.shape
    r = factor_rank(mode, rows, cols, nnz_budget, s)
    U, V = svd_init(W, r)                                         # [rows, r], [r, cols]
    if mode in ("U", "both") and s > 0:
        U = U * initial_masks({"U": U}, s)["U"]
    if mode in ("V", "both") and s > 0:
        V = V * initial_masks({"V": V}, s)["V"]
    return r, rel_error(W, U @ V)


def measure_sparse_factor(ctx, opts, log):
    block = ctx.blocks[0]
    W = math_weight(ctx.ckpt, block)                              # [D, F]
    budget = 0.25
    nnz_budget = budget * W.size
    rows = []
    for s in grid(opts, (0.0, 0.25, 0.5, 0.75, 0.9), (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)):
        for mode in FACTOR_MODES:
            r, err = sparse_factor_error(W, mode, s, nnz_budget)
            rows.append({"layer": block.key("mlp.fc1"), "budget": budget, "sparse_in": mode,
                         "factor_sparsity": s, "rank": r, "weight_rel_error": err})
    return rows


def summary_sparse_factor(rows):
    best = {}
    for r in rows:
        if r["factor_sparsity"] > 0:
            best.setdefault(r["factor_sparsity"], []).append((r["weight_rel_error"], r["sparse_in"]))
    wins = [min(v)[1] for v in best.values()]
    top = max(set(wins), key=wins.count) if wins else "none"
    dense = next(r["weight_rel_error"] for r in rows if r["factor_sparsity"] == 0)
    return (f"On {rows[0]['layer']} at a 25% budget the dense truncated SVD has error {dense:.3g}; "
            f"sparsity in {top} gives the lowest error at {wins.count(top)} of {len(wins)} "
            f"sparsity levels (best {min(r['weight_rel_error'] for r in rows):.3g}).")


def plot_sparse_factor(rows, plt):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in FACTOR_MODES:
        pts = [(r["factor_sparsity"], r["weight_rel_error"]) for r in rows if r["sparse_in"] == mode]
        ax.plot(*zip(*pts), marker="o", label=f"sparsity in {mode}")
    ax.set(xlabel="sparsity of the factor(s)", ylabel="relative weight error",
           title=f"{rows[0]['layer']}, 25% of the weights")
    ax.legend()
    return fig


SPARSE_FACTOR = Study(
    "sparse-factor", "§2.1, Fig. 2a-b",
    "At a fixed number of non-zeros, a truncated SVD whose sparsity sits in V (the projection, with "
    "a larger rank) reconstructs a layer better than one with a sparse U or both factors sparse; "
    "this motivates FiPS's dense U and sparse V.",
    measure_sparse_factor, summary_sparse_factor, plot_sparse_factor,
    ("sparse_in", "factor_sparsity", "rank", "weight_rel_error"), needs_training=False)


# ----------------------------------------------------------------------------- concat
def concat_errors(ckpt, blocks, groups, strategy, budget, s, tau):
    """§2.2, Fig. 2c: per group, the SVD-initialised shared factors with V magnitude-pruned to s:
    [(group, rank, ‖C − U(V⊙M)‖² / ‖C‖²)]."""
    out = []
    for g in build_groups(blocks, groups, budget=budget, sparsity=s, strategy=strategy):
        C = concat_group(ckpt.tensors, g)                      # [rows, k·cols], every weight once
        U, V = svd_init(C, g.rank, tau)
        if s > 0:
            V = V * initial_masks({"V": V}, s)["V"]
        out.append((g, g.rank, rel_error(C, U @ V)))
    return out


def measure_concat(ctx, opts, log):
    pairs = consecutive_groups(ctx.blocks, 2)
    pairs = [p for p in pairs if len(p) == 2]
    budget = ctx.base.budget
    rows = []
    for s in grid(opts, (0.0, 0.5, 0.75, 0.9), (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)):
        for strategy in CONCAT_STRATEGIES:
            for g, rank, err in concat_errors(ctx.ckpt, ctx.blocks, pairs, strategy, budget, s, ctx.base.tau):
                rows.append({"strategy": strategy, "label": STRATEGY_LABELS.get(strategy, strategy),
                             "blocks": f"{g.blocks[0]}-{g.blocks[-1]}", "budget": budget,
                             "v_sparsity": s, "rank": rank, "weight_rel_error": err})
    return rows


def mean_by(rows, keys, value):
    """{key tuple: mean of value} over rows."""
    acc = {}
    for r in rows:
        acc.setdefault(tuple(r[k] for k in keys), []).append(r[value])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def summary_concat(rows):
    m = mean_by(rows, ("v_sparsity", "strategy"), "weight_rel_error")
    levels = sorted({k[0] for k in m})
    wins = [min((v, k[1]) for k, v in m.items() if k[0] == s)[1] for s in levels]
    parts = ", ".join(f"{s:g}: {w}" for s, w in zip(levels, wins))
    return (f"Averaged over the {len({r['blocks'] for r in rows})} pairs of consecutive blocks at "
            f"budget {rows[0]['budget']}, the strategy with the lowest weight error per V sparsity is {parts}.")


def plot_concat(rows, plt):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    m = mean_by(rows, ("strategy", "v_sparsity"), "weight_rel_error")
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((k[1], v) for k, v in m.items() if k[0] == strategy)
        ax.plot(*zip(*pts), marker="o", label=STRATEGY_LABELS.get(strategy, strategy))
    ax.set(xlabel="sparsity of V", ylabel="relative weight error (mean over pairs)",
           title=f"two MLPs sharing U, budget {rows[0]['budget']}")
    ax.legend()
    return fig


CONCAT = Study(
    "concat", "§2.2, Fig. 2c, App. A.1",
    "Of the four ways to concatenate two MLP modules (I-IV), the paper keeps the one sharing the "
    "basis on the model width with fc2 transposed (the authors' concat_axis 1, 'long' here), which "
    "has the lowest error as V gets sparser.",
    measure_concat, summary_concat, plot_concat,
    ("label", "blocks", "v_sparsity", "rank", "weight_rel_error"), needs_training=False)


# ----------------------------------------------------------------------------- pairs
def module_matrix(ckpt, block):  # -> [D, 2F]
    """One MLP module as the authors concatenate it: [W_fc1 | W_fc2ᵀ] (docs/authors-code.md §1.2)."""
    return np.concatenate([math_weight(ckpt, block, "fc1"), math_weight(ckpt, block, "fc2").T], axis=1)


def measure_pairs(ctx, opts, log):
    """§2.3, Fig. 3a: each module's error at rank r alone, and the error increase when two share U."""
    rank = opts.rank or max(1, ctx.blocks[0].d // 4)
    mats = {b.index: module_matrix(ctx.ckpt, b) for b in ctx.blocks}
    norms = {i: float((C ** 2).sum()) for i, C in mats.items()}
    alone = {i: tail_energy(C, rank) for i, C in mats.items()}
    rows = [{"kind": "module", "block_i": i, "block_j": i, "rank": rank, "weight_rel_error": e,
             "error_increase": 0.0} for i, e in alone.items()]
    by = {b.index: b for b in ctx.blocks}
    for i in mats:
        for j in mats:
            if j <= i or mats[i].shape != mats[j].shape or by[i].stage != by[j].stage:
                continue
            joint = tail_energy(np.concatenate([mats[i], mats[j]], axis=1), rank)
            separate = (alone[i] * norms[i] + alone[j] * norms[j]) / (norms[i] + norms[j])
            rows.append({"kind": "pair", "block_i": i, "block_j": j, "rank": rank,
                         "weight_rel_error": joint, "error_increase": joint - separate})
    return rows


def summary_pairs(rows):
    mods = [r for r in rows if r["kind"] == "module"]
    pairs = [r for r in rows if r["kind"] == "pair"]
    text = (f"At rank {rows[0]['rank']} the per-module error ranges from "
            f"{min(r['weight_rel_error'] for r in mods):.3g} to {max(r['weight_rel_error'] for r in mods):.3g}")
    if pairs:
        adj = [r["error_increase"] for r in pairs if r["block_j"] - r["block_i"] == 1]
        far = [r["error_increase"] for r in pairs if r["block_j"] - r["block_i"] > 1]
        text += (f"; sharing one basis raises the error by {np.mean(adj):.3g} on average for "
                 f"neighbouring blocks" + (f" and {np.mean(far):.3g} for blocks further apart" if far else ""))
    return text + "."


def plot_pairs(rows, plt):
    mods = [r for r in rows if r["kind"] == "module"]
    ids = [r["block_i"] for r in mods]
    pos = {b: k for k, b in enumerate(ids)}
    M = np.full((len(ids), len(ids)), np.nan)
    for r in rows:
        if r["kind"] == "pair":
            M[pos[r["block_i"]], pos[r["block_j"]]] = M[pos[r["block_j"]], pos[r["block_i"]]] = r["error_increase"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(range(len(ids)), [r["weight_rel_error"] for r in mods])
    a.set(xticks=range(len(ids)), xticklabels=ids, xlabel="block",
          ylabel="relative weight error", title=f"one module at rank {rows[0]['rank']}")
    im = b.imshow(M, cmap="viridis")
    b.set(xticks=range(len(ids)), xticklabels=ids, yticks=range(len(ids)), yticklabels=ids,
          xlabel="block j", ylabel="block i", title="error increase when i, j share U")
    fig.colorbar(im, ax=b)
    return fig


PAIRS = Study(
    "pairs", "§2.3, Fig. 3a",
    "At a fixed rank, modules differ in how well they compress, and sharing one basis between two "
    "blocks costs least for neighbouring blocks, which is why FiPS groups consecutive blocks.",
    measure_pairs, summary_pairs, plot_pairs,
    ("kind", "block_i", "block_j", "rank", "weight_rel_error", "error_increase"), needs_training=False)
