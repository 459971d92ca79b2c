"""Tests of fips_ref.condensed: bit-exact round trips, index dtypes, the storage formulas (docs/deployment.md §4)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from fips_ref.backend import to_numpy
from fips_ref.condensed import (decode, encode, from_arrays, index_bits, index_dtype,
                                indexed_storage_bits, npz_bytes, storage_report, to_arrays)
from fips_ref.structured import constant_fan_in_mask, nm_mask, unit_view

DTYPES = [np.float16, np.float32, np.float64]


@given(seed=st.integers(0, 2**32 - 1), units=st.integers(1, 10), fan_in=st.integers(1, 300),
       axis=st.sampled_from([0, 1]), dtype=st.sampled_from(DTYPES), n_dead=st.integers(0, 3),
       data=st.data())
def test_constant_fan_in_round_trip_bit_exact(xp, seed, units, fan_in, axis, dtype, n_dead, data):
    """decode(encode(V, mask)) == (V ⊙ mask, mask) bit for bit, ablated units included."""
    rng = np.random.default_rng(seed)
    shape = (fan_in, units) if axis == 0 else (units, fan_in)
    V = rng.standard_normal(shape).astype(dtype)
    k = data.draw(st.integers(1, fan_in))
    mask = constant_fan_in_mask(V, k, axis)
    unit_view(mask, axis)[:min(n_dead, units - 1)] = False              # SRigL-ablated units
    c = encode(xp.asarray(V), xp.asarray(mask), axis)
    assert c.indices.dtype == index_dtype(fan_in) and c.values.dtype == dtype
    v2, m2 = (to_numpy(a) for a in decode(c))
    assert (m2 == mask).all()
    assert v2.dtype == dtype and (v2.view(np.uint8) == np.where(mask, V, 0).astype(dtype).view(np.uint8)).all()


@given(seed=st.integers(0, 2**32 - 1), units=st.integers(1, 6), groups=st.integers(1, 6),
       nm=st.sampled_from([(1, 4), (2, 4), (2, 8)]), axis=st.sampled_from([0, 1]))
def test_nm_round_trip_bit_exact_with_group_indices(xp, seed, units, groups, nm, axis):
    """N:M stores k = G·N values and indices inside each group of M (uint8)."""
    n, m = nm
    shape = (groups * m, units) if axis == 0 else (units, groups * m)
    V = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    mask = nm_mask(V, n, m, axis)
    c = encode(xp.asarray(V), xp.asarray(mask), axis, m=m)
    assert c.indices.dtype == np.uint8 and c.values.shape == (units, groups * n)
    assert int(to_numpy(c.indices).max()) < m
    v2, m2 = (to_numpy(a) for a in decode(c))
    assert (m2 == mask).all() and (v2 == np.where(mask, V, 0)).all()


def test_index_dtype_and_bits():
    assert [index_dtype(n) for n in (1, 256, 257, 65536, 65537)] == \
        [np.uint8, np.uint8, np.uint16, np.uint16, np.uint32]
    assert [index_bits(n) for n in (1, 2, 4, 682, 3072)] == [1, 1, 2, 10, 12]


def test_encode_refuses_varying_fan_in_and_broken_nm():
    mask = np.array([[True, True, False], [True, False, False]])
    with pytest.raises(ValueError, match="not constant fan-in"):
        encode(np.ones((2, 3)), mask, 1)
    nm = np.array([[True, True, False, False, True, False, False, False]])   # 2 then 1 per group
    with pytest.raises(ValueError, match="not N:4"):
        encode(np.ones((1, 8)), nm, 1, m=4)


def test_decode_refuses_out_of_range_or_repeated_indices():
    c = encode(np.ones((2, 4)), np.array([[True, False, True, False]] * 2), 1)
    with pytest.raises(ValueError, match="out of range"):
        decode(c._replace(indices=np.array([[0, 4], [0, 1]], dtype=np.uint8)))
    with pytest.raises(ValueError, match="ascending"):
        decode(c._replace(indices=np.array([[1, 1], [0, 1]], dtype=np.uint8)))


def test_units_stored_only_after_ablation():
    V = np.random.default_rng(0).standard_normal((4, 6))
    mask = constant_fan_in_mask(V, 2, 1)
    assert set(to_arrays(encode(V, mask, 1), "v")) == {"v.values", "v.indices"}
    mask[2] = False
    arrays = to_arrays(encode(V, mask, 1), "v")
    assert arrays["v.units"].tolist() == [0, 1, 3]


def test_storage_formulas_closed_form_and_file_bytes():
    """Bitmask formula = paper §3, 16·(d·r + nnz) + r·cols; the indexed one swaps the r·cols mask
    bits for idx_bits per value; the .npz bytes are the formula's bytes plus the file overhead."""
    rng = np.random.default_rng(0)
    d, f, r = 32, 128, 24                                               # U [d, r], V_j [r, f]
    U = rng.standard_normal((d, r))
    fc1 = encode(V := rng.standard_normal((r, f)), constant_fan_in_mask(V, 6, 0), 0)
    fc2 = encode(V := rng.standard_normal((r, f)), constant_fan_in_mask(V, 32, 1), 1)
    rep = storage_report(U, [fc1, fc2])
    nnz = 6 * f + 32 * r
    assert rep["nnz"] == nnz and rep["cols"] == 2 * f
    assert rep["bits_bitmask"] == 16 * (d * r + nnz) + r * 2 * f
    assert rep["bits_indexed_packed"] == 16 * (d * r + nnz) + 5 * 6 * f + 7 * 32 * r   # ⌈log2 24⌉, ⌈log2 128⌉
    assert rep["bits_indexed_dtype"] == 16 * (d * r + nnz) + 8 * nnz                   # uint8 both
    assert 0 < rep["file_bytes_condensed"] - rep["bits_indexed_dtype"] // 8 < 2048     # 5 arrays' headers
    assert 0 < rep["file_bytes_bitmask"] - -(-rep["bits_bitmask"] // 8) < 2048
    assert indexed_storage_bits(d, r, [(10, 3, 0), (5, 2, 7)], 16) == 16 * (d * r + 15) + 30 + 10 + 7


def test_npz_bytes_counts_array_payload():
    small, big = npz_bytes({"a": np.zeros(10, np.uint8)}), npz_bytes({"a": np.zeros(1010, np.uint8)})
    assert big - small == 1000


@pytest.mark.parametrize("ablate, m", [(False, 0), (True, 0), (False, 4)])
def test_round_trip_through_an_npz_file(tmp_path, ablate, m):
    """encode → to_arrays → np.savez → np.load → from_arrays → decode gives V ⊙ mask bit for bit."""
    V = np.random.default_rng(5).standard_normal((12, 40)).astype(np.float16)
    mask = nm_mask(V, 1, 4, 0) if m else constant_fan_in_mask(V, 3, 0)
    if ablate:
        mask[:, [2, 7]] = False                                           # units are columns (axis 0)
    np.savez(tmp_path / "v.npz", **to_arrays(encode(V, mask, 0, m), "fips.V.0.1"))
    with np.load(tmp_path / "v.npz") as f:
        c = from_arrays(dict(f), "fips.V.0.1", n_units=40, fan_in=12, axis=0, m=m)
    v2, m2 = decode(c)
    assert (m2 == mask).all() and (v2.view(np.uint16) == np.where(mask, V, 0).view(np.uint16)).all()


def test_from_arrays_refuses_inconsistent_arrays():
    arrays = to_arrays(encode(np.ones((2, 4)), np.array([[True, False, True, False]] * 2), 1), "v")
    arrays["v.indices"] = arrays["v.indices"][:1]
    with pytest.raises(ValueError, match="arrays v.. disagree"):
        from_arrays(arrays, "v", n_units=2, fan_in=4, axis=1)
