"""The structured sparsifiers in the global stage (docs/finetune.md "Sparsifiers", issue 11):
constant fan-in (srigl, set --fan-in constant) and N:M (nm) hold after every step of a tiny
fine-tuning run; condensed files in, condensed files out, read back by decompress and evaluate;
a bitmask sparsifier on a condensed file and the reverse; bad combinations exit 2 with one line.

Files are made by compress as in tests/test_deploy.py. Units, fan-in and the condensed arrays
are decoded here with plain NumPy (docs/compressed-format.md), not by fips_ref.
"""
import json
import os

import numpy as np
import pytest

from fips_ref.checkpoint import json_entry, load_checkpoint, save_npz_atomic
from fips_ref.codec import fips_meta
from fips_ref.compress import main as compress_main
from fips_ref.decompress import main as decompress_main
from fips_ref.evaluate import main as evaluate_main
from fips_ref.finetune import main as finetune_main
from fips_ref.global_stage import GlobalConfig, global_step, init_state, schedule
from fips_ref.models import prepare_model
from fips_ref.sparsity import keep_count

from model_fixtures import make_vit_checkpoint, random_images

FAST = ["--epochs", "2", "--batch-size", "8", "--quiet"]
RUNS = {"srigl": ["--sparsifier", "srigl", "--sparsity", "0.5", "--gamma-sal", "0.9"],
        "set": ["--sparsifier", "set", "--fan-in", "constant", "--sparsity", "0.5"],
        "nm": ["--sparsifier", "nm", "--nm", "1:4", "--round-to", "4"],
        "rigl": ["--sparsifier", "rigl", "--uniform-pruning"]}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 2-block ViT (D 16, F 64, 5 classes) compressed by each of RUNS; train/val .npz."""
    tmp = tmp_path_factory.mktemp("ftstruct")
    ckpt = make_vit_checkpoint(tmp / "vit.npz", depth=2, embed_dim=16, mlp_ratio=4.0, num_classes=5)
    rng = np.random.default_rng(1)
    save_npz_atomic(tmp / "acts.npz", {f"mlp_in.{i}": rng.standard_normal((32, 5, 16)).astype(np.float32)
                                       for i in range(2)})
    for name, n in (("train", 24), ("val", 10)):
        np.savez(tmp / f"{name}.npz", images=random_images(ckpt, n, seed=n), labels=rng.integers(0, 5, n))
    files = {}
    for name, flags in RUNS.items():
        files[name] = tmp / f"{name}.fips.npz"
        assert compress_main([str(tmp / "vit.npz"), "--calib-acts", str(tmp / "acts.npz"),
                              "--out", str(files[name]), *FAST, *flags]) == 0
    return tmp, files


def _units(mask, basis_first):  # [R, cols] -> [units, fan_in]: fc1's fan-in is R, fc2's cols
    return mask.T if basis_first else mask


def _layers(meta):
    return {f"fips.V.{l['key']}": l["basis_first"] for g in meta["groups"] for l in g["layers"]}


def _check_constant(masks, layers, s, ablates):
    """Every active unit of a layer holds the same k; without ablation every unit holds
    keep_count(N, s) // units; with SRigL's ablation k = min(fan_in, keep_count // active)."""
    for key, m in masks.items():
        u = _units(np.asarray(m), layers[key])
        counts = u.sum(axis=1)
        active = counts[counts > 0]
        target = keep_count(m.size, s)
        assert len(set(active.tolist())) == 1, (key, sorted(set(counts.tolist())))
        if ablates:
            assert int(active[0]) == min(u.shape[1], target // active.size)
        else:
            assert active.size == u.shape[0] and int(active[0]) == target // u.shape[0]


def _check_nm(masks, layers, n, m):
    for key, mk in masks.items():
        u = _units(np.asarray(mk), layers[key])
        assert u.shape[1] % m == 0
        assert (u.reshape(u.shape[0], -1, m).sum(axis=2) == n).all(), key


def _own_nm(V, basis_first, n, m):  # [R, cols] -> [R, cols] bool: the N largest |V| of each M
    u = np.abs(_units(V, basis_first))
    g = u.reshape(u.shape[0], -1, m)
    rank = np.argsort(np.argsort(-g, axis=2, kind="stable"), axis=2, kind="stable")
    keep = (rank < n).reshape(u.shape)
    return keep.T if basis_first else keep


# ----------------------------------------------------------------------------- every step
@pytest.mark.parametrize("name", ["srigl", "set", "nm"])
def test_structure_holds_after_every_step(made, name):
    """A mask update every step (Δt 1, q 0.3): constant fan-in exactly k per unit (srigl, set
    constant) or N of every M (nm) after each step; the forward reads V ⊙ mask; masks move
    (srigl, set) or V trains off the mask (nm, SR-STE)."""
    _, files = made
    ck = load_checkpoint(str(files[name]))
    meta = fips_meta(ck)
    s = meta["target_sparsity"]
    model = prepare_model(ck, dtype=np.float64)
    cfg = GlobalConfig(sparsifier=name, sparsity=s, global_pruning=False, delta_t=1, t_end_coeff=0.9,
                       rigl_drop_fraction=0.3, fan_in="constant" if name == "set" else "any",
                       gamma_sal=0.9, nm=(1, 4), lr=1e-2)
    state, mlps = init_state(model, ck, cfg)
    layers = _layers(meta)
    first = {k: m.copy() for k, m in state.masks.items()}
    V0 = {k: state.params[k].copy() for k in state.masks}
    sched = schedule(cfg, 6)
    x = random_images(ck, 4).astype(np.float64)
    t = np.random.default_rng(3).dirichlet(np.ones(5), 4)
    for _ in range(6):
        want = {k: _own_nm(state.params[k], layers[k], 1, 4) for k in state.masks} if name == "nm" else {}
        global_step(state, model, mlps, cfg, sched, x, t)
        if name == "nm":                     # re-selected from |V| before the step's forward
            _check_nm(state.masks, layers, 1, 4)
            assert all(np.array_equal(state.masks[k], want[k]) for k in want)
        else:
            _check_constant(state.masks, layers, s, ablates=name == "srigl")
        for k, m in state.masks.items():
            assert np.array_equal(state.forward_v[k], state.params[k] * m)
    if name == "nm":
        assert any(bool((~state.masks[k] & (state.params[k] != V0[k])).any()) for k in V0)
    else:
        assert any(bool((first[k] != m).any()) for k, m in state.masks.items())


def test_set_is_seeded(made):
    """SET regrows at random from sparsifiers.set_rng(seed): same seed same masks, other seed other."""
    _, files = made
    ck = load_checkpoint(str(files["set"]))
    model = prepare_model(ck, dtype=np.float64)
    x = random_images(ck, 4).astype(np.float64)
    t = np.random.default_rng(3).dirichlet(np.ones(5), 4)
    out = []
    for seed in (0, 0, 5):
        cfg = GlobalConfig(sparsifier="set", fan_in="constant", sparsity=0.5, global_pruning=False,
                           delta_t=1, rigl_drop_fraction=0.3, seed=seed)
        state, mlps = init_state(model, ck, cfg)
        sched = schedule(cfg, 3)
        for _ in range(2):
            global_step(state, model, mlps, cfg, sched, x, t)
        out.append(state.masks)
    assert all(np.array_equal(out[0][k], out[1][k]) for k in out[0])
    assert any(not np.array_equal(out[0][k], out[2][k]) for k in out[0])


# ----------------------------------------------------------------------------- the CLI
def _run(capsys, argv):
    code = finetune_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _ft(capsys, tmp, src, out, *extra):
    code, _, err = _run(capsys, [src, "--data", tmp / "train.npz", "--augment", "none", "--epochs", 2,
                                 "--batch-size", 8, "--delta-t", 1, "--rigl-drop-fraction", 0.3,
                                 "--out", out, "--quiet", *extra])
    assert code == 0, err
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _own_layers(z):
    """{fc key: (W [out, in] float64, mask [R, cols] bool, layer meta)} decoded here from either
    layout: torch W = (U V)ᵀ for fc1 (basis first, math weight U V), (Vᵀ Uᵀ)ᵀ = U V for fc2."""
    meta, out = json.loads(str(z["fips"])), {}
    for g in meta["groups"]:
        U, R, cols = z[f"fips.U.{g['index']}"].astype(np.float64), g["rank"], g["cols"]
        if g.get("layout") != "condensed":
            n = len(g["layers"])
            bits = np.unpackbits(z[f"fips.mask.{g['index']}"], count=n * R * cols).astype(bool)
            V = np.zeros(n * R * cols)
            V[bits] = z[f"fips.values.{g['index']}"]
            Vs, Ms = V.reshape(n, R, cols), bits.reshape(n, R, cols)
        else:
            Vs, Ms = [], []
            for j, layer in enumerate(g["layers"]):
                p = f"fips.V.{g['index']}.{j}"
                vals, idx = z[f"{p}.values"].astype(np.float64), z[f"{p}.indices"].astype(np.int64)
                units, fan_in = (cols, R) if layer["basis_first"] else (R, cols)
                if layer["m"]:
                    k = idx.shape[1] // (fan_in // layer["m"])
                    idx = idx + (np.arange(idx.shape[1]) // k) * layer["m"]
                rows = z[f"{p}.units"].astype(np.int64) if f"{p}.units" in z else np.arange(units)
                u, um = np.zeros((units, fan_in)), np.zeros((units, fan_in), bool)
                for a, r in enumerate(rows):
                    u[r, idx[a]], um[r, idx[a]] = vals[a], True
                Vs.append(u.T if layer["basis_first"] else u)
                Ms.append(um.T if layer["basis_first"] else um)
        for V, M, layer in zip(Vs, Ms, g["layers"]):
            out[layer["key"]] = ((U @ V).T if layer["basis_first"] else U @ V, M, layer)
    return meta, out


@pytest.mark.parametrize("name", ["srigl", "set", "nm"])
def test_cli_keeps_the_input_sparsifier_and_writes_condensed(made, name, capsys):
    """Default --sparsifier: the input's (srigl / set constant / nm), per layer; the output is
    condensed (format 2), its structure holds, decompress gives (U V)ᵀ decoded here, and
    evaluate gives the same top-1 on the compressed file and on its decompressed twin."""
    tmp, files = made
    out = tmp / f"ft_{name}.fips.npz"
    z = _ft(capsys, tmp, files[name], out)
    meta, layers = _own_layers(z)
    run = meta["finetune"]["config"]
    assert meta["format_version"] == 2 and all(g["layout"] == "condensed" for g in meta["groups"])
    assert run["sparsifier"] == name and run["global_pruning"] is False
    assert meta["config"]["sparsifier"] == name                   # the compress run, as recorded
    masks = {f"fips.V.{k}": m for k, (_, m, _) in layers.items()}
    bf = {f"fips.V.{k}": layer["basis_first"] for k, (_, _, layer) in layers.items()}
    if name == "nm":
        _check_nm(masks, bf, 1, 4)
    else:
        _check_constant(masks, bf, meta["target_sparsity"], ablates=name == "srigl")
    dense = tmp / f"dense_{name}.npz"
    assert decompress_main([str(out), str(dense)]) == 0
    with np.load(dense) as d:
        for key, (W, _, _) in layers.items():
            np.testing.assert_allclose(d[f"{key}.weight"], W, rtol=1e-5, atol=1e-6)
    tops = []
    for path in (out, dense):
        rep = tmp / f"ev_{name}_{len(tops)}.json"
        assert evaluate_main([str(path), "--data", str(tmp / "val.npz"), "--json", str(rep)]) == 0
        tops.append(json.loads(rep.read_text())["top1"])
    assert tops[0] == tops[1]
    capsys.readouterr()


def test_bitmask_sparsifier_on_a_condensed_file(made, capsys):
    """--sparsifier rigl on a srigl file: RigL as the authors (global), masks no longer of
    constant fan-in, so the output is a bitmask file (format 1); --sparsifier static keeps the
    loaded masks and the condensed layout (the same indices)."""
    tmp, files = made
    z = _ft(capsys, tmp, files["srigl"], tmp / "r.fips.npz", "--sparsifier", "rigl")
    meta = json.loads(str(z["fips"]))
    assert meta["format_version"] == 1 and "fips.mask.0" in z
    assert not any(k.startswith("fips.V.") for k in z)
    assert meta["finetune"]["config"]["global_pruning"] is True
    assert decompress_main([str(tmp / "r.fips.npz"), str(tmp / "r_dense.npz")]) == 0
    z = _ft(capsys, tmp, files["srigl"], tmp / "st.fips.npz", "--sparsifier", "static")
    with np.load(files["srigl"]) as src:
        keys = [k for k in src.files if k.startswith("fips.V.") and not k.endswith(".values")]
        assert keys and all(np.array_equal(src[k], z[k]) for k in keys)
        assert not all(np.array_equal(src[k], z[k]) for k in src.files if k.endswith(".values"))
    capsys.readouterr()


@pytest.mark.parametrize("src, extra, s", [
    ("rigl", ["--sparsifier", "srigl", "--sparsity", 0.5], 0.5),
    ("rigl", ["--sparsifier", "set", "--fan-in", "constant", "--sparsity", 0.5], 0.5),
    ("set", ["--sparsity", 0.75], 0.75)])
def test_constant_fan_in_from_other_masks(made, capsys, src, extra, s):
    """srigl / set --fan-in constant on masks that are not theirs (a rigl bitmask file, or a set
    file at another sparsity): re-selected to constant fan-in at the requested sparsity before the
    first step (SET itself never changes k), and the output is condensed."""
    tmp, files = made
    z = _ft(capsys, tmp, files[src], tmp / "cf.fips.npz", *extra)
    meta, layers = _own_layers(z)
    assert meta["format_version"] == 2 and meta["config"]["sparsifier"] == src
    masks = {f"fips.V.{k}": m for k, (_, m, _) in layers.items()}
    bf = {f"fips.V.{k}": layer["basis_first"] for k, (_, _, layer) in layers.items()}
    _check_constant(masks, bf, s, ablates="srigl" in extra)


@pytest.mark.parametrize("case, flag", [
    ("global_srigl", "--global-pruning"), ("global_nm", "--global-pruning"),
    ("global_set", "--global-pruning"), ("nm_sparsity", "--sparsity"),
    ("fan_in_rigl", "--fan-in"), ("nm_divides", "--nm"), ("hostile_v2", "fips.V.0.0.indices"),
    ("hostile_config", "config.nm"), ("hostile_target", "target_sparsity")])
def test_bad_combinations_exit_2_one_line_nothing_written(made, capsys, case, flag):
    tmp, files = made
    src = files["srigl"]
    extra = {"global_srigl": ["--global-pruning"], "global_nm": ["--global-pruning"],
             "global_set": ["--global-pruning"], "nm_sparsity": ["--sparsity", "0.5"],
             "fan_in_rigl": ["--sparsifier", "rigl", "--fan-in", "constant"]}.get(case, [])
    if case in ("global_nm", "nm_sparsity"):
        src = files["nm"]
    elif case == "global_set":
        src = files["set"]
    elif case == "nm_divides":
        rank = fips_meta(load_checkpoint(str(files["nm"])))["groups"][0]["rank"]
        m = next(m for m in (3, 5, 6, 7, 9) if rank % m)
        src, extra = files["nm"], ["--nm", f"1:{m}"]
    elif case == "hostile_v2":
        with np.load(files["srigl"]) as z:
            arrays = {k: z[k] for k in z.files if k != "fips.V.0.0.indices"}
        src = tmp / "hostile.fips.npz"
        save_npz_atomic(src, arrays)
    elif case.startswith("hostile_"):                  # the defaults read the file's compress run
        with np.load(files["nm"]) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["fips"]))
        if case == "hostile_config":
            meta["config"]["nm"] = "1:x"
        else:
            meta["target_sparsity"] = "high"
        arrays["fips"] = json_entry(meta)
        src = tmp / f"{case}.fips.npz"
        save_npz_atomic(src, arrays)
        extra = ["--sparsifier", "rigl"] if case == "hostile_target" else []
    work = tmp / f"bad_{case}"
    work.mkdir()
    code, _, err = _run(capsys, [src, "--data", tmp / "train.npz", "--epochs", 1, "--batch-size", 8,
                                 "--out", work / "o.fips.npz", "--report", work / "o.json", *extra])
    assert code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err
    assert os.listdir(work) == []
