"""Image folders and the timm / FiPS image transforms, with Pillow and NumPy only.

Dimension legend: B batch, C channels, H/W image height/width, K classes.

- ``list_images``: an ImageFolder tree (one sub-folder per class, classes sorted, label =
  index in sorted order, as torchvision ``ImageFolder``) or a flat folder (no labels).
- ``eval_transform``: timm ``transforms_imagenet_eval`` (crop_mode 'center'):
  Resize(floor(size / crop_pct)) on the shorter side, CenterCrop(size), ToTensor, Normalize.
- ``train_transform``: the FiPS calibration augmentation (docs/authors-code.md §4.1): Resize the shorter
  side to 256 or 480 (random), RandomCrop(224), horizontal flip p = 0.5, Normalize.
- ``load_images`` / ``iter_image_batches``: decode + transform into float32 [B, C, H, W].
"""
import json
import math
import os
import stat
import sys

import numpy as np
from PIL import Image

from .checkpoint import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm/data/constants.py IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)   # IMAGENET_DEFAULT_STD
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")
# FiPS configs/data/imagenet.yaml: _RESIZE_X 256, _RESIZE_Y 480, crop 224.
TRAIN_SCALES = (256, 480)
TRAIN_CROP = 224
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def is_image_file(name):
    """True for a visible file name with a supported image extension (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder):
    """Sorted paths of every image below ``folder`` (recursive, hidden entries skipped).

    Symlinked folders are followed once each (a link back to an ancestor is not a loop), and
    only regular files count: a FIFO, socket or device named x.png would block or misread.
    """
    out, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(p for p in (os.path.join(root, f) for f in sorted(files) if is_image_file(f))
                   if is_regular_file(p))
    return out


def is_regular_file(path):
    """True for a regular file (after symlinks); False for FIFOs, devices, sockets, dangling links."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def load_class_map(path):
    """Class name -> index from a JSON object/list, or a text file (first word per line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such class-map file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: class-map file cannot be read ({e})") from None
    if path.lower().endswith(".json"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise InputError(f"{path}: class map is not valid JSON ({e})") from None
        if isinstance(value, list):
            value = {str(name): i for i, name in enumerate(value)}
        if not isinstance(value, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()):
            raise InputError(f"{path}: class map must map class names to indices >= 0")
        return value
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    return {name: i for i, name in enumerate(names)}


def list_images(folder, *, class_map=None):
    """Image paths and labels of an ImageFolder tree, or (paths, None) for a flat folder.

    Parameters
    ----------
    folder : str
        Either one sub-folder per class (labels = index of the class in sorted order, or
        ``class_map[name]``), or images directly inside (no labels).
    class_map : dict | str | None
        Class name -> index, or a file for ``load_class_map`` (e.g. ImageNet synsets).

    Returns
    -------
    paths : list[str]
        Sorted by class, then by path.
    labels : np.ndarray | None
        int64 [N], or None for a flat folder.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such image folder")
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    per_class = [_images_under(os.path.join(folder, c)) for c in classes]
    if any(per_class):
        return _labelled(folder, classes, per_class, class_map)
    paths = [os.path.join(folder, e) for e in entries
             if is_image_file(e) and is_regular_file(os.path.join(folder, e))]
    if not paths:
        raise InputError(f"{folder}: no images found (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return paths, None


def _labelled(folder, classes, per_class, class_map):
    """(paths, labels [N]) of an ImageFolder tree, labels from sorted order or ``class_map``."""
    if isinstance(class_map, (str, os.PathLike)):
        class_map = load_class_map(class_map)
    paths, labels = [], []
    for i, (name, files) in enumerate(zip(classes, per_class)):
        if class_map is not None and name not in class_map:
            raise InputError(f"{os.path.join(folder, name)}: class {name!r} is not in the "
                             "class map")
        label = i if class_map is None else class_map[name]
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, np.asarray(labels, dtype=np.int64)


def channel_stats(values, in_chans):
    """Per-channel mean or std as float32 [C, 1, 1] (1 value repeats; RGB -> grey averages)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 1:
        v = np.repeat(v, in_chans)
    elif v.size == 3 and in_chans == 1:
        v = v.mean(keepdims=True)
    if v.size != in_chans:
        raise InputError(f"normalisation has {v.size} values for {in_chans} channels")
    return v.astype(np.float32).reshape(in_chans, 1, 1)


def _square(size):
    """int or [S, S] -> S (only square inputs are supported)."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise InputError(f"image size {list(size)} is not square; only square sizes are "
                             "supported")
        size = size[0]
    return int(size)


def to_mode(img, in_chans):
    """Convert a PIL image to 'RGB' (in_chans 3) or 'L' (in_chans 1)."""
    mode = {3: "RGB", 1: "L"}.get(in_chans)
    if mode is None:
        raise InputError(f"in_chans must be 1 or 3, got {in_chans}")
    return img if img.mode == mode else img.convert(mode)


