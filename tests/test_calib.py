"""Calibration from images: streamed recording, --save-acts reuse, disk-backed vs in-memory store."""
import json

import numpy as np
import pytest
from PIL import Image

from fips_ref.calib import ActivationStore, DiskArray, load_calib_acts, save_acts
from fips_ref.checkpoint import InputError, find_mlp_blocks
from fips_ref.local_stage import FiPSConfig, run_local_stage
from fips_ref.compress import main
from fips_ref.images import IMAGENET_MEAN, IMAGENET_STD, list_images, load_images
from fips_ref.models import forward

from model_fixtures import make_vit_checkpoint

FAST = ["--epochs", "1", "--batch-size", "4", "--quiet", "--seed", "3"]


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_recorded_acts_equal_the_forward(tmp_path, image_folder, capsys):
    """--save-acts holds exactly the norm2 outputs the model's forward records for those images."""
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, img_size=8, patch_size=4)
    acts_path = tmp_path / "acts.npz"
    assert main([ckpt.path, "--calib", str(image_folder), "--save-acts", str(acts_path),
                 "--out", str(tmp_path / "c.npz"), "--group-size", "1"] + FAST) == 0
    saved = load_calib_acts(acts_path, find_mlp_blocks(ckpt))
    paths, _ = list_images(image_folder)
    x = load_images(paths, size=8, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    _, ref = forward(ckpt, x, record_mlp_inputs=True)
    for i in ref:
        np.testing.assert_allclose(saved[i], ref[i], rtol=1e-5, atol=1e-6)


def test_disk_backed_store_matches_memory(tmp_path, image_folder, capsys):
    """--max-memory 0 forces float16 memmaps; the result matches the in-memory run to fp16 tolerance."""
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, img_size=8, patch_size=4)
    reports = {}
    for name, mem in (("mem", "4"), ("disk", "0")):
        rep = tmp_path / f"{name}.json"
        assert main([ckpt.path, "--calib", str(image_folder), "--max-memory", mem, "--group-size", "1",
                     "--out", str(tmp_path / f"{name}.npz"), "--report", str(rep)] + FAST) == 0
        reports[name] = json.loads(rep.read_text())
    assert reports["mem"]["calibration"]["storage"] == "memory"
    assert reports["disk"]["calibration"]["storage"] == "disk"
    np.testing.assert_allclose(reports["disk"]["history"]["loss"], reports["mem"]["history"]["loss"],
                               rtol=2e-2)
    assert not any(p.name.startswith("fips-acts-") for p in tmp_path.iterdir())   # cleaned up


def test_activation_store_modes(tmp_path):
    shapes = {0: (4, 3, 2), 1: (4, 3, 2)}
    for max_bytes, mode in ((10**6, "memory"), (10, "disk")):
        store = ActivationStore(shapes, max_bytes, folder=tmp_path)
        h = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
        store(0, 0, h[:2])
        store(0, 2, h[2:])
        store(1, 0, h)
        out = store.finish(3)
        assert store.mode == mode and out[0].shape == (3, 3, 2)
        np.testing.assert_array_equal(out[0][0:3], h[:3])
        assert isinstance(out[0], DiskArray) == (mode == "disk")
        assert out[0].dtype == (np.float32 if mode == "memory" else np.float16)
        store.cleanup()
        assert store.folder is None


def test_unreadable_calibration_image(tmp_path, image_folder, capsys):
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, img_size=8, patch_size=4)
    bad = image_folder / "cat" / "broken.png"
    bad.write_bytes(b"not a png")
    args = [ckpt.path, "--calib", str(image_folder), "--out", str(tmp_path / "c.npz"), "--group-size", "1"]
    assert main(args + FAST) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.npz").exists()
    assert main(args + FAST + ["--skip-bad-images"]) == 0
    assert "broken.png" in capsys.readouterr().err


# ----------------------------------------------------------------------------- DiskArray
def test_disk_array_reads_any_rows_in_order(tmp_path):
    a = np.random.default_rng(0).standard_normal((50, 3, 4)).astype(np.float32)
    d = DiskArray.create(tmp_path / "a.npy", a.shape, np.float32)
    d[0:20] = a[:20]
    d[20:50] = a[20:]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)      # an ordinary .npy file
    for idx in ([3, 4, 5, 9, 2, 2, 49, 0], np.arange(50)[::-1], [], slice(10, 40)):
        np.testing.assert_array_equal(d[idx], a[idx])
    np.testing.assert_array_equal(d.head(7)[:], a[:7])
    assert d.head(7).shape == (7, 3, 4) and len(d) == 50
    with pytest.raises(IndexError):
        d[[50]]
    with pytest.raises(ValueError):
        d[0:2] = a[:3]


