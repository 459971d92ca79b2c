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
A group trained with srigl, nm or set --fan-in constant (format version 2) stores its V slices
condensed instead of mask + values: ``fips.V.{g}.{j}.values/.indices[/.units]`` (codec_condensed.py).
"""
import re

import numpy as np

from . import codec_condensed as cc
from .backend import to_numpy
from .checkpoint import InputError, check_memory
from .sharing import Layer, layer_factors

FORMAT_VERSION = 2           # written when a group is condensed; bitmask-only files stay version 1
FORMAT_VERSIONS = (1, 2)     # read


def encode(ckpt, result, meta, *, storage_dtype=np.float16):
    """Arrays of the compressed file: pass-through tensors, trained biases, packed U / mask / values.

    Dead rank columns (U columns whose V rows have no active entry in any layer of the group)
    are dropped with their V rows: they add nothing to any weight, so this is lossless. A group's
    ``rank`` in the metadata is the stored (live) rank, ``trained_rank`` the one the budget gave.
    Runs of srigl, nm or set --fan-in constant (``meta['config']``) store V condensed; N:M
    groups keep every rank column (dropping one would shift the groups of M along R).
    """
    compressed = {f"{l.key}.weight" for g in result.groups for l in g.layers}
    arrays = {k: v for k, v in ckpt.tensors.items() if k not in compressed}
    groups_meta = []
    m = cc.condensed_m(meta.get("config") or {})
    for g in result.groups:
        live = live_rank_columns(result, g) if not m else np.ones(g.rank, dtype=bool)   # bool [R]
        masks = [_layer_mask(result, l)[live] for l in g.layers]              # [R_live, cols]
        U = to_numpy(result.params[f"U.{g.index}"])[:, live]                  # [rows, R_live]
        arrays[f"fips.U.{g.index}"] = U.astype(storage_dtype)
        if m is None:
            values = [to_numpy(result.params[f"{l.key}.V"])[live][mk] for l, mk in zip(g.layers, masks)]
            arrays[f"fips.mask.{g.index}"] = np.packbits(np.concatenate([mk.ravel() for mk in masks]))
            arrays[f"fips.values.{g.index}"] = np.concatenate(values).astype(storage_dtype)
            layout = [{}] * len(g.layers)
        else:
            slices = [to_numpy(result.params[f"{l.key}.V"])[live] for l in g.layers]
            cond, layout = cc.encode_group(g.index, masks, slices, g.layers, m, storage_dtype)
            arrays.update(cond)
        for l in g.layers:
            bias = f"{l.key}.bias"
            arrays[bias] = to_numpy(result.params[bias]).astype(ckpt.tensors[bias].dtype)
        groups_meta.append({
            "index": g.index, "blocks": list(g.blocks), "rows": g.rows, "cols": g.cols,
            "rank": int(live.sum()), "trained_rank": g.rank,
            **({} if m is None else {"layout": "condensed"}),
            "layers": [{"key": l.key, "block": l.block, "basis_first": l.basis_first,
                        "nnz": int(mk.sum()), **extra} for l, mk, extra in zip(g.layers, masks, layout)]})
    meta = dict(meta, format_version=1 if m is None else FORMAT_VERSION,
                storage_dtype=np.dtype(storage_dtype).name, groups=groups_meta)
    return arrays, meta


def live_rank_columns(result, group):  # -> bool [R] on the host
    """Rank columns of the group's U that some layer uses: V rows with an active entry in any slice."""
    return np.logical_or.reduce([_layer_mask(result, l).any(axis=1) for l in group.layers])


def _layer_mask(result, layer):  # -> bool [R, cols] on the host
    mask = result.masks.get(f"{layer.key}.V")
    shape = result.params[f"{layer.key}.V"].shape
    return np.ones(shape, dtype=bool) if mask is None else to_numpy(mask).astype(bool)


# ----------------------------------------------------------------------------- reading
MAX_DIM = 2**20  # rows, cols and rank of a group (the widest timm MLP hidden: 24576)
_LAYER_KEY = re.compile(r"(.+)\.mlp\.fc([12])")


def fips_meta(ckpt):
    """The 'fips' metadata of a compressed checkpoint, validated against its arrays.

    Every reader (decompress, evaluate, convert, the model forward) comes through here, so a
    tampered file is refused before it becomes weights: see ``validate_compressed``.
    """
    return validate_compressed(ckpt)


