"""Evaluate a checkpoint (original or FiPS-compressed) on labelled images.

    python -m fips_ref.evaluate deit_b.fips.npz --data imagenet/val --reference deit_b.npz
    # -> a table with top-1 / top-5 accuracy, and agreement 100.00 % / mean KL 0 vs the reference

Dimension legend: N images, K classes, C/H/W image channels/height/width.

Metrics (docs/evaluate-and-convert.md):
  top-k      mean over n of [label_n is among the k largest logits of n] (ties: lower class first)
  agreement  mean over n of [argmax ref_n == argmax model_n]
  mean KL    mean over n of KL(softmax(ref_n) || softmax(model_n))
"""
import os
import sys
import time

import numpy as np

from .backend import BACKENDS, load_backend, to_numpy
from .checkpoint import InputError, load_checkpoint, load_npz, save_json_atomic
from .cli import POSITIVE_INT, OneLineParser, check_paths, parse, ranged, run_cli
from .validate import MAX_SIDE, check_memory, finite_or_error
from .images import IMAGENET_MEAN, IMAGENET_STD, iter_image_batches, list_images
from .infer import PATHS
from .timm_configs import default_crop_pct


def log_softmax(logits):  # [N, K] -> [N, K] float64
    """Numerically stable log-softmax along the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def topk_hits(logits, labels, k):  # [N, K], [N] -> bool [N]
    """Whether each label is among the k largest logits; ties rank the lower class index first.

    rank(y) = #{j : l_j > l_y} + #{j < y : l_j = l_y}; a hit is rank(y) < k.
    A row holding NaN or Inf is never a hit (NaN compares false with everything, which would
    otherwise give rank 0: a NaN image scored as correct). ``evaluate`` refuses such logits.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    ly = np.take_along_axis(logits, labels[:, None], axis=1)  # [N, 1]
    before = np.arange(logits.shape[1])[None, :] < labels[:, None]  # [N, K]
    rank = (logits > ly).sum(axis=1) + ((logits == ly) & before).sum(axis=1)  # [N]
    return (rank < k) & np.isfinite(logits).all(axis=1)


def topk_accuracy(logits, labels, k):  # [N, K], [N] -> float
    """Fraction of rows whose label is among the k largest logits (see ``topk_hits``).

    .. math:: \\mathrm{acc}_k = \\frac{1}{N} \\sum_n [\\mathrm{rank}_n(y_n) < k]
    """
    return float(np.mean(topk_hits(logits, labels, k)))


def agreement(logits_a, logits_b):  # [N, K], [N, K] -> float
    """Fraction of rows where both models predict the same class (argmax, first on ties)."""
    return float(np.mean(np.argmax(logits_a, axis=1) == np.argmax(logits_b, axis=1)))


def kl_per_sample(ref_logits, logits):  # [N, K], [N, K] -> [N] float64
    """KL(softmax(ref) || softmax(model)) of each row, in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def mean_kl(ref_logits, logits):  # [N, K], [N, K] -> float
    """Mean over rows of KL(softmax(ref) || softmax(model)).

    .. math:: \\frac{1}{N} \\sum_n \\sum_k p_{nk} (\\log p_{nk} - \\log q_{nk}),
              p = \\mathrm{softmax}(\\mathrm{ref}), q = \\mathrm{softmax}(\\mathrm{model})
    """
    return float(np.mean(kl_per_sample(ref_logits, logits)))


def _predictor(ckpt, *, batch_size, dtype, xp, path=None, cost=None):
    """Prepare the model once (weights to xp, compressed MLPs factored); returns x -> logits.
    ``path``, ``cost``: the compressed MLPs' inference path (None: per batch by ``cost``)."""
    from .models import forward_model, prepare_model
    extra = {k: v for k, v in (("mlp_path", path), ("cost", cost)) if v is not None}
    model = prepare_model(ckpt, dtype=dtype, xp=xp, **extra)
    check_memory(forward_bytes(model, batch_size), f"{ckpt.path}: the forward of one batch of "
                 f"{batch_size} images", "--batch-size")

    def predict(x, first):  # [B, C, H, W] -> [B, K], refused unless finite
        with np.errstate(over="ignore", invalid="ignore"):   # overflow is reported just below
            logits = to_numpy(forward_model(model, x, batch_size=batch_size))
        return finite_or_error(f"{ckpt.path}: the logits of images {first}..{first + len(x) - 1} "
                               "(weights or activations overflow)", logits)
    return predict


