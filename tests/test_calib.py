"""Calibration from images: streamed recording, --save-acts reuse, disk-backed vs in-memory store."""
import json

import numpy as np
import pytest
from PIL import Image

from fips_ref.calib import ActivationStore, load_calib_acts
from fips_ref.checkpoint import find_mlp_blocks
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
        out = store.finish()
        assert store.mode == mode
        np.testing.assert_array_equal(out[0], h)
        assert out[0].dtype == (np.float32 if mode == "memory" else np.float16)
        store.cleanup()


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
