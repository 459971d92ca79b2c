"""python -m fips_ref.study: every study end to end on a tiny checkpoint, planted structure gives
the ordering its construction implies, the split, both matplotlib paths, and bad input (exit 2)."""
import csv
import sys
from fractions import Fraction

import numpy as np
import pytest

from fips_ref.calib import acts_key
from fips_ref.checkpoint import Checkpoint, find_mlp_blocks, save_npz_atomic
from fips_ref.local_stage import FiPSConfig
from fips_ref.study import STUDIES
from fips_ref.study import output
from fips_ref.study.__main__ import main
from fips_ref.study.context import Context, consecutive_groups, split_calibration
from fips_ref.study.training import measure_group_size
from fips_ref.study.weights import concat_errors, measure_pairs, sparse_factor_error, factor_rank

from model_fixtures import make_vit_checkpoint, random_images

FAST = ["--epochs", "1", "--batch-size", "8", "--quiet"]


@pytest.fixture
def tiny(tmp_path):
    """A 4-block ViT (D 16, F 64), 40 samples of activations, 12 labelled images."""
    ckpt = make_vit_checkpoint(tmp_path / "vit.npz", depth=4, embed_dim=16, mlp_ratio=4.0)
    rng = np.random.default_rng(1)
    save_npz_atomic(tmp_path / "acts.npz", {acts_key(i): rng.standard_normal((40, 5, 16)).astype(np.float32)
                                            for i in range(4)})
    save_npz_atomic(tmp_path / "eval.npz", {"images": random_images(ckpt, 12),
                                            "labels": rng.integers(0, 5, 12)})
    return ckpt


def tiny_args(tmp_path, ckpt):
    return [ckpt.path, "--calib-acts", str(tmp_path / "acts.npz"), "--eval-data", str(tmp_path / "eval.npz")]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- end to end
def test_all_studies_run_end_to_end_on_a_tiny_checkpoint(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    code = main(["all"] + tiny_args(tmp_path, tiny) + ["--out", str(out)] + FAST)
    assert code == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    has_plt = output.load_pyplot() is not None
    for name, study in STUDIES.items():
        rows = read_rows(out / f"{name}.csv")
        assert rows, name
        md = (out / f"{name}.md").read_text()
        assert "**Paper:**" in md and "**Measured:**" in md
        assert f"python -m fips_ref.study {name} {tiny.path}" in md       # the exact command, per study
        assert (out / f"{name}.png").exists() == has_plt
        assert f"== {name}" in stdout
        if study.needs_training and "heldout_rel_error" in rows[0]:
            errs = [float(r["heldout_rel_error"]) for r in rows if r.get("heldout_rel_error")]
            assert errs and all(np.isfinite(errs)) and all(e >= 0 for e in errs)
            assert all(0 <= float(r["top1"]) <= 1 for r in rows if r.get("top1"))
    sp = read_rows(out / "sparsifiers.csv")
    assert {r["sparsifier"] for r in sp} == {"dense", "static", "gmp", "rigl"}
    assert {r["budget"] for r in sp} == {"0.25", "0.5"}
    dense = [r for r in sp if r["sparsifier"] == "dense"]
    assert all(float(r["achieved_sparsity"]) == 0 for r in dense)


def test_same_seed_same_rows(tmp_path, tiny, capsys):
    for d in ("a", "b"):
        assert main(["ablations"] + tiny_args(tmp_path, tiny) + ["--out", str(tmp_path / d)] + FAST) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]   # noqa: E731
    assert strip(read_rows(tmp_path / "a/ablations.csv")) == strip(read_rows(tmp_path / "b/ablations.csv"))


