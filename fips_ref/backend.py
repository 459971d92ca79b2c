"""Array backend: NumPy by default, CuPy on request. The only module that knows about CuPy.

Every other module writes its array code once, against ``xp``:

    xp = get_xp(x)            # the module that owns the array x
    xp = load_backend("cupy")  # the module for new arrays (CLI: --backend / FIPS_REF_BACKEND)

Random numbers are always drawn on the host with ``np.random.Generator`` and moved with
``xp.asarray``, so the same seed gives the same run on both backends' inputs.
"""
import math
import os
import sys

import numpy as np
import scipy.special

BACKENDS = ("numpy", "cupy")
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
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


# ----------------------------------------------------------------------------- Φ, the normal CDF
# Minimax fit of Q(u) = Φ(−u) ≈ exp(−u²/2) · Σ_k c_k t^(k+1), t = 1/(1 + p·u), u ≥ 0: max error
# 4.9e-9 (fit in docs/derivations.md). Only NumPy float32 uses it: scipy's float32 ndtr/erf is a
# scalar loop (12 ns per element, more than the GEMMs spend on an element of the MLP's hidden
# activations); this one is a few vectorised float64 passes over a cache-sized slab, rounded once
# to float32, so its error (≤ ½ ulp + 4.9e-9) matches scipy's float32 result.
_NDTR_P = 0.275
_NDTR_C = (0.11780924903732229, 0.04211150644351869, 0.3339322341633153, -0.33099334419735926,
           0.45199868609007254, -0.11485832681835517)
SLAB_ELEMENTS = 1 << 14      # elements per slab of NumPy element-wise work (128 KB of float64)


def normal_cdf_pdf(z, pdf=True):  # [...] -> ([...], [...] or None)
    """Φ(z) and (if ``pdf``) φ(z) = exp(−z²/2)/√(2π) element-wise, in z's dtype, for one slab.

    Exact (scipy / cupyx ``ndtr``), except NumPy float32: the minimax formula above, in float64,
    rounded once to float32 (the array should be slab-sized: see row_slabs).
    """
    xp = get_xp(z)
    if xp is np and z.dtype == np.float32:
        cdf, dens = _ndtr_minimax(z.astype(np.float64))
        return cdf.astype(np.float32), dens.astype(np.float32) if pdf else None
    if xp is np:
        cdf = scipy.special.ndtr(z)
    else:
        import cupyx.scipy.special
        cdf = cupyx.scipy.special.ndtr(z)
    return cdf, xp.exp(-0.5 * z * z) * INV_SQRT_2PI if pdf else None


def _ndtr_minimax(z):  # float64 [...] -> (float64 [...], float64 [...])
    """Φ(z) = ½ + sign(z)·(½ − Q(|z|)) with the minimax Q above, and φ(z) from the same exp."""
    t = np.abs(z)
    t += 1.0 / _NDTR_P
    np.divide(1.0 / _NDTR_P, t, out=t)             # t = 1 / (1 + p|z|)
    q = t * _NDTR_C[-1]
    for c in _NDTR_C[-2::-1]:                      # Horner: q = Σ c_k t^(k+1)
        q += c
        q *= t
    e = z * z
    e *= -0.5
    np.exp(e, out=e)                               # exp(−z²/2)
    q *= e                                         # Q(|z|) = Φ(−|z|)
    np.subtract(0.5, q, out=q)
    np.copysign(q, z, out=q)
    q += 0.5
    e *= INV_SQRT_2PI
    return q, e


def row_slabs(n_rows, n_cols, xp):
    """Row ranges for element-wise work: cache-sized on NumPy, one range on a GPU."""
    rows = n_rows if xp is not np else max(1, SLAB_ELEMENTS // max(n_cols, 1))
    return [slice(s, s + rows) for s in range(0, n_rows, rows)]


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
