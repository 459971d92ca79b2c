"""What every study shares: the checkpoint, a seeded train / held-out split of the calibration
MLP inputs, the labelled evaluation set, and one measured local-stage run (docs/study.md).

Letters: N calibration samples, T tokens, D model width, F hidden width.
"""
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..backend import to_numpy
from ..checkpoint import Checkpoint, InputError
from ..local_stage import (FiPSConfig, cached_targets, compressed_layers, dense_weights,
                           relative_errors, run_local_stage)
from ..sparsity import density, describe


@dataclass
class Context:
    """A checkpoint with its calibration inputs split into train and held-out samples."""
    ckpt: Checkpoint
    blocks: list                   # checkpoint.MLPBlock, forward order
    train: dict                    # {block: [N_train, T, D]}, in a seeded random order
    held: dict                     # {block: [N_held, T, D]}
    base: FiPSConfig               # the study's defaults (epochs, batch size, seed, lr, ...)
    group_size: int = 4            # blocks per sharing group where a study does not vary it
    xp: object = np
    dtype: type = np.float32
    eval_images: object = None     # [N, C, H, W] normalised, or None
    eval_labels: object = None     # [N] int, or None
    calib_note: str = ""
    cache: dict = field(default_factory=dict, repr=False)   # run key -> measured dict
    _held_targets: dict = field(default=None, repr=False)
    _dense: dict = field(default=None, repr=False)

    @property
    def depth(self):
        return len(self.blocks)

    def dense(self):
        """The original MLPs in math layout on the study's backend (made once)."""
        if self._dense is None:
            self._dense = dense_weights(self.ckpt.tensors, self.blocks, xp=self.xp, dtype=self.dtype)
        return self._dense

    def held_targets(self):
        """Original MLP outputs of the held-out samples (computed once)."""
        if self._held_targets is None:
            self._held_targets = cached_targets(self.dense(), self.held, xp=self.xp, dtype=self.dtype)
        return self._held_targets


def split_calibration(acts, holdout, seed):
    """Seeded split of every block's samples: (train, held-out), the same rows for every block.

    One permutation of the N samples (numpy default_rng(seed)); its first round(N·holdout) go to
    the held-out set (sorted), the rest to training in permuted order, so that the first n of
    the training set are a random subset of size n (the calibration-size study uses this).
    """
    n = {a.shape[0] for a in acts.values()}
    if len(n) != 1:
        raise InputError(f"calibration activations: blocks have different sample counts {sorted(n)}")
    n = n.pop()
    n_held = int(round(n * holdout))
    if n_held < 1 or n - n_held < 1:
        raise InputError(f"--holdout {holdout}: {n} calibration samples leave an empty split")
    perm = np.random.default_rng(seed).permutation(n)
    held_idx, train_idx = np.sort(perm[:n_held]), perm[n_held:]
    train = {b: np.asarray(a[train_idx]) for b, a in acts.items()}
    held = {b: np.asarray(a[held_idx]) for b, a in acts.items()}
    return train, held


def consecutive_groups(blocks, size):
    """Groups of ``size`` consecutive blocks inside each stage; a stage's last group may be shorter."""
    out = []
    for stage in sorted({b.stage for b in blocks}):
        ids = [b.index for b in blocks if b.stage == stage]
        out += [ids[i:i + size] for i in range(0, len(ids), size)]
    return out


def run_key(cfg, groups, n_train):
    return (tuple(sorted(dataclasses.asdict(cfg).items())), tuple(map(tuple, groups)), n_train)


