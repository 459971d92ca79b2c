"""Metrics and the evaluate CLI (fips_ref.evaluate)."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.special
from PIL import Image

from fips_ref import evaluate as ev
from fips_ref.checkpoint import json_entry, load_checkpoint, save_npz_atomic
from fips_ref.images import load_images

from model_fixtures import make_vit_checkpoint

try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # optional dependency
    given = None


# ----------------------------------------------------------------------------------- metrics

def test_topk_on_constructed_logits_with_ties():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 0.0],
                       [5.0, 4.0, 3.0, 2.0, 1.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0]])
    # row 0: class 3 ties class 1 and ranks after it (lower index first) -> rank 1
    assert ev.topk_hits(logits, [3, 4, 4], 1).tolist() == [False, False, False]
    assert ev.topk_hits(logits, [3, 4, 4], 2).tolist() == [True, False, False]
    assert ev.topk_hits(logits, [1, 0, 0], 1).tolist() == [True, True, True]
    assert ev.topk_hits(logits, [2, 4, 4], 5).tolist() == [True, True, True]
    assert ev.topk_accuracy(logits, [3, 2, 2], 2) == pytest.approx(1 / 3)   # ranks 1, 2, 2


def _topk_by_sorting(logits, labels, k):
    """Reference: stable sort of -logits (ties keep the lower index first)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean([y in row for y, row in zip(labels, order)]))


if given is not None:
    @settings(deadline=None, max_examples=60)
    @given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 7))
    def test_topk_equals_stable_sort(seed, k, num_classes):
        """Property: the rank-counting top-k equals membership in the stable-sorted top k."""
        rng = np.random.default_rng(seed)
        logits = rng.integers(-2, 3, (20, num_classes)).astype(np.float32)   # many ties
        labels = rng.integers(0, num_classes, 20)
        assert ev.topk_accuracy(logits, labels, k) == _topk_by_sorting(logits, labels, k)


def test_agreement():
    a = np.array([[0, 1, 0], [2, 0, 0], [1, 1, 0], [0, 0, 1.0]])
    b = np.array([[0, 9, 0], [0, 0, 2], [3, 3, 0], [0, 0, 1.0]])   # row 2: ties -> class 0 both
    assert ev.agreement(a, b) == 0.75
    assert ev.agreement(a, a) == 1.0


def test_mean_kl_against_direct_formula():
    rng = np.random.default_rng(0)
    ref, model = rng.normal(size=(7, 10)) * 3, rng.normal(size=(7, 10)) * 3
    p, q = scipy.special.softmax(ref, axis=1), scipy.special.softmax(model, axis=1)
    direct = np.mean(np.sum(p * np.log(p / q), axis=1))      # KL(ref || model)
    reverse = np.mean(np.sum(q * np.log(q / p), axis=1))
    assert ev.mean_kl(ref, model) == pytest.approx(direct, rel=1e-12)
    assert ev.mean_kl(ref, model) != pytest.approx(reverse, rel=1e-3)
    assert ev.mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-15)
    assert ev.mean_kl(ref, ref + 5.0) == pytest.approx(0.0, abs=1e-12)   # softmax shift-invariant
    big = np.array([[1000.0, 0.0], [0.0, -1000.0]])                      # no overflow
    assert np.isfinite(ev.mean_kl(big, -big))


# -------------------------------------------------------------- stub model (colour classifier)

def _stub_checkpoint(path, *, scale=1.0, perm=None, num_classes=5, img_size=8):
    """A checkpoint file the stub model reads: logits = scale * per-channel mean (+ padding)."""
    config = {"arch": "vit", "depth": 0, "num_classes": num_classes, "img_size": img_size,
              "in_chans": 3, "stub_scale": scale, "stub_perm": perm}
    save_npz_atomic(path, {"config": json_entry(config), "unused": np.zeros(1, np.float32)})
    return str(path)


@pytest.fixture
def stub_model(monkeypatch):
    """Replace fips_ref.models.prepare_model / forward_model with a colour classifier."""
    try:
        import fips_ref.models as models
    except ImportError:  # the model code is not there: stand in a module for it
        models = types.ModuleType("fips_ref.models")
        monkeypatch.setitem(sys.modules, "fips_ref.models", models)
    prepared = []

    def prepare_model(ckpt, *, dtype=None, xp=None):
        prepared.append(ckpt.path)
        return ckpt.config

    def forward_model(cfg, x, *, batch_size=64):  # [B, 3, H, W] -> [B, K]
        x = np.asarray(x, dtype=np.float64)
        logits = np.full((x.shape[0], cfg["num_classes"]), -10.0)
        logits[:, :3] = cfg["stub_scale"] * x.mean(axis=(2, 3))
        return logits[:, cfg["stub_perm"]] if cfg["stub_perm"] else logits

    monkeypatch.setattr(models, "prepare_model", prepare_model, raising=False)
    monkeypatch.setattr(models, "forward_model", forward_model, raising=False)
    return prepared


COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}


def _colour_folder(root, layout):
    """Class folders of solid-colour 12x10 images: layout {folder: [colour class, ...]}."""
    for folder, colours in layout.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i, c in enumerate(colours):
            Image.new("RGB", (12, 10), COLOURS[c]).save(os.path.join(root, folder, f"{i}.png"))
    return str(root)


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of evaluate.main in-process."""
    try:
        code = ev.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code, err, *names):
    """Exit 2 with exactly one line on stderr: 'error: ...', or 'PROG: error: ...' for a flag."""
    assert code == 2, err
    assert err.count("\n") == 1 and (err.startswith("error: ") or ": error: " in err), err
    for name in names:
        assert str(name) in err, (name, err)


def test_cli_end_to_end_with_stub(tmp_path, stub_model, capsys):
    # a_red: 2 red; b_green: 2 green; c_blue: 1 blue + 1 red (misclassified) -> top-1 5/6
    data = _colour_folder(tmp_path / "data", {"a_red": [0, 0], "b_green": [1, 1], "c_blue": [2, 0]})
    model = _stub_checkpoint(tmp_path / "m.npz", scale=1.0)
    ref = _stub_checkpoint(tmp_path / "r.npz", scale=2.0)
    code, out, err = run_cli(capsys, model, "--data", data, "--reference", ref, "--json",
                             tmp_path / "out.json", "--batch-size", 4)
    assert code == 0, err
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["num_images"] == 6 and res["num_skipped"] == 0
    assert res["top1"] == pytest.approx(5 / 6) and res["top5"] == 1.0
    assert res["reference_top1"] == pytest.approx(5 / 6) and res["agreement"] == 1.0
    # KL from the same stub logits computed directly
    x = load_images(sorted(str(p) for p in (tmp_path / "data").rglob("*.png")), size=8)
    m = np.concatenate([x.mean(axis=(2, 3)), np.full((6, 2), -10.0)], axis=1)
    r = np.concatenate([2 * x.mean(axis=(2, 3)), np.full((6, 2), -10.0)], axis=1)
    p, q = scipy.special.softmax(r, axis=1), scipy.special.softmax(m, axis=1)
    assert res["mean_kl"] == pytest.approx(np.mean(np.sum(p * np.log(p / q), axis=1)), rel=1e-6)
    assert "top-1" in out and "83.33 %" in out and "agreement" in out
    assert stub_model == [model, ref]   # each model prepared once, not per batch


def test_evaluate_function_with_batches_and_kept_indices(tmp_path, stub_model):
    ckpt = load_checkpoint(_stub_checkpoint(tmp_path / "m.npz"))
    ref = load_checkpoint(_stub_checkpoint(tmp_path / "r.npz", perm=[1, 0, 2, 3, 4]))
    x = np.zeros((4, 3, 8, 8), np.float32)
    x[0, 0] = x[1, 1] = x[2, 2] = x[3, 0] = 1.0          # red, green, blue, red
    labels = np.array([9, 0, 1, 2, 1])                   # index 0 skipped (as by skip_bad)
    batches = [(x[:2], np.array([1, 2])), (x[2:], np.array([3, 4]))]
    res = ev.evaluate(ckpt, batches, labels, reference=ref, batch_size=2)
    assert res["num_images"] == 4 and res["top1"] == 0.75       # last red labelled 1
    assert res["agreement"] == 0.25                             # ref swaps red/green
    assert res["reference_top1"] == 0.5                         # blue and the last red
    plain = ev.evaluate(ckpt, x, labels[1:], batch_size=3)      # one array, no reference
    assert plain["top1"] == 0.75 and "agreement" not in plain


def test_cli_npz_data_and_limit(tmp_path, stub_model, capsys):
    x = np.zeros((10, 3, 8, 8), np.float32)
    labels = np.arange(10) % 3
    x[np.arange(10), labels] = 1.0
    labels[9] = 4
    np.savez(tmp_path / "test.npz", images=x, labels=labels)
    model = _stub_checkpoint(tmp_path / "m.npz")
    code, _, err = run_cli(capsys, model, "--data", tmp_path / "test.npz", "--json", tmp_path / "o.json")
    assert code == 0, err
    assert json.loads((tmp_path / "o.json").read_text())["top1"] == 0.9
    code, _, err = run_cli(capsys, model, "--data", tmp_path / "test.npz", "--limit", 4,
                           "--json", tmp_path / "o.json")
    res = json.loads((tmp_path / "o.json").read_text())
    assert code == 0 and res["num_images"] == 4 and res["top1"] == 1.0   # indices 0, 2, 5, 7


def test_skip_bad_images(tmp_path, stub_model, capsys):
    data = _colour_folder(tmp_path / "data", {"a": [0, 0], "b": [1]})
    bad = tmp_path / "data" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    model = _stub_checkpoint(tmp_path / "m.npz")
    code, _, err = run_cli(capsys, model, "--data", data)
    assert_clean_failure(code, err, bad)
    code, out, err = run_cli(capsys, model, "--data", data, "--skip-bad-images", "--json",
                             tmp_path / "o.json")
    assert code == 0 and err.startswith("warning:") and str(bad) in err and err.count("\n") == 1
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["num_images"] == 3 and res["num_skipped"] == 1 and res["top1"] == 1.0


def test_cli_errors_name_the_file_or_flag(tmp_path, stub_model, capsys):
    data = _colour_folder(tmp_path / "data", {"a": [0], "b": [1]})
    model = _stub_checkpoint(tmp_path / "m.npz")
    code, _, err = run_cli(capsys, tmp_path / "missing.npz", "--data", data)
    assert_clean_failure(code, err, "missing.npz")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, model, "--data", tmp_path / "empty")
    assert_clean_failure(code, err, tmp_path / "empty")
    code, _, err = run_cli(capsys, model, "--data", data, "--batch-size", "0")
    assert_clean_failure(code, err, "--batch-size")
    code, _, err = run_cli(capsys, model, "--data", data, "--crop-pct", "1.5")
    assert_clean_failure(code, err, "--crop-pct")
    code, _, err = run_cli(capsys, model, "--data", data, "--dtype", "float16")
    assert_clean_failure(code, err, "--dtype")
    code, _, err = run_cli(capsys, model, "--data", data, "--reference",
                           _stub_checkpoint(tmp_path / "r.npz", num_classes=7))
    assert_clean_failure(code, err, "r.npz", "num_classes")
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 3, 9, 9), np.float32))
    code, _, err = run_cli(capsys, model, "--data", tmp_path / "wrong.npz")
    assert_clean_failure(code, err, "wrong.npz", "'images'")
    (tmp_path / "map.json").write_text('{"a": 0, "b": 99}')
    code, _, err = run_cli(capsys, model, "--data", data, "--class-map", tmp_path / "map.json")
    assert_clean_failure(code, err, data, "99")
    code, _, err = run_cli(capsys, model, "--data", data, "--json", tmp_path / "no" / "o.json")
    assert_clean_failure(code, err, "o.json")


def test_eval_data_streams_folders_and_checks_labels(tmp_path):
    data = _colour_folder(tmp_path / "data", {"a": [0, 1], "b": [2]})
    ckpt = load_checkpoint(_stub_checkpoint(tmp_path / "m.npz"))
    batches, labels, total, crop = ev.eval_data(data, ckpt, batch_size=2)
    assert not hasattr(batches, "shape") and total == 3 and crop == 0.875   # a stream, not an array
    shapes = [x.shape for x, _ in batches]
    assert shapes == [(2, 3, 8, 8), (1, 3, 8, 8)] and labels.tolist() == [0, 0, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (9, 9)).save(flat / "x.png")
    with pytest.raises(ev.InputError, match="no labels"):
        ev.eval_data(str(flat), ckpt, need_labels=True)
    assert ev.eval_data(str(flat), ckpt)[1] is None


# --------------------------------------------------------------------------------- real model

@pytest.fixture
def real_models():
    models = pytest.importorskip("fips_ref.models")
    if not hasattr(models, "forward"):
        pytest.skip("fips_ref.models.forward not available")
    return models


def test_cli_on_a_tiny_vit(tmp_path, real_models):
    """The whole CLI in a subprocess on a random ViT; metrics equal those of forward's logits."""
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", img_size=16, patch_size=8, num_classes=5)
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for c in range(3):
        os.makedirs(tmp_path / "data" / f"class{c}")
        for i in range(4):
            p = str(tmp_path / "data" / f"class{c}" / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(p)
            paths.append(p)
            labels.append(c)
    cmd = [sys.executable, "-m", "fips_ref.evaluate", str(tmp_path / "vit.npz"), "--data",
           str(tmp_path / "data"), "--reference", str(tmp_path / "vit.npz"), "--json",
           str(tmp_path / "out.json"), "--batch-size", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "out.json").read_text())
    logits = real_models.forward(ckpt, load_images(paths, size=16))
    assert res["num_images"] == 12
    assert res["top1"] == pytest.approx(ev.topk_accuracy(logits, labels, 1))
    assert res["top5"] == pytest.approx(ev.topk_accuracy(logits, labels, 5))
    assert res["agreement"] == 1.0 and res["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    bad = subprocess.run(cmd[:4] + ["--data", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nowhere" in bad.stderr
