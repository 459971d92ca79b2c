"""The backend's own numerics: Φ (normal_cdf) on every path, and the row slabs of element-wise work."""
import numpy as np
import pytest
import scipy.special
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from fips_ref.backend import SLAB_ELEMENTS, normal_cdf, normal_cdf_pdf, row_slabs, to_numpy

FIT_ERROR = 2.2e-9      # max |error| of the minimax Q before rounding (backend._NDTR_C)


def _check_float32(z):
    """|Φ32(z) − Φ(z)| ≤ ½ ulp of the float32 result + the fit error, Φ(z) exact in float64."""
    got = normal_cdf(z)
    assert got.dtype == np.float32 and got.shape == z.shape
    exact = scipy.special.ndtr(z.astype(np.float64))
    bound = 0.5 * np.spacing(np.abs(got)).astype(np.float64) + FIT_ERROR
    err = np.abs(got.astype(np.float64) - exact)
    assert (err <= bound).all(), f"max error {err.max():.3g} at z = {z.ravel()[np.argmax(err - bound)]}"


def test_normal_cdf_float32_on_a_dense_grid():
    _check_float32(np.linspace(-40, 40, 3_000_001, dtype=np.float32))


def test_normal_pdf_float32_is_rounded_float64():
    """φ comes from the same float64 exp as Φ: within ½ ulp (plus exp's own error) of exact."""
    z = np.linspace(-15, 15, 1_000_001, dtype=np.float32)
    cdf, pdf = normal_cdf_pdf(z)
    np.testing.assert_array_equal(cdf, normal_cdf(z))
    exact = np.exp(-0.5 * z.astype(np.float64) ** 2) / np.sqrt(2 * np.pi)
    assert pdf.dtype == np.float32
    assert (np.abs(pdf - exact) <= 0.51 * np.spacing(pdf).astype(np.float64) + 1e-300).all()


@given(hnp.arrays(np.float32, st.integers(1, 3 * SLAB_ELEMENTS // 2),
                  elements=st.floats(width=32, allow_nan=False)))
def test_normal_cdf_float32_any_value(z):
    """Whatever the values and the length (slab boundaries included), within the bound."""
    _check_float32(z)


def test_normal_cdf_special_values_and_layouts():
    z = np.array([-np.inf, -0.0, 0.0, np.inf, np.nan], np.float32)
    got = normal_cdf(z)
    np.testing.assert_array_equal(got[:4], [0.0, 0.5, 0.5, 1.0])
    assert np.isnan(got[4])
    m = np.random.default_rng(0).standard_normal((300, 70)).astype(np.float32)
    np.testing.assert_array_equal(normal_cdf(m.T), normal_cdf(np.ascontiguousarray(m.T)))
    np.testing.assert_array_equal(normal_cdf(m[::3, 1:]), normal_cdf(m)[::3, 1:])


def test_normal_cdf_float64_is_scipy(xp):
    z = np.random.default_rng(1).standard_normal(1000) * 4
    np.testing.assert_allclose(to_numpy(normal_cdf(xp.asarray(z))), scipy.special.ndtr(z),
                               rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 3), (4096, 3072), (5, SLAB_ELEMENTS * 2)])
def test_row_slabs_cover_every_row_once(rows, cols):
    slabs = row_slabs(rows, cols, np)
    covered = np.concatenate([np.arange(rows)[s] for s in slabs])
    np.testing.assert_array_equal(covered, np.arange(rows))
    assert all((s.stop - s.start) * cols <= max(SLAB_ELEMENTS, cols) for s in slabs)
