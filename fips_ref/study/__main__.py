"""python -m fips_ref.study NAME [CKPT.npz] — one experiment of the FiPS paper, measured.

NAME is one of the studies below or 'all'. With no checkpoint it runs on the bundled demo
(weights/vit_digits.npz, its recorded calibration activations and its held-out digits).
Writes OUT/NAME.csv, OUT/NAME.md and, with matplotlib installed, OUT/NAME.png.
"""
import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time

import numpy as np

from ..backend import BackendError, load_backend
from ..checkpoint import InputError, error_line, find_mlp_blocks, load_checkpoint
from ..cli import POSITIVE_INT, OneLineParser, ranged
from ..compress import DEMO_CKPT, calibration, demo_defaults
from ..local_stage import FiPSConfig
from . import STUDIES
from .context import Context, split_calibration
from .output import load_pyplot, save_figure, say_no_matplotlib, text_table, write_csv, write_markdown

STUDY_EPOCHS = 4          # the authors run 20; the study's default is smaller so 'all' fits the demo budget
STUDY_BATCH = 64


def build_parser():
    p = OneLineParser(prog="python -m fips_ref.study", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", choices=tuple(STUDIES) + ("all",), metavar="NAME",
                   help="one of " + ", ".join(STUDIES) + ", or all")
    p.add_argument("checkpoint", nargs="?", help="input .npz (default: the bundled demo)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--calib-acts", help="recorded MLP inputs, keys mlp_in.{i}, [N, T, D] or [N, D]")
    src.add_argument("--calib", help="folder of calibration images, recorded through the model's forward")
    p.add_argument("--calib-images", type=POSITIVE_INT, help="use at most this many calibration samples")
    p.add_argument("--eval-data", help="images+labels .npz or labelled folder: top-1 of every run")
    p.add_argument("--out", default="study", help="output folder (created if missing)")
    p.add_argument("--holdout", type=ranged(0, 1, lo_open=True, hi_open=True), default=0.25,
                   help="fraction of calibration samples held out for the error (seeded split)")
    p.add_argument("--paper-grid", action="store_true",
                   help="the paper's grid of points and the authors' 20 epochs instead of the small default")
    p.add_argument("--epochs", type=POSITIVE_INT, help=f"local-stage epochs (default {STUDY_EPOCHS}; "
                   "20 with --paper-grid)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=STUDY_BATCH, help="samples per step")
    p.add_argument("--budget", type=ranged(0, 1, lo_open=True), default=FiPSConfig.budget,
                   help="budget where a study does not vary it")
    p.add_argument("--sparsity", type=ranged(0, 1, hi_open=True), default=FiPSConfig.sparsity,
                   help="target sparsity of V where a study does not vary it")
    p.add_argument("--group-size", type=POSITIVE_INT, default=4, help="blocks per group where not varied")
    p.add_argument("--lr", type=ranged(0, 10, lo_open=True), default=FiPSConfig.lr, help="AdamW lr")
    p.add_argument("--rank", type=POSITIVE_INT, help="rank of the pairs study (default: width / 4)")
    p.add_argument("--seed", type=ranged(0, 2**63 - 1, kind=int), default=0,
                   help="batch order and the train / held-out split")
    p.add_argument("--backend", choices=("numpy", "cupy"), help="default: $FIPS_REF_BACKEND or numpy")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute precision")
    p.add_argument("--max-memory", type=ranged(0, 1e6), default=4.0, help="GiB for recorded activations")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def load_context(args, log):
    """Checkpoint, calibration split and evaluation data (the demo's when no checkpoint is given)."""
    ckpt = load_checkpoint(demo_defaults(args))
    blocks = find_mlp_blocks(ckpt)
    xp = load_backend(args.backend)
    dtype = np.dtype(args.dtype).type
    images = labels = None
    if args.eval_data:
        from ..evaluate import eval_data
        images, labels = eval_data(args.eval_data, ckpt, batch_size=args.batch_size, need_labels=True)[:2]
        if not isinstance(images, np.ndarray):       # a folder streams: keep it in memory for many runs
            parts = list(images)
            images = np.concatenate([p[0] if isinstance(p, tuple) else p for p in parts])
    cargs = argparse.Namespace(calib_acts=args.calib_acts, calib=args.calib, calib_images=args.calib_images,
                               max_memory=args.max_memory, synthetic_samples=256, seed=args.seed,
                               dtype=args.dtype, batch_size=args.batch_size, calib_augment=False,
                               skip_bad_images=False, out=os.path.join(tempfile.gettempdir(), "acts"))
    acts, calib, store = calibration(cargs, ckpt, blocks, xp, log)
    try:
        train, held = split_calibration(acts, args.holdout, args.seed)
    finally:
        if store is not None:
            store.cleanup()
    epochs = args.epochs or (20 if args.paper_grid else STUDY_EPOCHS)
    base = FiPSConfig(budget=args.budget, sparsity=args.sparsity, epochs=epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    return Context(ckpt, blocks, train, held, base, group_size=args.group_size, xp=xp, dtype=dtype,
                   eval_images=images, eval_labels=labels, calib_note=calib["source"])


def command_line(name, argv):
    """The exact command that reproduces one study (with 'all' replaced by the study's name)."""
    rest = [a for a in argv if a != "all" and a not in STUDIES]
    return "python -m fips_ref.study " + " ".join(shlex.quote(a) for a in [name] + rest)


def run_study(study, ctx, args, argv, log, plt):
    """Measure one study and write its CSV, PNG (when possible) and Markdown; returns the rows."""
    t0 = time.perf_counter()
    log(f"study {study.name} ({study.section})")
    rows = study.measure(ctx, args, log)
    stem = os.path.join(args.out, study.name)
    write_csv(stem + ".csv", rows)
    png = None
    if plt is not None:
        png = stem + ".png"
        save_figure(plt, study.plot(rows, plt), png)
    measured = study.summary(rows)
    write_markdown(stem + ".md", study, study.paper, measured, command_line(study.name, argv), png)
    print(f"== {study.name} ({study.section}), {time.perf_counter() - t0:.0f} s: {measured}")
    if plt is None:
        print(text_table(rows, [c for c in study.table if any(c in r for r in rows)]))
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    names = list(STUDIES) if args.name == "all" else [args.name]
    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise InputError(f"--out {args.out}: is a file, expected a folder")
        needs_calib = any(STUDIES[n].needs_training for n in names)
        ctx = load_context(args, log) if needs_calib else weights_only_context(args)
        os.makedirs(args.out, exist_ok=True)
        plt = load_pyplot()
        if plt is None:
            say_no_matplotlib()
        with np.errstate(all="ignore"):
            for name in names:
                run_study(STUDIES[name], ctx, args, argv, log, plt)
    except (InputError, BackendError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        return 2
    return 0


def weights_only_context(args):
    """A Context without calibration data, for the studies of the weights alone."""
    ckpt = load_checkpoint(args.checkpoint or DEMO_CKPT)
    base = FiPSConfig(budget=args.budget, sparsity=args.sparsity, seed=args.seed)
    return Context(ckpt, find_mlp_blocks(ckpt), {}, {}, dataclasses.replace(base), group_size=args.group_size)


if __name__ == "__main__":
    sys.exit(main())
