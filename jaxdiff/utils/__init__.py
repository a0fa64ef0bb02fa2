"""Utilities: images (PIL <-> arrays, make_image_grid)."""

from jaxdiff.utils.images import make_image_grid, numpy_to_pil, pil_to_numpy

__all__ = ["make_image_grid", "numpy_to_pil", "pil_to_numpy"]
