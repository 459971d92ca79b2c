#!/usr/bin/env python
"""One local-optimisation step of FiPS on a DeiT-B-shaped sharing group: time, FLOP/s, vs PyTorch.

A script, not a test. It builds one sharing group like DeiT-B's (D = 768, F = 3072, --blocks
blocks, budget 0.5, sparsity 0.75 → rank 1365 from fips_ref.budget.sparse_rank, strategy 'long')
with random weights, SVD-initialised factors (fips_ref.local_stage.init_factors), magnitude
masks at the final sparsity (fips_ref.sparsity.initial_masks) and the targets (original MLP
outputs) of a pool of 2·M recorded tokens computed once (local_stage.cached_targets), then
times exactly what run_local_stage does per step:

    gather the batch's inputs and targets → local_stage.local_step
      (loss_and_grads → sparsifier_step → adamw_step with the gradient and moment masks)

The timed step is an ordinary (non-pruning) GMP step; a pruning step (the global exact top-k of
prune_to) is timed separately and reported amortised over the authors' 600-step schedule.
``--targets recompute`` runs the teacher MLP inside every step instead (as before caching).

Matrix-product FLOPs (counted analytically, 2·m·k·n per [m, k] @ [k, n]; element-wise work not
counted). M = --tokens, D = 768, F = 3072, R = rank. Per block:

  teacher (--targets recompute only):      x @ W1 [M,D]@[D,F], gelu(.) @ W2 [M,F]@[F,D]   4·M·D·F
  each compressed layer, in → out, with fips_ref.mlp.factored_is_cheaper(M, in, R, out):
    materialised  forward  W = A @ B  (in·R·out),  y = x @ W  (M·in·out)
                  backward dW = xᵀ dy (in·M·out), dA = dW Bᵀ (in·out·R), dB = Aᵀ dW (R·in·out),
                           dx = dy Wᵀ (M·out·in, fc2 only: fc1's input is data)
    factored      forward  t = x @ A  (M·in·R),  y = t @ B  (M·R·out)
                  backward dB = tᵀ dy (R·M·out), dt = dy Bᵀ (M·out·R), dA = xᵀ dt (in·M·R),
                           dx = dt Aᵀ (M·R·in, fc2 only)
  (each term ×2 FLOPs). At DeiT-B shapes (M = 4096, R = 1365) both layers are materialised:
  per block 2·(2·D·F·R + 2·M·D·F) + 2·(3·M·D·F + 2·D·F·R) = 10·M·D·F + 12·D·F·R FLOPs
  = 135.3 GFLOP; ×4 blocks = 541.1 GFLOP per step (695.7 with the teacher recomputed).

The matmul rate is measured in the same process with the same backend, dtype and threads: three
[M, D] @ [D, F] products (the step's most common shape) right before every timed step, so each
step's ratio compares it with the machine as it was at that moment (shared cores drift).

With PyTorch importable (and --torch not 'off'), an equivalent PyTorch step is timed too:
autograd through W1 = U @ (V1 ⊙ M1), W2 = (U @ (V2 ⊙ M2))ᵀ (materialised, as the authors' code
does), torch.addmm + exact F.gelu, the same cached targets (or the teacher under no_grad), the
same loss Σ_b mean((y_b − y_ref,b)²), per-block backward, torch.optim.AdamW with the same
hyper-parameters, CosineAnnealingLR, and the moments multiplied by the masks after the step.
fips_ref and torch steps alternate (warm-up excluded); ratios are taken per repeat.

    python bench/step.py --backend numpy --dtype float32 --repeats 7 --warmup 1
"""
import argparse
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
D, F = 768, 3072


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per block per step (M)")
    p.add_argument("--blocks", type=int, default=4, help="blocks in the sharing group")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation first")
    p.add_argument("--threads", type=int, default=0,
                   help="BLAS/OpenMP/torch threads (default: every core this process may use)")
    p.add_argument("--torch", choices=("auto", "on", "off"), default="auto",
                   help="compare with a PyTorch step (auto: when torch imports)")
    p.add_argument("--targets", choices=("cache", "recompute"), default="cache",
                   help="original MLP outputs computed once (run_local_stage's default) or every step")
    p.add_argument("--profile", action="store_true",
                   help="also: cProfile one step, and time every GEMM shape of the step in isolation")
    p.add_argument("--skip-prune", action="store_true", help="do not time the GMP pruning steps")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def set_threads(n):
    """Thread count for every BLAS/OpenMP runtime; must run before NumPy is imported."""
    if "numpy" in sys.modules:
        raise RuntimeError("set_threads must run before numpy is imported")
    for var in THREAD_VARS:
        os.environ[var] = str(n)


