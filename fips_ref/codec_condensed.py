"""Condensed groups of the compressed checkpoint: write, validate, read (docs/compressed-format.md
"Condensed groups", docs/deployment.md §4).

A group trained with a constant fan-in sparsifier (srigl, set --fan-in constant) or with nm stores
each layer's V slice j as ``fips.V.{g}.{j}.values`` [A, k], ``.indices`` [A, k] (smallest unsigned
type) and, only when SRigL ablated units (A < units), ``.units`` [A]; no bitmask. The rest of the
file is as for bitmask groups (codec.py). Units and fan-in are those of structured.py: a
basis-first layer has units = cols and fan-in = R, any other layer units = R and fan-in = cols.
"""
import numpy as np

from .backend import to_numpy
from .checkpoint import InputError
from .condensed import Condensed, decode, encode, from_arrays, storage_report
from .structured import fan_in_axis

MAX_M = 256                   # N:M group size the format accepts (indices in one byte)


def condensed_m(config):
    """None (bitmask), 0 (constant fan-in) or M (N:M) for a run's config dict (FiPSConfig fields)."""
    sparsifier = config.get("sparsifier")
    if sparsifier == "nm":
        return int(config["nm"][1])
    if sparsifier == "srigl" or (sparsifier == "set" and config.get("fan_in") == "constant"):
        return 0
    return None


def layer_shape(g, layer):
    """(units, fan-in) of a layer's V product in a group entry of the metadata."""
    return (g["cols"], g["rank"]) if layer["basis_first"] else (g["rank"], g["cols"])


def prefix(gi, j):
    return f"fips.V.{gi}.{j}"


# ----------------------------------------------------------------------------- write
def encode_group(gi, masks, values, layers, m, storage_dtype):  # -> (arrays, [layer meta])
    """Arrays and per-layer metadata of one group's live V slices [R_live, cols] and masks."""
    arrays, meta = {}, []
    for j, (V, mask, layer) in enumerate(zip(values, masks, layers)):
        axis = fan_in_axis(layer.basis_first)
        c = encode(V, mask, axis, m)
        arrays[f"{prefix(gi, j)}.values"] = to_numpy(c.values).astype(storage_dtype)
        arrays[f"{prefix(gi, j)}.indices"] = to_numpy(c.indices)
        if c.units.shape[0] < c.n_units:
            arrays[f"{prefix(gi, j)}.units"] = to_numpy(c.units)
        meta.append({"layout": "condensed", "m": m, "fan_in_axis": axis,
                     "k": int(c.values.shape[1]), "units": int(c.values.shape[0])})
    return arrays, meta


