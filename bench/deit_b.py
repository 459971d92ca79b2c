#!/usr/bin/env python
"""The whole FiPS local stage on a DeiT-B-shaped model: wall time, per-step time, peak memory.

A script, not a test. Random weights under timm keys (12 blocks ``blocks.{i}.mlp.fc1/fc2``,
D = 768, F = 3072, no LayerScale), blocks as fips_ref.checkpoint.MLPBlock, consecutive groups
of --group-size (fips_ref.sharing.default_groups), and a random calibration set of --images
images × 197 tokens per block, then ``fips_ref.local_stage.run_local_stage`` with the authors'
defaults (GMP, budget 0.5, sparsity 0.75, AdamW) and --epochs / --batch-size.

Activations live either in RAM (float32 [N, 197, 768] per block; with --backend cupy they are
copied to the GPU with --acts-on device), with the targets (original MLP outputs) cached next to
them, or, with --disk, in float16 .npy files in a temporary folder (--tmpdir), written and read
--chunk images at a time through fips_ref.calib.DiskArray, with the targets recomputed every
step, as ``python -m fips_ref.compress`` does past --max-memory.

Reported: wall time of run_local_stage and its parts (SVD init, initial masks, relative-error
evaluations, the steps; measured by wrapping those fips_ref functions with timers, results
unchanged), the median and mean step time, matrix-product FLOPs per step and achieved FLOP/s,
peak host memory (getrusage ru_maxrss; DiskArray maps nothing, so file pages do not count),
the device memory pool (fips_ref.backend.peak_device_bytes: the CuPy pool keeps
freed blocks, so its size is the run's high-water mark) and an analytic estimate of both.

    python bench/deit_b.py --images 64 --epochs 2 --batch-size 16
    python bench/deit_b.py --images 64 --epochs 2 --batch-size 16 --disk
    python bench/deit_b.py --images 3840 --epochs 20 --batch-size 128 --backend cupy --disk
"""
import argparse
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
D, F = 768, 3072
GiB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="calibration images N")
    p.add_argument("--tokens-per-image", type=int, default=197)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many steps (the schedule is that of the shorter run); "
                        "for memory measurements at full calibration size")
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--sparsifier", default="gmp", choices=("dense", "static", "gmp", "rigl"))
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--disk", action="store_true",
                   help="activations as float16 memory-mapped .npy files in a temporary folder")
    p.add_argument("--tmpdir", default=None, help="where --disk puts its folder (default: $TMPDIR)")
    p.add_argument("--acts-on", choices=("host", "device"), default="host",
                   help="in-memory activations in host RAM or (cupy) on the GPU")
    p.add_argument("--chunk", type=int, default=64, help="images generated at a time")
    p.add_argument("--no-errors", action="store_true",
                   help="skip the relative-error evaluations before and after (errors=False)")
    p.add_argument("--threads", type=int, default=0,
                   help="BLAS/OpenMP threads (default: every core this process may use)")
    p.add_argument("--estimate-only", action="store_true",
                   help="print the analytic FLOP and memory estimate and stop")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- estimates
