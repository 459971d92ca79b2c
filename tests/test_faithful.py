"""Issue 7: faithful to the authors at every run length, and to the paper where asked.

Oracles are the authors' formulas written out here (docs/authors-code.md §1.1, §5.3), closed
forms, and finite differences; not values fips_ref computed.
"""
import numpy as np
import pytest

from fips_ref.local_stage import FiPSConfig, resolve_schedule
from fips_ref.sparsity import cubic_sparsity


# ----------------------------------------------------------------------------- schedule lengths
def _authors_gmp_end(total_steps, initial=0.05, accel=0.5, final=0.75):
    """Sparsity the authors' AcceleratedCubicScheduler leaves after a run (docs/authors-code.md §5.3):
    t_end = int(0.75·steps), t_accel 240, Δt 50, value at the last update k ≤ t_end."""
    t_end, t_accel, delta_t = int(0.75 * total_steps), 240, 50
    value = initial
    for k in range(1, t_end + 1):
        if k % delta_t == 0:
            value = initial if k < t_accel else final + (accel - final) * (1 - (k - t_accel) / t_end) ** 3
    return value


def test_authors_gmp_end_matches_the_issue():
    assert round(_authors_gmp_end(600), 4) == 0.7121
    assert round(_authors_gmp_end(1200), 4) == 0.7453


@pytest.mark.parametrize("steps", [600, 601, 900, 1200, 3000])
def test_long_runs_keep_the_authors_absolute_lengths(steps):
    s = resolve_schedule(FiPSConfig(), steps)
    assert (s.t_accel, s.delta_t, s.t_end) == (240, 50, int(0.75 * steps))
    last = max(k for k in range(1, s.t_end + 1) if k % s.delta_t == 0)
    got = cubic_sparsity(last, t_end=s.t_end, delta_t=s.delta_t, t_accel=s.t_accel,
                         initial=s.gmp_initial, accelerated=0.5, final=0.75)
    assert got == pytest.approx(_authors_gmp_end(steps), abs=1e-12)


def test_1200_steps_end_at_the_authors_sparsity_not_the_scaled_one():
    s = resolve_schedule(FiPSConfig(), 1200)
    got = cubic_sparsity(900, t_end=s.t_end, delta_t=s.delta_t, t_accel=s.t_accel,
                         initial=0.05, accelerated=0.5, final=0.75)
    assert round(got, 4) == 0.7453                       # scaling t_accel to 480 would give 0.7121


