"""Image folders and transforms (fips_ref.images) against direct Pillow computations."""
import os

import numpy as np
import pytest
from PIL import Image

from fips_ref.checkpoint import InputError
from fips_ref.images import (IMAGENET_MEAN, IMAGENET_STD, center_crop, eval_transform,
                             iter_image_batches, list_images, load_images, train_scales,
                             train_transform)


def _save(path, array):
    """Write a uint8 [H, W, 3] array as an image file, creating folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _random_image(rng, h, w):  # -> uint8 [H, W, 3]
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _normalise(pil):  # PIL RGB -> [3, H, W] float32, as ToTensor + Normalize
    x = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return (x - mean) / std


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_image_folder_sorted_classes_and_labels(tmp_path, rng):
    for cls, names in {"zebra": ["b.png", "a.JPG"], "ant": ["x.jpeg"], "cat": ["c.bmp", "sub/d.png"]}.items():
        for name in names:
            _save(str(tmp_path / cls / name), _random_image(rng, 8, 8))
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    _save(str(tmp_path / ".hidden" / "e.png"), _random_image(rng, 8, 8))
    paths, labels = list_images(str(tmp_path))
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    assert rel == ["ant/x.jpeg", "cat/c.bmp", "cat/sub/d.png", "zebra/a.JPG", "zebra/b.png"]
    assert labels.tolist() == [0, 1, 1, 2, 2]
    assert labels.dtype == np.int64


def test_class_map_json_and_text(tmp_path, rng):
    for cls in ("n02", "n01"):
        _save(str(tmp_path / "data" / cls / "i.png"), _random_image(rng, 4, 4))
    (tmp_path / "map.json").write_text('{"n01": 7, "n02": 3}')
    (tmp_path / "synsets.txt").write_text("n02 goldfish\nn01 tench, Tinca tinca\n")
    assert list_images(str(tmp_path / "data"), class_map=str(tmp_path / "map.json"))[1].tolist() == [7, 3]
    assert list_images(str(tmp_path / "data"), class_map=str(tmp_path / "synsets.txt"))[1].tolist() == [1, 0]
    with pytest.raises(InputError, match="n02.*not in the class map"):
        list_images(str(tmp_path / "data"), class_map={"n01": 0})


def test_flat_folder_has_no_labels(tmp_path, rng):
    for name in ("b.png", "a.png", "c.webp"):
        Image.fromarray(_random_image(rng, 4, 4)).save(str(tmp_path / name))
    (tmp_path / "readme.md").write_text("x")
    paths, labels = list_images(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["a.png", "b.png", "c.webp"]
    assert labels is None


def test_empty_folder_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sub").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(InputError, match=str(tmp_path / "empty")):
        list_images(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such image folder"):
        list_images(str(tmp_path / "missing"))


@pytest.mark.parametrize("w,h,resized,box", [
    # torchvision Resize(256): shorter -> 256, longer -> int(256 * long / short); crop 224 with
    # offsets int(round(d / 2)) (half to even).
    (301, 200, (385, 256), (80, 16)),    # int(256 * 301 / 200) = int(385.28) = 385; round(80.5) = 80
    (200, 301, (256, 385), (16, 80)),
    (257, 256, (257, 256), (16, 16)),    # no resize; round(16.5) = 16 (not 17)
    (259, 256, (259, 256), (18, 16)),    # round(17.5) = 18
])
def test_eval_transform_matches_direct_pillow(rng, w, h, resized, box):
    """Resize(floor(224 / 0.875) = 256, BICUBIC) -> CenterCrop(224) -> /255 -> normalise."""
    img = Image.fromarray(_random_image(rng, h, w))
    got = eval_transform(img, size=224)
    ref = img if resized == (w, h) else img.resize(resized, Image.BICUBIC)
    left, top = box
    want = _normalise(ref.crop((left, top, left + 224, top + 224)))
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    assert np.array_equal(got, want), np.abs(got - want).max()


def test_eval_transform_crop_pct_and_grey(rng):
    img = Image.fromarray(_random_image(rng, 40, 50))
    got = eval_transform(img, size=32, crop_pct=0.9)   # floor(32 / 0.9) = 35
    ref = img.resize((int(35 * 50 / 40), 35), Image.BICUBIC)   # (43, 35)
    want = _normalise(ref.crop((6, 2, 38, 34)))   # round(5.5) = 6, round(1.5) = 2
    assert np.array_equal(got, want)
    grey = eval_transform(img, size=32, crop_pct=0.9, in_chans=1, mean=[0.5], std=[0.25])
    assert grey.shape == (1, 32, 32)
    g = np.asarray(img.convert("L").resize((43, 35), Image.BICUBIC).crop((6, 2, 38, 34)), np.float32)
    assert np.allclose(grey[0], (g / 255 - 0.5) / 0.25, atol=1e-6)


def test_center_crop_pads_small_images():
    img = Image.fromarray(np.full((2, 3, 3), 200, np.uint8))
    out = np.asarray(center_crop(img, 5))
    assert out.shape == (5, 5, 3)
    assert (out[1:3, 1:4] == 200).all() and out.sum() == 200 * 2 * 3 * 3


def _find_crop(img, out, size):
    """(scale, top, left, flipped) whose crop of the resized img equals ``out`` exactly."""
    for scale in train_scales(size):
        w, h = img.size
        rw, rh = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
        r = img.resize((rw, rh), Image.BILINEAR)
        for flipped in (False, True):
            src = r.transpose(Image.FLIP_LEFT_RIGHT) if flipped else r
            for top in range(rh - size + 1):
                for left in range(rw - size + 1):
                    left_src = (rw - size - left) if flipped else left
                    if np.array_equal(_normalise(src.crop((left_src, top, left_src + size, top + size))), out):
                        return scale, top, left, flipped
    return None


def test_train_transform_is_a_random_crop_and_deterministic(rng):
    img = Image.fromarray(_random_image(rng, 40, 50))
    assert train_scales(224) == (256, 480) and train_scales(32) == (37, 69)
    outs = [train_transform(img, rng=np.random.default_rng(seed), size=32) for seed in range(12)]
    again = train_transform(img, rng=np.random.default_rng(3), size=32)
    assert np.array_equal(outs[3], again)
    assert all(o.shape == (3, 32, 32) and o.dtype == np.float32 for o in outs)
    found = [_find_crop(img, o, 32) for o in outs[:6]]
    assert all(f is not None for f in found)
    # over 12 seeds both scales and both flips occur (probability of failure ~ 2 * 2^-11)
    found += [_find_crop(img, o, 32) for o in outs[6:]]
    assert {f[0] for f in found} == {37, 69} and {f[3] for f in found} == {False, True}


def test_load_images_and_batches(tmp_path, rng):
    paths = [_save(str(tmp_path / f"{i}.png"), _random_image(rng, 20 + i, 24)) for i in range(5)]
    x = load_images(paths, size=16)
    assert x.shape == (5, 3, 16, 16) and x.dtype == np.float32
    batches = list(iter_image_batches(paths, 2, size=16))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert np.array_equal(np.concatenate([b[0] for b in batches]), x)
    assert np.concatenate([b[1] for b in batches]).tolist() == [0, 1, 2, 3, 4]
    t1 = load_images(paths, size=16, train=True, rng=np.random.default_rng(5))
    t2 = load_images(paths, size=16, train=True, rng=np.random.default_rng(5))
    assert np.array_equal(t1, t2) and not np.array_equal(t1, x)


def test_unreadable_image_error_or_skip(tmp_path, rng, capsys):
    good = [_save(str(tmp_path / f"{i}.png"), _random_image(rng, 10, 10)) for i in range(3)]
    bad = str(tmp_path / "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 definitely not a jpeg")
    paths = [good[0], bad, good[1], good[2]]
    with pytest.raises(InputError, match="broken.jpg"):
        load_images(paths, size=8)
    x, kept = load_images(paths, size=8, skip_bad=True, return_indices=True)
    assert kept.tolist() == [0, 2, 3] and x.shape == (3, 3, 8, 8)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.jpg" in err and err.startswith("warning:")
    assert np.array_equal(x, load_images(good, size=8))
    pairs = list(iter_image_batches([bad, bad, good[0]], 2, size=8, skip_bad=True))
    assert len(pairs) == 1 and pairs[0][1].tolist() == [2]
