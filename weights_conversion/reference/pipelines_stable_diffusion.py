"""Golden references for jaxdiff's Stable Diffusion pipelines: a tiny random SD pipeline in Hub
layout, written by diffusers itself, and the images diffusers' pipelines make with it.

Writes ``tests/reference/pipelines_stable_diffusion/``:

* ``sd_tiny/``: a ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``,
  ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) with the real SD 1.x block types
  at toy widths, the real CLIP vocabulary (built from ``shared/data``'s BPE merges) and SD 1.5's
  PNDM scheduler config. A VAE with four levels keeps the real latent factor 8: 8x8 latents,
  64x64 images. Weights are stored float16 (every float32 weight was rounded to float16 first,
  so the files hold exactly the model that made the outputs). Also the README's example model.
* ``unet_inpaint/``, ``unet_depth/``: the same UNet with 9 and 5 input channels.
* ``<case>.{safetensors,json}``: inputs (NHWC latents / noise / images) and diffusers'
  ``output_type="np"`` images (B, H, W, 3) in [0, 1] (``inpaint_crop``: uint8 PIL images in
  and out, as ``padding_mask_crop`` requires).

Randomness diffusers draws inside its pipelines is made explicit: text2img and inpaint take
``latents``; for img2img and depth2img the forward-process noise is fixed by replacing the
pipeline module's ``randn_tensor`` with one that returns the recorded noise, and the VAE
posterior is taken at its mode (``retrieve_latents(..., sample_mode="argmax")``; jaxdiff:
``sample_posterior=False``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from weights_conversion.reference._io import save_case

BPE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bpe_simple_vocab_16e6.txt.gz"
)

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=4,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
)
CLIP = dict(
    vocab_size=49408,
    hidden_size=16,
    intermediate_size=32,
    projection_dim=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=0,  # the real SD 1.5 text_encoder config (legacy eos id 2)
    eos_token_id=2,
    pad_token_id=1,
)
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars"]
NEGATIVE = ["blurry, low quality", ""]
STEPS = 5
# "Align Your Steps" SD 1.5 timesteps (Sabour et al. 2024), as passed to diffusers' timesteps=
AYS_TIMESTEPS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
CUSTOM_SIGMAS = [14.6, 6.5, 2.9, 1.2, 0.45, 0.1, 0.0]
HEIGHT = WIDTH = 64
CROP_PAD = 6  # padding_mask_crop of the inpaint_crop case


def _perturb(model, seed: int) -> None:
    """Non-trivial 1-D params (norm scales, biases) and float16-representable weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            p.copy_(p.half().float())


def build_pipeline(out_dir: Path):
    """The tiny diffusers StableDiffusionPipeline, saved to ``out_dir/sd_tiny``; also returns
    the 9- and 5-channel UNets (saved beside it)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jaxdiff.utils.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET).eval()
    _perturb(unet, 1)
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKL(**VAE).eval()
    _perturb(vae, 3)
    torch.manual_seed(4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP)).eval()
    _perturb(text_encoder, 5)
    tok_dir = out_dir / "_tokenizer"
    write_clip_tokenizer(BPE, tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER)  # clip_sample: kept extra
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out_dir / "sd_tiny", safe_serialization=True)
    pipe.to(torch.float32)
    unets = {}
    for name, channels, seed in (("unet_inpaint", 9, 6), ("unet_depth", 5, 8)):
        torch.manual_seed(seed)
        u = diffusers.UNet2DConditionModel(**dict(UNET, in_channels=channels)).eval()
        _perturb(u, seed + 1)
        u.to(torch.float16).save_pretrained(out_dir / name, safe_serialization=True)
        unets[name] = u.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.saved_scheduler_dir = out_dir / "sd_tiny" / "scheduler"
    return pipe, unets


def _nchw(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _images(seed: int, batch: int = 2) -> np.ndarray:
    """Smooth random RGB images in [0, 1], (B, H, W, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (batch, 8, 8, 3))
    return np.repeat(np.repeat(coarse, 8, 1), 8, 2).astype(np.float32)


class _FixedNoise:
    """Stands in for a pipeline module's ``randn_tensor``: returns the recorded noise."""

    def __init__(self, noise: np.ndarray):
        self.noise = noise

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        import torch

        out = _nchw(self.noise)
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out.to(dtype or torch.float32)


def _argmax_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


def _scheduler(pipe, name: str):
    """``name``'s scheduler from the *saved* scheduler config, as a user of the folder swaps it
    (an in-memory config would let the new class use its own defaults for the fields listed in
    ``_use_default_values``)."""
    import diffusers

    cls = {
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
        "pndm": diffusers.PNDMScheduler,
    }[name]
    return cls.from_config(cls.load_config(pipe.saved_scheduler_dir))


