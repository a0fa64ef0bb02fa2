"""Stable Diffusion pipelines against diffusers' images on the tiny random SD pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.unet_2d_condition import UNet2DConditionModel
from jaxdiff.pipelines import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DiffusionPipeline,
)
from jaxdiff.pipelines.pipeline_utils import scheduler_class
from jaxdiff.pipelines.stable_diffusion import (
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    begin_index_for_strength,
    torch_bicubic_matrix,
)
from jaxdiff.schedulers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from tests.compile_events import RECORD_COMPILES
from tests.reference_io import load_case, reference_dir

COMPONENT = "pipelines_stable_diffusion"
TXT2IMG = [
    "txt2img_ddim",
    "txt2img_euler",
    "txt2img_dpm",
    "txt2img_pndm",
    "txt2img_nocfg",
    "txt2img_rescale",
    "txt2img_dpm_timesteps",
    "txt2img_euler_sigmas",
]


@pytest.fixture(scope="module")
def sd_dir() -> Path:
    return reference_dir(COMPONENT) / "sd_tiny"


@pytest.fixture(scope="module")
def pipe(sd_dir) -> StableDiffusionPipeline:
    with pytest.warns(UserWarning, match="clip_sample"):  # SD 1.5's PNDM config carries it
        pipe = DiffusionPipeline.from_pretrained(sd_dir)
    pipe.saved_scheduler_config = pipe.scheduler.config  # tests swap from the folder's config
    return pipe


def _uint8_mad(images, expected) -> float:
    """Mean absolute difference of the uint8 images, in uint8 levels (the issue's measure)."""
    a = np.round(np.asarray(images) * 255).astype(np.int32)
    b = np.round(np.asarray(expected) * 255).astype(np.int32)
    return float(np.abs(a - b).mean())


def _assert_matches(images, expected):
    # fp32 on both sides: the images agree to ~1e-6; the bound is 1 uint8 level on
    # average, and no pixel may be off by more than 2 levels.
    assert images.shape == expected.shape
    assert _uint8_mad(images, expected) <= 1.0
    assert np.abs(np.asarray(images) - expected).max() <= 2 / 255


def _scheduler(pipe, name):
    return scheduler_class(name).from_config(pipe.saved_scheduler_config)


# ------------------------------------------------------------------ parity with diffusers
def test_dispatch(pipe):
    assert type(pipe) is StableDiffusionPipeline
    assert pipe.vae_scale_factor == 8
    assert pipe.config["tokenizer"][0] == "transformers"


@pytest.mark.parametrize("case", TXT2IMG)
def test_txt2img_matches_diffusers(pipe, case):
    arrays, meta = load_case(COMPONENT, case)
    pipe.scheduler = _scheduler(pipe, meta["scheduler"])
    images = pipe(
        meta["prompt"],
        negative_prompt=meta.get("negative_prompt"),
        num_inference_steps=meta["steps"],
        guidance_scale=meta["guidance_scale"],
        guidance_rescale=meta.get("guidance_rescale", 0.0),
        timesteps=meta.get("timesteps"),
        sigmas=meta.get("sigmas"),
        latents=arrays["latents"],
        output_type="np",
        progress=False,
        seed=0,
    ).images
    _assert_matches(images, arrays["images"])
    if meta.get("guidance_rescale"):  # its effect on the tiny UNet is ~2 uint8 levels at most
        np.testing.assert_allclose(images, arrays["images"], atol=1e-4)


def test_num_images_per_prompt_and_clip_skip_match_diffusers(pipe):
    pipe.scheduler = _scheduler(pipe, "ddim")
    arrays, meta = load_case(COMPONENT, "txt2img_per_prompt")
    images = pipe(
        meta["prompt"],
        num_images_per_prompt=2,
        num_inference_steps=5,
        latents=arrays["latents"],
        output_type="np",
        progress=False,
        seed=0,
    ).images
    _assert_matches(images, arrays["images"])
    arrays, meta = load_case(COMPONENT, "txt2img_clipskip")
    images = pipe(
        meta["prompt"],
        clip_skip=meta["clip_skip"],
        num_inference_steps=5,
        latents=arrays["latents"],
        output_type="np",
        progress=False,
        seed=0,
    ).images
    _assert_matches(images, arrays["images"])


def test_prompt_embeds_equal_prompts(pipe):
    pipe.scheduler = _scheduler(pipe, "ddim")
    arrays, meta = load_case(COMPONENT, "txt2img_ddim")
    from jaxdiff.utils.tokenizer import tokenize

    def embed(texts):
        ids = tokenize(pipe.tokenizer, texts)
        return pipe.text_encoder.apply(
            {"params": pipe.params["text_encoder"]}, ids
        ).last_hidden_state

    images = pipe(
        prompt_embeds=embed(meta["prompt"]),
        negative_prompt_embeds=embed(meta["negative_prompt"]),
        num_inference_steps=5,
        latents=arrays["latents"],
        output_type="np",
        progress=False,
        seed=0,
    ).images
    _assert_matches(images, arrays["images"])
    # Without guidance no negative embedding is needed (nor computed): the same image as text.
    common = dict(num_inference_steps=3, guidance_scale=1.0, latents=arrays["latents"])
    common.update(output_type="np", progress=False, seed=0)
    by_text = pipe(meta["prompt"], **common).images
    by_embeds = pipe(prompt_embeds=embed(meta["prompt"]), **common).images
    np.testing.assert_allclose(by_embeds, by_text, atol=1e-5)
    # diffusers' return_dict=False: (images, nsfw_content_detected), None without a checker
    images, nsfw = pipe(meta["prompt"], return_dict=False, **common)
    assert nsfw is None
    np.testing.assert_array_equal(images, by_text)


@pytest.mark.parity
def test_clip_skip_of_every_layer_matches_diffusers(pipe, sd_dir):
    """diffusers' clip_skip takes hidden_states[-(clip_skip + 1)], then the final layer norm,
    for clip_skip up to num_hidden_layers (the embeddings' output); jaxdiff rejected the last."""
    torch = pytest.importorskip("torch")
    from tests.pipelines.sd_helpers import diffusers_sd_pipe

    te = diffusers_sd_pipe(sd_dir).text_encoder
    layers = pipe.text_encoder.config.num_hidden_layers
    ids = pipe.tokenizer(["a cat", ""], padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        ref_ids = torch.tensor(ids)
        states = te(ref_ids, output_hidden_states=True).hidden_states
        cond = te.final_layer_norm(states[-(layers + 1)][:1]).numpy()
        uncond = te(ref_ids[1:]).last_hidden_state.numpy()  # the negative: without clip_skip
    pipe.scheduler = _scheduler(pipe, "ddim")
    kw = dict(num_inference_steps=2, output_type="np", progress=False, seed=0)
    got = pipe("a cat", clip_skip=layers, **kw).images
    want = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, **kw).images
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=rf"clip_skip must be an int in \[0, {layers}\]"):
        pipe("a cat", clip_skip=layers + 1, **kw)


