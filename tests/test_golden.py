"""Oracle tests: fips_ref against values produced by running the authors' code.

The expected numbers in tests/data/golden_fips.json and tests/data/golden_local_stage.json were
produced by the authors' FiPS code (cemuyuk/FiPS df0b6e1) with sparsimony and torch 2.13 CPU
(docs/testing.md); fips_ref computed none of them. Nothing here needs torch.

Sections: rank grid (docs/authors-code.md §2), SVD init (§3), GMP and RigL schedules, masks and
the RigL dense-gradient timeline (§5), the cosine learning rate (§4.4), and two complete 20-step
float64 local stages replayed step for step through ``run_local_stage`` (§4).
"""
import json
import os
from dataclasses import replace

import numpy as np
import pytest

from fips_ref.adamw import cosine_lr
from fips_ref.backend import to_numpy
from fips_ref.budget import sparse_rank
from fips_ref.checkpoint import MLPBlock, block_prefixes
from fips_ref.local_stage import (FiPSConfig, Schedule, rigl_gradients, run_local_stage,
                                  sparsifier_masks, sparsifier_step)
from fips_ref.sharing import build_groups, svd_init
from fips_ref.sparsity import cubic_sparsity, initial_masks, rigl_drop_fraction, rigl_update
from fips_ref.timm_configs import timm_config

DATA = os.path.join(os.path.dirname(__file__), "data")


