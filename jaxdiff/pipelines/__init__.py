"""Pipelines: ``DiffusionPipeline.from_pretrained`` dispatches on ``model_index.json``."""

from jaxdiff.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from jaxdiff.pipelines.stable_diffusion import (
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from jaxdiff.pipelines.unconditional import DDIMPipeline, DDPMPipeline

__all__ = [
    "DDIMPipeline",
    "DDPMPipeline",
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "StableDiffusionDepth2ImgPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
]