def validate_compressed(ckpt):
    """Check a compressed checkpoint against docs/compressed-format.md; return its metadata.

    Checked, in order: format version; per group the integer fields (rows, cols, rank in
    [1, MAX_DIM], index unique); layer keys ``{prefix}.mlp.fc1/fc2`` of blocks of the config,
    in fc1, fc2 pairs, each key once in the file, ``block`` its position; the fc biases;
    ``basis_first`` consistent with the bias widths (fc1 reads D, fc2 reads F) and with the
    sharing strategy (one side of U for the whole group); U [rows, R] real floats; the mask
    uint8 (packed, zero padding) or bool with one bit per V entry; values 1-D real floats, one
    per set bit, and per-layer ``nnz``; no dense weight next to its factors; no stray fips.* key.
    """
    from .checkpoint import block_prefixes, parse_json_entry
    path = ckpt.path
    if "fips" not in ckpt.extra:
        raise InputError(f"{path}: not a compressed checkpoint (no 'fips' entry)")
    meta = parse_json_entry(path, ckpt.extra, "fips")
    version = meta.get("format_version")
    if version not in FORMAT_VERSIONS or isinstance(version, bool) or not isinstance(meta.get("groups"), list):
        raise InputError(f"{path}: key 'fips' has an unsupported format "
                         f"(version {str(version)[:20]!r}, expected one of {FORMAT_VERSIONS})")
    prefixes = {p: i for i, (p, _) in enumerate(block_prefixes(ckpt.config))}
    run = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    indices, keys, referenced = set(), set(), set()
    for g in meta["groups"]:
        _check_group_fields(path, g, indices)
        for layer in _check_layers(path, g, prefixes, keys):
            _check_orientation(ckpt, g, layer, run.get("concat"))
        referenced |= _check_group_arrays(ckpt, g, version)
    for k in ckpt.tensors:
        if k.startswith("fips.") and k not in referenced:
            raise InputError(f"{path}: key {k!r} belongs to no group of the 'fips' metadata")
    return meta


def _bad(path, g, why):
    return InputError(f"{path}: key 'fips' group {str(g.get('index', '?'))[:20]}: {why}")


def _is_int(v, lo, hi):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_group_fields(path, g, indices):
    """index (unique), rows, cols, rank of one group entry."""
    if not isinstance(g, dict):
        raise InputError(f"{path}: key 'fips' has a malformed group entry {str(g)[:80]}")
    if not _is_int(g.get("index"), 0, MAX_DIM) or g["index"] in indices:
        raise _bad(path, g, "'index' must be an int >= 0, unique")
    indices.add(g["index"])
    for f in ("rows", "cols", "rank"):
        if not _is_int(g.get(f), 1, MAX_DIM):
            raise _bad(path, g, f"{f!r} must be an int in [1, {MAX_DIM}], got {str(g.get(f))[:20]}")
    if not isinstance(g.get("layers"), list) or not g["layers"] or len(g["layers"]) % 2:
        raise _bad(path, g, "'layers' must be a non-empty list of fc1, fc2 pairs")
    n = len(g["layers"])
    check_memory(n * g["rank"] * g["cols"] * 5, f"{path}: V of fips group {g['index']} "
                 f"({n} x {g['rank']} x {g['cols']})")


def _check_layers(path, g, prefixes, keys):
    """Layer entries: keys of the config's blocks, fc1 then fc2 of each block, each key once."""
    blocks = []
    for j, layer in enumerate(g["layers"]):
        if not (isinstance(layer, dict) and isinstance(layer.get("key"), str)
                and isinstance(layer.get("basis_first"), bool)
                and _is_int(layer.get("block"), 0, 2**31) and _is_int(layer.get("nnz"), 0, 2**62)):
            raise _bad(path, g, f"malformed layer entry {str(layer)[:80]}")
        key, m = layer["key"], _LAYER_KEY.fullmatch(layer["key"])
        if m is None or m.group(1) not in prefixes:
            raise _bad(path, g, f"layer key {key[:60]!r} is not a block MLP of the config")
        if m.group(2) != "12"[j % 2] or (j % 2 and m.group(1) != g["layers"][j - 1]["key"][:-8]):
            raise _bad(path, g, f"layer {j} is {key!r}; layers must be fc1, fc2 of each block in turn")
        if layer["block"] != prefixes[m.group(1)]:
            raise _bad(path, g, f"layer {key!r} says block {layer['block']}, the config has "
                                f"{m.group(1)} at {prefixes[m.group(1)]}")
        if key in keys:
            raise _bad(path, g, f"layer {key!r} is compressed twice")
        keys.add(key)
        blocks.append(layer["block"])
    if "blocks" in g and g["blocks"] != blocks[::2]:
        raise _bad(path, g, f"'blocks' {str(g['blocks'])[:40]} disagrees with its layers {blocks[::2]}")
    return g["layers"]


