"""Oracle test: models.vjp against timm's autograd (needs torch + timm; skipped without them).

The small timm models of test_models_timm.py (random non-init weights, eval mode) in float64:
logits.backward(dlogits) gives every parameter's .grad, which must equal our hand-written
gradients under the same key and in the same (PyTorch) layout.
Run:  python -m pytest tests/test_backward_timm.py -q
"""
import numpy as np
import pytest

from fips_ref.models import vjp
from model_fixtures import TIMM_SWIN_CASES, TIMM_VIT_CASES, import_timm_reference, timm_case_images

import_timm_reference()   # skips this module without torch and timm
import torch  # noqa: E402
from timm_reference import build_timm_model, export_case  # noqa: E402


def timm_vjp(model, images, dlogits):
    """timm logits and {parameter name: dL/dparam} for the upstream gradient dlogits (float64)."""
    model = model.double()
    model.zero_grad()
    logits = model(torch.from_numpy(images.astype(np.float64)))
    logits.backward(torch.from_numpy(dlogits))
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().numpy(), grads


def compare(model, ckpt, images):
    dlogits = np.random.default_rng(0).standard_normal((images.shape[0],
                                                        ckpt.config["num_classes"]))
    ref_logits, ref = timm_vjp(model, images, dlogits)
    logits, ours = vjp(ckpt, images, dlogits, dtype=np.float64, batch_size=2)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-9, atol=1e-10)
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for key, g in ref.items():
        assert ours[key].shape == g.shape, key
        scale = max(float(np.abs(g).max()), 1e-12)
        np.testing.assert_allclose(ours[key], g, rtol=1e-8, atol=1e-10 * scale, err_msg=key)


@pytest.mark.parametrize("name", sorted(TIMM_VIT_CASES) + sorted(TIMM_SWIN_CASES))
def test_gradients_match_timm_autograd(name):
    """Every case of test_models_timm (ViT, distilled DeiT, Swin shifted and clamped windows)."""
    model = build_timm_model(name)
    compare(model, export_case(name, model), timm_case_images(name))
