"""The compress summary says where the JSON report is and how to plot it (issue 9, "Plots of a run"),
and the command it prints works as printed."""
import numpy as np
import pytest

from fips_ref.calib import acts_key
from fips_ref.checkpoint import save_npz_atomic
from fips_ref.compress import main as compress_main

from model_fixtures import make_vit_checkpoint


def _compress(tmp_path, extra):
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=2, embed_dim=8, mlp_ratio=4.0)
    rng = np.random.default_rng(0)
    save_npz_atomic(tmp_path / "acts.npz", {acts_key(i): rng.standard_normal((16, 5, 8)).astype(np.float32)
                                            for i in range(2)})
    return compress_main([ckpt.path, "--calib-acts", str(tmp_path / "acts.npz"), "--out",
                          str(tmp_path / "c.npz"), "--epochs", "1", "--batch-size", "8", "--quiet"] + extra)


def test_summary_names_the_report_and_a_plot_command_that_works(tmp_path, capsys):
    rep = tmp_path / "run report.json"                      # a space: the path is printed as given
    assert _compress(tmp_path, ["--report", str(rep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = [ln for ln in lines if ln.startswith("report: ")]
    assert line == [f"report: {rep}; plot it with: python -m fips_ref.plot {rep}"]
    assert rep.is_file()
    pytest.importorskip("matplotlib")
    from fips_ref.plot import main as plot_main
    command = line[0].split("plot it with: python -m fips_ref.plot ", 1)[1]
    png = tmp_path / "fig.png"
    assert plot_main([command, "--out", str(png)]) == 0     # the printed path, verbatim
    assert png.stat().st_size > 0


def test_no_report_no_plot_line(tmp_path, capsys):
    assert _compress(tmp_path, []) == 0
    out = capsys.readouterr().out
    assert "wrote " in out and "plot it with" not in out and "report:" not in out