def _load(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


G = _load("golden_fips.json")


def _by_key(tensors):  # list of nested lists -> {"v0": array, ...} in the golden's layer order
    return {f"v{i}": np.asarray(t, dtype=np.float64) for i, t in enumerate(tensors)}


def _as_bool(masks):
    return {f"v{i}": np.asarray(m, dtype=bool) for i, m in enumerate(masks)}


def _assert_masks_equal(ours, golden, what):
    for i, m in enumerate(golden):
        got, want = ours[f"v{i}"], np.asarray(m, dtype=bool)
        assert np.array_equal(got, want), (f"{what}: tensor {i} differs at flat indices "
                                           f"{np.flatnonzero(got.ravel() != want.ravel()).tolist()}")


# ----------------------------------------------------------------------------- §2 rank
def test_sparse_rank_matches_authors_grid():
    """All 800 (n_blocks, d, budget, sparsity, rounding) rows of compute_sparse_r, exactly."""
    cols = G["compute_sparse_r"]["columns"]
    wrong = []
    for row in G["compute_sparse_r"]["rows"]:
        r = dict(zip(cols, row))
        got = sparse_rank(r["n_blocks"], r["d"], r["p_budget"], r["sparsity"],
                          round_to=64 if r["rounding"] else None)
        if got != r["rank"]:
            wrong.append((row, got))
    assert len(G["compute_sparse_r"]["rows"]) == 800
    assert not wrong, f"{len(wrong)} rows differ, e.g. {wrong[:3]}"


def _timm_blocks(name):
    """MLPBlocks of a timm model, from its config alone (d doubles per Swin stage, F = 4d)."""
    config = timm_config(name)
    blocks = []
    for i, (prefix, stage) in enumerate(block_prefixes(config)):
        d = config["embed_dim"] * 2 ** stage
        blocks.append(MLPBlock(i, prefix, stage, d, 4 * d))
    return blocks


@pytest.mark.parametrize("model", ["deit_base_patch16_224", "swin_large_patch4_window7_224"])
def test_model_rank_tables_match_authors(model):
    """Ranks per group of DeiT-B and Swin-L at five budgets (SMModel on the timm models), and the
    parameter totals they imply."""
    blocks = _timm_blocks(model)
    for row in G["model_rank_tables"][model]:
        groups = [g["blocks"] for g in row["groups"]]
        plan = build_groups(blocks, groups, budget=row["p_budget"], sparsity=row["sparsity"])
        assert [g.rank for g in plan] == [g["rank"] for g in row["groups"]], row["p_budget"]
        assert [g.rows for g in plan] == [g["d"] for g in row["groups"]]
        u = sum(g.rows * g.rank for g in plan)
        v = sum(g.rank * g.cols * len(g.layers) for g in plan)
        orig = sum(2 * b.d * b.hidden for b in blocks)
        nnz = int(v * (1 - row["sparsity"]))
        assert (u, v, orig, nnz) == (row["total_U_params"], row["total_V_params_dense"],
                                     row["total_orig_mlp_weight_params"],
                                     row["global_nnz_V_target_int"])
        assert (u + nnz) / orig == pytest.approx(row["achieved_budget"], rel=1e-12)


# ----------------------------------------------------------------------------- §3 SVD init
@pytest.mark.parametrize("case", G["svd_decompose"], ids=lambda c: c["name"])
def test_svd_init_matches_authors(case):
    """Truncation, rank = d and Net2Net growth (k ≤ d and cyclic k > d): U·V and the
    sign-canonical factors of svd_decompose."""
    W = np.asarray(case["W"])
    U, V = svd_init(W, case["rank"], case["tau"])
    np.testing.assert_allclose(U @ V, case["U_at_V"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(U, case["U_sign_canonical"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(V, case["V_sign_canonical"], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- §4.4, §5 schedules
def test_cosine_lr_matches_torch_scheduler():
    """CosineAnnealingLR as the authors step it (entry k: lr of the (k+1)-th optimizer step)."""
    for c in G["lr_schedule"]:
        for k, want in c["lr_per_step"].items():
            got = cosine_lr(int(k), lr=c["lr"], eta_min=c["eta_min"], t_max=c["T_max"])
            assert got == pytest.approx(want, rel=1e-12, abs=0), (c["name"], k)


@pytest.mark.parametrize("c", G["accelerated_cubic_schedule"], ids=lambda c: c["name"][:30])
def test_gmp_schedule_matches_authors(c):
    """AcceleratedCubicScheduler: None off the update steps, every value on them, bit for bit."""
    changes = []
    for step in range(c["last_step"] + 1):
        got = cubic_sparsity(step, t_end=c["t_end"], delta_t=c["delta_t"], t_accel=c["t_accel"],
                             initial=c["initial_sparsity"], accelerated=c["accelerated_sparsity"],
                             final=c["final_sparsity"])
        assert got == c["values"].get(str(step)), step
        if step > 0 and got is not None and got != c["initial_sparsity"]:
            changes.append(step)
    assert changes == c["update_steps_where_GMP_changes_mask"]
    assert c["values"][str(c["t_end"])] == c["value_at_t_end"]


@pytest.mark.parametrize("c", G["rigl_cosine_decay"], ids=lambda c: c["name"][:30])
def test_rigl_drop_fraction_matches_authors(c):
    """CosineDecayScheduler: ρ_k on the update steps, None elsewhere."""
    for step in range(c["last_step"] + 1):
        got = rigl_drop_fraction(step, q=c["pruning_ratio"], t_end=c["t_end"], delta_t=c["delta_t"])
        want = c["values"].get(str(step))
        assert (got is None) == (want is None), step
        if want is not None:
            assert got == pytest.approx(want, rel=1e-15, abs=1e-17), step
    updates = [k for k in range(1, c["last_step"] + 1) if str(k) in c["values"]]
    assert updates == c["mask_update_steps"]


# ----------------------------------------------------------------------------- §5 masks
@pytest.mark.parametrize("rule", ["global", "uniform"])
def test_initial_pruning_matches_authors(rule):
    """prepare() of a 75% sparsifier over three tensors: one threshold over all, or per tensor."""
    g = G["global_vs_uniform_pruning"]
    masks = initial_masks(_by_key(g["tensors"]), g["sparsity"], global_pruning=rule == "global")
    _assert_masks_equal(masks, g["results"][rule]["masks"], rule)
    assert [int(m.sum()) for m in masks.values()] == g["results"][rule]["nnz_per_tensor"]


def _gmp_trace_setup(run):
    """The schedule of a gmp_effective_trace run, read from the matching schedule config."""
    c = next(c for c in G["accelerated_cubic_schedule"] if c["name"] == run["config"])
    cfg = FiPSConfig(sparsifier="gmp", sparsity=c["final_sparsity"],
                     gmp_initial=c["initial_sparsity"], gmp_accelerated=c["accelerated_sparsity"],
                     t_accel=c["t_accel"], delta_t=c["delta_t"],
                     global_pruning=run["global_pruning"])
    sched = Schedule(total_steps=c["t_end"] * 4 // 3, t_end=c["t_end"], t_accel=c["t_accel"],
                     delta_t=c["delta_t"], gmp_initial=c["initial_sparsity"])
    return cfg, sched


@pytest.mark.parametrize("i", range(4))
def test_gmp_trace_matches_authors(i):
    """GMP on fixed weights: prepare(), then step() every step to t_end + 10; nnz per tensor at
    every mask change and the final masks, exactly (global and uniform selection)."""
    trace = G["gmp_effective_trace"]
    run = trace["runs"][i]
    cfg, sched = _gmp_trace_setup(run)
    params = _by_key(trace["tensors"])
    masks = sparsifier_masks(cfg, sched, params)
    seen = [{"step": 0, "nnz_per_tensor": [int(m.sum()) for m in masks.values()]}]
    for step in range(1, sched.t_end + 11):
        new = sparsifier_step(cfg, sched, step, params, masks, None)
        if new is not masks:
            seen.append({"step": step, "nnz_per_tensor": [int(m.sum()) for m in new.values()]})
        masks = new
    want = [{k: u[k] for k in ("step", "nnz_per_tensor")} for u in run["updates"]]
    assert seen == want
    _assert_masks_equal(masks, run["final_masks"], run["config"])


@pytest.mark.parametrize("case", G["rigl_mask_update"]["cases"],
                         ids=lambda c: "global" if c["global_pruning"] else "uniform")
def test_rigl_update_matches_authors(case):
    """One RigL drop/grow: prepare() mask, drop fraction, dropped and grown indices, new mask;
    grown weights keep their stored values (the authors' code discards the zero init)."""
    sched_cfg = case["scheduler"]
    V = _by_key(case["weights"])
    before = initial_masks(V, case["sparsity"], global_pruning=case["global_pruning"])
    _assert_masks_equal(before, case["mask_before"], "prepare()")
    rho = rigl_drop_fraction(case["update_step"], q=sched_cfg["quantity"], t_end=sched_cfg["t_end"],
                             delta_t=sched_cfg["delta_t"])
    assert rho == pytest.approx(case["prune_ratio"], rel=1e-15)
    after, grown = rigl_update(V, before, _by_key(case["dense_grads"]), rho, case["sparsity"],
                               global_pruning=case["global_pruning"])
    _assert_masks_equal(after, case["mask_after"], "after the update")
    for i, t in enumerate(case["per_tensor"]):
        k = f"v{i}"
        assert np.flatnonzero(grown[k].ravel()).tolist() == t["grown_flat_indices"], i
        dropped = np.flatnonzero((before[k] & ~(after[k] & ~grown[k])).ravel())
        assert dropped.tolist() == t["dropped_flat_indices"], i
    # the same update through the local stage's sparsifier step (authors' variant)
    cfg = FiPSConfig(sparsifier="rigl", sparsity=case["sparsity"],
                     rigl_drop_fraction=sched_cfg["quantity"], global_pruning=case["global_pruning"])
    sched = Schedule(total_steps=2 * sched_cfg["t_end"], t_end=sched_cfg["t_end"], t_accel=0,
                     delta_t=sched_cfg["delta_t"], gmp_initial=0.0)
    params = {k: v.copy() for k, v in V.items()}
    masks = sparsifier_step(cfg, sched, case["update_step"], params, before, _by_key(case["dense_grads"]))
    _assert_masks_equal(masks, case["mask_after"], "sparsifier_step")
    for i, t in enumerate(case["per_tensor"]):
        assert t["grown_weights_unchanged_from_before"]
        np.testing.assert_array_equal(params[f"v{i}"], V[f"v{i}"])


def test_rigl_dense_gradient_timeline_matches_authors():
    """First update: Σ of the dense gradients of steps 1..Δt; every later one: its own step's."""
    t = G["rigl_dense_grad_timeline"]
    dt, last = t["delta_t"], t["result"][-1]["update_step"]
    cfg = FiPSConfig(sparsifier="rigl")
    sched = Schedule(total_steps=4 * last, t_end=2 * last, t_accel=0, delta_t=dt, gmp_initial=0.0)
    masks, rigl_sum, used = {"v": np.ones(last + 1, bool)}, {}, {}
    for step in range(1, last + 1):
        grads = {"v": np.eye(last + 1)[step]}               # step k's gradient marks entry k
        dense = rigl_gradients(cfg, sched, step, grads, masks, rigl_sum)
        if step % dt == 0:
            used[step] = np.flatnonzero(dense["v"]).tolist()
    for r in t["result"]:
        lo, hi = r["dense_grad_used_equals_sum_of_step_grads_from_to"]
        assert used[r["update_step"]] == list(range(lo, hi + 1)), r


# ----------------------------------------------------------------------------- §4 local stage
L = _load("golden_local_stage.json")
SHARED = L["shared"]
LAYERS = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]


def _layer_norm(x, eps=1e-6):  # [..., D] -> [..., D]; the toy block's LayerNorm (weight 1, bias 0)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)          # biased, as torch
    return (x - mu) / np.sqrt(var + eps)


def _toy_model():
    """Weights, MLP inputs and block layout of the authors' toy two-block model."""
    weights = {k: np.asarray(v, dtype=np.float64) for k, v in SHARED["original_weights"].items()}
    emb = np.asarray(SHARED["calibration_input_emb"])                        # [N, T, D]
    x1 = np.asarray(SHARED["teacher_block_0_output"])                         # [N, T, D]
    d, f = weights["blocks.0.mlp.fc1.weight"].shape[::-1]
    blocks = [MLPBlock(i, f"blocks.{i}", 0, d, f) for i in range(2)]
    acts = {0: _layer_norm(emb), 1: _layer_norm(x1)}                          # teacher forcing
    return weights, acts, blocks, emb, x1


def _toy_config(run):
    h, s = SHARED["hyperparams"], run["sparsifier_cfg"]
    common = dict(budget=0.5, tau=32.0, epochs=h["num_epochs"], batch_size=h["batch_size"],
                  lr=h["lr"], eta_min=h["eta_min"], weight_decay=h["weight_decay"],
                  beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                  t_end_coeff=s["t_end"] / SHARED["T_max"], delta_t=s["delta_t"],
                  global_pruning=run["global_pruning"])
    if run["sparsifier"] == "gmp":
        return FiPSConfig(sparsifier="gmp", sparsity=s["final_sparsity"],
                          gmp_initial=s["initial_sparsity"],
                          gmp_accelerated=s["accelerated_sparsity"], t_accel=s["t_accel"], **common)
    return FiPSConfig(sparsifier="rigl", sparsity=s["sparsity"],
                      rigl_drop_fraction=s["pruning_ratio"], **common)


def _batch_order():
    bs = SHARED["hyperparams"]["batch_size"]
    return [[np.asarray(p[i:i + bs]) for i in range(0, len(p) // bs * bs, bs)]
            for p in SHARED["epoch_permutations"]]


def _column_signs(U_ours, U_golden, rows):
    """±1 per column of U that maps our sign-canonical SVD factors onto torch's.

    SVD signs are arbitrary (docs/authors-code.md §3); the local stage is equivariant under
    flipping U[:, i] with V[i] (AdamW, |V| pruning and |∇| growth all commute with it), and a
    grown column j ≥ q copies row (j − q) mod q of V, so it takes that row's sign.
    """
    q = min(rows, U_ours.shape[1])
    s = np.sign(np.einsum("di,di->i", U_ours[:, :q], U_golden[:, :q]))
    assert np.all(s != 0)
    return np.array([s[j] if j < q else s[(j - q) % q] for j in range(U_ours.shape[1])])


def test_toy_model_teacher_output():
    """Our reading of the toy block: teacher block 0 output = x + fc2(GELU(fc1(LN(x))))."""
    weights, acts, _, emb, x1 = _toy_model()
    from fips_ref.mlp import dense_mlp
    w = {k: weights[f"blocks.0.mlp.{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    h = acts[0].reshape(-1, emb.shape[-1])
    y = dense_mlp(h, w["fc1.weight"].T, w["fc1.bias"], w["fc2.weight"].T, w["fc2.bias"])
    np.testing.assert_allclose(emb + y.reshape(emb.shape), x1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("run", L["runs"], ids=lambda r: r["sparsifier"])
def test_local_stage_replays_authors_run(run, xp):
    """A complete 20-step float64 local stage of the authors' code, replayed through
    run_local_stage with their batch order (on every backend): the init, every step's loss,
    learning rate and sparsity, the masks after prepare() and at the end (exact), the final U,
    V and biases."""
    weights, acts, blocks, _, _ = _toy_model()
    cfg = _toy_config(run)
    seen = []

    def callback(state, loss, lr):
        masks = {k: to_numpy(m) for k, m in state.masks.items()}
        seen.append(dict(step=state.step, loss=float(loss), lr=lr, adam_step=state.adam.step,
                         masks=masks,
                         moments_masked=all(not np.any(to_numpy(state.adam.m[k])[~m]) and
                                            not np.any(to_numpy(state.adam.v[k])[~m])
                                            for k, m in masks.items())))

    res = run_local_stage(weights, acts, [[0, 1]], cfg, blocks=blocks, batch_order=_batch_order(),
                          xp=xp, dtype=np.float64, callback=callback)
    result = replace(res, params={k: to_numpy(v) for k, v in res.params.items()},
                     masks={k: to_numpy(v) for k, v in res.masks.items()})
    per_step, final, n = run["per_step"], run["final"], SHARED["T_max"]
    s = run["sparsifier_cfg"]
    assert (result.schedule.total_steps, result.schedule.t_end, result.schedule.delta_t) == (
        n, s["t_end"], s["delta_t"])
    assert result.groups[0].rank == SHARED["rank"]

    # init: SVD factors up to the arbitrary SVD signs
    from fips_ref.sharing import concat_group
    U0, V0 = svd_init(concat_group(weights, result.groups[0]), SHARED["rank"], cfg.tau)
    signs = _column_signs(U0, np.asarray(SHARED["init_U"]), U0.shape[0])
    np.testing.assert_allclose(U0 * signs, SHARED["init_U"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(signs[:, None] * V0, np.concatenate(SHARED["init_V_per_layer"], 1),
                               rtol=0, atol=1e-12)

    # every step: loss to 1e-9 relative, lr, sparsity, AdamW step count, masked moments
    assert [x["step"] for x in seen] == list(range(1, n + 1))
    assert [x["adam_step"] for x in seen] == list(range(1, n + 1))
    np.testing.assert_allclose([x["loss"] for x in seen], per_step["loss_sum_over_blocks"], rtol=1e-9)
    np.testing.assert_allclose(result.history["loss"], per_step["loss_sum_over_blocks"], rtol=1e-9)
    np.testing.assert_allclose([x["lr"] for x in seen], per_step["lr_used"], rtol=1e-12)
    sparsity = [1 - sum(int(m.sum()) for m in x["masks"].values()) /
                sum(m.size for m in x["masks"].values()) for x in seen]
    np.testing.assert_allclose(sparsity, per_step["global_sparsity_after_step"], rtol=0, atol=1e-15)
    assert all(x["moments_masked"] for x in seen)

    # masks: after prepare() (= after step 1, not an update step) and at the end, exactly
    assert 1 % s["delta_t"] != 0
    for j, layer in enumerate(LAYERS):
        key = f"{layer}.V"
        assert np.array_equal(seen[0]["masks"][key], np.asarray(run["masks_after_prepare"][j], bool)), key
        assert np.array_equal(result.masks[key], np.asarray(final["masks"][j], bool)), key
        assert np.array_equal(seen[-1]["masks"][key], result.masks[key])

    # final parameters: U, V (signs aligned as at init), U·(V ⊙ M) per layer, biases
    U = result.params["U.0"]
    np.testing.assert_allclose(U * signs, final["U"], rtol=1e-9, atol=1e-12)
    U_gold = np.asarray(final["U"])
    for j, layer in enumerate(LAYERS):
        V, M = result.params[f"{layer}.V"], result.masks[f"{layer}.V"]
        V_gold = np.asarray(final["V_original_per_layer"][j])
        np.testing.assert_allclose(signs[:, None] * V, V_gold, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(U @ (V * M), U_gold @ (V_gold * M), rtol=1e-9, atol=1e-12)
    for key, b in final["biases"].items():
        np.testing.assert_allclose(result.params[key], b, rtol=1e-9, atol=1e-12)
