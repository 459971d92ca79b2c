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
