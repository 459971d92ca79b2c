#!/usr/bin/env python
"""One global-stage training step of a compressed DeiT-S-shaped ViT: fips_ref vs PyTorch autograd.

A script, not a test. The model: timm ``deit_small_patch16_224`` shapes (not distilled: one class
token, one head; D 384, 6 heads, depth 12, MLP 1536, patch 16, 224², 1000 classes) with random
weights (tests/model_fixtures.py), compressed by FiPS at budget 0.5, sparsity 0.75, the paper's
groups of 4 blocks, strategy 'long': SVD initialisation (local_stage.init_factors) and magnitude
masks (sparsity.initial_masks), written through the codec as a compressed checkpoint; no local
training (the speed of a step does not depend on the values).

The timed step is the global stage's (paper §3, Algorithm 1; docs/authors-code.md §7, per-step
order as §4.3), on one batch of --batch random images with Mixup-like soft targets:

    forward + hand-written backward        models.model_vjp (the loss gradient in between)
    soft-target cross-entropy              mean_b Σ_k −t_bk log softmax(z_b)_k, written here
    RigL mask update on every V            sparsifiers.sparsifier_step at a step that updates
                                           (global, ρ = 0.05, sparsity 0.75: §7's transfer values)
    AdamW over every parameter             adamw.adamw_step, gradient masks = the masks the
                                           forward used, moment masks = the new ones; then
                                           V ⊙= M so the next forward reads V ⊙ M

A real run updates the masks every Δt = 50 steps only; here every timed step does, so the
figure is an upper bound (--rigl off times the step without it).

The PyTorch step (when torch imports): the same weights in a plain PyTorch ViT written below
(F.conv2d patch embedding, F.layer_norm, fused qkv, F.scaled_dot_product_attention as timm's
default ``fused_attn``, or --torch-attention explicit for softmax(q kᵀ) v, exact F.gelu),
the FiPS MLP as U @ (V ⊙ M) with the same association (factored or materialised) that
fips_ref.mlp.factored_is_cheaper picks, the same loss, autograd, a RigL update on the dense
gradient of V ⊙ M (a tensor hook, as sparsimony's dense_grad), torch.optim.AdamW with the same
hyper-parameters, moments ⊙ the new masks. The sides alternate, fips_ref first; the ratio is
taken per repeat and its median reported. Before timing, a correctness guard compares the two
sides' losses and gradients of the first step (same parameters, same batch).

Threads: --threads N sets OMP/OPENBLAS/MKL_NUM_THREADS before NumPy is imported (threadpoolctl
is not used) and torch.set_num_threads(N); default: every core this process may use.
Peak memory: each side runs in its own subprocess (set-up, then --memory-steps steps) and
reports getrusage(RUSAGE_SELF).ru_maxrss after the set-up and at the end, which sees every
allocation (BLAS and torch's allocator included), unlike tracemalloc.

    python bench/finetune_step.py --repeats 5                 # CPU, NumPy, float32
    python bench/finetune_step.py --repeats 2 --profile       # + cProfile of one fips_ref step
    python bench/finetune_step.py --backend cupy --repeats 10 # GPU (torch on CUDA if it has one)
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

from step import median, set_threads   # bench/step.py: stdlib only, safe before NumPy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEIT_S = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
              num_classes=1000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="images per step (issue 8: 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed step pairs")
    p.add_argument("--warmup", type=int, default=1, help="untimed step pairs first")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--threads", type=int, default=None, help="default: os.sched_getaffinity")
    p.add_argument("--budget", type=float, default=0.5, help="FiPS budget (issue 8: 50%%)")
    p.add_argument("--sparsity", type=float, default=0.75, help="V sparsity (FiPSConfig default)")
    p.add_argument("--depth", type=int, default=12, help="blocks (DeiT-S: 12)")
    p.add_argument("--torch", choices=("on", "off"), default="on")
    p.add_argument("--torch-attention", choices=("sdpa", "explicit"), default="sdpa")
    p.add_argument("--rigl", choices=("on", "off"), default="on", help="mask update every step")
    p.add_argument("--memory", choices=("on", "off"), default="on",
                   help="peak RSS of each side in a subprocess")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--profile", action="store_true",
                   help="cProfile one fips_ref step (process CPU time, all threads summed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-side", choices=("numpy", "torch"), default=None,
                   help=argparse.SUPPRESS)     # internal: the per-side memory subprocess
    return p.parse_args(argv)


def maxrss_mib():
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux
    return kib / 1024


def rss_mib():
    """Resident set size now (Linux /proc/self/statm), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class RSSSampler:
    """Highest resident set size seen while running, sampled every 2 ms by a thread (the
    set-up's own high-water mark, SVDs included, would hide the steps' in ru_maxrss)."""

    def __enter__(self):
        import threading
        self.base = self.peak = rss_mib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mib())