# ----------------------------------------------------------------------------- FLOP count
def layer_matmuls(m, n_in, rank, n_out, need_dx):
    """[(name, m, k, n)] of one compressed layer's forward + backward, as fips_ref.mlp runs it."""
    from fips_ref.mlp import factored_is_cheaper
    if factored_is_cheaper(m, n_in, rank, n_out):
        out = [("t = x@A", m, n_in, rank), ("y = t@B", m, rank, n_out),
               ("dB = t.T@dy", rank, m, n_out), ("dt = dy@B.T", m, n_out, rank),
               ("dA = x.T@dt", n_in, m, rank)]
        return out + ([("dx = dt@A.T", m, rank, n_in)] if need_dx else [])
    out = [("W = A@B", n_in, rank, n_out), ("y = x@W", m, n_in, n_out),
           ("dW = x.T@dy", n_in, m, n_out), ("dA = dW@B.T", n_in, n_out, rank),
           ("dB = A.T@dW", rank, n_in, n_out)]
    return out + ([("dx = dy@W.T", m, n_out, n_in)] if need_dx else [])


def step_matmuls(m, rank, blocks, teacher):
    """Every matrix product of one step: [(where, name, m, k, n)] ((teacher,) fc1, fc2 per block)."""
    out = []
    for _ in range(blocks):
        if teacher:
            out += [("teacher", "x@W1", m, D, F), ("teacher", "a@W2", m, F, D)]
        out += [("fc2", *t) for t in layer_matmuls(m, F, rank, D, need_dx=True)]
        out += [("fc1", *t) for t in layer_matmuls(m, D, rank, F, need_dx=False)]
    return out


def flops(matmuls):
    return sum(2.0 * m * k * n for *_, m, k, n in matmuls)


