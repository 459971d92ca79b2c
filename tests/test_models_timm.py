"""Oracle test: fips_ref.models against timm itself (needs torch + timm; skipped without them).

Small timm models with random (non-init) weights are exported state_dict -> our checkpoint
format and compared on logits and on every block's MLP input (forward hooks on ``mlp``).
Tolerances: rtol 1e-3 / atol 1e-4 in float32 (timm tests/test_models.py), 1e-9 in float64;
the float64 check is what pins the LayerNorm eps (1e-6 vs 1e-5 moves outputs by ~1e-6).
Cases: model_fixtures.TIMM_VIT_CASES / TIMM_SWIN_CASES; the same comparison without torch, on
stored timm outputs, is tests/test_timm_fixtures.py.
Run:  python -m pytest tests/test_models_timm.py -q
"""
import numpy as np
import pytest

from fips_ref.checkpoint import json_entry, load_checkpoint, save_npz_atomic
from fips_ref.models import forward
from model_fixtures import (TIMM_SWIN_CASES, TIMM_VIT_CASES, import_timm_reference, timm_case_images,
                            timm_swin_config)

import_timm_reference()   # skips this module without torch and timm
from timm.models.swin_transformer import SwinTransformer  # noqa: E402
from timm_reference import build_timm_model, export_case, randomize_, timm_run  # noqa: E402

TOL = {np.float32: dict(rtol=1e-3, atol=1e-4), np.float64: dict(rtol=1e-9, atol=1e-10)}


def compare(model, ckpt, images, dtype):
    ours, acts = forward(ckpt, images, batch_size=2, record_mlp_inputs=True, dtype=dtype)
    ref, ref_acts = timm_run(model, images, dtype)
    diff = np.abs(ours - ref).max()
    assert np.allclose(ours, ref, **TOL[dtype]), f"logits max |diff| {diff:.3g}"
    assert len(acts) == len(ref_acts)
    for i, r in enumerate(ref_acts):
        assert acts[i].shape == r.shape, (i, acts[i].shape, r.shape)
        d = np.abs(acts[i] - r).max()
        assert np.allclose(acts[i], r, **TOL[dtype]), f"block {i} MLP input max |diff| {d:.3g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(TIMM_VIT_CASES) + sorted(TIMM_SWIN_CASES))
def test_model_matches_timm(name, dtype):
    model = build_timm_model(name)
    compare(model, export_case(name, model), timm_case_images(name), dtype)


def test_saved_file_round_trip_matches_timm(tmp_path):
    """The same check through a real .npz file written and read by fips_ref.checkpoint."""
    kw = TIMM_SWIN_CASES["swin_clamp"]
    model = randomize_(SwinTransformer(**kw), seed=3)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    path = tmp_path / "swin.npz"
    save_npz_atomic(path, {**tensors, "config": json_entry(timm_swin_config(kw))})
    images = timm_case_images("swin_clamp", n=2)
    ours = forward(str(path), images, dtype=np.float64)
    ref, _ = timm_run(model, images, np.float64)
    assert np.allclose(ours, ref, **TOL[np.float64]), np.abs(ours - ref).max()
    assert load_checkpoint(path).config["arch"] == "swin"
