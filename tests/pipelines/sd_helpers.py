"""The tiny SD pipeline with DDIM, in jaxdiff and in diffusers, for the loader tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxdiff.pipelines import DiffusionPipeline
from jaxdiff.pipelines.pipeline_utils import scheduler_class


def jaxdiff_sd_pipe(sd_dir: Path):
    with pytest.warns(UserWarning, match="clip_sample"):  # SD 1.5's PNDM config carries it
        pipe = DiffusionPipeline.from_pretrained(sd_dir)
    pipe.scheduler = scheduler_class("ddim").from_config(pipe.scheduler.config)
    return pipe


def diffusers_sd_pipe(sd_dir: Path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(  # the text encoder is stored fp16
        sd_dir, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref
