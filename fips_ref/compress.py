"""python -m fips_ref.compress [CKPT.npz] — the local stage of FiPS, checkpoint to compressed checkpoint.

With no argument it compresses the bundled demo (weights/vit_digits.npz) with its recorded
calibration activations and reports accuracy before and after on the demo's held-out digits.
Every default is the authors' where they published one; ``--help`` says where each comes from.
"""
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .backend import device_name, load_backend, peak_device_bytes
from .budget import storage_bits
from .calib import ActivationStore, DiskArray, load_calib_acts, save_acts, synthetic_acts
from .checkpoint import InputError, find_mlp_blocks, json_entry, load_checkpoint, save_json_atomic, save_npz_atomic
from .cli import POSITIVE_INT, HelpFormatter, OneLineParser, check_paths, parse, ranged, run_cli
from .codec import encode, live_rank_columns
from .outputs import all_or_nothing
from .local_stage import LOSSES, FiPSConfig, config_dict, plan_groups, run_local_stage
from .ablations import GROWTHS, INITS
from .sharing import STRATEGIES, STRATEGY_ALIASES, check_groups, choose_groups, strategy_name
from .sparsifiers import per_layer_only
from .sparsity import SPARSIFIERS, density, describe
from .codec_condensed import condensed_m, condensed_summary
from .structured import HELP, gamma_sal, nm_pattern, nm_sparsity
from .validate import check_steps

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
DEMO_CKPT = WEIGHTS / "vit_digits.npz"
DEMO_ACTS = WEIGHTS / "vit_digits_calib.npz"
DEMO_TEST = WEIGHTS / "digits_test.npz"


