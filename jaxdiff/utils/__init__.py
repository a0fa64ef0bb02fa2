"""Utilities: images (PIL <-> arrays, make_image_grid), CLIP tokenizer glue, XLA options."""

from jaxdiff.utils.images import make_image_grid, numpy_to_pil, pil_to_numpy
from jaxdiff.utils.tokenizer import load_tokenizer, tokenize
from jaxdiff.utils.xla import compiler_options

__all__ = [
    "compiler_options",
    "load_tokenizer",
    "make_image_grid",
    "numpy_to_pil",
    "pil_to_numpy",
    "tokenize",
]