@pytest.mark.parity
def test_prompt_embeds_mixed_with_text_match_diffusers(pipe, sd_dir):
    """prompt_embeds + negative_prompt and prompt + negative_prompt_embeds, which diffusers'
    encode_prompt accepts (jaxdiff used to reject them): the text side is encoded as diffusers
    does (the prompt with clip_skip, the negative without); without guidance it is ignored."""
    torch = pytest.importorskip("torch")
    from tests.pipelines.sd_helpers import diffusers_sd_pipe

    ref = diffusers_sd_pipe(sd_dir)
    with torch.no_grad():
        cond = ref.encode_prompt(["a cat", "a dog"], "cpu", 1, False)[0]
        neg = ref.encode_prompt(["blurry", "ugly"], "cpu", 1, False)[0]
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    pipe.scheduler = _scheduler(pipe, "ddim")
    kw = dict(num_inference_steps=2, output_type="np")
    cases = [  # (diffusers' arguments, guidance_scale)
        (dict(prompt_embeds=cond, negative_prompt=["blurry", "ugly"]), 7.5),
        (dict(prompt_embeds=cond), 7.5),
        (dict(prompt=["a cat", "a dog"], negative_prompt_embeds=neg), 7.5),
        (dict(prompt_embeds=cond, negative_prompt=["blurry", "ugly"]), 1.0),
        (dict(prompt=["a cat", "a dog"], negative_prompt_embeds=neg), 1.0),
    ]
    for args, g in cases:
        with torch.no_grad():
            want = ref(**args, guidance_scale=g, latents=t_latents, **kw).images
        args = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        got = pipe(**args, guidance_scale=g, latents=latents, seed=0, progress=False, **kw)
        _assert_matches(got.images, want)
    with pytest.raises(ValueError, match="negative_prompt or negative_prompt_embeds, not both"):
        pipe("a cat", negative_prompt="x", negative_prompt_embeds=neg.numpy()[:1], **kw)


@pytest.mark.parametrize("case", ["img2img_ddim", "img2img_euler", "img2img_euler_timesteps"])
def test_img2img_matches_diffusers(sd_dir, pipe, case):
    arrays, meta = load_case(COMPONENT, case)
    img = AutoPipelineForImage2Image.from_pipe(pipe, scheduler=_scheduler(pipe, meta["scheduler"]))
    images = img(
        meta["prompt"],
        image=arrays["image"],
        strength=meta["strength"],
        num_inference_steps=meta["steps"],
        noise=arrays["noise"],
        timesteps=meta.get("timesteps"),
        sample_posterior=False,  # the reference took the posterior mode
        output_type="np",
        progress=False,
        seed=0,
    ).images
    _assert_matches(images, arrays["images"])


@pytest.mark.parametrize("case, unet", [("inpaint_9ch", "unet_inpaint"), ("inpaint_4ch", None)])
def test_inpaint_matches_diffusers(sd_dir, pipe, case, unet):
    arrays, meta = load_case(COMPONENT, case)
    kwargs = {}
    if unet is not None:
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(sd_dir.parent / unet)
    with pytest.warns(UserWarning, match="clip_sample"):  # SD 1.5's PNDM config carries it
        inp = AutoPipelineForInpainting.from_pretrained(sd_dir, **kwargs)
    inp.scheduler = _scheduler(pipe, "ddim")
    images = inp(
        meta["prompt"],
        image=arrays["image"],
        mask_image=arrays["mask"],
        num_inference_steps=meta["steps"],
        latents=arrays["latents"],
        sample_posterior=False,
        output_type="np",
        progress=False,
        seed=0,
    ).images
    _assert_matches(images, arrays["images"])


