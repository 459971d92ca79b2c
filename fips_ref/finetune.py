"""python -m fips_ref.finetune CKPT.fips.npz --data TRAIN — the global stage of FiPS: end-to-end fine-tuning.

Trains a compressed checkpoint end to end (paper §3, Algorithm 1 "global error minimisation";
the authors' finetune.py, docs/authors-code.md §7) and writes a compressed checkpoint in the same
format, so decompress, evaluate and convert read it. ``--help`` says where each default comes from;
the recipe and the options beyond the authors' are in docs/finetune.md.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import __version__
from .augment import AugmentConfig
from .backend import load_backend
from .checkpoint import Checkpoint, InputError, json_entry, load_checkpoint, save_json_atomic, save_npz_atomic
from .cli import POSITIVE_INT, HelpFormatter, OneLineParser, check_paths, parse, ranged, run_cli
from .codec import encode, fips_meta
from .codec_condensed import condensed_m
from .global_stage import GlobalConfig, file_plan, init_state, schedule, sparsifier_config
from .outputs import all_or_nothing
from .sharing import Layer
from .sparsifiers import check_structured, per_layer_only
from .sparsity import density
from .structured import HELP, gamma_sal, nm_pattern, nm_sparsity
from .train_data import check_batch, check_labels, open_train_data

A7 = "docs/authors-code.md §7"


# ----------------------------------------------------------------------------- flags
def build_parser():
    g, a = GlobalConfig(), AugmentConfig()
    p = OneLineParser(prog="python -m fips_ref.finetune", description=__doc__.splitlines()[0],
                      formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="compressed checkpoint (*.fips.npz from fips_ref.compress)")
    io = p.add_argument_group("files")
    io.add_argument("--data", required=True, help="training data: ImageFolder tree (one sub-folder per "
                    "class) or .npz with 'images' [N, C, H, W] (normalised) and 'labels' [N]")
    io.add_argument("--eval-data", help="validation images+labels (.npz or folder): top-1 per epoch")
    io.add_argument("--out", help="fine-tuned compressed .npz (default: beside the input, NAME.ft.fips.npz)")
    io.add_argument("--report", help="JSON report: per-step loss, lr, sparsity; per-epoch top-1")
    io.add_argument("--class-map", help="class name -> index for folder data (JSON or one class a line)")
    io.add_argument("--skip-bad-images", action="store_true", help="a blank image for unreadable files instead of failing")
    t = p.add_argument_group(f"optimisation ({A7}; paper §4, A.2)")
    t.add_argument("--epochs", type=POSITIVE_INT, default=100, help=f"passes over --data (authors: 100, {A7})")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=128, help=f"images per step, full batches only (authors: 128, {A7})")
    t.add_argument("--lr", type=ranged(0, 10, lo_open=True), default=g.lr, help=f"AdamW peak lr (authors' config: 1e-4, {A7})")
    t.add_argument("--eta-min", type=ranged(0, 10), default=g.eta_min, help=f"cosine floor over all steps (authors: 1e-5, {A7})")
    t.add_argument("--weight-decay", type=ranged(0, 10), default=g.weight_decay, help=f"AdamW decoupled decay (authors: 0.05, {A7})")
    t.add_argument("--beta1", type=ranged(0, 1, hi_open=True), default=g.beta1, help=f"AdamW β1 (authors: 0.9, {A7})")
    t.add_argument("--beta2", type=ranged(0, 1, hi_open=True), default=g.beta2, help=f"AdamW β2 (authors: 0.999, {A7})")
    t.add_argument("--eps", type=ranged(0, 1, lo_open=True), default=g.eps, help=f"AdamW ε (authors: 9.999e-9, {A7})")
    t.add_argument("--loss-scale", type=ranged(0, 1e6, lo_open=True), default=g.loss_scale,
                   help="the loss is multiplied by this before the backward (authors: 2, the ×2 quirk "
                        "B7 of docs/authors-code.md §8; 1 for the plain loss)")
    t.add_argument("--freeze-non-mlp", action="store_true", help="train only the MLPs (U, V, fc biases; "
                   "ours, docs/finetune.md); the authors train every parameter")
    s = p.add_argument_group(f"sparsity of V ({A7}, §5.5)")
    s.add_argument("--sparsifier", choices=SPARSIFIERS,
                   help=f"default: the input's when it was compressed with srigl, nm or set --fan-in "
                        f"constant (docs/deployment.md §2), else rigl, the authors' ({A7}); static: the "
                        f"loaded masks stay (ours). " + " ".join(f"{k}: {HELP[k]}." for k in ("set", "srigl", "nm")))
    s.add_argument("--fan-in", dest="fan_in", choices=("any", "constant"), default=argparse.SUPPRESS,
                   help=f"with --sparsifier set (default: the input's when it was compressed with set, "
                        f"else any). {HELP['fan_in']}")
    s.add_argument("--gamma-sal", dest="gamma_sal", type=gamma_sal, default=argparse.SUPPRESS,
                   help=HELP["gamma_sal"].replace("default 0.3", "default: the input's when it was "
                                                  "compressed with srigl, else 0.3") + " (srigl only)")
    s.add_argument("--nm", type=nm_pattern, default=argparse.SUPPRESS,
                   help="N:M of --sparsifier nm (default: the input's when it was compressed with nm, "
                        "else 1:4); --sparsity defaults to 1 - N/M")
    s.add_argument("--sparsity", type=ranged(0, 1, hi_open=True),
                   help="RigL's target (default: the checkpoint's target_sparsity, authors: 0.75; "
                        "with --sparsifier nm: 1 - N/M)")
    s.add_argument("--rigl-drop-fraction", type=ranged(0, 1), default=g.rigl_drop_fraction, help=f"RigL q (transfer config: 0.05, {A7})")
    s.add_argument("--delta-t", type=POSITIVE_INT, default=g.delta_t, help=f"steps between mask updates (authors: 50, {A7})")
    s.add_argument("--t-end-coeff", type=ranged(0, 1, lo_open=True), default=g.t_end_coeff, help=f"mask updates end at this fraction of the steps (authors: 0.75, {A7})")
    gp = s.add_mutually_exclusive_group()
    gp.add_argument("--global-pruning", dest="global_pruning", action="store_true", default=None,
                    help="one selection over every V (default for rigl and set --fan-in any, "
                         "docs/authors-code.md §5.4); refused for srigl, nm, set --fan-in constant")
    gp.add_argument("--uniform-pruning", dest="global_pruning", action="store_false",
                    help="per-layer selection (default for srigl, nm, set --fan-in constant: per layer only)")
    d = p.add_argument_group(f"data and loss ({A7}: DeiT-III 3-augment, Mixup/CutMix)")
    d.add_argument("--augment", choices=("3aug", "none"), default=a.augment, help=f"3aug: the authors' DeiT-III transform ({A7}); none: images as given")
    d.add_argument("--crop-scale", type=ranged(0, 1, lo_open=True), nargs=2, default=a.crop_scale, metavar=("LO", "HI"),
                   help=f"RandomResizedCrop area range (authors: 0.08 1, {A7})")
    d.add_argument("--hflip", type=ranged(0, 1), default=a.hflip, help="horizontal flip probability (DeiT-III: 0.5)")
    d.add_argument("--color-jitter", type=ranged(0, 1), default=a.color_jitter, help=f"brightness/contrast/saturation strength (authors: 0.4, {A7})")
    d.add_argument("--mixup", type=ranged(0, 100), default=a.mixup, help=f"Mixup α, 0 off (authors: 0.8, {A7})")
    d.add_argument("--cutmix", type=ranged(0, 100), default=a.cutmix, help=f"CutMix α, 0 off (authors: 1.0, {A7})")
    d.add_argument("--mix-prob", type=ranged(0, 1), default=a.mix_prob, help=f"probability a batch is mixed (authors: 1.0, {A7})")
    d.add_argument("--switch-prob", type=ranged(0, 1), default=a.switch_prob, help=f"CutMix instead of Mixup (authors: 0.5, {A7})")
    d.add_argument("--smoothing", type=ranged(0, 1, hi_open=True), default=a.smoothing, help=f"label smoothing (authors: 0.1, {A7})")
    x = p.add_argument_group("beyond the authors (docs/finetune.md)")
    x.add_argument("--distill", metavar="ORIGINAL.npz", help="add the KL to this (uncompressed) model's logits")
    x.add_argument("--distill-weight", type=ranged(0, 1e6), default=1.0, help="weight of the KL term (ours)")
    x.add_argument("--distill-temperature", type=ranged(0, 1e3, lo_open=True), default=1.0, help="KL temperature T, loss ×T² (ours)")
    x.add_argument("--num-classes", type=POSITIVE_INT, help="replace the head by a new one of K classes, "
                   "timm's initialisation (trunc. normal std 0.02, zero bias; paper Table 2)")
    r = p.add_argument_group("execution")
    r.add_argument("--seed", type=ranged(0, 2**63 - 1, kind=int), default=0, help="batch order, augmentation, mixing, new head; same seed, same result on the same backend")
    r.add_argument("--eval-every", type=POSITIVE_INT, default=1, help="epochs between validations (authors: 4; ours: 1)")
    r.add_argument("--backend", choices=("numpy", "cupy"), help="default: $FIPS_REF_BACKEND or numpy")
    r.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute precision")
    r.add_argument("--storage-dtype", choices=("float16", "float32"), help="dtype of U and V values (default: the input's)")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


SPARSIFIERS = ("rigl", "static", "set", "srigl", "nm")


def input_run(meta, path):
    """(the input's compress config fields the defaults read, its target sparsity), checked:
    a hostile value is one line naming the key and the flag that replaces it."""
    src = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)      # noqa: E731
    valid = {"sparsifier": lambda v: isinstance(v, str),
             "fan_in": lambda v: v in ("any", "constant"),
             "gamma_sal": lambda v: v is None or (number(v) and 0 <= v <= 1),
             "nm": lambda v: isinstance(v, (list, tuple)) and len(v) == 2
             and all(isinstance(x, int) and not isinstance(x, bool) for x in v) and 1 <= v[0] < v[1] <= 256}
    out = {}
    for key, ok in valid.items():
        if key in src:
            if not ok(src[key]):
                raise InputError(f"{path}: key 'fips' config.{key} is {str(src[key])[:40]!r}, not a "
                                 f"valid --{key.replace('_', '-')} (give the flag)")
            out[key] = src[key]
    target = meta.get("target_sparsity", 0.75)
    if not (number(target) and 0 <= target < 1):
        raise InputError(f"{path}: key 'fips' target_sparsity is {str(target)[:40]!r}, expected a "
                         f"number in [0, 1) (give --sparsity)")
    return out, float(target)


def sparsifier_flags(args, meta, path="CHECKPOINT"):
    """{sparsifier, fan_in, gamma_sal, nm, sparsity, global_pruning} from the flags, each left
    unset taken from the input's compress config (meta['config']) as --help says."""
    src, target = input_run(meta, path)
    default = GlobalConfig()
    structured = condensed_m({"nm": default.nm, **src}) is not None
    name = args.sparsifier or (src["sparsifier"] if structured else "rigl")
    same = src.get("sparsifier") == name
    out = {"sparsifier": name,
           "fan_in": getattr(args, "fan_in", src.get("fan_in", "any") if same else "any"),
           "gamma_sal": getattr(args, "gamma_sal", src.get("gamma_sal", 0.3) if same else 0.3),
           "nm": tuple(getattr(args, "nm", tuple(src.get("nm", default.nm)) if same else default.nm))}
    if args.sparsity is not None:
        out["sparsity"] = float(args.sparsity)
    else:
        out["sparsity"] = nm_sparsity(*out["nm"]) if name == "nm" else target
    probe = sparsifier_config(GlobalConfig(**{**out, "global_pruning": True}))
    out["global_pruning"] = (not per_layer_only(probe) if args.global_pruning is None
                             else args.global_pruning)
    return out


def check_sparsifier(cfg, meta, path):
    """InputError naming the flag for a sparsifier the file's groups cannot run
    (sparsifiers.check_structured, as compress; docs/deployment.md §6)."""
    plan = file_plan(meta)
    if cfg.sparsifier == "nm":
        n, m = cfg.nm
        for g in plan:
            for layer in g.layers:
                fan_in = g.rank if layer.basis_first else g.cols
                if fan_in % m:
                    raise InputError(f"--nm {n}:{m}: layer {layer.key} of {path} has fan-in {fan_in} "
                                     f"(rank {g.rank} or width {g.cols}), not a multiple of M; "
                                     f"compress with --round-to {m}")
    check_structured(sparsifier_config(cfg), plan)


def configs(args, meta, path="CHECKPOINT"):
    """(GlobalConfig, AugmentConfig) from the flags; sparsity defaults to the file's target."""
    g = GlobalConfig(lr=args.lr, eta_min=args.eta_min, weight_decay=args.weight_decay,
                     beta1=args.beta1, beta2=args.beta2, eps=args.eps,
                     rigl_drop_fraction=args.rigl_drop_fraction,
                     delta_t=args.delta_t, t_end_coeff=args.t_end_coeff, loss_scale=args.loss_scale,
                     distill_weight=args.distill_weight if args.distill else 0.0,
                     distill_temperature=args.distill_temperature, freeze_non_mlp=args.freeze_non_mlp,
                     seed=args.seed, **sparsifier_flags(args, meta, path))
    a = AugmentConfig(augment=args.augment, crop_scale=tuple(sorted(args.crop_scale)), hflip=args.hflip,
                      color_jitter=args.color_jitter, mixup=args.mixup, cutmix=args.cutmix,
                      mix_prob=args.mix_prob, switch_prob=args.switch_prob, smoothing=args.smoothing)
    return g, a


# ----------------------------------------------------------------------------- head (Table 2)
HEADS = {"vit": ("head", "head_dist"), "swin": ("head.fc",)}


def replace_head(ckpt, num_classes, rng):
    """A copy of ``ckpt`` with a new K-class head, as timm initialises it: weight trunc_normal_
    (std 0.02, cut at ±2), bias 0 (timm's init_weights_vit_timm, which the init_weights of
    VisionTransformer and of SwinTransformer apply)."""
    tensors, config = dict(ckpt.tensors), dict(ckpt.config, num_classes=num_classes)
    for name in HEADS[ckpt.config["arch"]]:
        if f"{name}.weight" not in tensors:
            continue
        d = tensors[f"{name}.weight"].shape[1]
        w = rng.standard_normal((num_classes, d)) * 0.02
        while np.any(np.abs(w) > 2):                 # truncation at ±2 (absolute, as timm)
            bad = np.abs(w) > 2
            w[bad] = rng.standard_normal(int(bad.sum())) * 0.02
        tensors[f"{name}.weight"] = w.astype(tensors[f"{name}.weight"].dtype)
        tensors[f"{name}.bias"] = np.zeros(num_classes, dtype=tensors[f"{name}.bias"].dtype)
    return Checkpoint(path=ckpt.path, config=config, tensors=tensors, extra=ckpt.extra)


# ----------------------------------------------------------------------------- output
def layout_config(cfg, meta):
    """The config codec.encode chooses the layout by (codec_condensed.condensed_m): for static
    (its masks stay) the input's stored layout (the layers' validated ``m``), else the fine-tuning
    sparsifier's, so srigl, nm and set --fan-in constant write condensed groups (format 2) and
    rigl / set a bitmask (format 1)."""
    if cfg.sparsifier == "static":
        ms = {l["m"] for g in meta["groups"] if g.get("layout") == "condensed" for l in g["layers"]}
        if len(ms) != 1 or not all(g.get("layout") == "condensed" for g in meta["groups"]):
            return {}                                   # bitmask input (or mixed layouts): bitmask
        m = ms.pop()
        return {"sparsifier": "nm", "nm": [1, m]} if m else {"sparsifier": "srigl"}
    return {"sparsifier": cfg.sparsifier, "fan_in": cfg.fan_in, "nm": list(cfg.nm)}


def output_arrays(ckpt, meta, state, storage_dtype, run_meta, layout=None):
    """Arrays of the fine-tuned compressed file: trained tensors in checkpoint layout, factors
    re-encoded by codec.encode with the final masks (docs/compressed-format.md), condensed when
    ``layout`` (layout_config) asks for it; the metadata keeps the input's compress config."""
    from .models.grad import torch_layout
    dense = {k: v for k, v in ckpt.tensors.items() if not k.startswith("fips.")}
    holder = SimpleNamespace(tensors=dense)
    trained = torch_layout({k: state.params[k] for k in dense if k in state.params}, holder)
    dense.update({k: v.astype(dense[k].dtype) for k, v in trained.items()})
    groups, params, masks = [], {}, {}
    for g in meta["groups"]:
        layers = [Layer(l["key"], l["block"], l["basis_first"]) for l in g["layers"]]
        groups.append(SimpleNamespace(index=g["index"], blocks=g["blocks"] if "blocks" in g else
                                      [l.block for l in layers[::2]], rows=g["rows"], cols=g["cols"],
                                      rank=g["rank"], layers=layers))       # the stored (live) rank
        params[f"U.{g['index']}"] = state.params[f"fips.U.{g['index']}"]
        for l in layers:
            params[f"{l.key}.V"] = state.forward_v[f"fips.V.{l.key}"]
            params[f"{l.key}.bias"] = state.params[f"{l.key}.bias"]
            masks[f"{l.key}.V"] = state.masks[f"fips.V.{l.key}"]
    result = SimpleNamespace(groups=groups, params=params, masks=masks)
    keep = {k: v for k, v in meta.items() if k not in ("groups", "format_version", "storage_dtype")}
    keep.update(achieved_sparsity=1.0 - density(state.masks), finetune=run_meta)
    arrays, new_meta = encode(holder, result, dict(keep, config=layout or keep.get("config") or {}),
                              storage_dtype=storage_dtype)
    new_meta.pop("config")
    if "config" in keep:
        new_meta["config"] = keep["config"]                # the input's compress run, as recorded
    for g, old in zip(new_meta["groups"], meta["groups"]):
        g["trained_rank"] = old.get("trained_rank", old["rank"])   # the budget's, not this file's
    arrays["config"], arrays["fips"] = json_entry(ckpt.config), json_entry(new_meta)
    return arrays


# ----------------------------------------------------------------------------- run
def run(args, log):
    """The whole job; returns the report dict. Raises InputError / BackendError on bad input."""
    from .evaluate import forward_bytes
    from .models import prepare_model
    from .validate import check_memory
    from .train_loop import evaluate_top1, train
    t0 = time.perf_counter()
    src = str(args.checkpoint)
    stem = src[:-len(".fips.npz")] if src.endswith(".fips.npz") else str(Path(src).with_suffix(""))
    args.out = args.out or stem + ".ft.fips.npz"
    check_paths([("CHECKPOINT", src), ("--data", args.data), ("--eval-data", args.eval_data),
                 ("--distill", args.distill), ("--class-map", args.class_map)],
                [("--out", args.out), ("--report", args.report)])
    ckpt = load_checkpoint(src)
    meta = fips_meta(ckpt)                          # refuses an uncompressed checkpoint
    seeds = np.random.SeedSequence(args.seed).spawn(4)  # order, augmentation, mixing, head
    if args.num_classes is not None:
        ckpt = replace_head(ckpt, args.num_classes, np.random.default_rng(seeds[3]))
    cfg, aug = configs(args, meta, src)
    check_sparsifier(cfg, meta, src)
    xp, dtype = load_backend(args.backend), np.dtype(args.dtype).type
    model = prepare_model(ckpt, dtype=dtype, xp=xp)
    k, (c, (s, _)) = model.cfg.num_classes, (model.cfg.in_chans, model.cfg.img_size)
    data = open_train_data(args.data, ckpt.config, aug, class_map=args.class_map,
                           skip_bad=args.skip_bad_images)
    try:
        check_labels(data, k)
        check_batch(data.count, args.batch_size, c, s)
        check_memory(4 * forward_bytes(model, args.batch_size), f"the training step of a batch of "
                     f"{args.batch_size} (activations kept for the backward)", "--batch-size")
        teacher = None
        if args.distill:
            teacher = _teacher(args.distill, ckpt, dtype, xp)
        evaluation = _eval_source(args, ckpt, k)
        state, mlps = init_state(model, ckpt, cfg)
        sched = schedule(cfg, args.epochs * (data.count // args.batch_size))
        val0 = evaluate_top1(model, mlps, state.params, evaluation, args.batch_size)
        log(f"{sched.total_steps} steps; top-1 on --eval-data before: {val0}")
        history, epochs = train(state, model, mlps, cfg, aug, sched, data, args, seeds, teacher,
                                evaluation, log)
    finally:
        if data.close:
            data.close()
    run_meta = {"fips_ref_version": __version__, "input": src, "data": args.data,
                "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                "steps": sched.total_steps, "config": dataclasses.asdict(cfg),
                "augment": dataclasses.asdict(aug), "num_classes": k}
    storage = np.dtype(args.storage_dtype or meta.get("storage_dtype", "float16"))
    save_npz_atomic(args.out, output_arrays(ckpt, meta, state, storage, run_meta,
                                            layout_config(cfg, meta)))
    report = dict(run_meta, output=args.out, backend=xp.__name__, dtype=args.dtype,
                  eval_data=args.eval_data, distill=args.distill,
                  schedule=dataclasses.asdict(sched), top1_val_before=val0,
                  top1_val_after=epochs[-1]["val_top1"] if epochs else val0,
                  final_sparsity=1.0 - density(state.masks), history=history, epoch_metrics=epochs,
                  wall_seconds=time.perf_counter() - t0)
    if args.report:
        save_json_atomic(args.report, report)
    return report


def _teacher(path, ckpt, dtype, xp):
    """The --distill model, prepared; it must take the same input and predict the same classes."""
    from .models import prepare_model
    t = load_checkpoint(path)
    if t.config.get("num_classes") != ckpt.config.get("num_classes"):
        raise InputError(f"--distill {path}: num_classes {t.config.get('num_classes')}, the "
                         f"checkpoint {ckpt.config.get('num_classes')}")
    model = prepare_model(t, dtype=dtype, xp=xp)
    if (model.cfg.in_chans, tuple(model.cfg.img_size)) != (ckpt.config.get("in_chans", 3),
                                                           tuple(_pair(ckpt.config.get("img_size", 224)))):
        raise InputError(f"--distill {path}: takes a different input size than the checkpoint")
    return model


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _eval_source(args, ckpt, k):
    """A callable giving a fresh (images or batch stream, labels) of --eval-data, or None."""
    if not args.eval_data:
        return None
    from .evaluate import eval_data
    first = eval_data(args.eval_data, ckpt, batch_size=args.batch_size, class_map=args.class_map,
                      need_labels=True)           # validates now, before any training
    cache = {"first": first}

    def source():
        got = cache.pop("first", None) or eval_data(args.eval_data, ckpt, batch_size=args.batch_size,
                                                    class_map=args.class_map, need_labels=True)
        return got[0], got[1]
    return source


def summary(report):
    lines = [f"wrote {report['output']}",
             f"{report['steps']} steps; final sparsity of V {report['final_sparsity']:.4f}",
             f"wall time {report['wall_seconds']:.1f} s"]
    if report["top1_val_before"] is not None:
        lines.append(f"top-1 on {report['eval_data']}: {report['top1_val_before']:.4f} before, "
                     f"{report['top1_val_after']:.4f} after")
    return lines


def main(argv=None):
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    def body():
        with np.errstate(over="ignore", under="ignore"), all_or_nothing():
            report = run(args, log)
        print("\n".join(summary(report)))
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