# ----------------------------------------------------------------------------- flags
def build_parser():
    d = FiPSConfig()
    p = OneLineParser(prog="python -m fips_ref.compress", description=__doc__.splitlines()[0],
                      formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="input .npz (default: the bundled demo, weights/vit_digits.npz)")
    io = p.add_argument_group("files")
    io.add_argument("--out", help="compressed .npz (default: beside the input, NAME.fips.npz)")
    io.add_argument("--report", help="write a JSON report here (fields: docs/report.md)")
    src = io.add_mutually_exclusive_group()
    src.add_argument("--calib-acts", help="recorded MLP inputs, keys mlp_in.{i}, [M, D] or [N, T, D]")
    src.add_argument("--calib", help="folder of calibration images, recorded through the model's forward")
    io.add_argument("--calib-images", type=POSITIVE_INT, help="use at most this many calibration images, a seeded subset (authors: 3840, docs/authors-code.md §4.1)")
    io.add_argument("--calib-augment", action="store_true",
                    help="authors' training augmentation for calibration images (docs/authors-code.md §4.1)")
    io.add_argument("--skip-bad-images", action="store_true",
                    help="skip calibration images Pillow cannot read (a warning each) instead of failing")
    io.add_argument("--save-acts", help="keep the recorded MLP inputs in this .npz for --calib-acts")
    io.add_argument("--max-memory", type=ranged(0, 1e6), default=4.0,
                    help="GiB of calibration activations (and the targets cached with them) kept in "
                         "RAM; above, they stay on disk as float16 .npy / uncompressed .npz, read "
                         "a batch at a time, and the targets are recomputed")
    io.add_argument("--synthetic-samples", type=POSITIVE_INT, default=256,
                    help="samples per block synthesised from norm2 when no calibration data is given")
    io.add_argument("--eval-data", help="images+labels .npz or labelled folder: accuracy before/after")
    a = p.add_argument_group("FiPS (paper §3; docs/authors-code.md §1-§3)")
    a.add_argument("--budget", type=ranged(0, 1, lo_open=True), default=d.budget,
                   help="fraction of MLP weights kept (U + nnz V); paper §3, rank formula docs/authors-code.md §2")
    a.add_argument("--sparsity", type=ranged(0, 1, hi_open=True), help="target sparsity of V (default 0.75: authors' configs, docs/authors-code.md §2, §5; with --sparsifier nm: 1 - N/M)")
    a.add_argument("--sparsifier", choices=SPARSIFIERS, default=d.sparsifier,
                   help="static, gmp, rigl: docs/authors-code.md §5.2, §5.3, §5.5; gmp is the paper's final "
                        "recipe (§4). set, srigl, nm: docs/deployment.md §2 (stored condensed). "
                        + " ".join(f"{k}: {HELP[k]}." for k in ("set", "srigl", "nm")))
    a.add_argument("--fan-in", dest="fan_in", choices=("any", "constant"), default=d.fan_in,
                   help=f"with --sparsifier set (default any: unstructured, as SET). {HELP['fan_in']}")
    a.add_argument("--gamma-sal", dest="gamma_sal", type=gamma_sal, default=d.gamma_sal,
                   help=HELP["gamma_sal"] + " (srigl only)")
    a.add_argument("--nm", type=nm_pattern, default=d.nm,
                   help="N:M of --sparsifier nm (default 1:4: sparsity 0.75, the authors' configs' "
                        "sparsity; 2:4 is 0.5); sets --sparsity to 1 - N/M, docs/deployment.md §2")
    a.add_argument("--group-size", type=POSITIVE_INT,
                   help="blocks per group, inside each stage (default: 4 where it divides every "
                        "stage, as DeiT-B's paper groups; otherwise the paper's groups)")
    a.add_argument("--groups", help="'paper' (ViT: groups of 4; Swin: per stage, stages over 6 "
                                    "blocks in groups of 6; docs/options.md) or explicit groups, "
                                    "e.g. 0-3,4-7,8-11 (overrides --group-size)")
    a.add_argument("--concat", choices=STRATEGIES + tuple(STRATEGY_ALIASES), default=d.strategy,
                   help="how a group's layers form C (paper §2.2, Fig. 2c, App. A.1; docs/algorithm.md): "
                        "long = I, one basis on the model width (authors' concat_axis 1); short = IV, "
                        "on the hidden width; by-type = II, a basis per layer type and a V per block; "
                        "by-block = III, a basis per block and a V per layer type (the numerals are "
                        "accepted too)")
    a.add_argument("--growth", choices=GROWTHS, default=d.growth,
                   help="rank units past min(rows, cols) of C (paper §5 'random growth', 'neuron "
                        "splitting'): hybrid = the authors' zero U columns and V rows / τ "
                        "(docs/authors-code.md §3); random = He-initialised V rows; split = Net2Net "
                        "splitting of the largest units (docs/options.md)")
    a.add_argument("--scaling-vectors", dest="scaling_vectors", action="store_true",
                   help="paper §5 ablation, DoRA-style: SVD of C with unit-norm columns, a trained "
                        "magnitude per column, folded into V at export (authors: off; docs/options.md)")
    a.add_argument("--tau", type=ranged(0, 1e9, lo_open=True), default=d.tau, help="growth divisor τ when the rank exceeds the width (authors' code: 32, docs/authors-code.md §3, docs/differences.md D4)")
    a.add_argument("--round-to", type=ranged(0, 10**6, kind=int), default=d.round_to,
                   help="round the rank down to a multiple (authors' LLM structured_sparsity: 64; vision configs: off = 0, docs/authors-code.md §2, B1)")
    a.add_argument("--variant", choices=("authors", "paper"), default=d.variant,
                   help="paper: cubic denominator t_end-t_accel, zero-initialised regrowth, 25%% initial GMP (docs/differences.md)")
    a.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="mlp: error of each block's MLP output (authors' code, docs/authors-code.md "
                        "§4.3); fc: paper Eq. (1), each fc layer on its own original input")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--global-pruning", dest="global_pruning", action="store_true", default=None,
                   help="one magnitude threshold over every V (default, every vision config, docs/authors-code.md "
                        "§5.4); not for srigl, nm, set --fan-in constant: constant fan-in and N:M are per "
                        "layer, so those default to --uniform-pruning")
    g.add_argument("--uniform-pruning", dest="global_pruning", action="store_false",
                   help="per-layer threshold (the paper's 'local pruning')")
    t = p.add_argument_group("optimisation (docs/authors-code.md §4.4, §5)")
    t.add_argument("--epochs", type=POSITIVE_INT, default=d.epochs, help="passes over the calibration set (authors: 20, docs/authors-code.md §4.1)")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=d.batch_size, help="samples per step (authors: 128, docs/authors-code.md §4.1)")
    t.add_argument("--lr", type=ranged(0, 10, lo_open=True), default=d.lr,
                   help="AdamW lr; the authors' DeiT value is unpublished, see docs/options.md")
    t.add_argument("--eta-min", type=ranged(0, 10), default=d.eta_min, help="cosine floor (swin_large_config.yaml)")
    t.add_argument("--weight-decay", type=ranged(0, 10), default=d.weight_decay, help="AdamW decoupled weight decay (configs: 0.05, docs/authors-code.md §4.4)")
    t.add_argument("--beta1", type=ranged(0, 1, hi_open=True), default=d.beta1, help="AdamW β1 (configs: 0.9, docs/authors-code.md §4.4)")
    t.add_argument("--beta2", type=ranged(0, 1, hi_open=True), default=d.beta2, help="AdamW β2 (configs: 0.999, docs/authors-code.md §4.4)")
    t.add_argument("--eps", type=ranged(0, 1, lo_open=True), default=d.eps, help="AdamW ε (configs: 9.999e-9, docs/authors-code.md §4.4)")
    t.add_argument("--gmp-initial", type=ranged(0, 1, hi_open=True),
                   help="GMP start sparsity (default: 0.05 configs; 0.25 with --variant paper)")
    t.add_argument("--gmp-accelerated", type=ranged(0, 1, hi_open=True), default=d.gmp_accelerated,
                   help="GMP sparsity at t_accel (configs: 0.5)")
    t.add_argument("--t-accel", type=ranged(0, 10**9, kind=int),
                   help="GMP acceleration step (default: 240, swin_large_config.yaml; runs under 600 steps: 240/600 of the run; paper: 25%% of the run)")
    t.add_argument("--t-end-coeff", type=ranged(0, 1, lo_open=True), default=d.t_end_coeff,
                   help="sparsity schedule ends at this fraction of the run (configs: 0.75)")
    t.add_argument("--delta-t", type=POSITIVE_INT, help="steps between mask updates (default: 50, configs; runs under 600 steps: ⌊run·50/600⌋)")
    t.add_argument("--rigl-drop-fraction", type=ranged(0, 1), default=d.rigl_drop_fraction,
                   help="RigL q (swin_large_config.yaml: 0.1, docs/authors-code.md §5.5)")
    t.add_argument("--seed", type=ranged(0, 2**63 - 1, kind=int), default=d.seed, help="batch order and synthesis; same seed, same result on the same backend (docs/options.md)")
    t.add_argument("--init", choices=INITS, default=d.init,
                   help="svd: truncated SVD of C (authors, paper §3); random: He initialisation of U "
                        "and V (paper §5 ablation, docs/options.md); whitened: activation-aware init "
                        "from calibration moments (docs/closed-form.md; not the authors')")
    t.add_argument("--solver", choices=("adam", "als", "als+adam"), default=d.solver,
                   help="als: closed-form alternating solves on Eq. (1) to the exact budget (docs/closed-form.md)")
    t.add_argument("--als-rounds", type=POSITIVE_INT, default=d.als_rounds, help="pruning rounds of --solver als, the last at exactly the budget (docs/closed-form.md §5; our choice)")
    t.add_argument("--als-sweeps", type=POSITIVE_INT, default=d.als_sweeps,
                   help="most ALS sweeps (all V-steps, then the U-step) per pruning round (docs/closed-form.md §5; our choice)")
    t.add_argument("--als-tol", type=ranged(0, 1), default=d.als_tol,
                   help="end a round's sweeps once one lowers Eq. (1) by less than this fraction; 0: always --als-sweeps (docs/closed-form.md §5)")
    t.add_argument("--als-iters", type=POSITIVE_INT, default=d.als_iters,
                   help="conjugate-gradient iterations per ALS solve, warm-started (docs/closed-form.md §3-4; our choice)")
    r = p.add_argument_group("execution")
    r.add_argument("--backend", choices=("numpy", "cupy"), help="default: $FIPS_REF_BACKEND or numpy")
    r.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute precision")
    r.add_argument("--storage-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of U and V values in the file (paper §3 counts 16 bits)")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def fips_config(args):
    """FiPSConfig from parsed flags: every field from the flag of the same name (--concat sets strategy).

    Flags left at None get their structure-aware default: --sparsity 1 - N/M for nm, else 0.75;
    pruning per layer for the per-layer-only sparsifiers (srigl, nm, set --fan-in constant), else global.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FiPSConfig) if hasattr(args, f.name)}
    if values.get("sparsity", 0) is None:
        nm = values.get("nm", FiPSConfig.nm)
        values["sparsity"] = nm_sparsity(*nm) if values.get("sparsifier") == "nm" else FiPSConfig.sparsity
    if values.get("global_pruning", 0) is None:
        values["global_pruning"] = not per_layer_only(FiPSConfig(**{**values, "global_pruning": True}))
    return FiPSConfig(**values, strategy=strategy_name(args.concat))


# ----------------------------------------------------------------------------- calibration
def token_count(config):
    """Tokens per image of a ViT (patches + prefix tokens); 49 for Swin (one 7×7 window)."""
    if config["arch"] != "vit":
        return 49
    size, patch = config.get("img_size", 224), config.get("patch_size", 16)
    h, w = (size, size) if isinstance(size, int) else size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return (h // ph) * (w // pw) + int(config.get("class_token", True)) + int(config.get("distilled", False))


def calibration(args, ckpt, blocks, xp, log):
    """(acts, description, store or None) from --calib-acts, --calib or synthesis."""
    if args.calib_acts:
        acts = load_calib_acts(args.calib_acts, blocks, max_bytes=int(args.max_memory * 2**30))
        if args.calib_images:
            n = args.calib_images
            acts = {i: a.head(n) if isinstance(a, DiskArray) else a[:n] for i, a in acts.items()}
        return acts, {"source": "activations", "path": args.calib_acts}, None
    if args.calib:
        return record_from_images(args, ckpt, blocks, xp, log)
    n = args.synthetic_samples
    log(f"no calibration data: synthesising {n} samples per block from norm2 (h = γ·z + β)")
    acts = synthetic_acts(ckpt, blocks, samples=n, tokens=token_count(ckpt.config), seed=args.seed)
    return acts, {"source": "synthetic", "samples": n,
                  "note": "MLP inputs synthesised from each block's norm2 affine parameters"}, None


def record_from_images(args, ckpt, blocks, xp, log):
    """Stream calibration images through the model; every block's MLP input goes into a store."""
    from .images import IMAGENET_MEAN, IMAGENET_STD, iter_image_batches, list_images
    from .models import forward_model, prepare_model
    paths, _ = list_images(args.calib)
    rng = np.random.default_rng(args.seed)
    if args.calib_images and args.calib_images < len(paths):     # a seeded random subset
        paths = [paths[i] for i in np.sort(rng.choice(len(paths), args.calib_images, replace=False))]
    model = prepare_model(ckpt, dtype=np.dtype(args.dtype).type, xp=xp)       # validates the config
    (h, w), cfg = model.cfg.img_size, ckpt.config
    if h != w:
        raise InputError(f"--calib: the model takes {h}x{w} images; only square sizes are supported")
    kw = dict(size=h, train=args.calib_augment, rng=rng, skip_bad=args.skip_bad_images,
              in_chans=model.cfg.in_chans, mean=cfg.get("mean", IMAGENET_MEAN),
              std=cfg.get("std", IMAGENET_STD))
    batches = iter_image_batches(paths, args.batch_size, **kw)
    first = next(batches, None)
    if first is None:
        raise InputError(f"--calib {args.calib}: no readable calibration images")
    probe = forward_model(model, first[0][:1], record_mlp_inputs=True)[1]
    store = ActivationStore({i: (len(paths),) + a.shape[1:] for i, a in probe.items()},
                            int(args.max_memory * 2**30), folder=os.path.dirname(os.path.abspath(args.out)))
    log(f"recording MLP inputs of {len(paths)} images into {store.mode} "
        f"({store.total_bytes / 2**30:.2f} GiB)")
    n = 0
    try:
        for x, _ in itertools.chain([first], batches):
            forward_model(model, x, batch_size=args.batch_size,
                          on_mlp_input=lambda b, s, h, n=n: store(b, n + s, h))
            n += x.shape[0]
    except BaseException:                       # a bad image, Ctrl-C: no files left behind
        store.cleanup()
        raise
    acts = store.finish(n)
    return acts, {"source": "images", "path": args.calib, "images": n, "storage": store.mode,
                  "augment": bool(args.calib_augment)}, store