def measure(ctx, cfg, groups, *, n_train=None, log=None):
    """One local stage (paper §3 "Local error minimisation") on the training split, measured on held-out data.

    Returns a dict: held-out relative MLP output error per block and its mean, top-1 on the
    evaluation set (None without one), ranks, achieved sparsity, per-layer density, history.
    Runs with equal (config, groups, training size) are measured once per Context.
    """
    key = run_key(cfg, groups, n_train)
    if key in ctx.cache:
        return ctx.cache[key]
    train = ctx.train if n_train is None else {b: a[:n_train] for b, a in ctx.train.items()}
    if log:
        log(f"  local stage: {describe_cfg(cfg, ctx.base)}, groups {format_groups(groups)}, "
            f"{next(iter(train.values())).shape[0]} training samples")
    result = run_local_stage(ctx.ckpt.tensors, train, groups, cfg, blocks=ctx.blocks, xp=ctx.xp,
                             dtype=ctx.dtype, errors=False)
    errors = relative_errors(result.params, result.masks, result.groups, ctx.dense(), ctx.held,
                             xp=ctx.xp, dtype=ctx.dtype, targets=ctx.held_targets())
    out = {"errors": errors, "error": float(np.mean(list(errors.values()))),
           "top1": top1(ctx, result), "ranks": [g.rank for g in result.groups],
           "sparsity": 1.0 - density(result.masks) if result.masks else 0.0,
           "layer_density": describe(result.masks) if result.masks else {},
           "history": result.history, "seconds": result.seconds}
    ctx.cache[key] = out
    return out


def compressed_tensors(ctx, result):
    """The checkpoint's tensors with every compressed fc weight replaced by its product U·(V⊙M) (§3)."""
    tensors = dict(ctx.ckpt.tensors)
    for g in result.groups:
        for b in g.blocks:
            layers = [l for l in g.layers if l.block == b]
            for layer, (A, B, bias) in zip(layers, compressed_layers(result.params, result.masks, g, b)):
                tensors[f"{layer.key}.weight"] = to_numpy(A @ B).T.astype(np.float32)   # [out, in]
                tensors[f"{layer.key}.bias"] = to_numpy(bias).astype(np.float32)
    return tensors


def top1(ctx, result):
    """Top-1 of the compressed model on the labelled evaluation set, or None without one."""
    if ctx.eval_images is None or ctx.eval_labels is None:
        return None
    from ..evaluate import evaluate
    ckpt = Checkpoint(ctx.ckpt.path, ctx.ckpt.config, compressed_tensors(ctx, result))
    return evaluate(ckpt, ctx.eval_images, ctx.eval_labels, dtype=ctx.dtype, xp=ctx.xp)["top1"]


def original_top1(ctx):
    """Top-1 of the uncompressed checkpoint (cached), or None without labelled data."""
    if ctx.eval_images is None or ctx.eval_labels is None:
        return None
    if "original_top1" not in ctx.cache:
        from ..evaluate import evaluate
        ctx.cache["original_top1"] = evaluate(ctx.ckpt, ctx.eval_images, ctx.eval_labels,
                                              dtype=ctx.dtype, xp=ctx.xp)["top1"]
    return ctx.cache["original_top1"]


def run_row(ctx, cfg, groups, m, **extra):
    """One tidy CSV row of a measured run: every parameter a column, then the measurements."""
    return {**extra, "budget": cfg.budget, "sparsity": cfg.sparsity, "sparsifier": cfg.sparsifier,
            "strategy": cfg.strategy, "tau": cfg.tau, "global_pruning": cfg.global_pruning,
            "init": cfg.init, "growth": cfg.growth, "scaling_vectors": cfg.scaling_vectors,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "groups": format_groups(groups), "ranks": " ".join(map(str, m["ranks"])),
            "train_samples": extra.get("train_samples", next(iter(ctx.train.values())).shape[0]),
            "heldout_rel_error": m["error"], "achieved_sparsity": m["sparsity"],
            "top1": m["top1"], "seconds": round(m["seconds"], 2)}


def format_groups(groups):
    return ",".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def describe_cfg(cfg, base):
    """The fields of ``cfg`` that differ from the study's defaults, as 'name=value' text."""
    diff = [f"{k}={v}" for k, v in dataclasses.asdict(cfg).items() if getattr(base, k) != v]
    return " ".join(diff) or "defaults"
