"""python -m fips_ref.plot REPORT.json: a PNG from a real compress report, the mask-update grid
against the run's own sparsity history, the no-matplotlib path and bad reports (exit 2, one line)."""
import json
import sys

import numpy as np
import pytest

from fips_ref.calib import acts_key
from fips_ref.checkpoint import save_npz_atomic
from fips_ref.compress import main as compress_main
from fips_ref.plot import load_report, main, schedule_steps, text_summary

from model_fixtures import make_vit_checkpoint


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The JSON report of a real GMP compress run on a tiny ViT (48 steps, Δt 4)."""
    d = tmp_path_factory.mktemp("plot")
    ckpt = make_vit_checkpoint(d / "vit.npz", depth=2, embed_dim=16, mlp_ratio=4.0)
    rng = np.random.default_rng(1)
    save_npz_atomic(d / "acts.npz", {acts_key(i): rng.standard_normal((32, 5, 16)).astype(np.float32)
                                     for i in range(2)})
    path = d / "r.json"
    code = compress_main([ckpt.path, "--calib-acts", str(d / "acts.npz"), "--out", str(d / "c.npz"),
                          "--report", str(path), "--epochs", "12", "--batch-size", "8",
                          "--group-size", "2", "--quiet"])
    assert code == 0
    return path


def test_mask_updates_marked_are_where_the_run_changed_its_sparsity(report):
    rep = load_report(report)
    marks = schedule_steps(rep)
    s = rep["history"]["sparsity"]
    changed = [k + 1 for k in range(1, len(s)) if s[k] != s[k - 1]]
    assert changed and set(changed) <= set(marks)                # every change is on the Δt grid
    assert marks[-1] <= rep["schedule"]["t_end"] and all(m % rep["schedule"]["delta_t"] == 0 for m in marks)


def test_png_is_written(report, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig.png"
    assert main([str(report), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


def test_without_matplotlib_one_line_exit_2_and_no_file(report, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "fig.png"
    assert main([str(report), "--out", str(out)]) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and "matplotlib" in cap.err and ".[plots]" in cap.err
    assert "steps; loss" in cap.out                              # the text summary instead
    assert not out.exists()


def test_text_summary_names_every_block(report):
    rep = load_report(report)
    text = text_summary(rep)
    assert all(f"block {b['index']}:" in text for b in rep["blocks"])


@pytest.mark.parametrize("content, needle", [
    ("not json", "not a JSON report"),
    ("[1, 2]", "not a JSON report"),
    (json.dumps({"history": {}}), "not a fips_ref.compress report"),
    (json.dumps({"history": {"loss": 1}, "blocks": [], "layer_density": {}, "schedule": {}}), "'history'"),
])
def test_bad_report_is_one_line_exit_2(tmp_path, content, needle, capsys):
    p = tmp_path / "r.json"
    p.write_text(content)
    assert main([str(p), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and str(p) in err
    assert not (tmp_path / "x.png").exists()


def test_missing_report_and_out_over_the_report(tmp_path, report, capsys):
    assert main([str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
    assert main([str(report), "--out", str(report)]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert load_report(report)                                   # the report is intact
