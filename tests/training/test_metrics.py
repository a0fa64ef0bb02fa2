"""Sliced Wasserstein distance on patches: exact zero, symmetry, ordering, a 1-D closed form."""

import numpy as np
import pytest

from jaxdiff.training.metrics import blurred_noise, random_patches, sliced_wasserstein


def _images(seed, n=64):
    return np.random.default_rng(seed).uniform(0, 255, (n, 16, 16, 3))


def test_identical_sets_are_at_distance_zero():
    x = _images(0)
    assert sliced_wasserstein(x, x) == 0.0


def test_symmetric_and_grows_with_a_shift():
    x, y = _images(0), _images(1)
    d = sliced_wasserstein(x, y)
    assert d == pytest.approx(sliced_wasserstein(y, x), rel=1e-12)
    assert sliced_wasserstein(x, y + 40) > sliced_wasserstein(x, y + 10) > d


def test_one_pixel_patches_match_the_1d_wasserstein_closed_form():
    # 1x1 patches, one channel: every direction is +-1, so SWD = W1 of the normalised values.
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (200, 1, 1, 1))
    b = rng.normal(0.5, 1, (200, 1, 1, 1))
    both = np.concatenate([a, b]).ravel()
    m, s = both.mean(), both.std()
    want = np.abs(np.sort((a.ravel() - m) / s) - np.sort((b.ravel() - m) / s)).mean()
    got = sliced_wasserstein(a, b, patch=1, per_image=1, directions=8)
    assert got == pytest.approx(want, rel=1e-9)


def test_patches_are_taken_where_drawn():
    x = np.arange(2 * 5 * 5 * 1, dtype=float).reshape(2, 5, 5, 1)
    p = random_patches(x, 3, 4, np.random.default_rng(0))
    assert p.shape == (8, 9)
    for row in p:  # each patch is a contiguous 3x3 window of one image
        win = row.reshape(3, 3)
        assert np.all(np.diff(win, axis=1) == 1) and np.all(np.diff(win, axis=0) == 5)


def test_blurred_noise_and_shape_errors():
    noise = blurred_noise((4, 32, 32, 3), 2.0, np.random.default_rng(0))
    assert noise.dtype == np.uint8 and noise.min() == 0 and noise.max() == 255
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(np.zeros((2, 8, 8, 3)), np.zeros((3, 8, 8, 3)))
