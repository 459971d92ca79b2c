"""Hostile inputs (issue 7): nothing wrong is reported as right, nothing exhausts the machine.

One test per failure class, through the CLIs where a user meets it: exit code 2, one 'error:'
line naming the file, key, field or flag, the inputs byte for byte unchanged and the output
folder empty. Hypothesis checks the .npz header validator against NumPy's own writer.
"""
import hashlib
import io
import json
import os
import zipfile

import numpy as np
import pytest
from hypothesis import given, strategies as st

from fips_ref.calib import ActivationStore, acts_key, save_acts
from fips_ref.checkpoint import InputError, json_entry, load_checkpoint, save_npz_atomic
from fips_ref.compress import main as compress_main
from fips_ref.convert import main as convert_main
from fips_ref.decompress import main as decompress_main
from fips_ref.evaluate import main as evaluate_main, topk_hits
from fips_ref.images import list_images
from fips_ref.validate import npz_headers, shape_nbytes

from model_fixtures import make_vit_checkpoint, random_images

FAST = ["--synthetic-samples", "8", "--epochs", "1", "--batch-size", "8", "--quiet"]


# ----------------------------------------------------------------------------- helpers
def digest(folder):
    """{name: sha256} of every file in a folder: inputs must come out untouched."""
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))}


def refused(capsys, main, argv, inputs, out, *needles):
    """Run a CLI on hostile input: exit 2, one line holding every needle, inputs unchanged,
    ``out`` (the folder outputs go to) left empty."""
    before = digest(inputs)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert digest(inputs) == before
    assert os.listdir(out) == []
    return lines[0]


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return str(tmp_path / "in"), str(tmp_path / "out")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """(original Checkpoint, path of its .fips.npz): 4 blocks, D 16, F 64, one group."""
    folder = tmp_path_factory.mktemp("compressed")
    ckpt = make_vit_checkpoint(folder / "vit.npz", depth=4, embed_dim=16, mlp_ratio=4.0)
    out = str(folder / "vit.fips.npz")
    assert compress_main([ckpt.path, "--out", out] + FAST) == 0
    return ckpt, out


def write_test_set(ckpt, path, images=None):
    images = random_images(ckpt, 6) if images is None else images
    np.savez(path, images=images, labels=np.arange(6) % ckpt.config["num_classes"])
    return str(path)


# ----------------------------------------------------------------------------- wrong as right
@pytest.mark.parametrize("where", ["all", "one"])
def test_nan_or_inf_images_are_refused_never_scored(where, dirs, capsys):
    """Before the fix a test set of NaN images scored 100 % top-1 (NaN compares false)."""
    inp, out = dirs
    ckpt = make_vit_checkpoint(os.path.join(inp, "vit.npz"))
    images = random_images(ckpt, 6)
    if where == "all":
        images[:] = np.nan
    else:
        images[3, 0, 1, 2] = np.inf
    data = write_test_set(ckpt, os.path.join(inp, "test.npz"), images)
    refused(capsys, evaluate_main, [ckpt.path, "--data", data, "--json", os.path.join(out, "r.json")],
            inp, out, data, "'images'", "NaN or Inf")


def test_logits_that_overflow_are_refused(dirs, capsys):
    """Finite weights whose logits overflow float32 are an error, not a score."""
    inp, out = dirs
    ckpt = make_vit_checkpoint(os.path.join(inp, "vit.npz"))
    tensors = dict(ckpt.tensors, **{"head.weight": ckpt.tensors["head.weight"] * np.float32(3e38)})
    save_npz_atomic(ckpt.path, {**tensors, "config": json_entry(ckpt.config)})
    data = write_test_set(ckpt, os.path.join(inp, "test.npz"))
    refused(capsys, evaluate_main, [ckpt.path, "--data", data, "--json", os.path.join(out, "r.json")],
            inp, out, "logits", "NaN or Inf")


def test_topk_never_counts_a_row_with_nan_or_inf():
    logits = np.array([[np.nan] * 3, [1.0, np.nan, 0.0], [np.inf, 0.0, 0.0], [0.0, 2.0, 1.0]])
    labels = np.array([0, 0, 0, 1])
    assert topk_hits(logits, labels, 1).tolist() == [False, False, False, True]


def _tamper_mask_float(c, m):
    c["fips.mask.0"] = c["fips.mask.0"].astype(np.float32)


