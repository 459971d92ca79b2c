"""Maintainer script: store timm's outputs on small random models, so CI tests the models without torch.

Needs torch and timm (never imported by fips_ref); the tests that read the files do not:

    pip install torch==2.13.0 && pip install --no-deps timm    # torchvision: see below
    python weights/make_timm_fixtures.py                        # writes tests/data/timm_*.npz

For each case in tests/model_fixtures.py TIMM_FIXTURE_CASES (a tiny ViT, a distilled DeiT, a
Swin with shifted windows in every stage, a Swin whose window clamps to the last stage's
resolution) it builds the timm model with random O(1) weights (tests/timm_reference.py), runs
it in float64 on three random images and writes tests/data/timm_{name}.npz:

    provenance   str      how the file was made (timm, torch versions)
    config       str      our checkpoint config (JSON)
    w/{key}      float32  the timm state_dict, PyTorch layout, timm keys
    images       float32  [3, 3, H, W] inputs
    logits       float64  [3, K] timm's logits of the float64 model
    mlp_in.{i}   float64  [3, tokens, D] the input of block i's MLP (forward hook on ``mlp``)

timm imports torchvision but its ViT and Swin do not use it; PyPI's torchvision 0.28.0 does not
load next to torch 2.13.0+cpu, so tests/timm_reference.py installs a stub when needed. The
script checks fips_ref's float64 forward against what it stores before writing anything.
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

# timm_reference first: it stubs a missing or broken torchvision before timm is imported
from timm_reference import STUBBED_TORCHVISION, build_timm_model, timm_run  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from model_fixtures import (TIMM_FIXTURE_CASES, timm_case_config, timm_case_images,  # noqa: E402
                            timm_fixture_path)

from fips_ref.checkpoint import Checkpoint, write_atomic  # noqa: E402
from fips_ref.models import forward  # noqa: E402


def make_fixture(name):
    """The arrays of one fixture file, checked against fips_ref's float64 forward."""
    model = build_timm_model(name)
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    config = timm_case_config(name)
    images = timm_case_images(name)
    logits, mlp_in = timm_run(model, images, np.float64)
    ours, acts = forward(Checkpoint(path=f"<{name}>", config=config, tensors=tensors), images,
                         record_mlp_inputs=True, dtype=np.float64)
    assert np.allclose(ours, logits, rtol=1e-9, atol=1e-10), (name, np.abs(ours - logits).max())
    assert len(acts) == len(mlp_in), name
    assert all(np.allclose(acts[i], r, rtol=1e-9, atol=1e-10) for i, r in enumerate(mlp_in)), name
    provenance = (f"made by weights/make_timm_fixtures.py with timm {timm.__version__}, torch "
                  f"{torch.__version__} (CPU){', torchvision stubbed' if STUBBED_TORCHVISION else ''}; "
                  f"random weights (tests/timm_reference.py randomize_), timm outputs in float64")
    arrays = {"provenance": np.array(provenance), "config": np.array(json.dumps(config)),
              "images": images, "logits": logits}
    arrays.update({f"w/{k}": v for k, v in tensors.items()})
    arrays.update({f"mlp_in.{i}": a for i, a in enumerate(mlp_in)})
    return arrays


def main():
    for name in TIMM_FIXTURE_CASES:
        path = timm_fixture_path(name)
        arrays = make_fixture(name)
        write_atomic(path, lambda f: np.savez_compressed(f, **arrays))
        print(f"{path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
