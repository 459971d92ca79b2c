"""Condensed storage of constant fan-in and N:M V slices, and the storage formula with index bits (paper §3).

A constant fan-in V_j (every active unit keeps exactly k entries; units and fan-in as in
structured.py) is stored as

    values   [A, k]  the active entries of each active unit, in ascending fan-in order
    indices  [A, k]  their fan-in positions, in the smallest unsigned integer type that holds them
    units    [A]     which units are active (stored only when SRigL ablated some: A < units)

N:M V_j likewise, with k = G·N (G = fan_in / M groups) and ``indices`` the position inside the
entry's group of M (so one byte for any M ≤ 256); the group is implied by the order.
Decoding gives back exactly V ⊙ mask and the mask (round trip bit-exact, same dtype).
"""
import io
import math
from typing import NamedTuple

import numpy as np

from .backend import get_xp, to_numpy
from .budget import storage_bits
from .structured import unit_view


class Condensed(NamedTuple):
    values: object      # [A, k] V's dtype
    indices: object     # [A, k] uint8/16/32: fan-in index (m == 0) or index inside the group (m > 0)
    units: object       # [A] uint: active units, ascending
    n_units: int        # units of the layer (A ≤ n_units)
    fan_in: int
    axis: int           # fan-in axis of V_j [R, cols] (structured.fan_in_axis)
    m: int = 0          # 0: constant fan-in; M of an N:M pattern (k = G·N)


def index_dtype(n):
    """Smallest unsigned integer dtype holding 0 … n − 1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if n - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def index_bits(n):
    """Bits of one index into n positions when packed: ⌈log2 n⌉ (at least 1)."""
    return max(1, math.ceil(math.log2(n)))


# ----------------------------------------------------------------------------- encode / decode
def encode(V, mask, axis, m=0):  # [R, cols] x2 -> Condensed
    """Condensed form of V ⊙ mask; ValueError unless every active unit has the same count
    (and, for ``m`` > 0, every group of M along the fan-in the same count N)."""
    xp = get_xp(V)
    um, uv = unit_view(mask, axis), unit_view(V, axis)                  # [U, n]
    n_units, fan_in = um.shape
    counts = um.sum(axis=1)                                             # [U]
    active = counts > 0
    k = int(counts.max()) if n_units else 0
    if bool((counts[active] != k).any()):
        raise ValueError(f"condensed: the mask is not constant fan-in (active units keep "
                         f"{int(counts[active].min())} to {k} entries)")
    if m:
        _check_nm(um, m, k)
    rows = xp.flatnonzero(active)                                       # [A]
    order = xp.argsort(~um[rows], axis=1, kind="stable")[:, :k]         # [A, n] -> [A, k], ascending
    values = xp.take_along_axis(uv[rows], order, axis=1)
    idx = order % m if m else order
    return Condensed(values, idx.astype(index_dtype(m or fan_in)),
                     rows.astype(index_dtype(n_units)), n_units, fan_in, axis, m)


def _check_nm(um, m, k):  # [U, n] bool
    if um.shape[1] % m:
        raise ValueError(f"condensed: fan-in {um.shape[1]} is not a multiple of M = {m}")
    per_group = um.reshape(um.shape[0], -1, m).sum(axis=2)              # [U, G]
    if bool((per_group != per_group.reshape(-1)[0]).any()):
        raise ValueError(f"condensed: the mask is not N:{m} (groups keep "
                         f"{int(per_group.min())} to {int(per_group.max())} entries)")


def global_indices(c):  # Condensed -> [A, k] intp
    """Fan-in positions of the stored entries (N:M: group offset + index inside the group)."""
    xp = get_xp(c.indices)
    idx = c.indices.astype(xp.intp)
    if c.m:
        n = idx.shape[1] // (c.fan_in // c.m) if idx.shape[1] else 1   # N per group
        idx = idx + (xp.arange(idx.shape[1]) // n * c.m)[None, :]
    return idx


def decode(c):  # Condensed -> ([R, cols], [R, cols] bool)
    """(V ⊙ mask, mask) in V_j's [R, cols] orientation; ValueError on out-of-range or repeated indices."""
    xp = get_xp(c.values)
    idx = global_indices(c)
    if idx.size and (int(idx.max()) >= c.fan_in or bool((xp.diff(idx, axis=1) <= 0).any())):
        raise ValueError("condensed: indices out of range or not strictly ascending within a unit")
    units = c.units.astype(xp.intp)
    if units.size and int(units.max()) >= c.n_units:
        raise ValueError(f"condensed: unit index {int(units.max())} ≥ {c.n_units} units")
    uv = xp.zeros((c.n_units, c.fan_in), dtype=c.values.dtype)          # [U, n]
    um = xp.zeros((c.n_units, c.fan_in), dtype=bool)
    uv[units[:, None], idx] = c.values
    um[units[:, None], idx] = True
    return (xp.ascontiguousarray(unit_view(uv, c.axis)),
            xp.ascontiguousarray(unit_view(um, c.axis)))