def _tamper_values_int(c, m):
    c["fips.values.0"] = c["fips.values.0"].astype(np.int16)


def _tamper_values_2d(c, m):
    c["fips.values.0"] = np.stack([c["fips.values.0"]] * 2)


def _tamper_padding_bits(c, m):
    """One more mask byte's worth of set bits than the layers own: values still match it."""
    bits = np.unpackbits(c["fips.mask.0"])
    c["fips.mask.0"] = np.packbits(np.r_[bits, np.ones(4, np.uint8)])
    c["fips.values.0"] = np.r_[c["fips.values.0"], np.ones(4, c["fips.values.0"].dtype)]


def _tamper_nnz(c, m):
    m["groups"][0]["layers"][0]["nnz"] += 1
    m["groups"][0]["layers"][1]["nnz"] -= 1


def _tamper_basis_first(c, m):
    m["groups"][0]["layers"][0]["basis_first"] = False


def _tamper_key(c, m):
    m["groups"][0]["layers"][0]["key"] = "blocks.9.mlp.fc1"


def _tamper_block(c, m):
    m["groups"][0]["layers"][0]["block"] = 2


def _tamper_dense_too(c, m):
    c["blocks.0.mlp.fc1.weight"] = np.zeros((64, 16), np.float32)


def _tamper_rank(c, m):
    m["groups"][0]["rank"] = 10**9


def _tamper_stray(c, m):
    c["fips.U.7"] = c["fips.U.0"]


TAMPER = {  # name: (edit of (arrays, metadata), words of the expected message)
    "mask_float": (_tamper_mask_float, "'fips.mask.0'"), "values_int": (_tamper_values_int, "'fips.values.0'"),
    "values_2d": (_tamper_values_2d, "'fips.values.0'"), "padding": (_tamper_padding_bits, "'fips.mask.0'"),
    "nnz": (_tamper_nnz, "nnz"), "basis_first": (_tamper_basis_first, "basis_first"),
    "key": (_tamper_key, "blocks.9.mlp.fc1"), "block": (_tamper_block, "block 2"),
    "dense_too": (_tamper_dense_too, "blocks.0.mlp.fc1.weight"), "rank": (_tamper_rank, "'rank'"),
    "stray": (_tamper_stray, "'fips.U.7'"),
}


@pytest.mark.parametrize("cli", ["decompress", "evaluate", "convert"])
@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_compressed_file_is_refused(case, cli, compressed, dirs, capsys):
    ckpt, path = compressed
    inp, out = dirs
    arrays = dict(np.load(path))
    meta = json.loads(str(arrays["fips"]))
    edit, needle = TAMPER[case]
    edit(arrays, meta)
    arrays["fips"] = json_entry(meta)
    bad = os.path.join(inp, "bad.fips.npz")
    np.savez(bad, **arrays)
    argv = {"decompress": [bad, os.path.join(out, "dense.npz")],
            "evaluate": [bad, "--data", write_test_set(ckpt, os.path.join(inp, "t.npz")),
                         "--json", os.path.join(out, "r.json")],
            "convert": [bad, os.path.join(out, "m.safetensors")]}[cli]
    main = {"decompress": decompress_main, "evaluate": evaluate_main, "convert": convert_main}[cli]
    refused(capsys, main, argv, inp, out, bad, needle)


def test_basis_first_flip_is_caught_when_shapes_cannot_tell(dirs, capsys, tmp_path):
    """With F = D a flipped orientation has the right shape: the group's shared U catches it."""
    inp, out = dirs
    ckpt = make_vit_checkpoint(tmp_path / "sq.npz", depth=4, embed_dim=16, mlp_ratio=1.0)
    comp = str(tmp_path / "sq.fips.npz")
    assert compress_main([ckpt.path, "--out", comp, "--budget", "0.9"] + FAST) == 0
    arrays = dict(np.load(comp))
    meta = json.loads(str(arrays["fips"]))
    for layer in meta["groups"][0]["layers"][2:4]:          # block 1: fc1 and fc2 swapped sides
        layer["basis_first"] = not layer["basis_first"]
    arrays["fips"] = json_entry(meta)
    bad = os.path.join(inp, "bad.fips.npz")
    np.savez(bad, **arrays)
    refused(capsys, decompress_main, [bad, os.path.join(out, "d.npz")], inp, out,
            "blocks.1.mlp.fc1", "basis_first")


