"""The CLIs' promise under hostile use (docs/robustness.md): one line, the right exit code,
no input touched, nothing left behind. One representative case per failure class."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import fips_ref.outputs as outputs
from fips_ref.calib import acts_key
from fips_ref.checkpoint import save_npz_atomic
from fips_ref.compress import main as compress_main
from fips_ref.convert import main as convert_main
from fips_ref.decompress import main as decompress_main
from fips_ref.evaluate import main as evaluate_main

from model_fixtures import make_vit_checkpoint

FAST = ["--epochs", "1", "--batch-size", "8", "--quiet", "--group-size", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def inputs(tmp_path):
    """inputs/: a 2-block ViT taking 8x8 images, its activations, 12 calibration images."""
    folder = tmp_path / "inputs"
    (folder / "imgs" / "a").mkdir(parents=True)
    ckpt = make_vit_checkpoint(folder / "vit.npz", depth=2, img_size=8, patch_size=4)
    rng = np.random.default_rng(0)
    save_npz_atomic(folder / "acts.npz", {acts_key(i): rng.standard_normal((16, 5, 16)).astype(np.float32)
                                          for i in range(2)})
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "imgs" / "a" / f"{i}.png")
    (tmp_path / "out").mkdir()
    return ckpt


def snapshot(folder):
    """{path: (bytes, mtime_ns)} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[p] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


def one_line(err, code, want_code, *needles):
    lines = err.strip().splitlines()
    assert code == want_code and len(lines) == 1, (code, err)
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


# ----------------------------------------------------------------------------- aliased paths
def test_aliased_outputs_are_refused_before_any_work(tmp_path, inputs, capsys):
    """Symlinked file, symlinked folder, hard link, output inside --calib, two equal outputs,
    across the four CLIs: refused naming both flags; inputs unchanged (bytes and mtime)."""
    src, out = tmp_path / "inputs", tmp_path / "out"
    before = snapshot(src)
    os.symlink(inputs.path, out / "link.npz")                  # symlinked file
    os.symlink(src, tmp_path / "alias")                         # symlinked folder
    os.link(src / "acts.npz", out / "hard.npz")                 # hard link
    ck = inputs.path
    cases = [
        (compress_main, [ck, "--out", str(out / "link.npz")], ["--out", "CHECKPOINT"]),
        (compress_main, [ck, "--calib-acts", str(src / "acts.npz"), "--out", str(out / "c.npz"),
                         "--save-acts", str(tmp_path / "alias" / "acts.npz")], ["--save-acts", "--calib-acts"]),
        (compress_main, [ck, "--calib-acts", str(src / "acts.npz"), "--out", str(out / "hard.npz")],
         ["--out", "--calib-acts"]),
        (compress_main, [ck, "--calib", str(src / "imgs"), "--out", str(src / "imgs" / "a" / "c.npz")],
         ["--out", "--calib"]),
        (compress_main, [ck, "--out", str(out / "c.npz"), "--report", str(out / "." / "c.npz")],
         ["--report", "--out"]),
        (decompress_main, [ck, str(tmp_path / "alias" / "vit.npz")], ["DENSE", "COMPRESSED"]),
        (evaluate_main, [ck, "--data", str(src / "imgs"), "--reference", str(src / "acts.npz"),
                         "--json", str(out / "hard.npz")], ["--json", "--reference"]),
        (convert_main, [ck, str(out / "link.npz")], ["OUTPUT", "INPUT"]),
    ]
    for main, argv, flags in cases:
        code = main(argv + (FAST if main is compress_main else []))
        one_line(capsys.readouterr().err, code, 2, *flags)
    assert snapshot(src) == before
    assert sorted(os.listdir(out)) == ["hard.npz", "link.npz"]


# ----------------------------------------------------------------------------- signals
def _start(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return subprocess.Popen([sys.executable, "-m", "fips_ref.compress"] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, needle, timeout=120):
    """Read stderr lines until one contains needle (the run is demonstrably working)."""
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return
    proc.kill()
    pytest.fail(f"never saw {needle!r}: {''.join(seen)}")


@pytest.mark.parametrize("sig,needle", [(signal.SIGTERM, "epoch "),
                                        (signal.SIGINT, "recording MLP inputs")])
def test_signal_ends_the_run_cleanly(tmp_path, inputs, sig, needle):
    """SIGTERM while training, SIGINT while recording to a disk store: exit 128+sig, one line,
    no store, temporary, partial output or report anywhere."""
    src, out = tmp_path / "inputs", tmp_path / "out"
    before = snapshot(src)
    proc = _start([inputs.path, "--calib", str(src / "imgs"), "--max-memory", "0",
                   "--out", str(out / "c.npz"), "--report", str(out / "r.json"),
                   "--save-acts", str(out / "acts.npz"), "--epochs", "100000", "--batch-size", "2",
                   "--group-size", "1"], tmp_path)
    _wait_for(proc, needle)
    if needle.startswith("epoch"):                    # training: store and staged --save-acts exist
        assert any(p.startswith("fips-acts-") for p in os.listdir(out))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if not line.startswith(("epoch", "recording"))]
    assert proc.returncode == 128 + sig and len(lines) == 1, err
    assert signal.Signals(sig).name in lines[0] and "Traceback" not in err
    assert os.listdir(out) == [] and os.listdir(tmp_path / "tmp") == []
    assert snapshot(src) == before


