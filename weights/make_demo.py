#!/usr/bin/env python3
"""Maintainer script: builds the bundled demo model (a tiny ViT trained on scikit-learn digits).

NOT part of the fips_ref library and never imported by it. The `train` step uses PyTorch and
scikit-learn, which are *not* runtime dependencies of fips_ref; install them only to rerun it:

    pip install torch==2.13.0 scikit-learn      # CPU torch is enough (used: torch 2.13.0+cpu,
                                                 # scikit-learn 1.9.1, numpy 2.4.6, Python 3.11)
    python weights/make_demo.py train            # ~4 min on 2 CPU cores; also the default step
    python weights/make_demo.py record           # needs NO torch: numpy + fips_ref only

Run both from the repository root (the script also finds fips_ref when run from elsewhere).

`train` writes
    weights/vit_digits.npz           the checkpoint (docs/checkpoint-format.md): timm ViT keys,
                                     float32, PyTorch layout, JSON `config` (with extra fields
                                     "mean", "std", "test_accuracy", "description")
    weights/digits_test.npz          images float32 [360, 1, 8, 8] (normalised), labels int64 [360],
                                     torch_logits float32 [360, 10] (torch's eval logits, for
                                     checking a forward pass)
    weights/digits_train.npz        images float32 [1437, 1, 8, 8] (normalised), labels int64:
                                     the whole TRAIN split, in split order

`record` writes
    weights/vit_digits_calib.npz     mlp_in.{i} float16 [N, 17, 128] for every block i: the input
                                     of block i's MLP (after norm2) for the FIRST N images of
                                     digits_train.npz (default N = 512, 17.8 MB; float16
                                     halves the repository size, the local stage computes in
                                     float32; see --num-images, --float32)
and checks that fips_ref.models.forward reproduces torch's test accuracy and logits.

Data: sklearn.datasets.load_digits (bundled with scikit-learn, no download): 1797 8x8 images,
pixel values 0..16. Split: train_test_split(test_size=0.2, random_state=0, stratify=labels)
-> 1437 train / 360 test. Normalisation: x = (pixels / 16 - 0.5) / 0.5, i.e. [0,1] then
mean 0.5 / std 0.5, so the range is [-1, 1].

Model: timm-style VisionTransformer written here (timm is not needed): in_chans=1,
img_size=8, patch_size=2 (16 patches), class token, learned pos_embed [1, 17, 128],
embed_dim=128, depth=8, num_heads=4, mlp_ratio=4, qkv_bias=True, pre-norm blocks with
LayerNorm eps 1e-6, exact (erf) GELU, final norm, head on token 0; no distillation token,
no LayerScale, no dropout. Parameter names are timm's.
"""
import argparse
import hashlib
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fips_ref.checkpoint import json_entry, load_npz, save_npz_atomic  # noqa: E402

CKPT = os.path.join(HERE, "vit_digits.npz")
TEST = os.path.join(HERE, "digits_test.npz")
TRAIN_IMAGES = os.path.join(HERE, "digits_train.npz")
CALIB_ACTS = os.path.join(HERE, "vit_digits_calib.npz")

SEED = 0
SPLIT_SEED = 0
MEAN, STD = 0.5, 0.5

CONFIG = {
    "arch": "vit",
    "img_size": 8,
    "patch_size": 2,
    "in_chans": 1,
    "embed_dim": 128,
    "depth": 8,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "norm_eps": 1e-6,
    "class_token": True,
    "distilled": False,
    "num_classes": 10,
    "mean": [MEAN],
    "std": [STD],
    "timm_name": None,
}

# Training recipe (fixed; the run is deterministic on CPU with 2 threads).
EPOCHS = 60
BATCH = 64
LR = 1e-3
WARMUP_EPOCHS = 5
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
SHIFT_PROB = 0.5         # fraction of training images shifted by a random (dy, dx) in {-1,0,1}^2


# --------------------------------------------------------------------------------------------
# data (numpy + scikit-learn)