@pytest.mark.parity
def test_img2img_one_image_per_output_matches_diffusers(sd_dir, pipe, monkeypatch):
    """2 prompts x num_images_per_prompt=2 with 4 images: image i goes with output i, as in
    diffusers. With one image per prompt, jaxdiff pairs each prompt with its own image
    ([i0, i0, i1, i1]) where diffusers tiles them ([i0, i1, i0, i1]); that is checked here as
    jaxdiff's own rule, equal to passing the repeated batch."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import diffusers
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as ref_mod

    from tests.pipelines.sd_helpers import diffusers_sd_pipe

    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.uniform(0, 1, (4, 8, 8, 3)), 8, 1), 8, 2).astype(np.float32)
    noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    kw = dict(prompt=["a photo of a cat", "red"], strength=0.5, num_inference_steps=6,
              num_images_per_prompt=2, output_type="np")  # fmt: skip
    ref = diffusers.StableDiffusionImg2ImgPipeline(**diffusers_sd_pipe(sd_dir).components)
    monkeypatch.setattr(ref_mod, "randn_tensor", lambda shape, **k: torch.from_numpy(
        noise.transpose(0, 3, 1, 2).copy()))  # fmt: skip
    monkeypatch.setattr(ref_mod, "retrieve_latents", lambda out, **k: out.latent_dist.mode())
    with torch.no_grad():
        want = ref(image=image, **kw).images

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe, scheduler=_scheduler(pipe, "ddim"))
    run = dict(noise=noise, sample_posterior=False, seed=0, progress=False, **kw)
    got = img2img(image=image, **run).images
    _assert_matches(got, want)
    per_prompt = img2img(image=image[[0, 2]], **run).images
    repeated = img2img(image=image[[0, 0, 2, 2]], **run).images
    np.testing.assert_array_equal(per_prompt, repeated)
    with pytest.raises(ValueError, match=r"image holds 3 images for 2 prompts x num_images_per_prompt=2 \(need 1 or 2 or 4\)"):  # fmt: skip
        img2img(image=image[:3], **run)


@pytest.mark.parity
@pytest.mark.parametrize(
    "options",
    [{"use_karras_sigmas": True}, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}],
)
def test_img2img_dpm_sigmas_match_diffusers(sd_dir, pipe, monkeypatch, options):
    """img2img noises the image to the first kept step with the scheduler's own (α, σ) of that
    step (``add_noise_at_step``, diffusers' ``add_noise`` after ``set_begin_index``): the
    rounded Karras timesteps' σ, and flow matching's x = (1-σ) x₀ + σ ε."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as ref_mod

    from tests.pipelines.sd_helpers import diffusers_sd_pipe

    rng = np.random.default_rng(1)
    image = np.repeat(np.repeat(rng.uniform(0, 1, (1, 8, 8, 3)), 8, 1), 8, 2).astype(np.float32)
    noise = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    kw = dict(prompt="a photo of a cat", strength=0.6, num_inference_steps=5, output_type="np")
    ref = diffusers.StableDiffusionImg2ImgPipeline(**diffusers_sd_pipe(sd_dir).components)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        ref.scheduler.config, **options
    )
    monkeypatch.setattr(ref_mod, "randn_tensor", lambda shape, **k: torch.from_numpy(
        noise.transpose(0, 3, 1, 2).copy()))  # fmt: skip
    monkeypatch.setattr(ref_mod, "retrieve_latents", lambda out, **k: out.latent_dist.mode())
    with torch.no_grad():
        want = ref(image=image, **kw).images

    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **options)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe, scheduler=scheduler)
    got = img2img(image=image, noise=noise, sample_posterior=False, seed=0, progress=False, **kw)
    _assert_matches(got.images, want)


@pytest.mark.parity
def test_inpaint_masked_image_latents_match_diffusers(sd_dir, pipe):
    """Given masked_image_latents replace the VAE encoding of the masked image as the 9-channel
    UNet's extra input, as diffusers; they are rejected with a 4-channel UNet."""
    from PIL import Image

    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from tests.pipelines.sd_helpers import diffusers_sd_pipe

    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    mask = Image.fromarray(mask)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    masked_latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=3, output_type="np")

    def nchw(a):
        return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())

    ref = diffusers_sd_pipe(sd_dir)
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(sd_dir.parent / "unet_inpaint")
    ref_inp = diffusers.StableDiffusionInpaintPipeline(**{**ref.components, "unet": ref_unet})
    with torch.no_grad():
        want = ref_inp(["a cat", "a dog"], image=photo, mask_image=mask, latents=nchw(latents),
                       masked_image_latents=nchw(masked_latents), **kw).images  # fmt: skip

    unet = UNet2DConditionModel.from_pretrained(sd_dir.parent / "unet_inpaint")
    inp = StableDiffusionInpaintPipeline.from_pipe(pipe, unet=unet)
    inp.scheduler = _scheduler(pipe, "ddim")
    run = dict(image=photo, mask_image=mask, latents=latents, seed=0, progress=False, **kw)
    got = inp(["a cat", "a dog"], masked_image_latents=masked_latents, **run).images
    _assert_matches(got, want)
    encoded = inp(["a cat", "a dog"], **run).images
    assert np.abs(encoded - got).mean() > 1e-2  # the given latents were used
    with pytest.raises(ValueError, match=r"masked_image_latents must have shape \(N, 8, 8, 4\)"):  # fmt: skip
        inp(["a cat", "a dog"], masked_image_latents=masked_latents[:, :4], **run)
    with pytest.raises(ValueError, match=r"masked_image_latents holds 2 images for 1 prompts x num_images_per_prompt=1 \(need 1\)"):  # fmt: skip
        inp("a cat", masked_image_latents=masked_latents, **{**run, "latents": latents[:1]})
    legacy = StableDiffusionInpaintPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="9-channel inpainting UNet; this UNet has 4"):
        legacy("a cat", masked_image_latents=masked_latents[:1], **{**run, "latents": latents[:1]})


def test_inpaint_padding_mask_crop_matches_diffusers(sd_dir, pipe):
    from PIL import Image

    arrays, meta = load_case(COMPONENT, "inpaint_crop")
    unet = UNet2DConditionModel.from_pretrained(sd_dir.parent / "unet_inpaint")
    inp = StableDiffusionInpaintPipeline.from_pipe(pipe, unet=unet)
    inp.scheduler = _scheduler(pipe, "ddim")
    photo, mask = Image.fromarray(arrays["image"]), Image.fromarray(arrays["mask"])
    images = inp(
        meta["prompt"],
        image=photo,
        mask_image=mask,
        padding_mask_crop=meta["padding_mask_crop"],
        num_inference_steps=meta["steps"],
        latents=arrays["latents"],
        sample_posterior=False,
        progress=False,
        seed=0,
    ).images
    got = np.stack([np.asarray(im) for im in images])
    assert got.shape == arrays["images"].shape == (2, 80, 96, 3)
    _assert_matches(got / 255.0, arrays["images"] / 255.0)
    kept = arrays["mask"] == 0  # black in the mask: the original photo, exactly
    assert np.array_equal(got[:, kept], np.broadcast_to(arrays["image"][kept], got[:, kept].shape))
    assert np.abs(got[:, 30:46, 50:70].astype(int) - arrays["image"][30:46, 50:70]).max() > 10


