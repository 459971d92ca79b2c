"""Closed-form options against the authors' recipe on the bundled demo (issue 10; docs/closed-form.md).

    python bench/closed_form.py [--budgets 0.25,0.4,0.5] [--train 384] [--epochs 20]
                                [--methods authors,paper,whitened,als,als+adam] [--steps 0,50,150,600]

The first --train calibration samples are optimised on; the rest are held out. For every budget
and method it prints the held-out relative MLP output error (mean over blocks, LayerScale-
weighted as relative_errors), the achieved V density and the wall time of the local stage.
--steps N runs the AdamW-based methods for N steps (epochs = N / steps per epoch). Top-1 is the
CLI's job (python -m fips_ref.compress --init/--solver ... reports it).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fips_ref.calib import load_calib_acts  # noqa: E402
from fips_ref.checkpoint import find_mlp_blocks, load_checkpoint  # noqa: E402
from fips_ref.compress import DEMO_ACTS, DEMO_CKPT  # noqa: E402
from fips_ref.local_stage import FiPSConfig, dense_weights, relative_errors, run_local_stage  # noqa: E402
from fips_ref.sharing import default_groups  # noqa: E402
from fips_ref.sparsity import density  # noqa: E402

METHODS = {"authors": dict(), "paper": dict(variant="paper"), "whitened": dict(init="whitened"),
           "als": dict(init="whitened", solver="als"), "als+adam": dict(init="whitened", solver="als+adam")}


def run_one(ckpt, blocks, groups, train, held, cfg, order=None):
    """(held-out mean relative error, density, seconds) of one local stage."""
    t0 = time.perf_counter()
    r = run_local_stage(dict(ckpt.tensors), train, groups, cfg, blocks=blocks, errors=False,
                        batch_order=order)
    seconds = time.perf_counter() - t0
    dense = dense_weights(ckpt.tensors, blocks, xp=np, dtype=np.float32)
    err = relative_errors(r.params, r.masks, r.groups, dense, held, xp=np, dtype=np.float32)
    return float(np.mean(list(err.values()))), density(r.masks), seconds


def init_comparison(ckpt, blocks, groups, train, held, budget):
    """--init svd vs whitened, no training: Eq. (1) and held-out error after one prune to the target."""
    from fips_ref.closed_form import group_terms, objective, whitened_init
    from fips_ref.local_stage import init_factors, plan_groups
    from fips_ref.sparsity import initial_masks
    from fips_ref.stats import block_stats
    cfg = FiPSConfig(budget=budget)
    plan = plan_groups(cfg, blocks, groups)
    d64 = dense_weights(ckpt.tensors, blocks, xp=np, dtype=np.float64)
    stats = block_stats(train, d64, xp=np)
    gam = {b: d64[b][4] for b in d64 if d64[b][4] is not None}
    terms = {g.index: group_terms(ckpt.tensors, g, stats, gam, xp=np) for g in plan}
    svd = init_factors(ckpt.tensors, plan, xp=np, dtype=np.float64, tau=cfg.tau)
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
        err = relative_errors(params, masks, plan, d64, held, xp=np, dtype=np.float64)
        print(f"{budget:.2f}    init {name:9s} pruned to {cfg.sparsity}: Eq. (1) {eq1:.4e}, "
              f"held-out rel. error {np.mean(list(err.values())):.4e}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.25,0.4,0.5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--train", type=int, default=384)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", help="comma-separated AdamW step counts instead of --epochs")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--init-only", action="store_true", help="compare the two inits, no training")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(DEMO_CKPT)
    blocks = find_mlp_blocks(ckpt)
    acts = load_calib_acts(DEMO_ACTS, blocks)
    train = {b: a[:args.train] for b, a in acts.items()}
    held = {b: a[args.train:] for b, a in acts.items()}
    groups = default_groups(blocks, args.group_size)
    per_epoch = args.train // FiPSConfig().batch_size
    runs = [None] if not args.steps else [int(s) for s in args.steps.split(",")]
    if args.init_only:
        for budget in (float(b) for b in args.budgets.split(",")):
            init_comparison(ckpt, blocks, groups, train, held, budget)
        return
    print("budget  method     steps  held-out rel. error  V density  seconds", flush=True)
    for budget in (float(b) for b in args.budgets.split(",")):
        for name in args.methods.split(","):
            for steps in runs:
                if steps is not None and name == "als":
                    if steps != runs[0]:
                        continue
                    epochs = 0
                else:
                    epochs = args.epochs if steps is None else -(-steps // per_epoch)
                cfg = FiPSConfig(budget=budget, epochs=max(epochs, 1), **METHODS[name])
                order = [] if epochs == 0 and name != "als" else None    # 0 steps: the init
                try:
                    err, dens, sec = run_one(ckpt, blocks, groups, train, held, cfg, order)
                except Exception as e:                  # e.g. 0 steps where the stage refuses
                    print(f"{budget:.2f}    {name:9s}  {steps}  failed: {e}", flush=True)
                    continue
                shown = "-" if name == "als" else epochs * per_epoch
                print(f"{budget:.2f}    {name:9s}  {shown:>5}  {err:.4e}           {dens:.4f}     {sec:.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