def load_split():
    """(x_train, y_train, x_test, y_test): images in [0, 1] as float32 [N, 1, 8, 8], labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def normalise(x01):
    return ((x01 - MEAN) / STD).astype(np.float32)


# --------------------------------------------------------------------------------------------
# model (torch)

def build_model():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    c = CONFIG
    D, H = c["embed_dim"], c["num_heads"]
    hidden = int(D * c["mlp_ratio"])

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(c["in_chans"], D, c["patch_size"], stride=c["patch_size"])

        def forward(self, x):                      # [B, C, H, W] -> [B, P, D], row-major
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = H
            self.head_dim = D // H
            self.scale = self.head_dim ** -0.5
            self.qkv = nn.Linear(D, 3 * D, bias=c["qkv_bias"])
            self.proj = nn.Linear(D, D)

        def forward(self, x):
            B, T, _ = x.shape
            qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]            # [B, heads, T, head_dim]
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = (attn @ v).transpose(1, 2).reshape(B, T, D)   # heads merged as (heads, head_dim)
            return self.proj(x)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(D, hidden)
            self.fc2 = nn.Linear(hidden, D)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))       # exact erf GELU

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(D, eps=c["norm_eps"])
            self.attn = Attention()
            self.norm2 = nn.LayerNorm(D, eps=c["norm_eps"])
            self.mlp = Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            n_patches = (c["img_size"] // c["patch_size"]) ** 2
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, D))
            self.blocks = nn.ModuleList([Block() for _ in range(c["depth"])])
            self.norm = nn.LayerNorm(D, eps=c["norm_eps"])
            self.head = nn.Linear(D, c["num_classes"])
            # init: pos_embed starts from a 2-D sin-cos table (MAE-style; it stays a learned
            # parameter, it only gives the tiny data set a spatial prior), the rest as timm:
            # trunc_normal(.02) for Linear weights, normal(1e-6) for cls_token
            with torch.no_grad():
                self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(D, c["img_size"] // c["patch_size"])))
            nn.init.normal_(self.cls_token, std=1e-6)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = x + self.pos_embed
            for blk in self.blocks:
                x = blk(x)
            x = self.norm(x)
            return self.head(x[:, 0])

    return VisionTransformer()


def sincos_pos_embed(dim, grid):
    """[1, 1 + grid*grid, dim] 2-D sin-cos position table (row-major patches), zeros for cls."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    hh, ww = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def emb(pos):
        out = pos.reshape(-1, 1) * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([emb(hh), emb(ww)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table])[None].astype(np.float32)


def random_shift(x01, rng, prob):
    """Shift each image with probability ``prob`` by a random (dy, dx) in {-1, 0, 1}^2, filling
    with 0 (background); the other images are left as they are."""
    n = x01.shape[0]
    padded = np.zeros((n, 1, 10, 10), np.float32)
    padded[:, :, 1:9, 1:9] = x01
    dy = rng.integers(0, 3, n)
    dx = rng.integers(0, 3, n)
    keep = rng.random(n) >= prob
    dy[keep] = 1
    dx[keep] = 1
    out = np.empty_like(x01)
    for s_y in range(3):
        for s_x in range(3):
            m = (dy == s_y) & (dx == s_x)
            out[m] = padded[m, :, s_y:s_y + 8, s_x:s_x + 8]
    return out


