"""Calibration inputs of the local stage: each block's recorded MLP inputs (the norm2 output).

Three sources, in the order the CLI prefers them:
  --calib-acts FILE.npz   recorded inputs under ``mlp_in.{i}`` ([M, D] or [N, T, D]);
  --calib DIR             images run through the model's forward (fips_ref.models), streamed
                          into memory or, past --max-memory, into float16 .npy files read back
                          a batch at a time (DiskArray);
  neither                 synthetic inputs h = γ·z + β from each block's norm2 affine, z ~ N(0, I).
"""
import contextlib
import os
import shutil
import struct
import zipfile

import numpy as np

from .checkpoint import InputError, load_npz
from .outputs import discard, temp_folder, write_all, write_atomic
from .validate import check_memory, finite_or_error, npz_headers, shape_nbytes, verify_member_crc


def acts_key(i):
    """The key of block i's MLP input in an activations file."""
    return f"mlp_in.{i}"


def load_calib_acts(path, blocks, max_bytes=None):
    """{block index: float array [M, D] or [N, T, D]} from an activations .npz, fully validated.

    Arrays are read into memory, except when they and the targets cached next to them (twice
    their float32 size, as ActivationStore counts) exceed ``max_bytes``: then the members stored
    uncompressed (np.savez, --save-acts) are read from the file a batch at a time (DiskArray);
    compressed members are always read whole.
    """
    keys = [acts_key(b.index) for b in blocks]
    arrays = _npz_members(path, keys) if max_bytes is not None else None
    if arrays is not None and 2 * 4 * sum(a.size for a in arrays.values()) <= max_bytes:
        for a in arrays.values():
            a.close()
        arrays = None
    if arrays is None:
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
        finite_or_error(f"{path}: key {key!r}", a)
        acts[b.index] = a
    if len({a.shape[0] for a in acts.values()}) > 1:
        raise InputError(f"{path}: blocks have different sample counts")
    return acts


def _npz_members(path, keys):
    """{key: DiskArray} over the members ``keys`` of an .npz, or None unless all are stored
    uncompressed (then load_npz reads the file whole). Headers are checked against member
    sizes and each member's CRC-32 is verified (streamed) before it is used from disk."""
    headers = npz_headers(path)
    if any(k not in headers or headers[k][2].compress_type != zipfile.ZIP_STORED for k in keys):
        return None
    out = {}
    try:
        with open(path, "rb") as f:
            for k in keys:
                verify_member_crc(path, k)
                info = headers[k][2]                 # data follow the 30-byte local header
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                out[k] = DiskArray(path, offset=info.header_offset + 30 + name_len + extra_len,
                                   nbytes=info.file_size)
    except (OSError, struct.error) as e:
        for a in out.values():
            a.close()
        raise InputError(f"{path}: cannot read its members ({e})") from None
    except InputError:
        for a in out.values():
            a.close()
        raise
    return out


def synthetic_acts(ckpt, blocks, *, samples, tokens, seed):
    """h = γ ⊙ z + β with z ~ N(0, I), γ, β the block's norm2 affine: [samples, tokens, D] per block."""
    check_memory(2 * samples * tokens * sum(b.d for b in blocks) * 4,
                 f"--synthetic-samples {samples}: synthetic MLP inputs and cached targets",
                 "--synthetic-samples")
    rng = np.random.default_rng(seed)
    acts = {}
    for b in blocks:
        gamma = ckpt.tensors.get(b.key("norm2.weight"), np.ones(b.d, np.float32))
        beta = ckpt.tensors.get(b.key("norm2.bias"), np.zeros(b.d, np.float32))
        z = rng.standard_normal((samples, tokens, b.d), dtype=np.float32)
        acts[b.index] = z * gamma.astype(np.float32) + beta.astype(np.float32)
    return acts


