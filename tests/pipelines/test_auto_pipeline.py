"""Auto pipelines and ``from_pipe`` on the tiny SD pipeline: the class diffusers picks, the
golden images through a pipeline built by ``from_pipe``, what is shared and what is not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.unet_2d_condition import UNet2DConditionModel
from jaxdiff.pipelines import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DDPMPipeline,
    DiffusionPipeline,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from jaxdiff.pipelines.pipeline_utils import write_model_index
from jaxdiff.schedulers import DDIMScheduler, EulerDiscreteScheduler

pytestmark = pytest.mark.xdist_group("auto_pipeline")

AUTO = {
    "AutoPipelineForText2Image": (AutoPipelineForText2Image, StableDiffusionPipeline),
    "AutoPipelineForImage2Image": (AutoPipelineForImage2Image, StableDiffusionImg2ImgPipeline),
    "AutoPipelineForInpainting": (AutoPipelineForInpainting, StableDiffusionInpaintPipeline),
}
KW = dict(num_inference_steps=2, output_type="np", progress=False, seed=0)


def _load(auto, sd_dir, **kwargs):
    with pytest.warns(UserWarning, match="clip_sample"):  # SD 1.5's PNDM config carries it
        return auto.from_pretrained(sd_dir, **kwargs)


@pytest.mark.parametrize("name", sorted(AUTO))
def test_from_pretrained_and_from_pipe_pick_the_task_class(sd_dir, shared_pipe, name):
    auto, want = AUTO[name]
    assert type(_load(auto, sd_dir)) is want
    for source in (shared_pipe, StableDiffusionInpaintPipeline.from_pipe(shared_pipe)):
        assert type(auto.from_pipe(source)) is want


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(AUTO))
def test_class_choice_matches_diffusers(sd_dir, name):
    diffusers = pytest.importorskip("diffusers")
    ref = getattr(diffusers, name).from_pretrained(
        sd_dir, safety_checker=None, requires_safety_checker=False
    )
    assert type(ref).__name__ == AUTO[name][1].__name__
    assert type(getattr(diffusers, name).from_pipe(ref)).__name__ == AUTO[name][1].__name__


def test_from_pipe_takes_components_and_from_pretrained_passes_them_on(sd_dir, shared_pipe):
    # (the golden images through these paths: test_stable_diffusion's img2img and inpaint tests)
    unet = UNet2DConditionModel.from_pretrained(sd_dir.parent / "unet_inpaint")
    inp = _load(AutoPipelineForInpainting, sd_dir, unet=unet)
    assert inp.unet.config.in_channels == 9 and inp.params["unet"] is unet[1]
    inp = AutoPipelineForInpainting.from_pipe(inp, scheduler=shared_pipe.scheduler)
    assert inp.scheduler is shared_pipe.scheduler and inp.unet is unet[0]


def test_from_pipe_shares_weights_but_not_the_component_slots(shared_pipe):
    pipe = StableDiffusionPipeline.from_pipe(shared_pipe)
    img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    for name in pipe._components:
        assert getattr(img, name) is getattr(pipe, name)
        if name in pipe.params:
            assert img.params[name] is pipe.params[name]  # the same arrays: no copy
    assert img.params is not pipe.params and img.dtype == pipe.dtype
    img.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    img.params["vae"] = jax.tree_util.tree_map(lambda x: x * 0, img.params["vae"])
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.params["vae"] is shared_pipe.params["vae"]
    # DiffusionPipeline.from_pipe keeps the class; the source is untouched
    same = DiffusionPipeline.from_pipe(pipe)
    assert type(same) is StableDiffusionPipeline and same.params["unet"] is pipe.params["unet"]


def test_from_pipe_dtype_casts_only_the_new_pipeline(shared_pipe):
    half = StableDiffusionPipeline.from_pipe(shared_pipe, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16 and half.unet.dtype == jnp.bfloat16
    leaves = jax.tree_util.tree_leaves(half.params["unet"])
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(shared_pipe.params["unet"])} == {
        jnp.dtype(jnp.float32)
    }
    assert shared_pipe.unet.dtype == jnp.float32


def _lora(pipe, rng):
    """One random rank-2 factor pair on a UNet and a text-encoder projection (PEFT keys)."""
    from jaxdiff.loaders.lora import lora_targets

    state = {}
    for comp, name in (
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("text_encoder", "text_model.encoder.layers.1.mlp.fc2"),
    ):
        _, _, shape = lora_targets(getattr(pipe, comp))[name]
        state[f"{comp}.{name}.lora_A.weight"] = rng.standard_normal((2, shape[1])).astype("f4")
        state[f"{comp}.{name}.lora_B.weight"] = rng.standard_normal((shape[0], 2)).astype("f4")
    return state


def test_lora_adapters_carry_over_and_stay_separate(shared_pipe):
    pipe = StableDiffusionPipeline.from_pipe(shared_pipe)
    pipe.load_lora_weights(_lora(pipe, np.random.default_rng(0)), adapter_name="a")
    pipe.load_lora_weights(_lora(pipe, np.random.default_rng(1)), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 1.0])
    with_lora = pipe("a cat", **KW).images
    txt = StableDiffusionPipeline.from_pipe(pipe)
    assert txt.get_active_adapters() == ["a", "b"]
    assert txt.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}
    np.testing.assert_array_equal(txt("a cat", **KW).images, with_lora)
    txt.delete_adapters("b")
    assert pipe.get_list_adapters()["unet"] == ["a", "b"]  # the source keeps both
    # a new UNet: its adapters go, the text encoder's stay
    unet = (shared_pipe.unet, shared_pipe.params["unet"])
    other = StableDiffusionPipeline.from_pipe(pipe, unet=unet)
    assert other.get_list_adapters() == {"text_encoder": ["a", "b"]}
    # fused weights are in the shared params; unfusing the new pipeline restores its own
    pipe.fuse_lora()
    fused = StableDiffusionPipeline.from_pipe(pipe)
    fused.unfuse_lora()
    assert fused.params["unet"] is not pipe.params["unet"]
    for x, y in zip(
        jax.tree_util.tree_leaves(fused.params["unet"]),
        jax.tree_util.tree_leaves(shared_pipe.params["unet"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_textual_inversion_tokens_carry_over(shared_pipe):
    pipe = StableDiffusionPipeline.from_pipe(shared_pipe)
    vector = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    pipe.load_textual_inversion({"<toy>": vector})
    img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert img.tokenizer is pipe.tokenizer and "<toy>" in img.tokenizer.get_vocab()
    img.unload_textual_inversion()
    assert "<toy>" not in img.tokenizer.get_vocab() and "<toy>" in pipe.tokenizer.get_vocab()
    # a new tokenizer: nothing is loaded in the new pipeline
    fresh = StableDiffusionPipeline.from_pipe(pipe, tokenizer=shared_pipe.tokenizer)
    assert fresh._ti_state()["tokens"] == []


def test_diffusers_optional_components_are_accepted_as_none(sd_dir, shared_pipe):
    # diffusers code passes these; jaxdiff has no safety checker or image encoder
    none = dict(safety_checker=None, feature_extractor=None, image_encoder=None)
    pipe = _load(DiffusionPipeline, sd_dir, requires_safety_checker=False, **none)
    assert type(pipe) is StableDiffusionPipeline and not hasattr(pipe, "safety_checker")
    again = StableDiffusionPipeline(
        params=shared_pipe.params, **shared_pipe.components, requires_safety_checker=False, **none
    )
    assert again.unet is shared_pipe.unet
    assert type(StableDiffusionImg2ImgPipeline.from_pipe(again, **none)).__name__.endswith("Img2ImgPipeline")  # fmt: skip
    with pytest.raises(ValueError, match="no image_encoder component"):
        StableDiffusionPipeline(
            **shared_pipe.components, params=shared_pipe.params, image_encoder=1
        )


def test_errors(sd_dir, shared_pipe, tmp_path):
    with pytest.raises(OSError, match=r"from_pretrained.*from_pipe"):
        AutoPipelineForText2Image()
    with pytest.raises(TypeError, match="must be a jaxdiff DiffusionPipeline"):
        AutoPipelineForImage2Image.from_pipe("not a pipeline")
    with pytest.raises(TypeError, match="must be a jaxdiff DiffusionPipeline"):
        StableDiffusionImg2ImgPipeline.from_pipe(object())
    depth = StableDiffusionDepth2ImgPipeline.from_pipe(shared_pipe)
    with pytest.raises(ValueError, match="no pipeline for 'StableDiffusionDepth2ImgPipeline'"):
        AutoPipelineForText2Image.from_pipe(depth)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['schedular'\]"):
        StableDiffusionPipeline.from_pipe(shared_pipe, schedular=shared_pipe.scheduler)
    with pytest.raises(ValueError, match="no safety_checker component: pass safety_checker=None"):
        StableDiffusionPipeline.from_pipe(shared_pipe, safety_checker=object())
    with pytest.raises(ValueError, match="is a model: assign"):
        StableDiffusionPipeline.from_pipe(shared_pipe, unet=shared_pipe.unet)
    ddpm = DDPMPipeline(
        unet=(shared_pipe.unet, shared_pipe.params["unet"]), scheduler=shared_pipe.scheduler
    )
    with pytest.raises(ValueError, match=r"needs the component\(s\) \['vae', 'text_encoder'"):
        StableDiffusionPipeline.from_pipe(ddpm)
    with pytest.raises(ValueError, match="no pipeline for 'DDPMPipeline'"):
        AutoPipelineForText2Image.from_pipe(ddpm)
    write_model_index(tmp_path, {"_class_name": "DDPMPipeline"})
    with pytest.raises(ValueError, match="no pipeline for 'DDPMPipeline'"):
        AutoPipelineForText2Image.from_pretrained(tmp_path)