def test_without_matplotlib_csv_markdown_and_a_text_table_said_once(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    monkeypatch.setattr(output, "_SAID", [])
    assert output.load_pyplot() is None
    code = main(["pairs", tiny.path, "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0
    cap = capsys.readouterr()
    assert cap.err.count("matplotlib is not installed") == 1
    assert "block_i" in cap.out and "error_increase" in cap.out              # the text table
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["pairs.csv", "pairs.md"]
    assert main(["concat", tiny.path, "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "matplotlib is not installed" not in capsys.readouterr().err      # said once per process


# ----------------------------------------------------------------------------- planted structure
def planted(D=16, F=64, depth=4, r=3, shared=(0, 1), seed=0):
    """A checkpoint whose MLPs are exactly rank r on the model-width side: fc1 = B_b X, fc2ᵀ = B_b Y;
    the blocks in ``shared`` use one basis B, every other block its own."""
    rng = np.random.default_rng(seed)
    ckpt = make_vit_checkpoint(None, depth=depth, embed_dim=D, mlp_ratio=F / D)
    common = rng.standard_normal((D, r))
    for i in range(depth):
        B = common if i in shared else rng.standard_normal((D, r))
        ckpt.tensors[f"blocks.{i}.mlp.fc1.weight"] = (B @ rng.standard_normal((r, F))).T   # torch [F, D]
        ckpt.tensors[f"blocks.{i}.mlp.fc2.weight"] = B @ rng.standard_normal((r, F))        # torch [D, F]
    return ckpt


def weights_context(ckpt):
    return Context(ckpt, find_mlp_blocks(ckpt), {}, {}, FiPSConfig())


class Opts:
    paper_grid = False
    rank = None


def test_pairs_finds_the_planted_shared_basis():
    """Blocks 0 and 1 share their basis: sharing U costs them nothing and every other pair something."""
    ctx = weights_context(planted(r=3, shared=(0, 1)))
    opts = Opts()
    opts.rank = 3
    rows = measure_pairs(ctx, opts, None)
    modules = [r for r in rows if r["kind"] == "module"]
    assert all(r["weight_rel_error"] < 1e-20 for r in modules)             # each module is rank 3
    pairs = {(r["block_i"], r["block_j"]): r["error_increase"] for r in rows if r["kind"] == "pair"}
    assert len(pairs) == 6
    assert pairs[(0, 1)] < 1e-20
    assert min(v for k, v in pairs.items() if k != (0, 1)) > 1e-3


def test_concat_long_beats_short_when_the_blocks_share_the_model_width_basis():
    """fc1 = B X, fc2ᵀ = B Y for every block: 'long' C = [D, 2nF] has rank r, while 'short'
    C = [F, 2nD] has rank up to 2n·r, so at the same budget long is exact and short is not."""
    ckpt = planted(r=6, shared=(0, 1, 2, 3))
    blocks = find_mlp_blocks(ckpt)
    (_, r_long, e_long), = concat_errors(ckpt, blocks, [[0, 1]], "long", 0.5, 0.0, 32.0)
    (_, r_short, e_short), = concat_errors(ckpt, blocks, [[0, 1]], "short", 0.5, 0.0, 32.0)
    assert r_long >= 6 and r_short < 2 * 2 * 6                            # the construction's premise
    assert e_long < 1e-20 and e_short > 1e-2


def test_sparse_factor_keeps_the_budget_and_the_dense_point_is_eckart_young():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 40))
    s_vals = np.linalg.svd(W, compute_uv=False)
    budget = 0.25 * W.size
    r, err = sparse_factor_error(W, "V", 0.0, budget)
    assert err == pytest.approx((s_vals[r:] ** 2).sum() / (s_vals ** 2).sum(), rel=1e-9)
    for mode in ("U", "V", "both"):
        for s in (0.25, 0.5, 0.9):
            r = factor_rank(mode, 16, 40, budget, s)
            nnz_u = r * 16 * (1 - s) if mode != "V" else r * 16
            nnz_v = r * 40 * (1 - s) if mode != "U" else r * 40
            assert nnz_u + nnz_v <= budget + 1e-9 and r >= 1
            assert 0 <= sparse_factor_error(W, mode, s, budget)[1] <= 1


def test_group_size_ranks_follow_the_budget_inequality(monkeypatch):
    """Rank of n blocks = max r with D·r + δ·r·2nF ≤ p·D·2nF (paper §3), exact rational arithmetic."""
    import fips_ref.study.training as training
    ckpt = make_vit_checkpoint(None, depth=6, embed_dim=16, mlp_ratio=4.0)
    ctx = weights_context(ckpt)
    ctx.base = FiPSConfig(budget=0.4, sparsity=0.75)
    monkeypatch.setattr(training, "grid", lambda opts, default, paper: ())   # closed-form half only
    rows = measure_group_size(ctx, Opts(), None)
    assert len(rows) == 2 * 6
    D, F = 16, 64
    for row in rows:
        n, delta = row["group_size"], 1 - Fraction(row["sparsity"]).limit_denominator(1000)
        p = Fraction(2, 5)
        best = max(r for r in range(0, 10 * D) if D * r + delta * r * 2 * n * F <= p * D * 2 * n * F)
        assert abs(row["rank"] - best) <= 1                 # the authors' float order may lose one
    ranks = [r["rank"] for r in rows if r["sparsity"] > 0]
    assert ranks == sorted(ranks) and ranks[-1] > ranks[0]


# ----------------------------------------------------------------------------- split and groups
def test_split_is_seeded_disjoint_and_complete():
    acts = {b: np.arange(50)[:, None, None] * np.ones((1, 2, 3)) + b for b in range(3)}
    train, held = split_calibration(acts, 0.2, seed=7)
    ids_t, ids_h = train[0][:, 0, 0], held[0][:, 0, 0]
    assert len(ids_h) == 10 and len(ids_t) == 40
    assert sorted(np.concatenate([ids_t, ids_h])) == list(range(50))
    assert all(np.array_equal(train[b][:, 0, 0] - b, ids_t) for b in range(3))   # same rows per block
    again = split_calibration(acts, 0.2, seed=7)
    assert np.array_equal(again[1][0], held[0])
    assert not np.array_equal(split_calibration(acts, 0.2, seed=8)[1][0], held[0])


def test_consecutive_groups_keep_a_short_last_group():
    ckpt = make_vit_checkpoint(None, depth=8, embed_dim=8, mlp_ratio=2.0)
    assert consecutive_groups(find_mlp_blocks(ckpt), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, needle", [
    (["nope"], "NAME"),
    (["pairs", "missing.npz"], "missing.npz"),
    (["ablations", "--holdout", "1"], "--holdout"),
    (["ablations", "--epochs", "0"], "--epochs"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err
    assert not (tmp_path / "o").exists()                                   # nothing left behind


def test_out_that_is_a_file_is_refused(tmp_path, tiny, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["pairs", tiny.path, "--out", str(f)]) == 2
    assert "--out" in capsys.readouterr().err and f.read_text() == "keep me"


def test_holdout_leaving_no_training_sample_is_refused(tmp_path, tiny, capsys):
    code = main(["ablations"] + tiny_args(tmp_path, tiny) + ["--holdout", "0.999", "--out", str(tmp_path / "o")] + FAST)
    assert code == 2 and "--holdout" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def planted_grid(kind, D=16, F=64, r=3, seed=0):
    """by-type: fc1_b = B1 X_b, fc2_bᵀ = B2 X_b (a basis per layer type, a factor per block);
    by-block: fc1_b = B_b X1, fc2_bᵀ = B_b X2 (a basis per block, a factor per layer type)."""
    rng = np.random.default_rng(seed)
    ckpt = make_vit_checkpoint(None, depth=2, embed_dim=D, mlp_ratio=F / D)
    B1, B2, X1, X2 = (rng.standard_normal(s) for s in ((D, r), (D, r), (r, F), (r, F)))
    for i in range(2):
        if kind == "by-type":
            X = rng.standard_normal((r, F))
            w1, w2t = B1 @ X, B2 @ X
        else:
            B = rng.standard_normal((D, r))
            w1, w2t = B @ X1, B @ X2
        ckpt.tensors[f"blocks.{i}.mlp.fc1.weight"] = w1.T                # torch [F, D]
        ckpt.tensors[f"blocks.{i}.mlp.fc2.weight"] = w2t                 # torch [D, F]
    return ckpt


@pytest.mark.parametrize("kind", ["by-type", "by-block"])
def test_concat_grid_strategy_wins_on_its_own_structure(kind):
    """On weights built with the grid's structure, its C [32, 128] has rank 3 while long's C [16, 256]
    has rank 6: at budget 0.3 (long rank 4, grid rank 7) the grid is exact and long is not."""
    ckpt = planted_grid(kind)
    blocks = find_mlp_blocks(ckpt)
    (_, r_grid, e_grid), = concat_errors(ckpt, blocks, [[0, 1]], kind, 0.3, 0.0, 32.0)
    (_, r_long, e_long), = concat_errors(ckpt, blocks, [[0, 1]], "long", 0.3, 0.0, 32.0)
    assert r_grid >= 3 and r_long < 6                                      # the construction's premise
    assert e_grid < 1e-20 and e_long > 1e-3


def test_ablations_rows_and_svd_init_beats_random_init(tmp_path, tiny, capsys):
    """The SVD start reproduces the weights; a He start does not, so after one epoch it is far worse."""
    assert main(["ablations"] + tiny_args(tmp_path, tiny) + ["--out", str(tmp_path / "o")] + FAST) == 0
    rows = {r["ablation"]: r for r in read_rows(tmp_path / "o/ablations.csv")}
    assert rows["random (He) init"]["init"] == "random" and rows["scaling vectors"]["scaling_vectors"] == "True"
    base = float(rows["baseline (SVD init, global pruning)"]["heldout_rel_error"])
    assert float(rows["random (He) init"]["heldout_rel_error"]) > 2 * base


def test_growth_runs_every_method(tmp_path, tiny, capsys):
    assert main(["growth"] + tiny_args(tmp_path, tiny) + ["--out", str(tmp_path / "o")] + FAST) == 0
    rows = read_rows(tmp_path / "o/growth.csv")
    assert {r["growth"] for r in rows} == {"hybrid", "random", "split"}
    assert all(int(r["grown_groups"]) > 0 for r in rows)                  # rank 28 > width 16: growth matters
