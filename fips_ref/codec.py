"""The compressed checkpoint: write FiPS factors, read them back, decompress to dense weights.

Layout of a compressed .npz (docs/compressed-format.md):
  every tensor of the original that is not an fc weight of a compressed MLP, under its timm key
  (the fc biases hold their trained values);
  ``fips.U.{g}``       [rows, R]    shared basis of group g, storage dtype;
  ``fips.mask.{g}``    uint8 [⌈R·L/8⌉] bitmask (np.packbits, big bit order) of the group's V
                       slices, layer by layer, each row-major [R, cols];
  ``fips.values.{g}``  [nnz]        the active entries of those slices, in the same order;
  (L = 2n·cols, the width of the group's V.)
  ``config``           the original config; ``fips``  JSON metadata (groups, ranks, run).
"""
import numpy as np

from .backend import to_numpy
from .checkpoint import InputError
from .sharing import Layer, layer_factors

FORMAT_VERSION = 1


def encode(ckpt, result, meta, *, storage_dtype=np.float16):
    """Arrays of the compressed file: pass-through tensors, trained biases, packed U / mask / values.

    Dead rank columns (U columns whose V rows have no active entry in any layer of the group)
    are dropped with their V rows: they add nothing to any weight, so this is lossless. A group's
    ``rank`` in the metadata is the stored (live) rank, ``trained_rank`` the one the budget gave.
    """
    compressed = {f"{l.key}.weight" for g in result.groups for l in g.layers}
    arrays = {k: v for k, v in ckpt.tensors.items() if k not in compressed}
    groups_meta = []
    for g in result.groups:
        live = live_rank_columns(result, g)                                    # bool [R]
        masks = [_layer_mask(result, l)[live] for l in g.layers]              # [R_live, cols]
        values = [to_numpy(result.params[f"{l.key}.V"])[live][m] for l, m in zip(g.layers, masks)]
        U = to_numpy(result.params[f"U.{g.index}"])[:, live]                  # [rows, R_live]
        arrays[f"fips.U.{g.index}"] = U.astype(storage_dtype)
        arrays[f"fips.mask.{g.index}"] = np.packbits(np.concatenate([m.ravel() for m in masks]))
        arrays[f"fips.values.{g.index}"] = np.concatenate(values).astype(storage_dtype)
        for l in g.layers:
            bias = f"{l.key}.bias"
            arrays[bias] = to_numpy(result.params[bias]).astype(ckpt.tensors[bias].dtype)
        groups_meta.append({
            "index": g.index, "blocks": list(g.blocks), "rows": g.rows, "cols": g.cols,
            "rank": int(live.sum()), "trained_rank": g.rank,
            "layers": [{"key": l.key, "block": l.block, "basis_first": l.basis_first,
                        "nnz": int(m.sum())} for l, m in zip(g.layers, masks)]})
    meta = dict(meta, format_version=FORMAT_VERSION, storage_dtype=np.dtype(storage_dtype).name,
                groups=groups_meta)
    return arrays, meta


def live_rank_columns(result, group):  # -> bool [R] on the host
    """Rank columns of the group's U that some layer uses: V rows with an active entry in any slice."""
    return np.logical_or.reduce([_layer_mask(result, l).any(axis=1) for l in group.layers])


def _layer_mask(result, layer):  # -> bool [R, cols] on the host
    mask = result.masks.get(f"{layer.key}.V")
    shape = result.params[f"{layer.key}.V"].shape
    return np.ones(shape, dtype=bool) if mask is None else to_numpy(mask).astype(bool)


# ----------------------------------------------------------------------------- reading
def fips_meta(ckpt):
    """The parsed 'fips' metadata of a compressed checkpoint (InputError if absent or malformed)."""
    from .checkpoint import parse_json_entry
    if "fips" not in ckpt.extra:
        raise InputError(f"{ckpt.path}: not a compressed checkpoint (no 'fips' entry)")
    meta = parse_json_entry(ckpt.path, ckpt.extra, "fips")
    if meta.get("format_version") != FORMAT_VERSION or not isinstance(meta.get("groups"), list):
        raise InputError(f"{ckpt.path}: key 'fips' has an unsupported format "
                         f"(version {meta.get('format_version')!r}, expected {FORMAT_VERSION})")
    for g in meta["groups"]:
        ok = isinstance(g, dict) and all(isinstance(g.get(f), int) for f in ("index", "rows", "cols", "rank")) \
            and isinstance(g.get("layers"), list) and all(
                isinstance(l, dict) and isinstance(l.get("key"), str) and isinstance(l.get("block"), int)
                and isinstance(l.get("basis_first"), bool) for l in g["layers"])
        if not ok:
            raise InputError(f"{ckpt.path}: key 'fips' has a malformed group entry {str(g)[:80]}")
    return meta


def group_factors(ckpt, g):
    """(U [rows, R], [V_j [R, cols]], [Layer]) of one group's metadata entry, as float32 NumPy."""
    def get(key):
        if key not in ckpt.tensors:
            raise InputError(f"{ckpt.path}: missing key {key!r}")
        return ckpt.tensors[key]
    U = get(f"fips.U.{g['index']}").astype(np.float32)
    rank, cols, n = g["rank"], g["cols"], len(g["layers"])
    if U.shape != (g["rows"], rank):
        raise InputError(f"{ckpt.path}: key 'fips.U.{g['index']}' has shape {U.shape}, "
                         f"expected {(g['rows'], rank)}")
    bits = np.unpackbits(get(f"fips.mask.{g['index']}"))
    values = get(f"fips.values.{g['index']}")
    if bits.size < n * rank * cols or int(bits[:n * rank * cols].sum()) != values.size:
        raise InputError(f"{ckpt.path}: keys 'fips.mask.{g['index']}' and "
                         f"'fips.values.{g['index']}' disagree")
    mask = bits[:n * rank * cols].astype(bool).reshape(n, rank, cols)
    V = np.zeros((n, rank, cols), dtype=np.float32)
    V[mask] = values
    layers = [Layer(l["key"], l["block"], l["basis_first"]) for l in g["layers"]]
    return U, list(V), layers


def factored_mlps(ckpt, xp=np, dtype=np.float32):
    """{block: ((A1, B1, b1), (A2, B2, b2))} of a compressed checkpoint; each fc is x @ A @ B + b."""
    out = {}
    for g in fips_meta(ckpt)["groups"]:
        U, Vs, layers = group_factors(ckpt, g)
        U = xp.asarray(U, dtype=dtype)
        for layer, V in zip(layers, Vs):
            A, B = layer_factors(U, xp.asarray(V, dtype=dtype), layer)
            bias = xp.asarray(ckpt.tensors[f"{layer.key}.bias"], dtype=dtype)
            out.setdefault(layer.block, []).append((A, B, bias))
    return {b: tuple(fc) for b, fc in out.items()}


def decompressed_tensors(ckpt):
    """Every tensor under its timm key in PyTorch layout, fc weights rebuilt as (A @ B)ᵀ (float32)."""
    tensors = {k: v for k, v in ckpt.tensors.items() if not k.startswith("fips.")}
    for g in fips_meta(ckpt)["groups"]:
        U, Vs, layers = group_factors(ckpt, g)
        for layer, V in zip(layers, Vs):
            A, B = layer_factors(U, V, layer)
            tensors[f"{layer.key}.weight"] = np.ascontiguousarray((A @ B).T)   # [in, out] -> [out, in]
    return tensors