def estimate(args, rank, n_groups):
    """Analytic matmul FLOPs per step and bytes per step (see bench/RESULTS.md for the terms)."""
    from step import flops, step_matmuls
    b = 4 if args.dtype == "float32" else 8
    m = args.batch_size * args.tokens_per_image           # tokens per block per step
    nb, gs = args.blocks, args.group_size
    step_flops = n_groups * flops(step_matmuls(m, rank, gs, teacher=args.disk))  # --disk: recomputed
    steps = args.epochs * (args.images // args.batch_size)
    steps = min(steps, args.max_steps) if args.max_steps else steps
    n_params = n_groups * D * rank + 2 * nb * rank * F + nb * (F + D)
    n_v = 2 * nb * rank * F
    acts = nb * args.images * args.tokens_per_image * D * (2 if args.disk else 4)
    mem = {
        "targets cached for every sample (not with --disk)": 0 if args.disk else acts // 4 * b,
        "this step's inputs + targets of every block [M, D]": 2 * nb * m * D * b,
        "block transients: z, GELU(z), GELU'(z), dz [M, F]": 4 * m * F * b,
        "parameters U, V, biases": n_params * b,
        "AdamW moments (2x)": 2 * n_params * b,
        "gradients (+ masked V copies)": 2 * n_params * b,
        "masks (bool)": n_v,
        "original MLP weights (teacher)": nb * 2 * D * F * b,
    }
    prune = n_v * (4 + 1 + 4 + 4 + 1)                     # flat V, flat mask, score, partition, keep
    return step_flops, steps, mem, prune, acts


def print_estimate(args, rank, n_groups):
    step_flops, steps, mem, prune, acts = estimate(args, rank, n_groups)
    m = args.batch_size * args.tokens_per_image
    print(f"estimate: M = {m} tokens/block/step, {steps} steps, "
          f"{step_flops / 1e12:.2f} TFLOP/step, {step_flops * steps / 1e15:.2f} PFLOP in all")
    print(f"  activations: {acts / 1e9:.2f} GB ({'float16 on disk' if args.disk else 'float32 in memory'})")
    for k, v in mem.items():
        print(f"  {k}: {v / 1e9:.2f} GB")
    print(f"  in all (host or device; activations apart): {sum(mem.values()) / 1e9:.2f} GB; pruning steps add {prune / 1e9:.2f} GB "
          f"(global top-k over {2 * args.blocks * rank * F / 1e6:.0f}M V entries)")


# ----------------------------------------------------------------------------- data
def build_weights(args):
    """timm-named MLP weights of a DeiT-B-shaped model, PyTorch layout, std 0.02."""
    import numpy as np
    from fips_ref.checkpoint import MLPBlock
    rng = np.random.default_rng(args.seed)
    blocks = [MLPBlock(i, f"blocks.{i}", 0, D, F) for i in range(args.blocks)]
    w = {}
    for b in blocks:
        w[b.key("mlp.fc1.weight")] = (0.02 * rng.standard_normal((F, D), dtype=np.float32))
        w[b.key("mlp.fc1.bias")] = (0.02 * rng.standard_normal(F, dtype=np.float32))
        w[b.key("mlp.fc2.weight")] = (0.02 * rng.standard_normal((D, F), dtype=np.float32))
        w[b.key("mlp.fc2.bias")] = (0.02 * rng.standard_normal(D, dtype=np.float32))
    return w, blocks


def build_acts(args, blocks, xp, folder):
    """{block: [N, T, D]}: float32 in RAM / on the device, or float16 DiskArrays under ``folder``."""
    import numpy as np
    from fips_ref.calib import DiskArray
    rng = np.random.default_rng(args.seed + 1)
    n, t = args.images, args.tokens_per_image
    buf = np.empty((min(args.chunk, n), t, D), np.float32)
    acts = {}
    for b in blocks:
        if folder:
            a = DiskArray.create(os.path.join(folder, f"mlp_in.{b.index}.npy"), (n, t, D), np.float16)
        elif args.acts_on == "device":
            a = xp.empty((n, t, D), dtype=xp.float32)
        else:
            a = np.empty((n, t, D), np.float32)
        for s in range(0, n, args.chunk):
            e = min(n, s + args.chunk)
            chunk = rng.standard_normal((e - s, t, D), dtype=np.float32, out=buf[: e - s])
            a[s:e] = xp.asarray(chunk) if (not folder and args.acts_on == "device") else chunk
        acts[b.index] = a
    return acts


# ----------------------------------------------------------------------------- memory
def rss_status():
    """Current RssAnon / RssFile in bytes from /proc/self/status (Linux), else {}."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def maxrss():
    """Peak resident set of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


_ACTIVE = []


def wrap_timer(module, name, record):
    """Replace module.name by a timing wrapper (same arguments, same result); calls made inside
    another timed function are recorded as 'name in outer'."""
    fn = getattr(module, name)

    def wrapper(*a, **k):
        key = f"{name} in {_ACTIVE[-1]}" if _ACTIVE else name
        _ACTIVE.append(name)
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _ACTIVE.pop()
            record.setdefault(key, []).append(time.perf_counter() - t0)
    setattr(module, name, wrapper)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    from step import median, set_threads
    threads = args.threads or len(os.sched_getaffinity(0))
    set_threads(threads)
    import numpy as np
    from fips_ref import local_stage
    from fips_ref.backend import device_name, load_backend, peak_device_bytes
    from fips_ref.sharing import build_groups, default_groups

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    print(f"command: {cmd}")
    weights, blocks = build_weights(args)
    groups = default_groups(blocks, args.group_size)
    plan = build_groups(blocks, groups, budget=args.budget, sparsity=args.sparsity)
    rank = plan[0].rank
    print(f"model: {args.blocks} blocks, D={D}, F={F}, groups {groups}, rank {rank}; "
          f"calibration {args.images} images x {args.tokens_per_image} tokens; "
          f"{args.epochs} epochs x {args.images // args.batch_size} steps of {args.batch_size} images")
    print_estimate(args, rank, len(groups))
    if args.estimate_only:
        return
    if args.images < args.batch_size:
        sys.exit(f"--images {args.images} < --batch-size {args.batch_size}: no full batch")

    xp = load_backend(args.backend)
    dtype = getattr(np, args.dtype)
    print(f"device: {device_name(xp)}; backend {args.backend}; dtype {args.dtype}; threads {threads}; "
          f"numpy {np.__version__}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    folder = None
    if args.disk:
        need = args.blocks * args.images * args.tokens_per_image * D * 2
        base = args.tmpdir or tempfile.gettempdir()
        free = shutil.disk_usage(base).free
        if free < need * 1.05:
            sys.exit(f"--disk: {need / 1e9:.1f} GB needed under {base}, {free / 1e9:.1f} GB free")
        folder = tempfile.mkdtemp(prefix="fips-bench-acts-", dir=args.tmpdir)
    try:
        t0 = time.perf_counter()
        acts = build_acts(args, blocks, xp, folder)
        t_acts = time.perf_counter() - t0
        rss_acts = maxrss()
        print(f"activations built in {t_acts:.1f} s "
              f"({'float16 DiskArrays in ' + folder if folder else 'float32 on the ' + args.acts_on}); "
              f"peak RSS so far {rss_acts / GiB:.2f} GiB")

        parts, stamps = {}, []
        timed_fns = ["init_factors", "sparsifier_masks", "relative_errors"]   # these end in a sync
        if xp is np:                                          # CuPy would time launches only
            timed_fns += ["reference_outputs", "loss_and_grads", "sparsifier_step", "adamw_step"]
        for name in timed_fns:
            wrap_timer(local_stage, name, parts)
        cfg = local_stage.FiPSConfig(budget=args.budget, sparsity=args.sparsity,
                                     sparsifier=args.sparsifier, epochs=args.epochs,
                                     batch_size=args.batch_size, seed=args.seed)
        order = local_stage.epoch_batches(args.images, args.batch_size, args.epochs, args.seed)
        if args.max_steps:
            order = [order[0][:args.max_steps]]
        t0 = time.perf_counter()
        res = local_stage.run_local_stage(
            weights, acts, groups, cfg, blocks=blocks, batch_order=order, xp=xp, dtype=dtype,
            errors=not args.no_errors,
            targets="recompute" if folder else "cache",
            log=lambda *a: stamps.append(time.perf_counter()), log_every=1)  # float(loss): a sync
        wall = time.perf_counter() - t0
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    steps = res.schedule.total_steps
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    loop = stamps[-1] - stamps[0] if stamps else 0.0
    step_flops, *_ = estimate(args, rank, len(groups))
    med = median(step_times) if step_times else float("nan")
    print(f"run_local_stage: {wall:.1f} s wall ({res.seconds:.1f} s by its own clock), {steps} steps")
    print("  parts: " + ", ".join(f"{k} {sum(v):.1f} s ({len(v)}x)" for k, v in parts.items()))
    if step_times:
        print(f"  step time: median {med:.3f} s, mean {loop / len(step_times):.3f} s "
              f"(steps 2..{steps}), min {min(step_times):.3f}, max {max(step_times):.3f}; "
              f"{step_flops / 1e9:.1f} GFLOP/step -> {step_flops / med / 1e9:.1f} GFLOP/s")
    rs = rss_status()
    prune_t = parts.get("sparsifier_step", [])
    if step_times and len(prune_t) == steps:              # NumPy: per-step time without pruning
        plain = [t - p for t, p in zip(step_times, prune_t[1:])]
        print(f"  step time without the sparsifier step: median {median(plain):.3f} s -> "
              f"{step_flops / median(plain) / 1e9:.1f} GFLOP/s; sparsifier steps: "
              + ", ".join(f"{p:.1f}" for p in prune_t) + " s")
    print(f"peak host memory (ru_maxrss): {maxrss() / GiB:.2f} GiB "
          f"(after building activations: {rss_acts / GiB:.2f} GiB); now RssAnon "
          f"{rs.get('RssAnon', 0) / GiB:.2f} GiB, RssFile {rs.get('RssFile', 0) / GiB:.2f} GiB "
          "(DiskArray reads map no file pages)")
    print(f"peak device memory (peak_device_bytes, CuPy pool): {peak_device_bytes(xp) / GiB:.2f} GiB")
    loss = res.history["loss"]
    if res.error_init:
        ei, ef = (sum(e.values()) / len(e) for e in (res.error_init, res.error_final))
        print(f"mean relative error init {ei:.4f} -> final {ef:.4f}; loss {loss[0]:.3e} -> {loss[-1]:.3e}; "
              f"final sparsity {res.history['sparsity'][-1]:.3f}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
