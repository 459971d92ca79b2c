"""Shared test fixtures: the array backend ``xp``, and hypothesis profiles.

``xp`` runs a test on NumPy and, when CuPy imports and a device exists, on CuPy too. It is
session-scoped so hypothesis tests can use it. Hypothesis profiles: 'ci' (derandomized,
~30 examples) when $CI is set, else 'dev'. Select another with --hypothesis-profile.
"""
import os

import numpy as np
import pytest

try:
    from hypothesis import settings
except ImportError:          # hypothesis is an optional test dependency
    settings = None

if settings is not None:
    settings.register_profile("ci", deadline=None, derandomize=True, max_examples=30)
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _backends():
    names = ["numpy"]
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            names.append("cupy")
    except Exception:        # ImportError, no driver, no device
        pass
    return names


@pytest.fixture(scope="session", params=_backends())
def xp(request):
    """The array module under test: numpy, or cupy where usable."""
    if request.param == "numpy":
        return np
    import cupy
    return cupy