def test_padding_mask_crop_errors(pipe):
    from PIL import Image

    inp = StableDiffusionInpaintPipeline.from_pipe(pipe)
    photo, mask = Image.new("RGB", (96, 80)), Image.new("L", (96, 80))
    kw = dict(num_inference_steps=2, progress=False, seed=0)
    with pytest.raises(ValueError, match="mask_image is all black"):
        inp("a", image=photo, mask_image=mask, padding_mask_crop=4, **kw)
    mask.paste(255, (10, 10, 20, 20))
    with pytest.raises(ValueError, match="single PIL images, got ndarray and Image"):
        inp("a", image=np.zeros((80, 96, 3)), mask_image=mask, padding_mask_crop=4, **kw)
    with pytest.raises(ValueError, match="output_type must be 'pil', got 'np'"):
        inp("a", image=photo, mask_image=mask, padding_mask_crop=4, output_type="np", **kw)
    with pytest.raises(ValueError, match="padding_mask_crop must be an int >= 0"):
        inp("a", image=photo, mask_image=mask, padding_mask_crop=-1, **kw)
    with pytest.raises(ValueError, match="mask_image is 48x40 but image is 96x80"):
        inp("a", image=photo, mask_image=mask.resize((48, 40)), padding_mask_crop=4, **kw)
    with pytest.raises(ValueError, match="multiple of 8"):
        inp("a", image=photo, mask_image=mask, padding_mask_crop=4, height=60, **kw)


def test_depth2img_matches_diffusers(sd_dir, pipe):
    arrays, meta = load_case(COMPONENT, "depth2img_ddim")
    depth = StableDiffusionDepth2ImgPipeline.from_pretrained(
        sd_dir, unet=UNet2DConditionModel.from_pretrained(sd_dir.parent / "unet_depth")
    )
    depth.scheduler = _scheduler(pipe, "ddim")
    images = depth(
        meta["prompt"],
        image=arrays["image"],
        depth_map=arrays["depth_map"],
        strength=meta["strength"],
        num_inference_steps=meta["steps"],
        noise=arrays["noise"],
        sample_posterior=False,
        output_type="np",
        progress=False,
        seed=0,
    ).images
    _assert_matches(images, arrays["images"])


def test_bicubic_matrix_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((1, 1, 13, 13)).astype(np.float32)
    for out in (5, 8, 20):
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(out, out), mode="bicubic", align_corners=False
        ).numpy()[0, 0]
        m = torch_bicubic_matrix(13, out)
        np.testing.assert_allclose(m @ x[0, 0] @ m.T, want, atol=1e-5)


def test_begin_index_follows_diffusers_get_timesteps():
    assert begin_index_for_strength(10, 0.6) == 4
    assert begin_index_for_strength(50, 0.8) == 10
    assert begin_index_for_strength(10, 1.0) == 0
    with pytest.raises(ValueError, match="no step"):
        begin_index_for_strength(10, 0.05)


# ------------------------------------------------------------------ compile behaviour
def _compiles(pipe) -> int:
    return sum(f._cache_size() for f in pipe._jit_cache.values())


def test_guidance_seed_prompt_and_eta_do_not_recompile(pipe):
    pipe.scheduler = _scheduler(pipe, "ddim")
    pipe._jit_cache.clear()
    kw = dict(num_inference_steps=2, output_type="np", progress=False)
    a = pipe(["a cat", "a dog"], guidance_scale=7.5, seed=0, **kw).images
    assert _compiles(pipe) == 1
    b = pipe(["a cat", "a dog"], guidance_scale=np.float32(3.0), seed=0, **kw).images
    c = pipe(["a cat", "a dog"], guidance_scale=7.5, seed=1, **kw).images
    d = pipe(["a red cat", "a blue dog"], guidance_scale=7.5, seed=0, eta=0.5, **kw).images
    e = pipe(
        ["a cat", "a dog"], guidance_scale=7.5, seed=0, guidance_rescale=np.float32(0.7), **kw
    ).images
    assert _compiles(pipe) == 1
    for other in (b, c, d, e):  # each argument really reached the program
        assert np.abs(other - a).max() > 1e-3


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "pndm", "pndm_prk"])
def test_step_count_and_strength_do_not_recompile(pipe, name):
    if name == "pndm_prk":  # the Runge-Kutta warm-up: N + 9 model calls
        pipe.scheduler = PNDMScheduler.from_config(pipe.saved_scheduler_config, skip_prk_steps=False)  # fmt: skip
    else:
        pipe.scheduler = _scheduler(pipe, name)
    pipe._jit_cache.clear()
    kw = dict(output_type="np", progress=False, seed=0)
    a = pipe("a cat", num_inference_steps=4, **kw).images
    b = pipe("a cat", num_inference_steps=7, **kw).images
    c = pipe("a cat", num_inference_steps=20, **kw).images
    assert _compiles(pipe) == 1
    assert np.abs(a - b).max() > 1e-3 and np.abs(b - c).max() > 1e-3
    img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    image = np.full((1, 64, 64, 3), 0.25, np.float32)
    d = img("a cat", image=image, strength=0.5, num_inference_steps=4, **kw).images
    e = img("a cat", image=image, strength=0.9, num_inference_steps=6, **kw).images
    assert _compiles(img) == 1
    assert np.abs(d - e).max() > 1e-3