# ----------------------------------------------------------------------------- helpers
def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def timed(fn, sync, repeats, warmup=1):
    """Median seconds of fn() over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return median(ts), ts


def blas_info():
    try:
        import threadpoolctl
        return "; ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
                         for i in threadpoolctl.threadpool_info())
    except ImportError:
        return "threadpoolctl not installed"


# ----------------------------------------------------------------------------- the problem
class Problem:
    """A DeiT-B-shaped sharing group with fips_ref parameters, masks, AdamW state and data."""

    def __init__(self, args, xp, dtype):
        import numpy as np
        from fips_ref.adamw import adamw_init
        from fips_ref.checkpoint import MLPBlock
        from fips_ref.local_stage import (FiPSConfig, TrainState, cached_targets, dense_weights,
                                          init_factors, resolve_schedule)
        from fips_ref.sharing import build_groups
        from fips_ref.sparsity import initial_masks

        rng = np.random.default_rng(args.seed)
        nb, m = args.blocks, args.tokens
        self.blocks = [MLPBlock(i, f"blocks.{i}", 0, D, F) for i in range(nb)]
        self.weights = {}
        for b in self.blocks:                         # timm layout [out, in], std 0.02 like timm init
            self.weights[b.key("mlp.fc1.weight")] = (0.02 * rng.standard_normal((F, D))).astype(np.float32)
            self.weights[b.key("mlp.fc1.bias")] = (0.02 * rng.standard_normal(F)).astype(np.float32)
            self.weights[b.key("mlp.fc2.weight")] = (0.02 * rng.standard_normal((D, F))).astype(np.float32)
            self.weights[b.key("mlp.fc2.bias")] = (0.02 * rng.standard_normal(D)).astype(np.float32)
        self.cfg = FiPSConfig(budget=args.budget, sparsity=args.sparsity)
        self.sched = resolve_schedule(self.cfg, 600)  # the authors' 600 steps
        self.plan = build_groups(self.blocks, [list(range(nb))], budget=args.budget,
                                 sparsity=args.sparsity, strategy="long")
        self.rank = self.plan[0].rank
        t0 = time.perf_counter()
        self.params = init_factors(self.weights, self.plan, xp=xp, dtype=dtype, tau=self.cfg.tau)
        self.init_seconds = time.perf_counter() - t0
        V = {k: v for k, v in self.params.items() if k.endswith(".V")}
        self.masks = initial_masks(V, args.sparsity)  # the final density; dense compute either way
        self.dense = dense_weights(self.weights, self.blocks, xp=xp, dtype=dtype)
        self.gammas = {b: self.dense[b][4] for b in self.dense}
        self.state = TrainState(self.params, self.masks, adamw_init(self.params))
        # recorded MLP inputs: a pool of 2·M tokens per block on the host (as run_local_stage's
        # in-memory acts), norm2-output-like (unit variance); each step gathers M of them
        self.acts = {b.index: rng.standard_normal((2 * m, D), dtype=np.float32) for b in self.blocks}
        self.targets = (cached_targets(self.dense, self.acts, xp=xp, dtype=dtype)
                        if args.targets == "cache" else None)
        self.rng = rng
        self.m = m

    def batch(self):
        return self.rng.permutation(2 * self.m)[: self.m]


def fips_step(pb, idx, xp, dtype):
    """One step as run_local_stage takes it: gather the batch (and its targets), local_step.

    Calls go through the module (``ls.gather``...), so phase_seconds can wrap them with timers.
    """
    from fips_ref import local_stage as ls
    inputs = {b: ls.gather(pb.acts[b], idx, xp=xp, dtype=dtype) for b in pb.dense}
    if pb.targets is None:
        targets = {b: ls.reference_outputs(pb.dense, b, inputs[b]) for b in pb.dense}
    else:
        targets = {b: ls.gather(pb.targets[b], idx, xp=xp, dtype=dtype) for b in pb.dense}
    pb.state.step = 0                      # always schedule step 1: never a pruning step (timed apart)
    loss, _ = ls.local_step(pb.state, pb.cfg, pb.sched, pb.plan, inputs, targets, pb.gammas)
    return loss


PHASES = ("gather", "reference_outputs", "loss_and_grads", "sparsifier_step", "adamw_step")
REST = "rest"


def phase_seconds(pb, xp, dtype, steps):
    """Median seconds per phase over ``steps`` extra steps, local_stage's functions wrapped with timers."""
    from fips_ref import local_stage
    from fips_ref.backend import synchronize
    originals = {name: getattr(local_stage, name) for name in PHASES}
    times = {name: [] for name in PHASES + (REST,)}
    acc = {}

    def wrap(name, fn):
        def timed_fn(*a, **k):
            synchronize(xp)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            synchronize(xp)
            acc[name] += time.perf_counter() - t0
            return out
        return timed_fn
    try:
        for name, fn in originals.items():
            setattr(local_stage, name, wrap(name, fn))
        for _ in range(steps):
            acc.update(dict.fromkeys(PHASES, 0.0))
            t0 = time.perf_counter()
            fips_step(pb, pb.batch(), xp, dtype)
            synchronize(xp)
            total = time.perf_counter() - t0
            for name in PHASES:
                times[name].append(acc[name])
            times[REST].append(total - sum(acc.values()))
    finally:
        for name, fn in originals.items():
            setattr(local_stage, name, fn)
    return {k: median(v) for k, v in times.items() if any(v)}


def pruning_seconds(pb, xp):
    """Seconds of every GMP pruning step of the authors' 600-step schedule, replayed in order.

    The masks start at the GMP initial sparsity (sparsifier_masks) and go through each pruning
    step's global exact top-k (sparsity.prune_to via sparsifier_step); V stays fixed.
    """
    from fips_ref.backend import synchronize
    from fips_ref.local_stage import sparsifier_masks, sparsifier_step
    from fips_ref.sparsity import cubic_sparsity, density

    sched, cfg = pb.sched, pb.cfg
    out = []
    V = {k: v for k, v in pb.params.items() if k.endswith(".V")}
    masks = sparsifier_masks(cfg, sched, V)
    for k in range(1, sched.total_steps + 1):
        s = cubic_sparsity(k, t_end=sched.t_end, delta_t=sched.delta_t, t_accel=sched.t_accel,
                           initial=sched.gmp_initial, accelerated=cfg.gmp_accelerated,
                           final=cfg.sparsity)
        if s in (None, sched.gmp_initial):
            continue
        s_before = 1.0 - density(masks)
        t0 = time.perf_counter()
        masks = sparsifier_step(cfg, sched, k, dict(pb.params), masks, None)
        synchronize(xp)
        out.append((k, s_before, s, time.perf_counter() - t0))
    return out