def _check_orientation(ckpt, g, layer, concat):
    """basis_first: the layer's math weight [in, out] is U V [rows, cols] or (U V)ᵀ (paper §3).

    fc1 reads D and writes F, fc2 the reverse (the widths read off the trained biases); in a
    group U sits on one side, so every fc1 has the same basis_first and every fc2 the other
    (long: fc1 True; short: fc1 False).
    """
    path, key = ckpt.path, layer["key"]
    prefix, fc = key[:-8], key[-3:]
    if f"{key}.weight" in ckpt.tensors:
        raise _bad(path, g, f"the file holds both {key}.weight and its FiPS factors")
    widths = {}
    for name in ("fc1", "fc2"):
        b = ckpt.tensors.get(f"{prefix}.mlp.{name}.bias")
        if b is None or b.ndim != 1 or b.dtype.kind != "f":
            raise InputError(f"{path}: missing or malformed key '{prefix}.mlp.{name}.bias' "
                             "(a 1-D float array)")
        widths[name] = b.shape[0]
    fin, fout = (widths["fc2"], widths["fc1"]) if fc == "fc1" else (widths["fc1"], widths["fc2"])
    rows, cols, bf = g["rows"], g["cols"], layer["basis_first"]
    if (rows, cols) != ((fin, fout) if bf else (fout, fin)):
        raise _bad(path, g, f"layer {key!r} with basis_first {bf} gives a [{rows if bf else cols}, "
                            f"{cols if bf else rows}] weight, its biases need [{fin}, {fout}]")
    fc1_bf = bf if fc == "fc1" else not bf
    first = g["layers"][0]["basis_first"]
    if fc1_bf != first or (concat in ("long", "short") and fc1_bf != (concat == "long")):
        raise _bad(path, g, f"layer {key!r} has basis_first {bf}, inconsistent with the "
                            f"group's shared U (concat {concat!r})")


def _check_group_arrays(ckpt, g, version):
    """U, and mask and values or the condensed arrays, of one group against its metadata;
    returns the keys of the group's arrays."""
    path, i = ckpt.path, g["index"]
    U = _get(ckpt, f"fips.U.{i}")
    if U.ndim != 2 or U.dtype.kind != "f" or U.shape != (g["rows"], g["rank"]):
        raise InputError(f"{path}: key 'fips.U.{i}' is {U.shape} {U.dtype}, expected "
                         f"[{g['rows']}, {g['rank']}] real floats")
    layout = g.get("layout", "bitmask")
    if layout not in ("bitmask", "condensed") or (layout == "condensed" and version < 2):
        raise _bad(path, g, f"'layout' {str(layout)[:20]!r} is not 'bitmask' or (format 2) 'condensed'")
    if layout == "condensed":
        return {f"fips.U.{i}", *cc.check_group(ckpt, g)}
    mask, values = (_get(ckpt, f"fips.{k}.{i}") for k in ("mask", "values"))
    counts = _mask_counts(path, i, mask, len(g["layers"]), g["rank"] * g["cols"])
    if values.ndim != 1 or values.dtype.kind != "f" or values.size != sum(counts):
        raise InputError(f"{path}: key 'fips.values.{i}' is {values.shape} {values.dtype}, "
                         f"expected [{sum(counts)}] real floats (one per set mask bit)")
    for layer, c in zip(g["layers"], counts):
        if layer["nnz"] != c:
            raise InputError(f"{path}: key 'fips' says layer {layer['key']!r} has nnz "
                             f"{layer['nnz']}, its mask has {c}")
        if layer.get("layout", "bitmask") != "bitmask":
            raise InputError(f"{path}: key 'fips' layer {layer['key']!r} is {str(layer['layout'])[:20]!r} "
                             "in a bitmask group")
    return {f"fips.{k}.{i}" for k in ("U", "mask", "values")}


def _get(ckpt, key):
    if key not in ckpt.tensors:
        raise InputError(f"{ckpt.path}: missing key {key!r}")
    return ckpt.tensors[key]


