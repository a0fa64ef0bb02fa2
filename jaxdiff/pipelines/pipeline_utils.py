"""``DiffusionPipeline``: components from ``model_index.json``, dispatch, save, repr.

A pipeline folder (diffusers layout) has ``model_index.json``::

    {"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
     "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}

and one subfolder per component. ``DiffusionPipeline.from_pretrained(path)`` reads it, loads
every component with jaxdiff's own (torch-free) loaders and returns the pipeline class it names.
A model component is a Linen module plus its params; the pipeline keeps both
(``pipe.unet`` is the module, ``pipe.params["unet"]`` its weights), so calling a pipeline
needs no ``(pipeline, params)`` juggling.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from jaxdiff import __diffusers_version__, hub, sampling
from jaxdiff.configuration import FrozenConfig, load_config
from jaxdiff.models.modeling_utils import cast_floating, check_dtype
from jaxdiff.utils.compile_cache import enable_compilation_cache

MODEL_INDEX = "model_index.json"

# diffusers class name -> "module:attribute" of the jaxdiff class that loads it.
COMPONENT_CLASSES = {
    "UNet2DModel": "jaxdiff.models.unet_2d:UNet2DModel",
    "UNet2DConditionModel": "jaxdiff.models.unet_2d_condition:UNet2DConditionModel",
    "AutoencoderKL": "jaxdiff.models.autoencoder_kl:AutoencoderKL",
    "CLIPTextModel": "jaxdiff.models.clip_text:CLIPTextModel",
    "CLIPTextModelWithProjection": "jaxdiff.models.clip_text:CLIPTextModelWithProjection",
    "CLIPTokenizer": "jaxdiff.utils.tokenizer:CLIPTokenizer",
    "CLIPTokenizerFast": "jaxdiff.utils.tokenizer:CLIPTokenizer",
    "DDPMScheduler": "jaxdiff.schedulers:DDPMScheduler",
    "DDIMScheduler": "jaxdiff.schedulers:DDIMScheduler",
    "PNDMScheduler": "jaxdiff.schedulers:PNDMScheduler",
    "EulerDiscreteScheduler": "jaxdiff.schedulers:EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler": "jaxdiff.schedulers:EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler": "jaxdiff.schedulers:DPMSolverMultistepScheduler",
}
# diffusers pipeline class name -> jaxdiff pipeline class.
PIPELINE_CLASSES = {
    "DDPMPipeline": "jaxdiff.pipelines.unconditional:DDPMPipeline",
    "DDIMPipeline": "jaxdiff.pipelines.unconditional:DDIMPipeline",
    "StableDiffusionPipeline": "jaxdiff.pipelines.stable_diffusion:StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": (
        "jaxdiff.pipelines.stable_diffusion:StableDiffusionImg2ImgPipeline"
    ),
    "StableDiffusionInpaintPipeline": (
        "jaxdiff.pipelines.stable_diffusion:StableDiffusionInpaintPipeline"
    ),
    "StableDiffusionDepth2ImgPipeline": (
        "jaxdiff.pipelines.stable_diffusion:StableDiffusionDepth2ImgPipeline"
    ),
}
SCHEDULER_NAMES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
}


def import_class(name: str, table: dict[str, str], what: str) -> type:
    if name not in table:
        raise ValueError(f"jaxdiff has no {what} {name!r}; supported: {sorted(table)}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def scheduler_class(name: str) -> type:
    """A scheduler class from its class name or a short name (``ddim``, ``euler_a``, ``dpm++``)."""
    full = SCHEDULER_NAMES.get(name.lower(), name)
    if not full.endswith("Scheduler") or full not in COMPONENT_CLASSES:
        choices = sorted(SCHEDULER_NAMES) + [
            k for k in COMPONENT_CLASSES if k.endswith("Scheduler")
        ]
        raise ValueError(f"unknown scheduler {name!r}; choose one of {choices}")
    return import_class(full, COMPONENT_CLASSES, "scheduler")


@dataclass
class ImagePipelineOutput:
    """``images``: a list of PIL images, or a float array (B, H, W, C) in [0, 1] for "np".

    Indexed as diffusers' ``BaseOutput``: ``out[0]`` and ``out["images"]`` are ``out.images``;
    ``out.to_tuple()`` is ``(images,)``.
    """

    images: Any

    def to_tuple(self) -> tuple[Any, ...]:
        return (self.images,)

    def __getitem__(self, index: int | str) -> Any:
        if isinstance(index, str):
            if index != "images":
                raise KeyError(f"{type(self).__name__} has only 'images', not {index!r}")
            return self.images
        return self.to_tuple()[index]


def pipeline_result(output: ImagePipelineOutput, return_dict: bool, *extra: Any):
    """What a pipeline returns: ``output``, or as diffusers with ``return_dict=False`` the tuple
    ``(images, *extra)`` (Stable Diffusion's ``(images, nsfw_content_detected)``, here None)."""
    return output if return_dict else (output.images, *extra)


def float_array(value: Any, name: str, expected: str) -> np.ndarray:
    """``value`` as a float32 numpy array of finite values; else raises naming ``name`` and
    what was ``expected`` (a user array, checked on the host before anything is compiled)."""
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from err
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "save_pretrained") and hasattr(obj, "apply")