def test_disk_array_refuses_truncated_and_foreign_files(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 4), np.float32))
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(raw[:-20])
    with pytest.raises(InputError, match="truncated"):      # refused when opened (header vs size)
        DiskArray(tmp_path / "a.npy")[[9]]
    (tmp_path / "b.npy").write_bytes(b"hello world, not numpy")
    with pytest.raises(InputError, match="not a .npy"):
        DiskArray(tmp_path / "b.npy")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_save_acts_streams_and_large_files_stay_on_disk(tmp_path, dtype):
    """save_acts writes an ordinary .npz; load_calib_acts reads it whole under --max-memory and
    as DiskArrays over its members above it, with the same values either way."""
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, img_size=8, patch_size=4)
    blocks = find_mlp_blocks(ckpt)
    rng = np.random.default_rng(1)
    acts = {b.index: rng.standard_normal((300, 5, b.d)).astype(dtype) for b in blocks}
    save_acts(tmp_path / "acts.npz", acts, chunk=64)
    with np.load(tmp_path / "acts.npz") as z:
        assert all(np.array_equal(z[f"mlp_in.{i}"], a) for i, a in acts.items())
    whole = load_calib_acts(tmp_path / "acts.npz", blocks, max_bytes=10**9)
    lazy = load_calib_acts(tmp_path / "acts.npz", blocks, max_bytes=1000)
    for i, a in acts.items():
        assert isinstance(whole[i], np.ndarray) and isinstance(lazy[i], DiskArray)
        idx = rng.permutation(300)[:17]
        np.testing.assert_array_equal(lazy[i][idx], a[idx])
        np.testing.assert_array_equal(whole[i], a)


def test_disk_backed_acts_give_the_in_memory_run(tmp_path):
    """The local stage on DiskArray activations (targets recomputed) equals the in-memory run."""
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, img_size=8, patch_size=4)
    blocks = find_mlp_blocks(ckpt)
    rng = np.random.default_rng(2)
    acts = {b.index: rng.standard_normal((40, 5, b.d)).astype(np.float32) for b in blocks}
    save_acts(tmp_path / "acts.npz", acts)
    on_disk = load_calib_acts(tmp_path / "acts.npz", blocks, max_bytes=0)
    cfg = FiPSConfig(epochs=3, batch_size=8, lr=1e-2)
    runs = [run_local_stage(ckpt.tensors, a, [[0], [1]], cfg, blocks=blocks, dtype=np.float64,
                            targets=t) for a, t in ((acts, "cache"), (on_disk, "recompute"))]
    for k in runs[0].params:
        np.testing.assert_allclose(runs[1].params[k], runs[0].params[k], rtol=1e-10, atol=1e-12)
    assert runs[1].error_final == pytest.approx(runs[0].error_final, rel=1e-10)


def test_bad_image_in_a_later_batch_leaves_no_disk_store(tmp_path, image_folder, capsys):
    """Disk mode, the unreadable file in the second batch: exit 2, one line, no fips-acts-* left."""
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, img_size=8, patch_size=4)
    (image_folder / "dog" / "zz_broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    out.mkdir()
    args = [ckpt.path, "--calib", str(image_folder), "--out", str(out / "c.npz"), "--group-size", "1",
            "--max-memory", "0"] + FAST
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "zz_broken.png" in err and len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []


def test_no_readable_calibration_image(tmp_path, capsys):
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, img_size=8, patch_size=4)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"junk")
    code = main([ckpt.path, "--calib", str(tmp_path / "imgs"), "--skip-bad-images",
                 "--out", str(tmp_path / "c.npz"), "--group-size", "1"] + FAST)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "no readable calibration images" in err[-1]
    assert not (tmp_path / "c.npz").exists()


def test_activations_file_with_other_members_loads_both_ways(tmp_path):
    """Extra (string, 0-d) members are ignored: only the blocks' mlp_in.{i} are read."""
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, img_size=8, patch_size=4)
    blocks = find_mlp_blocks(ckpt)
    rng = np.random.default_rng(5)
    acts = {f"mlp_in.{b.index}": rng.standard_normal((10, 5, b.d)).astype(np.float32) for b in blocks}
    np.savez(tmp_path / "a.npz", note=np.array("recorded by hand"), scale=np.float32(2.0), **acts)
    for max_bytes, kind in ((0, DiskArray), (10**9, np.ndarray)):
        got = load_calib_acts(tmp_path / "a.npz", blocks, max_bytes=max_bytes)
        assert all(isinstance(a, kind) for a in got.values())
        np.testing.assert_array_equal(got[1][:], acts["mlp_in.1"])
