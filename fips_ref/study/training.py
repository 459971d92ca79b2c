"""Studies that run the local stage (paper §2.3 and §5): group-size, sparsifiers, sparsity,
ablations, growth, density, calibration. Metric: the held-out relative MLP output error
(context.measure) and, with labelled data, top-1."""
import dataclasses


from ..sharing import build_groups
from ..sparsity import PAPER_SPARSIFIERS
from .context import consecutive_groups, measure, original_top1, run_row
from .registry import Study, grid, spearman
from .weights import mean_by, module_matrix, tail_energy


def base_groups(ctx):
    """The default sharing groups of a study: consecutive blocks, --group-size of them."""
    return consecutive_groups(ctx.blocks, ctx.group_size)


def line_plot(rows, plt, x, series, title, xlabel, log_y=True):
    """Held-out error (and top-1 when measured) against ``x``, one line per value of ``series``."""
    has_top1 = any(r.get("top1") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_top1 else 1, figsize=(9 if has_top1 else 5, 3.5), squeeze=False)
    metrics = [("heldout_rel_error", "held-out relative MLP error")] + ([("top1", "top-1")] if has_top1 else [])
    for ax, (metric, label) in zip(axes[0], metrics):
        keys = list(dict.fromkeys(r[series] for r in rows)) if series else [None]
        for key in keys:
            pts = sorted((r[x], r[metric]) for r in rows if (series is None or r[series] == key)
                         and r.get(metric) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=None if series is None else f"{series}={key}")
        if metric == "top1" and rows[0].get("original_top1") is not None:
            ax.axhline(rows[0]["original_top1"], color="gray", ls="--", label="original")
        if metric != "top1" and log_y:
            ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=label, title=title)
        if series or metric == "top1":
            ax.legend(fontsize=7)
    return fig


def best_by(rows, key, value="heldout_rel_error"):
    m = mean_by(rows, (key,), value)
    return min(m, key=m.get)[0], m


# ----------------------------------------------------------------------------- group-size
def measure_group_size(ctx, opts, log):
    """§2.3, Fig. 3b-c: rank against group size (closed form), and the local stage per group size."""
    cfg, b0 = ctx.base, ctx.blocks[0]
    rows = []
    for n in range(1, ctx.depth + 1):                       # Fig. 3b: rank of a group of n blocks
        for s in (0.0, cfg.sparsity):
            g = build_groups([dataclasses.replace(b0, index=i) for i in range(n)], [list(range(n))],
                             budget=cfg.budget, sparsity=s, strategy=cfg.strategy)[0]
            rows.append({"kind": "rank", "group_size": n, "budget": cfg.budget, "sparsity": s,
                         "rank": g.rank, "rank_over_width": g.rank / g.rows})
    for n in grid(opts, (1, 2, 4), (1, 2, 3, 4, 6)):        # Fig. 3c: error after the local stage
        if n > ctx.depth:
            continue
        groups = consecutive_groups(ctx.blocks, n)
        m = measure(ctx, cfg, groups, log=log)
        rows.append(run_row(ctx, cfg, groups, m, kind="local", group_size=n, rank=m["ranks"][0],
                            original_top1=original_top1(ctx)))
    return rows


def summary_group_size(rows):
    local = [r for r in rows if r["kind"] == "local"]
    ranks = [r for r in rows if r["kind"] == "rank" and r["sparsity"] > 0]
    text = (f"With sparsity {ranks[0]['sparsity']} the rank grows from {ranks[0]['rank']} for one block to "
            f"{ranks[-1]['rank']} for {ranks[-1]['group_size']} blocks (dense: "
            f"{[r['rank'] for r in rows if r['kind'] == 'rank' and r['sparsity'] == 0][-1]})")
    if local:
        best = min(local, key=lambda r: r["heldout_rel_error"])
        errs = ", ".join("{}: {:.3g}".format(r["group_size"], r["heldout_rel_error"]) for r in local)
        text += (f"; after the local stage groups of {best['group_size']} have the lowest held-out "
                 f"error ({errs})")
    return text + "."


def plot_group_size(rows, plt):
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for s in dict.fromkeys(r["sparsity"] for r in rows if r["kind"] == "rank"):
        pts = [(r["group_size"], r["rank"]) for r in rows if r["kind"] == "rank" and r["sparsity"] == s]
        a.plot(*zip(*pts), marker="o", label=f"sparsity {s:g}")
    a.set(xlabel="blocks per group", ylabel="rank", title=f"rank at budget {rows[0]['budget']}")
    a.legend()
    local = sorted((r["group_size"], r["heldout_rel_error"]) for r in rows if r["kind"] == "local")
    if local:
        b.plot(*zip(*local), marker="o")
    b.set(xlabel="blocks per group", ylabel="held-out relative MLP error", yscale="log",
          title="after the local stage")
    return fig


