"""jaxdiff: diffusion models in JAX/Flax, doing the job of Hugging Face diffusers.

Public names load lazily (PEP 562), so ``import jaxdiff`` is cheap and never imports torch.
"""

import importlib

__version__ = "0.1.0"
# The diffusers version whose config and weight layout jaxdiff reads and writes.
__diffusers_version__ = "0.42.1"

_EXPORTS = {
    # schedulers
    "DDPMScheduler": "jaxdiff.schedulers",
    "DDIMScheduler": "jaxdiff.schedulers",
    "PNDMScheduler": "jaxdiff.schedulers",
    "EulerDiscreteScheduler": "jaxdiff.schedulers",
    "EulerAncestralDiscreteScheduler": "jaxdiff.schedulers",
    "DPMSolverMultistepScheduler": "jaxdiff.schedulers",
    # models
    "UNet2DModel": "jaxdiff.models",
    "UNet2DConditionModel": "jaxdiff.models",
    "AutoencoderKL": "jaxdiff.models",
    "CLIPTextModel": "jaxdiff.models",
    "CLIPTextModelWithProjection": "jaxdiff.models",
    # pipelines
    "DiffusionPipeline": "jaxdiff.pipelines",
    "DDPMPipeline": "jaxdiff.pipelines",
    "DDIMPipeline": "jaxdiff.pipelines",
    "StableDiffusionPipeline": "jaxdiff.pipelines",
    "StableDiffusionImg2ImgPipeline": "jaxdiff.pipelines",
    "StableDiffusionInpaintPipeline": "jaxdiff.pipelines",
    "StableDiffusionDepth2ImgPipeline": "jaxdiff.pipelines",
    "AutoPipelineForText2Image": "jaxdiff.pipelines",
    "AutoPipelineForImage2Image": "jaxdiff.pipelines",
    "AutoPipelineForInpainting": "jaxdiff.pipelines",
    # utilities
    "make_image_grid": "jaxdiff.utils",
    "compiler_options": "jaxdiff.utils",
    "use_onednn_convolutions": "jaxdiff.models.onednn_conv",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
