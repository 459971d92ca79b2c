"""The deployment wiring (docs/deployment.md): structured sparsifiers in the local stage, condensed
files through compress / decompress / evaluate, every inference path through the model forward,
and hostile condensed files (exit 2, one line).

Invariants are checked after every step through run_local_stage's callback=; decoders and
products in the oracles are written here with plain NumPy, not taken from fips_ref.
"""
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fips_ref.checkpoint import InputError, json_entry, load_checkpoint, save_npz_atomic
from fips_ref.compress import main as compress_main
from fips_ref.decompress import main as decompress_main
from fips_ref.evaluate import main as evaluate_main
from fips_ref.infer import PATHS
from fips_ref.local_stage import FiPSConfig, plan_groups, run_local_stage
from fips_ref.models import forward_model, prepare_model
from fips_ref.sparsity import keep_count
from fips_ref.structured import fan_in_axes, unit_view

from model_fixtures import make_vit_checkpoint, mlp_weights

D, F = 8, 32
FAST = ["--epochs", "2", "--batch-size", "8", "--quiet"]


def _model(seed, n_blocks=2, n=32, tokens=2):
    rng = np.random.default_rng(seed)
    w, blocks = mlp_weights(rng, n_blocks, D, F, scaled=True)
    w = {k: v.astype(np.float32) for k, v in w.items()}
    acts = {i: rng.standard_normal((n, tokens, D)).astype(np.float32) for i in range(n_blocks)}
    return w, blocks, acts


def _run(cfg, seed, check, strategy="long"):
    """A local-stage run of two blocks in one group; ``check(state, axes)`` after every step."""
    w, blocks, acts = _model(seed)
    cfg = FiPSConfig(**{**cfg.__dict__, "strategy": strategy})
    seen = []

    def callback(state, loss, lr):
        check(state, axes[0])
        seen.append(state.step)
    axes = []
    axes.append(fan_in_axes(plan_groups(cfg, blocks, [[0, 1]])))
    r = run_local_stage(w, acts, [[0, 1]], cfg, blocks=blocks, dtype=np.float64, callback=callback,
                        errors=False)
    assert seen == list(range(1, r.schedule.total_steps + 1))
    return r


BASE = dict(budget=0.6, epochs=3, batch_size=8, global_pruning=False, delta_t=1, t_end_coeff=0.9)


# ----------------------------------------------------------------------------- local stage invariants
@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), s=st.sampled_from([0.3, 0.5, 0.75]),
       sparsifier=st.sampled_from(["srigl", "set"]), gamma=st.sampled_from([None, 0.3, 0.9]),
       strategy=st.sampled_from(["long", "short"]))
def test_constant_fan_in_exact_k_after_every_update(seed, s, sparsifier, gamma, strategy):
    """srigl and set --fan-in constant: every active unit of every V holds exactly k entries
    after every step, k the same for the layer's active units; srigl's ablation keeps the
    layer's count at keep_count(N, s) up to the rounding to a multiple of the units left."""
    cfg = FiPSConfig(**BASE, sparsity=s, sparsifier=sparsifier, gamma_sal=gamma,
                     fan_in="constant" if sparsifier == "set" else "any")

    def check(state, axes):
        for key, m in state.masks.items():
            counts = unit_view(m, axes[key]).sum(axis=1)                     # [units]
            active = counts[counts > 0]
            units, fan_in = unit_view(m, axes[key]).shape
            target = keep_count(m.size, s)
            assert len(set(active.tolist())) == 1, (key, state.step, sorted(set(counts.tolist())))
            k = int(active[0])
            if sparsifier == "set":                                          # no ablation
                assert active.size == units and k == target // units
            else:                                                            # k' = min(fan_in, target // A)
                assert k == min(fan_in, target // active.size)
                if k < fan_in:                   # ablation keeps the layer's count, up to < 1 per unit
                    assert target - active.size < int(m.sum()) <= target
    _run(cfg, seed, check, strategy)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), nm=st.sampled_from([(1, 4), (2, 4), (1, 2)]),
       strategy=st.sampled_from(["long", "short"]))