def forward_bytes(model, batch_size):
    """A lower bound on the bytes one batch of the forward holds: per token the MLP hidden
    (4·D) and, for ViT's global attention, every head's scores over all T tokens (float32)."""
    from .models import ARCHS
    if getattr(model, "arch", None) not in ARCHS:      # a stand-in model (tests)
        return 0
    cfg, heads = model.cfg, model.cfg.num_heads
    shapes = ARCHS[model.arch].mlp_token_shapes(cfg)  # [(T, D)] per block
    if isinstance(heads, (list, tuple)):                 # Swin: attention inside windows
        scores = max(heads) * cfg.window_size[0] * cfg.window_size[1]
    else:
        scores = heads * max((t for t, _ in shapes), default=0)
    return max((4 * batch_size * t * (4 * d + scores) for t, d in shapes), default=0)


def _as_batches(images, batch_size):
    """Normalise the ``images`` argument of ``evaluate`` into (x [B, C, H, W], kept or None)."""
    if hasattr(images, "shape"):  # one array [N, C, H, W] (NumPy or CuPy)
        for s in range(0, images.shape[0], batch_size):
            yield images[s:s + batch_size], np.arange(s, min(s + batch_size, images.shape[0]))
        return
    for item in images:
        yield item if isinstance(item, tuple) else (item, None)


