"""Input validation shared by every reader: errors, limits, finiteness, memory, .npz headers, JSON.

Every check here runs *before* the allocation or computation that depends on the value it
checks, and fails with one ``InputError`` line naming the file, key, field or flag
(docs/robustness.md, "Input validation", lists the limits and why).
"""
import json
import math
import os
import zipfile

import numpy as np


class InputError(ValueError):
    """Bad user input (file, key or flag). The message is one line; CLIs exit with code 2."""


# ----------------------------------------------------------------------------- limits
MAX_BLOCKS = 1024          # transformer blocks in a config (DeiT-B 12, Swin-L 24, ViT-g 40)
MAX_SIDE = 8192            # img_size, patch_size, window_size (pixels / patches per side)
MAX_WIDTH = 65536          # embed_dim (ViT-22B: 6144)
MAX_HEADS = 4096           # num_heads per block or stage
MAX_CLASSES = 1_000_000    # num_classes (ImageNet-21k: 21841)
MAX_CHANS = 64             # in_chans
MAX_NDIM = 32              # dimensions of one stored tensor (NumPy's own limit is 64)
MAX_JSON_DEPTH = 64        # nesting of a config / metadata / safetensors header JSON
MAX_STEPS = 10**7          # optimizer steps of one local stage (the authors run 600)


# ----------------------------------------------------------------------------- numbers
def shape_nbytes(shape, itemsize):
    """Bytes of an array of ``shape`` with ``itemsize``-byte entries, in exact Python integers.

    ``np.prod`` of a crafted header shape wraps around in int64 (2**62 · 4 -> 0), which is how a
    tampered header passes a size check; a Python int product cannot overflow.
    """
    return math.prod(int(s) for s in shape) * int(itemsize)


