"""Pipelines: ``DiffusionPipeline.from_pretrained`` dispatches on ``model_index.json``."""

from jaxdiff.pipelines.auto_pipeline import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
)
from jaxdiff.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from jaxdiff.pipelines.stable_diffusion import (
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from jaxdiff.pipelines.unconditional import DDIMPipeline, DDPMPipeline

__all__ = [
    "AutoPipelineForImage2Image",
    "AutoPipelineForInpainting",
    "AutoPipelineForText2Image",
    "DDIMPipeline",
    "DDPMPipeline",
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "StableDiffusionDepth2ImgPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
]