def test_short_runs_still_scale():
    s = resolve_schedule(FiPSConfig(), 599)
    assert (s.t_accel, s.delta_t) == (599 * 240 // 600, 599 * 50 // 600)
    p = resolve_schedule(FiPSConfig(variant="paper"), 1200)
    assert (p.t_accel, p.delta_t, p.t_end) == (300, 50, 900)     # paper: the 25% mark
    e = resolve_schedule(FiPSConfig(t_accel=7, delta_t=3), 1200)
    assert (e.t_accel, e.delta_t) == (7, 3)


# ----------------------------------------------------------------------------- paper groups
def _stage_blocks(depths, d0=8):
    from fips_ref.checkpoint import MLPBlock
    out, i = [], 0
    for s, n in enumerate(depths):
        for j in range(n):
            out.append(MLPBlock(i, f"layers.{s}.blocks.{j}", s, d0 * 2**s, 4 * d0 * 2**s))
            i += 1
    return out


def _vit_blocks(depth, d=8):
    from fips_ref.checkpoint import MLPBlock
    return [MLPBlock(i, f"blocks.{i}", 0, d, 4 * d) for i in range(depth)]


def test_paper_groups_of_deit_b_and_swin_l_are_the_authors_configs():
    from fips_ref.sharing import paper_groups, parse_groups
    # docs/authors-code.md §1.1, written out as the configs list them
    assert paper_groups(_vit_blocks(12), "vit") == parse_groups("0-3,4-7,8-11")
    assert paper_groups(_stage_blocks((2, 2, 18, 2)), "swin") == parse_groups("0-1,2-3,4-9,10-15,16-21,22-23")


@pytest.mark.parametrize("arch,depths", [("vit", (24,)), ("vit", (6,)), ("vit", (7,)), ("swin", (2, 2, 6, 2)),
                                         ("swin", (2, 2, 8, 2)), ("swin", (1, 3, 13)), ("swin", (6, 7))])
def test_paper_groups_rule_on_other_depths(arch, depths):
    """Each stage in ⌈L/m⌉ consecutive groups whose sizes differ by at most one, larger first."""
    from fips_ref.sharing import check_groups, paper_groups
    blocks = _vit_blocks(depths[0]) if arch == "vit" else _stage_blocks(depths)
    m = 4 if arch == "vit" else 6
    groups = paper_groups(blocks, arch)
    check_groups(groups, blocks)                                     # a partition, inside stages
    for s, n in enumerate(depths):
        sizes = [len(g) for g in groups if blocks[g[0]].stage == s]
        assert len(sizes) == -(-n // m) and sum(sizes) == n
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    for g in groups:
        assert g == list(range(g[0], g[0] + len(g)))                 # consecutive


def test_default_grouping_falls_back_to_paper_only_where_4_cannot_split():
    from fips_ref.sharing import choose_groups
    assert choose_groups(None, None, _vit_blocks(12), "vit") == ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], "group size 4")
    groups, how = choose_groups(None, None, _stage_blocks((2, 2, 18, 2)), "swin")
    assert how == "paper" and [len(g) for g in groups] == [2, 2, 6, 6, 6, 2]
    assert choose_groups(None, None, _stage_blocks((4, 8)), "swin")[1] == "group size 4"
    assert choose_groups(" paper ", 2, _vit_blocks(12), "vit")[1] == "paper"       # --groups wins
    assert choose_groups(None, 2, _stage_blocks((2, 2)), "swin") == ([[0, 1], [2, 3]], "group size 2")