# ----------------------------------------------------------------------------- PyTorch twin
class TorchStep:
    """The same step in PyTorch autograd + torch.optim.AdamW (materialised U @ V, as the authors)."""

    def __init__(self, pb, device, dtype_name, threads):
        import torch
        from fips_ref.backend import to_numpy
        self.torch = torch
        torch.set_num_threads(threads)
        self.dev = torch.device(device)
        self.dtype = getattr(torch, dtype_name)
        T = lambda a: torch.tensor(to_numpy(a), dtype=self.dtype, device=self.dev)  # noqa: E731
        self.pb = pb
        self.params = {k: torch.nn.Parameter(T(v)) for k, v in pb.params.items()}
        self.masks = {k: torch.tensor(to_numpy(m), device=self.dev) for k, m in pb.masks.items()}
        self.dense = {b: tuple(None if w is None else T(w) for w in ws) for b, ws in pb.dense.items()}
        self.targets = None if pb.targets is None else {b: T(y) for b, y in pb.targets.items()}
        cfg = pb.cfg
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        self.lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=pb.sched.total_steps, eta_min=cfg.eta_min)

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def block_loss(self, U, b, x, idx):
        torch, P, Mk = self.torch, self.params, self.masks
        fn = torch.nn.functional
        pre = self.pb.blocks[b].prefix
        W1o, b1o, W2o, b2o, gamma = self.dense[b]
        if self.targets is not None:                              # cached, as fips_ref's
            y_ref = self.targets[b][torch.from_numpy(idx).to(self.dev)]
        else:
            with torch.no_grad():                                 # the original MLP's output
                y_ref = torch.addmm(b2o, fn.gelu(torch.addmm(b1o, x, W1o)), W2o)
        W1 = U @ (P[f"{pre}.mlp.fc1.V"] * Mk[f"{pre}.mlp.fc1.V"])            # [D, F]
        W2 = (U @ (P[f"{pre}.mlp.fc2.V"] * Mk[f"{pre}.mlp.fc2.V"])).t()      # [F, D]
        z = torch.addmm(P[f"{pre}.mlp.fc1.bias"], x, W1)
        y = torch.addmm(P[f"{pre}.mlp.fc2.bias"], fn.gelu(z), W2)           # exact GELU
        diff = y - y_ref
        if gamma is not None:
            diff = diff * gamma
        return (diff * diff).mean()

    def step(self, idx):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for g in self.pb.plan:
            U = self.params[f"U.{g.index}"]
            for b in g.blocks:
                x = torch.from_numpy(self.pb.acts[b][idx]).to(self.dev, self.dtype)
                loss = self.block_loss(U, b, x, idx)
                loss.backward()                                   # grads accumulate over blocks
                total = total + loss.detach()
        self.opt.step()
        self.lr_sched.step()
        with torch.no_grad():                                     # moments ⊙ mask after the step
            for k, m in self.masks.items():
                st = self.opt.state[self.params[k]]
                st["exp_avg"].mul_(m)
                st["exp_avg_sq"].mul_(m)
        return total