# ----------------------------------------------------------------------------- the problem
class Problem:
    """The compressed DeiT-S model, its trainable parameters, masks, AdamW state and one batch."""

    def __init__(self, args, xp):
        import numpy as np
        from types import SimpleNamespace
        from fips_ref.adamw import adamw_init
        from fips_ref.checkpoint import Checkpoint, MLPBlock, json_entry
        from fips_ref.codec import encode
        from fips_ref.local_stage import FiPSConfig, init_factors
        from fips_ref.models import prepare_model
        from fips_ref.models.train_mlps import train_mlps
        from fips_ref.sharing import build_groups, paper_groups
        from fips_ref.sparsifiers import resolve_schedule
        from fips_ref.sparsity import initial_masks
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from model_fixtures import make_vit_checkpoint, random_images

        dtype = np.dtype(args.dtype).type
        base = make_vit_checkpoint(**dict(DEIT_S, depth=args.depth), seed=args.seed)
        D, F = DEIT_S["embed_dim"], int(DEIT_S["embed_dim"] * DEIT_S["mlp_ratio"])
        blocks = [MLPBlock(i, f"blocks.{i}", 0, D, F) for i in range(args.depth)]
        self.plan = build_groups(blocks, paper_groups(blocks, "vit"), budget=args.budget,
                                 sparsity=args.sparsity, strategy="long")
        init = init_factors(base.tensors, self.plan, xp=np, dtype=np.float32, tau=32)
        V = {k: v for k, v in init.items() if k.endswith(".V")}
        masks = initial_masks(V, args.sparsity)
        for k in V:
            init[k] *= masks[k]
        result = SimpleNamespace(groups=self.plan, params=init, masks=masks)
        arrays, meta = encode(base, result, {}, storage_dtype=np.float32)
        ckpt = Checkpoint("<DeiT-S FiPS>", base.config, arrays, {"fips": json_entry(meta)})
        self.model = prepare_model(ckpt, dtype=dtype, xp=xp)
        self.params = dict(self.model.params)              # every trainable tensor, math layout
        self.mlps = train_mlps(self.model, ckpt, self.params)
        self.masks = {k: self.params[k] != 0 for k in self.params if k.startswith("fips.V.")}
        self.adam = adamw_init(self.params)
        self.cfg = FiPSConfig(budget=args.budget, sparsity=args.sparsity, sparsifier="rigl",
                              rigl_drop_fraction=0.05)   # docs/authors-code.md §7 transfer values
        self.sched = resolve_schedule(self.cfg, 600)
        rng = np.random.default_rng(args.seed + 1)
        self.images = random_images(base, args.batch)                      # [B, 3, 224, 224]
        self.targets = soft_targets(rng, args.batch, DEIT_S["num_classes"])  # [B, K]
        self.x = xp.asarray(self.images, dtype=dtype)
        self.t = xp.asarray(self.targets, dtype=dtype)
        self.xp, self.dtype, self.rigl = xp, dtype, args.rigl == "on"
        self.lr = 1e-4                                   # docs/authors-code.md §7 (config lr)
        self.ranks = [g.rank for g in self.plan]


