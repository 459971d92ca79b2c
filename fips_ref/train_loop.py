"""The epoch loop of the global stage (docs/authors-code.md §7): batches in a seeded order, the
training transform, Mixup/CutMix, ``global_stage.global_step``, and top-1 on validation data.

Letters: B batch, K classes. Losses stay on the device until the end of an epoch (no sync per step).
"""
import numpy as np

from .augment import mix_batch
from .backend import to_numpy
from .checkpoint import InputError
from .global_stage import global_step, predict
from .sparsity import density
from .train_data import epoch_order


def train(state, model, mlps, cfg, aug, sched, data, args, seeds, teacher, evaluation, log):
    """Run every epoch; returns (history {loss, lr, sparsity per step}, [per-epoch metrics])."""
    xp, k = model.xp, model.cfg.num_classes
    rng_order, rng_aug, rng_mix = (np.random.default_rng(s) for s in seeds[:3])
    history, epochs = {"loss": [], "lr": [], "sparsity": []}, []
    masks, sparsity = None, None
    for epoch in range(args.epochs):
        losses, hits, seen = [], [], 0
        for idx in epoch_order(data.count, args.batch_size, rng_order):
            x = data.read(idx, rng_aug)                                       # [B, C, S, S]
            x, target, _ = mix_batch(x, data.labels[idx], k, aug, rng_mix)    # [B, K] soft
            x, target = xp.asarray(x, dtype=model.dtype), xp.asarray(target, dtype=model.dtype)
            t_logits = None if teacher is None else _teacher_logits(teacher, x)
            loss, lr, logits = global_step(state, model, mlps, cfg, sched, x, target, t_logits)
            if state.masks is not masks:                                      # changed: recount
                masks, sparsity = state.masks, 1.0 - density(state.masks)
            losses.append(loss)
            history["lr"].append(lr)
            history["sparsity"].append(sparsity)
            hits.append((logits.argmax(axis=1) == target.argmax(axis=1)).sum())
            seen += len(idx)
        losses = [float(v) for v in to_numpy(xp.stack(losses))]
        if not np.all(np.isfinite(losses)):
            raise InputError(f"the training loss is not finite in epoch {epoch + 1} "
                             f"(diverged: lower --lr)")
        history["loss"].extend(losses)
        last = epoch + 1 == args.epochs
        val = (evaluate_top1(model, mlps, state.params, evaluation, args.batch_size)
               if last or (epoch + 1) % args.eval_every == 0 else None)
        row = {"epoch": epoch + 1, "steps": state.step, "train_loss": float(np.mean(losses)),
               "train_top1": float(to_numpy(xp.stack(hits)).sum()) / seen, "val_top1": val,
               "sparsity": sparsity}
        epochs.append(row)
        log(f"epoch {epoch + 1}/{args.epochs} step {state.step} loss {row['train_loss']:.4f} "
            f"train top-1 {row['train_top1']:.4f}" + ("" if val is None else f" val top-1 {val:.4f}")
            + f" sparsity {sparsity:.4f}")
    return history, epochs


def _teacher_logits(teacher, x):  # [B, C, H, W] -> [B, K]
    from .models import ARCHS
    return ARCHS[teacher.arch].forward(teacher.cfg, teacher.params, teacher.mlps, x)


def evaluate_top1(model, mlps, params, evaluation, batch_size):
    """Top-1 of the current weights on --eval-data (None without it); ties: lower class first."""
    if evaluation is None:
        return None
    from .evaluate import _as_batches, topk_hits
    images, labels = evaluation()
    hits = n = 0
    for x, kept in _as_batches(images, batch_size):
        kept = np.arange(n, n + len(x)) if kept is None else kept
        logits = to_numpy(predict(model, mlps, params, model.xp.asarray(x, dtype=model.dtype)))
        hits += int(topk_hits(logits, labels[kept], 1).sum())
        n += len(x)
    return hits / n if n else None