# ----------------------------------------------------------------------------- exhaustion
CONFIG_CASES = [("depth", 10**9), ("img_size", 10**5), ("embed_dim", 10**12), ("depth", "4"),
                ("num_classes", -1), ("std", [0.0]), ("mlp_ratio", float("nan"))]


@pytest.mark.parametrize("field, value", CONFIG_CASES)
def test_absurd_config_fields_are_refused_first(field, value, dirs, capsys):
    inp, out = dirs
    ckpt = make_vit_checkpoint(os.path.join(inp, "vit.npz"), depth=4)
    config = dict(ckpt.config, **{field: value})
    save_npz_atomic(ckpt.path, {**ckpt.tensors, "config": json_entry(config)})
    refused(capsys, compress_main, [ckpt.path, "--out", os.path.join(out, "c.npz")] + FAST,
            inp, out, ckpt.path, f"config field {field!r}")


def test_deeply_nested_json_is_refused(dirs, capsys):
    inp, out = dirs
    ckpt = make_vit_checkpoint(os.path.join(inp, "vit.npz"))
    save_npz_atomic(ckpt.path, {**ckpt.tensors, "config": np.array("[" * 100000 + "]" * 100000)})
    refused(capsys, decompress_main, [ckpt.path, os.path.join(out, "d.npz")], inp, out,
            "'config'", "nested")


