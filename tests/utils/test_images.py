"""make_image_grid: diffusers' behaviour for valid inputs, clear errors for bad ones."""

import numpy as np
import pytest
from PIL import Image

from jaxdiff.utils.images import make_image_grid


def _images(n, size=(8, 6)):
    return [Image.new("RGB", size, (10 * i, 0, 0)) for i in range(n)]


def test_grid_matches_diffusers():
    from diffusers.utils import make_image_grid as diffusers_grid

    ims = _images(6)
    for rows, cols, resize in [(2, 3, None), (3, 2, 4), (1, 6, None)]:
        ours = make_image_grid(ims, rows, cols, resize=resize)
        theirs = diffusers_grid(ims, rows, cols, resize=resize)
        assert ours.size == theirs.size
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    arr = np.random.default_rng(0).random((4, 5, 5, 3))  # arrays in [0, 1] too
    assert make_image_grid(arr, 2, 2).size == (10, 10)
    assert make_image_grid(ims[:4], np.int64(2), 2).size == (16, 12)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (([], 0, 0), {}, ValueError, "rows must be a positive int, got 0"),
        ((_images(4), 2.0, 2), {}, TypeError, "rows must be a positive int, got 2.0"),
        ((_images(4), 2, True), {}, TypeError, "cols must be a positive int, got True"),
        ((_images(4), 2, 2), {"resize": "a"}, TypeError, "resize must be a positive int"),
        ((_images(4), 2, 2), {"resize": 0}, ValueError, "resize must be a positive int"),
        ((_images(1)[0], 1, 1), {}, TypeError, "images must be a list of PIL images"),
        (([np.zeros((4, 4, 3))], 1, 1), {}, TypeError, "images must be PIL images"),
        ((_images(4), 3, 2), {}, ValueError, r"rows \* cols = 3 \* 2 = 6 images, got 4"),
    ],
)
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_image_grid(*args, **kwargs)


def test_mixed_sizes_need_resize():
    ims = _images(1) + _images(1, size=(6, 6))
    with pytest.raises(ValueError, match=r"different sizes \[\(6, 6\), \(8, 6\)\]; pass resize"):
        make_image_grid(ims, 1, 2)
    assert make_image_grid(ims, 1, 2, resize=4).size == (8, 4)


def test_grid_mode():
    masks = [Image.new("L", (4, 4), v) for v in (0, 255)]
    assert make_image_grid(masks, 1, 2).mode == "L"  # one mode: kept
    mixed = make_image_grid([Image.new("RGB", (4, 4), (200, 10, 10)), masks[1]], 1, 2)
    assert mixed.mode == "RGB"  # mixed: RGB, the colour image keeps its colour
    np.testing.assert_array_equal(np.asarray(mixed)[0, 0], [200, 10, 10])
    np.testing.assert_array_equal(np.asarray(mixed)[0, 4], [255, 255, 255])