# ----------------------------------------------------------------------------- report
def mlp_counts(blocks, result):
    """Original MLP weights; kept parameters U + nnz V as the authors count them (every rank
    column of U) and as stored (live columns only, codec.live_rank_columns)."""
    original = sum(2 * b.d * b.hidden for b in blocks if any(b.index in g.blocks for g in result.groups))
    nnz = sum(_group_nnz(result, g) for g in result.groups)
    kept = nnz + sum(g.rows * g.rank for g in result.groups)
    stored = nnz + sum(g.rows * int(live_rank_columns(result, g).sum()) for g in result.groups)
    return original, kept, stored


def _group_nnz(result, g):
    return sum(int(result.masks[f"{l.key}.V"].sum()) if result.masks else g.rank * g.cols
               for l in g.layers)


def storage_summary(result, arrays, original_numel, value_bits, cfg=None):
    """Paper §3 bits (16-bit values + 1 mask bit per V entry), at the trained and at the stored
    (live) rank, next to the bits actually written; for a condensed run (``cfg``: srigl, nm,
    set --fan-in constant) also the variant with index bits (condensed_summary)."""
    paper = paper_stored = written_formula = 0
    for g in result.groups:
        nnz, live = _group_nnz(result, g), int(live_rank_columns(result, g).sum())
        cols = g.cols * len(g.layers)
        paper += storage_bits(g.rows, g.rank, cols, nnz, 16)
        paper_stored += storage_bits(g.rows, live, cols, nnz, 16)
        written_formula += storage_bits(g.rows, live, cols, nnz, value_bits)
    written = sum(a.nbytes * 8 for k, a in arrays.items() if k.startswith("fips."))
    orig16 = 16 * original_numel
    out = {"paper_bits": paper, "original_bits_16": orig16, "paper_ratio": paper / orig16,
           "paper_bits_stored": paper_stored, "paper_ratio_stored": paper_stored / orig16,
           "formula_bits_at_storage_dtype": written_formula, "written_bits": written,
           "written_ratio_vs_original_16bit": written / orig16}
    if cfg is not None and condensed_m(config_dict(cfg)) is not None:
        out["condensed"] = condensed_summary(result, arrays, condensed_m(config_dict(cfg)))
    return out


