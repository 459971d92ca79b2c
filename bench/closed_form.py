"""Closed-form options against the authors' recipe on the bundled demo (issue 10; docs/closed-form.md).

    python bench/closed_form.py [--budgets 0.25,0.4,0.5] [--train 384] [--epochs 20]
        [--methods authors,paper,whitened,als,als+adam] [--als 3x1x10,1x1x5] [--steps 0,50,150,600]

The first --train calibration samples are optimised on; the rest are held out. For every budget
and method it prints a Markdown row: the held-out relative MLP output error (mean over blocks,
LayerScale-weighted as relative_errors), the achieved V density, the local stage's wall seconds,
top-1 on the demo's digits_test.npz through the compressed model, and the error and time as
ratios to the authors' recipe (--epochs) of the same budget in the same run (so machine load cancels as far
as it can). --als lists ALS settings ROUNDSxSWEEPSxITERS[xTOL] (--als-rounds/--als-sweeps/
--als-iters/--als-tol); each gives an 'als' row, the first also an 'als+adam' row. --steps N runs the AdamW-based
methods for exactly N steps (N = 0: the start of the method; for als+adam, N steps after ALS;
ALS alone has only N = 0). Wall times on a shared machine vary: read the ratios.
"""
import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fips_ref.calib import load_calib_acts  # noqa: E402
from fips_ref.checkpoint import Checkpoint, find_mlp_blocks, load_checkpoint  # noqa: E402
from fips_ref.compress import DEMO_ACTS, DEMO_CKPT, DEMO_TEST  # noqa: E402
from fips_ref.evaluate import evaluate, model_input_shape, npz_data  # noqa: E402
from fips_ref.local_stage import FiPSConfig, dense_weights, epoch_batches, relative_errors, run_local_stage  # noqa: E402
from fips_ref.sharing import default_groups  # noqa: E402
from fips_ref.sparsity import density  # noqa: E402
from fips_ref.study.context import compressed_tensors  # noqa: E402

METHODS = {"authors": dict(), "paper": dict(variant="paper"), "whitened": dict(init="whitened"),
           "als": dict(init="whitened", solver="als"), "als+adam": dict(init="whitened", solver="als+adam")}


def als_setting(text):  # '3x1x10[x0.01]' -> config fields
    parts = text.split("x")
    out = dict(als_rounds=int(parts[0]), als_sweeps=int(parts[1]), als_iters=int(parts[2]))
    if len(parts) > 3:
        out["als_tol"] = float(parts[3])
    return out


