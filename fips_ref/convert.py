"""Convert timm weights to a fips_ref checkpoint (.npz) and back, with NumPy alone.

    python -m fips_ref.convert model.safetensors deit_b.npz --timm-name deit_base_patch16_224
    python -m fips_ref.convert deit_b.fips.npz model.safetensors   # compressed -> dense timm

The direction follows the extensions: .safetensors / .pth / .pt / .bin -> .npz, or
.npz -> .safetensors.

safetensors layout (huggingface/safetensors README): 8-byte little-endian unsigned header
length n; n bytes of UTF-8 JSON {key: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}, possibly padded with trailing spaces; then the raw little-endian
bytes, offsets relative to the first byte after the header. torch is imported only to read a
.pth/.pt file.
"""
import json
import os
import re
import sys

import numpy as np

from .checkpoint import InputError, json_entry, load_checkpoint, save_npz_atomic, write_atomic
from .cli import OneLineParser, check_paths, parse, ranged, run_cli
from .timm_configs import expected_shapes, is_dropped_buffer, timm_config
from .validate import MAX_NDIM, check_memory, finite_or_error, is_index, parse_json, shape_nbytes

# safetensors dtype -> little-endian NumPy dtype it is read as (BF16 as raw uint16).
READ_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
HOW_TO_GET_SAFETENSORS = ("download model.safetensors from the model's timm/<name> repository on "
                          "the Hugging Face Hub, or install torch to read .pth files")


def bf16_to_f32(bits):  # uint16 [...] -> float32 [...]
    """bfloat16 bit patterns -> float32 (the upper 16 bits of a float32)."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def read_safetensors_header(path):
    """(header dict, byte offset of the data section, data section size) of a safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InputError(f"{path}: truncated safetensors header ({size} bytes, need 8 "
                             "for its length)")
        n = int.from_bytes(prefix, "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise InputError(f"{path}: safetensors header length {n} exceeds the file size "
                             f"({size} bytes)")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: safetensors header is not UTF-8 ({e})") from None
    header = parse_json(text, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n, size - 8 - n


def _entry(path, key, info, data_size):
    """Validate one header entry; returns (dtype name, shape tuple, begin, end)."""
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = len(shape) <= MAX_NDIM and all(is_index(v) for v in (*shape, begin, end))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{path}: key {key!r} has a malformed safetensors header entry "
                         "(dtype, shape of ints >= 0, data_offsets [begin, end])")
    if not isinstance(dtype, str) or dtype not in READ_DTYPES:
        raise InputError(f"{path}: key {key!r} has unsupported dtype {str(dtype)[:20]!r} "
                         f"(supported: {', '.join(FLOAT_DTYPES)})")
    nbytes = shape_nbytes(shape, np.dtype(READ_DTYPES[dtype]).itemsize)   # exact: no int64 wrap
    if end - begin != nbytes or end > data_size:
        raise InputError(f"{path}: key {key!r} has data_offsets [{begin}, {end}] that do not fit "
                         f"shape {list(shape)} {dtype} in the {data_size}-byte data section")
    return dtype, shape, begin, end


