"""timm config table, safetensors reading/writing and the convert CLI (fips_ref.convert)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from fips_ref import convert
from fips_ref.checkpoint import json_entry, load_checkpoint, save_npz_atomic
from fips_ref.timm_configs import TIMM_CONFIGS, expected_shapes

from model_fixtures import make_swin_checkpoint, make_vit_checkpoint

# Parameter counts of timm.create_model(name).state_dict() (timm 1.0; DeiT-B 86.6M etc. in
# timm's results tables), checked once against timm itself when this table was written.
TIMM_PARAM_COUNTS = {
    "deit_tiny_patch16_224": 5_717_416, "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656, "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432, "deit_base_distilled_patch16_224": 87_338_192,
    "vit_base_patch16_224": 86_567_656, "vit_large_patch16_224": 304_326_632,
    "swin_tiny_patch4_window7_224": 28_288_354, "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224, "swin_large_patch4_window7_224": 196_532_476,
}

ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "BF16": "<u2", "U8": "u1"}


def write_st(path, entries, *, metadata=None, pad=0):
    """Independent minimal safetensors writer: entries {key: (dtype name, array)}."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for key, (dtype, a) in entries.items():
        raw = np.ascontiguousarray(a, dtype=ST_DTYPES[dtype]).tobytes()
        header[key] = {"dtype": dtype, "shape": list(np.shape(a)), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode() + b" " * pad
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


def bf16_exact(a):  # float32 values whose low 16 bits are zero: exactly representable in bf16
    return (np.asarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


@pytest.fixture
def tiny_vit(monkeypatch):
    """A tiny ViT registered as timm name 'tiny_vit_test'; returns its Checkpoint."""
    ckpt = make_vit_checkpoint(img_size=8, patch_size=4, embed_dim=8, depth=2, num_classes=5)
    monkeypatch.setitem(TIMM_CONFIGS, "tiny_vit_test", {**ckpt.config, "timm_name": "tiny_vit_test"})
    return ckpt


@pytest.fixture
def tiny_swin(monkeypatch):
    ckpt = make_swin_checkpoint(img_size=16, patch_size=2, embed_dim=8, depths=(2, 2),
                                num_heads=(1, 2), window_size=4, num_classes=5)
    monkeypatch.setitem(TIMM_CONFIGS, "tiny_swin_test", {**ckpt.config, "timm_name": "tiny_swin_test"})
    return ckpt


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of convert.main in-process."""
    try:
        code = convert.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code, err, *names):
    """Exit 2 with one 'error:' line naming each of ``names``."""
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for name in names:
        assert str(name) in err, (name, err)


# ---------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_timm_configs_match_timm_parameter_counts(name):
    shapes = expected_shapes(TIMM_CONFIGS[name])
    assert sum(int(np.prod(s)) for s in shapes.values()) == TIMM_PARAM_COUNTS[name]
    assert TIMM_CONFIGS[name]["timm_name"] == name


def test_expected_shapes_details():
    deit = expected_shapes(TIMM_CONFIGS["deit_base_distilled_patch16_224"])
    assert deit["pos_embed"] == (1, 2 + 196, 768) and deit["head_dist.weight"] == (1000, 768)
    assert deit["blocks.11.mlp.fc1.weight"] == (3072, 768)
    swin = expected_shapes(TIMM_CONFIGS["swin_large_patch4_window7_224"])
    assert "layers.0.downsample.norm.weight" not in swin
    assert swin["layers.1.downsample.reduction.weight"] == (384, 768)
    assert "layers.1.downsample.reduction.bias" not in swin
    assert swin["layers.3.blocks.1.attn.relative_position_bias_table"] == (169, 48)
    assert swin["head.fc.weight"] == (1000, 1536) and swin["patch_embed.norm.weight"] == (192,)


@pytest.mark.parametrize("make", [
    lambda: make_vit_checkpoint(distilled=True, qkv_bias=False),
    lambda: make_swin_checkpoint(img_size=32, patch_size=4, depths=(2, 2, 2), num_heads=(1, 2, 2),
                                 window_size=7),   # windows clamped to 8 -> 7, 4, 2
])
def test_expected_shapes_agree_with_independent_fixtures(make):
    ckpt = make()
    assert expected_shapes(ckpt.config) == {k: v.shape for k, v in ckpt.tensors.items()}


# ------------------------------------------------------------------------------ safetensors

def test_bf16_bit_patterns():
    bits = np.array([0x3F80, 0xC000, 0x3FC0, 0x4049, 0x0000, 0x8000], np.uint16)
    got = convert.bf16_to_f32(bits)
    assert got.dtype == np.float32
    assert got.tolist() == [1.0, -2.0, 1.5, 3.140625, 0.0, -0.0]


def test_safetensors_to_npz_mixed_dtypes_and_dropped_buffers(tmp_path, tiny_vit, capsys):
    t = tiny_vit.tensors
    entries, expected = {}, {}
    for i, key in enumerate(sorted(t)):
        kind = ("F32", "F16", "BF16", "F64")[i % 4]
        value = bf16_exact(t[key]) if kind == "BF16" else t[key]
        if kind == "BF16":
            entries[key] = (kind, value.view(np.uint32) >> 16)
        else:
            entries[key] = (kind, value)
        expected[key] = value.astype(np.float16).astype(np.float32) if kind == "F16" else value
    entries["blocks.0.attn.relative_position_index"] = ("I64", np.arange(4).reshape(2, 2))
    entries["blocks.1.attn_mask"] = ("F32", np.zeros((2, 2)))
    src = write_st(tmp_path / "model.safetensors", entries, pad=5)
    code, out, err = run_cli(capsys, src, tmp_path / "out.npz", "--timm-name", "tiny_vit_test")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "out.npz")
    assert set(ckpt.tensors) == set(expected)
    for key, value in expected.items():
        assert ckpt.tensors[key].dtype == np.float32
        assert np.array_equal(ckpt.tensors[key], value.astype(np.float32)), key
    assert ckpt.config == {**tiny_vit.config, "timm_name": "tiny_vit_test"}


def test_npz_safetensors_npz_round_trip(tmp_path, tiny_vit, capsys):
    src = tmp_path / "vit.npz"
    save_npz_atomic(src, {**tiny_vit.tensors,
                          "config": json_entry({**tiny_vit.config, "timm_name": "tiny_vit_test"})})
    code, _, err = run_cli(capsys, src, tmp_path / "vit.safetensors")
    assert code == 0, err
    raw = (tmp_path / "vit.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n].decode())
    assert header["__metadata__"] == {"format": "pt", "timm_name": "tiny_vit_test"}
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    # back again: the timm name comes from the metadata when --timm-name is not given
    code, _, err = run_cli(capsys, tmp_path / "vit.safetensors", tmp_path / "back.npz")
    assert code == 0, err
    back = load_checkpoint(tmp_path / "back.npz")
    assert set(back.tensors) == set(tiny_vit.tensors)
    assert all(np.array_equal(back.tensors[k], v) for k, v in tiny_vit.tensors.items())


def test_interoperates_with_the_safetensors_package(tmp_path, tiny_vit):
    st = pytest.importorskip("safetensors.numpy")
    ours = tmp_path / "ours.safetensors"
    convert.write_safetensors(ours, tiny_vit.tensors, {"format": "pt"})
    loaded = st.load_file(str(ours))
    assert all(np.array_equal(loaded[k], v) for k, v in tiny_vit.tensors.items())
    theirs = tmp_path / "theirs.safetensors"
    st.save_file({k: v.astype(np.float16) for k, v in tiny_vit.tensors.items()}, str(theirs))
    tensors, _ = convert.read_safetensors(theirs)
    assert all(np.array_equal(tensors[k], v.astype(np.float16).astype(np.float32))
               for k, v in tiny_vit.tensors.items())


def test_legacy_swin_keys_are_remapped(tmp_path, tiny_swin, capsys):
    legacy = {}
    for key, value in tiny_swin.tensors.items():
        key = key.replace("layers.1.downsample", "layers.0.downsample").replace("head.fc.", "head.")
        legacy[key] = ("F32", value)
    legacy["layers.0.blocks.1.attn_mask"] = ("F32", np.zeros((4, 16, 16)))
    src = write_st(tmp_path / "swin.safetensors", legacy)
    code, _, err = run_cli(capsys, src, tmp_path / "swin.npz", "--timm-name", "tiny_swin_test")
    assert code == 0, err
    out = load_checkpoint(tmp_path / "swin.npz")
    assert set(out.tensors) == set(tiny_swin.tensors)
    assert all(np.array_equal(out.tensors[k], v) for k, v in tiny_swin.tensors.items())


# ---------------------------------------------------------------------------------- errors

def _no_output_left(folder, name):
    return not (folder / name).exists() and not any(p.name.startswith(".tmp-") for p in folder.iterdir())


def test_truncated_header(tmp_path, capsys):
    src = tmp_path / "short.safetensors"
    src.write_bytes(b"\x10\x00\x00")
    code, _, err = run_cli(capsys, src, tmp_path / "o.npz", "--timm-name", "deit_tiny_patch16_224")
    assert_clean_failure(code, err, src, "truncated")
    assert _no_output_left(tmp_path, "o.npz")


def test_header_length_beyond_file_size(tmp_path, capsys):
    src = tmp_path / "long.safetensors"
    src.write_bytes((1000).to_bytes(8, "little") + b'{"a": 1}')
    code, _, err = run_cli(capsys, src, tmp_path / "o.npz", "--timm-name", "deit_tiny_patch16_224")
    assert_clean_failure(code, err, src, "1000", "exceeds the file size")


def test_unsupported_dtype_names_the_key(tmp_path, tiny_vit, capsys):
    entries = {k: ("F32", v) for k, v in tiny_vit.tensors.items()}
    entries["norm.weight"] = ("U8", np.ones(8, np.uint8))
    src = write_st(tmp_path / "u8.safetensors", entries)
    code, _, err = run_cli(capsys, src, tmp_path / "o.npz", "--timm-name", "tiny_vit_test")
    assert_clean_failure(code, err, src, "'norm.weight'", "U8")
    assert _no_output_left(tmp_path, "o.npz")


@pytest.mark.parametrize("change,key,words", [
    ("shape", "blocks.1.mlp.fc1.weight", ["shape [16, 7]", "expected [16, 8]"]),
    ("missing", "blocks.0.attn.proj.bias", ["missing key"]),
    ("extra", "blocks.2.mlp.fc1.weight", ["unexpected key"]),
])
def test_shape_disagreeing_with_config(tmp_path, tiny_vit, capsys, change, key, words):
    entries = {k: ("F32", v) for k, v in tiny_vit.tensors.items()}
    if change == "shape":
        entries[key] = ("F32", entries[key][1][:, :7])
    elif change == "missing":
        del entries[key]
    else:
        entries[key] = ("F32", np.zeros((16, 8), np.float32))
    src = write_st(tmp_path / "bad.safetensors", entries)
    code, _, err = run_cli(capsys, src, tmp_path / "o.npz", "--timm-name", "tiny_vit_test")
    assert_clean_failure(code, err, src, repr(key), *words)
    assert _no_output_left(tmp_path, "o.npz")


def test_unknown_timm_name_and_bad_direction(tmp_path, tiny_vit, capsys):
    src = write_st(tmp_path / "m.safetensors", {k: ("F32", v) for k, v in tiny_vit.tensors.items()})
    code, _, err = run_cli(capsys, src, tmp_path / "o.npz", "--timm-name", "resnet50")
    assert_clean_failure(code, err, "--timm-name", "resnet50")
    code, _, err = run_cli(capsys, src, tmp_path / "o.npz")
    assert_clean_failure(code, err, "--timm-name", src)
    code, _, err = run_cli(capsys, src, tmp_path / "o.safetensors")
    assert_clean_failure(code, err, "direction")
    code, _, err = run_cli(capsys, tmp_path / "missing.safetensors", tmp_path / "o.npz")
    assert_clean_failure(code, err, "missing.safetensors")
    code, _, err = run_cli(capsys, src, tmp_path / "o.npz", "--num-classes", "-3")
    assert code == 2 and "--num-classes" in err


def test_unwritable_output(tmp_path, tiny_vit, capsys):
    src = write_st(tmp_path / "m.safetensors", {k: ("F32", v) for k, v in tiny_vit.tensors.items()})
    out = tmp_path / "no" / "such" / "o.npz"
    code, _, err = run_cli(capsys, src, out, "--timm-name", "tiny_vit_test")
    assert_clean_failure(code, err)


# --------------------------------------------------------------------------- compressed / .pth

def test_compressed_checkpoint_to_safetensors_uses_the_codec(tmp_path, tiny_vit, monkeypatch, capsys):
    """A checkpoint with a 'fips' entry is densified by codec.decompressed_tensors (stubbed)."""
    stored = {k: v for k, v in tiny_vit.tensors.items() if ".mlp.fc" not in k or k.endswith("bias")}
    stored["fips.U0"] = np.ones((8, 3), np.float32)
    src = tmp_path / "c.npz"
    save_npz_atomic(src, {**stored, "config": json_entry(tiny_vit.config), "fips": json_entry({"groups": []})})
    calls = []

    def fake_decompressed(ckpt):
        calls.append(ckpt.path)
        return {**ckpt.tensors, **{k: v for k, v in tiny_vit.tensors.items() if ".mlp.fc" in k}}

    import fips_ref.codec
    monkeypatch.setattr(fips_ref.codec, "decompressed_tensors", fake_decompressed)
    code, _, err = run_cli(capsys, src, tmp_path / "c.safetensors")
    assert code == 0, err
    assert calls == [str(src)]
    tensors, _ = convert.read_safetensors(tmp_path / "c.safetensors")
    assert set(tensors) == set(tiny_vit.tensors)   # 'fips.*' factors are not written
    assert all(np.array_equal(tensors[k], v) for k, v in tiny_vit.tensors.items())


def test_pth_with_torch(tmp_path, tiny_vit, capsys):
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v.copy()) for k, v in tiny_vit.tensors.items()}
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"].to(torch.bfloat16)
    state["blocks.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    torch.save({"model": state, "epoch": 3}, tmp_path / "m.pth")
    code, _, err = run_cli(capsys, tmp_path / "m.pth", tmp_path / "o.npz", "--timm-name", "tiny_vit_test")
    assert code == 0, err
    out = load_checkpoint(tmp_path / "o.npz")
    assert set(out.tensors) == set(tiny_vit.tensors)
    w = tiny_vit.tensors["blocks.0.mlp.fc1.weight"]
    assert np.array_equal(out.tensors["blocks.0.mlp.fc1.weight"],
                          torch.from_numpy(w).to(torch.bfloat16).float().numpy())
    assert np.array_equal(out.tensors["norm.weight"], tiny_vit.tensors["norm.weight"])


def test_pth_without_torch_says_how_to_get_safetensors(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)   # makes `import torch` raise ImportError
    code, _, err = run_cli(capsys, tmp_path / "m.pth", tmp_path / "o.npz", "--timm-name",
                           "deit_tiny_patch16_224")
    assert_clean_failure(code, err, "m.pth", "model.safetensors", "torch")


def test_fips_ref_does_not_import_torch():
    code = ("import sys, fips_ref.convert, fips_ref.evaluate, fips_ref.images, fips_ref.timm_configs; "
            "sys.exit(int('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