@pytest.mark.parametrize("name, custom", [("dpm++", "timesteps"), ("euler", "sigmas")])
def test_custom_schedules_do_not_recompile(pipe, name, custom):
    pipe.scheduler = _scheduler(pipe, name)
    pipe._jit_cache.clear()
    kw = dict(output_type="np", progress=False, seed=0)
    schedules = {
        "timesteps": ([999, 500, 100], [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]),
        "sigmas": ([14.6, 3.0, 0.5, 0.0], [14.6, 6.5, 2.9, 1.2, 0.45, 0.1, 0.0]),
    }[custom]
    a = pipe("a cat", **{custom: schedules[0]}, **kw).images
    b = pipe("a cat", **{custom: schedules[1]}, **kw).images
    c = pipe("a cat", num_inference_steps=5, **kw).images
    assert _compiles(pipe) == 1
    assert np.abs(a - b).max() > 1e-3 and np.abs(b - c).max() > 1e-3
    # the custom schedule replaces num_inference_steps, as in diffusers
    d = pipe("a cat", num_inference_steps=30, **{custom: schedules[0]}, **kw).images
    np.testing.assert_array_equal(d, a)


def test_custom_schedule_errors(pipe):
    kw = dict(progress=False, seed=0, output_type="np")
    pipe.scheduler = _scheduler(pipe, "ddim")
    with pytest.raises(ValueError, match="DDIMScheduler takes no custom timesteps"):
        pipe("a cat", timesteps=[999, 500], **kw)
    pipe.scheduler = _scheduler(pipe, "dpm++")
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler takes no custom sigmas"):
        pipe("a cat", sigmas=[14.6, 1.0, 0.0], **kw)
    pipe.scheduler = _scheduler(pipe, "euler")
    with pytest.raises(ValueError, match="pass timesteps or sigmas, not both"):
        pipe("a cat", timesteps=[999, 500], sigmas=[14.6, 1.0, 0.0], **kw)
    with pytest.raises(ValueError, match="timesteps must be a non-empty 1-D list of numbers"):
        pipe("a cat", timesteps=[[999, 500]], **kw)
    with pytest.raises(ValueError, match="sigmas must be a non-empty 1-D list of numbers"):
        pipe("a cat", sigmas=[], **kw)


def test_images_depend_only_on_their_own_key(pipe):
    pipe.scheduler = _scheduler(pipe, "euler_a")  # stochastic steps too
    kw = dict(num_inference_steps=2, output_type="np", progress=False)
    keys = jax.random.split(jax.random.key(3), 3)
    three = pipe(["a", "b", "c"], key=keys, **kw).images
    one = pipe(["b"], key=keys[1:2], **kw).images
    np.testing.assert_allclose(one[0], three[1], atol=1e-5)


def test_latent_output_and_bf16(sd_dir):
    with pytest.warns(UserWarning):
        pipe = DiffusionPipeline.from_pretrained(sd_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    kw = dict(num_inference_steps=3, progress=False, seed=0)
    lat = pipe("a cat", output_type="latent", **kw).images
    assert lat.shape == (1, 8, 8, 4)
    ref = pipe("a cat", output_type="np", **kw).images
    pipe.to(jnp.bfloat16)
    assert pipe.params["unet"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    low = pipe("a cat", output_type="np", **kw).images
    assert low.dtype == np.float32 and np.isfinite(low).all()
    # bf16 keeps ~3 significant digits through 3 steps of a random-weight model: a sane bound.
    assert np.abs(low - ref).mean() < 0.05


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.scheduler = _scheduler(pipe, "ddim")
    pipe.save_pretrained(tmp_path / "sd")
    again = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert type(again.scheduler) is DDIMScheduler
    kw = dict(num_inference_steps=2, output_type="np", progress=False, seed=0)
    np.testing.assert_array_equal(again("a cat", **kw).images, pipe("a cat", **kw).images)


def test_saved_pipeline_loads_in_diffusers(pipe, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    pipe.scheduler = _scheduler(pipe, "ddim")
    pipe.save_pretrained(tmp_path / "sd")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        tmp_path / "sd", safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref(
            "a cat",
            num_inference_steps=3,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        ).images
    got = pipe("a cat", num_inference_steps=3, latents=latents, output_type="np", seed=0)
    _assert_matches(got.images, want)


# ------------------------------------------------------------------ VAE memory savers
@pytest.mark.parity
def test_vae_tiling_and_slicing_match_diffusers(pipe, sd_dir):
    """128x128 images: 16x16 latents decoded in 8x8 tiles (the VAE's sample_size 64 / 8)."""
    torch = pytest.importorskip("torch")
    from tests.pipelines.sd_helpers import diffusers_sd_pipe

    ref = diffusers_sd_pipe(sd_dir)
    ref.vae.enable_tiling()
    ref.vae.enable_slicing()
    latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    kw = dict(num_inference_steps=2, height=128, width=128, output_type="np")
    with torch.no_grad():
        want = ref(["a cat", "a dog"], latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), **kw).images  # fmt: skip
    pipe.scheduler = _scheduler(pipe, "ddim")
    plain = pipe(["a cat", "a dog"], latents=latents, seed=0, progress=False, **kw).images
    pipe.enable_vae_tiling()
    pipe.enable_vae_slicing()
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    got = pipe(["a cat", "a dog"], latents=latents, seed=0, progress=False, **kw).images
    pipe.disable_vae_tiling()
    pipe.disable_vae_slicing()
    assert not (pipe.vae.use_tiling or pipe.vae.use_slicing)
    _assert_matches(got, want)
    assert np.abs(got - plain).max() > 1e-3  # the tiles' seams: tiling really ran


# ------------------------------------------------------------------ callback_on_step_end
@pytest.mark.parity
def test_callback_on_step_end_matches_diffusers(pipe, sd_dir):
    """A callback that records (i, t) and rescales the latents after step 1, in text2img and
    img2img (whose i restarts at 0), against diffusers; a new callback does not recompile."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from tests.pipelines.sd_helpers import diffusers_sd_pipe

    def make(record, nchw):
        def callback(p, i, t, kw):
            record.append((i, int(t)))
            z = kw["latents"]
            assert z.shape == ((2, 4, 8, 8) if nchw else (2, 8, 8, 4))
            return {"latents": z * 0.7 if i == 1 else z}

        return callback

    ref = diffusers_sd_pipe(sd_dir)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    image = np.random.default_rng(1).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    kw = dict(num_inference_steps=4, output_type="np")
    want_t, want_i = [], []
    with torch.no_grad():
        want = ref(["a cat", "a dog"], latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   callback_on_step_end=make(want_t, True), **kw).images  # fmt: skip
        i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
        i2i(["a cat", "a dog"], image=torch.from_numpy(image.transpose(0, 3, 1, 2).copy()),
            strength=0.5, callback_on_step_end=make(want_i, True), **kw)  # fmt: skip

    pipe.scheduler = _scheduler(pipe, "ddim")
    pipe._jit_cache.clear()
    got_t, got_i = [], []
    got = pipe(["a cat", "a dog"], latents=latents, seed=0, progress=False,
               callback_on_step_end=make(got_t, False), **kw).images  # fmt: skip
    _assert_matches(got, want)
    assert got_t == want_t and len(got_t) == 4
    other = pipe(["a cat", "a dog"], latents=latents, seed=0, progress=False,
                 callback_on_step_end=lambda p, i, t, kw: None, **kw).images  # fmt: skip
    assert _compiles(pipe) == 1 and np.abs(other - got).max() > 1e-3
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img(["a cat", "a dog"], image=image, strength=0.5, seed=0, progress=False,
            callback_on_step_end=make(got_i, False), **kw)  # fmt: skip
    assert got_i == want_i and [i for i, _ in got_i] == [0, 1]


@pytest.mark.parity
def test_euler_log_linear_matches_diffusers(pipe, sd_dir):
    """Euler's "log_linear" schedule has N + 2 noise levels; the pipeline's fixed-shape padded
    state (no recompile per step count) used to reject it."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from tests.pipelines.sd_helpers import diffusers_sd_pipe

    ref = diffusers_sd_pipe(sd_dir)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        ref.scheduler.config, interpolation_type="log_linear"
    )
    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=4, output_type="np")
    with torch.no_grad():
        want = ref("a cat", latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   **kw).images  # fmt: skip
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, interpolation_type="log_linear"
    )
    got = pipe("a cat", latents=latents, seed=0, progress=False, **kw).images
    _assert_matches(got, want)


