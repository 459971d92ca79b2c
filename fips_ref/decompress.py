"""python -m fips_ref.decompress COMPRESSED.npz DENSE.npz — rebuild W = U·V under the original timm keys.

The result is an ordinary checkpoint (PyTorch layout, float32 fc weights, original config) that any
framework loads; its MLPs compute exactly what the compressed factors compute.
"""
import sys

from .checkpoint import json_entry, load_checkpoint, save_npz_atomic
from .cli import OneLineParser, check_paths, parse, run_cli
from .codec import decompressed_tensors


def decompress(src, dst):
    """Write the dense checkpoint of compressed ``src`` to ``dst`` (atomic)."""
    ckpt = load_checkpoint(src)
    tensors = decompressed_tensors(ckpt)        # validates the file first (codec.fips_meta)
    tensors["config"] = json_entry(ckpt.config)
    save_npz_atomic(dst, tensors)
    return tensors


def main(argv=None):
    p = OneLineParser(prog="python -m fips_ref.decompress", description=__doc__.splitlines()[0] + " (file format: docs/compressed-format.md)")
    p.add_argument("compressed", help="a .npz written by python -m fips_ref.compress")
    p.add_argument("dense", help="output .npz with dense fc weights under timm keys")
    args, code = parse(p, argv)
    if args is None:
        return code

    def body():
        check_paths([("COMPRESSED", args.compressed)], [("DENSE", args.dense)])
        decompress(args.compressed, args.dense)
        print(f"wrote {args.dense}")
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