# ----------------------------------------------------------------------------- validate
def _is_int(v, lo, hi):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_group(ckpt, g):
    """Every condensed layer of group ``g`` against its metadata; returns the array keys it uses.

    Checked: layout, m in [0, 256], fan_in_axis from basis_first, k and the active-unit count A
    in range, nnz = A·k; for N:M the fan-in a multiple of M and k = G·N with 1 ≤ N ≤ M; values
    2-D real floats [A, k]; indices unsigned [A, k], below the fan-in (or M), strictly ascending
    fan-in positions within each unit; units unsigned [A], strictly ascending, below the unit
    count, present exactly when A < units.
    """
    path, gi, keys = ckpt.path, g["index"], []
    for j, layer in enumerate(g["layers"]):
        where = f"{path}: key 'fips' group {gi} layer {layer['key']!r}"
        units, fan_in = layer_shape(g, layer)
        m, k, a = layer.get("m"), layer.get("k"), layer.get("units")
        if layer.get("layout") != "condensed" or not _is_int(m, 0, MAX_M) \
                or layer.get("fan_in_axis") != fan_in_axis(layer["basis_first"]) \
                or not _is_int(k, 0, fan_in) or not _is_int(a, 0, units):
            raise InputError(f"{where}: 'layout', 'm', 'fan_in_axis', 'k', 'units' must be "
                             f"'condensed', an int in [0, {MAX_M}], {fan_in_axis(layer['basis_first'])}, "
                             f"ints in [0, {fan_in}] and [0, {units}]")
        if layer["nnz"] != a * k:
            raise InputError(f"{where}: nnz {layer['nnz']} is not units {a} x k {k}")
        if m and (m < 2 or fan_in % m or k % (fan_in // m) or k // (fan_in // m) > m):
            raise InputError(f"{where}: k {k} is not an N:{m} count of fan-in {fan_in}")
        keys += _check_arrays(ckpt, prefix(gi, j), (a, k), units, m or fan_in, m, fan_in)
    return keys


def _check_arrays(ckpt, p, shape, n_units, n_index, m, fan_in):
    path = ckpt.path
    values, idx = (_get(ckpt, f"{p}.{s}") for s in ("values", "indices"))
    if values.ndim != 2 or values.dtype.kind != "f" or values.shape != shape:
        raise InputError(f"{path}: key '{p}.values' is {values.shape} {values.dtype}, expected "
                         f"{list(shape)} real floats")
    if idx.ndim != 2 or idx.dtype.kind != "u" or idx.shape != shape:
        raise InputError(f"{path}: key '{p}.indices' is {idx.shape} {idx.dtype}, expected "
                         f"{list(shape)} unsigned integers")
    if idx.size and int(idx.max()) >= n_index:
        raise InputError(f"{path}: key '{p}.indices' holds {int(idx.max())}, out of range [0, {n_index})")
    pos = idx.astype(np.int64)
    if m and shape[1]:
        n = shape[1] // (fan_in // m)
        pos = pos + (np.arange(shape[1]) // n * m)[None, :]
    if shape[1] > 1 and bool((np.diff(pos, axis=1) <= 0).any()):
        raise InputError(f"{path}: key '{p}.indices' is not strictly ascending within a unit"
                         + (f" and group of {m}" if m else ""))
    keys = [f"{p}.values", f"{p}.indices"]
    if f"{p}.units" not in ckpt.tensors:
        if shape[0] != n_units:
            raise InputError(f"{path}: missing key '{p}.units' ({shape[0]} of {n_units} units active)")
        return keys
    u = ckpt.tensors[f"{p}.units"]
    if u.ndim != 1 or u.dtype.kind != "u" or u.shape != (shape[0],) or shape[0] == n_units:
        raise InputError(f"{path}: key '{p}.units' is {u.shape} {u.dtype}, expected unsigned "
                         f"[{shape[0]}] and only when some of the {n_units} units are ablated")
    if u.size and (int(u.max()) >= n_units or bool((np.diff(u.astype(np.int64)) <= 0).any())):
        raise InputError(f"{path}: key '{p}.units' must ascend strictly below {n_units}")
    return keys + [f"{p}.units"]


def _get(ckpt, key):
    if key not in ckpt.tensors:
        raise InputError(f"{ckpt.path}: missing key {key!r}")
    return ckpt.tensors[key]


# ----------------------------------------------------------------------------- read
def group_condensed(ckpt, g, dtype=np.float32):
    """[Condensed] of a validated condensed group entry, values as ``dtype`` NumPy arrays."""
    out = []
    for j, layer in enumerate(g["layers"]):
        p = prefix(g["index"], j)
        units, fan_in = layer_shape(g, layer)
        u = ckpt.tensors.get(f"{p}.units")
        u = np.arange(units, dtype=np.int64) if u is None else u
        out.append(Condensed(ckpt.tensors[f"{p}.values"].astype(dtype), ckpt.tensors[f"{p}.indices"],
                             u, units, fan_in, layer["fan_in_axis"], layer["m"]))
    return out


def decoded_slices(ckpt, g):
    """[V_j [R, cols]] float32, zeros off the mask, of a validated condensed group."""
    return [decode(c)[0] for c in group_condensed(ckpt, g)]


# ----------------------------------------------------------------------------- report
def condensed_summary(result, arrays, m):
    """Per condensed group condensed.storage_report (paper §3 with a bitmask, and with index bits
    packed or at the stored dtype; bytes of both layouts' arrays), and the totals (docs/deployment.md §4)."""
    groups = []
    for g in result.groups:
        U = arrays[f"fips.U.{g.index}"]
        shapes = {"rank": U.shape[1], "cols": g.cols}
        dims = [layer_shape(shapes, {"basis_first": l.basis_first}) for l in g.layers]  # (units, fan-in)
        conds = [from_arrays(arrays, f"fips.V.{g.index}.{j}", n_units=u, fan_in=f,
                             axis=fan_in_axis(l.basis_first), m=m)
                 for j, (l, (u, f)) in enumerate(zip(g.layers, dims))]
        groups.append(dict(storage_report(U, conds, U.dtype), index=g.index))
    keys = ("bits_bitmask", "bits_indexed_packed", "bits_indexed_dtype", "file_bytes_bitmask",
            "file_bytes_condensed")
    return {"groups": groups, **{k: sum(r[k] for r in groups) for k in keys}}