def build_report(args, cfg, ckpt, blocks, result, arrays, calib, out_path, xp, seconds, accuracy,
                 written=None):
    """The JSON report of a run (docs/report.md); ``written``: where the output's bytes are now."""
    original, kept, stored = mlp_counts(blocks, result)
    value_bits = np.dtype(args.storage_dtype).itemsize * 8
    return {
        "fips_ref_version": __version__, "input": ckpt.path, "output": out_path,
        "backend": xp.__name__, "device": device_name(xp), "dtype": args.dtype,
        "calibration": calib, "config": config_dict(cfg),
        "schedule": dataclasses.asdict(result.schedule),
        "grouping": getattr(args, "grouping", None),
        "groups": [{"index": g.index, "blocks": list(g.blocks), "rank": g.rank,
                    "live_rank": int(live_rank_columns(result, g).sum()), "rows": g.rows,
                    "cols": g.cols, "grown": g.rank > g.rows} for g in result.groups],
        "blocks": [{"index": b, "rel_error_init": result.error_init.get(b),
                    "rel_error_final": result.error_final.get(b)} for b in sorted(result.error_final)],
        "layer_density": describe(result.masks) if result.masks else
        {f"{l.key}.V": 1.0 for g in result.groups for l in g.layers},
        "params": {"mlp_original": original, "mlp_kept": kept, "achieved_budget": kept / original,
                   "mlp_kept_stored": stored, "achieved_budget_stored": stored / original,
                   "target_budget": args.budget, "v_density": density(result.masks)},
        "storage": dict(storage_summary(result, arrays, original, value_bits, cfg),
                        file_bytes=os.path.getsize(written or out_path),
                        original_file_bytes=os.path.getsize(ckpt.path)),
        "history": result.history, "wall_seconds": seconds, "peak_device_bytes": peak_device_bytes(xp),
        "accuracy": accuracy,
    }