def generate(out_dir: Path) -> None:
    import diffusers
    import torch
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_depth2img as depth_mod,
    )
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_img2img as img2img_mod,
    )
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_inpaint as inpaint_mod,
    )

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    pipe, unets = build_pipeline(out_dir)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)

    # ---- text2img: three deterministic schedulers, CFG with negative prompts, no CFG, CFG with
    # guidance_rescale, custom timesteps / sigmas, num_images_per_prompt, clip_skip, PNDM (the
    # folder's own scheduler).
    cases = [
        ("txt2img_ddim", "ddim", dict(guidance_scale=7.5, negative_prompt=NEGATIVE)),
        ("txt2img_euler", "euler", dict(guidance_scale=7.5, negative_prompt=NEGATIVE)),
        ("txt2img_dpm", "dpm", dict(guidance_scale=5.0)),
        ("txt2img_pndm", "pndm", dict(guidance_scale=7.5)),
        ("txt2img_nocfg", "ddim", dict(guidance_scale=1.0)),
        ("txt2img_rescale", "ddim", dict(guidance_scale=7.5, guidance_rescale=0.7)),
        # custom schedules (retrieve_timesteps): they replace num_inference_steps
        ("txt2img_dpm_timesteps", "dpm", dict(guidance_scale=7.5, timesteps=AYS_TIMESTEPS)),
        ("txt2img_euler_sigmas", "euler", dict(guidance_scale=7.5, sigmas=CUSTOM_SIGMAS)),
    ]
    for name, sched, kw in cases:
        pipe.scheduler = _scheduler(pipe, sched)
        with torch.no_grad():
            images = pipe(
                PROMPTS,
                num_inference_steps=STEPS,
                latents=_nchw(latents),
                output_type="np",
                **kw,
            ).images
        meta = {"scheduler": sched, "prompt": PROMPTS, "steps": STEPS, **kw}
        save_case(out_dir, name, {"latents": latents, "images": images}, meta)

    # clip_skip: diffusers 0.42 reaches for ``text_encoder.text_model``, which transformers 5's
    # CLIPTextModel no longer has; its embeddings are made here exactly as encode_prompt does
    # (hidden_states[-(clip_skip + 1)], then the final layer norm) and passed as prompt_embeds.
    pipe.scheduler = _scheduler(pipe, "ddim")
    clip_skip = 1

    def embed(texts, skip):
        ids = pipe.tokenizer(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        out = pipe.text_encoder(ids, output_hidden_states=True)
        if skip is None:
            return out[0]
        return pipe.text_encoder.final_layer_norm(out.hidden_states[-(skip + 1)])

    with torch.no_grad():  # as encode_prompt: the negative prompt is encoded without clip_skip
        images = pipe(
            prompt_embeds=embed(PROMPTS, clip_skip),
            negative_prompt_embeds=embed(["", ""], None),
            num_inference_steps=STEPS,
            latents=_nchw(latents),
            output_type="np",
        ).images
    meta = {"scheduler": "ddim", "prompt": PROMPTS, "clip_skip": clip_skip, "guidance_scale": 7.5}
    save_case(out_dir, "txt2img_clipskip", {"latents": latents, "images": images}, meta)

    with torch.no_grad():
        images = pipe(
            "a photo of a cat",
            num_images_per_prompt=2,
            num_inference_steps=STEPS,
            latents=_nchw(latents),
            output_type="np",
        ).images
    meta = {"scheduler": "ddim", "prompt": "a photo of a cat", "num_images_per_prompt": 2}
    save_case(out_dir, "txt2img_per_prompt", {"latents": latents, "images": images}, meta)

    # ---- img2img: fixed forward-process noise, posterior mode.
    init = _images(1)
    noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    img_pipe = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img_pipe.set_progress_bar_config(disable=True)
    saved = img2img_mod.randn_tensor, img2img_mod.retrieve_latents
    img2img_mod.randn_tensor, img2img_mod.retrieve_latents = _FixedNoise(noise), _argmax_latents
    try:
        for name, sched, strength, kw in (
            ("img2img_ddim", "ddim", 0.6, {}),
            ("img2img_euler", "euler", 0.8, {}),
            ("img2img_euler_timesteps", "euler", 0.6, dict(timesteps=AYS_TIMESTEPS)),
        ):
            img_pipe.scheduler = _scheduler(pipe, sched)
            with torch.no_grad():
                images = img_pipe(
                    PROMPTS,
                    image=init,
                    strength=strength,
                    num_inference_steps=STEPS * 2,
                    guidance_scale=7.5,
                    output_type="np",
                    **kw,
                ).images
            meta = {"scheduler": sched, "strength": strength, "steps": STEPS * 2, "prompt": PROMPTS}
            meta.update(kw)
            save_case(out_dir, name, {"image": init, "noise": noise, "images": images}, meta)
    finally:
        img2img_mod.randn_tensor, img2img_mod.retrieve_latents = saved

    # ---- inpaint: the 9-channel inpainting UNet and the legacy 4-channel UNet (mask blend).
    mask = np.zeros((2, HEIGHT, WIDTH), np.float32)
    mask[0, 16:48, 8:40] = 1.0
    mask[1, :, 32:] = 1.0
    saved = inpaint_mod.retrieve_latents
    inpaint_mod.retrieve_latents = _argmax_latents
    try:
        for name, unet in (("inpaint_9ch", unets["unet_inpaint"]), ("inpaint_4ch", pipe.unet)):
            components = dict(pipe.components, unet=unet)
            inp = diffusers.StableDiffusionInpaintPipeline(**components)
            inp.set_progress_bar_config(disable=True)
            inp.scheduler = _scheduler(pipe, "ddim")
            with torch.no_grad():
                images = inp(
                    PROMPTS,
                    image=init,
                    mask_image=mask,
                    num_inference_steps=STEPS,
                    guidance_scale=7.5,
                    latents=_nchw(latents),
                    output_type="np",
                ).images
            meta = {"scheduler": "ddim", "strength": 1.0, "steps": STEPS, "prompt": PROMPTS}
            arrays = {"image": init, "mask": mask, "latents": latents, "images": images}
            save_case(out_dir, name, arrays, meta)

        # padding_mask_crop: a 96x80 photo with a small, soft-edged mask; the 64x64 crop around
        # it is repainted and pasted back (PIL in, PIL out, as diffusers requires).
        from PIL import Image

        photo = np.repeat(np.repeat(_images(7, 1)[0], 2, 0), 2, 1)[:80, :96]
        photo = (photo * 255).round().astype(np.uint8)
        soft = np.zeros((80, 96), np.uint8)
        soft[30:46, 50:70] = 255
        soft[29, 50:70] = soft[46, 50:70] = 128  # grey rows: the paste-back blends them
        inp = diffusers.StableDiffusionInpaintPipeline(**dict(pipe.components, unet=unets["unet_inpaint"]))  # fmt: skip
        inp.set_progress_bar_config(disable=True)
        inp.scheduler = _scheduler(pipe, "ddim")
        with torch.no_grad():
            pasted = inp(
                PROMPTS,
                image=Image.fromarray(photo),
                mask_image=Image.fromarray(soft),
                padding_mask_crop=CROP_PAD,
                num_inference_steps=STEPS,
                guidance_scale=7.5,
                latents=_nchw(latents),
            ).images
        meta = {"scheduler": "ddim", "steps": STEPS, "prompt": PROMPTS, "padding_mask_crop": CROP_PAD}  # fmt: skip
        arrays = {"image": photo, "mask": soft, "latents": latents}
        arrays["images"] = np.stack([np.asarray(im) for im in pasted])  # uint8 (B, 80, 96, 3)
        save_case(out_dir, "inpaint_crop", arrays, meta)
    finally:
        inpaint_mod.retrieve_latents = saved

    # ---- depth2img: a user-given depth map (no estimator), fixed noise, posterior mode.
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    depth = np.stack([np.sin(xx / 9.0) + yy / 40.0, np.cos(yy / 7.0) * (xx / 64.0) + 2.0])
    depth = depth.astype(np.float32)
    depth_pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unets["unet_depth"],
        scheduler=_scheduler(pipe, "ddim"),
        depth_estimator=None,
        feature_extractor=None,
    )
    depth_pipe.set_progress_bar_config(disable=True)
    saved = depth_mod.randn_tensor, depth_mod.retrieve_latents
    depth_mod.randn_tensor, depth_mod.retrieve_latents = _FixedNoise(noise), _argmax_latents
    try:
        with torch.no_grad():
            images = depth_pipe(
                PROMPTS,
                image=init,
                depth_map=torch.from_numpy(depth),
                strength=0.7,
                num_inference_steps=STEPS * 2,
                guidance_scale=7.5,
                output_type="np",
            ).images
    finally:
        depth_mod.randn_tensor, depth_mod.retrieve_latents = saved
    meta = {"scheduler": "ddim", "strength": 0.7, "steps": STEPS * 2, "prompt": PROMPTS}
    arrays = {"image": init, "depth_map": depth, "noise": noise, "images": images}
    save_case(out_dir, "depth2img_ddim", arrays, meta)
