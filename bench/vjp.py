#!/usr/bin/env python
"""Forward + hand-written backward of a whole DeiT-S-shaped ViT (or a Swin-T-shaped Swin): time.

A script, not a test. Random weights under timm keys (tests/model_fixtures.py), one batch of
random images, then ``fips_ref.models.model_vjp`` (the one-batch step of ``models.vjp``, on
device arrays) timed against the inference forward (``models.forward_model``) on the same batch.
Reported: median wall time of each over --repeats, their ratio, matrix-product FLOPs of the
forward (2·m·k·n per GEMM, counted analytically; the backward does twice that) and the peak of
Python-traced host memory during one forward + backward (NumPy reports its buffers to
tracemalloc; the caches dominate).

    python bench/vjp.py                          # DeiT-S, batch 2, 224², float32, NumPy
    python bench/vjp.py --arch swin --batch 2
    OPENBLAS_NUM_THREADS=1 python bench/vjp.py   # on a machine shared with others
"""
import argparse
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."),
                os.path.join(os.path.dirname(__file__), "..", "tests")]
from fips_ref.backend import load_backend, synchronize  # noqa: E402
from fips_ref.models import forward_model, model_vjp, prepare_model  # noqa: E402
from fips_ref.models.train_mlps import train_mlps  # noqa: E402
from model_fixtures import make_swin_checkpoint, make_vit_checkpoint, random_images  # noqa: E402


def deit_s_flops(batch, n=197, d=384, f=1536, depth=12, heads=6):
    """GEMM FLOPs of one DeiT-S forward: qkv, q kᵀ, p v, proj, fc1, fc2 per block (+ stem, head)."""
    m = batch * n
    block = 2 * m * d * 3 * d + 2 * 2 * batch * heads * n * n * (d // heads) + 2 * m * d * d \
        + 2 * 2 * m * d * f
    return depth * block + 2 * batch * (n - 1) * 768 * d + 2 * batch * d * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("vit", "swin"), default="vit")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--backend", default=None, help="numpy or cupy (default $FIPS_REF_BACKEND)")
    args = ap.parse_args(argv)
    xp = load_backend(args.backend)
    if args.arch == "vit":
        ckpt = make_vit_checkpoint(img_size=224, patch_size=16, embed_dim=384, depth=12,
                                   num_heads=6, mlp_ratio=4.0, num_classes=1000)
    else:   # swin_tiny_patch4_window7_224 shapes
        ckpt = make_swin_checkpoint(img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                                    num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                                    num_classes=1000)
    model = prepare_model(ckpt, dtype=np.dtype(args.dtype).type, xp=xp)
    mlps = train_mlps(model, ckpt)
    images = random_images(ckpt, args.batch)
    x = xp.asarray(images, dtype=model.dtype)
    dl = xp.asarray(np.random.default_rng(0).standard_normal((args.batch, 1000)), model.dtype)

    def timed(f):
        times = []
        for _ in range(args.repeats + 1):        # the first run warms up
            t = time.perf_counter()
            f()
            synchronize(xp)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])
    t_fwd = timed(lambda: forward_model(model, images, batch_size=args.batch))
    t_vjp = timed(lambda: model_vjp(model, mlps, x, dl, {}))
    tracemalloc.start()
    model_vjp(model, mlps, x, dl, {})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{args.arch} batch {args.batch} {args.dtype} on {xp.__name__}: forward {t_fwd:.3f} s, "
          f"forward+backward {t_vjp:.3f} s (x{t_vjp / t_fwd:.2f}), peak traced host memory "
          f"{peak / 2 ** 20:.0f} MiB")
    if args.arch == "vit":
        flops = 3 * deit_s_flops(args.batch)
        print(f"  {flops / 1e9:.1f} GFLOP forward+backward GEMMs, {flops / t_vjp / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