def is_index(value):
    """True for a Python int (not a bool) that is >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def finite_or_error(name, a, chunk=256):
    """``a`` unchanged when every entry is finite; else InputError '{name} contains NaN or Inf'.

    Checks ``chunk`` rows at a time so a DiskArray is never read whole; integer and bool arrays
    are finite by construction. Works on NumPy and CuPy arrays (one bool per chunk to the host).
    """
    kind = np.dtype(a.dtype).kind
    if kind in "biu":
        return a
    if kind != "f":
        raise InputError(f"{name} has dtype {a.dtype}, expected real floating point")
    rows = a.shape[0] if getattr(a, "ndim", 0) else 1
    for s in range(0, rows, chunk):
        part = a[s:s + chunk] if getattr(a, "ndim", 0) else a
        if not bool(np.isfinite(part).all() if isinstance(part, np.ndarray)
                    else _xp_isfinite(part)):
            raise InputError(f"{name} contains NaN or Inf")
    return a


def _xp_isfinite(part):
    from .backend import get_xp
    xp = get_xp(part)
    return xp.isfinite(part).all()


# ----------------------------------------------------------------------------- memory
def physical_memory():
    """Bytes of RAM of this machine (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(nbytes, what, flag=None):
    """Refuse, before allocating, a quantity that needs more memory than the machine has.

    ``what`` names the quantity, ``flag`` the option that lowers it.
    """
    total = physical_memory()
    if total and nbytes > total:
        hint = f"; lower {flag}" if flag else ""
        raise InputError(f"{what} needs {nbytes / 2**30:.3g} GiB, more than this machine's "
                         f"{total / 2**30:.3g} GiB of memory{hint}")


def check_steps(epochs, samples, batch_size):
    """The local stage's run length: epochs · ⌈samples / batch⌉ steps <= MAX_STEPS, and its batch
    order (one int64 permutation of the samples per epoch) within the machine's memory."""
    steps = epochs * -(-samples // batch_size)
    if steps > MAX_STEPS:
        raise InputError(f"--epochs {epochs} with {samples} samples in batches of {batch_size} is "
                         f"{steps} steps, more than {MAX_STEPS}; lower --epochs")
    check_memory(epochs * samples * 8, f"--epochs {epochs}: the batch order of {samples} samples",
                 "--epochs")


# ----------------------------------------------------------------------------- files
def file_kind(path):
    """'npz' (a zip), 'npy', 'empty' or 'other', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    if not head:
        return "empty"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "npz"
    if head == b"\x93NUMPY":
        return "npy"
    return "other"


def require_npz(path):
    """InputError unless ``path`` is a zip archive (what np.savez writes)."""
    kind = file_kind(path)
    if kind != "npz":
        why = {"empty": "the file is empty", "npy": "a single .npy array"}.get(kind, "not a zip file")
        raise InputError(f"{path}: not an .npz archive ({why})")


def read_npy_header(f, where):
    """(shape, dtype, header bytes, fortran order) of the .npy stream ``f``, shape and dtype validated."""
    start = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
    except (ValueError, EOFError, OSError) as e:       # bad magic, header or version
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{where} is not a valid .npy array ({msg})") from None
    if dtype.hasobject:
        raise InputError(f"{where} holds a pickled object array; refusing to load it")
    if len(shape) > MAX_NDIM or not all(is_index(s) for s in shape):
        raise InputError(f"{where} has an invalid shape {shape} in its .npy header")
    return tuple(shape), dtype, f.tell() - start, fortran


def npz_headers(path):
    """{key: (shape, dtype, ZipInfo, header bytes, fortran)} of every .npy member of an .npz,
    each header checked against the member's size before anything is allocated."""
    require_npz(path)
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                where = f"{path}: key {key!r}"
                if not info.filename.endswith(".npy"):
                    raise InputError(f"{where} is not an .npy member")
                with z.open(info) as m:
                    shape, dtype, hlen, fortran = read_npy_header(m, where)
                want = hlen + shape_nbytes(shape, dtype.itemsize)
                if want != info.file_size:
                    raise InputError(f"{where} has shape {list(shape)} {dtype} in its header "
                                     f"({want} bytes) but the member holds {info.file_size} "
                                     "bytes (truncated or tampered)")
                out[key] = (shape, dtype, info, hlen, fortran)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable .npz archive ({msg})") from None
    return out


def verify_member_crc(path, key, chunk=1 << 20):
    """Read one .npz member to its end, so zipfile checks its CRC-32, holding ``chunk`` bytes."""
    try:
        with zipfile.ZipFile(path) as z, z.open(key + ".npy") as m:
            while m.read(chunk):
                pass
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: key {key!r} is corrupt ({msg})") from None


# ----------------------------------------------------------------------------- JSON
def parse_json(text, where):
    """json.loads with a nesting limit (MAX_JSON_DEPTH); InputError naming ``where``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise InputError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, TypeError) as e:
        raise InputError(f"{where} is not valid JSON ({str(e)[:80]})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise InputError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def json_depth(value):
    """Nesting depth of a parsed JSON value (scalars 0), without recursion."""
    depth, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            depth = max(depth, d + 1)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return depth


# ----------------------------------------------------------------------------- config
_SIZE_FIELDS = (  # field, upper limit, kind ('int', 'pair' = int or [h, w], 'ints' = list)
    ("img_size", MAX_SIDE, "pair"), ("patch_size", MAX_SIDE, "pair"),
    ("window_size", MAX_SIDE, "pair"), ("embed_dim", MAX_WIDTH, "int"),
    ("in_chans", MAX_CHANS, "int"), ("num_classes", MAX_CLASSES, "int0"),
)


def validate_config(path, config):
    """Types and sizes of every config field that sizes an allocation or a loop, before any.

    arch 'vit' or 'swin'; depth (ViT, >= 0) or depths (Swin, each > 0), MAX_BLOCKS in all;
    sizes within the limits above; mlp_ratio finite and positive; mean/std finite, std > 0
    (std 0 would turn every image into Inf). Fields a reader does not need may be absent.
    """
    def bad(name, want):
        raise InputError(f"{path}: config field {name!r} must be {want}, got {repr(config[name])[:60]}")

    arch = config.get("arch")
    if arch not in ("vit", "swin"):
        raise InputError(f"{path}: config field 'arch' must be 'vit' or 'swin', got {arch!r}")
    if arch == "vit":
        if not _int_in(config.get("depth"), 0, MAX_BLOCKS):
            if "depth" not in config:
                raise InputError(f"{path}: config field 'depth' is missing")
            bad("depth", f"an int in [0, {MAX_BLOCKS}]")
        _optional(config, "num_heads", lambda v: _int_in(v, 1, MAX_HEADS), bad,
                  f"a positive int <= {MAX_HEADS}")
    else:
        depths = config.get("depths")
        if "depths" not in config:
            raise InputError(f"{path}: config field 'depths' is missing")
        if not (isinstance(depths, list) and 0 < len(depths) <= MAX_BLOCKS
                and all(_int_in(d, 1, MAX_BLOCKS) for d in depths) and sum(depths) <= MAX_BLOCKS):
            bad("depths", f"a list of positive ints with sum <= {MAX_BLOCKS}")
        _optional(config, "num_heads", lambda v: isinstance(v, list) and len(v) <= MAX_BLOCKS
                  and all(_int_in(h, 1, MAX_HEADS) for h in v), bad,
                  f"a list of positive ints <= {MAX_HEADS}")
    for name, limit, kind in _SIZE_FIELDS:
        lo = 0 if kind == "int0" else 1
        ok = ((lambda v: _int_in(v, lo, limit)) if kind != "pair" else
              (lambda v: _int_in(v, 1, limit) or (isinstance(v, list) and len(v) == 2
                                                   and all(_int_in(x, 1, limit) for x in v))))
        want = f"an int in [{lo}, {limit}]" + (" or [H, W]" if kind == "pair" else "")
        _optional(config, name, ok, bad, want)
    _optional(config, "mlp_ratio", lambda v: _number(v) and 0 < v <= 1024, bad,
              "a number in (0, 1024]")
    for name, lo in (("mean", -math.inf), ("std", 0.0)):
        _optional(config, name, lambda v, lo=lo: _numbers(v, lo), bad,
                  "a number or a list of up to 64 finite numbers" + (" > 0" if lo == 0 else ""))
    return config


def _optional(config, name, ok, bad, want):
    if config.get(name) is not None and not ok(config[name]):
        bad(name, want)


def _int_in(v, lo, hi):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(v, lo):
    vals = v if isinstance(v, list) else [v]
    return 0 < len(vals) <= MAX_CHANS and all(_number(x) and x > lo for x in vals)
