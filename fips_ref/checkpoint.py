"""Checkpoint files: safe .npz loading, config parsing, MLP discovery (writes: fips_ref.outputs).

A checkpoint is one .npz holding timm state_dict keys in PyTorch layout plus a JSON
``config`` entry (see docs/checkpoint-format.md). Every problem with a file is raised as
``InputError`` with a one-line message naming the file and the key; the CLIs turn it into
exit code 2.
"""
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from .outputs import save_json_atomic, save_npz_atomic, write_atomic  # noqa: F401 (re-exported)
from .validate import (InputError, check_memory, finite_or_error, npz_headers, parse_json,  # noqa: F401
                       shape_nbytes, validate_config)




def error_line(e, path=""):
    """The CLIs' one 'error: ...' line for an InputError, or an OSError of a file that cannot be
    read or written (named by the error, else ``path``)."""
    if isinstance(e, OSError):
        return f"error: {e.filename or path}: {e.strerror or e}"
    return f"error: {e}"


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors in PyTorch layout under timm keys, and the parsed config."""
    path: str
    config: dict
    tensors: dict = field(repr=False)  # key -> np.ndarray
    extra: dict = field(default_factory=dict, repr=False)  # non-tensor entries (e.g. 'fips')


@dataclass(frozen=True)
class MLPBlock:
    """Where one block's MLP lives. ``index`` is the global block index in forward order."""
    index: int
    prefix: str       # e.g. 'blocks.3' or 'layers.2.blocks.5'
    stage: int        # Swin stage (0 for ViT)
    d: int            # model width of the block (fc1 input)
    hidden: int       # MLP hidden width F (fc1 output)

    def key(self, name):
        """Full timm key of a tensor of this block, e.g. key('mlp.fc1.weight')."""
        return f"{self.prefix}.{name}"


def load_npz(path, what="file"):
    """Load every array of an .npz eagerly, refusing pickles; raise InputError naming the file.

    Every member's .npy header is checked against the member's size, and their total against
    the machine's memory, before anything is allocated (validate.npz_headers); zipfile checks
    each member's CRC-32 as it is read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such {what}")
    headers = npz_headers(path)
    check_memory(sum(shape_nbytes(h[0], h[1].itemsize) for h in headers.values()),
                 f"{path}: reading its arrays")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for k in z.files:
                try:
                    out[k] = z[k]
                except ValueError as e:
                    raise InputError(f"{path}: key {k!r} cannot be read ({e})") from None
            return out
    except InputError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable .npz archive ({msg})") from None


def parse_json_entry(path, arrays, key):
    """Parse the 0-d string array ``arrays[key]`` as a JSON object (nesting limited)."""
    if key not in arrays:
        raise InputError(f"{path}: missing key {key!r}")
    a = arrays[key]
    if a.ndim != 0 or a.dtype.kind not in "US":
        raise InputError(f"{path}: key {key!r} is not a JSON string (0-d str array), "
                         f"got shape {a.shape} {a.dtype}")
    value = parse_json(str(a.item()), f"{path}: key {key!r}")
    if not isinstance(value, dict):
        raise InputError(f"{path}: key {key!r} is not a JSON object")
    return value


def load_checkpoint(path):
    """Load and validate a checkpoint (config + finite tensors); see docs/checkpoint-format.md."""
    arrays = load_npz(path, "checkpoint")
    config = validate_config(path, parse_json_entry(path, arrays, "config"))
    extra = {k: arrays.pop(k) for k in ("config", "fips") if k in arrays}
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise InputError(f"{path}: key {k!r} has dtype {a.dtype}, expected real numbers")
        finite_or_error(f"{path}: key {k!r}", a)
    return Checkpoint(path=os.fspath(path), config=config, tensors=arrays, extra=extra)


def block_prefixes(config):
    """[(prefix, stage)] of every block in forward order, from the config (ViT or Swin)."""
    if config["arch"] == "vit":
        return [(f"blocks.{i}", 0) for i in range(config["depth"])]
    return [(f"layers.{s}.blocks.{j}", s)
            for s, n in enumerate(config["depths"]) for j in range(n)]


def find_mlp_blocks(ckpt):
    """Every block's MLP, in forward order, with shapes checked: fc1 [F, D], fc2 [D, F]."""
    blocks = []
    for index, (prefix, stage) in enumerate(block_prefixes(ckpt.config)):
        w1 = _tensor(ckpt, f"{prefix}.mlp.fc1.weight", ndim=2)
        hidden, d = w1.shape
        _tensor(ckpt, f"{prefix}.mlp.fc1.bias", shape=(hidden,))
        _tensor(ckpt, f"{prefix}.mlp.fc2.weight", shape=(d, hidden))
        _tensor(ckpt, f"{prefix}.mlp.fc2.bias", shape=(d,))
        for name in ("ls2.gamma", "norm2.weight", "norm2.bias"):       # read by the local stage
            if f"{prefix}.{name}" in ckpt.tensors:
                _tensor(ckpt, f"{prefix}.{name}", shape=(d,))
        blocks.append(MLPBlock(index, prefix, stage, d, hidden))
    _check_no_stray_mlp_keys(ckpt, blocks)
    return blocks


def _tensor(ckpt, key, shape=None, ndim=None):
    if key not in ckpt.tensors:
        raise InputError(f"{ckpt.path}: missing key {key!r}")
    a = ckpt.tensors[key]
    if (shape is not None and a.shape != shape) or (ndim is not None and a.ndim != ndim):
        want = shape if shape is not None else f"{ndim} dimensions"
        raise InputError(f"{ckpt.path}: key {key!r} has shape {a.shape}, expected {want}")
    if a.dtype.kind != "f":
        raise InputError(f"{ckpt.path}: key {key!r} has dtype {a.dtype}, expected floating point")
    return a


_BLOCK_KEY = re.compile(r"^(blocks\.\d+|layers\.\d+\.blocks\.\d+)\.")
_STAGE_KEY = re.compile(r"^layers\.(\d+)\.")


def refuse_undeclared_blocks(path, keys, prefixes):
    """A key of a block (``blocks.i`` / ``layers.s.blocks.j``) or Swin stage that is not among
    the config's block ``prefixes`` means config and tensors disagree."""
    prefixes = set(prefixes)
    stages = {p.split(".")[1] for p in prefixes if p.startswith("layers.")}
    for key in keys:
        m, st = _BLOCK_KEY.match(key), _STAGE_KEY.match(key)
        if (m and m.group(1) not in prefixes) or (st and st.group(1) not in stages):
            raise InputError(f"{path}: key {key!r} belongs to no block of the config "
                             f"({len(prefixes)} blocks; check depth/depths)")


def _check_no_stray_mlp_keys(ckpt, blocks):
    """A transformer block's MLP outside the config's blocks means config and tensors disagree.

    Other MLPs (e.g. timm's ``attn_pool.mlp``) are not block MLPs: they pass through untouched.
    """
    mlp_keys = [k for k in ckpt.tensors if re.search(r"\.mlp\.fc[12]\.(weight|bias)$", k)]
    refuse_undeclared_blocks(ckpt.path, mlp_keys, [b.prefix for b in blocks])


def json_entry(obj):
    """A JSON object as the 0-d string array stored under 'config' / 'fips'."""
    return np.array(json.dumps(obj))
