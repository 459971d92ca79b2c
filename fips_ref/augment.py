"""Training-time data and loss of the global stage (docs/authors-code.md §7 "Loss and data").

Letters: B batch, C channels, H/W image height/width, S output side, K classes.

* The DeiT-III "3-augment" (RandomResizedCrop, horizontal flip, one of greyscale / solarise /
  Gaussian blur, colour jitter) on float images in pixel units [0, 1], seeded by a NumPy Generator.
* timm's Mixup / CutMix in "batch" mode with label smoothing (soft targets [B, K]).
* Soft-target cross-entropy and the KL distillation loss, each with its gradient w.r.t. the logits.

Images from an image folder enter as PIL → [C, H, W] / 255; already-normalised arrays (the .npz
format) are first mapped back to pixel units with the model's mean / std, augmented, and
normalised again (docs/finetune.md "Augmentation on arrays"). Unlike torchvision, which works on
uint8 PIL images, nothing is rounded to 1/255 between the operations.
"""
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .backend import get_xp

LUMA = (0.299, 0.587, 0.114)     # ITU-R 601-2, PIL convert("L") and torchvision Grayscale


@dataclass(frozen=True)
class AugmentConfig:
    """Every choice of the training transform and the mixing; defaults: docs/authors-code.md §7."""
    augment: str = "3aug"               # 3aug (DeiT-III, authors) | none
    crop_scale: tuple = (0.08, 1.0)     # RandomResizedCrop scale
    crop_ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratios (torchvision default)
    hflip: float = 0.5                  # probability of a horizontal flip
    color_jitter: float = 0.4           # brightness = contrast = saturation strength (0: off)
    blur_radius: tuple = (0.1, 2.0)     # Gaussian blur σ range, pixels
    mixup: float = 0.8                  # Mixup α (0: off)
    cutmix: float = 1.0                 # CutMix α (0: off)
    mix_prob: float = 1.0               # probability that a batch is mixed at all
    switch_prob: float = 0.5            # probability of CutMix rather than Mixup when both are on
    smoothing: float = 0.1              # label smoothing inside the mixed targets


# ----------------------------------------------------------------------------- 3-augment
def rrc_box(h, w, scale, ratio, rng):  # -> (top, left, height, width)
    """torchvision RandomResizedCrop.get_params: 10 tries of area·U(scale), log-uniform ratio."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h                                   # fallback: the central crop
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resized_crop(img, box, size):  # [C, H, W] -> [C, S, S]
    """Crop ``box`` and resize it to S×S with PIL's bicubic filter (per channel, mode 'F')."""
    top, left, ch, cw = box
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32), mode="F").resize(
        (size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))) for c in img]
    return np.clip(np.stack(out), 0.0, 1.0)          # uint8 PIL clamps the cubic overshoot too


def grayscale(img):  # [C, H, W] -> [C, H, W]
    """Grayscale(num_output_channels=C): luma in every channel; one channel is unchanged."""
    if img.shape[0] == 1:
        return img
    g = np.tensordot(np.asarray(LUMA, dtype=img.dtype), img, axes=1)  # [H, W]
    return np.broadcast_to(g, img.shape).copy()


def solarize(img):  # [C, H, W] -> [C, H, W]
    """ImageOps.solarize(threshold=128): pixels ≥ 128/255 become 1 − x."""
    return np.where(img >= 128 / 255, 1.0 - img, img).astype(img.dtype)


def gaussian_blur(img, sigma):  # [C, H, W] -> [C, H, W]
    """DeiT's GaussianBlur (PIL radius = σ), here an exact Gaussian with edge replication."""
    return np.stack([gaussian_filter(c, sigma, mode="nearest") for c in img]).astype(img.dtype)


def _blend(img, other, f):
    return np.clip(f * img + (1.0 - f) * other, 0.0, 1.0).astype(img.dtype)


def color_jitter(img, strength, rng):  # [C, H, W] -> [C, H, W]
    """torchvision ColorJitter(s, s, s): a random order, then brightness, contrast, saturation
    factors each U(max(0, 1 − s), 1 + s); hue is off."""
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - strength), 1 + strength) for _ in range(3)]
    for i in order:
        if i == 0:
            img = _blend(img, 0.0, factors[0])
        elif i == 1:
            img = _blend(img, float(grayscale(img)[0].mean()), factors[1])
        elif i == 2:
            img = _blend(img, grayscale(img), factors[2])
    return img