def soft_targets(rng, batch, k, smoothing=0.1):  # -> [B, K]
    """Mixup of two label-smoothed one-hot targets with λ ~ Beta(0.8, 0.8), as timm Mixup."""
    import numpy as np
    a, b = rng.integers(0, k, batch), rng.integers(0, k, batch)
    lam = rng.beta(0.8, 0.8, batch)[:, None]
    off, on = smoothing / k, 1.0 - smoothing + smoothing / k
    ya, yb = np.full((batch, k), off), np.full((batch, k), off)
    ya[np.arange(batch), a], yb[np.arange(batch), b] = on, on
    return lam * ya + (1 - lam) * yb


def soft_ce(logits, t):  # [B, K], [B, K] -> (loss, dlogits [B, K])
    """timm SoftTargetCrossEntropy: mean_b Σ_k −t_bk log softmax(z_b)_k; d/dz = (softmax − t)/B."""
    from fips_ref.backend import get_xp
    xp = get_xp(logits)
    z = logits - logits.max(axis=-1, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=-1, keepdims=True)
    loss = -(t * (z - xp.log(s))).sum() / logits.shape[0]
    e /= s
    e -= t
    e /= logits.shape[0]
    return loss, e


def fips_step(pb, step=None):
    """One global-stage step: model_vjp with the loss gradient, RigL update, AdamW, V ⊙= M."""
    from fips_ref.adamw import adamw_step
    from fips_ref.models import model_vjp
    from fips_ref.sparsifiers import sparsifier_step
    out, grads = {}, {}

    def dlogits(logits):
        out["loss"], dl = soft_ce(logits, pb.t)
        return dl
    model_vjp(pb.model, pb.mlps, pb.x, dlogits, grads)
    old = pb.masks
    if pb.rigl:   # a step at which RigL updates (Δt); the dense gradient of V ⊙ M grows
        pb.masks = sparsifier_step(pb.cfg, pb.sched, pb.sched.delta_t, pb.params, old,
                                   {k: grads[k] for k in old})
    adamw_step(pb.params, grads, pb.adam, pb.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
               grad_masks=old, moment_masks=pb.masks)
    for k, m in pb.masks.items():
        pb.params[k] *= m
    return out["loss"], grads