def cmd_train(args):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)

    x_tr, y_tr, x_te, y_te = load_split()
    print(f"digits: {len(y_tr)} train / {len(y_te)} test images")
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in ("cls_token", "pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in ("cls_token", "pos_embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    steps_per_epoch = (len(y_tr) + BATCH - 1) // BATCH
    total = args.epochs * steps_per_epoch
    warmup = WARMUP_EPOCHS * steps_per_epoch

    def lr_at(step):
        if step < warmup:
            return LR * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return LR * 0.5 * (1.0 + np.cos(np.pi * t))

    xt_te = torch.from_numpy(normalise(x_te))

    def test_eval():
        model.eval()
        with torch.no_grad():
            logits = model(xt_te)
        model.train()
        return logits, float((logits.argmax(1).numpy() == y_te).mean())

    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        perm = rng.permutation(len(y_tr))
        xb_all = normalise(random_shift(x_tr[perm], rng, SHIFT_PROB))
        yb_all = y_tr[perm]
        tot_loss = 0.0
        for i in range(0, len(perm), BATCH):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            xb = torch.from_numpy(xb_all[i:i + BATCH])
            yb = torch.from_numpy(yb_all[i:i + BATCH])
            loss = F.cross_entropy(model(xb), yb, label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.item() * len(yb)
            step += 1
        if (epoch + 1) % 5 == 0 or epoch == args.epochs - 1:
            _, acc = test_eval()
            print(f"epoch {epoch + 1:3d}  loss {tot_loss / len(y_tr):.4f}  test acc {acc:.4f}  "
                  f"{time.time() - t0:.0f}s", flush=True)

    logits, acc = test_eval()
    n_ok = int((logits.argmax(1).numpy() == y_te).sum())
    print(f"torch test accuracy: {acc:.4f} ({n_ok}/{len(y_te)})")

    config = dict(CONFIG)
    config["test_accuracy"] = round(acc, 6)
    config["description"] = (
        "Demo ViT for fips_ref: timm-style VisionTransformer (in_chans=1, img_size=8, patch_size=2, "
        "embed_dim=128, depth=8, num_heads=4, mlp_ratio=4) trained from scratch on scikit-learn's "
        "digits (train_test_split test_size=0.2, random_state=0, stratified; 1437 train / 360 test) "
        f"by weights/make_demo.py; inputs are pixels/16 normalised with mean 0.5, std 0.5; "
        f"torch test accuracy {acc:.4f} ({n_ok}/{len(y_te)}).")
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    arrays["config"] = json_entry(config)
    save_npz_atomic(CKPT, arrays)
    save_npz_atomic(TEST, {"images": normalise(x_te), "labels": y_te.astype(np.int64),
                           "torch_logits": logits.numpy().astype(np.float32)})
    save_npz_atomic(TRAIN_IMAGES, {"images": normalise(x_tr), "labels": y_tr.astype(np.int64)})
    for p in (CKPT, TEST, TRAIN_IMAGES):
        print(f"wrote {os.path.relpath(p, ROOT)}  {os.path.getsize(p)} bytes  sha256 {sha256(p)}")


# --------------------------------------------------------------------------------------------
# record (numpy + fips_ref only)

def cmd_record(args):
    from fips_ref.checkpoint import load_checkpoint
    from fips_ref.models import forward

    config = load_checkpoint(CKPT).config
    test = load_npz(TEST, "test set")
    logits, _ = _as_pair(forward(CKPT, test["images"], record_mlp_inputs=False))
    logits = np.asarray(logits)
    acc = float((logits.argmax(1) == test["labels"]).mean())
    torch_acc = config.get("test_accuracy")
    print(f"fips_ref test accuracy: {acc:.4f}   torch (config test_accuracy): {torch_acc}")
    if "torch_logits" in test:
        diff = float(np.abs(logits - test["torch_logits"]).max())
        agree = float((logits.argmax(1) == test["torch_logits"].argmax(1)).mean())
        print(f"max |fips_ref - torch| logit difference: {diff:.3g}; argmax agreement {agree:.4f}")
    ok = torch_acc is None or abs(acc - torch_acc) < 1e-6        # config rounds to 6 digits

    calib = load_npz(TRAIN_IMAGES, "calibration images")
    n = len(calib["images"]) if args.num_images <= 0 else min(args.num_images, len(calib["images"]))
    images = calib["images"][:n]
    _, acts = _as_pair(forward(CKPT, images, record_mlp_inputs=True))
    dtype = np.float32 if args.float32 else np.float16
    out = {}
    for i in range(config["depth"]):
        a = np.asarray(acts[i])
        want = (n, 1 + (config["img_size"] // config["patch_size"]) ** 2, config["embed_dim"])
        if a.shape != want:
            raise SystemExit(f"block {i}: recorded MLP input has shape {a.shape}, expected {want}")
        out[f"mlp_in.{i}"] = a.astype(dtype)
    save_npz_atomic(args.out, out)
    print(f"recorded MLP inputs of {len(out)} blocks for the first {n} calibration images "
          f"(labels per class {np.bincount(calib['labels'][:n], minlength=10).tolist()})")
    print(f"wrote {os.path.relpath(args.out, ROOT)}  {os.path.getsize(args.out)} bytes  "
          f"sha256 {sha256(args.out)}")
    if not ok:
        raise SystemExit("fips_ref accuracy differs from torch's test_accuracy")


def _as_pair(result):
    """forward returns (logits, acts) with recording, maybe bare logits without it."""
    if isinstance(result, tuple) and len(result) == 2:
        return result
    return result, None


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    t = sub.add_parser("train", help="train with torch and export the demo files (default)")
    t.add_argument("--epochs", type=int, default=EPOCHS)
    r = sub.add_parser("record", help="record calibration MLP inputs with fips_ref (no torch)")
    r.add_argument("--num-images", type=int, default=512,
                   help="record the first N calibration images (0: all 1437, ~50 MB)")
    r.add_argument("--float32", action="store_true", help="store activations as float32 (default float16)")
    r.add_argument("--out", default=CALIB_ACTS)
    args = ap.parse_args(argv)
    if args.cmd in (None, "train"):
        if args.cmd is None:
            args = t.parse_args([])
        cmd_train(args)
    else:
        cmd_record(args)


if __name__ == "__main__":
    main()