def test_nm_holds_in_every_group_after_every_step(seed, nm, strategy):
    """nm: each group of M consecutive fan-in entries of every unit keeps exactly N, every step;
    SR-STE trains the pruned entries too, so V changes off the mask."""
    n, m = nm
    cfg = FiPSConfig(**{**BASE, "budget": 0.7}, sparsifier="nm", nm=nm, sparsity=1 - n / m, round_to=m)
    V0 = {}

    def check(state, axes):
        for key, mk in state.masks.items():
            u = unit_view(mk, axes[key])                                      # [units, fan_in]
            assert u.shape[1] % m == 0
            assert (u.reshape(u.shape[0], -1, m).sum(axis=2) == n).all(), (key, state.step)
            V0.setdefault(key, state.params[key].copy())
    r = _run(cfg, seed, check, strategy)
    changed_off_mask = [bool((~r.masks[k] & (r.params[k] != V0[k])).any()) for k in r.masks]
    assert any(changed_off_mask)


def test_set_runs_are_seeded():
    """Same seed, same masks; another seed, other masks (SET regrows at random)."""
    cfg = FiPSConfig(**BASE, sparsity=0.5, sparsifier="set", fan_in="constant")
    a, b = (_run(cfg, 3, lambda s, x: None) for _ in range(2))
    c = _run(FiPSConfig(**{**cfg.__dict__, "seed": 9}), 3, lambda s, x: None)
    assert all((a.masks[k] == b.masks[k]).all() for k in a.masks)
    assert any((a.masks[k] != c.masks[k]).any() for k in a.masks)


@pytest.mark.parametrize("cfg, match", [
    (dict(sparsifier="srigl", global_pruning=True), "--global-pruning"),
    (dict(sparsifier="nm", global_pruning=True, sparsity=0.75), "--global-pruning"),
    (dict(sparsifier="set", fan_in="constant", global_pruning=True), "--global-pruning"),
    (dict(sparsifier="nm", global_pruning=False, sparsity=0.5), "--sparsity"),
    (dict(sparsifier="nm", global_pruning=False, sparsity=0.75, nm=(1, 4), budget=0.55), "--nm 1:4"),
    (dict(sparsifier="srigl", global_pruning=False, solver="als"), "--solver als"),
    (dict(sparsifier="gmp", fan_in="constant"), "--fan-in constant"),
    (dict(sparsifier="srigl", global_pruning=False, strategy="by-type"), "--concat by-type"),
    (dict(sparsifier="nm", global_pruning=False, sparsity=0.75, strategy="by-block"), "--concat by-block"),
])
def test_impossible_combinations_name_the_flag(cfg, match):
    w, blocks, acts = _model(0)
    with pytest.raises(InputError, match=match):
        run_local_stage(w, acts, [[0, 1]], FiPSConfig(**cfg, batch_size=8), blocks=blocks)


