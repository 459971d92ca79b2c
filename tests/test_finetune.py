"""The global stage: one step against a hand-computed AdamW oracle, RigL's exact sparsity on V,
the CLI end to end (its output decompresses, evaluates and converts), same seed same result,
and bad input (one line, exit 2, nothing written)."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from fips_ref.checkpoint import json_entry, load_checkpoint, save_npz_atomic
from fips_ref.codec import encode
from fips_ref.finetune import main as finetune_main, replace_head
from fips_ref.global_stage import GlobalConfig, global_step, init_state, loss_and_dlogits, schedule
from fips_ref.models import prepare_model, vjp
from fips_ref.models.grad import torch_layout
from fips_ref.sharing import Layer
from fips_ref.sparsity import keep_count
from model_fixtures import make_swin_checkpoint, make_vit_checkpoint, random_images

D, F, R, K = 16, 32, 6, 5


def make_compressed(folder, density=0.25, seed=0, base=None, groups=((0, 1),)):
    """A checkpoint (default: 2-block ViT, D 16, F 32) and its compressed twin: 'long' groups of
    the given blocks, rank 6, V at exactly ``density`` over all groups (global), float32
    storage. Returns (original, compressed) paths."""
    from fips_ref.checkpoint import find_mlp_blocks
    base = base or make_vit_checkpoint(os.path.join(folder, "orig.npz"), depth=2, embed_dim=D,
                                       mlp_ratio=F / D, num_classes=K, seed=seed)
    blocks = find_mlp_blocks(base)
    rng = np.random.default_rng(seed + 1)
    layers = {g: tuple(Layer(f"{blocks[b].prefix}.mlp.{fc}", b, fc == "fc1") for b in bs
                       for fc in ("fc1", "fc2")) for g, bs in enumerate(groups)}
    shapes = {l.key: (R, blocks[l.block].hidden) for ls in layers.values() for l in ls}
    n = sum(r * c for r, c in shapes.values())
    flat = np.zeros(n, dtype=bool)
    flat[rng.permutation(n)[:int(n * density)]] = True
    params, masks, start, out_groups = {}, {}, 0, []
    for g, bs in enumerate(groups):
        d, hidden = blocks[bs[0]].d, blocks[bs[0]].hidden
        params[f"U.{g}"] = (rng.standard_normal((d, R)) / 2).astype(np.float32)
        for l in layers[g]:
            m = flat[start:start + R * hidden].reshape(R, hidden)
            start += R * hidden
            masks[f"{l.key}.V"] = m
            params[f"{l.key}.V"] = (rng.standard_normal((R, hidden)) * m / 2).astype(np.float32)
            params[f"{l.key}.bias"] = base.tensors[f"{l.key}.bias"]
        out_groups.append(SimpleNamespace(index=g, blocks=bs, rows=d, cols=hidden, rank=R,
                                          layers=layers[g]))
    result = SimpleNamespace(groups=out_groups, params=params, masks=masks)
    arrays, meta = encode(base, result, {"target_sparsity": 0.75}, storage_dtype=np.float32)
    path = os.path.join(folder, "c.fips.npz")
    save_npz_atomic(path, {**arrays, "config": json_entry(base.config), "fips": json_entry(meta)})
    return base.path, path


@pytest.fixture
def files(tmp_path):
    orig, comp = make_compressed(str(tmp_path))
    ck = load_checkpoint(comp)
    rng = np.random.default_rng(7)
    for name, n in (("train", 24), ("val", 10)):
        np.savez(tmp_path / f"{name}.npz", images=random_images(ck, n, seed=n),
                 labels=rng.integers(0, K, n))
    return SimpleNamespace(folder=tmp_path, orig=orig, comp=comp, train=str(tmp_path / "train.npz"),
                           val=str(tmp_path / "val.npz"))


# ----------------------------------------------------------------------------- the step
def test_first_step_is_adamw_on_the_models_gradient(tmp_path):
    """Step 1 of AdamW in closed form: p ← p(1 − lr·λ) − lr·g/(|g| + ε), with g the gradient
    fips_ref.models.vjp gives for dlogits = 2(softmax(z) − t)/B, masked on V; V stays 0 off the mask."""
    _, comp = make_compressed(str(tmp_path))
    ck = load_checkpoint(comp)
    model = prepare_model(ck, dtype=np.float64)
    cfg = GlobalConfig(sparsifier="static", lr=1e-3)
    state, mlps = init_state(model, ck, cfg)
    before = torch_layout({k: v.copy() for k, v in state.params.items()}, ck)
    x = random_images(ck, 4).astype(np.float64)
    t = np.random.default_rng(2).dirichlet(np.ones(K), 4)
    logits, _ = vjp(ck, x, np.zeros((4, K)), dtype=np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    _, g = vjp(ck, x, 2 * (p - t) / 4, dtype=np.float64)
    loss, lr, _ = global_step(state, model, mlps, cfg, schedule(cfg, 10), x, t)
    assert float(loss) == pytest.approx(-2 * np.mean((t * np.log(p)).sum(1)), rel=1e-10)
    after = torch_layout(state.params, ck)
    assert lr == cfg.lr and set(g) <= set(after)
    for k, gk in g.items():
        if k.startswith("fips.V."):
            gk = gk * state.masks[k]
        want = before[k] * (1 - lr * cfg.weight_decay) - lr * gk / (np.abs(gk) + cfg.eps)
        np.testing.assert_allclose(after[k], want, rtol=1e-9, atol=1e-12, err_msg=k)
    for k, m in state.masks.items():
        assert not np.any(state.params[k][~m]) and np.array_equal(state.forward_v[k], state.params[k] * m)


def test_loss_scale_doubles_loss_and_gradient():
    z = np.random.default_rng(0).standard_normal((3, 4))
    t = np.full((3, 4), 0.25)
    l1, d1 = loss_and_dlogits(z, t, GlobalConfig(loss_scale=1.0))
    l2, d2 = loss_and_dlogits(z, t, GlobalConfig())
    assert float(l2) == pytest.approx(2 * float(l1))
    np.testing.assert_allclose(d2, 2 * d1)


def test_rigl_lands_on_the_target_and_keeps_it_exactly(tmp_path):
    """Loaded at density 0.26 (a GMP run stopped short), target 0.75: the first RigL update
    (step Δt) drops more than it grows and lands on exactly keep_count(N, 0.75) active entries
    over all V (global, docs/authors-code.md §7), and every later one keeps it; inactive
    entries have zero moments and read as 0 in the forward."""
    _, comp = make_compressed(str(tmp_path), density=0.26)
    ck = load_checkpoint(comp)
    model = prepare_model(ck, dtype=np.float64)
    cfg = GlobalConfig(delta_t=2, rigl_drop_fraction=0.3)
    state, mlps = init_state(model, ck, cfg)
    n = sum(m.size for m in state.masks.values())
    loaded = int(n * 0.26)
    assert sum(int(m.sum()) for m in state.masks.values()) == loaded
    sched = schedule(cfg, 12)
    x = random_images(ck, 4).astype(np.float64)
    t = np.random.default_rng(3).dirichlet(np.ones(K), 4)
    changed = 0
    for step in range(1, 10):
        old = {k: m.copy() for k, m in state.masks.items()}
        global_step(state, model, mlps, cfg, sched, x, t)
        nnz = sum(int(m.sum()) for m in state.masks.values())
        if step < cfg.delta_t:
            assert nnz == loaded
        else:
            assert nnz == keep_count(n, 0.75)
        changed += sum(int((old[k] != m).sum()) for k, m in state.masks.items())
        for k, m in state.masks.items():
            assert not np.any(state.adam.m[k][~m]) and not np.any(state.adam.v[k][~m])
            assert np.array_equal(state.forward_v[k], state.params[k] * m)
    assert changed > loaded - keep_count(n, 0.75)          # RigL also regrew, not only pruned


def test_swin_steps_keep_sparsity_and_train_every_tensor(tmp_path):
    """Swin (shifted windows, patch merging), one group per block: RigL keeps the exact global
    count, and after a few steps every float tensor has moved (every parameter trains)."""
    base = make_swin_checkpoint(tmp_path / "swin.npz")
    _, comp = make_compressed(str(tmp_path), density=0.25, base=base, groups=((0,), (1,), (2,), (3,)))
    ck = load_checkpoint(comp)
    model = prepare_model(ck, dtype=np.float64)
    cfg = GlobalConfig(delta_t=1, rigl_drop_fraction=0.3)
    state, mlps = init_state(model, ck, cfg)
    start = {k: v.copy() for k, v in state.params.items()}
    n = sum(m.size for m in state.masks.values())
    x = random_images(ck, 3).astype(np.float64)
    t = np.random.default_rng(3).dirichlet(np.ones(5), 3)
    losses = [float(global_step(state, model, mlps, cfg, schedule(cfg, 8), x, t)[0]) for _ in range(4)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert sum(int(m.sum()) for m in state.masks.values()) == keep_count(n, 0.75)
    moved = {k for k in state.trainable if not np.array_equal(start[k], state.params[k])}
    assert moved == set(state.trainable) and "head.fc.weight" in moved
    new = replace_head(ck, 3, np.random.default_rng(0))
    assert new.tensors["head.fc.weight"].shape == (3, 16) and new.config["num_classes"] == 3


def test_replace_head_is_timm_init():
    ck = make_vit_checkpoint(embed_dim=64, num_classes=3, distilled=True)
    new = replace_head(ck, 400, np.random.default_rng(0))
    assert new.config["num_classes"] == 400 and ck.config["num_classes"] == 3
    for h in ("head", "head_dist"):
        w, b = new.tensors[f"{h}.weight"], new.tensors[f"{h}.bias"]
        assert w.shape == (400, 64) and not b.any()
        assert abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
    assert all(np.array_equal(v, new.tensors[k]) for k, v in ck.tensors.items() if "head" not in k)


# ----------------------------------------------------------------------------- the CLI
def _run(capsys, argv):
    code = finetune_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_cli_end_to_end_output_decompresses_evaluates_converts(files, capsys):
    from fips_ref.convert import main as convert_main
    from fips_ref.decompress import main as decompress_main
    from fips_ref.evaluate import main as evaluate_main
    out, rep = files.folder / "ft.fips.npz", files.folder / "ft.json"
    code, stdout, _ = _run(capsys, [files.comp, "--data", files.train, "--eval-data", files.val,
                                    "--epochs", 3, "--batch-size", 8, "--delta-t", 2, "--out", out,
                                    "--report", rep, "--quiet"])
    assert code == 0 and "wrote" in stdout
    report = json.loads(rep.read_text())
    assert report["steps"] == 9 and len(report["history"]["loss"]) == 9
    assert len(report["history"]["lr"]) == 9 and report["history"]["lr"][0] == 1e-4
    assert [e["epoch"] for e in report["epoch_metrics"]] == [1, 2, 3]
    assert all(0 <= e["val_top1"] <= 1 for e in report["epoch_metrics"])
    assert report["final_sparsity"] == pytest.approx(1 - keep_count(4 * R * F, 0.75) / (4 * R * F))
    before, after = _arrays(files.comp), _arrays(out)
    assert set(before) == set(after)
    assert not np.array_equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    meta = json.loads(str(after["fips"]))
    assert meta["finetune"]["steps"] == 9
    assert decompress_main([str(out), str(files.folder / "dense.npz")]) == 0
    assert evaluate_main([str(out), "--data", files.val, "--reference", files.orig]) == 0
    assert convert_main([str(files.folder / "dense.npz"), str(files.folder / "d.safetensors")]) == 0
    capsys.readouterr()


def test_same_seed_same_result(files, capsys):
    outs = []
    for i, seed in enumerate((1, 1, 2)):
        out = files.folder / f"s{i}.fips.npz"
        assert _run(capsys, [files.comp, "--data", files.train, "--epochs", 2, "--batch-size", 8,
                             "--delta-t", 1, "--seed", seed, "--out", out, "--quiet"])[0] == 0
        outs.append(_arrays(out))
    assert all(np.array_equal(v, outs[1][k]) for k, v in outs[0].items())
    assert not all(np.array_equal(v, outs[2][k]) for k, v in outs[0].items() if k.startswith("fips.U"))


def test_freeze_non_mlp_and_new_head(files, capsys):
    out = files.folder / "f.fips.npz"
    code, _, _ = _run(capsys, [files.comp, "--data", files.train, "--epochs", 1, "--batch-size", 8,
                               "--freeze-non-mlp", "--num-classes", 7, "--out", out, "--quiet"])
    assert code == 0
    before, after = _arrays(files.comp), _arrays(out)
    assert after["head.weight"].shape == (7, D) and json.loads(str(after["config"]))["num_classes"] == 7
    for k, v in before.items():
        if k.startswith("fips.") or k in ("config", "fips") or k.startswith("head"):
            continue
        assert np.array_equal(v, after[k]) != (".mlp." in k), k   # MLP biases train, the rest not
    assert not np.array_equal(before["fips.U.0"], after["fips.U.0"])


def test_distill_runs_and_changes_the_result(files, capsys):
    outs = []
    for extra in ([], ["--distill", files.orig, "--distill-weight", 5]):
        out = files.folder / f"d{len(extra)}.fips.npz"
        assert _run(capsys, [files.comp, "--data", files.train, "--epochs", 1, "--batch-size", 8,
                             "--out", out, "--quiet", *extra])[0] == 0
        outs.append(_arrays(out)["fips.U.0"])
    assert not np.array_equal(*outs)


@pytest.mark.parametrize("case", ["missing_data", "label_range", "not_compressed", "zero_classes",
                                  "batch_too_big", "no_labels", "same_out"])
def test_bad_input_one_line_exit_2_nothing_written(files, capsys, case):
    out = files.folder / "bad.fips.npz"
    argv = [files.comp, "--data", files.train, "--batch-size", 8, "--epochs", 1, "--out", out]
    if case == "missing_data":
        argv = [files.comp, "--out", out]
    elif case == "label_range":
        np.savez(files.folder / "wide.npz", images=random_images(load_checkpoint(files.comp), 8),
                 labels=np.arange(8))
        argv[2] = files.folder / "wide.npz"
    elif case == "not_compressed":
        argv[0] = files.orig
    elif case == "zero_classes":
        argv += ["--num-classes", 0]
    elif case == "batch_too_big":
        argv[4] = 100
    elif case == "no_labels":
        np.savez(files.folder / "nolab.npz", images=random_images(load_checkpoint(files.comp), 8))
        argv[2] = files.folder / "nolab.npz"
    elif case == "same_out":
        argv[-1] = files.comp
    listing = sorted(os.listdir(files.folder))
    code, stdout, stderr = _run(capsys, argv)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "error" in stderr and sorted(os.listdir(files.folder)) == listing


def test_image_folder_data_with_the_3_augment(files, capsys):
    """An ImageFolder tree (photos of another size) trains through the 3-augment and validates
    through the eval transform; an unreadable file is one line, exit 2, nothing written."""
    from PIL import Image
    root = files.folder / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    out, rep = files.folder / "img.fips.npz", files.folder / "img.json"
    code, _, err = _run(capsys, [files.comp, "--data", root, "--eval-data", root, "--epochs", 2,
                                 "--batch-size", 4, "--out", out, "--report", rep, "--quiet"])
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["steps"] == 6 and report["epoch_metrics"][-1]["val_top1"] is not None
    (root / "a" / "bad.png").write_bytes(b"not a png")
    listing = sorted(os.listdir(files.folder))
    code, _, err = _run(capsys, [files.comp, "--data", root, "--epochs", 1, "--batch-size", 13,
                                 "--out", files.folder / "img2.fips.npz", "--quiet"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.png" in err
    assert sorted(os.listdir(files.folder)) == listing


def test_bundled_train_split_is_images_and_labels_and_not_the_test_set():
    """weights/digits_train.npz: the 1437 training digits in the format of digits_test.npz,
    none of them a test image (the demo fine-tunes on it and measures on the test set)."""
    root = os.path.join(os.path.dirname(__file__), "..", "weights")
    train, test = (np.load(os.path.join(root, f"digits_{n}.npz")) for n in ("train", "test"))
    assert train["images"].shape == (1437,) + test["images"].shape[1:]
    assert train["labels"].shape == (1437,) and set(np.unique(train["labels"])) == set(range(10))
    seen = {img.tobytes() for img in test["images"]}
    assert not any(img.tobytes() in seen for img in train["images"])