def _check_component(name: str, value: Any) -> None:
    """Raises unless ``value`` can be the component ``name``: a scheduler object, a tokenizer,
    or (every other component) a jaxdiff model."""
    if name == "scheduler":
        if not (hasattr(value, "set_timesteps") and hasattr(value, "step")):
            raise TypeError(
                f"scheduler must be a jaxdiff scheduler object, e.g. "
                f"DDIMScheduler.from_config(pipe.scheduler.config), got {value!r}"
            )
    elif not name.startswith("tokenizer") and value is not None and not _is_model(value):
        raise TypeError(
            f"{name} must be a jaxdiff model given as (module, params), e.g. "
            f"{name}=UNet2DModel.from_pretrained(...), got {type(value).__name__}"
        )


class DiffusionPipeline:
    """Base of every pipeline: ``from_pretrained`` dispatch, components, ``save_pretrained``."""

    _components: ClassVar[tuple[str, ...]] = ()
    # diffusers components jaxdiff does not implement: accepted as None (and then ignored),
    # so that diffusers code such as ``from_pretrained(repo, safety_checker=None)`` runs.
    _optional_components: ClassVar[tuple[str, ...]] = ()
    _ignored_flags: ClassVar[tuple[str, ...]] = ()  # e.g. requires_safety_checker

    def __init__(
        self, params: dict[str, Any] | None = None, dtype: Any = jnp.float32, **components
    ):
        components = self._drop_optional(components, "__init__")
        missing = [n for n in self._components if components.get(n) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the component(s) {missing}")
        object.__setattr__(self, "params", dict(params or {}))
        object.__setattr__(self, "dtype", check_dtype(dtype))
        object.__setattr__(self, "_jit_cache", {})
        object.__setattr__(self, "_progress_bar_config", {})
        enable_compilation_cache()  # $JAXDIFF_CACHE_DIR, if set
        for name, value in components.items():
            setattr(self, name, value)

    @classmethod
    def _drop_optional(cls, kwargs: dict[str, Any], method: str) -> dict[str, Any]:
        """``kwargs`` without the optional components (which must be None) and ignored flags;
        any other name that is not a component is an error."""
        unknown = sorted(
            set(kwargs) - {*cls._components, *cls._optional_components, *cls._ignored_flags}
        )
        if unknown:
            raise TypeError(
                f"{cls.__name__}.{method} got unexpected argument(s) {unknown}; its "
                f"components are {list(cls._components)}"
            )
        for name in cls._optional_components:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"jaxdiff has no {name} component: pass {name}=None or leave it out"
                )
        return {k: v for k, v in kwargs.items() if k in cls._components}

    # --------------------------------------------------------------- progress bar
    def set_progress_bar_config(self, **kwargs) -> None:
        """Options of the denoising loop's tqdm bar, as diffusers: ``disable=True`` turns it
        off (as ``progress=False``); ``desc``, ``leave``, ``position``... go to tqdm."""
        object.__setattr__(self, "_progress_bar_config", dict(kwargs))

    def _progress_bar(self, total: int, progress: bool) -> sampling.ScanProgress:
        """The loop's bar: shown when ``progress`` and the config does not disable it."""
        config = dict(self._progress_bar_config)
        enabled = bool(progress) and not config.pop("disable", False)
        return sampling.ScanProgress(total, enabled=enabled, **config)

    # --------------------------------------------------------------- components
    def __setattr__(self, name: str, value: Any) -> None:
        """``pipe.unet = (module, params)`` swaps a model; ``pipe.scheduler = sched`` a scheduler."""
        if name in self._components:
            if isinstance(value, tuple) and len(value) == 2 and _is_model(value[0]):
                value, params = value
                self.params[name] = params
            elif _is_model(value) and name not in self.params:
                raise ValueError(
                    f"{name} is a model: assign (module, params), e.g. "
                    f"`pipe.{name} = {type(value).__name__}.from_pretrained(...)`"
                )
            _check_component(name, value)
            self._jit_cache.clear()
        object.__setattr__(self, name, value)

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._components}

    def _component_ids(self) -> tuple[int, ...]:
        """The components' ids, for the cache keys of the programs that close over them."""
        return tuple(id(getattr(self, name)) for name in self._components)

    @property
    def config(self) -> FrozenConfig:
        data = {"_class_name": type(self).__name__, "_diffusers_version": __diffusers_version__}
        for name, comp in self.components.items():
            library = "transformers" if type(comp).__name__.startswith("CLIP") else "diffusers"
            data[name] = [library, type(comp).__name__]
        return FrozenConfig(data, class_name=type(self).__name__)

    def __repr__(self) -> str:
        return repr(self.config)

    # --------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: Any = jnp.float32,
        variant: str | None = None,
        **kwargs,
    ) -> DiffusionPipeline:
        """Loads a pipeline folder or Hub repo in diffusers layout, without torch.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repo id.
            dtype: compute dtype of the models (float32, bfloat16, float16).
            variant: weight variant, e.g. ``"fp16"``.
            **kwargs: components to use instead of loading them (``scheduler=...``,
                ``unet=(module, params)``), and Hub options (revision, cache_dir, token,
                local_files_only).
        """
        hub_kwargs = hub.pop_hub_kwargs(kwargs)
        index = load_config(pretrained_model_name_or_path, None, MODEL_INDEX, **hub_kwargs)
        name = index.get("_class_name")
        pipeline_cls = cls  # a concrete class loads any compatible folder, as in diffusers
        if cls is DiffusionPipeline:
            if not name:
                raise ValueError(
                    f"{MODEL_INDEX} of {pretrained_model_name_or_path} has no _class_name"
                )
            pipeline_cls = import_class(name, PIPELINE_CLASSES, "pipeline")
        kwargs = pipeline_cls._drop_optional(kwargs, "from_pretrained")
        components: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for comp in pipeline_cls._components:
            if comp in kwargs:
                value = kwargs.pop(comp)
                if isinstance(value, tuple) and len(value) == 2 and _is_model(value[0]):
                    components[comp], params[comp] = value
                else:
                    components[comp] = value
                continue
            entry = index.get(comp)
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2) or entry[1] is None:
                raise ValueError(
                    f"{MODEL_INDEX} of {pretrained_model_name_or_path} has no component "
                    f'{comp!r} (expected e.g. "{comp}": ["diffusers", "ClassName"])'
                )
            comp_cls = import_class(entry[1], COMPONENT_CLASSES, "component class")
            if hasattr(comp_cls, "apply"):
                components[comp], params[comp] = comp_cls.from_pretrained(
                    pretrained_model_name_or_path,
                    subfolder=comp,
                    dtype=dtype,
                    variant=variant,
                    **hub_kwargs,
                )
            else:
                components[comp] = comp_cls.from_pretrained(
                    pretrained_model_name_or_path, subfolder=comp, **hub_kwargs
                )
        return pipeline_cls(params=params, dtype=dtype, **components)

    @classmethod
    def from_pipe(
        cls, pipeline: DiffusionPipeline, dtype: Any = None, **kwargs
    ) -> DiffusionPipeline:
        """A ``cls`` pipeline on ``pipeline``'s components, as diffusers' ``from_pipe``.

        The models, their params (the same arrays: nothing is copied) and the scheduler are
        shared; loaded LoRA adapters and textual-inversion tokens carry over for the models
        that are kept. Swapping a component on one pipeline later does not change the other::

            pipe = DiffusionPipeline.from_pretrained("path/to/sd")
            img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)

        Args:
            pipeline: the pipeline whose components to use.
            dtype: a compute dtype for the new pipeline (default: ``pipeline``'s); a new dtype
                casts the new pipeline's params only.
            **kwargs: components to use instead (``scheduler=...``, ``unet=(module, params)``).
        """
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(
                f"pipeline must be a jaxdiff DiffusionPipeline, got {type(pipeline).__name__}"
            )
        target = type(pipeline) if cls is DiffusionPipeline else cls
        kwargs = target._drop_optional(kwargs, "from_pipe")
        missing = [
            c for c in target._components if c not in kwargs and getattr(pipeline, c, None) is None
        ]
        if missing:
            raise ValueError(
                f"{target.__name__} needs the component(s) {missing}, which "
                f"{type(pipeline).__name__} does not have: pass them to from_pipe"
            )
        components: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for comp in target._components:
            value = kwargs.get(comp, getattr(pipeline, comp, None))
            if comp not in kwargs and comp in pipeline.params:
                params[comp] = pipeline.params[comp]
            elif isinstance(value, tuple) and len(value) == 2 and _is_model(value[0]):
                value, params[comp] = value
            components[comp] = value
        new = target(params=params, dtype=pipeline.dtype, **components)
        new._adopt_state(pipeline, kept=[c for c in target._components if c not in kwargs])
        if dtype is not None and check_dtype(dtype) != new.dtype:
            new.to(dtype)
        return new

    def _adopt_state(self, source: DiffusionPipeline, kept: list[str]) -> None:
        """After :meth:`from_pipe`: take over ``source``'s state about the ``kept``
        components (the loader mixins extend it)."""

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes ``model_index.json`` and every component in diffusers layout."""
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        for name, comp in self.components.items():
            sub = os.path.join(save_directory, name)
            if _is_model(comp):
                comp.save_pretrained(sub, self.params[name])
            else:
                comp.save_pretrained(sub)
        with open(os.path.join(save_directory, MODEL_INDEX), "w", encoding="utf-8") as f:
            f.write(self.config.to_json_string())

    def to(self, dtype: Any) -> DiffusionPipeline:
        """Casts the models' compute dtype and params (in place); returns the pipeline."""
        dtype = check_dtype(dtype)
        for name, comp in self.components.items():
            if _is_model(comp):
                object.__setattr__(self, name, comp.clone(dtype=dtype))
                self.params[name] = cast_floating(self.params[name], dtype)
        object.__setattr__(self, "dtype", dtype)
        self._jit_cache.clear()
        return self


def write_model_index(directory: str | os.PathLike, data: dict[str, Any]) -> None:
    """Writes a ``model_index.json`` (used by the reference scripts and tests)."""
    with open(os.path.join(os.fspath(directory), MODEL_INDEX), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def to_output(images: np.ndarray, output_type: str) -> ImagePipelineOutput:
    """Wraps (B, H, W, C) images in [0, 1] as the requested ``output_type``."""
    from jaxdiff.utils.images import numpy_to_pil

    if output_type == "np":
        return ImagePipelineOutput(images=np.asarray(images))
    if output_type == "pil":
        return ImagePipelineOutput(images=numpy_to_pil(np.asarray(images)))
    raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