def _npz_with_header(path, shape, payload=b""):
    """An .npz whose 'images' member claims ``shape`` (float32) but holds ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": tuple(shape)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", buf.getvalue() + payload)
    return str(path)


@pytest.mark.parametrize("shape", [(10**7, 3, 8, 8), (2**62, 4, 8, 8)])
def test_npy_header_larger_than_its_member_is_refused(shape, dirs, capsys):
    """(2**62, 4, 8, 8) float32: the int64 byte count wraps to 0, which an empty member matches."""
    inp, out = dirs
    ckpt = make_vit_checkpoint(os.path.join(inp, "vit.npz"))
    data = _npz_with_header(os.path.join(inp, "t.npz"), shape)
    refused(capsys, evaluate_main, [ckpt.path, "--data", data], inp, out, data, "'images'", "header")


@given(shape=st.lists(st.integers(0, 6), max_size=4),
                  dtype=st.sampled_from(["<f2", "<f4", "<f8", "|u1", "<i8"]),
                  dim=st.integers(0, 3), claim=st.integers(0, 2**64))
def test_npz_header_check_agrees_with_numpy_writer(shape, dtype, dim, claim, tmp_path_factory):
    """Arrays np.savez writes pass; the same member with any other claimed extent is refused."""
    path = tmp_path_factory.mktemp("h") / "a.npz"
    a = np.zeros(shape, dtype)
    np.savez(path, a=a)
    (got_shape, got_dtype, *_), = npz_headers(str(path)).values()
    assert got_shape == a.shape and got_dtype == a.dtype
    assert shape_nbytes(got_shape, got_dtype.itemsize) == a.nbytes
    if not shape:
        return
    forged = list(shape)
    forged[dim % len(shape)] = claim
    if shape_nbytes(forged, a.itemsize) == a.nbytes:
        return                                          # same extent: not a forgery
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": a.dtype.str, "fortran_order": False,
                                               "shape": tuple(forged)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.npy", buf.getvalue() + a.tobytes())
    with pytest.raises(InputError, match="'a'"):
        npz_headers(str(path))


def _st(path, header, data=b""):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
    return str(path)


SAFETENSORS = {   # name: (header, data, message words)
    "overflow": ({"w": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}, b"", "'w'"),
    "nested": (b"{\"a\":" + b"[" * 50000 + b"]" * 50000 + b"}", b"", "nested"),
    "overlap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24), "overlapping"),
    "nan": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            np.array([1.0, np.nan], "<f4").tobytes(), "NaN"),
    "bool_shape": ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "'w'"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS))
def test_hostile_safetensors_are_refused(case, dirs, capsys):
    inp, out = dirs
    header, data, needle = SAFETENSORS[case]
    src = _st(os.path.join(inp, "m.safetensors"), header, data)
    refused(capsys, convert_main, [src, os.path.join(out, "c.npz"), "--timm-name",
                                   "deit_base_patch16_224"], inp, out, src, needle)


@pytest.mark.parametrize("flags, needle", [
    (["--synthetic-samples", str(10**12)], "--synthetic-samples"),
    (["--synthetic-samples", "8", "--epochs", str(10**12)], "--epochs"),
])
def test_runs_larger_than_the_machine_are_refused_before_allocating(flags, needle, dirs, capsys):
    inp, out = dirs
    ckpt = make_vit_checkpoint(os.path.join(inp, "vit.npz"), depth=4)
    refused(capsys, compress_main, [ckpt.path, "--out", os.path.join(out, "c.npz"), "--quiet"] + flags,
            inp, out, needle)


def test_eval_batch_larger_than_memory_is_refused(dirs, capsys, tmp_path):
    inp, out = dirs
    ckpt = make_vit_checkpoint(os.path.join(inp, "vit.npz"))
    (tmp_path / "imgs").mkdir()
    refused(capsys, evaluate_main, [ckpt.path, "--data", str(tmp_path / "imgs"), "--img-size", "8192",
                                    "--batch-size", str(10**6)], inp, out, "--batch-size", "GiB")


# ----------------------------------------------------------------------------- calibration from disk
def _acts_file(path, blocks=4, d=16):
    rng = np.random.default_rng(0)
    save_acts(path, {i: rng.standard_normal((16, 5, d)).astype(np.float32) for i in range(blocks)})
    return str(path)


@pytest.mark.parametrize("max_memory", ["0", "4"])
def test_corrupt_activations_are_caught_in_every_read_mode(max_memory, dirs, capsys):
    """--max-memory 0 reads uncompressed members from disk a batch at a time: the CRC is
    still checked (a flipped byte of data, header intact)."""
    inp, out = dirs
    ckpt = make_vit_checkpoint(os.path.join(inp, "vit.npz"), depth=4)
    acts = _acts_file(os.path.join(inp, "acts.npz"))
    with zipfile.ZipFile(acts) as z:
        info = z.getinfo(acts_key(2) + ".npy")
    raw = bytearray(open(acts, "rb").read())
    raw[info.header_offset + 30 + len(info.filename) + 200] ^= 0x40      # inside the data
    open(acts, "wb").write(bytes(raw))
    refused(capsys, compress_main, [ckpt.path, "--calib-acts", acts, "--max-memory", max_memory,
                                    "--out", os.path.join(out, "c.npz")] + FAST[2:],
            inp, out, acts)


def test_recorded_activations_refuse_nan_and_float16_overflow(tmp_path):
    store = ActivationStore({0: (2, 3, 4)}, max_bytes=0, folder=str(tmp_path))
    try:
        with pytest.raises(InputError, match="float16"):
            store(0, 0, np.full((2, 3, 4), 1e6, np.float32))
        with pytest.raises(InputError, match="NaN"):
            store(0, 0, np.full((2, 3, 4), np.nan, np.float32))
    finally:
        store.cleanup()


# ----------------------------------------------------------------------------- files and folders
def test_image_walk_skips_fifos_and_symlink_loops(tmp_path):
    from PIL import Image
    cls = tmp_path / "data" / "a"
    (cls / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(cls / "x.png")
    os.symlink("..", cls / "sub" / "loop")                  # a -> sub -> loop -> a -> ...
    if hasattr(os, "mkfifo"):
        os.mkfifo(cls / "f.png")                            # opening it would block forever
    paths, labels = list_images(tmp_path / "data")
    assert paths == [str(cls / "x.png")] and labels.tolist() == [0]


def test_a_text_file_is_not_an_npz_not_a_pickle(dirs, capsys):
    inp, out = dirs
    path = os.path.join(inp, "x.npz")
    open(path, "w").write("hello, I am text\n")
    line = refused(capsys, decompress_main, [path, os.path.join(out, "d.npz")], inp, out,
                   path, "not an .npz archive", "not a zip file")
    assert "pickle" not in line


def test_valid_compressed_file_still_loads(compressed):
    """The validators accept what compress writes (and decompress rebuilds every fc weight)."""
    from fips_ref.codec import decompressed_tensors
    ckpt, path = compressed
    dense = decompressed_tensors(load_checkpoint(path))
    for key, a in ckpt.tensors.items():
        assert dense[key].shape == a.shape