GROUP_SIZE = Study(
    "group-size", "§2.3, Fig. 3b-c",
    "Sharing one basis among more blocks buys a larger rank at the same budget (more so with a sparse "
    "V), and the error after the local stage improves with larger groups; the paper settles on groups "
    "of 4 blocks for DeiT-B.",
    measure_group_size, summary_group_size, plot_group_size,
    ("kind", "group_size", "sparsity", "rank", "heldout_rel_error", "top1"))


# ----------------------------------------------------------------------------- sparsifiers
def measure_sparsifiers(ctx, opts, log):
    """§5, Table 3: dense, static, RigL and GMP at several budgets."""
    rows, groups = [], base_groups(ctx)
    for budget in grid(opts, (0.25, 0.5), (0.10, 0.25, 0.40, 0.50, 0.75)):
        for sp in PAPER_SPARSIFIERS:
            cfg = dataclasses.replace(ctx.base, budget=budget, sparsifier=sp)
            m = measure(ctx, cfg, groups, log=log)
            rows.append(run_row(ctx, cfg, groups, m, original_top1=original_top1(ctx)))
    return rows


def summary_sparsifiers(rows):
    m = mean_by(rows, ("budget", "sparsifier"), "heldout_rel_error")
    parts = []
    for b in sorted({k[0] for k in m}):
        order = sorted((v, k[1]) for k, v in m.items() if k[0] == b)
        parts.append(f"budget {b:g}: " + " < ".join(f"{s} {v:.3g}" for v, s in order))
    final = {r["sparsifier"]: r["achieved_sparsity"] for r in rows}
    return ("Held-out error, best first: " + "; ".join(parts) + "; final sparsity of V: " +
            ", ".join(f"{k} {v:.3f}" for k, v in final.items()) + ".")


SPARSIFIERS_STUDY = Study(
    "sparsifiers", "§5, Table 3",
    "GMP gives the best accuracy at every budget from 10% to 75%, ahead of RigL, static sparsity and a "
    "dense V of smaller rank; the gap is largest at small budgets.",
    measure_sparsifiers, summary_sparsifiers,
    lambda rows, plt: line_plot(rows, plt, "budget", "sparsifier", "sparsifiers", "budget"),
    ("budget", "sparsifier", "ranks", "achieved_sparsity", "heldout_rel_error", "top1"))


# ----------------------------------------------------------------------------- sparsity
def measure_sparsity(ctx, opts, log):
    """§5, Fig. 5b: target sparsity of V at a 17.5% budget."""
    rows, groups = [], base_groups(ctx)
    for s in grid(opts, (0.5, 0.75, 0.9, 0.96), (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.96)):
        cfg = dataclasses.replace(ctx.base, budget=0.175, sparsity=s)
        m = measure(ctx, cfg, groups, log=log)
        rows.append(run_row(ctx, cfg, groups, m, original_top1=original_top1(ctx)))
    return rows


def summary_sparsity(rows):
    best = min(rows, key=lambda r: r["heldout_rel_error"])
    return (f"At budget 0.175 the held-out error is lowest at target sparsity {best['sparsity']:g} "
            f"({best['heldout_rel_error']:.3g}, ranks {best['ranks']}); "
            + ", ".join(f"{r['sparsity']:g}: {r['heldout_rel_error']:.3g}" for r in rows) + ".")


SPARSITY = Study(
    "sparsity", "§5, Fig. 5b",
    "At a fixed 17.5% budget, trading rank for sparsity (a sparser V with a larger rank) lowers the "
    "error over much of the 50-96% range; the final recipe uses 75% sparsity.",
    measure_sparsity, summary_sparsity,
    lambda rows, plt: line_plot(rows, plt, "sparsity", None, "budget 0.175", "target sparsity of V"),
    ("sparsity", "ranks", "achieved_sparsity", "heldout_rel_error", "top1"))


# ----------------------------------------------------------------------------- ablations
# (name, config overrides): one component of the recipe changed at a time (fips_ref/ablations.py).
ABLATIONS = (("baseline (SVD init, global pruning)", {}),
             ("random (He) init", {"init": "random"}),
             ("uniform pruning", {"global_pruning": False}),
             ("scaling vectors", {"scaling_vectors": True}))


def measure_ablations(ctx, opts, log):
    """§5, Fig. 5a: one component of the recipe changed at a time."""
    rows, groups = [], base_groups(ctx)
    for name, change in ABLATIONS:
        cfg = dataclasses.replace(ctx.base, **change)
        m = measure(ctx, cfg, groups, log=log)
        rows.append(run_row(ctx, cfg, groups, m, ablation=name, original_top1=original_top1(ctx)))
    return rows


