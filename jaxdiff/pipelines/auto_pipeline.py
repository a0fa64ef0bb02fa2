"""``AutoPipelineForText2Image`` / ``Image2Image`` / ``Inpainting``: the task's pipeline class
for a model family, as diffusers' auto pipelines.

A folder's ``model_index.json`` names one pipeline class (``StableDiffusionPipeline``); its
family (``stable-diffusion``) has one class per task. ``from_pretrained`` loads the folder as
the task's class; ``from_pipe`` builds it on an existing pipeline's components (no copy)::

    pipe = AutoPipelineForText2Image.from_pretrained("path/to/sd")
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
"""

from __future__ import annotations

import os
from typing import ClassVar

from jaxdiff import hub
from jaxdiff.configuration import load_config
from jaxdiff.pipelines.pipeline_utils import (
    MODEL_INDEX,
    PIPELINE_CLASSES,
    DiffusionPipeline,
    import_class,
)

# family -> the pipeline class of each task (diffusers' AUTO_*_PIPELINES_MAPPING).
TEXT2IMAGE = {"stable-diffusion": "StableDiffusionPipeline"}
IMAGE2IMAGE = {"stable-diffusion": "StableDiffusionImg2ImgPipeline"}
INPAINTING = {"stable-diffusion": "StableDiffusionInpaintPipeline"}
TASKS = (TEXT2IMAGE, IMAGE2IMAGE, INPAINTING)


def _family(class_name: str) -> str | None:
    for mapping in TASKS:
        for family, name in mapping.items():
            if name == class_name:
                return family
    return None


class _AutoPipeline:
    """The task's class for a pipeline class name; never instantiated itself."""

    _mapping: ClassVar[dict[str, str]] = {}

    def __init__(self, *args, **kwargs):
        name = type(self).__name__
        raise OSError(
            f"{name} is built with `{name}.from_pretrained(pretrained_model_name_or_path)` "
            f"or `{name}.from_pipe(pipeline)`"
        )

    @classmethod
    def _task_class(cls, class_name: str) -> type[DiffusionPipeline]:
        family = _family(class_name)
        if family not in cls._mapping:
            supported = sorted({n for m in TASKS for n in m.values()})
            raise ValueError(
                f"{cls.__name__} has no pipeline for {class_name!r} (model family {family}); "
                f"it knows the families of {supported}"
            )
        return import_class(cls._mapping[family], PIPELINE_CLASSES, "pipeline")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> DiffusionPipeline:
        """Loads the folder or Hub repo as this task's pipeline class.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repo id.
            **kwargs: as :meth:`DiffusionPipeline.from_pretrained` (``dtype``, ``variant``,
                components, Hub options).
        """
        hub_kwargs = hub.pop_hub_kwargs(dict(kwargs))
        index = load_config(pretrained_model_name_or_path, None, MODEL_INDEX, **hub_kwargs)
        name = index.get("_class_name")
        if not name:
            raise ValueError(f"{MODEL_INDEX} of {pretrained_model_name_or_path} has no _class_name")
        return cls._task_class(name).from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> DiffusionPipeline:
        """This task's pipeline on ``pipeline``'s components (see
        :meth:`DiffusionPipeline.from_pipe`)."""
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(
                f"pipeline must be a jaxdiff DiffusionPipeline, got {type(pipeline).__name__}"
            )
        return cls._task_class(type(pipeline).__name__).from_pipe(pipeline, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    """Text-to-image: ``StableDiffusionPipeline`` for the Stable Diffusion family."""

    _mapping = TEXT2IMAGE


class AutoPipelineForImage2Image(_AutoPipeline):
    """Image-to-image: ``StableDiffusionImg2ImgPipeline`` for the Stable Diffusion family."""

    _mapping = IMAGE2IMAGE


class AutoPipelineForInpainting(_AutoPipeline):
    """Inpainting: ``StableDiffusionInpaintPipeline`` for the Stable Diffusion family (the
    9-channel inpainting UNet, or any SD UNet through the masked blend)."""

    _mapping = INPAINTING
