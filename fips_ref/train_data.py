"""Training data of the global stage: an images+labels .npz or an ImageFolder tree, read one batch
at a time (docs/finetune.md "Data").

Letters: N images, B batch, C channels, S the model's input side, K classes.

An .npz whose members are stored uncompressed (np.savez) is read from disk a batch of rows at a
time (calib.DiskArray); a compressed one is read whole (zip members cannot be read by rows).
Folder images are decoded per batch. Each epoch visits a seeded permutation in full batches
(the authors' ``drop_last=True``, docs/authors-code.md §7).
"""
from dataclasses import dataclass

import numpy as np

from .augment import augment_normalised, three_augment
from .calib import _npz_members
from .checkpoint import InputError, load_npz
from .images import IMAGENET_MEAN, IMAGENET_STD, channel_stats, eval_transform, list_images, open_image, to_mode
from .validate import check_memory, finite_or_error


@dataclass
class TrainData:
    """A training set: ``count`` images, int64 ``labels`` [N], and ``read(idx)`` -> [B, C, S, S]."""
    path: str
    count: int
    labels: np.ndarray
    read: object                  # callable(idx [B], rng) -> float32 [B, C, S, S], normalised
    close: object = None


def norm_stats(config):
    """(mean, std) float32 [C, 1, 1] of the model (config 'mean'/'std', ImageNet otherwise)."""
    c = config.get("in_chans", 3)
    return (channel_stats(config.get("mean", IMAGENET_MEAN), c),
            channel_stats(config.get("std", IMAGENET_STD), c))


def open_train_data(path, config, aug, *, class_map=None, skip_bad=False):
    """TrainData of an .npz (keys 'images' [N, C, S, S] normalised, 'labels' [N]) or a folder."""
    if str(path).lower().endswith(".npz"):
        return _npz_data(path, config, aug)
    return _folder_data(path, config, aug, class_map, skip_bad)


def _input_shape(config):
    size = config.get("img_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return config.get("in_chans", 3), int(size)


def _npz_data(path, config, aug):
    c, s = _input_shape(config)
    members = _npz_members(path, ["images", "labels"])    # None unless stored uncompressed
    arrays = members if members is not None else load_npz(path, "training data file")
    for key in ("images", "labels"):
        if key not in arrays:
            raise InputError(f"{path}: missing key {key!r} (the training data needs images and labels)")
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim != 4 or images.dtype.kind != "f" or tuple(images.shape[1:]) != (c, s, s):
        raise InputError(f"{path}: key 'images' has shape {list(images.shape)} ({images.dtype}), "
                         f"expected [N, {c}, {s}, {s}] floating point")
    labels = np.asarray(labels[np.arange(labels.shape[0])] if members else labels)
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise InputError(f"{path}: key 'labels' has shape {list(labels.shape)} ({labels.dtype}), "
                         f"expected [{images.shape[0]}] integers")
    mean, std = norm_stats(config)

    def read(idx, rng):  # [B] -> [B, C, S, S]
        order = np.argsort(idx)                     # DiskArray reads sorted rows fastest
        x = np.empty((len(idx), c, s, s), dtype=np.float32)
        x[order] = images[np.asarray(idx)[order]]
        finite_or_error(f"{path}: key 'images' rows {sorted(idx)[:3]}...", x)
        return augment_normalised(x, mean, std, aug, rng)
    close = (lambda: [m.close() for m in members.values()]) if members else None
    return TrainData(str(path), int(images.shape[0]), labels.astype(np.int64), read, close)


def _folder_data(path, config, aug, class_map, skip_bad):
    c, s = _input_shape(config)
    paths, labels = list_images(path, class_map=class_map)
    if labels is None:
        raise InputError(f"{path}: no labels (the training folder needs one sub-folder per class)")
    mean, std = norm_stats(config)

    def read(idx, rng):  # [B] -> [B, C, S, S]
        out = []
        for i in idx:
            try:
                img = to_mode(open_image(paths[i]), c)
            except InputError:
                if not skip_bad:
                    raise
                img = None
            out.append(_transform(img, s, mean, std, aug, rng))
        return np.stack(out)
    return TrainData(str(path), len(paths), labels, read)


def _transform(img, size, mean, std, aug, rng):  # PIL -> [C, S, S]
    """3-augment from the decoded image, or with --augment none the eval transform."""
    if img is None:                                  # --skip-bad-images: a blank (mean) image
        return np.zeros((mean.shape[0], size, size), dtype=np.float32)
    if aug.augment == "none":
        return eval_transform(img, size=size, mean=mean, std=std, in_chans=mean.shape[0])
    pixels = np.asarray(img, dtype=np.float32).reshape(img.size[1], img.size[0], -1)
    pixels = pixels.transpose(2, 0, 1) / np.float32(255)                  # [C, H, W] in [0, 1]
    return (three_augment(pixels, size, aug, rng) - mean) / std


def check_labels(data, num_classes):
    """Labels must lie in [0, K) of the (possibly replaced) head."""
    y = data.labels
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"--data {data.path}: labels range over [{y.min()}, {y.max()}] but the "
                         f"model has {num_classes} classes (use --num-classes K for a new head)")


def epoch_order(count, batch_size, rng):
    """Index arrays [B] of one epoch: a permutation cut into full batches (drop_last)."""
    perm = rng.permutation(count)
    return [perm[i:i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]


def check_batch(count, batch_size, c, s):
    """At least one full batch, and a batch that fits in memory (checked before allocating)."""
    if batch_size > count:
        raise InputError(f"--batch-size {batch_size}: more than the {count} training images "
                         "(every step takes a full batch, as the authors' drop_last)")
    check_memory(4 * batch_size * c * s * s * 3, f"a batch of {batch_size} {c}x{s}x{s} images",
                 "--batch-size")