def read_safetensors(path, *, skip=is_dropped_buffer):
    """(tensors {key: float32 array}, metadata dict) of a safetensors file.

    Float dtypes (F32, F16, BF16, F64) are converted to float32. Keys for which ``skip(key)``
    is true (non-persistent buffers) are not read; any other non-float tensor is an error.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    header, start, data_size = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: safetensors '__metadata__' is not a JSON object")
    entries = {key: _entry(path, key, info, data_size) for key, info in header.items()
               if not skip(key)}
    _check_layout(path, entries)
    tensors = {}
    with open(path, "rb") as f:
        for key, (dtype, shape, begin, end) in entries.items():
            if dtype not in FLOAT_DTYPES:
                raise InputError(f"{path}: key {key!r} has unsupported dtype {dtype!r} for a "
                                 f"weight (supported: {', '.join(FLOAT_DTYPES)})")
            f.seek(start + begin)
            raw = np.frombuffer(f.read(end - begin), dtype=READ_DTYPES[dtype]).reshape(shape)
            tensors[key] = bf16_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32)
            finite_or_error(f"{path}: key {key!r}", tensors[key])
    return tensors, metadata


def _check_layout(path, entries):
    """Tensors' byte ranges must not overlap (a tampered header could point many keys at the same
    bytes), and their float32 copies must fit in memory, before any is read."""
    ranges = sorted((b, e, k) for k, (_, _, b, e) in entries.items() if e > b)
    for (_, e0, k0), (b1, _, k1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise InputError(f"{path}: keys {k0!r} and {k1!r} have overlapping data_offsets")
    check_memory(sum(shape_nbytes(shape, 4) for _, shape, _, _ in entries.values()),
                 f"{path}: its tensors as float32")


def safetensors_header(tensors, metadata=None):
    """Header bytes (length prefix + JSON padded with spaces to a multiple of 8) for float32."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key in sorted(tensors):
        nbytes = tensors[key].size * 4
        header[key] = {"dtype": "F32", "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path, tensors, metadata=None):
    """Write {key: array} as float32 little-endian safetensors, atomically."""
    tensors = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in tensors.items()}

    def write(f):
        f.write(safetensors_header(tensors, metadata))
        for key in sorted(tensors):
            f.write(tensors[key].tobytes())

    write_atomic(path, write)