def three_augment(img, size, cfg, rng):  # [C, H, W] in [0, 1] -> [C, S, S] in [0, 1]
    """DeiT-III 3-augment (docs/authors-code.md §7): crop, flip, one of three, colour jitter."""
    box = rrc_box(img.shape[1], img.shape[2], cfg.crop_scale, cfg.crop_ratio, rng)
    img = resized_crop(img, box, size)
    if rng.random() < cfg.hflip:
        img = img[:, :, ::-1]
    choice = int(rng.integers(3))                     # RandomChoice of three, p = 1 each
    if choice == 0:
        img = grayscale(img)
    elif choice == 1:
        img = solarize(img)
    else:
        img = gaussian_blur(img, rng.uniform(*cfg.blur_radius))
    if cfg.color_jitter > 0:
        img = color_jitter(img, cfg.color_jitter, rng)
    return np.ascontiguousarray(img, dtype=np.float32)


def augment_normalised(x, mean, std, cfg, rng):  # [B, C, S, S] -> [B, C, S, S]
    """The training transform on already-normalised images: to pixels, augment, normalise."""
    if cfg.augment == "none":
        return x
    out = np.empty_like(x, dtype=np.float32)
    for i, img in enumerate(x):
        pixels = np.clip(img * std + mean, 0.0, 1.0)                      # [C, S, S]
        out[i] = (three_augment(pixels, x.shape[-1], cfg, rng) - mean) / std
    return out


# ----------------------------------------------------------------------------- Mixup / CutMix
def smooth_one_hot(labels, num_classes, smoothing):  # [B] -> [B, K]
    """timm one_hot with smoothing: off = ε/K everywhere, on = 1 − ε + ε/K at the label."""
    off = smoothing / num_classes
    y = np.full((labels.shape[0], num_classes), off)
    y[np.arange(labels.shape[0]), labels] = 1.0 - smoothing + off
    return y


def cutmix_box(h, w, lam, rng):  # -> (y0, y1, x0, x1)
    """timm rand_bbox: a box of side ratio √(1 − λ) around a uniform centre, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return (int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch // 2, 0, h)),
            int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw // 2, 0, w)))


def mix_batch(x, labels, num_classes, cfg, rng):  # [B, C, H, W], [B] -> ([B, C, H, W], [B, K], λ)
    """timm Mixup(mode='batch', correct_lam=True): mix each image with the flipped batch.

    Mixup: x ← λx + (1 − λ)x_flip, λ ~ Beta(α_m, α_m). CutMix: the box of cutmix_box gets
    x_flip, λ ~ Beta(α_c, α_c) corrected to 1 − box area / (H·W). Targets λy + (1 − λ)y_flip of
    the smoothed one-hots, so every row sums to 1.
    """
    lam, use_cutmix = 1.0, False
    if (cfg.mixup > 0 or cfg.cutmix > 0) and rng.random() < cfg.mix_prob:
        use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or rng.random() < cfg.switch_prob)
        alpha = cfg.cutmix if use_cutmix else cfg.mixup
        lam = float(rng.beta(alpha, alpha))
    x = np.array(x, dtype=np.float32)
    flipped = x[::-1].copy()
    if use_cutmix:
        y0, y1, x0, x1 = cutmix_box(x.shape[2], x.shape[3], lam, rng)
        x[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[2] * x.shape[3])
    elif lam != 1.0:
        x = (x * lam + flipped * (1.0 - lam)).astype(np.float32)
    y = smooth_one_hot(labels, num_classes, cfg.smoothing)
    return x, lam * y + (1.0 - lam) * y[::-1], lam


# ----------------------------------------------------------------------------- losses
def log_softmax(z):  # [B, K] -> [B, K]
    xp = get_xp(z)
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def soft_target_ce(logits, target):  # [B, K], [B, K] -> (loss, dlogits [B, K])
    """timm SoftTargetCrossEntropy: L = mean_b Σ_k −t_bk log softmax(z_b)_k; dL/dz = (p − t)/B
    (rows of t sum to 1)."""
    xp = get_xp(logits)
    target = xp.asarray(target, dtype=logits.dtype)
    lp = log_softmax(logits)
    n = logits.shape[0]
    loss = -(target * lp).sum() / n
    return loss, (xp.exp(lp) * target.sum(axis=-1, keepdims=True) - target) / n


def kl_distill(logits, teacher, temperature=1.0):  # [B, K], [B, K] -> (loss, dlogits [B, K])
    """L = T² · mean_b KL(softmax(t_b/T) ‖ softmax(z_b/T)); dL/dz = T·(softmax(z/T) − softmax(t/T))/B."""
    xp = get_xp(logits)
    n, T = logits.shape[0], temperature
    lq, lp = log_softmax(logits / T), log_softmax(xp.asarray(teacher, dtype=logits.dtype) / T)
    p = xp.exp(lp)
    loss = T * T * (p * (lp - lq)).sum() / n
    return loss, T * (xp.exp(lq) - p) / n
