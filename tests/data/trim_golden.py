"""Maintainer script: trim the authors'-code golden file into the two files the tests read.

The full file (``fips_golden.json``, ~800 KB) was produced by running the authors' FiPS code
(cemuyuk/FiPS df0b6e1, "icml submission version") with the sparsimony library (f4af0e4) and
torch 2.13 CPU; it is not part of this repository. This script keeps what tests/test_golden.py
checks, drops what a test cannot use (sign-dependent raw SVD factors, the None entries of the
schedules) and stores values shared by the two local-stage runs once. Numbers are copied, never
recomputed: every float is written with Python's shortest round-trip repr, so it is exact.

    python tests/data/trim_golden.py PATH/TO/fips_golden.json

writes tests/data/golden_fips.json and tests/data/golden_local_stage.json.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = ("Values produced by running the authors' code cemuyuk/FiPS df0b6e1 with sparsimony "
          "(mklasby/sparsimony f4af0e4) and torch 2.13 CPU, float64 where it matters; trimmed "
          "by tests/data/trim_golden.py. Tensors are nested lists in PyTorch layout "
          "(nn.Linear.weight is [out, in]); masks are 0/1; index lists are flat row-major.")


def _schedule_values(values):
    """[v_0, None, …] -> {"step": v} for the steps with a value."""
    return {str(k): v for k, v in enumerate(values) if v is not None}


def trim_tables(g):
    out = {"_source": SOURCE}
    out["compute_sparse_r"] = {k: g["compute_sparse_r"][k] for k in ("formula", "columns", "rows")}
    keep = ("p_budget", "sparsity", "total_orig_mlp_weight_params", "total_U_params",
            "total_V_params_dense", "global_nnz_V_target_int", "achieved_budget")
    out["model_rank_tables"] = {
        model: [{**{k: row[k] for k in keep},
                 "groups": [{k: grp[k] for k in ("blocks", "d", "n_blocks", "rank")}
                            for grp in row["groups"]]} for row in rows]
        for model, rows in g["model_rank_tables"].items() if model != "source"}
    out["accelerated_cubic_schedule"] = [
        {**{k: c[k] for k in c if k != "values_step_0_to_t_end_plus_10"},
         "last_step": len(c["values_step_0_to_t_end_plus_10"]) - 1,
         "values": _schedule_values(c["values_step_0_to_t_end_plus_10"])}
        for c in g["accelerated_cubic_schedule"]["configs"]]
    out["gmp_effective_trace"] = {k: g["gmp_effective_trace"][k] for k in ("notes", "tensors", "runs")}
    out["rigl_cosine_decay"] = [
        {**{k: c[k] for k in c if k != "values_step_0_to_t_end_plus_10"},
         "last_step": len(c["values_step_0_to_t_end_plus_10"]) - 1,
         "values": _schedule_values(c["values_step_0_to_t_end_plus_10"])}
        for c in g["rigl_cosine_decay"]["configs"]]
    out["lr_schedule"] = [
        {**{k: c[k] for k in ("name", "lr", "eta_min", "T_max")},
         "lr_per_step": {str(k): v for k, v in enumerate(c["lr_per_step"])
                         if k % 7 == 0 or k >= len(c["lr_per_step"]) - 3}}
        for c in g["lr_schedule"]["configs"]]
    out["svd_decompose"] = [{k: c[k] for k in c if k not in ("U", "V")}
                            for c in g["svd_decompose"]["cases"]]
    out["global_vs_uniform_pruning"] = g["global_vs_uniform_pruning"]
    out["rigl_mask_update"] = {k: g["rigl_mask_update"][k] for k in ("procedure", "cases", "finding")}
    out["rigl_dense_grad_timeline"] = g["rigl_dense_grad_timeline"]
    return out


def trim_local(g):
    src = g["mini_local_distillation"]
    runs = src["runs"]
    shared_keys = ("hyperparams", "T_max", "rank", "layer_order_of_V", "original_weights",
                   "calibration_input_emb", "epoch_permutations")
    for k in shared_keys:
        assert all(r[k] == runs[0][k] for r in runs), k
    for k in ("U", "V_original_per_layer"):
        assert all(r["init"][k] == runs[0]["init"][k] for r in runs), k
    shared = {k: runs[0][k] for k in shared_keys}
    shared["teacher_block_0_output"] = runs[0]["teacher_block_outputs"]["block_0"]
    shared["init_U"] = runs[0]["init"]["U"]
    shared["init_V_per_layer"] = runs[0]["init"]["V_original_per_layer"]
    return {"_source": SOURCE, "procedure": src["source"], "tolerance_hint": src["tolerance_hint"],
            "toy_block": "x + fc2(GELU_erf(fc1(LayerNorm(x)))), LayerNorm weight 1, bias 0, "
                         "eps 1e-6; block 0 input = calibration_input_emb, block 1 input = "
                         "teacher_block_0_output (teacher forcing)",
            "shared": shared,
            "runs": [{"sparsifier": r["sparsifier"], "sparsifier_cfg": r["sparsifier_cfg"],
                      "global_pruning": r["global_pruning"],
                      "masks_after_prepare": r["init"]["masks_after_prepare"],
                      "per_step": r["per_step"], "final": r["final"]} for r in runs]}


def main(argv):
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-3].strip(), file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        g = json.load(f)
    for name, data in (("golden_fips.json", trim_tables(g)), ("golden_local_stage.json", trim_local(g))):
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.write("\n")
        print(name, os.path.getsize(os.path.join(HERE, name)), "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