# ----------------------------------------------------------------------------- PyTorch
class TorchStep:
    """The same model and step in PyTorch autograd (see the module docstring)."""

    def __init__(self, pb, device, attention):
        import torch
        import torch.nn.functional as F
        from fips_ref.backend import to_numpy
        self.torch, self.F, self.pb, self.attention = torch, F, pb, attention
        self.device = device
        tdt = {"float32": torch.float32, "float64": torch.float64}[pb.dtype.__name__]
        self.p = {k: torch.tensor(to_numpy(v), dtype=tdt, device=device, requires_grad=True)
                  for k, v in pb.params.items()}
        self.masks = {k: torch.tensor(to_numpy(m), device=device) for k, m in pb.masks.items()}
        self.x = torch.tensor(pb.images, dtype=tdt, device=device)
        self.t = torch.tensor(pb.targets, dtype=tdt, device=device)
        self.opt = torch.optim.AdamW(list(self.p.values()), lr=pb.lr, betas=(0.9, 0.999),
                                     eps=1e-8, weight_decay=0.05)
        self.layers = {l.key: (g.index, l) for g in pb.plan for l in g.layers}
        self.cfg = pb.model.cfg

    def sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def fc(self, h, key, dense_grads):  # [M, in] -> [M, out]: x @ W + b, W from U @ (V ⊙ M)
        from fips_ref.mlp import factored_is_cheaper
        g, layer = self.layers[key]
        U, V = self.p[f"fips.U.{g}"], self.p[f"fips.V.{key}"]
        Vm = V * self.masks[f"fips.V.{key}"]
        if self.pb.rigl:
            Vm.register_hook(lambda grad: dense_grads.__setitem__(f"fips.V.{key}", grad))
        A, B = (U, Vm) if layer.basis_first else (Vm.T, U.T)   # sharing.layer_factors
        b = self.p[f"{key}.bias"]
        if factored_is_cheaper(h.shape[0], A.shape[0], A.shape[1], B.shape[1]):
            return self.torch.addmm(b, h @ A, B)
        return self.torch.addmm(b, h, A @ B)

    def forward(self, dense_grads):  # -> logits [B, K]
        torch, F, p, cfg = self.torch, self.F, self.p, self.cfg
        B, D, H = self.x.shape[0], cfg.embed_dim, cfg.num_heads
        ph, pw = cfg.patch_size
        w = p["patch_embed.proj.weight"].T.reshape(D, cfg.in_chans, ph, pw)   # [P, D] -> conv
        t = F.conv2d(self.x, w, p["patch_embed.proj.bias"], stride=(ph, pw))
        t = t.flatten(2).transpose(1, 2)                                      # [B, N-1, D]
        t = torch.cat([p["cls_token"].expand(B, -1, -1), t], dim=1) + p["pos_embed"]
        N = t.shape[1]
        for i in range(cfg.depth):
            q = f"blocks.{i}."
            h = F.layer_norm(t, (D,), p[q + "norm1.weight"], p[q + "norm1.bias"], cfg.norm_eps)
            qkv = torch.addmm(p[q + "attn.qkv.bias"], h.reshape(-1, D), p[q + "attn.qkv.weight"])
            qs, ks, vs = qkv.reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
            if self.attention == "sdpa":
                o = F.scaled_dot_product_attention(qs, ks, vs)
            else:
                a = (qs * (D // H) ** -0.5) @ ks.transpose(-2, -1)
                o = a.softmax(dim=-1) @ vs
            o = o.transpose(1, 2).reshape(B * N, D)
            t = t + torch.addmm(p[q + "attn.proj.bias"], o, p[q + "attn.proj.weight"]).reshape(B, N, D)
            h = F.layer_norm(t, (D,), p[q + "norm2.weight"], p[q + "norm2.bias"], cfg.norm_eps)
            z = F.gelu(self.fc(h.reshape(-1, D), q + "mlp.fc1", dense_grads))
            t = t + self.fc(z, q + "mlp.fc2", dense_grads).reshape(B, N, D)
        t = F.layer_norm(t, (D,), p["norm.weight"], p["norm.bias"], cfg.norm_eps)
        return torch.addmm(p["head.bias"], t[:, 0], p["head.weight"])

    def loss_and_grads(self):
        dense = {}
        logits = self.forward(dense)
        loss = -(self.t * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss, dense

    def rigl(self, dense):
        """sparsity.rigl_update (global): drop smallest |V| active, grow largest |dense grad|."""
        torch, pb = self.torch, self.pb
        keys = list(self.masks)
        v = torch.cat([self.p[k].detach().abs().flatten() for k in keys])
        m = torch.cat([self.masks[k].flatten() for k in keys])
        g = torch.cat([dense[k].abs().flatten() for k in keys])
        n, nnz = v.numel(), int(m.sum())
        s_cur = 1.0 - nnz / n
        target = round(pb.cfg.rigl_drop_fraction * (1.0 - s_cur) + s_cur, 6)
        n_keep = min(int(n * (1.0 - target)), nnz)
        keep = torch.zeros_like(m)
        keep[torch.topk(torch.where(m, v, -torch.inf), n_keep).indices] = True
        n_grow = int(n * (1.0 - pb.cfg.sparsity)) - n_keep    # sparsity.keep_count
        grow = torch.zeros_like(m)
        grow[torch.topk(torch.where(keep, -torch.inf, g), max(n_grow, 0)).indices] = True
        new, start = keep | grow, 0
        for k in keys:
            size = self.masks[k].numel()
            self.masks[k] = new[start:start + size].reshape(self.masks[k].shape)
            start += size

    def step(self):
        loss, dense = self.loss_and_grads()
        if self.pb.rigl:
            self.rigl(dense)
        self.opt.step()
        with self.torch.no_grad():
            for k, m in self.masks.items():
                st = self.opt.state[self.p[k]]
                st["exp_avg"].mul_(m)
                st["exp_avg_sq"].mul_(m)
        return loss


def check_equivalence(pb, ts):
    """First-step loss and gradients of both sides (same parameters, same batch); prints them."""
    import numpy as np
    from fips_ref.backend import to_numpy
    from fips_ref.models import model_vjp
    grads, out = {}, {}

    def dlogits(logits):
        out["loss"], dl = soft_ce(logits, pb.t)
        return dl
    model_vjp(pb.model, pb.mlps, pb.x, dlogits, grads)
    tloss, _ = ts.loss_and_grads()
    worst, worst_key = 0.0, None
    for k, g in grads.items():
        g = to_numpy(g).astype(np.float64)
        if k in pb.masks:
            g = g * to_numpy(pb.masks[k])       # torch's V.grad is the masked gradient
        tg = ts.p[k].grad.detach().cpu().double().numpy()
        rel = np.linalg.norm(g - tg) / max(np.linalg.norm(tg), 1e-30)
        if rel > worst:
            worst, worst_key = rel, k
    tloss = float(tloss.detach())
    lrel = abs(float(out["loss"]) - tloss) / abs(tloss)
    print(f"correctness guard (first step, same parameters): loss fips_ref {float(out['loss']):.6f}"
          f" torch {float(tloss):.6f} (rel. diff {lrel:.1e}); worst gradient rel. diff "
          f"{worst:.1e} ({worst_key}) over {len(grads)} tensors")
    tol = 1e-3 if pb.dtype.__name__ == "float32" else 1e-8
    if lrel > tol or worst > 10 * tol:
        raise SystemExit(f"correctness guard failed: loss {lrel:.1e}, gradient {worst:.1e}")
    ts.opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- running
def memory_side(args):
    """Subprocess body: set up one side, run --memory-steps steps, print RSS figures (MiB)."""
    import gc
    from fips_ref.backend import load_backend, synchronize
    xp = load_backend(args.backend)
    pb = Problem(args, xp)
    if args.memory_side == "torch":
        ts = TorchStep(pb, "cpu" if args.backend == "numpy" else "cuda", args.torch_attention)
        pb.model = pb.mlps = pb.adam = pb.params = None   # only the torch copy steps
        step, sync = ts.step, ts.sync
    else:
        step, sync = (lambda: fips_step(pb)), (lambda: synchronize(xp))
    gc.collect()
    with RSSSampler() as rss:
        for _ in range(args.memory_steps):
            step()
        sync()
    device = 0.0                                     # device high-water mark (GPU only)
    if args.backend == "cupy" and args.memory_side == "torch":
        import torch
        device = torch.cuda.max_memory_allocated() / 2 ** 20
    elif args.backend == "cupy":
        from fips_ref.backend import peak_device_bytes
        device = peak_device_bytes(xp) / 2 ** 20
    print(f"MEMORY {rss.base:.0f} {rss.peak:.0f} {maxrss_mib():.0f} {device:.0f}")


def run_memory(args, side):
    argv = [sys.executable, os.path.abspath(__file__), "--memory-side", side] + [
        a for a in sys.argv[1:] if a != "--profile"]
    out = subprocess.run(argv, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("MEMORY "):
            return tuple(float(x) for x in line.split()[1:])
    print(f"  memory subprocess ({side}) failed: {out.stderr.strip().splitlines()[-1:]}")
    return None


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    set_threads(threads)
    sys.path.insert(0, ROOT)
    if args.memory_side:
        return memory_side(args)
    import numpy as np
    from fips_ref.backend import load_backend, synchronize
    xp = load_backend(args.backend)
    torch = None
    if args.torch == "on":
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            print("torch is not installed: timing fips_ref alone (pip install torch==2.13.0)")
    device = "cpu" if args.backend == "numpy" else "cuda"
    if torch is not None and device == "cuda" and not torch.cuda.is_available():
        print("torch has no CUDA here: timing fips_ref alone")
        torch = None
    print("command: python bench/finetune_step.py " + " ".join(map(shlex.quote, sys.argv[1:])))
    print(f"numpy {np.__version__}, backend {args.backend}, dtype {args.dtype}, threads {threads}"
          + (f", torch {torch.__version__} ({args.torch_attention} attention)" if torch else "")
          + f", load average {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    pb = Problem(args, xp)
    n_par = sum(int(v.size) for v in pb.params.values())
    nnz = sum(int(m.sum()) for m in pb.masks.values())
    print(f"DeiT-S FiPS: batch {args.batch}, ranks {pb.ranks}, {n_par / 1e6:.2f} M trainable "
          f"entries ({nnz / 1e6:.2f} M of V active), set-up {time.perf_counter() - t0:.1f} s")
    ts = TorchStep(pb, device, args.torch_attention) if torch is not None else None
    if ts is not None:
        check_equivalence(pb, ts)
    fsec, tsec, fcpu, tcpu = [], [], [], []
    for r in range(args.warmup + args.repeats):
        t, c = time.perf_counter(), time.process_time()
        fips_step(pb)
        synchronize(xp)
        f, fc = time.perf_counter() - t, time.process_time() - c
        if ts is not None:
            t, c = time.perf_counter(), time.process_time()
            ts.step()
            ts.sync()
            tt, tc = time.perf_counter() - t, time.process_time() - c
        if r >= args.warmup:
            fsec.append(f)
            fcpu.append(fc)
            if ts is not None:
                tsec.append(tt)
                tcpu.append(tc)
                print(f"  repeat {r - args.warmup}: fips_ref {f:.3f} s (cpu {fc:.2f} s), torch "
                      f"{tt:.3f} s (cpu {tc:.2f} s), ratio {f / tt:.2f} (cpu {fc / tc:.2f})")
            else:
                print(f"  repeat {r - args.warmup}: fips_ref {f:.3f} s (cpu {fc:.2f} s)")
    print(f"fips_ref step: median {median(fsec):.3f} s, best {min(fsec):.3f} s")
    if tsec:
        ratios = [a / b for a, b in zip(fsec, tsec)]
        print(f"torch step:    median {median(tsec):.3f} s, best {min(tsec):.3f} s")
        print("ratio per repeat: " + ", ".join(f"{x:.2f}" for x in ratios)
              + f"; median {median(ratios):.2f} (target <= 1.5)")
        cpu = [a / b for a, b in zip(fcpu, tcpu)]
        print("process-CPU-time ratio per repeat: " + ", ".join(f"{x:.2f}" for x in cpu)
              + f"; median {median(cpu):.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.profile:
        profile(pb)
    if args.memory == "on":
        for side in ("numpy", "torch") if ts is not None else ("numpy",):
            mem = run_memory(args, side)
            if mem:
                print(f"memory, {'fips_ref' if side == 'numpy' else 'torch'} side (own process): "
                      f"peak RSS during {args.memory_steps} steps {mem[1]:.0f} MiB = {mem[0]:.0f} "
                      f"before + {mem[1] - mem[0]:.0f} MiB for the step; ru_maxrss {mem[2]:.0f} "
                      f"MiB (set-up included)"
                      + (f"; device {mem[3]:.0f} MiB" if args.backend == "cupy" else ""))


def profile(pb):
    import cProfile
    import pstats
    prof = cProfile.Profile(time.process_time)       # CPU seconds: steadier on shared cores
    prof.enable()
    fips_step(pb)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