def resize_shorter(img, short, interpolation):
    """torchvision Resize(int): shorter side -> short, longer -> int(short * long / short_side)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def center_crop(img, size):
    """torchvision CenterCrop: zero-pad if smaller, offsets int(round((h - size) / 2))."""
    w, h = img.size
    if size > w or size > h:
        left, top = max(size - w, 0) // 2, max(size - h, 0) // 2
        padded = Image.new(img.mode, (max(w, size), max(h, size)), 0)
        padded.paste(img, (left, top))
        img, (w, h) = padded, padded.size
    top = int(round((h - size) / 2.0))   # Python round: half to even, as torchvision
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_array(img, mean, std):
    """ToTensor + Normalize in float32: PIL [H, W, C] uint8 -> [C, H, W]."""
    x = np.asarray(img, dtype=np.float32)  # [H, W, C] or [H, W]
    x = x.reshape(x.shape[0], x.shape[1], -1).transpose(2, 0, 1) / np.float32(255)  # -> [C, H, W]
    return (x - mean) / std


def eval_transform(img, *, size, crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   interpolation="bicubic", in_chans=3):  # PIL -> [C, S, S]
    """timm eval transform: resize shorter side to floor(size / crop_pct), centre crop, normalise.

    .. math:: x = (\\mathrm{crop}(\\mathrm{resize}(img)) / 255 - \\mu) / \\sigma
    """
    size = _square(size)
    img = to_mode(img, in_chans)
    img = resize_shorter(img, math.floor(size / crop_pct), interpolation)  # timm scale_size
    img = center_crop(img, size)
    return to_array(img, channel_stats(mean, in_chans), channel_stats(std, in_chans))


def train_scales(size):
    """Shorter-side choices for RandomCrop(size): (256, 480) at 224, scaled for other sizes."""
    return tuple(int(round(s * size / TRAIN_CROP)) for s in TRAIN_SCALES)


def train_transform(img, *, rng, size=TRAIN_CROP, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    interpolation="bilinear", in_chans=3):  # PIL -> [C, S, S]
    """FiPS calibration augmentation (docs/authors-code.md §4.1): random resize, RandomCrop, flip.

    The authors' ``transforms.Resize`` uses torchvision's default (bilinear) interpolation.
    Draws, in order: the scale (``rng.integers(2)``), the crop top and left, the flip.
    """
    size = _square(size)
    img = to_mode(img, in_chans)
    img = resize_shorter(img, train_scales(size)[int(rng.integers(2))], interpolation)
    w, h = img.size
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    img = img.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_array(img, channel_stats(mean, in_chans), channel_stats(std, in_chans))


def open_image(path):
    """Decode an image file fully (InputError naming the file if Pillow cannot)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: the pixels stay available after the file closes
            return img
    except Exception as e:  # UnidentifiedImageError, truncated data, decompression bomb...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot read image ({msg})") from None


def _transform_one(path, *, size, train, rng, in_chans, **kw):
    """Decode and transform one file: [C, S, S]."""
    img = open_image(path)
    if train:
        if rng is None:
            raise ValueError("train=True needs rng (a numpy Generator)")
        kw.pop("crop_pct", None)
        return train_transform(img, rng=rng, size=size, in_chans=in_chans, **kw)
    return eval_transform(img, size=size, in_chans=in_chans, **kw)


def iter_image_batches(paths, batch_size, *, size, train=False, rng=None, skip_bad=False,
                       in_chans=3, **transform_kw):
    """Yield (images [B, C, S, S] float32, kept [B] int64) for consecutive groups of paths.

    ``kept`` indexes ``paths``; with ``skip_bad`` unreadable files are left out (one warning
    line each on stderr) so labels stay aligned via ``labels[kept]``. Only one batch of
    decoded images is held at a time; batches where every file was skipped are not yielded.
    ``transform_kw``: crop_pct, mean, std, interpolation (see eval/train_transform).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(paths), batch_size):
        arrays, kept = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                arrays.append(_transform_one(paths[i], size=size, train=train, rng=rng,
                                             in_chans=in_chans, **transform_kw))
            except InputError as e:
                if not skip_bad:
                    raise
                sys.stderr.write(f"warning: skipping unreadable image: {e}\n")
                continue
            kept.append(i)
        if kept:
            yield np.stack(arrays), np.asarray(kept, dtype=np.int64)  # [B, C, S, S], [B]


def load_images(paths, *, size, train=False, rng=None, skip_bad=False, in_chans=3,
                return_indices=False, **transform_kw):
    """Decode and transform every path: float32 [N, C, S, S] (and kept indices [N]).

    Parameters
    ----------
    paths : list[str]
    size : int
        Output side S.
    train : bool
        FiPS calibration augmentation (needs ``rng``) instead of the eval transform.
    skip_bad : bool
        Skip unreadable files with a warning instead of raising InputError.
    return_indices : bool
        Also return ``kept`` (int64 [N], indices into ``paths``), for label alignment.
    """
    size = _square(size)
    chunks, kept = [], []
    for x, k in iter_image_batches(paths, max(len(paths), 1), size=size, train=train, rng=rng,
                                   skip_bad=skip_bad, in_chans=in_chans, **transform_kw):
        chunks.append(x)
        kept.append(k)
    images = np.concatenate(chunks) if chunks else np.zeros((0, in_chans, size, size), np.float32)
    kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return (images, kept) if return_indices else images