def summary_ablations(rows):
    return "Held-out error: " + "; ".join(f"{r['ablation']} {r['heldout_rel_error']:.3g}"
                                          + (f" (top-1 {r['top1']:.4f})" if r.get("top1") is not None else "")
                                          for r in rows) + "."


def plot_bars(rows, plt, label_key, title):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.barh(range(len(rows)), [r["heldout_rel_error"] for r in rows])
    ax.set(yticks=range(len(rows)), yticklabels=[r[label_key] for r in rows],
           xlabel="held-out relative MLP error", title=title)
    errs = [r["heldout_rel_error"] for r in rows]
    if min(errs) > 0 and max(errs) / min(errs) > 100:               # e.g. random init: log scale
        ax.set_xscale("log")
    return fig


ABLATIONS_STUDY = Study(
    "ablations", "§5, Fig. 5a",
    "SVD initialisation beats random (He) initialisation and global pruning beats uniform per-layer "
    "pruning; scaling vectors are not part of the final recipe.",
    measure_ablations, summary_ablations, lambda rows, plt: plot_bars(rows, plt, "ablation", "ablations"),
    ("ablation", "init", "global_pruning", "scaling_vectors", "heldout_rel_error", "top1"))


# ----------------------------------------------------------------------------- growth
# growth method -> the config field it sweeps and its grid (default, paper); None: one run.
GROWTH = {"hybrid": ("tau", (1.0, 32.0, 1024.0), (1.0, 2.0, 8.0, 32.0, 128.0, 1024.0)),
          "random": None, "split": None}


def measure_growth(ctx, opts, log):
    """§5: initialisation of the extra rank when r > d (fips_ref/ablations.py: grow), hybrid's τ swept."""
    rows, groups = [], base_groups(ctx)
    for method, sweep in GROWTH.items():
        field, default, paper = sweep or ("tau", (ctx.base.tau,), (ctx.base.tau,))
        for value in grid(opts, default, paper):
            cfg = dataclasses.replace(ctx.base, growth=method, **{field: value})
            m = measure(ctx, cfg, groups, log=log)
            grown = sum(r > b.d for r, b in zip(m["ranks"], [ctx.blocks[g[0]] for g in groups]))
            rows.append(run_row(ctx, cfg, groups, m, grown_groups=grown,
                                original_top1=original_top1(ctx)))
    return rows


def summary_growth(rows):
    text = ("Hybrid growth, held-out error by τ: " +
            ", ".join(f"{r['tau']:g}: {r['heldout_rel_error']:.3g}" for r in rows if r["growth"] == "hybrid"))
    others = [r for r in rows if r["growth"] != "hybrid"]
    if others:
        text += "; " + ", ".join(f"{r['growth']} growth {r['heldout_rel_error']:.3g}" for r in others)
    if not any(r["grown_groups"] for r in rows):
        text += " (no group's rank exceeds its width at this budget, so growth has no effect)"
    return text + "."


def plot_growth(rows, plt):
    """Hybrid's error against τ, the single-run methods as horizontal lines."""
    fig = line_plot([r for r in rows if r["growth"] == "hybrid"], plt, "tau", "growth", "growth when r > d", "τ")
    for ax, metric in zip(fig.axes, ("heldout_rel_error", "top1")):
        for r, style in zip((r for r in rows if r["growth"] != "hybrid"), ("--", ":", "-.")):
            if r.get(metric) is not None:
                ax.axhline(r[metric], ls=style, color="C1" if r["growth"] == "random" else "C2",
                           label=f"growth={r['growth']}")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    return fig


GROWTH_STUDY = Study(
    "growth", "§5",
    "When the rank exceeds the width, the hybrid initialisation (zero columns in U, copies of the top "
    "rows of S·Vh divided by τ in V) trains better than random growth or neuron splitting.",
    measure_growth, summary_growth, plot_growth,
    ("growth", "tau", "ranks", "heldout_rel_error", "top1"))