# ----------------------------------------------------------------------------- main
def demo_defaults(args):
    """The checkpoint to read; with none given, the bundled demo with its calibration and test data."""
    if args.checkpoint is None:
        if not (args.calib_acts or args.calib):
            args.calib_acts = str(DEMO_ACTS)
        if args.eval_data is None:
            args.eval_data = str(DEMO_TEST)
    return str(args.checkpoint or DEMO_CKPT)


def run(args, log):
    """The whole job; returns the report dict. Raises InputError / BackendError on bad input."""
    t0 = time.perf_counter()
    source = demo_defaults(args)
    args.out = args.out or str(Path(source).with_suffix("")) + ".fips.npz"
    check_paths([("CHECKPOINT", source), ("--calib-acts", args.calib_acts), ("--calib", args.calib),
                 ("--eval-data", args.eval_data)],
                [("--out", args.out), ("--report", args.report), ("--save-acts", args.save_acts)])
    ckpt = load_checkpoint(source)
    blocks = find_mlp_blocks(ckpt)
    groups, args.grouping = choose_groups(args.groups, args.group_size, blocks, ckpt.config["arch"])
    check_groups(groups, blocks)
    xp = load_backend(args.backend)
    dtype = np.dtype(args.dtype).type
    cfg = fips_config(args)
    plan_groups(cfg, blocks, groups)                 # rank errors before any work or file
    evaluation = None
    if args.eval_data:                               # --eval-data errors too
        from .evaluate import eval_data
        evaluation = eval_data(args.eval_data, ckpt, batch_size=args.batch_size, need_labels=True)[:2]
    acts, calib, store = calibration(args, ckpt, blocks, xp, log)
    try:
        check_steps(args.epochs, len(next(iter(acts.values()))), args.batch_size)
        if args.save_acts:
            save_acts(args.save_acts, acts)
        step_log = None if args.quiet else (lambda s, n, e, loss, sp: log(
            f"epoch {e + 1} step {s}/{n} loss {loss:.4e} sparsity {sp:.4f}"))
        on_disk = any(isinstance(a, DiskArray) for a in acts.values())
        calib["targets"] = "recomputed every step" if on_disk else "cached in memory"
        result = run_local_stage(ckpt.tensors, acts, groups, cfg, blocks=blocks, xp=xp, dtype=dtype,
                                 targets="recompute" if on_disk else "cache", log=step_log, log_every=10)
    finally:
        if store is not None:
            store.cleanup()
    meta = {"fips_ref_version": __version__, "budget": cfg.budget, "target_sparsity": cfg.sparsity,
            "achieved_sparsity": 1.0 - density(result.masks) if result.masks else 0.0,
            "variant": cfg.variant, "seed": cfg.seed, "config": config_dict(cfg),
            "schedule": dataclasses.asdict(result.schedule), "calibration": calib}
    arrays, meta = encode(ckpt, result, meta, storage_dtype=np.dtype(args.storage_dtype))
    arrays["config"], arrays["fips"] = json_entry(ckpt.config), json_entry(meta)
    written = save_npz_atomic(args.out, arrays)     # staged: renamed into place when run() ends
    accuracy = None if evaluation is None else evaluate_before_after(args, ckpt, written, evaluation,
                                                                     xp, dtype, log)
    report = build_report(args, cfg, ckpt, blocks, result, arrays, calib, args.out, xp,
                          time.perf_counter() - t0, accuracy, written=written)
    if args.report:
        save_json_atomic(args.report, report)
    return report