def save_acts(path, acts, chunk=256):
    """Write {block: [N, T, D]} as an uncompressed activations .npz (``mlp_in.{i}``), atomically,
    ``chunk`` rows at a time (DiskArrays are never read whole)."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for i, a in acts.items():
                with z.open(acts_key(i) + ".npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array_header_2_0(m, _header(a.shape, a.dtype))
                    for s in range(0, a.shape[0], chunk):
                        m.write(np.ascontiguousarray(a[s:s + chunk]).tobytes())
    write_atomic(path, write)


def _header(shape, dtype):
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(shape)}


class DiskArray:
    """An array in a .npy file (or an uncompressed .npz member), read and written by rows.

    ``a[idx]`` (an index array, list or slice of the first axis) reads those rows into a new
    array; ``a[start:stop] = rows`` writes them. Unlike np.memmap, nothing stays mapped, so the
    process holds only the rows in hand; the file's pages are the kernel's page cache.
    """

    def __init__(self, path, offset=0, rows=None, writable=False, nbytes=None):
        self.path, self.offset = os.fspath(path), offset
        self._f = open(self.path, "r+b" if writable else "rb", buffering=0)
        self._f.seek(offset)
        try:
            version = np.lib.format.read_magic(self._f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(self._f)
        except ValueError as e:
            self._f.close()
            raise InputError(f"{self.path}: not a .npy array ({e})") from None
        if fortran or dtype.hasobject or not shape or not all(s >= 0 for s in shape):
            self._f.close()
            raise InputError(f"{self.path}: expected a C-ordered numeric array with rows")
        self.data_offset = self._f.tell()
        have = (os.path.getsize(self.path) - offset) if nbytes is None else nbytes
        if self.data_offset - offset + shape_nbytes(shape, dtype.itemsize) > have:
            self._f.close()
            raise InputError(f"{self.path}: array header says {list(shape)} {dtype}, more than "
                             f"the {have} bytes stored (truncated or tampered)")
        self.shape = (shape[0] if rows is None else min(rows, shape[0]),) + tuple(shape[1:])
        self.dtype = dtype
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize

    @classmethod
    def create(cls, path, shape, dtype):
        """A new .npy file of ``shape`` and ``dtype`` (contents undefined until written)."""
        with open(path, "xb") as f:
            np.lib.format.write_array_header_2_0(f, _header(shape, dtype))
            f.truncate(f.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return cls(path, writable=True)

    def head(self, n):
        """The first n rows, as a read-only DiskArray over the same file."""
        return DiskArray(self.path, offset=self.offset, rows=n)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):  # rows -> [len(idx), ...]
        if isinstance(idx, slice):
            idx = range(*idx.indices(self.shape[0]))
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: row index out of range 0..{self.shape[0] - 1}")
        out = np.empty((idx.size,) + self.shape[1:], self.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        j = 0
        while j < idx.size:                          # one read per run of consecutive rows
            k = j + 1
            while k < idx.size and idx[k] == idx[k - 1] + 1:
                k += 1
            self._f.seek(self.data_offset + int(idx[j]) * self.row_bytes)
            want = (k - j) * self.row_bytes
            if self._f.readinto(buf[j * self.row_bytes:k * self.row_bytes]) != want:
                raise InputError(f"{self.path}: file is truncated")
            j = k
        return out

    def __setitem__(self, idx, rows):
        start, stop, step = idx.indices(self.shape[0])
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if step != 1 or rows.shape != (stop - start,) + self.shape[1:]:
            raise ValueError(f"DiskArray: cannot write rows of shape {rows.shape} to [{start}:{stop}]")
        self._f.seek(self.data_offset + start * self.row_bytes)
        write_all(self._f.fileno(), rows)            # every byte, or OSError (e.g. disk full)

    def close(self):
        self._f.close()


class ActivationStore:
    """Receives MLP inputs batch by batch; keeps them in RAM (float32) or on disk (float16).

    ``mode`` is 'memory' when the activations *and* the targets the local stage caches next to
    them (2 · N·T·D·4 bytes summed over blocks) fit in ``max_bytes``, otherwise 'disk': one
    float16 DiskArray per block in a new folder under ``folder`` (the local stage then
    recomputes the targets every step instead of caching them).
    """

    def __init__(self, shapes, max_bytes, folder=None):
        total = sum(shape_nbytes(s, 4) for s in shapes.values())
        self.mode = "memory" if 2 * total <= max_bytes else "disk"
        self.folder, self.where = None, os.path.abspath(folder or ".")
        check_memory(2 * total if self.mode == "memory" else 0,
                     "calibration activations and cached targets", "--max-memory")
        if self.mode == "disk":
            free = shutil.disk_usage(self.where).free
            if total // 2 > free:
                raise InputError(f"calibration activations need {total / 2**31:.3g} GiB of disk "
                                 f"in {self.where}, which has {free / 2**30:.3g} GiB free; "
                                 "lower --calib-images")
        if self.mode == "memory":
            self.arrays = {i: np.empty(s, np.float32) for i, s in shapes.items()}
        else:                                          # registered: removed on any abnormal exit
            self.arrays = {}
            with self._failures_named():
                self.folder = temp_folder(self.where, "fips-acts-")
                for i, s in shapes.items():
                    self.arrays[i] = DiskArray.create(os.path.join(self.folder, f"{acts_key(i)}.npy"),
                                                      s, np.float16)
        self.total_bytes = total if self.mode == "memory" else total // 2

    @contextlib.contextmanager
    def _failures_named(self):
        """Any failure deletes the store; an OSError is re-raised naming the user's folder (the
        folder of --out), not the hidden store."""
        try:
            yield
        except OSError as e:
            self.cleanup()
            raise OSError(e.errno, f"cannot store calibration activations here "
                                   f"({e.strerror or e})", self.where) from None
        except BaseException:
            self.cleanup()
            raise

    def __call__(self, block, start, h):  # h [b, T, D]
        """Callback for models.forward(on_mlp_input=...); refuses NaN/Inf, and on disk values
        float16 cannot hold (they would turn into Inf)."""
        where = f"the MLP input of block {block} on calibration images {start}..{start + len(h) - 1}"
        finite_or_error(where, h)
        if self.mode == "memory":
            self.arrays[block][start:start + h.shape[0]] = h
            return
        if h.size and float(np.abs(h).max()) > float(np.finfo(np.float16).max):
            raise InputError(f"{where} exceeds float16's range (stored on disk as float16); "
                             "raise --max-memory to keep it in float32")
        with self._failures_named():
            self.arrays[block][start:start + h.shape[0]] = h

    def finish(self, n):
        """The first n samples of every block: {block: array or DiskArray}."""
        return {i: a[:n] if self.mode == "memory" else a.head(n) for i, a in self.arrays.items()}

    def cleanup(self):
        """Delete the disk files (if any); safe to call twice."""
        if self.folder:
            for a in self.arrays.values():
                a.close()
            discard(self.folder)
            self.folder = None
