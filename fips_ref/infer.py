"""Inference forward of a FiPS-compressed MLP: four paths, their MAC counts, and a per-batch choice (paper §3).

Letters: M tokens, D model width, F hidden width, R rank, A active units, k fan-in kept per unit.
One layer stores U [rows, R] (shared in its group), V_j [R, cols] sparse and a bias; its math
weight is W = U V_j (basis-first, fc1 in 'long') or (U V_j)ᵀ (sharing.layer_factors). The
*V product* multiplies by V_j (basis-first: after x U) or by V_jᵀ (otherwise: before the
·Uᵀ); its outputs are the layer's units (structured.py). Paths, all giving y = x W + b:

  materialised  W = A @ B once per call, then x @ W        paper §3 "full rank"
  lowrank       (x @ U) @ V, V dense with zeros             paper §3 "low rank", dense V
  gather        (xU)[:, idx] * values summed over k        low rank, condensed V (SRigL kernel)
  csr           low rank, SciPy CSR V (NumPy only)          low rank, sparse V

The choice per batch size uses MAC counts (functions below, paper §3) weighted by a CostModel
of the machine (docs/deployment.md §3); any path can be forced.
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .backend import get_xp
from .condensed import decode, global_indices
from .mlp import gelu
from .structured import fan_in_axis, unit_view

PATHS = ("materialised", "lowrank", "gather", "csr")


class InferLayer(NamedTuple):
    U: object            # [rows, R]
    V: object            # [R, cols] with zeros at inactive entries, or None (paths without it)
    bias: object         # [out]
    basis_first: bool
    idx: object          # [A, k] intp fan-in positions (ELL-padded for a varying fan-in), or None
    values: object       # [A, k] (zeros at padding), or None
    units: object        # [A] intp active units, or None when all units are active
    csr: tuple           # SciPy CSR row blocks of the V product as [units, fan_in], or ()
    n_units: int
    cols: int            # V_j's column count (units of a basis-first layer, else its fan-in)
    nnz: int             # active entries of V_j
    stored: int          # entries of the gather / CSR form, A·k (more than nnz with ELL padding)


# ----------------------------------------------------------------------------- preparation
def default_paths(xp):
    """Every path the backend offers: all on NumPy; no 'csr' elsewhere (SciPy sparse is host-only)."""
    return PATHS if xp is np else tuple(p for p in PATHS if p != "csr")


def prepare_layer(U, V, mask, bias, basis_first, *, paths=None, threads=None):
    """An InferLayer of one fc layer, holding the data of ``paths``.

    Parameters
    ----------
    U : [rows, R] shared basis of the layer's group.
    V, mask : [R, cols] the layer's slice and its bool mask (None: every entry active).
    bias : [out] the layer's bias.
    basis_first : True when the math weight is U·V_j (sharing.Layer.basis_first), else (U·V_j)ᵀ.
    paths : the paths to prepare (None: default_paths of the backend; 'csr' needs NumPy).
    threads : CSR row blocks run in parallel (None: every core this process may use).

    Returns
    -------
    InferLayer, for layer_forward / mlp_forward.
    """
    xp = get_xp(U, V)
    paths = default_paths(xp) if paths is None else paths
    mask = xp.ones(V.shape, dtype=bool) if mask is None else mask
    Vm = xp.where(mask, V, 0).astype(V.dtype)                           # [R, cols]
    axis = fan_in_axis(basis_first)
    n_units, fan_in = unit_view(mask, axis).shape
    idx, values, units = _ell(Vm, mask, axis)
    return _build(U, Vm, bias, basis_first, (idx, values, units), int(mask.sum()), paths, threads,
                  n_units, fan_in)


def prepare_condensed(U, c, bias, basis_first, *, paths=("gather", "csr"), threads=None):
    """An InferLayer straight from condensed storage (no dense V unless a dense path is asked for)."""
    Vm = decode(c)[0] if {"materialised", "lowrank"} & set(paths) else None
    units = None if c.units.shape[0] == c.n_units else c.units.astype(get_xp(U).intp)
    return _build(U, Vm, bias, basis_first, (global_indices(c), c.values, units),
                  int(c.values.size), paths, threads, c.n_units, c.fan_in)


def _ell(Vm, mask, axis):  # [R, cols] -> ([A, k], [A, k], [A] or None)
    """ELL form of the V product: each active unit's entries first, ascending; padding value 0."""
    xp = get_xp(Vm)
    um, uv = unit_view(mask, axis), unit_view(Vm, axis)                 # [U, n]
    counts = um.sum(axis=1)
    rows = xp.flatnonzero(counts > 0)
    k = int(counts.max()) if counts.size else 0
    order = xp.argsort(~um[rows], axis=1, kind="stable")[:, :k]         # [A, n] -> [A, k]
    values = xp.take_along_axis(uv[rows], order, axis=1)
    return order.astype(xp.intp), values, None if rows.size == um.shape[0] else rows


