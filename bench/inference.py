#!/usr/bin/env python
"""Inference latency of one DeiT-B-shaped MLP block: the original dense MLP against FiPS through each path.

A script, not a test. D = 768, F = 3072, one block's fc1 and fc2, NumPy float32 on the CPU.
FiPS layers at budgets 25/40/50% (sparsity 0.75, ranks 682/1092/1365 from
fips_ref.budget.sparse_rank for a 4-block group) with constant fan-in V masks (SRigL's
structure: 170/273/341 of R per fc1 unit, 768 of F per fc2 unit), random weights. Each is run
through fips_ref.infer's paths (materialised, lowrank, gather, csr) and 'auto' (the per-batch
choice of infer.choose_path), at 1, 16, 197 and 25,216 tokens (one image of DeiT-B, and a
batch of 128). Everything of one budget and token count is timed side by side: every repeat
times the dense MLP and then each FiPS path once, and a ratio dense / path is taken per repeat.

--copies N (default 12, a DeiT-B's 12 blocks) rotates every call over N distinct copies of the
weights, so that, as in a whole model, they come from memory and not from a warm cache;
--copies 1 gives the cache-resident figure. The bytes each path reads (the weights it keeps:
U once per block, V dense, or indices + values) are printed with the bytes-bound time at the
memory bandwidth measured in the same run (a sum over a 512 MB array), and the MACs
(infer.path_macs). Paths whose estimated time (infer.estimate_seconds) exceeds --max-seconds
are skipped and say so. 'auto' uses infer.calibrate() (--cost calibrate, the default), measured
at the start of the run, or the built-in infer.CostModel() (--cost default).

    python bench/inference.py                                  # everything (several minutes)
    python bench/inference.py --budgets 0.25 --tokens 1 16 --repeats 5
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F = 768, 3072


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.4, 0.5])
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 197, 25216])
    p.add_argument("--paths", nargs="+", default=["materialised", "lowrank", "gather", "csr", "auto"])
    p.add_argument("--copies", type=int, default=12, help="distinct weight copies rotated per call")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each a call of every config)")
    p.add_argument("--threads", type=int, default=0, help="CSR row blocks in threads (0: every core)")
    p.add_argument("--max-seconds", type=float, default=3.0,
                   help="skip a path whose estimated time per call exceeds this")
    p.add_argument("--cost", choices=("calibrate", "default"), default="calibrate",
                   help="cost model of 'auto': infer.calibrate() on this machine, or infer.CostModel()")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def bandwidth(np):
    """Bytes per second of a sum over a 512 MB float32 array (best of three)."""
    a = np.ones(1 << 27, dtype=np.float32)
    best = min(_time(lambda: a.sum()) for _ in range(3))
    return a.nbytes / best


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dense_copies(np, rng, n):
    """n copies of (W1 [D, F], b1, W2 [F, D], b2), float32."""
    s = 1.0 / np.sqrt(D)
    return [((rng.standard_normal((D, F)) * s).astype(np.float32), np.zeros(F, np.float32),
             (rng.standard_normal((F, D)) * s).astype(np.float32), np.zeros(D, np.float32))
            for _ in range(n)]


def fips_copies(np, rng, budget, sparsity, n, threads):
    """n copies of (fc1, fc2) InferLayers holding every path; one U per 4 copies (a sharing group)."""
    from fips_ref.budget import sparse_rank
    from fips_ref.infer import prepare_layer
    from fips_ref.structured import constant_fan_in_mask, fan_in_k
    r = sparse_rank(4, D, budget, sparsity)
    U = (rng.standard_normal((D, r)) / np.sqrt(D)).astype(np.float32)
    V = [(rng.standard_normal((r, F)) / np.sqrt(r)).astype(np.float32) for _ in range(2)]
    M = [constant_fan_in_mask(V[0], fan_in_k(r, sparsity, F), 0),
         constant_fan_in_mask(V[1], fan_in_k(F, sparsity, r), 1)]
    base = (prepare_layer(U, V[0], M[0], np.zeros(F, np.float32), True, threads=threads),
            prepare_layer(U, V[1], M[1], np.zeros(D, np.float32), False, threads=threads))
    out, u = [], U
    for i in range(n):
        if i % 4 == 0:
            u = U.copy()
        out.append(tuple(_copy_layer(l, u) for l in base))
    return r, out


def _copy_layer(l, U):
    """The same layer in fresh memory (so a rotation over copies streams its bytes)."""
    return l._replace(U=U, V=l.V.copy(), idx=l.idx.copy(), values=l.values.copy(),
                      csr=tuple(b.copy() for b in l.csr))


def path_bytes(path, fc1, fc2):
    """Weight bytes a path reads for one block (U once: shared by fc1 and fc2)."""
    u = fc1.U.nbytes
    per = {"materialised": lambda l: l.V.nbytes, "lowrank": lambda l: l.V.nbytes,
           "gather": lambda l: l.idx.nbytes + l.values.nbytes,
           "csr": lambda l: sum(b.data.nbytes + b.indices.nbytes + b.indptr.nbytes for b in l.csr)}
    return u + per[path](fc1) + per[path](fc2)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    import numpy as np
    from fips_ref.infer import CostModel, calibrate, choose_path, estimate_seconds, mlp_forward, path_macs
    from fips_ref.mlp import dense_mlp

    rng = np.random.default_rng(args.seed)
    bw = bandwidth(np)
    print(f"# {' '.join(sys.argv)}\n# numpy {np.__version__}, cores {os.cpu_count()}, "
          f"BLAS threads env {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}, "
          f"memory bandwidth {bw / 1e9:.1f} GB/s, copies {args.copies}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    cost = calibrate() if args.cost == "calibrate" else CostModel()
    print(f"# cost model ({args.cost}): {cost}")
    dense = dense_copies(np, rng, args.copies)
    dense_bytes = sum(w.nbytes for w in dense[0][::2])
    for budget in args.budgets:
        r, fips = fips_copies(np, rng, budget, args.sparsity, args.copies, args.threads or None)
        print(f"\n## budget {budget}: rank {r}, fc1 fan-in {fips[0][0].stored // F} of {r}, "
              f"fc2 fan-in {fips[0][1].stored // r} of {F}")
        print(f"{'tokens':>6} {'path':>12} {'ms':>9} {'dense/path':>10} {'MACs (M)':>9} "
              f"{'weights MB':>10} {'bytes-bound ms':>14} {'bytes limit':>11}")
        for m in args.tokens:
            run_tokens(np, args, m, dense, fips, bw, dense_bytes,
                       dict(choose_path=lambda m_, f: choose_path(m_, f, cost),
                            estimate_seconds=lambda p_, m_, f: estimate_seconds(p_, m_, f, cost),
                            mlp_forward=lambda x, a, b, path: mlp_forward(x, a, b, path, cost),
                            path_macs=path_macs, dense_mlp=dense_mlp))
        del fips
    print(f"\n# load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run_tokens(np, args, m, dense, fips, bw, dense_bytes, fn):
    """Time dense and every path at M tokens, side by side; print one row each."""
    x = np.random.default_rng(m).standard_normal((m, D)).astype(np.float32)
    fc1, fc2 = fips[0]
    configs, notes = {"dense": None}, {}
    for p in args.paths:
        if p == "auto":
            configs[p] = None
            notes[p] = "/".join(sorted({fn["choose_path"](m, fc1), fn["choose_path"](m, fc2)}))
            continue
        est = fn["estimate_seconds"](p, m, fc1) + fn["estimate_seconds"](p, m, fc2)
        if est > args.max_seconds:
            notes[p] = f"skipped (estimated {est:.1f} s per call > --max-seconds)"
        else:
            configs[p] = None
    times = {c: [] for c in configs}
    k = 0
    for rep in range(args.repeats + 1):                 # round 0 is a warm-up
        for c in configs:
            k = (k + 1) % len(dense)
            if c == "dense":
                t = _time(lambda: fn["dense_mlp"](x, *dense[k]))
            else:
                path = None if c == "auto" else c
                t = _time(lambda: fn["mlp_forward"](x, *fips[k], path=path))
            if rep:
                times[c].append(t)
    for c in list(configs) + [p for p in notes if p not in configs]:
        if c not in configs:
            print(f"{m:>6} {c:>12}  {notes[c]}")
            continue
        ratio = median([d / t for d, t in zip(times["dense"], times[c])])
        if c == "dense":
            macs, nbytes = 2 * m * D * F, dense_bytes
        else:
            p = notes.get(c, c).split("/")[0] if c == "auto" else c
            macs = fn["path_macs"](p, m, fc1) + fn["path_macs"](p, m, fc2)
            nbytes = path_bytes(p, fc1, fc2)
        label = f"auto:{notes[c]}" if c == "auto" else c
        print(f"{m:>6} {label:>12} {1e3 * median(times[c]):9.3f} {ratio:10.2f} {macs / 1e6:9.1f} "
              f"{nbytes / 1e6:10.1f} {1e3 * nbytes / bw:14.3f} {dense_bytes / nbytes:11.2f}")


if __name__ == "__main__":
    main()
