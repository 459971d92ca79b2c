"""The backend's own numerics: Φ and φ (normal_cdf_pdf) on every path, GELU in float32 built on
them, and the row slabs of element-wise work."""
import numpy as np
import pytest
import scipy.special
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from fips_ref.backend import SLAB_ELEMENTS, normal_cdf_pdf, row_slabs, to_numpy
from fips_ref.mlp import gelu, gelu_with_grad

FIT_ERROR = 5e-9        # max |error| of the minimax Q (backend._NDTR_C), docs/derivations.md


def _exact(z):  # float64 Φ, φ, GELU, GELU' of the float32 values z
    z = z.astype(np.float64)
    cdf, pdf = scipy.special.ndtr(z), np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
    return cdf, pdf, z * cdf, cdf + z * pdf


def _ulp(x):
    return np.spacing(np.abs(x)).astype(np.float64)


def _check_float32(z):
    """Φ, φ: ½ ulp + the fit error; GELU = z·Φ, GELU' = Φ + z·φ in float32: ~2 roundings more."""
    cdf, pdf = normal_cdf_pdf(z)
    assert cdf.dtype == pdf.dtype == np.float32 and cdf.shape == z.shape
    e_cdf, e_pdf, e_a, e_g = _exact(z)
    assert (np.abs(cdf - e_cdf) <= 0.5 * _ulp(cdf) + FIT_ERROR).all()
    assert (np.abs(pdf - e_pdf) <= 0.51 * _ulp(pdf) + 1e-300).all()
    m = z.reshape(1, -1)
    for got, want in zip(gelu_with_grad(m), (e_a, e_g)):
        assert got.dtype == np.float32
        zf = np.abs(z.astype(np.float64))
        bound = _ulp(got.ravel()) + zf * _ulp(np.float32(1)) + FIT_ERROR * (1 + zf)
        err = np.abs(got.ravel() - want)
        assert (err <= bound).all(), f"max error {err.max():.3g} at z = {z[np.argmax(err - bound)]}"


def test_float32_on_a_dense_grid():
    _check_float32(np.linspace(-40, 40, 2_000_001, dtype=np.float32))


@given(hnp.arrays(np.float32, st.integers(1, 3 * SLAB_ELEMENTS // 2),
                  elements=st.floats(-1e4, 1e4, width=32)))
def test_float32_any_value(z):
    """Whatever the values and the length (slab boundaries included), within the bound."""
    _check_float32(z)


def test_special_values_and_layouts():
    z = np.array([-np.inf, -0.0, 0.0, np.inf, np.nan], np.float32)
    cdf, _ = normal_cdf_pdf(z)
    np.testing.assert_allclose(cdf[:4], [0.0, 0.5, 0.5, 1.0], rtol=0, atol=FIT_ERROR)
    assert np.isnan(cdf[4])
    m = np.random.default_rng(0).standard_normal((300, 70)).astype(np.float32)
    np.testing.assert_array_equal(gelu(m.T), gelu(np.ascontiguousarray(m.T)))
    np.testing.assert_array_equal(gelu(m[::3, 1:]), gelu(m)[::3, 1:])
    np.testing.assert_array_equal(gelu(m.reshape(3, 100, 70)), gelu(m).reshape(3, 100, 70))
    np.testing.assert_array_equal(gelu_with_grad(m)[0], gelu(m))


def test_float64_and_cupy_are_exact(xp):
    z = np.random.default_rng(1).standard_normal(1000) * 4
    cdf, pdf = normal_cdf_pdf(xp.asarray(z))
    np.testing.assert_allclose(to_numpy(cdf), scipy.special.ndtr(z), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(to_numpy(pdf), np.exp(-z * z / 2) / np.sqrt(2 * np.pi), rtol=1e-14)


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 3), (4096, 3072), (5, SLAB_ELEMENTS * 2)])
def test_row_slabs_cover_every_row_once(rows, cols):
    slabs = row_slabs(rows, cols, np)
    covered = np.concatenate([np.arange(rows)[s] for s in slabs])
    np.testing.assert_array_equal(covered, np.arange(rows))
    assert all((s.stop - s.start) * cols <= max(SLAB_ELEMENTS, cols) for s in slabs)