def _mask_counts(path, i, mask, n, per_layer):
    """Set bits of each layer's slice of a packed uint8 (zero padding) or bool mask."""
    total = n * per_layer
    packed = mask.dtype == np.uint8
    want = -(-total // 8) if packed else total
    if mask.ndim != 1 or mask.dtype not in (np.uint8, np.bool_) or mask.size != want:
        raise InputError(f"{path}: key 'fips.mask.{i}' is {mask.shape} {mask.dtype}, expected "
                         f"uint8 [{-(-total // 8)}] (packed bits) or bool [{total}]")
    bits = _mask_bits(mask, total)
    if packed and total % 8 and mask[-1] & ((1 << (8 - total % 8)) - 1):
        raise InputError(f"{path}: key 'fips.mask.{i}' has bits set past its {total} entries")
    return [int(bits[j * per_layer:(j + 1) * per_layer].sum()) for j in range(n)]


def _mask_bits(mask, total):  # uint8 [⌈total/8⌉] or bool [total] -> bool [total]
    return np.unpackbits(mask, count=total).astype(bool) if mask.dtype == np.uint8 else mask


def group_factors(ckpt, g):
    """(U [rows, R], [V_j [R, cols]], [Layer]) of one validated group entry, as float32 NumPy
    (V_j dense, zeros off the mask, from either layout)."""
    U = ckpt.tensors[f"fips.U.{g['index']}"].astype(np.float32)
    layers = [Layer(l["key"], l["block"], l["basis_first"]) for l in g["layers"]]
    if g.get("layout") == "condensed":
        return U, cc.decoded_slices(ckpt, g), layers
    rank, cols, n = g["rank"], g["cols"], len(g["layers"])
    mask = _mask_bits(ckpt.tensors[f"fips.mask.{g['index']}"], n * rank * cols)
    V = np.zeros((n, rank, cols), dtype=np.float32)
    V[mask.reshape(n, rank, cols)] = ckpt.tensors[f"fips.values.{g['index']}"]
    return U, list(V), layers


def group_masks(ckpt, g):
    """[mask_j bool [R, cols]] of one validated group entry, from either layout (bitmask or condensed)."""
    if g.get("layout") == "condensed":
        return [cc.decode(c)[1] for c in cc.group_condensed(ckpt, g)]
    n, rank, cols = len(g["layers"]), g["rank"], g["cols"]
    return list(_mask_bits(ckpt.tensors[f"fips.mask.{g['index']}"], n * rank * cols).reshape(n, rank, cols))


def factored_mlps(ckpt, xp=np, dtype=np.float32, paths=None):
    """{block: (fc1, fc2)} of a compressed checkpoint, each an infer.InferLayer holding the data
    of the inference ``paths`` (None: every path the backend offers; docs/deployment.md §3).
    Condensed groups go to infer.prepare_condensed (no dense V unless a dense path is asked)."""
    from .infer import default_paths, prepare_condensed, prepare_layer
    paths = default_paths(xp) if paths is None else tuple(paths)
    out = {}
    for g in fips_meta(ckpt)["groups"]:
        layers = [Layer(l["key"], l["block"], l["basis_first"]) for l in g["layers"]]
        U = xp.asarray(ckpt.tensors[f"fips.U.{g['index']}"], dtype=dtype)
        if g.get("layout") == "condensed":
            conds = [c._replace(values=xp.asarray(c.values, dtype=dtype), indices=xp.asarray(c.indices),
                                units=xp.asarray(c.units)) for c in cc.group_condensed(ckpt, g)]
            made = [lambda b, c=c, l=l: prepare_condensed(U, c, b, l.basis_first, paths=paths)
                    for c, l in zip(conds, layers)]
        else:
            Vs = group_factors(ckpt, g)[1]
            bits = _mask_bits(ckpt.tensors[f"fips.mask.{g['index']}"], len(layers) * g["rank"] * g["cols"])
            masks = bits.reshape(len(layers), g["rank"], g["cols"])               # [L, R, cols]
            made = [lambda b, V=V, mk=mk, l=l: prepare_layer(U, xp.asarray(V, dtype=dtype), xp.asarray(mk),
                                                             b, l.basis_first, paths=paths)
                    for V, mk, l in zip(Vs, masks, layers)]
        for layer, make in zip(layers, made):
            bias = xp.asarray(ckpt.tensors[f"{layer.key}.bias"], dtype=dtype)
            out.setdefault(layer.block, []).append(make(bias))
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
