"""Inpainting around the mask only (``padding_mask_crop``), as diffusers' image processor.

The pipeline repaints a crop of the image instead of the whole image: the smallest box around
the mask's white pixels, padded by ``pad`` pixels and widened to the output's aspect ratio
(:func:`crop_region`), resized to the output size keeping its aspect (:func:`resize_and_fill`).
The generated crop is resized back into the box and pasted over the original, which is kept
wherever the mask is black (:func:`paste_back`). Small masks on large photos get the model's
full resolution this way. All on PIL images (Lanczos resampling), on the host.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), PIL's crop box


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> Box:
    """The box around the mask's nonzero pixels, ``pad`` pixels larger on each side (within
    the image), then grown along one axis to the aspect ratio ``width / height`` (shifted back
    inside the image where it would leave it)."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        raise ValueError("mask_image is all black: padding_mask_crop needs pixels to repaint")
    x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / target - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * target - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, size: int) -> tuple[int, int]:
    """[lo, hi) grown by ``extra`` (half on each side), moved back into [0, size)."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resized to fit inside (width, height) keeping its aspect, centred; the empty bands are
    filled by stretching the image's outermost row or column."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            top, bottom = (0, 0, width, 0), (0, resized.height, width, resized.height)
            out.paste(resized.resize((width, fill), box=top), box=(0, 0))
            out.paste(resized.resize((width, fill), box=bottom), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            left, right = (0, 0, 0, height), (resized.width, 0, resized.width, height)
            out.paste(resized.resize((fill, height), box=left), box=(0, 0))
            out.paste(resized.resize((fill, height), box=right), box=(fill + src_w, 0))
    return out


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resized to cover (width, height) keeping its aspect, centred, the excess cut off."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def crop_and_fill(image: Image.Image, box: Box, width: int, height: int) -> Image.Image:
    """The ``box`` of ``image`` as the pipeline's (width, height) input (RGB)."""
    return resize_and_fill(image.crop(box), width, height)


def paste_back(
    mask: Image.Image, original: Image.Image, generated: Image.Image, box: Box
) -> Image.Image:
    """``generated`` (the repainted crop) resized into ``box`` of ``original``; the original
    shows through where the mask is black, blended by the mask's grey levels."""
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    x1, y1, x2, y2 = box
    canvas = Image.new("RGBA", (width, height))
    canvas.paste(resize_and_crop(generated, x2 - x1, y2 - y1), (x1, y1))
    out = canvas.convert("RGB").convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")
