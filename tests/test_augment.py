"""fips_ref.augment: the losses' gradients (finite differences), Mixup/CutMix label mass and box
area, and the 3-augment's operations against their closed forms."""
import numpy as np
import pytest

from fips_ref.augment import (AugmentConfig, color_jitter, cutmix_box, grayscale, kl_distill,
                              mix_batch, rrc_box, smooth_one_hot, soft_target_ce, solarize,
                              three_augment)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402


def _fd_check(f, z, seed):
    """Random-direction check in float64: <dL/dz, u> against (L(z + hu) − L(z − hu)) / 2h."""
    u = np.random.default_rng(seed).standard_normal(z.shape)
    _, g = f(z)
    h = 1e-6
    fd = (f(z + h * u)[0] - f(z - h * u)[0]) / (2 * h)
    np.testing.assert_allclose(float((g * u).sum()), float(fd), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_soft_target_ce_gradient(seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((6, 5)) * 3
    t = rng.random((6, 5))
    t /= t.sum(axis=1, keepdims=True)
    _fd_check(lambda a: soft_target_ce(a, t), z, seed + 10)


def test_soft_target_ce_closed_form():
    """Uniform logits: L = log K whatever the (normalised) target; one-hot target: −log p_y."""
    t = np.full((2, 4), 0.25)
    assert soft_target_ce(np.zeros((2, 4)), t)[0] == pytest.approx(np.log(4))
    z = np.array([[1.0, 2.0, 3.0]])
    p = np.exp(z) / np.exp(z).sum()
    loss, g = soft_target_ce(z, np.array([[0.0, 1.0, 0.0]]))
    assert loss == pytest.approx(-np.log(p[0, 1]))
    np.testing.assert_allclose(g, p - [[0, 1, 0]])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_distill_gradient_and_zero_at_teacher(temperature):
    rng = np.random.default_rng(3)
    z, t = rng.standard_normal((4, 7)), rng.standard_normal((4, 7))
    _fd_check(lambda a: kl_distill(a, t, temperature), z, 4)
    loss, g = kl_distill(t, t, temperature)
    assert loss == pytest.approx(0, abs=1e-12) and np.abs(g).max() < 1e-12


@given(st.integers(2, 12), st.integers(2, 9), st.floats(0, 0.5), st.integers(0, 2**32 - 1),
       st.sampled_from(["mixup", "cutmix", "both"]))
def test_mixed_targets_keep_every_label_mass(b, k, smoothing, seed, mode):
    """Rows sum to 1, and the batch's total mass per class equals that of the smoothed one-hots
    (mixing with the flipped batch moves mass between images, never creates or loses it)."""
    rng = np.random.default_rng(seed)
    cfg = AugmentConfig(mixup=0 if mode == "cutmix" else 0.8, cutmix=0 if mode == "mixup" else 1.0,
                        smoothing=smoothing)
    x = rng.standard_normal((b, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, k, b)
    xm, t, lam = mix_batch(x, y, k, cfg, np.random.default_rng(seed))
    assert xm.shape == x.shape and 0 <= lam <= 1
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(t.sum(axis=0), smooth_one_hot(y, k, smoothing).sum(axis=0), atol=1e-9)


@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_cutmix_box_inside_image_and_lambda_is_the_area(h, w, lam, seed):
    """The box lies in the image; CutMix's corrected λ is 1 − (pixels taken from the flipped
    batch) / (H·W), counted on images that differ everywhere."""
    y0, y1, x0, x1 = cutmix_box(h, w, lam, np.random.default_rng(seed))
    assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
    x = np.stack([np.zeros((1, h, w)), np.ones((1, h, w))]).astype(np.float32)
    cfg = AugmentConfig(mixup=0, cutmix=1.0)
    xm, t, lam2 = mix_batch(x, np.array([0, 1]), 2, cfg, np.random.default_rng(seed))
    taken = float((xm[0] == 1).sum())
    assert lam2 == pytest.approx(1 - taken / (h * w))
    assert t[0, 0] == pytest.approx(lam2 * 0.95 + (1 - lam2) * 0.05)


def test_no_mixing_gives_the_smoothed_labels():
    cfg = AugmentConfig(mixup=0, cutmix=0, smoothing=0.1)
    x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    xm, t, lam = mix_batch(x, np.array([2, 0]), 4, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(xm, x)
    np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])


@given(st.integers(1, 64), st.integers(1, 64), st.integers(0, 2**32 - 1))
def test_rrc_box_within_the_image_and_scale(h, w, seed):
    top, left, ch, cw = rrc_box(h, w, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed))
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def test_pixel_operations_closed_forms():
    img = np.random.default_rng(0).random((3, 5, 5)).astype(np.float32)
    g = grayscale(img)
    np.testing.assert_allclose(g[1], 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2], rtol=1e-6)
    one = img[:1]
    np.testing.assert_array_equal(grayscale(one), one)
    s = solarize(img)
    np.testing.assert_allclose(s, np.where(img >= 128 / 255, 1 - img, img))
    np.testing.assert_array_equal(color_jitter(img, 0.0, np.random.default_rng(1)), img)


def test_three_augment_is_seeded_and_in_range():
    img = np.random.default_rng(0).random((3, 20, 16)).astype(np.float32)
    cfg = AugmentConfig()
    a = three_augment(img, 8, cfg, np.random.default_rng(5))
    b = three_augment(img, 8, cfg, np.random.default_rng(5))
    assert a.shape == (3, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_full_scale_crop_without_other_operations_is_the_identity():
    """scale (1, 1), ratio 1 on a square image, no flip, no jitter: only the one-of-three op,
    which for a solarise-free dark image is the identity up to blur; check the crop alone."""
    from fips_ref.augment import resized_crop
    img = np.random.default_rng(1).random((1, 8, 8)).astype(np.float32)
    box = rrc_box(8, 8, (1.0, 1.0), (1.0, 1.0), np.random.default_rng(0))
    assert box == (0, 0, 8, 8)
    np.testing.assert_allclose(resized_crop(img, box, 8), img, atol=1e-6)
