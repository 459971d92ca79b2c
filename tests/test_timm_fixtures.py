"""Oracle test without torch: fips_ref.models against timm outputs stored in tests/data/timm_*.npz.

weights/make_timm_fixtures.py ran the timm models of model_fixtures.TIMM_FIXTURE_CASES (a tiny
ViT, a distilled DeiT, a Swin with shifted windows in every stage, a Swin whose window clamps
to a stage's resolution) in float64 on random weights and stored weights, inputs, logits and
every block's MLP input. fips_ref must reproduce them: to rtol 1e-9 / atol 1e-10 in float64
(this pins e.g. the LayerNorm eps), and to timm's float32 test tolerance (rtol 1e-3 / atol 1e-4)
in float32. tests/test_models_timm.py runs the same cases live when torch and timm are there.
"""
import numpy as np
import pytest

from fips_ref.models import forward
from fips_ref.timm_configs import swin_stage_resolutions
from model_fixtures import TIMM_FIXTURE_CASES, load_timm_fixture, timm_case_config

TOL = {np.float32: dict(rtol=1e-3, atol=1e-4), np.float64: dict(rtol=1e-9, atol=1e-10)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", TIMM_FIXTURE_CASES)
def test_forward_matches_stored_timm_outputs(name, dtype):
    ckpt, images, logits, mlp_in, _ = load_timm_fixture(name)
    ours, acts = forward(ckpt, images, batch_size=2, record_mlp_inputs=True, dtype=dtype)
    assert ours.shape == logits.shape
    assert np.allclose(ours, logits, **TOL[dtype]), f"logits max |diff| {np.abs(ours - logits).max():.3g}"
    assert sorted(acts) == list(range(len(mlp_in)))
    for i, ref in enumerate(mlp_in):
        assert acts[i].shape == ref.shape, (i, acts[i].shape, ref.shape)
        d = np.abs(acts[i] - ref).max()
        assert np.allclose(acts[i], ref, **TOL[dtype]), f"block {i} MLP input max |diff| {d:.3g}"


@pytest.mark.parametrize("name", TIMM_FIXTURE_CASES)
def test_fixture_matches_its_case(name):
    """The stored file is the case model_fixtures defines, and says where it comes from."""
    ckpt, images, logits, mlp_in, provenance = load_timm_fixture(name)
    assert ckpt.config == timm_case_config(name)
    assert "make_timm_fixtures.py" in provenance and "timm" in provenance
    assert images.dtype == np.float32 and logits.dtype == np.float64
    assert all(v.dtype == np.float32 for v in ckpt.tensors.values() if v.dtype.kind == "f")
    n_blocks = ckpt.config.get("depth") or sum(ckpt.config.get("depths", []))
    assert len(mlp_in) == n_blocks
    assert np.isfinite(logits).all() and logits.std() > 0.1       # not a degenerate model


def test_swin_fixtures_cover_shifted_and_clamped_windows():
    """swin_shift: every stage is larger than the window, so every stage shifts; swin_clamp: a
    stage smaller than the window, which clamps to it."""
    def stages(name):
        c = timm_case_config(name)
        return [(min(r), c["window_size"]) for r in swin_stage_resolutions(c)]
    assert all(res > win for res, win in stages("swin_shift"))
    assert any(res < win for res, win in stages("swin_clamp"))