# ----------------------------------------------------------------------------- failed writes
def test_full_disk_names_the_users_file_and_leaves_nothing(tmp_path, inputs, capsys, monkeypatch):
    """ENOSPC in the middle of the .npz: the line names --out (not the .tmp- file), no report,
    the older file under --out untouched, inputs unchanged."""
    src, out = tmp_path / "inputs", tmp_path / "out"
    before = snapshot(src)
    (out / "c.npz").write_bytes(b"an older result")
    budget = [4096]

    def write(fd, data):                               # 4 KiB fit, then the disk is full
        n = min(len(data), budget[0])
        budget[0] -= n
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data[:n])
    monkeypatch.setattr(outputs, "_os_write", write)
    code = compress_main([inputs.path, "--calib-acts", str(src / "acts.npz"), "--out", str(out / "c.npz"),
                          "--report", str(out / "r.json")] + FAST)
    err = capsys.readouterr().err
    one_line(err, code, 2, out / "c.npz", "No space left")
    assert ".tmp-" not in err and os.listdir(out) == ["c.npz"] and snapshot(src) == before
    assert (out / "c.npz").read_bytes() == b"an older result"


def test_a_write_that_loses_bytes_is_caught(tmp_path, inputs, capsys, monkeypatch):
    """A write that claims more than it wrote (a lying filesystem): the size check refuses the file."""
    monkeypatch.setattr(outputs, "_os_write", lambda fd, data: os.write(fd, data[:max(1, len(data) // 2)])
                        and len(data))
    out = tmp_path / "out"
    code = convert_main([inputs.path, str(out / "d.safetensors")])
    one_line(capsys.readouterr().err, code, 2, out / "d.safetensors", "bytes reached the disk")
    assert os.listdir(out) == []


def test_full_disk_while_recording_names_the_output_folder(tmp_path, inputs, capsys, monkeypatch):
    """The disk store fills the disk: the line names the folder of --out; the store is gone."""
    src, out = tmp_path / "inputs", tmp_path / "out"

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(outputs, "_os_write", full)
    code = compress_main([inputs.path, "--calib", str(src / "imgs"), "--max-memory", "0",
                          "--out", str(out / "c.npz")] + FAST)
    err = capsys.readouterr().err
    one_line(err, code, 2, out, "calibration activations", "No space left")
    assert "fips-acts-" not in err and os.listdir(out) == []


# ----------------------------------------------------------------------------- stdout, usage
def test_closed_stdout_is_not_a_traceback(tmp_path, inputs):
    """`| head` closing stdout before the summary: exit 141 (as SIGPIPE), empty stderr; the
    output was complete before the summary, so it stays."""
    dense = tmp_path / "out" / "d.safetensors"
    r, w = os.pipe()
    os.close(r)                                        # the reader is gone before we print
    proc = subprocess.run([sys.executable, "-m", "fips_ref.convert", inputs.path, str(dense)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=w,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(w)
    assert proc.returncode == 141 and proc.stderr == ""
    assert dense.exists()


@pytest.mark.parametrize("main,argv,flag", [
    (compress_main, ["--budget", "2"], "--budget"),
    (decompress_main, ["a.npz"], "dense"),
    (evaluate_main, ["m.npz", "--data", "d", "--limit", "0"], "--limit"),
    (convert_main, ["a.npz", "b.safetensors", "--num-classes", "x"], "--num-classes"),
])
def test_usage_errors_are_one_line_in_every_cli(main, argv, flag, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    one_line(err, code, 2, flag, ": error: ")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell files apart")
def test_a_failed_report_keeps_the_older_output(tmp_path, inputs, capsys, monkeypatch):
    """All or nothing: --out was already staged when --report hit a full disk; the file that
    was under --out before the run is still there, byte for byte, and no temporary remains."""
    src, out = tmp_path / "inputs", tmp_path / "out"
    (out / "c.npz").write_bytes(b"an older result")

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("r.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)
    monkeypatch.setattr(outputs, "_os_write", write)
    code = compress_main([inputs.path, "--calib-acts", str(src / "acts.npz"), "--out", str(out / "c.npz"),
                          "--report", str(out / "r.json")] + FAST)
    one_line(capsys.readouterr().err, code, 2, out / "r.json", "No space left")
    assert os.listdir(out) == ["c.npz"] and (out / "c.npz").read_bytes() == b"an older result"