# ----------------------------------------------------------------------------- storage
def to_arrays(c, prefix):
    """Host arrays to save under ``prefix`` (units omitted when every unit is active)."""
    out = {f"{prefix}.values": to_numpy(c.values), f"{prefix}.indices": to_numpy(c.indices)}
    if c.units.shape[0] < c.n_units:
        out[f"{prefix}.units"] = to_numpy(c.units)
    return out


def from_arrays(arrays, prefix, *, n_units, fan_in, axis, m=0):
    """The Condensed saved by to_arrays (shapes from the metadata); ValueError on inconsistent arrays."""
    values, idx = arrays[f"{prefix}.values"], arrays[f"{prefix}.indices"]
    units = arrays.get(f"{prefix}.units")
    units = np.arange(n_units, dtype=index_dtype(n_units)) if units is None else units
    if values.shape != idx.shape or values.ndim != 2 or units.shape != (values.shape[0],) \
            or idx.dtype.kind != "u" or units.dtype.kind != "u":
        raise ValueError(f"condensed: arrays {prefix}.* disagree (values {values.shape}, "
                         f"indices {idx.shape} {idx.dtype}, units {units.shape} {units.dtype})")
    return Condensed(values, idx, units, n_units, fan_in, axis, m)


def indexed_storage_bits(rows, rank, layers, value_bits=16):
    """Paper §3 storage of one group with indices instead of a bitmask:
    value_bits·(rows·R + Σ nnz_j) + Σ_j (idx_bits_j·nnz_j + unit_bits_j), for
    ``layers`` = [(nnz_j, idx_bits_j, unit_bits_j)] (unit_bits_j: the stored unit list, 0 unless ablated)."""
    nnz = sum(l[0] for l in layers)
    return value_bits * (rows * rank + nnz) + sum(n * b + u for n, b, u in layers)


def npz_bytes(arrays):
    """Bytes of an uncompressed .npz holding ``arrays`` (what np.savez writes)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getbuffer().nbytes


def storage_report(U, conds, value_dtype=np.float16):
    """Both storage formulas of one group (shared U [rows, R], its layers' Condensed) and the bytes
    of the actual arrays: the bitmask .npz (as codec.py writes) and the condensed .npz."""
    U = to_numpy(U)
    rows, rank = U.shape
    vbits = 8 * np.dtype(value_dtype).itemsize
    nnz = sum(int(c.values.size) for c in conds)
    cols = sum(c.fan_in * c.n_units for c in conds) // rank              # 2n·cols of C
    ablated = [c.units.shape[0] < c.n_units for c in conds]
    packed = [(c.values.size, index_bits(c.m or c.fan_in), a * index_bits(c.n_units) * c.units.shape[0])
              for c, a in zip(conds, ablated)]
    in_dtype = [(c.values.size, 8 * c.indices.dtype.itemsize, a * 8 * c.units.dtype.itemsize * c.units.shape[0])
                for c, a in zip(conds, ablated)]
    cond_arrays, bitmask_arrays = _file_arrays(U, conds, value_dtype)
    return {
        "nnz": nnz, "rows": rows, "rank": rank, "cols": cols, "value_bits": vbits,
        "bits_bitmask": storage_bits(rows, rank, cols, nnz, value_bits=vbits),
        "bits_indexed_packed": indexed_storage_bits(rows, rank, packed, vbits),
        "bits_indexed_dtype": indexed_storage_bits(rows, rank, in_dtype, vbits),
        "file_bytes_bitmask": npz_bytes(bitmask_arrays),
        "file_bytes_condensed": npz_bytes(cond_arrays),
    }


def _file_arrays(U, conds, value_dtype):  # -> ({name: array} condensed, {name: array} bitmask)
    """The group's arrays in both layouts: condensed per layer, and codec.py's packed bitmask + values."""
    cond = {"U": U.astype(value_dtype)}
    masks, values = [], []
    for i, c in enumerate(conds):
        cond.update(to_arrays(c._replace(values=c.values.astype(value_dtype)), f"V{i}"))
        v, mk = decode(c._replace(values=to_numpy(c.values), indices=to_numpy(c.indices),
                                  units=to_numpy(c.units)))
        masks.append(mk.ravel())
        values.append(v[mk])
    bitmask = {"U": U.astype(value_dtype), "mask": np.packbits(np.concatenate(masks)),
               "values": np.concatenate(values).astype(value_dtype)}
    return cond, bitmask