def evaluate_before_after(args, ckpt, out, evaluation, xp, dtype, log):
    """Top-1 of the original and the compressed model on --eval-data, and their agreement."""
    from .evaluate import evaluate
    images, labels = evaluation
    r = evaluate(load_checkpoint(out), images, labels, reference=ckpt,
                 batch_size=args.batch_size, dtype=dtype, xp=xp)
    acc = {"data": args.eval_data, "images": r["num_images"], "top1_before": r["reference_top1"],
           "top1_after": r["top1"], "top1_agreement": r["agreement"]}
    log(f"accuracy on {args.eval_data}: top-1 {acc['top1_before']:.4f} before, "
        f"{acc['top1_after']:.4f} after ({acc['top1_agreement']:.4f} agreement)")
    return acc


def summary(report, report_path=None):
    """Lines printed on stdout at the end of a run."""
    p, s = report["params"], report["storage"]
    errs = [b["rel_error_final"] for b in report["blocks"]]
    lines = [f"wrote {report['output']}",
             f"MLP parameters kept: {p['mlp_kept']:,} of {p['mlp_original']:,} "
             f"(achieved budget {p['achieved_budget']:.4f}, target {p['target_budget']}; "
             f"{p['achieved_budget_stored']:.4f} as stored, without dead rank columns)",
             f"final sparsity of V: {1 - report['params']['v_density']:.4f}; "
             f"ranks {[g['rank'] for g in report['groups']]}, live {[g['live_rank'] for g in report['groups']]}",
             f"mean relative MLP output error: {np.mean([b['rel_error_init'] for b in report['blocks']]):.4e} "
             f"at init, {np.mean(errs):.4e} after",
             f"storage ratio (paper §3, 16-bit): {s['paper_ratio']:.4f}; file {s['file_bytes']:,} bytes "
             f"vs original {s['original_file_bytes']:,}",
             f"wall time {report['wall_seconds']:.1f} s"]
    if "condensed" in s:
        c = s["condensed"]
        lines.append(f"condensed V: paper §3 {c['bits_bitmask']:,} bits with a bitmask, "
                     f"{c['bits_indexed_packed']:,} with packed index bits, {c['bits_indexed_dtype']:,} "
                     f"at the stored index dtypes; arrays {c['file_bytes_condensed']:,} bytes condensed "
                     f"vs {c['file_bytes_bitmask']:,} as a bitmask")
    if report["calibration"]["source"] == "synthetic":
        lines.append("calibration: SYNTHETIC MLP inputs from norm2's affine parameters "
                     "(no --calib or --calib-acts); real activations give better models")
    if report.get("accuracy"):
        a = report["accuracy"]
        lines.append(f"top-1 accuracy: {a['top1_before']:.4f} before, {a['top1_after']:.4f} after")
    if report_path:
        lines.append(f"report: {report_path}; plot it with: python -m fips_ref.plot {report_path}")
    return lines


def main(argv=None):
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    def body():
        # a diverging run is reported once, by the loss check; all outputs or none (docs/robustness.md)
        with np.errstate(all="ignore"), all_or_nothing():
            report = run(args, log)
        print("\n".join(summary(report, args.report)))
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
