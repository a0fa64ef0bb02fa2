"""Pipelines: ``DiffusionPipeline.from_pretrained`` dispatches on ``model_index.json``."""

from jaxdiff.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from jaxdiff.pipelines.unconditional import DDIMPipeline, DDPMPipeline

__all__ = ["DDIMPipeline", "DDPMPipeline", "DiffusionPipeline", "ImagePipelineOutput"]
