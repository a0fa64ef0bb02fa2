"""Images: arrays in [0, 1] (NHWC) <-> PIL, and ``make_image_grid`` as in diffusers."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) or (H, W, C) floats in [0, 1] -> a list of PIL images (RGB, or L for C=1)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be (B, H, W, C) with C in 1, 3, 4, got shape {images.shape}")
    uint8 = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    if uint8.shape[-1] == 1:
        return [Image.fromarray(im[..., 0], mode="L") for im in uint8]
    return [Image.fromarray(im) for im in uint8]


def pil_to_numpy(images: Image.Image | Sequence[Image.Image]) -> np.ndarray:
    """PIL image(s) -> (B, H, W, C) float32 in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"images must all have the same size, got {sorted(sizes)}")
    return np.stack(arrays)


def make_image_grid(
    images: Sequence[Image.Image] | np.ndarray,
    rows: int,
    cols: int,
    resize: int | None = None,
) -> Image.Image:
    """Pastes ``rows * cols`` images into one grid image, row by row (diffusers' make_image_grid).

    Args:
        images: PIL images, or an array (B, H, W, C) in [0, 1].
        rows, cols: the grid; ``len(images)`` must equal ``rows * cols``.
        resize: optional square size each image is resized to first; without it the images
            must all have one size.

    The grid keeps the images' mode when they share one (RGB, L for masks, RGBA); mixed
    modes become RGB (diffusers' grid is always RGB).
    """
    if (
        isinstance(images, np.ndarray)
        or hasattr(images, "__array__")
        and not isinstance(images, (list, tuple))
    ):
        images = numpy_to_pil(np.asarray(images))
    for name, value, what in (
        ("rows", rows, "a positive int"),
        ("cols", cols, "a positive int"),
        ("resize", resize, "a positive int (the side in pixels) or None"),
    ):
        if value is None and name == "resize":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"make_image_grid: {name} must be {what}, got {value!r}")
        if value < 1:
            raise ValueError(f"make_image_grid: {name} must be {what}, got {value!r}")
    if isinstance(images, (str, bytes, Image.Image)) or not isinstance(images, Iterable):
        raise TypeError(
            "make_image_grid: images must be a list of PIL images or a (B, H, W, C) array, got "
            f"{type(images).__name__}"
        )
    images = list(images)
    bad = [type(im).__name__ for im in images if not isinstance(im, Image.Image)]
    if bad:
        raise TypeError(
            f"make_image_grid: images must be PIL images (or one (B, H, W, C) array), got {bad[0]}"
        )
    if len(images) != rows * cols:
        raise ValueError(
            f"make_image_grid needs rows * cols = {rows} * {cols} = {rows * cols} images, "
            f"got {len(images)}"
        )
    if resize is not None:
        images = [im.resize((resize, resize)) for im in images]
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        raise ValueError(
            f"make_image_grid: the images have different sizes {sizes[:4]}; pass resize=N to "
            "resize each to N x N first"
        )
    modes = {im.mode for im in images}
    if len(modes) > 1:  # e.g. masks (L) beside images (RGB): all become RGB, as in diffusers
        images = [im.convert("RGB") for im in images]
    w, h = images[0].size
    grid = Image.new(images[0].mode, size=(cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, box=(i % cols * w, i // cols * h))
    return grid


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the most square grid that holds exactly ``n`` images."""
    rows = int(np.floor(np.sqrt(n)))
    while n % rows:
        rows -= 1
    return rows, n // rows