def load_torch_state(path):
    """{key: float32 array} of a torch .pth/.pt state_dict (torch imported here only)."""
    try:
        import torch
    except ImportError:
        raise InputError(f"{path}: reading .pth/.pt needs torch, which is not installed; "
                         f"{HOW_TO_GET_SAFETENSORS}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, corrupt zip, not a torch file...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: torch.load(weights_only=True) failed ({msg})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise InputError(f"{path}: does not hold a state_dict")
    out = {}
    for key, value in state.items():
        if is_dropped_buffer(key):
            continue
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise InputError(f"{path}: key {key!r} is not a floating-point tensor")
        out[key] = finite_or_error(f"{path}: key {key!r}",
                                   value.detach().to(torch.float32).cpu().numpy())
    return out


def _strip_prefix(state, prefix="module."):
    """Drop a DistributedDataParallel 'module.' prefix present on every key."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def remap_legacy_swin(state):
    """Original Swin checkpoints: downsample at the END of stage s -> timm's start of s + 1.

    Mirrors timm ``swin_transformer.checkpoint_filter_fn`` (also ``head.`` -> ``head.fc.``).
    """
    if "layers.0.downsample.reduction.weight" not in state:
        return state
    out = {}
    for k, v in state.items():
        k = re.sub(r"layers\.(\d+)\.downsample",
                   lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        out[k.replace("head.", "head.fc.") if k.startswith("head.") else k] = v
    return out


def check_shapes(source, tensors, config):
    """Every expected key present with its shape, and no unexpected key (InputError naming it).

    The same rule on every path (docs/evaluate-and-convert.md "Keys outside the timm list"): the
    non-persistent buffers are dropped before this check, any other unknown key is refused.
    """
    want = expected_shapes(config, tensors)
    name = config.get("timm_name", config["arch"])
    for key, shape in want.items():
        if key not in tensors:
            raise InputError(f"{source}: missing key {key!r} (expected shape {list(shape)})")
        if tuple(tensors[key].shape) != tuple(shape):
            raise InputError(f"{source}: key {key!r} has shape {list(tensors[key].shape)}, "
                             f"expected {list(shape)} for {name}")
    for key in tensors:
        if key not in want:
            raise InputError(f"{source}: unexpected key {key!r} for {name}")


def read_weights(path):
    """(state {key: float32}, metadata) from a .safetensors or torch file."""
    if path.lower().endswith(".safetensors"):
        return read_safetensors(path)
    return load_torch_state(path), {}


def to_checkpoint(src, dst, *, timm_name=None, num_classes=None):
    """timm weights (src) -> checkpoint .npz (dst); returns the config written."""
    state, metadata = read_weights(src)
    timm_name = timm_name or metadata.get("timm_name")
    if not timm_name:
        raise InputError(f"{src}: --timm-name is required (e.g. deit_base_patch16_224)")
    try:
        config = timm_config(timm_name, num_classes=num_classes)
    except InputError as e:
        raise InputError(f"--timm-name: {e}") from None
    state = _strip_prefix(state)
    if config["arch"] == "swin":
        state = remap_legacy_swin(state)
    check_shapes(src, state, config)
    save_npz_atomic(dst, {**state, "config": json_entry(config)})
    return config


def to_safetensors(src, dst):
    """Checkpoint .npz (original or FiPS-compressed) -> timm-named float32 safetensors."""
    ckpt = load_checkpoint(src)
    if "fips" in ckpt.extra:
        from .codec import decompressed_tensors
        tensors = {k: v for k, v in decompressed_tensors(ckpt).items()   # fc weights rebuilt;
                   if not k.startswith("fips.")}                        # the factors stay behind
    else:
        tensors = dict(ckpt.tensors)
    tensors = {k: v for k, v in tensors.items() if not is_dropped_buffer(k)}   # as on read
    for key, value in tensors.items():
        if value.dtype.kind != "f":
            raise InputError(f"{src}: key {key!r} has dtype {value.dtype}, expected floating point")
    check_shapes(src, tensors, ckpt.config)
    metadata = {"format": "pt"}
    if ckpt.config.get("timm_name"):
        metadata["timm_name"] = ckpt.config["timm_name"]
    write_safetensors(dst, tensors, metadata)
    return sorted(tensors)


def build_parser():
    """The argparse parser of ``python -m fips_ref.convert``."""
    p = OneLineParser(
        prog="python -m fips_ref.convert",
        description="timm .safetensors/.pth -> checkpoint .npz (docs/checkpoint-format.md), or .npz -> .safetensors (docs/evaluate-and-convert.md). "
                    "Example: python -m fips_ref.convert model.safetensors deit_b.npz "
                    "--timm-name deit_base_patch16_224")
    p.add_argument("input",
                   help=".safetensors, .pth, .pt or .bin (timm weights); or a checkpoint .npz")
    p.add_argument("output", help=".npz (from timm weights) or .safetensors (from a checkpoint)")
    p.add_argument("--timm-name", help="timm model name (fips_ref.timm_configs.TIMM_CONFIGS)")
    p.add_argument("--num-classes", type=ranged(0, 10**9, kind=int), default=None,
                   help="classifier size when it differs from the timm default (1000)")
    return p


def run(args):
    """Convert as the parsed ``args`` say; returns a one-line summary."""
    src, dst = args.input, args.output
    if not os.path.isfile(src):
        raise InputError(f"{src}: no such file")
    check_paths([("INPUT", src)], [("OUTPUT", dst)])
    s, d = src.lower(), dst.lower()
    if (s.endswith(".safetensors") or s.endswith(TORCH_SUFFIXES)) and d.endswith(".npz"):
        config = to_checkpoint(src, dst, timm_name=args.timm_name, num_classes=args.num_classes)
        return f"wrote {dst} ({config['timm_name']}, {len(expected_shapes(config))} tensors)"
    if s.endswith(".npz") and d.endswith(".safetensors"):
        keys = to_safetensors(src, dst)
        return f"wrote {dst} ({len(keys)} tensors, float32)"
    raise InputError(f"{src} -> {dst}: cannot tell the direction; use .safetensors/.pth/.pt/.bin "
                     f"-> .npz or .npz -> .safetensors")


def main(argv=None):
    """CLI entry point; returns the exit code (2 for bad input, with one 'error:' line)."""
    args, code = parse(build_parser(), argv)
    if args is None:
        return code

    def body():
        print(run(args))
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