def exact_order(n, batch_size, steps, seed):
    """The authors' batch order cut to exactly ``steps`` steps (epochs filled in order)."""
    per_epoch = n // batch_size
    epochs = epoch_batches(n, batch_size, max(1, -(-steps // per_epoch)), seed)
    flat = [b for e in epochs for b in e][:steps]
    return [flat[i:i + per_epoch] for i in range(0, len(flat), per_epoch)]


def run_one(ctx, cfg, order=None):
    """{'error', 'density', 'seconds', 'top1'} of one local stage (top-1 not timed)."""
    t0 = time.perf_counter()
    r = run_local_stage(dict(ctx.ckpt.tensors), ctx.train, ctx.groups, cfg, blocks=ctx.blocks,
                        errors=False, batch_order=order)
    seconds = time.perf_counter() - t0
    err = relative_errors(r.params, r.masks, r.groups, ctx.dense, ctx.held, xp=np, dtype=np.float32)
    model = Checkpoint(ctx.ckpt.path, ctx.ckpt.config, compressed_tensors(ctx, r))
    top1 = evaluate(model, ctx.images, ctx.labels, dtype=np.float32, xp=np)["top1"]
    return dict(error=float(np.mean(list(err.values()))), density=density(r.masks) if r.masks else 1.0,
                seconds=seconds, top1=top1)


def init_comparison(ctx, budget):
    """--init svd vs whitened, no training: Eq. (1) and held-out error after one prune to the target."""
    from fips_ref.closed_form import group_terms, objective, whitened_init
    from fips_ref.local_stage import init_factors, plan_groups
    from fips_ref.sparsity import initial_masks
    from fips_ref.stats import block_stats
    cfg = FiPSConfig(budget=budget)
    plan = plan_groups(cfg, ctx.blocks, ctx.groups)
    d64 = dense_weights(ctx.ckpt.tensors, ctx.blocks, xp=np, dtype=np.float64)
    stats = block_stats(ctx.train, d64, xp=np)
    gam = {b: d64[b][4] for b in d64 if d64[b][4] is not None}
    terms = {g.index: group_terms(ctx.ckpt.tensors, g, stats, gam, xp=np) for g in plan}
    svd = init_factors(ctx.ckpt.tensors, plan, xp=np, dtype=np.float64, tau=cfg.tau)
    white = dict(svd)
    for g in plan:
        U, Vs = whitened_init(terms[g.index], g.rank, cfg.tau)
        white[f"U.{g.index}"] = U
        white.update({f"{l.key}.V": V for l, V in zip(g.layers, Vs)})
    for name, params in (("svd", svd), ("whitened", white)):
        masks = initial_masks({k: v for k, v in params.items() if k.endswith(".V")}, cfg.sparsity)
        eq1 = sum(float(objective(params[f"U.{g.index}"], [params[f"{l.key}.V"] * masks[f"{l.key}.V"]
                                                          for l in g.layers], terms[g.index]))
                  for g in plan)
        err = relative_errors(params, masks, plan, d64, ctx.held, xp=np, dtype=np.float64)
        print(f"{budget:.2f}    init {name:9s} pruned to {cfg.sparsity}: Eq. (1) {eq1:.4e}, "
              f"held-out rel. error {np.mean(list(err.values())):.4e}", flush=True)


def runs(methods, als_list):
    """(label, config fields) for every requested method; ALS methods once per --als setting."""
    for name in methods:
        if name in ("als", "als+adam"):
            for text in (als_list if name == "als" else als_list[:1]):   # als+adam: the first only
                yield f"{name} {text}", dict(METHODS[name], **als_setting(text))
        else:
            yield name, METHODS[name]


def measure(ctx, args, budget, fields, steps):
    """run_one for a method at a budget, ``steps`` exact AdamW steps (None: --epochs); a message on failure."""
    cfg = FiPSConfig(budget=budget, epochs=args.epochs, **fields)
    order = None if steps is None else exact_order(args.train, cfg.batch_size, steps, cfg.seed)
    try:
        m = run_one(ctx, cfg, order)
    except Exception as e:                                     # e.g. 0 steps where a schedule refuses
        return str(e)
    m["steps"] = args.epochs * (args.train // cfg.batch_size) if steps is None else steps
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.25,0.4,0.5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--als", default="3x1x10", help="ALS settings ROUNDSxSWEEPSxITERS[xTOL], comma-separated")
    p.add_argument("--train", type=int, default=384)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", help="comma-separated exact AdamW step counts instead of --epochs")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--init-only", action="store_true", help="compare the two inits, no training")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(DEMO_CKPT)
    blocks = find_mlp_blocks(ckpt)
    acts = load_calib_acts(DEMO_ACTS, blocks)
    images, labels = npz_data(str(DEMO_TEST), model_input_shape(ckpt.config))
    ctx = SimpleNamespace(ckpt=ckpt, blocks=blocks, groups=default_groups(blocks, args.group_size),
                          train={b: a[:args.train] for b, a in acts.items()},
                          held={b: a[args.train:] for b, a in acts.items()},
                          dense=dense_weights(ckpt.tensors, blocks, xp=np, dtype=np.float32),
                          images=images, labels=labels)
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.init_only:
        for budget in budgets:
            init_comparison(ctx, budget)
        return
    top1 = evaluate(ckpt, images, labels, dtype=np.float32, xp=np)["top1"]
    print(f"original top-1 {top1:.4f} on {len(labels)} images; load {os.getloadavg()[0]:.1f}", flush=True)
    print("| budget | method | steps | held-out error | × authors | V density | seconds | × authors | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    steps_list = [None] if not args.steps else [int(s) for s in args.steps.split(",")]
    for budget in budgets:
        ref = measure(ctx, args, budget, METHODS["authors"], None)    # the authors' recipe: every ratio's base
        done = {("authors", None): ref}
        for steps in steps_list:                                   # shortest runs first
            for label, fields in runs(args.methods.split(","), args.als.split(",")):
                if label.startswith("als ") and steps not in (None, steps_list[0]):
                    continue                                       # ALS alone takes no step
                m = done.get((label, steps)) or measure(ctx, args, budget, fields, steps)
                if isinstance(m, str):
                    print(f"| {budget:.2f} | {label} | {steps} | failed: {m} |", flush=True)
                    continue
                n = 0 if label.startswith("als ") else m["steps"]
                rel = ((f"{m['error'] / ref['error']:.3f}", f"{m['seconds'] / ref['seconds']:.2f}")
                       if isinstance(ref, dict) else ("-", "-"))
                print(f"| {budget:.2f} | {label} | {n} | {m['error']:.3e} | {rel[0]} | {m['density']:.4f} | "
                      f"{m['seconds']:.1f} | {rel[1]} | {m['top1']:.4f} |", flush=True)
        print(f"(budget {budget:.2f} done; load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