def _check_labels(labels, num_classes, where=""):
    """Labels must be ints in [0, K)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{where}labels range over [{labels.min()}, {labels.max()}] but the model "
                         f"has {num_classes} classes (wrong --class-map?)")


def evaluate(ckpt, images_or_batches, labels=None, *, reference=None, batch_size=64, dtype=None,
             xp=None, path=None, cost=None):
    """Run the model (and the reference) over images and return the metrics.

    Parameters
    ----------
    ckpt, reference : fips_ref.checkpoint.Checkpoint
        Original or compressed checkpoints (``fips_ref.models`` runs both: a compressed one
        with its factored MLPs). Each model is prepared once, then run batch by batch.
    images_or_batches : array [N, C, H, W] or iterable
        Normalised images, or an iterable of batches [B, C, H, W] or of (batch, kept) pairs
        as ``images.iter_image_batches`` yields; ``kept`` indexes ``labels``.
    labels : int array [N] or None
        Class indices; without them only the agreement metrics are computed.
    path : one of infer.PATHS, or None
        Inference path of the compressed MLPs (docs/deployment.md §3); None chooses per batch
        size by ``cost`` (an infer.CostModel; None: its defaults).

    Returns
    -------
    dict
        num_images, and as applicable top1, top5 (K >= 5), reference_top1, reference_top5,
        agreement, mean_kl (fractions in [0, 1]; KL in nats).
    """
    predict = _predictor(ckpt, batch_size=batch_size, dtype=dtype, xp=xp, path=path, cost=cost)
    predict_ref = None if reference is None else _predictor(reference, batch_size=batch_size,
                                                            dtype=dtype, xp=xp)
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    sums, n, offset, K = {}, 0, 0, None
    for x, kept in _as_batches(images_or_batches, batch_size):
        finite_or_error(f"images {offset}..{offset + len(x) - 1}", x)
        logits = predict(x, offset)  # [B, C, H, W] -> [B, K]
        ref = None if predict_ref is None else predict_ref(x, offset)
        kept = np.arange(offset, offset + logits.shape[0]) if kept is None else kept
        offset += logits.shape[0]
        K = logits.shape[1]
        y = None if labels is None else labels[kept]
        if y is not None:
            _check_labels(y, K)
        for name, value in _batch_sums(logits, ref, y).items():
            sums[name] = sums.get(name, 0.0) + value
        n += logits.shape[0]
    if n == 0:
        raise InputError("no images to evaluate")
    return {"num_images": n, "num_classes": K, **{k: v / n for k, v in sums.items()}}


def _batch_sums(logits, ref, labels):
    """Per-batch sums of every applicable metric (divided by N at the end)."""
    out = {}
    ks = (1, 5) if logits.shape[1] >= 5 else (1,)
    if labels is not None:
        for k in ks:
            out[f"top{k}"] = float(topk_hits(logits, labels, k).sum())
            if ref is not None:
                out[f"reference_top{k}"] = float(topk_hits(ref, labels, k).sum())
    if ref is not None:
        out["agreement"] = float((np.argmax(ref, 1) == np.argmax(logits, 1)).sum())
        out["mean_kl"] = float(kl_per_sample(ref, logits).sum())
    return out


# ----------------------------------------------------------------------------------------------
# command line


def build_parser():
    """The argparse parser of ``python -m fips_ref.evaluate``."""
    p = OneLineParser(
        prog="python -m fips_ref.evaluate",
        description="Top-1/top-5 accuracy of a checkpoint, and agreement / KL against a "
                    "reference. Example: python -m fips_ref.evaluate compressed.npz "
                    "--data imagenet/val --reference deit_b.npz --json eval.json")
    p.add_argument("checkpoint", help="checkpoint .npz (original or FiPS-compressed)")
    p.add_argument("--data", required=True,
                   help="image folder (class sub-folders = labels, or flat) or .npz with "
                        "'images' [N, C, H, W] (normalised) and optional 'labels' [N]")
    p.add_argument("--reference",
                   help="original checkpoint: adds agreement and mean KL(ref || model)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64,
                   help="images per forward (default: 64, the project's choice; memory is checked first, docs/robustness.md)")
    p.add_argument("--json", help="write the results here (atomic)")
    p.add_argument("--class-map", help="class name -> index: JSON, or text with one class per line")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip images Pillow cannot read (warning on stderr) instead of failing")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="array backend (default: $FIPS_REF_BACKEND or numpy)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="compute precision (default: float32; metrics: docs/evaluate-and-convert.md)")
    p.add_argument("--img-size", type=POSITIVE_INT, default=None,
                   help="square input side for image folders (default: config img_size; the model must accept it)")
    p.add_argument("--crop-pct", type=ranged(0, 1, lo_open=True), default=None,
                   help="resize shorter side to floor(img_size / crop_pct) before the centre "
                        "crop (default: the model's timm pretrained crop_pct, 0.9 for every "
                        "DeiT/ViT/Swin in fips_ref.timm_configs; 0.875 when the model is "
                        "unknown. 0.875 = Resize 256 -> CenterCrop 224, the FiPS test transform)")
    p.add_argument("--path", choices=("auto",) + PATHS, default="auto",
                   help="inference path of a compressed checkpoint's MLPs (docs/deployment.md §3): "
                        "materialised W = U·V, lowrank (x·U)·V, gather (condensed V), csr (SciPy, "
                        "NumPy only); default auto: per batch size the cheapest under a cost model "
                        "measured once at start-up (NumPy; CuPy: the default model, no csr)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None,
                   help="evaluate N images spread evenly over the data "
                        "(indices floor(i * total / N))")
    return p


def spread_indices(total, limit):
    """``limit`` distinct indices spread evenly over range(total): floor(i * total / limit)."""
    if limit is None or limit >= total:
        return np.arange(total)
    return (np.arange(limit) * total) // limit


def model_input_shape(config, img_size=None):
    """(C, S, S) that the config's model takes; ``img_size`` overrides the config."""
    size = img_size if img_size is not None else config.get("img_size", 224)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise InputError(f"config img_size {list(size)} is not square: evaluation takes "
                             "square inputs only")
        size = size[0]
    chans = config.get("in_chans", 3)
    for name, v in (("in_chans", chans), ("img_size", size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"config field {name!r} must be a positive int, got {v!r}")
    if size > MAX_SIDE:
        raise InputError(f"--img-size {size}: more than {MAX_SIDE} pixels per side")
    return chans, size, size


def is_npz_data(path):
    """True when --data names an .npz test set rather than an image folder."""
    return path.lower().endswith(".npz") and not os.path.isdir(path)


def npz_data(path, shape, limit=None):
    """(images [N, C, H, W], labels [N] or None) from an .npz test set; shape = (C, H, W)."""
    arrays = load_npz(path, "data file")
    if "images" not in arrays:
        raise InputError(f"{path}: missing key 'images'")
    images, labels = arrays["images"], arrays.get("labels")
    if images.ndim != 4 or images.dtype.kind != "f" or tuple(images.shape[1:]) != tuple(shape):
        raise InputError(f"{path}: key 'images' has shape {images.shape} ({images.dtype}), "
                         f"expected [N, {shape[0]}, {shape[1]}, {shape[2]}] floating point")
    if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
        raise InputError(f"{path}: key 'labels' has shape {labels.shape} ({labels.dtype}), "
                         f"expected [{images.shape[0]}] integers")
    finite_or_error(f"{path}: key 'images'", images)
    idx = spread_indices(images.shape[0], limit)
    return images[idx], None if labels is None else labels[idx].astype(np.int64)


def folder_batches(folder, config, *, batch_size=64, class_map=None, limit=None, img_size=None,
                   crop_pct=None, skip_bad=False):
    """(iterator of (x [B, C, S, S], kept [B]), labels [N] or None, N) for an image folder.

    The eval transform uses the config's ``mean``/``std`` (ImageNet defaults without them) and
    ``crop_pct``, None for the model's default (timm_configs.default_crop_pct).
    """
    crop_pct = default_crop_pct(config)[0] if crop_pct is None else crop_pct
    C, S, _ = model_input_shape(config, img_size)
    check_memory(batch_size * C * S * S * 4, f"--data {folder}: a batch of {batch_size} "
                 f"{C}x{S}x{S} float32 images", "--batch-size or --img-size")
    paths, labels = list_images(folder, class_map=class_map)
    idx = spread_indices(len(paths), limit)
    paths = [paths[i] for i in idx]
    labels = None if labels is None else labels[idx]
    batches = iter_image_batches(paths, batch_size, size=S, skip_bad=skip_bad, in_chans=C,
                                 crop_pct=crop_pct, mean=config.get("mean", IMAGENET_MEAN),
                                 std=config.get("std", IMAGENET_STD))
    return batches, labels, len(paths)


def eval_data(path, ckpt, *, batch_size=64, class_map=None, limit=None, img_size=None,
              crop_pct=None, skip_bad=False, need_labels=False):
    """(images [N, C, S, S] or a stream of batches, labels [N] or None, N, crop_pct or None).

    An .npz test set is read whole; an image folder is streamed batch by batch (``evaluate``
    takes either), so memory stays at one batch. Labels are checked against num_classes.
    """
    if is_npz_data(path):
        images, labels = npz_data(path, model_input_shape(ckpt.config, img_size), limit)
        total, crop_pct = images.shape[0], None
    else:
        crop_pct = default_crop_pct(ckpt.config)[0] if crop_pct is None else crop_pct
        images, labels, total = folder_batches(path, ckpt.config, batch_size=batch_size,
                                               class_map=class_map, limit=limit, img_size=img_size,
                                               crop_pct=crop_pct, skip_bad=skip_bad)
    if labels is None and need_labels:
        raise InputError(f"{path}: no labels (use class sub-folders, or an .npz with 'labels')")
    if labels is not None and isinstance(ckpt.config.get("num_classes"), int):
        _check_labels(labels, ckpt.config["num_classes"], where=f"{path}: ")
    return images, labels, total, crop_pct


def _check_reference(ref, ckpt, shape):
    """The reference must take the same input and predict the same classes."""
    if ref.config.get("num_classes") != ckpt.config.get("num_classes"):
        raise InputError(f"{ref.path}: reference has num_classes {ref.config.get('num_classes')}, "
                         f"the checkpoint {ckpt.config.get('num_classes')}")
    if model_input_shape(ref.config, shape[1]) != shape:
        raise InputError(f"{ref.path}: reference takes in_chans {ref.config.get('in_chans', 3)}, "
                         f"the checkpoint {shape[0]}")


def run(args):
    """Evaluate as the parsed ``args`` say; returns the results dict."""
    xp = load_backend(args.backend)
    ckpt = load_checkpoint(args.checkpoint)
    shape = model_input_shape(ckpt.config, args.img_size)
    reference = None
    if args.reference:
        reference = load_checkpoint(args.reference)
        _check_reference(reference, ckpt, shape)
    images, labels, total, crop_pct = eval_data(
        args.data, ckpt, batch_size=args.batch_size, class_map=args.class_map, limit=args.limit,
        img_size=args.img_size, crop_pct=args.crop_pct, skip_bad=args.skip_bad_images)
    path, cost = inference_path(args.path, xp, ckpt)
    start = time.perf_counter()
    result = evaluate(ckpt, images, labels, reference=reference, batch_size=args.batch_size,
                      dtype=None if args.dtype is None else np.dtype(args.dtype), xp=xp,
                      path=path, cost=cost)
    return {"checkpoint": args.checkpoint, "reference": args.reference, "data": args.data,
            **result, "num_skipped": total - result["num_images"], "img_size": shape[1],
            "crop_pct": crop_pct, "backend": "numpy" if xp is np else "cupy",
            "dtype": args.dtype, "path": args.path, "seconds": round(time.perf_counter() - start, 3)}


def inference_path(name, xp, ckpt):
    """(path or None, CostModel or None) for --path; auto calibrates once, on NumPy only."""
    from .infer import CostModel, calibrate
    if name == "csr" and xp is not np:
        raise InputError("--path csr: needs --backend numpy (SciPy sparse matrices live on the host)")
    if name != "auto":
        return name, None
    if "fips" not in ckpt.extra:                   # an original checkpoint: no compressed MLP
        return None, None
    return None, (calibrate() if xp is np else CostModel())


def format_table(result):
    """A small text table of the results (percentages for fractions)."""
    rows = [("checkpoint", result["checkpoint"]), ("reference", result["reference"]),
            ("data", result["data"]),
            ("images", f"{result['num_images']} ({result['num_skipped']} skipped)")]
    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("reference_top1", "reference top-1"),
                       ("reference_top5", "reference top-5"), ("agreement", "top-1 agreement")):
        if key in result:
            rows.append((label, f"{100 * result[key]:.2f} %"))
    if "mean_kl" in result:
        rows.append(("mean KL(ref || model)", f"{result['mean_kl']:.6g} nats"))
    rows.append(("time", f"{result['seconds']:.1f} s ({result['backend']})"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows if value is not None)


def main(argv=None):
    """CLI entry point; returns the exit code (2 for bad input, with one 'error:' line;
    docs/robustness.md)."""
    args, code = parse(build_parser(), argv)
    if args is None:
        return code

    def body():
        check_paths([("CHECKPOINT", args.checkpoint), ("--data", args.data),
                     ("--reference", args.reference), ("--class-map", args.class_map)],
                    [("--json", args.json)])
        result = run(args)
        if args.json:
            save_json_atomic(args.json, result)
        print(format_table(result))
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