def test_callback_on_step_end_errors(pipe):
    kw = dict(num_inference_steps=2, seed=0, progress=False)

    def wrong_shape(p, i, t, kw):
        return {"latents": kw["latents"][:, :4]}

    with pytest.raises(ValueError, match=r"returned latents of shape \(1, 4, 8, 4\); expected \(1, 8, 8, 4\)"):  # fmt: skip
        pipe("a cat", callback_on_step_end=wrong_shape, **kw)
    with pytest.raises(ValueError, match="passes only \\['latents'\\]"):
        pipe("a cat", callback_on_step_end=wrong_shape, callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw)  # fmt: skip
    with pytest.raises(TypeError, match="must be callable"):
        pipe("a cat", callback_on_step_end="nope", **kw)


# ------------------------------------------------------------------ bad input
def test_bad_input_errors(pipe, sd_dir):
    kw = dict(num_inference_steps=2, progress=False, seed=0)
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        pipe("a cat", height=60, **kw)
    with pytest.raises(ValueError, match="width must be a multiple of 8"):
        pipe("a cat", width=65, **kw)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        pipe("a cat", guidance_scale=-1.0, **kw)
    for rescale in (-0.5, float("nan"), "0.7"):
        with pytest.raises(ValueError, match="guidance_rescale must be a number >= 0"):
            pipe("a cat", guidance_rescale=rescale, **kw)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries for 2 prompts"):
        pipe(["a", "b"], negative_prompt=["x"], **kw)
    keys = jax.random.split(jax.random.key(0), 3)
    with pytest.raises(ValueError, match="key holds 3 keys but 2 prompt"):
        pipe(["a", "b"], key=keys, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("a", latents=np.zeros((1, 4, 8, 8)), **kw)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a", output_type="tensor", **kw)
    with pytest.raises(ValueError, match="prompt"):
        pipe(**kw)
    image = np.full((1, 64, 64, 3), 0.5, np.float32)
    img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength must be in"):
            img("a", image=image, strength=strength, **kw)
    with pytest.raises(ValueError, match="multiple of 8"):
        img("a", image=np.zeros((1, 60, 64, 3)), **kw)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        img("a", image=image * 4, **kw)
    inp = StableDiffusionInpaintPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="mask_image is 32x32 but image is 64x64"):
        inp("a", image=image, mask_image=np.ones((32, 32)), **kw)
    depth = StableDiffusionDepth2ImgPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="depth_map"):
        depth("a", image=image, **kw)


