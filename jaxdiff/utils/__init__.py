"""Utilities: images (PIL <-> arrays, make_image_grid), CLIP tokenizer glue."""

from jaxdiff.utils.images import make_image_grid, numpy_to_pil, pil_to_numpy
from jaxdiff.utils.tokenizer import load_tokenizer, tokenize

__all__ = ["load_tokenizer", "make_image_grid", "numpy_to_pil", "pil_to_numpy", "tokenize"]