# ----------------------------------------------------------------------------- CLI: compress -> files
@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A 2-block ViT (D 16, F 64) compressed with srigl, nm 1:4 and gmp; {name: (path, ckpt path)}."""
    tmp = tmp_path_factory.mktemp("deploy")
    ckpt = make_vit_checkpoint(tmp / "vit.npz", depth=2, embed_dim=16, mlp_ratio=4.0)
    rng = np.random.default_rng(1)
    save_npz_atomic(tmp / "acts.npz", {f"mlp_in.{i}": rng.standard_normal((32, 5, 16)).astype(np.float32)
                                       for i in range(2)})
    imgs = rng.standard_normal((6,) + (3, *[ckpt.config["img_size"]] * 2)).astype(np.float32)
    save_npz_atomic(tmp / "data.npz", {"images": imgs, "labels": np.arange(6) % ckpt.config["num_classes"]})
    runs = {"srigl": ["--sparsifier", "srigl", "--sparsity", "0.5", "--gamma-sal", "0.9"],
            "nm": ["--sparsifier", "nm", "--nm", "1:4", "--round-to", "4"],
            "gmp": []}
    out = {}
    for name, flags in runs.items():
        dst = tmp / f"{name}.fips.npz"
        argv = [str(tmp / "vit.npz"), "--calib-acts", str(tmp / "acts.npz"), "--out", str(dst),
                "--report", str(tmp / f"{name}.json"), *FAST, *flags]
        assert compress_main(argv) == 0
        out[name] = dst
    return tmp, out


def _own_decode(z, g, layer, j):
    """V_j [R, cols] from a condensed layer's arrays, decoded here (N:M group offsets included)."""
    p = f"fips.V.{g['index']}.{j}"
    vals, idx = z[f"{p}.values"].astype(np.float32), z[f"{p}.indices"].astype(np.int64)
    R, cols = g["rank"], g["cols"]
    units, fan_in = (cols, R) if layer["basis_first"] else (R, cols)
    if layer["m"]:
        n = idx.shape[1] // (fan_in // layer["m"])
        idx = idx + (np.arange(idx.shape[1]) // n) * layer["m"]
    rows = z[f"{p}.units"].astype(np.int64) if f"{p}.units" in z else np.arange(units)
    u = np.zeros((units, fan_in), np.float32)
    for a, r in enumerate(rows):
        u[r, idx[a]] = vals[a]
    return u.T if layer["basis_first"] else u


@pytest.mark.parametrize("name", ["srigl", "nm"])
def test_condensed_file_round_trips_through_decompress(compressed, name, capsys):
    """compress writes format 2 with condensed V (constant fan-in or N:4 per unit); decompress
    gives exactly (U V_j) or (U V_j)ᵀ from those arrays, decoded by this test (float32 products
    of the stored float16, so equal to float tolerance of one matmul, bit-equal masks)."""
    tmp, files = compressed
    dense = tmp / f"{name}.dense.npz"
    assert decompress_main([str(files[name]), str(dense)]) == 0
    z, d = np.load(files[name]), np.load(dense)
    meta = json.loads(str(z["fips"]))
    assert meta["format_version"] == 2
    for g in meta["groups"]:
        assert g["layout"] == "condensed" and not any(k.startswith(f"fips.mask.{g['index']}") for k in z.files)
        U = z[f"fips.U.{g['index']}"].astype(np.float32)
        for j, layer in enumerate(g["layers"]):
            V = _own_decode(z, g, layer, j)
            u = (V.T if layer["basis_first"] else V) != 0                      # [units, fan_in]
            counts = u.sum(axis=1)
            assert len(set(counts[counts > 0].tolist())) == 1
            if name == "nm":
                assert (u.reshape(u.shape[0], -1, 4).sum(axis=2) == 1).all()
            W = U @ V                                                          # [rows, cols]
            want = (W if layer["basis_first"] else W.T).T                      # PyTorch [out, in]
            np.testing.assert_allclose(d[f"{layer['key']}.weight"], want, rtol=1e-5, atol=1e-6)
    rep = json.loads((tmp / f"{name}.json").read_text())["storage"]["condensed"]
    assert rep["file_bytes_condensed"] > 0 and rep["bits_indexed_packed"] > 0
    assert rep["bits_bitmask"] == rep["groups"][0]["bits_bitmask"] * len(rep["groups"])


def test_gmp_files_stay_format_1(compressed):
    z = np.load(compressed[1]["gmp"])
    assert json.loads(str(z["fips"]))["format_version"] == 1 and "fips.mask.0" in z.files


@pytest.mark.parametrize("name", ["srigl", "nm", "gmp"])
def test_every_inference_path_gives_the_same_logits(compressed, name):
    """The model forward through each infer path, and auto, agree to float32 tolerance, and with
    the decompressed dense model."""
    tmp, files = compressed
    ckpt = load_checkpoint(files[name])
    x = np.load(tmp / "data.npz")["images"]
    ref = forward_model(prepare_model(ckpt, mlp_path="materialised"), x)
    for path in PATHS[1:] + (None,):
        np.testing.assert_allclose(forward_model(prepare_model(ckpt, mlp_path=path), x), ref,
                                   rtol=2e-4, atol=2e-4, err_msg=str(path))


@pytest.mark.parametrize("name", ["srigl", "gmp"])
def test_evaluate_cli_paths_agree(compressed, name, capsys):
    tmp, files = compressed
    results = []
    for path in ("auto",) + PATHS:
        js = tmp / f"e_{name}_{path}.json"
        assert evaluate_main([str(files[name]), "--data", str(tmp / "data.npz"), "--path", path,
                              "--reference", str(tmp / "vit.npz"), "--json", str(js)]) == 0
        results.append(json.loads(js.read_text()))
    for r in results[1:]:
        assert r["top1"] == results[0]["top1"] and r["agreement"] == results[0]["agreement"]
        assert abs(r["mean_kl"] - results[0]["mean_kl"]) < 1e-5


# ----------------------------------------------------------------------------- hostile condensed files
def _tampered(tmp, src, name, change):
    z = dict(np.load(src))
    meta = json.loads(str(z["fips"]))
    change(z, meta)
    z["fips"] = json_entry(meta)
    dst = tmp / f"bad_{name}.npz"
    save_npz_atomic(dst, z)
    return dst


def _set(key, fn):
    return lambda z, meta: z.__setitem__(key, fn(z[key]))


HOSTILE = {
    "index_out_of_range": (_set("fips.V.0.1.indices", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0,
                                                                           np.iinfo(a.dtype).max, a).astype(a.dtype)),
                           "out of range|ascending"),
    "signed_indices": (_set("fips.V.0.0.indices", lambda a: a.astype(np.int64)), "unsigned"),
    "float_indices": (_set("fips.V.0.0.indices", lambda a: a.astype(np.float32)), "unsigned"),
    "int_values": (_set("fips.V.0.0.values", lambda a: a.astype(np.int32)), "real floats"),
    "wrong_k_arrays": (_set("fips.V.0.0.values", lambda a: a[:, :-1]), r"values"),
    "wrong_k_meta": (lambda z, m: m["groups"][0]["layers"][0].__setitem__("k", m["groups"][0]["layers"][0]["k"] + 1),
                     "nnz|'k'"),
    "descending": (_set("fips.V.0.0.indices", lambda a: a[:, ::-1].copy()), "ascending"),
    "units_stray": (lambda z, m: z.__setitem__("fips.V.0.0.units", np.arange(3, dtype=np.uint8)), "units"),
    "missing": (lambda z, m: z.pop("fips.V.0.0.indices"), "missing key"),
    "bad_layout": (lambda z, m: m["groups"][0].__setitem__("layout", "ell"), "layout"),
    "v1_condensed": (lambda z, m: m.__setitem__("format_version", 1), "layout"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("tool", ["decompress", "evaluate"])
def test_hostile_condensed_file_exits_2_with_one_line(compressed, case, tool, capsys):
    tmp, files = compressed
    change, match = HOSTILE[case]
    bad = _tampered(tmp, files["srigl"], case, change)
    if tool == "decompress":
        out = tmp / f"out_{case}.npz"
        code = decompress_main([str(bad), str(out)])
        assert not out.exists()
    else:
        code = evaluate_main([str(bad), "--data", str(tmp / "data.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(match, err), err


def test_compress_refuses_global_pruning_for_srigl(compressed, capsys):
    tmp, _ = compressed
    out = tmp / "never.npz"
    code = compress_main([str(tmp / "vit.npz"), "--calib-acts", str(tmp / "acts.npz"), "--out", str(out),
                          "--sparsifier", "srigl", "--global-pruning", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--global-pruning" in err and len(err.splitlines()) == 1 and not out.exists()


def test_convert_reads_condensed_files(compressed, capsys):
    """convert .npz -> .safetensors of a condensed file: the fc weights decompress gives."""
    from fips_ref.convert import main as convert_main, read_safetensors
    tmp, files = compressed
    st, dense = tmp / "nm.safetensors", tmp / "nm.dense2.npz"
    assert convert_main([str(files["nm"]), str(st)]) == 0
    assert decompress_main([str(files["nm"]), str(dense)]) == 0
    got, d = read_safetensors(str(st))[0], np.load(dense)
    for key in ("blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc2.weight"):
        np.testing.assert_array_equal(np.asarray(got[key]), d[key])


def test_compress_refuses_structured_v_with_a_shared_v_strategy(compressed, capsys):
    """--concat by-type (II) shares one V between layers: no one fan-in to keep constant."""
    tmp, _ = compressed
    out = tmp / "never.npz"
    code = compress_main([str(tmp / "vit.npz"), "--calib-acts", str(tmp / "acts.npz"), "--out", str(out),
                          "--sparsifier", "srigl", "--uniform-pruning", "--concat", "II", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
    assert "--concat by-type" in err and "one V per layer" in err, err
