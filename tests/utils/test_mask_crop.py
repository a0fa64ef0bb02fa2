"""``padding_mask_crop``'s image steps against diffusers' ``VaeImageProcessor``: the crop box,
the aspect-keeping resizes and the paste-back, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxdiff.utils import mask_crop

# (mask box (x1, y1, x2, y2) in a 96x80 image, output (width, height), pad)
CASES = [
    ((50, 30, 70, 46), (64, 64), 6),  # wide box, square output
    ((10, 5, 14, 75), (64, 64), 0),  # tall box reaching the edges
    ((0, 0, 96, 80), (64, 48), 3),  # the whole image, wider output: filled left and right
    ((0, 0, 96, 80), (32, 64), 2),  # the whole image, taller output: filled above and below
    ((80, 60, 95, 79), (32, 64), 10),  # a corner: the box is shifted back inside
    ((40, 2, 90, 10), (48, 32), 4),  # very wide, clipped at the top
]


def _mask(box, size=(96, 80)) -> Image.Image:
    m = Image.new("L", size)
    m.paste(255, box)
    return m


def _photo(size=(96, 80), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_crop_region_by_hand():
    # box 20x16 + 6 on each side = 32x28 -> widened to 32x32 for a square output; the extra 4
    # rows go 2 above and 2 below
    assert mask_crop.crop_region(_mask((50, 30, 70, 46)), 64, 64, 6) == (44, 22, 76, 54)
    with pytest.raises(ValueError, match="all black"):
        mask_crop.crop_region(Image.new("L", (8, 8)), 64, 64, 0)


@pytest.mark.parity
@pytest.mark.parametrize("box, out, pad", CASES)
def test_crop_fill_and_paste_back_match_diffusers(box, out, pad):
    image_processor = pytest.importorskip("diffusers.image_processor")
    proc = image_processor.VaeImageProcessor(vae_scale_factor=8)
    mask, photo = _mask(box), _photo()
    width, height = out
    region = mask_crop.crop_region(mask, width, height, pad)
    assert region == proc.get_crop_region(mask, width, height, pad=pad)
    crop = mask_crop.crop_and_fill(photo, region, width, height)
    want = proc._resize_and_fill(photo.crop(region), width, height)
    assert crop.size == (width, height)
    assert np.array_equal(np.asarray(crop), np.asarray(want))
    generated = _photo((width, height), seed=1)
    pasted = mask_crop.paste_back(mask, photo, generated, region)
    ref = proc.apply_overlay(mask, photo, generated, region)
    assert np.array_equal(np.asarray(pasted), np.asarray(ref))
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(pasted)[outside], np.asarray(photo)[outside])
