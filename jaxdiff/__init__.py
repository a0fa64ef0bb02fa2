"""jaxdiff: diffusion models in JAX/Flax, doing the job of Hugging Face diffusers."""

__version__ = "0.1.0"
# The diffusers version whose config and weight layout jaxdiff reads and writes.
__diffusers_version__ = "0.42.1"