def test_bad_scalars_and_arrays_fail_before_compiling(pipe):
    """NaN/inf, wrong types and empty arrays get an error naming the argument, not a NaN
    image or a numpy/JAX traceback."""
    kw = dict(num_inference_steps=2, progress=False, seed=0)
    for gs in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale must be >= 0 .*got"):
            pipe("a cat", guidance_scale=gs, **kw)
    for eta in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            pipe("a cat", eta=eta, **kw)
    with pytest.raises(TypeError, match="eta must be a number, got 'a'"):
        pipe("a cat", eta="a", **kw)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive int"):
        pipe("a cat", num_images_per_prompt=True, **kw)
    with pytest.raises(ValueError, match="clip_skip must be an int"):
        pipe("a cat", clip_skip=True, **kw)
    with pytest.raises(ValueError, match=r"seed must fit in 64 bits"):
        pipe("a cat", num_inference_steps=2, progress=False, seed=2**70)
    with pytest.raises(ValueError, match="cross_attention_kwargs\\['scale'\\] must be finite"):
        pipe("a cat", cross_attention_kwargs={"scale": float("nan")}, **kw)
    with pytest.raises(ValueError, match="prompt_embeds holds NaN"):
        pipe(prompt_embeds=np.full((1, 5, 16), np.nan), **kw)
    with pytest.raises(TypeError, match="prompt_embeds must be an array .*got str"):
        pipe(prompt_embeds="abc", **kw)
    with pytest.raises(ValueError, match="with batch, seq >= 1, got \\(1, 0, 16\\)"):
        pipe(prompt_embeds=np.zeros((1, 0, 16)), **kw)
    with pytest.raises(ValueError, match="latents holds NaN"):
        pipe("a", latents=np.full((1, 8, 8, 4), np.nan), **kw)
    image = np.full((1, 64, 64, 3), 0.5, np.float32)
    img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="image holds NaN"):
        img("a", image=np.full((64, 64, 3), np.nan, np.float32), **kw)
    with pytest.raises(TypeError, match="image must be PIL image.* got str"):
        img("a", image="/no/such/file.png", **kw)
    with pytest.raises(ValueError, match="noise must have shape"):
        img("a", image=image, noise=np.zeros((1, 8, 8, 3)), **kw)
    inp = StableDiffusionInpaintPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="mask_image holds NaN"):
        inp("a", image=image, mask_image=np.full((64, 64), np.nan), **kw)
    with pytest.raises(TypeError, match="mask_image must be PIL mask.* got str"):
        inp("a", image=image, mask_image="mask.png", **kw)
    for shape in ((64, 64, 3), (1, 64, 64, 3), (64, 64, 4)):
        with pytest.raises(
            ValueError,
            match=r"looks like an RGB\(A\) image: array masks are single-channel, \(H, W\), "
            r"\(H, W, 1\), \(B, H, W\) or \(B, H, W, 1\)",
        ):
            inp("a", image=image, mask_image=np.ones(shape, np.float32), **kw)
    # (H, W, 1) is one mask, as diffusers' mask processor reads it
    from jaxdiff.pipelines.stable_diffusion import mask_to_array

    hw1 = np.random.default_rng(0).random((64, 48, 1)).astype(np.float32)
    np.testing.assert_array_equal(mask_to_array(hw1), mask_to_array(hw1[..., 0]))


def test_components_must_have_the_right_kind(pipe, sd_dir):
    with pytest.raises(TypeError, match="scheduler must be a jaxdiff scheduler object"):
        pipe.scheduler = "ddim"
    with pytest.raises(
        TypeError, match="unet must be a jaxdiff model given as \\(module, params\\)"
    ):
        StableDiffusionPipeline.from_pipe(pipe, unet=3)


# ------------------------------------------------------------------ devices
_MULTI = RECORD_COMPILES + textwrap.dedent(
    """
    import sys, warnings
    import numpy as np
    warnings.simplefilter("ignore")
    from jaxdiff.pipelines import DiffusionPipeline
    from jaxdiff.schedulers import EulerAncestralDiscreteScheduler
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    kw = dict(num_inference_steps=2, output_type="np", progress=False, seed=0)
    out = {"jit3": pipe(["a", "b", "c"], **kw).images,
           "jit8": pipe(["a", "b", "c", "d"], num_images_per_prompt=2, **kw).images}
    for name in ("pmap8", "pmap8_again"):
        compiles.clear()
        out[name] = pipe(["a", "b", "c", "d"], num_images_per_prompt=2, use_pmap=True,
                         **kw).images
    assert not compiles, f"the second pmap call compiled again: {compiles}"
    np.savez(sys.argv[2], **out)
    """
)


def _run_devices(sd_dir, tmp_path, n):
    script = tmp_path / "multi.py"
    script.write_text(_MULTI)
    out = tmp_path / f"out{n}.npz"
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu"
    )
    subprocess.run(
        [sys.executable, str(script), str(sd_dir), str(out)],
        check=True,
        env=env,
        cwd=Path(__file__).parents[2],
        timeout=600,
    )
    return np.load(out)


def test_eight_devices_equal_one_device(sd_dir, tmp_path):
    one = _run_devices(sd_dir, tmp_path, 1)
    eight = _run_devices(sd_dir, tmp_path, 8)
    # Per-image keys: an image never depends on batch size, padding (3 -> 8) or device count;
    # only XLA's per-shape kernels differ, at float32 round-off.
    for k in ("jit3", "jit8", "pmap8"):
        np.testing.assert_allclose(eight[k], one[k], atol=1e-4, err_msg=k)
    for out in (one, eight):  # the script asserts that the second pmap call compiled nothing
        np.testing.assert_array_equal(out["pmap8_again"], out["pmap8"])
    np.testing.assert_allclose(one["pmap8"], one["jit8"], atol=1e-4)


# ------------------------------------------------------------------ compilation cache
_CACHE_RUN = textwrap.dedent(
    """
    import sys, warnings
    import jax
    warnings.simplefilter("ignore")
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    from jaxdiff.pipelines import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])  # reads $JAXDIFF_CACHE_DIR
    pipe("a cat", num_inference_steps=2, output_type="np", progress=False, seed=0)
    hits = events.count("/jax/compilation_cache/cache_hits")
    misses = events.count("/jax/compilation_cache/cache_misses")
    print(f"HITS={hits} MISSES={misses}")
    """
)