def test_compress_swin_l_shaped_checkpoint_with_no_grouping_flag(tmp_path, capsys):
    """python -m fips_ref.compress swin.npz works on a Swin-L depth layout (2, 2, 18, 2)."""
    import json
    from fips_ref.compress import main
    from model_fixtures import make_swin_checkpoint
    ckpt = make_swin_checkpoint(tmp_path, img_size=32, patch_size=2, embed_dim=4, depths=(2, 2, 18, 2),
                                num_heads=(1, 1, 1, 1), window_size=2)
    report = tmp_path / "r.json"
    code = main([ckpt.path, "--report", str(report), "--epochs", "1", "--batch-size", "4",
                 "--synthetic-samples", "4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["grouping"] == "paper"
    assert [g["blocks"] for g in r["groups"]] == [[0, 1], [2, 3], list(range(4, 10)), list(range(10, 16)),
                                                  list(range(16, 22)), [22, 23]]


# ----------------------------------------------------------------------------- --loss fc (paper Eq. 1)
def _dot(a, b):
    from fips_ref.backend import to_numpy
    return float(np.sum(to_numpy(a) * to_numpy(b)))


def _fc_problem(rng, m=6, d=4, F=10, r=3):
    h = rng.standard_normal((m, d))
    fc1 = [rng.standard_normal(s) for s in ((d, r), (r, F), (F,))]
    fc2 = [rng.standard_normal(s) / 2 for s in ((F, r), (r, d), (d,))]
    W1, b1, W2, b2 = (rng.standard_normal((d, F)), rng.standard_normal(F),
                      rng.standard_normal((F, d)) / 3, rng.standard_normal(d))
    return h, fc1, fc2, (W1, b1, W2, b2)


def _gelu_exact(z):
    from scipy.special import erf
    return 0.5 * z * (1 + erf(z / np.sqrt(2)))


def _fc_target(h, dense):
    from fips_ref.local_stage import FCTarget
    W1, b1, W2, b2 = dense
    z = h @ W1 + b1
    a = _gelu_exact(z)
    return FCTarget(z, a, a @ W2 + b2)


def test_fc_loss_value_is_paper_eq1_written_out():
    """Σ over the two layers of the MSE of each layer, fc2 fed the ORIGINAL GELU(fc1(h))."""
    from fips_ref.local_stage import fc_loss_and_grads
    rng = np.random.default_rng(10)
    h, fc1, fc2, dense = _fc_problem(rng)
    W1, b1, W2, b2 = dense
    loss, _ = fc_loss_and_grads(h, _fc_target(h, dense), fc1, fc2)
    a = _gelu_exact(h @ W1 + b1)
    want = (np.mean((h @ (fc1[0] @ fc1[1]) + fc1[2] - (h @ W1 + b1)) ** 2)
            + np.mean((a @ (fc2[0] @ fc2[1]) + fc2[2] - (a @ W2 + b2)) ** 2))
    assert float(loss) == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("which", [None, 0, 1, 2, 3, 4, 5])
def test_fc_loss_backward_finite_differences(xp, which, factored):
    """float64 random-direction VJP: (L(θ + εu) − L(θ − εu)) / 2ε = ⟨∇L, u⟩."""
    from fips_ref.local_stage import FCTarget
    from fips_ref.mlp import lowrank_fc_backward, lowrank_fc_forward
    rng = np.random.default_rng(11)
    h, fc1, fc2, dense = _fc_problem(rng)
    t = FCTarget(*(xp.asarray(a) for a in _fc_target(h, dense)))
    h, fc1, fc2 = xp.asarray(h), [xp.asarray(a) for a in fc1], [xp.asarray(a) for a in fc2]
    xs = fc1 + fc2
    us = [xp.asarray(rng.standard_normal(x.shape)) if which is None or i == which else None
          for i, x in enumerate(xs)]

    def f(a):
        (z, y), _ = lowrank_fc_forward(h, t.a, a[:3], a[3:], factored=factored)
        return float(((z - t.z) ** 2).mean() + ((y - t.y) ** 2).mean())

    eps = 1e-6
    plus = f([x if u is None else x + eps * u for x, u in zip(xs, us)])
    minus = f([x if u is None else x - eps * u for x, u in zip(xs, us)])
    lhs = (plus - minus) / (2 * eps)
    (z, y), cache = lowrank_fc_forward(h, t.a, fc1, fc2, factored=factored)
    g1, g2 = lowrank_fc_backward(2 * (z - t.z) / z.size, 2 * (y - t.y) / y.size, cache, fc1, fc2)
    rhs = sum(_dot(g, u) for g, u in zip(list(g1) + list(g2), us) if u is not None)
    assert abs(lhs - rhs) <= 1e-6 * max(abs(lhs), abs(rhs), 1e-8), (lhs, rhs)


def test_fc_loss_gradients_of_loss_and_grads_through_masks_and_shared_u():
    """loss_and_grads(loss='fc') over a 2-block group: directional derivative of the stored
    parameters (V through its mask, U summed over its 4 layers) matches the gradients."""
    from dataclasses import replace
    from fips_ref.checkpoint import MLPBlock
    from fips_ref.local_stage import loss_and_grads
    from fips_ref.sharing import build_groups
    rng = np.random.default_rng(12)
    d, F, rank, m = 4, 16, 3, 5
    blocks = [MLPBlock(i, f"blocks.{i}", 0, d, F) for i in range(2)]
    for strategy in ("long", "short"):
        g = replace(build_groups(blocks, [[0, 1]], budget=0.5, sparsity=0.5, strategy=strategy)[0], rank=rank)
        params, masks = {"U.0": rng.standard_normal((g.rows, rank))}, {}
        for l in g.layers:
            params[f"{l.key}.V"] = rng.standard_normal((rank, g.cols))
            masks[f"{l.key}.V"] = rng.random((rank, g.cols)) < 0.5
            params[f"{l.key}.bias"] = rng.standard_normal(F if l.key.endswith("fc1") else d)
        inputs = {b: rng.standard_normal((m, d)) for b in (0, 1)}
        dense = {b: (rng.standard_normal((d, F)), rng.standard_normal(F), rng.standard_normal((F, d)),
                     rng.standard_normal(d)) for b in (0, 1)}
        targets = {b: _fc_target(inputs[b], dense[b]) for b in (0, 1)}
        names = list(params)
        us = {k: rng.standard_normal(params[k].shape) for k in names}
        f = lambda eps: float(loss_and_grads({k: params[k] + eps * us[k] for k in names}, masks, [g],
                                             inputs, targets, {0: None, 1: None}, "fc")[0])
        lhs = (f(1e-6) - f(-1e-6)) / 2e-6
        _, grads = loss_and_grads(params, masks, [g], inputs, targets, {0: None, 1: None}, "fc")
        rhs = sum(_dot(grads[k] * masks[k] if k in masks else grads[k], us[k]) for k in names)
        assert abs(lhs - rhs) <= 1e-6 * max(abs(lhs), abs(rhs)), (strategy, lhs, rhs)


def test_fc_loss_isolates_fc2_from_fc1_errors():
    """fc2's term and gradient do not depend on fc1 (its input is the original activation);
    the MLP loss, which feeds fc2 the compressed fc1 output, does."""
    from fips_ref.local_stage import block_loss_and_grads, fc_loss_and_grads
    rng = np.random.default_rng(13)
    h, fc1, fc2, dense = _fc_problem(rng)
    t = _fc_target(h, dense)
    other_fc1 = [x + rng.standard_normal(x.shape) for x in fc1]
    (_, g2), (_, g2_other) = (fc_loss_and_grads(h, t, f1, fc2)[1] for f1 in (fc1, other_fc1))
    for a, b in zip(g2, g2_other):
        np.testing.assert_array_equal(a, b)
    (_, m2), (_, m2_other) = (block_loss_and_grads(h, t.y, None, f1, fc2)[1] for f1 in (fc1, other_fc1))
    assert not np.allclose(m2[0], m2_other[0])


def test_run_local_stage_with_fc_loss_is_exact_when_the_rank_is_full():
    """At full rank U V = C (docs/authors-code.md §3), so both Eq. (1) terms start at 0, and the
    run differs from the MLP-loss run once the masks make the layers inexact."""
    from fips_ref.checkpoint import MLPBlock
    from fips_ref.local_stage import run_local_stage
    rng = np.random.default_rng(14)
    d, F = 4, 8
    blocks = [MLPBlock(i, f"blocks.{i}", 0, d, F) for i in range(2)]
    w = {}
    for b in blocks:
        w[b.key("mlp.fc1.weight")], w[b.key("mlp.fc1.bias")] = rng.standard_normal((F, d)), rng.standard_normal(F)
        w[b.key("mlp.fc2.weight")], w[b.key("mlp.fc2.bias")] = rng.standard_normal((d, F)), rng.standard_normal(d)
    acts = {b.index: rng.standard_normal((16, 3, d)) for b in blocks}
    cfg = FiPSConfig(budget=1.2, sparsity=0.0, sparsifier="dense", epochs=1, batch_size=8, loss="fc")   # R ≥ d
    r = run_local_stage(w, acts, [[0, 1]], cfg, blocks=blocks, dtype=np.float64, errors=False)
    assert r.history["loss"][0] < 1e-20                     # (then weight decay moves U, V)
    runs = {}
    for loss in ("fc", "mlp"):
        cfg = FiPSConfig(budget=0.5, sparsity=0.5, sparsifier="static", epochs=20, batch_size=16, lr=1e-2,
                         loss=loss)          # full batch: the same objective at every step
        runs[loss] = run_local_stage(w, acts, [[0, 1]], cfg, blocks=blocks, dtype=np.float64)
        assert runs[loss].history["loss"][-1] < runs[loss].history["loss"][0]
    assert not np.allclose(runs["fc"].params["U.0"], runs["mlp"].params["U.0"])
    with pytest.raises(Exception, match="--loss"):
        run_local_stage(w, acts, [[0, 1]], FiPSConfig(loss="block"), blocks=blocks)


# ----------------------------------------------------------------------------- live rank, dead columns
@pytest.mark.parametrize("strategy", ["long", "short"])
def test_encode_drops_dead_rank_columns_losslessly(strategy):
    """A rank column whose V rows are inactive in every layer of the group is not stored, and the
    decompressed weights still equal (U (V ⊙ M)) of the trained factors."""
    from fips_ref.checkpoint import Checkpoint, MLPBlock, json_entry
    from fips_ref.codec import decompressed_tensors, encode, live_rank_columns
    from fips_ref.local_stage import LocalResult, Schedule
    from fips_ref.sharing import build_groups, layer_factors
    rng = np.random.default_rng(20)
    d, F, rank = 4, 8, 6
    blocks = [MLPBlock(i, f"blocks.{i}", 0, d, F) for i in range(2)]
    g = build_groups(blocks, [[0, 1]], budget=0.9, sparsity=0.5, strategy=strategy)[0]
    from dataclasses import replace
    g = replace(g, rank=rank)
    dead = [1, 4]
    params = {"U.0": rng.standard_normal((g.rows, rank))}
    masks = {}
    for l in g.layers:
        params[f"{l.key}.V"] = rng.standard_normal((rank, g.cols))
        m = rng.random((rank, g.cols)) < 0.5
        m[dead] = False
        m[[0, 2, 3, 5], 0] = True                                   # the others are live
        masks[f"{l.key}.V"] = m
        params[f"{l.key}.bias"] = rng.standard_normal(F if l.key.endswith("fc1") else d).astype(np.float32)
    tensors = {f"{l.key}.{w}": np.zeros(1, np.float32) for l in g.layers for w in ("weight", "bias")}
    ckpt = Checkpoint("<t>", {"arch": "vit"}, tensors)
    result = LocalResult([g], params, masks, Schedule(1, 1, 1, 1, 0.05))
    assert live_rank_columns(result, g).tolist() == [r not in dead for r in range(rank)]
    arrays, meta = encode(ckpt, result, {}, storage_dtype=np.float32)
    assert arrays["fips.U.0"].shape == (g.rows, rank - len(dead))
    assert meta["groups"][0]["rank"] == rank - len(dead) and meta["groups"][0]["trained_rank"] == rank
    assert arrays["fips.values.0"].size == sum(int(m.sum()) for m in masks.values())
    dense = decompressed_tensors(Checkpoint("<c>", {"arch": "vit", "depth": 2}, arrays, {"fips": json_entry(meta)}))
    for l in g.layers:
        A, B = layer_factors(params["U.0"], params[f"{l.key}.V"] * masks[f"{l.key}.V"], l)
        np.testing.assert_allclose(dense[f"{l.key}.weight"], (A @ B).T, rtol=1e-5, atol=1e-5)


def test_report_gives_live_rank_and_both_budgets(tmp_path, capsys):
    """A ViT run with --loss fc: per-group live rank, the budget as the authors count it (every
    rank column) and as stored (live ones), and written bits that match the stored count."""
    import json
    from fips_ref.checkpoint import load_checkpoint
    from fips_ref.compress import main
    from model_fixtures import make_vit_checkpoint
    ckpt = make_vit_checkpoint(tmp_path, depth=4, embed_dim=8, mlp_ratio=4.0)
    report, out = tmp_path / "r.json", tmp_path / "c.npz"
    code = main([ckpt.path, "--out", str(out), "--report", str(report), "--epochs", "2",
                 "--batch-size", "8", "--synthetic-samples", "16", "--budget", "0.2",
                 "--sparsity", "0.95", "--gmp-accelerated", "0.9", "--loss", "fc",
                 "--storage-dtype", "float32", "--quiet"])
    assert code == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["config"]["loss"] == "fc" and r["grouping"] == "group size 4"
    meta = json.loads(str(load_checkpoint(out).extra["fips"]))
    p, s = r["params"], r["storage"]
    assert any(g["live_rank"] < g["rank"] for g in r["groups"])        # 95% sparse: dead rows exist
    for g, m in zip(r["groups"], meta["groups"]):
        assert g["live_rank"] == m["rank"] <= g["rank"] == m["trained_rank"]
    nnz = sum(l["nnz"] for m in meta["groups"] for l in m["layers"])
    assert p["mlp_kept"] == nnz + sum(g["rows"] * g["rank"] for g in r["groups"])
    assert p["mlp_kept_stored"] == nnz + sum(g["rows"] * g["live_rank"] for g in r["groups"])
    assert p["achieved_budget_stored"] == pytest.approx(p["mlp_kept_stored"] / p["mlp_original"])
    assert s["written_bits"] - s["formula_bits_at_storage_dtype"] < 8 * len(r["groups"])  # packbits padding


# ----------------------------------------------------------------------------- convert
def _convert(capsys, *argv):
    from fips_ref import convert
    code = convert.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _registered_vit(monkeypatch, **kw):
    from fips_ref.timm_configs import TIMM_CONFIGS
    from model_fixtures import make_vit_checkpoint
    ckpt = make_vit_checkpoint(img_size=8, patch_size=4, embed_dim=8, depth=2, num_classes=5, **kw)
    monkeypatch.setitem(TIMM_CONFIGS, "tiny_vit_test", {**ckpt.config, "timm_name": "tiny_vit_test"})
    return ckpt


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_convert_reads_hidden_width_from_tensors_without_mlp_ratio(tmp_path, capsys, arch):
    """A checkpoint whose config lacks mlp_ratio converts; F is fc1's first dimension, and a
    disagreeing fc2 is still refused."""
    from fips_ref.checkpoint import json_entry, save_npz_atomic
    from fips_ref.convert import read_safetensors
    from model_fixtures import make_swin_checkpoint, make_vit_checkpoint
    ckpt = (make_vit_checkpoint(mlp_ratio=3.0) if arch == "vit" else
            make_swin_checkpoint(mlp_ratio=3.0))
    config = {k: v for k, v in ckpt.config.items() if k != "mlp_ratio"}
    src = tmp_path / "m.npz"
    save_npz_atomic(src, {**ckpt.tensors, "config": json_entry(config)})
    code, err = _convert(capsys, src, tmp_path / "m.safetensors")
    assert code == 0, err
    out, _ = read_safetensors(tmp_path / "m.safetensors")
    assert set(out) == set(ckpt.tensors)
    fc2 = next(k for k in ckpt.tensors if k.endswith("mlp.fc2.weight"))
    bad = dict(ckpt.tensors, **{fc2: ckpt.tensors[fc2][:, :-1]})
    save_npz_atomic(src, {**bad, "config": json_entry(config)})
    code, err = _convert(capsys, src, tmp_path / "bad.safetensors")
    assert code == 2 and fc2 in err and not (tmp_path / "bad.safetensors").exists()


def _compressed(tmp_path, ckpt_path, capsys):
    from fips_ref.compress import main
    out = tmp_path / "c.npz"
    assert main([str(ckpt_path), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--synthetic-samples", "4", "--group-size", "1", "--quiet"]) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("extra", ["foo.weight", "blocks.0.attn.relative_position_index"])
def test_keys_outside_the_timm_list_are_handled_alike_on_every_path(tmp_path, monkeypatch, capsys, extra):
    """An unknown tensor is refused (naming it) on safetensors, .pth and .npz (plain and
    compressed) input alike; a non-persistent buffer is dropped on all of them."""
    from fips_ref.checkpoint import json_entry, save_npz_atomic
    from fips_ref.convert import read_safetensors
    from test_convert import write_st
    ckpt = _registered_vit(monkeypatch)
    buffer = extra.endswith("relative_position_index")
    value = np.arange(4, dtype=np.int64 if buffer else np.float32)
    outcomes = {}
    st = write_st(tmp_path / "in.safetensors", {**{k: ("F32", v) for k, v in ckpt.tensors.items()},
                                                extra: ("I64" if buffer else "F32", value)})
    outcomes["safetensors"] = _convert(capsys, st, tmp_path / "a.npz", "--timm-name", "tiny_vit_test")
    plain = tmp_path / "plain.npz"
    save_npz_atomic(plain, {**ckpt.tensors, extra: value, "config": json_entry(ckpt.config)})
    outcomes["npz"] = _convert(capsys, plain, tmp_path / "b.safetensors")
    clean = tmp_path / "clean.npz"
    save_npz_atomic(clean, {**ckpt.tensors, "config": json_entry(ckpt.config)})
    comp = _compressed(tmp_path, clean, capsys)
    z = dict(np.load(comp))
    save_npz_atomic(comp, {**z, extra: value})                       # as if passed through
    outcomes["compressed npz"] = _convert(capsys, comp, tmp_path / "c.safetensors")
    try:
        import torch
        pth = tmp_path / "in.pth"
        torch.save({**{k: torch.from_numpy(v.copy()) for k, v in ckpt.tensors.items()},
                    extra: torch.from_numpy(value)}, pth)
        outcomes["pth"] = _convert(capsys, pth, tmp_path / "d.npz", "--timm-name", "tiny_vit_test")
    except ImportError:
        pass
    for path, (code, err) in outcomes.items():
        if buffer:
            assert code == 0, (path, err)
        else:
            assert code == 2 and extra in err, (path, err)
    if buffer:
        assert extra not in read_safetensors(tmp_path / "b.safetensors")[0]
        assert extra not in read_safetensors(tmp_path / "c.safetensors")[0]


# ----------------------------------------------------------------------------- evaluate --crop-pct
def test_crop_pct_defaults_come_from_timm_where_known():
    """timm's _cfg crop_pct: .9 in deit.py, vision_transformer.py and swin_transformer.py;
    an unknown model falls back to 0.875 (Resize 256 -> CenterCrop 224)."""
    from fips_ref.timm_configs import TIMM_CONFIGS, default_crop_pct
    for name in TIMM_CONFIGS:
        assert default_crop_pct({"timm_name": name}) == (0.9, f"timm {name}")
    assert default_crop_pct({"arch": "vit"})[0] == 0.875
    assert default_crop_pct({"timm_name": "resnet50"})[0] == 0.875
    assert default_crop_pct({"timm_name": "deit_base_patch16_224", "crop_pct": 0.95})[0] == 0.95


@pytest.mark.parametrize("timm_name,flag,want", [("swin_tiny_patch4_window7_224", [], 0.9),
                                                 (None, [], 0.875),
                                                 ("deit_base_patch16_224", ["--crop-pct", "0.8"], 0.8)])
def test_evaluate_uses_the_model_crop_pct(tmp_path, capsys, monkeypatch, timm_name, flag, want):
    """The crop_pct evaluate hands to the eval transform, and reports."""
    import json
    from PIL import Image
    from fips_ref import evaluate as ev
    from fips_ref.checkpoint import json_entry, save_npz_atomic
    seen = []
    real = ev.iter_image_batches

    def spy(paths, batch_size, **kw):
        seen.append(kw["crop_pct"])
        return real(paths, batch_size, **kw)

    monkeypatch.setattr(ev, "iter_image_batches", spy)
    import fips_ref.models as models
    monkeypatch.setattr(models, "prepare_model", lambda ckpt, **kw: ckpt.config)
    monkeypatch.setattr(models, "forward_model", lambda cfg, x, **kw: np.asarray(x).mean(axis=(2, 3)))
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "d" / "a" / "x.png")
    config = {"arch": "vit", "depth": 0, "num_classes": 3, "img_size": 8, "in_chans": 3}
    if timm_name:
        config["timm_name"] = timm_name
    model = tmp_path / "m.npz"
    save_npz_atomic(model, {"config": json_entry(config), "unused": np.zeros(1, np.float32)})
    code = ev.main([str(model), "--data", str(tmp_path / "d"), "--json", str(tmp_path / "o.json"), *flag])
    assert code == 0, capsys.readouterr().err
    assert seen == [want] and json.loads((tmp_path / "o.json").read_text())["crop_pct"] == want
