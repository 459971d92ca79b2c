"""Array backend: NumPy by default, CuPy on request. The only module that knows about CuPy.

Every other module writes its array code once, against ``xp``:

    xp = get_xp(x)            # the module that owns the array x
    xp = load_backend("cupy")  # the module for new arrays (CLI: --backend / FIPS_REF_BACKEND)

Random numbers are always drawn on the host with ``np.random.Generator`` and moved with
``xp.asarray``, so the same seed gives the same run on both backends' inputs.
"""
import os
import sys

import numpy as np
import scipy.special

BACKENDS = ("numpy", "cupy")
ENV_VAR = "FIPS_REF_BACKEND"


class BackendError(RuntimeError):
    """The requested backend cannot be used here (one-line message)."""


def default_backend_name():
    """Backend named by $FIPS_REF_BACKEND, else 'numpy'."""
    return os.environ.get(ENV_VAR, "numpy") or "numpy"


def load_backend(name=None):
    """Return the array module for ``name`` ('numpy' or 'cupy'; None: $FIPS_REF_BACKEND)."""
    name = default_backend_name() if name is None else name
    if name == "numpy":
        return np
    if name != "cupy":
        raise BackendError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # ImportError, CUDARuntimeError, missing libraries...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackendError(f"backend 'cupy' is not usable here: {msg}") from None
    return cupy


def is_cupy_array(x):
    """True for a CuPy ndarray; never imports CuPy (array-api-compat's check)."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def get_xp(*arrays):
    """The array module owning ``arrays`` (NumPy unless one of them is a CuPy array)."""
    for a in arrays:
        if is_cupy_array(a):
            return sys.modules["cupy"]
    return np


def to_numpy(x):
    """Copy an array of either backend to host NumPy (no copy for NumPy input)."""
    return x.get() if is_cupy_array(x) else np.asarray(x)


def erf(x):
    """Element-wise error function on the array's own backend."""
    if is_cupy_array(x):
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    return scipy.special.erf(x)


def synchronize(xp):
    """Wait for queued device work (timing and logging boundaries only)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def device_name(xp):
    """Human-readable device of the backend, for reports."""
    if xp is np:
        return "cpu"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def peak_device_bytes(xp):
    """Bytes held by the backend's memory pool (0 on NumPy)."""
    return 0 if xp is np else int(xp.get_default_memory_pool().total_bytes())