def test_persistent_compilation_cache_serves_a_second_process(sd_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_CACHE_RUN)
    cache = tmp_path / "cache"
    env = dict(os.environ, JAXDIFF_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")

    def run():
        proc = subprocess.run(
            [sys.executable, str(script), str(sd_dir)],
            check=True,
            env=env,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[2],
            timeout=600,
        )
        line = [s for s in proc.stdout.splitlines() if s.startswith("HITS=")][-1]
        hits, misses = (int(part.split("=")[1]) for part in line.split())
        return hits, misses

    hits, misses = run()
    assert misses >= 1 and hits == 0  # the first process compiles and writes the cache
    assert any(cache.iterdir())
    hits, misses = run()
    assert hits >= 1 and misses == 0  # the second one compiles nothing


# ------------------------------------------------------------------ CLI
def test_cli_text2img_img2img_inpaint(sd_dir, tmp_path, capsys):
    from PIL import Image

    from jaxdiff.cli import main as cli_main

    base = [str(sd_dir), "--steps", "2", "--batch", "2", "--no-progress", "--scheduler", "ddim"]
    out = tmp_path / "t2i.png"
    assert cli_main(["generate", "a cat", "--model", *base, "--out", str(out)]) == 0
    assert Image.open(out).size == (128, 64)  # a 1 x 2 grid of 64 x 64 images
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    img = ["--image", str(tmp_path / "in.png")]
    args = ["generate", "a cat", "--model", *base, *img, "--strength", "0.5"]
    assert cli_main([*args, "--out", str(tmp_path / "i2i.png")]) == 0
    args = ["generate", "a cat", "--model", *base, *img, "--mask", str(tmp_path / "mask.png")]
    assert cli_main([*args, "--out", str(tmp_path / "inp.png")]) == 0
    assert "wrote 2 image(s)" in capsys.readouterr().out
    # padding_mask_crop: a 64x64 crop around the mask, pasted back into the 96x80 photo
    Image.fromarray(np.full((80, 96, 3), 90, np.uint8)).save(tmp_path / "big.png")
    big_mask = np.zeros((80, 96), np.uint8)
    big_mask[30:46, 50:70] = 255
    Image.fromarray(big_mask).save(tmp_path / "big_mask.png")
    args = ["generate", "a cat", "--model", *base, "--image", str(tmp_path / "big.png")]
    args += ["--mask", str(tmp_path / "big_mask.png"), "--padding-mask-crop", "4"]
    assert cli_main([*args, "--out", str(tmp_path / "crop.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "crop.png"))
    assert grid.shape == (80, 192, 3)  # a 1 x 2 grid of the full-size photos
    assert (grid[:, :96][big_mask == 0] == 90).all() and (grid[:, 96:][big_mask == 0] == 90).all()
    assert np.abs(grid[30:46, 50:70].astype(int) - 90).max() > 10
    args = ["generate", "a cat", "--model", *base, "--padding-mask-crop", "4"]
    assert cli_main([*args, "--out", str(tmp_path / "z.png")]) == 2
    assert "--padding-mask-crop needs --image and --mask" in capsys.readouterr().err
    # errors name the argument
    assert cli_main(["generate", "--model", *base, "--out", str(tmp_path / "x.png")]) == 2
    assert "needs a prompt" in capsys.readouterr().err
    args = ["generate", "a cat", "--model", *base, "--height", "60"]
    assert cli_main([*args, "--out", str(tmp_path / "y.png")]) == 2
    assert "height must be a multiple of 8" in capsys.readouterr().err


def test_cli_custom_schedule_and_guidance_rescale_equal_the_pipeline_call(pipe, sd_dir, tmp_path):
    from PIL import Image

    from jaxdiff.cli import main as cli_main
    from jaxdiff.utils.images import make_image_grid

    out = tmp_path / "ays.png"
    args = ["generate", "a cat", "--model", str(sd_dir), "--batch", "2", "--no-progress"]
    args += ["--scheduler", "dpm++", "--timesteps", "999,850,500,100", "--seed", "3"]
    assert (
        cli_main([*args, "--guidance-rescale", "0.7", "--clip-skip", "1", "--out", str(out)]) == 0
    )
    pipe.scheduler = _scheduler(pipe, "dpm++")
    expected = pipe(
        "a cat",
        num_images_per_prompt=2,
        seed=3,
        timesteps=[999, 850, 500, 100],
        guidance_rescale=0.7,
        clip_skip=1,
        progress=False,
    ).images
    np.testing.assert_array_equal(np.asarray(Image.open(out)), make_image_grid(expected, 1, 2))
    assert not np.array_equal(  # the options reach the pipeline: without them it differs
        np.asarray(make_image_grid(expected, 1, 2)),
        np.asarray(
            make_image_grid(
                pipe(
                    "a cat",
                    num_images_per_prompt=2,
                    seed=3,
                    timesteps=[999, 850, 500, 100],
                    progress=False,
                ).images,
                1,
                2,
            )
        ),
    )


def test_cli_schedule_options_errors(sd_dir, tmp_path, capsys):
    from jaxdiff.cli import main as cli_main

    base = ["generate", "a cat", "--model", str(sd_dir), "--no-progress"]
    out = ["--out", str(tmp_path / "x.png")]
    assert cli_main([*base, "--steps", "4", "--timesteps", "999,500", *out]) == 2
    assert "give one of --steps, --timesteps and --sigmas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*base, "--timesteps", "999,half", *out])
    assert "expected comma-separated integers" in capsys.readouterr().err
    # PNDM's set_timesteps takes no custom schedule: the pipeline's error reaches the user
    assert cli_main([*base, "--scheduler", "pndm", "--timesteps", "999,500", *out]) == 2
    assert "timesteps" in capsys.readouterr().err
    img = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(img)
    assert cli_main([*base, "--image", str(img), "--guidance-rescale", "0.7", *out]) == 2
    assert "--guidance-rescale is a text2img option" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_rejects_a_prompt_for_unconditional_models(tmp_path, capsys):
    from jaxdiff.cli import main as cli_main

    tiny = reference_dir("pipelines_unconditional") / "ddpm_tiny"
    args = ["generate", "a cat", "--model", str(tiny), "--steps", "2", "--no-progress"]
    assert cli_main([*args, "--out", str(tmp_path / "x.png")]) == 2
    assert "is unconditional" in capsys.readouterr().err
    args = ["generate", "--model", str(tiny), "--timesteps", "999,500", "--no-progress"]
    assert cli_main([*args, "--guidance-rescale", "0.5", "--out", str(tmp_path / "x.png")]) == 2
    assert "['--guidance-rescale', '--timesteps']" in capsys.readouterr().err