# ----------------------------------------------------------------------------- density
def measure_density(ctx, opts, log):
    """§5, Fig. 6a-b: final density of every layer's V after GMP with global pruning."""
    groups = base_groups(ctx)
    cfg = dataclasses.replace(ctx.base, sparsifier="gmp", global_pruning=True)
    m = measure(ctx, cfg, groups, log=log)
    rank = max(1, ctx.blocks[0].d // 4)
    rows = []
    for b in ctx.blocks:
        for layer in ("fc1", "fc2"):
            rows.append({"block": b.index, "layer": layer, "density": m["layer_density"][f"{b.prefix}.mlp.{layer}.V"],
                         "block_heldout_rel_error": m["errors"][b.index],
                         "block_svd_error_rank": rank,
                         "block_svd_error": tail_energy(module_matrix(ctx.ckpt, b), rank),
                         "budget": cfg.budget, "sparsity": cfg.sparsity, "groups": ",".join(
                             f"{g[0]}-{g[-1]}" for g in groups), "epochs": cfg.epochs, "seed": cfg.seed})
    return rows


def block_density(rows):
    return mean_by(rows, ("block",), "density")


def summary_density(rows):
    d = block_density(rows)
    blocks = sorted(d)
    err = mean_by(rows, ("block",), "block_heldout_rel_error")
    svd = mean_by(rows, ("block",), "block_svd_error")
    x = [d[b] for b in blocks]
    return (f"Final density per block ranges from {min(x):.3f} to {max(x):.3f}; its Spearman correlation "
            f"is {spearman(x, [err[b] for b in blocks]):.2f} with the block's held-out error after "
            f"the local stage and {spearman(x, [svd[b] for b in blocks]):.2f} with the block's "
            f"rank-{rows[0]['block_svd_error_rank']} SVD error.")


def plot_density(rows, plt):
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for layer in ("fc1", "fc2"):
        pts = [(r["block"], r["density"]) for r in rows if r["layer"] == layer]
        a.plot(*zip(*pts), marker="o", label=layer)
    a.set(xlabel="block", ylabel="final density of V", title="GMP, global pruning")
    a.legend()
    d = block_density(rows)
    err = mean_by(rows, ("block",), "block_heldout_rel_error")
    b.scatter([d[k] for k in sorted(d)], [err[k] for k in sorted(d)])
    for k in sorted(d):
        b.annotate(str(k[0]), (d[k], err[k]), fontsize=7)
    b.set(xlabel="block density", ylabel="held-out relative MLP error", yscale="log")
    return fig


DENSITY = Study(
    "density", "§5, Fig. 6a-b",
    "With global pruning GMP leaves different densities in different layers, and the density a "
    "block receives is related to how hard the block is to reconstruct.",
    measure_density, summary_density, plot_density, ("block", "layer", "density", "block_heldout_rel_error"))


# ----------------------------------------------------------------------------- calibration
def measure_calibration(ctx, opts, log):
    """§5: error / top-1 against calibration-set size (at the study's epochs) and epochs (at full size)."""
    rows, groups = [], base_groups(ctx)
    n = next(iter(ctx.train.values())).shape[0]
    fractions = grid(opts, (0.25, 0.5, 1.0), (0.125, 0.25, 0.5, 1.0))
    for size in sorted({max(ctx.base.batch_size, int(n * f)) for f in fractions if int(n * f) >= 1}):
        size = min(size, n)
        m = measure(ctx, ctx.base, groups, n_train=size if size < n else None, log=log)
        rows.append(run_row(ctx, ctx.base, groups, m, sweep="samples", train_samples=size,
                            original_top1=original_top1(ctx)))
    epochs_grid = grid(opts, (1, 2 * ctx.base.epochs), (1, 2, 5, 10, 20, 40))
    for epochs in sorted(set(epochs_grid) | {ctx.base.epochs}):    # the study's epochs included
        cfg = dataclasses.replace(ctx.base, epochs=epochs)
        m = measure(ctx, cfg, groups, log=log)
        rows.append(run_row(ctx, cfg, groups, m, sweep="epochs", train_samples=n,
                            original_top1=original_top1(ctx)))
    return rows


def summary_calibration(rows):
    s = sorted((r["train_samples"], r["heldout_rel_error"]) for r in rows if r["sweep"] == "samples")
    e = sorted((r["epochs"], r["heldout_rel_error"]) for r in rows if r["sweep"] == "epochs")
    return ("Held-out error by training samples: " + ", ".join(f"{a}: {b:.3g}" for a, b in s) +
            "; by epochs: " + ", ".join(f"{a}: {b:.3g}" for a, b in e) +
            f" (final sparsity of V {min(r['achieved_sparsity'] for r in rows):.3f}-"
            f"{max(r['achieved_sparsity'] for r in rows):.3f}: shorter runs end nearer the target).")


def plot_calibration(rows, plt):
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, sweep, x, label in ((a, "samples", "train_samples", "calibration samples (training split)"),
                                (b, "epochs", "epochs", "epochs")):
        pts = sorted((r[x], r["heldout_rel_error"]) for r in rows if r["sweep"] == sweep)
        ax.plot(*zip(*pts), marker="o")
        ax.set(xlabel=label, ylabel="held-out relative MLP error", yscale="log")
    return fig


CALIBRATION = Study(
    "calibration", "§5",
    "The local stage needs little calibration data: the paper calibrates on a few thousand ImageNet "
    "images for 20 epochs, with diminishing returns from more images or epochs.",
    measure_calibration, summary_calibration, plot_calibration,
    ("sweep", "train_samples", "epochs", "achieved_sparsity", "heldout_rel_error", "top1"))