def check_equivalence(pb, ts, idx, xp, dtype):
    """Loss and dU of fips_ref and torch at the same parameters (before any step)."""
    import numpy as np
    from fips_ref.backend import to_numpy
    from fips_ref.local_stage import gather, loss_and_grads, reference_outputs
    inputs = {b: gather(pb.acts[b], idx, xp=xp, dtype=dtype) for b in pb.dense}
    targets = {b: reference_outputs(pb.dense, b, inputs[b]) for b in pb.dense}
    loss, grads = loss_and_grads(pb.params, pb.masks, pb.plan, inputs, targets, pb.gammas)
    total = 0.0
    for g in pb.plan:
        U = ts.params[f"U.{g.index}"]
        for b in g.blocks:
            x = ts.torch.from_numpy(pb.acts[b][idx]).to(ts.dev, ts.dtype)
            l = ts.block_loss(U, b, x, idx)
            l.backward()
            total += float(l.detach())
    dU_t = ts.params["U.0"].grad.detach().cpu().numpy()
    dU_f = to_numpy(grads["U.0"])
    for p in ts.params.values():
        p.grad = None
    return (abs(float(loss) - total) / abs(total),
            float(np.abs(dU_f - dU_t).max() / np.abs(dU_t).max()))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    set_threads(threads)
    sys.path.insert(0, ROOT)
    import numpy as np
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(threads)
    except ImportError:
        pass
    from fips_ref.backend import load_backend, synchronize, device_name

    xp = load_backend(args.backend)
    dtype = getattr(np, args.dtype)
    sync = lambda: synchronize(xp)  # noqa: E731
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    print(f"command: {cmd}")
    print(f"device: {device_name(xp)}; backend {args.backend}; dtype {args.dtype}; threads {threads}; "
          f"numpy {np.__version__}; BLAS: {blas_info()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    pb = Problem(args, xp, dtype)
    mm = step_matmuls(args.tokens, pb.rank, args.blocks, teacher=args.targets == "recompute")
    step_flops = flops(mm)
    teacher_flops = flops([t for t in mm if t[0] == "teacher"])
    print(f"group: {args.blocks} blocks, D={D}, F={F}, M={args.tokens} tokens/block, "
          f"budget {args.budget}, sparsity {args.sparsity} -> rank {pb.rank}; "
          f"SVD init {pb.init_seconds:.1f} s")
    paths = {w: ("factored" if any(t[1].startswith("t = ") for t in mm if t[0] == w) else "materialised")
             for w in ("fc1", "fc2")}
    print(f"path (mlp.factored_is_cheaper): fc1 {paths['fc1']}, fc2 {paths['fc2']}")
    print(f"matmul FLOPs per step: {step_flops / 1e9:.1f} GFLOP (teacher {teacher_flops / 1e9:.1f}, "
          f"compressed fwd+bwd {(step_flops - teacher_flops) / 1e9:.1f}); targets: {args.targets}")

    # the machine's matmul rate: [M, D] @ [D, F], same backend, dtype and threads
    a = xp.asarray(pb.rng.standard_normal((args.tokens, D)), dtype=dtype)
    w = xp.asarray(pb.rng.standard_normal((D, F)), dtype=dtype)
    gemm_flops = 2.0 * args.tokens * D * F

    use_torch = args.torch == "on"
    if args.torch == "auto":
        try:
            import torch  # noqa: F401
            use_torch = True
        except ImportError:
            print("torch: not importable, comparison skipped")
    ts = None
    if use_torch and args.backend == "cupy":
        import torch
        if not torch.cuda.is_available():
            print(f"torch {torch.__version__}: no CUDA, comparison with the cupy backend skipped")
            use_torch = False
    if use_torch:
        import torch
        device = "cuda" if args.backend == "cupy" else "cpu"
        ts = TorchStep(pb, device, args.dtype, threads)
        rel_loss, rel_du = check_equivalence(pb, ts, pb.batch(), xp, dtype)
        print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads; "
              f"same-parameter check: |Δloss|/loss {rel_loss:.1e}, max|ΔdU|/max|dU| {rel_du:.1e}")

    # warm-up, then per repeat, back to back: the matmul rate, a fips_ref step, a torch step.
    # Ratios are taken within a repeat and their median reported, so a machine whose speed
    # drifts (shared cores) compares like with like.
    for _ in range(args.warmup):
        fips_step(pb, pb.batch(), xp, dtype)
        if ts:
            ts.step(pb.batch())
    sync()
    if ts:
        ts.sync()
    f_times, t_times, rates = [], [], []
    for _ in range(args.repeats):
        rates.append(gemm_flops / min(timed(lambda: a @ w, sync, 3, warmup=1)[1]))  # best of 3
        idx = pb.batch()
        t0 = time.perf_counter()
        fips_step(pb, idx, xp, dtype)
        sync()
        f_times.append(time.perf_counter() - t0)
        if ts:
            t0 = time.perf_counter()
            ts.step(idx)
            ts.sync()
            t_times.append(time.perf_counter() - t0)

    f_med = median(f_times)
    print(f"fips_ref step: median {f_med:.3f} s over {args.repeats} "
          f"({', '.join(f'{t:.3f}' for t in f_times)})")
    phases = phase_seconds(pb, xp, dtype, max(1, args.repeats // 2))
    print("  phases (median s of separate steps, functions wrapped with timers): " +
          ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    ratios = [step_flops / f / r for f, r in zip(f_times, rates)]
    best = step_flops / min(f_times) / max(rates)
    print(f"(a) achieved {step_flops / f_med / 1e9:.1f} GFLOP/s (median step); matmul rate "
          f"[{args.tokens},{D}]@[{D},{F}] before each step {median(rates) / 1e9:.1f} GFLOP/s "
          f"(range {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f}); ratio per repeat "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; median ratio {median(ratios):.2f}; "
          f"best step / best rate {best:.2f}")
    if ts:
        t_med = median(t_times)
        print(f"torch step:    median {t_med:.3f} s over {args.repeats} "
              f"({', '.join(f'{t:.3f}' for t in t_times)})")
        pair = [f / t for f, t in zip(f_times, t_times)]
        print(f"(b) fips_ref / torch step time per repeat {', '.join(f'{r:.2f}' for r in pair)}; "
              f"median {median(pair):.2f} "
              f"(torch achieves {step_flops / t_med / 1e9:.1f} GFLOP/s)")
    if not args.skip_prune:
        prunes = pruning_seconds(pb, xp)
        n_v = sum(m.size for m in pb.masks.values())
        total = sum(p[3] for p in prunes)
        print(f"GMP pruning steps (global exact top-k over {n_v / 1e6:.1f}M V entries), "
              f"{len(prunes)} of {pb.sched.total_steps} steps: " +
              ", ".join(f"step {k} {a:.2f}->{b:.3f} {t:.2f} s" for k, a, b, t in prunes) +
              f"; {total / pb.sched.total_steps * 1e3:.0f} ms/step amortised")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.profile:
        profile(pb, xp, dtype, mm, sync, f_med)


def profile(pb, xp, dtype, mm, sync, step_sec):
    """cProfile one step (grouped by function), and each GEMM shape of the step timed alone."""
    import cProfile
    import pstats
    cp = cProfile.Profile()
    idx = pb.batch()
    cp.enable()
    fips_step(pb, idx, xp, dtype)
    sync()
    cp.disable()
    st = pstats.Stats(cp)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
        if tt > 0.005:
            rows.append((tt, nc, f"{os.path.basename(file)}:{fn}" if line else fn))
    total = sum(v[2] for v in st.stats.values())
    print(f"\ncProfile of one step ({total:.3f} s self time in total); self time > 5 ms:")
    for tt, nc, name in sorted(rows, reverse=True):
        print(f"  {tt:7.3f} s {100 * tt / total:5.1f}%  {nc:5d} calls  {name}")

    # every GEMM of the step, timed alone with the same transposes
    import numpy as np
    rng = np.random.default_rng(1)
    shapes = {}
    for where, name, m, k, n in mm:
        key = (name, m, k, n)
        shapes[key] = shapes.get(key, 0) + 1
    print("\nGEMMs of one step, each timed alone (median of 3):")
    total_t = 0.0
    for (name, m, k, n), count in shapes.items():
        lhs, rhs = name.split("=")[-1].strip().split("@")
        ta, tb = lhs.endswith(".T"), rhs.endswith(".T")
        A = xp.asarray(rng.standard_normal((k, m) if ta else (m, k)), dtype=dtype)
        B = xp.asarray(rng.standard_normal((n, k) if tb else (k, n)), dtype=dtype)
        A_, B_ = (A.T if ta else A), (B.T if tb else B)
        sec, _ = timed(lambda: A_ @ B_, sync, 3, warmup=1)
        total_t += sec * count
        print(f"  {count:3d} × {name:12s} [{m},{k}]@[{k},{n}]  {sec * 1e3:7.1f} ms  "
              f"{2.0 * m * k * n / sec / 1e9:6.1f} GFLOP/s")
    print(f"  sum over the step: {total_t:.3f} s of the {step_sec:.3f} s step "
          f"({100 * total_t / step_sec:.0f}%); the rest is element-wise, copies and Python")


if __name__ == "__main__":
    main()