def _build(U, Vm, bias, basis_first, ell, nnz, paths, threads, n_units, fan_in):
    bad = set(paths) - set(PATHS)
    if bad:
        raise ValueError(f"unknown inference path {sorted(bad)[0]!r} (choose from {', '.join(PATHS)})")
    idx, values, units = ell
    csr = _csr_blocks(idx, values, units, n_units, fan_in, threads) if "csr" in paths else ()
    keep_v, keep_g = {"materialised", "lowrank"} & set(paths), "gather" in paths
    cols = n_units if basis_first else fan_in
    return InferLayer(U, Vm if keep_v else None, bias, basis_first, idx if keep_g else None,
                      values if keep_g else None, units if keep_g else None, csr, n_units, cols,
                      nnz, int(idx.size))


def _csr_blocks(idx, values, units, n_units, fan_in, threads):
    """CSR of the V product as [units, fan_in] (ELL padding kept as explicit zeros), in row blocks
    for ``threads`` threads (SciPy's sparsetools release the GIL on large arrays, scipy PR #3477)."""
    import scipy.sparse
    if get_xp(values) is not np:
        raise ValueError("inference path 'csr' needs NumPy arrays (SciPy sparse)")
    rows = np.arange(n_units) if units is None else units
    indptr = np.zeros(n_units + 1, dtype=np.int64)
    indptr[rows + 1] = idx.shape[1]
    S = scipy.sparse.csr_matrix((values.ravel(), idx.ravel(), np.cumsum(indptr)),
                                shape=(n_units, fan_in))
    n = max(1, min(threads or _cpu_count(), n_units))
    cuts = [n_units * i // n for i in range(n + 1)]
    return tuple(S[a:b] for a, b in zip(cuts[:-1], cuts[1:]))


def _cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_POOLS = {}


def _pool(n):
    """A shared thread pool of n − 1 workers (the calling thread does one block itself)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n - 1)
    return _POOLS[n]


def layer_dims(f):  # -> (in, out)
    """Input and output width of a prepared layer: (rows, cols) basis-first, else (cols, rows)."""
    rows = f.U.shape[0]
    return (rows, f.cols) if f.basis_first else (f.cols, rows)


# ----------------------------------------------------------------------------- MACs (paper §3)
def macs_dense(m, rows, cols):
    """Original layer, one [M, D] @ [D, F] (either orientation): M·D·F."""
    return m * rows * cols


def macs_materialised(m, rows, rank, cols, nnz=None):
    """Full rank (paper §3): W = U V_j, R·D·F with dense V (nnz·D with a sparse kernel), then M·D·F."""
    build = rows * rank * cols if nnz is None else nnz * rows
    return build + m * rows * cols


def macs_lowrank(m, rows, rank, cols, nnz=None):
    """Low rank (paper §3): M·D·R for the U product plus M·R·F with dense V, or M·nnz with sparse V."""
    return m * rows * rank + m * (rank * cols if nnz is None else nnz)


def path_macs(path, m, f):
    """MACs of ``path`` for M tokens through a prepared layer (gather/CSR count stored entries)."""
    rows, rank = f.U.shape
    if path == "materialised":
        return macs_materialised(m, rows, rank, f.cols)
    return macs_lowrank(m, rows, rank, f.cols, None if path == "lowrank" else f.stored)


# ----------------------------------------------------------------------------- per-batch choice
@dataclass(frozen=True)
class CostModel:
    """Seconds of a path ≈ Σ over its dense products of max(MACs / gemm rate, weight bytes / bandwidth)
    plus its sparse product's time. Defaults: the 2-core AMD EPYC development machine, NumPy
    float32, OpenBLAS 2 threads (docs/deployment.md §3); bench/inference.py prints the measured paths."""
    gemm_macs_per_s: float = 6e10
    bytes_per_s: float = 3e10
    csr_ns_per_entry: float = 0.55          # SciPy CSR, per stored entry, per thread
    csr_ns_per_entry_token: float = 0.24    # ... and per entry and token
    gather_ns_per_mac: float = 1.7          # NumPy take + einsum, per token and stored entry


def _gemm_seconds(macs, weight_bytes, cost):
    return max(macs / cost.gemm_macs_per_s, weight_bytes / cost.bytes_per_s)


def estimate_seconds(path, m, f, cost=None):
    """Estimated seconds of ``path`` for M tokens through a prepared layer."""
    cost = cost or CostModel()
    rows, rank = f.U.shape
    b = f.U.dtype.itemsize
    if path == "materialised":
        return (_gemm_seconds(rows * rank * f.cols, b * rank * (rows + f.cols), cost)
                + _gemm_seconds(m * rows * f.cols, b * rows * f.cols, cost))
    u_part = _gemm_seconds(m * rows * rank, b * rows * rank, cost)
    if path == "lowrank":
        return u_part + _gemm_seconds(m * rank * f.cols, b * rank * f.cols, cost)
    if path == "gather":
        return u_part + 1e-9 * cost.gather_ns_per_mac * m * f.stored
    per_entry = cost.csr_ns_per_entry + cost.csr_ns_per_entry_token * m
    return u_part + 1e-9 * per_entry * f.stored / max(len(f.csr), 1)


def calibrate(dtype=np.float32, repeats=3):
    """A CostModel measured on this machine in about a second (NumPy; best of ``repeats``):
    GEMM rate of [256, 768] @ [768, 3072], bandwidth of a mat-vec over 64 MB (beyond most caches),
    CSR time per entry at 1 and 16 tokens, gather time per MAC (1M entries, 682 fan-in)."""
    import scipy.sparse
    rng = np.random.default_rng(0)
    best = lambda fn: min(_seconds(fn) for _ in range(repeats))
    a, w = rng.standard_normal((256, 768)).astype(dtype), rng.standard_normal((768, 3072)).astype(dtype)
    big = np.ones((4096, (64 << 20) // (4096 * np.dtype(dtype).itemsize)), dtype=dtype)   # 64 MB
    v = np.ones(big.shape[1], dtype=dtype)
    units, k, fan_in = 4096, 256, 682
    idx = np.sort(rng.random((units, fan_in)).argsort(axis=1)[:, :k], axis=1)
    vals = rng.standard_normal((units, k)).astype(dtype)
    S = scipy.sparse.csr_matrix((vals.ravel(), idx.ravel(), np.arange(0, units * k + 1, k)),
                                shape=(units, fan_in))
    t1, t16 = rng.standard_normal(fan_in).astype(dtype), rng.standard_normal((fan_in, 16)).astype(dtype)
    c1, c16 = best(lambda: S @ t1) / S.nnz, best(lambda: S @ t16) / S.nnz
    t4 = rng.standard_normal((4, fan_in)).astype(dtype)
    g = best(lambda: np.einsum("mak,ak->ma", np.take(t4, idx, axis=1), vals)) / (4 * S.nnz)
    return CostModel(gemm_macs_per_s=a.shape[0] * w.size / best(lambda: a @ w),
                     bytes_per_s=big.nbytes / best(lambda: big @ v),
                     csr_ns_per_entry=1e9 * c1, csr_ns_per_entry_token=max(1e9 * (c16 - c1) / 15, 0.0),
                     gather_ns_per_mac=1e9 * g)


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def available_paths(f):
    """Paths a prepared layer holds the data for."""
    have = {"materialised": f.V is not None, "lowrank": f.V is not None,
            "gather": f.idx is not None, "csr": bool(f.csr)}
    return tuple(p for p in PATHS if have[p])


def choose_path(m, f, cost=None):
    """The available path of least estimated time for M tokens (first in PATHS on a tie)."""
    paths = available_paths(f)
    if not paths:
        raise ValueError("prepared layer holds no inference path")
    times = [estimate_seconds(p, m, f, cost) for p in paths]
    return paths[times.index(min(times))]


# ----------------------------------------------------------------------------- forward
def v_product(t, f, path):  # [M, in] -> [M, out] of the V product
    """t @ V (basis-first) or t @ Vᵀ by ``path``: dense V, the gather, or CSR."""
    xp = get_xp(t)
    if path == "lowrank":
        return t @ (f.V if f.basis_first else f.V.T)
    if path == "gather":
        g = xp.take(t, f.idx, axis=1)                                   # [M, in] -> [M, A, k]
        out = xp.einsum("mak,ak->ma", g, f.values)                      # [M, A, k] -> [M, A]
        if f.units is None:
            return out
        full = xp.zeros((t.shape[0], f.n_units), dtype=out.dtype)       # [M, units]
        full[:, f.units] = out
        return full
    return _csr_product(t, f.csr)


def _csr_product(t, blocks):  # [M, in] -> [M, units]
    """(S t ᵀ)ᵀ, one CSR row block per thread; a single token uses SciPy's mat-vec."""
    rhs = t[0] if t.shape[0] == 1 else np.ascontiguousarray(t.T)        # [in] or [in, M]
    if len(blocks) == 1:
        parts = [blocks[0] @ rhs]
    else:
        futures = [_pool(len(blocks)).submit(b.__matmul__, rhs) for b in blocks[1:]]
        parts = [blocks[0] @ rhs] + [fu.result() for fu in futures]
    out = np.concatenate(parts, axis=0)                                 # [units] or [units, M]
    return out[None, :] if t.shape[0] == 1 else np.ascontiguousarray(out.T)


def layer_forward(x, f, path):  # [M, in] -> [M, out]
    """y = x W + b of one prepared layer by ``path`` (W = U V_j, or (U V_j)ᵀ)."""
    if path not in available_paths(f):
        raise ValueError(f"inference path {path!r} is not prepared for this layer "
                         f"(prepared: {', '.join(available_paths(f)) or 'none'})")
    if path == "materialised":
        W = f.U @ f.V if f.basis_first else f.V.T @ f.U.T               # [in, out]
        y = x @ W
    elif f.basis_first:
        y = v_product(x @ f.U, f, path)                                 # [M, D] -> [M, R] -> [M, cols]
    else:
        y = v_product(x, f, path) @ f.U.T                               # [M, F] -> [M, R] -> [M, D]
    y += f.bias
    return y


def mlp_forward(x, fc1, fc2, path=None, cost=None):  # [M, D] -> [M, D]
    r"""Compressed MLP for inference, each layer by ``path`` or by choose_path for this M.

    .. math:: y = \mathrm{GELU}(x W_1 + b_1) W_2 + b_2,\quad W_1 = U V_1,\ W_2 = (U V_2)^\top

    (for 'long' sharing; paper §3). ``cost``: a CostModel (default CostModel()).
    """
    p1 = path or choose_path(x.shape[0], fc1, cost)
    p2 = path or choose_path(x.shape[0], fc2, cost)
    return layer_forward(gelu(layer_forward(x, fc1, p1)), fc2, p2)


def inference_mlp_fn(fc1, fc2, path=None, cost=None):  # -> callable [..., D] -> [..., D]
    """mlp_forward as a callable over any leading shape (drop-in for models.layers.factored_mlp_fn)."""
    def mlp(h):  # [..., D] -> [..., D]
        y = mlp_forward(h.reshape(-1, h.shape[-1]), fc1, fc2, path, cost)   # [..., D] -> [M, D]
        return y.reshape(h.shape[:-1] + (y.shape[-1],))
    return mlp
