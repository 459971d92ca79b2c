"""Calibration inputs of the local stage: each block's recorded MLP inputs (the norm2 output).

Three sources, in the order the CLI prefers them:
  --calib-acts FILE.npz   recorded inputs under ``mlp_in.{i}`` ([M, D] or [N, T, D]);
  --calib DIR             images run through the model's forward (fips_ref.models), streamed
                          into memory or, past --max-memory, into float16 memory-mapped .npy files;
  neither                 synthetic inputs h = γ·z + β from each block's norm2 affine, z ~ N(0, I).
"""
import os
import sys
import tempfile

import numpy as np

from .checkpoint import InputError, load_npz, save_npz_atomic


def acts_key(i):
    """The key of block i's MLP input in an activations file."""
    return f"mlp_in.{i}"


def load_calib_acts(path, blocks):
    """{block index: float array [M, D] or [N, T, D]} from an activations .npz, fully validated."""
    arrays = load_npz(path, "activations file")
    acts = {}
    for b in blocks:
        key = acts_key(b.index)
        if key not in arrays:
            raise InputError(f"{path}: missing key {key!r} (MLP input of block {b.index})")
        a = arrays[key]
        if a.ndim not in (2, 3) or a.shape[-1] != b.d or a.dtype.kind != "f":
            raise InputError(f"{path}: key {key!r} has shape {a.shape} and dtype {a.dtype}; "
                             f"expected floats [M, {b.d}] or [N, T, {b.d}]")
        if not np.isfinite(a).all():
            raise InputError(f"{path}: key {key!r} contains NaN or Inf")
        acts[b.index] = a
    if len({a.shape[0] for a in acts.values()}) > 1:
        raise InputError(f"{path}: blocks have different sample counts")
    return acts


def synthetic_acts(ckpt, blocks, *, samples, tokens, seed):
    """h = γ ⊙ z + β with z ~ N(0, I), γ, β the block's norm2 affine: [samples, tokens, D] per block."""
    rng = np.random.default_rng(seed)
    acts = {}
    for b in blocks:
        gamma = ckpt.tensors.get(b.key("norm2.weight"), np.ones(b.d, np.float32))
        beta = ckpt.tensors.get(b.key("norm2.bias"), np.zeros(b.d, np.float32))
        z = rng.standard_normal((samples, tokens, b.d), dtype=np.float32)
        acts[b.index] = z * gamma.astype(np.float32) + beta.astype(np.float32)
    return acts


def save_acts(path, acts):
    """Write {block: [N, T, D]} as an activations .npz (``mlp_in.{i}``), atomically."""
    save_npz_atomic(path, {acts_key(i): np.asarray(a) for i, a in acts.items()})


class ActivationStore:
    """Receives MLP inputs batch by batch; keeps them in RAM (float32) or on disk (float16 memmap).

    ``mode`` is 'memory' when ``n·T·D·4`` bytes summed over blocks fit in ``max_bytes``,
    otherwise 'disk': one ``np.lib.format.open_memmap`` .npy per block in ``folder``.
    """

    def __init__(self, shapes, max_bytes, folder=None):
        total = sum(int(np.prod(s)) * 4 for s in shapes.values())
        self.mode = "memory" if total <= max_bytes else "disk"
        self.folder = None
        if self.mode == "memory":
            self.arrays = {i: np.empty(s, np.float32) for i, s in shapes.items()}
        else:
            self.folder = tempfile.mkdtemp(prefix="fips-acts-", dir=folder)
            self.arrays = {i: np.lib.format.open_memmap(os.path.join(self.folder, f"mlp_in.{i}.npy"),
                                                        mode="w+", dtype=np.float16, shape=s)
                           for i, s in shapes.items()}
        self.total_bytes = total if self.mode == "memory" else total // 2

    def __call__(self, block, start, h):  # h [b, T, D]
        """Callback for models.forward(on_mlp_input=...)."""
        self.arrays[block][start:start + h.shape[0]] = h

    def finish(self):
        """Flush disk arrays and reopen them read-only; returns {block: array}."""
        if self.mode == "memory":
            return self.arrays
        for a in self.arrays.values():
            a.flush()
        return {i: np.load(os.path.join(self.folder, f"mlp_in.{i}.npy"), mmap_mode="r")
                for i in self.arrays}

    def cleanup(self):
        """Delete the disk files (if any)."""
        if self.folder:
            for name in os.listdir(self.folder):
                os.unlink(os.path.join(self.folder, name))
            os.rmdir(self.folder)
            self.folder = None


def warn(msg):
    """One line on stderr."""
    print(msg, file=sys.stderr)
