r"""Stable Diffusion: text2img, img2img, inpaint and depth2img, each one compiled program.

Latent diffusion (*Rombach et al. (2022)*): the UNet denoises VAE latents
:math:`z = s\,\mathcal{E}(x)` (``s = vae.config.scaling_factor``), conditioned on the CLIP text
encoder's hidden states :math:`c = \tau(y)`; classifier-free guidance (*Ho & Salimans (2022),
Eq. 6*) mixes the conditional and unconditional predictions,

.. math:: \tilde\epsilon = \epsilon_\theta(z_t, \varnothing) + w\,\big(\epsilon_\theta(z_t, c)
          - \epsilon_\theta(z_t, \varnothing)\big),

and the image is :math:`\mathcal{D}(z_0 / s)`. Text encoding, the scheduler loop
(:func:`jaxdiff.sampling.denoise`) and the VAE decode are one jitted program per shape and
static option; the prompt's token ids, the seed, ``guidance_scale`` and ``eta`` are arguments
of that program, so changing them never recompiles.

The tasks differ only in where :math:`z_T` comes from and what the UNet sees besides it:

* text2img: :math:`z_T = \sigma_{init}\,\epsilon`;
* img2img (SDEdit, *Meng et al. (2022)*): :math:`z_{t_b} = q(z_{t_b} \mid z_0 = s\,\mathcal{E}(x))`,
  starting at step :math:`b = N - \lfloor N\cdot\text{strength} \rfloor`;
* inpaint: a 9-channel UNet also sees the mask and the latents of the masked image; with a
  4-channel UNet the known region is re-noised to :math:`q(z_{t_{i+1}} \mid z_0)` and blended in
  after every step;
* depth2img: a 5-channel UNet also sees the depth map, resized to the latents (bicubic, as
  ``torch.nn.functional.interpolate``) and scaled to :math:`[-1, 1]` per image.

Randomness: one key per image (``seed=`` or ``key=``); image ``b``'s starting noise, step noise
and VAE posterior sample come from ``fold_in(keys[b], 0 | 1 | 2)``, so an image never depends
on the batch it was made in, its padding or the device count.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxdiff import sampling
from jaxdiff.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from jaxdiff.loaders.single_file import FromSingleFileMixin
from jaxdiff.loaders.textual_inversion import TextualInversionLoaderMixin
from jaxdiff.pipelines.pipeline_utils import (
    DiffusionPipeline,
    ImagePipelineOutput,
    float_array,
    pipeline_result,
    to_output,
)
from jaxdiff.pipelines.unconditional import resolve_key
from jaxdiff.schedulers.common import count_steps
from jaxdiff.utils import mask_crop
from jaxdiff.utils.checks import check_real, is_real
from jaxdiff.utils.tokenizer import tokenize
from jaxdiff.utils.xla import compiler_options

OUTPUT_TYPES = ("pil", "np", "latent")
SIGMA_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
# Schedulers whose step reads N only through traced state (``count_steps``, PNDM's step ratio
# and counter): their states are padded to ``max_model_calls`` entries and the loop bound is
# traced, so a new ``num_inference_steps`` (or img2img ``strength``) reuses the compiled program.
TRACED_STEP_SCHEDULERS = SIGMA_SCHEDULERS + (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "PNDMScheduler",
)


def max_model_calls(num_train_timesteps: int) -> int:
    """Length of a padded state: N <= num_train_timesteps steps, and PNDM with its Runge-Kutta
    warm-up calls the model N + 9 times (3 steps of 4 calls, then N - 3)."""
    return num_train_timesteps + 9


# ---------------------------------------------------------------------------- input handling
def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value % 8:
        raise ValueError(f"{name} must be a multiple of 8, got {value}")
    return int(value)


def _prompt_list(prompt: Any, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def images_to_array(image: Any, name: str = "image") -> np.ndarray:
    """PIL image(s) or a float array in [0, 1] ((H, W, C) or (B, H, W, C)) -> float32 NHWC RGB
    in [-1, 1], as diffusers' ``VaeImageProcessor.preprocess``."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and isinstance(image[0], Image.Image):
        sizes = {im.size for im in image}
        if len(sizes) != 1:
            raise ValueError(f"{name}: every image must have the same size, got {sorted(sizes)}")
        arr = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in image])
    else:
        arr = float_array(image, name, "PIL image(s) or an array (B, H, W, 3) in [0, 1]")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(
                f"{name} must be PIL images or an array (B, H, W, 3) / (H, W, 3) in [0, 1], "
                f"got shape {arr.shape}"
            )
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(
                f"{name} values must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]"
            )
    return arr * 2.0 - 1.0


def mask_to_array(mask: Any) -> np.ndarray:
    """PIL mask(s) or an array ((H, W), (H, W, 1), (B, H, W) or (B, H, W, 1)) -> float32
    (B, H, W, 1) of 0/1 (1 = repaint), binarised at 0.5 as diffusers' mask processor."""
    if isinstance(mask, Image.Image):
        mask = [mask]
    if isinstance(mask, (list, tuple)) and mask and isinstance(mask[0], Image.Image):
        arr = np.stack([np.asarray(m.convert("L"), np.float32) / 255.0 for m in mask])
    else:
        arr = float_array(mask, "mask_image", "PIL mask(s) or an array (B, H, W) in [0, 1]")
        if arr.ndim in (3, 4) and arr.shape[-1] in (3, 4):
            # diffusers' mask processor does not convert array masks to grayscale either: it
            # would read an (H, W, 3) array as H masks of W = 3 pixels
            raise ValueError(
                f"mask_image has shape {arr.shape}, which looks like an RGB(A) image: array "
                "masks are single-channel, (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1) in "
                "[0, 1] (e.g. mask[..., 0]); PIL masks are converted to grayscale"
            )
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.ndim == 3 and arr.shape[-1] == 1:  # (H, W, 1), as diffusers reads it
            arr = arr[None, ..., 0]
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(
                f"mask_image must be PIL images or an array (B, H, W), (H, W) or (B, H, W, 1), "
                f"got shape {arr.shape}"
            )
    return (arr >= 0.5).astype(np.float32)[..., None]


def _per_image(arr: np.ndarray, n_prompts: int, per_prompt: int, name: str) -> np.ndarray:
    """An image-side input (image, mask, depth, masked latents) for every output image, in the
    prompts' order ``[p0, p0, p1, p1]``: one for all, one per prompt (repeated for its
    ``num_images_per_prompt`` images), or one per output image.

    diffusers tiles one-per-prompt inputs instead (``[i0, i1, i0, i1]``), which pairs image 1
    with prompt 0 when ``num_images_per_prompt > 1``; jaxdiff keeps each prompt's own image
    (the two agree whenever either count is 1)."""
    total = n_prompts * per_prompt
    if arr.shape[0] == total:
        return arr
    if arr.shape[0] in (1, n_prompts):
        return np.repeat(arr, total // arr.shape[0], axis=0)
    need = sorted({1, n_prompts, total})
    raise ValueError(
        f"{name} holds {arr.shape[0]} images for {n_prompts} prompts x num_images_per_prompt="
        f"{per_prompt} (need {' or '.join(map(str, need))})"
    )


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of ``torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False)`` along one axis: Keys' cubic convolution with :math:`A = -0.75`,
    source :math:`(i + 0.5)\\,\\text{in}/\\text{out} - 0.5`, borders clamped."""
    a = -0.75

    def cubic(x):
        x = np.abs(x)
        return np.where(
            x <= 1,
            ((a + 2) * x - (a + 3)) * x * x + 1,
            np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0),
        )

    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src).astype(np.int64)
    t = src - base
    m = np.zeros((out_size, in_size), np.float64)
    for k in (-1, 0, 1, 2):
        idx = np.clip(base + k, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), cubic(t - k))
    return m.astype(np.float32)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of ``interpolate(mode="nearest")``: ``floor(i * in / out)``."""
    return np.minimum(np.floor(np.arange(out_size) * (in_size / out_size)), in_size - 1).astype(
        np.int32
    )


def begin_index_for_strength(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """diffusers' ``get_timesteps``: skip the first ``N - floor(N * strength)`` steps."""
    init = min(int(num_inference_steps * strength), num_inference_steps)
    if init < 1:
        raise ValueError(
            f"strength={strength} with num_inference_steps={num_inference_steps} leaves no step "
            "to run; raise strength or num_inference_steps"
        )
    return max(num_inference_steps - init, 0) * order


def custom_schedule(scheduler, timesteps, sigmas) -> dict[str, np.ndarray] | None:
    """Checks a custom ``timesteps`` or ``sigmas`` schedule against the scheduler, as diffusers'
    ``retrieve_timesteps``: ``{name: values}``, or None when neither is given."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass timesteps or sigmas, not both")
    name, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if values is None:
        return None
    accepts = inspect.signature(scheduler.set_timesteps).parameters
    if name not in accepts:
        raise ValueError(
            f"{type(scheduler).__name__} takes no custom {name} (set_timesteps has no {name!r} "
            "argument): use a scheduler that does, such as EulerDiscreteScheduler"
        )
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be a non-empty 1-D list of numbers, got {values!r}")
    return {name: arr}


# The call arguments every task passes on to ``_run`` unchanged (when the caller has them).
_FORWARDED = (
    "prompt",
    "negative_prompt",
    "prompt_embeds",
    "negative_prompt_embeds",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "guidance_rescale",
    "timesteps",
    "sigmas",
    "num_images_per_prompt",
    "key",
    "seed",
    "latents",
    "eta",
    "output_type",
    "progress",
    "clip_skip",
    "use_pmap",
    "return_dict",
    "cross_attention_kwargs",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "strength",
    "sample_posterior",
)


def _lora_scale(cross_attention_kwargs: Any) -> float | None:
    """``cross_attention_kwargs["scale"]``: the only entry jaxdiff's attention takes."""
    if cross_attention_kwargs is None:
        return None
    if not isinstance(cross_attention_kwargs, dict) or set(cross_attention_kwargs) - {"scale"}:
        raise ValueError(
            "cross_attention_kwargs takes only {'scale': <LoRA scale>}, got "
            f"{cross_attention_kwargs!r} (jaxdiff has no attention processors)"
        )
    return cross_attention_kwargs.get("scale")


def _forwarded(arguments: dict[str, Any]) -> dict[str, Any]:
    """The shared call arguments present in a ``__call__``'s ``locals()``."""
    return {k: arguments[k] for k in _FORWARDED if k in arguments}


@dataclass(frozen=True)
class _Spec:
    """Everything static about one compiled program (a new value compiles a new program)."""

    task: str
    shape: tuple[int, ...]  # padded latent batch shape (B, h, w, C)
    do_cfg: bool
    clip_skip: int | None
    output_type: str
    given_embeds: bool
    given_latents: bool
    begin_index: int  # 0 when traced_steps (then it is an argument)
    traced_steps: bool
    sample_posterior: bool
    fresh_start: bool  # inpaint: z_T is pure noise (strength 1 or latents given)
    given_masked_latents: bool = False  # inpaint: masked_image_latents given
    step_callback: bool = False  # callback_on_step_end (its id is an argument)


class StableDiffusionPipeline(
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
    FromSingleFileMixin,
    DiffusionPipeline,
):
    r"""Text-to-image with Stable Diffusion (*Rombach et al. (2022)*).

    ``DiffusionPipeline.from_pretrained(folder)`` returns it for a folder whose
    ``model_index.json`` names ``StableDiffusionPipeline``::

        pipe = DiffusionPipeline.from_pretrained("path/to/sd", dtype=jnp.bfloat16)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        images = pipe(["a photo of a cat"], num_inference_steps=20, seed=0).images
    """

    _components = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    # diffusers' optional components; jaxdiff has no safety checker or IP-adapter encoder
    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    _ignored_flags = ("requires_safety_checker",)
    task = "txt2img"
    unet_extra_channels = 0

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """Image height and width when none is given: the UNet's sample size in pixels."""
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    # ------------------------------------------------------------------ VAE memory savers
    def enable_vae_slicing(self) -> None:
        """Decode (and encode) one image at a time, as diffusers' ``enable_vae_slicing``."""
        self._vae_options(use_slicing=True)

    def disable_vae_slicing(self) -> None:
        self._vae_options(use_slicing=False)

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) large images in overlapping, blended tiles of the VAE's
        ``sample_size``, as diffusers' ``enable_vae_tiling``."""
        self._vae_options(use_tiling=True)

    def disable_vae_tiling(self) -> None:
        self._vae_options(use_tiling=False)

    def _vae_options(self, **fields: bool) -> None:
        """The VAE module with new runtime fields (its params unchanged); recompiles once."""
        if any(getattr(self.vae, k) != v for k, v in fields.items()):
            self.vae = (self.vae.clone(**fields), self.params["vae"])

    # ------------------------------------------------------------------ the program
    def _encode_text(self, params, ids, clip_skip):
        out = self.text_encoder.apply(
            {"params": params}, ids, output_hidden_states=clip_skip is not None
        )
        if clip_skip is None:
            return out.last_hidden_state
        # diffusers' clip_skip: hidden_states[-(clip_skip + 1)], then the final layer norm.
        h = out.hidden_states[-(clip_skip + 1)]
        ln = nn.LayerNorm(epsilon=self.text_encoder.config.layer_norm_eps, dtype=jnp.float32)
        norm_params = params["text_model"]["final_layer_norm"]
        return ln.apply({"params": norm_params}, h.astype(jnp.float32)).astype(h.dtype)

    def _vae_encode(self, params, image, keys, sample_posterior):
        dist = self.vae.apply({"params": params}, image.astype(self.vae.dtype), method="encode")
        dist = dist.latent_dist
        if not sample_posterior:
            return dist.mode() * self.vae.config.scaling_factor
        eps = sampling.per_image_normal(keys, dist.mean.shape)
        return (dist.mean + dist.std * eps) * self.vae.config.scaling_factor

    def _program(self, spec: _Spec):
        """The jitted ``_run_fn(spec)``, cached per components and spec."""
        cache_key = ("sd", *self._component_ids(), spec)
        if cache_key not in self._jit_cache:
            run = self._run_fn(spec)
            self._jit_cache[cache_key] = jax.jit(run, compiler_options=compiler_options())
        return self._jit_cache[cache_key]

    def _run_fn(self, spec: _Spec):
        """The whole generation for ``spec`` as one pure function ``run(params, batch, scalars,
        state, progress_id)``: text encoding, the scheduler loop and the VAE decode."""
        unet, vae, scheduler = self.unet, self.vae, self.scheduler

        def run(params, batch, scalars, state, progress_id):
            begin = scalars["begin"] if spec.traced_steps else spec.begin_index
            keys = batch["keys"]
            init_keys, step_keys, vae_keys, masked_keys = (
                jax.vmap(lambda k, j=j: jax.random.fold_in(k, j))(keys) for j in range(4)
            )
            if spec.given_embeds:
                cond, uncond = batch["embeds"], batch["negative_embeds"]
            else:
                te = params["text_encoder"]
                cond = self._encode_text(te, batch["ids"], spec.clip_skip)
                uncond = self._encode_text(te, batch["negative_ids"], None) if spec.do_cfg else None
            context = jnp.concatenate([uncond, cond]) if spec.do_cfg else cond
            context = context.astype(unet.dtype)
            if spec.given_latents:
                noise = batch["latents"].astype(jnp.float32)
            else:
                noise = sampling.per_image_normal(init_keys, spec.shape)

            extra = None
            post_step = None
            if spec.task == "txt2img":
                z = noise * state.init_noise_sigma
            else:
                image = batch["image"]
                z_image = self._vae_encode(params["vae"], image, vae_keys, spec.sample_posterior)
                if spec.task == "inpaint" and spec.fresh_start:
                    z = noise * state.init_noise_sigma
                else:
                    z = self.scheduler.add_noise_at_step(state, z_image, noise, begin)
                if spec.task == "depth2img":
                    extra = batch["depth"]
                elif spec.task == "inpaint":
                    mask = batch["mask"]  # (B, H, W, 1), 1 = repaint
                    h, w = spec.shape[1:3]
                    mask_lat = mask[:, nearest_indices(mask.shape[1], h)][
                        :, :, nearest_indices(mask.shape[2], w)
                    ]
                    if unet.config.in_channels == 9:
                        if spec.given_masked_latents:
                            z_masked = batch["masked_latents"].astype(jnp.float32)
                        else:
                            masked = image * (mask < 0.5)
                            z_masked = self._vae_encode(
                                params["vae"], masked, masked_keys, spec.sample_posterior
                            )
                        extra = jnp.concatenate([mask_lat, z_masked], axis=-1)
                    else:
                        n_steps = count_steps(state.timesteps)

                        def post_step(x_prev, i):  # known region: re-noise to t_{i+1}, blend
                            j = jnp.minimum(i + 1, n_steps - 1)
                            known = self.scheduler.add_noise_at_step(state, z_image, noise, j)
                            known = jnp.where(i < n_steps - 1, known, z_image)
                            return (1 - mask_lat) * known + mask_lat * x_prev

            if spec.step_callback:  # after the inpaint blend, as diffusers
                blend = post_step

                def post_step(x_prev, i):
                    x_prev = blend(x_prev, i) if blend is not None else x_prev
                    t = state.timesteps[i]
                    return sampling.StepCallback.apply(scalars["callback_id"], i - begin, t, x_prev)

            def model_fn(x, t):
                if extra is not None:
                    x = jnp.concatenate(
                        [x, jnp.tile(extra, (x.shape[0] // extra.shape[0], 1, 1, 1))], -1
                    )
                t = jnp.broadcast_to(t, (x.shape[0],))
                return unet.apply(
                    {"params": params["unet"]}, x.astype(unet.dtype), t, context
                ).sample

            fn = model_fn
            if spec.do_cfg:
                fn = sampling.classifier_free_guidance(
                    model_fn, scalars["guidance_scale"], scalars.get("guidance_rescale")
                )
            step_kwargs = {"eta": scalars["eta"]} if "eta" in scalars else {}
            z0 = sampling.denoise(
                fn,
                scheduler,
                state,
                z,
                step_keys,
                step_kwargs=step_kwargs,
                progress_id=progress_id,
                begin_index=begin,
                post_step=post_step,
                num_steps=scalars.get("num_steps"),
            )
            if spec.output_type == "latent":
                return z0
            x = vae.apply(
                {"params": params["vae"]},
                (z0 / vae.config.scaling_factor).astype(vae.dtype),
                method="decode",
            ).sample
            return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

        return run

    # ------------------------------------------------------------------ shared call
    def _embed_text_side(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_cfg, clip_skip,
        lora_scale,
    ):  # fmt: skip
        """diffusers' ``encode_prompt`` where text meets precomputed states: under guidance,
        ``prompt_embeds`` with a negative prompt (or none: ``""``) and a prompt with
        ``negative_prompt_embeds`` have their text side encoded here (the prompt with
        ``clip_skip``, the negative to ``prompt_embeds``' length without it, loaded
        text-encoder LoRAs included); without guidance the negative side is ignored.
        -> the four arguments for :meth:`_prompts`."""
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if prompt_embeds is not None and negative_prompt_embeds is None:
            if not do_cfg:
                return prompt, None, prompt_embeds, None
            shape = np.shape(prompt_embeds)
            if prompt is not None or len(shape) != 3 or 0 in shape:
                return prompt, negative_prompt, prompt_embeds, None  # _prompts reports it
            negatives = self._negative_list(negative_prompt, shape[0])
            neg = self._encode_on_host(negatives, shape[1], None, lora_scale)
            return None, None, prompt_embeds, neg
        if prompt is not None and prompt_embeds is None and negative_prompt_embeds is not None:
            if not do_cfg:
                return prompt, None, None, None
            emb = self._encode_on_host(_prompt_list(prompt, "prompt"), None, clip_skip, lora_scale)
            return None, None, emb, negative_prompt_embeds
        return prompt, negative_prompt, prompt_embeds, negative_prompt_embeds

    def _encode_on_host(self, texts, max_length, clip_skip, lora_scale) -> np.ndarray:
        """Text -> float32 encoder states outside the compiled program, as inside it."""
        ids = tokenize(self.tokenizer, self.maybe_convert_prompt(texts), max_length)
        te = self._lora_params(("text_encoder",), lora_scale)["text_encoder"]
        return np.asarray(self._encode_text(te, jnp.asarray(ids), clip_skip), np.float32)

    @staticmethod
    def _negative_list(negative_prompt, n: int) -> list[str]:
        """One negative prompt per prompt: ``None`` -> ``""``, a string for all, or a list."""
        if negative_prompt is None:
            return [""] * n
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        negatives = _prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) != n:
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries for {n} prompts: "
                "give one per prompt, a single string, or None"
            )
        return negatives

    def _prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """-> (batch size, arrays for the program); validates the prompt arguments."""
        arrays: dict[str, np.ndarray] = {}
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass prompt or prompt_embeds, not both")
            width = self.unet.config.cross_attention_dim
            expected = f"an array (batch, seq, {width})"
            emb = float_array(prompt_embeds, "prompt_embeds", expected)
            if emb.ndim != 3 or emb.shape[-1] != width or 0 in emb.shape:
                raise ValueError(
                    f"prompt_embeds must have shape (batch, seq, {width}) with batch, seq >= 1, "
                    f"got {emb.shape}"
                )
            if negative_prompt_embeds is None:
                # without guidance (under it, _embed_text_side has encoded the negative side)
                neg = np.zeros_like(emb)  # the program reads it only under guidance
            else:
                neg = float_array(negative_prompt_embeds, "negative_prompt_embeds", expected)
            if neg.shape != emb.shape:
                raise ValueError(
                    f"negative_prompt_embeds must have the shape of prompt_embeds {emb.shape}, "
                    f"got {neg.shape}"
                )
            arrays["embeds"], arrays["negative_embeds"] = emb, neg
            return emb.shape[0], arrays
        if prompt is None:
            raise ValueError("pass prompt (a string or a list of strings) or prompt_embeds")
        if negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds needs prompt_embeds")
        prompts = _prompt_list(prompt, "prompt")
        negatives = self._negative_list(negative_prompt, len(prompts))
        prompts, negatives = (
            self.maybe_convert_prompt(prompts),
            self.maybe_convert_prompt(negatives),
        )
        arrays["ids"] = tokenize(self.tokenizer, prompts)
        arrays["negative_ids"] = tokenize(self.tokenizer, negatives, arrays["ids"].shape[1])
        return len(prompts), arrays

    def _run(
        self,
        *,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        height=None,
        width=None,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        key,
        seed,
        guidance_rescale=None,
        timesteps=None,
        sigmas=None,
        latents=None,
        eta,
        output_type,
        progress,
        clip_skip,
        use_pmap,
        return_dict=True,
        cross_attention_kwargs=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=None,
        strength=1.0,
        sample_posterior=True,
        image=None,
        mask=None,
        depth=None,
        masked_latents=None,
    ) -> ImagePipelineOutput:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        check_real("guidance_scale", guidance_scale, low=0)
        check_real("eta", eta, low=0)
        if guidance_rescale is not None and (
            not is_real(guidance_rescale) or not 0 <= guidance_rescale < float("inf")
        ):
            raise ValueError(f"guidance_rescale must be a number >= 0, got {guidance_rescale!r}")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, (int, np.integer))
            or num_images_per_prompt < 1
        ):
            raise ValueError(
                f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}"
            )
        if clip_skip is not None and not (
            isinstance(clip_skip, int)
            and not isinstance(clip_skip, bool)
            and 0 <= clip_skip <= self.text_encoder.config.num_hidden_layers
        ):  # as diffusers: clip_skip = num_hidden_layers takes the embeddings' output
            raise ValueError(
                f"clip_skip must be an int in [0, {self.text_encoder.config.num_hidden_layers}]"
                f", got {clip_skip!r}"
            )
        do_cfg = guidance_scale > 1.0
        prompt, negative_prompt, prompt_embeds, negative_prompt_embeds = self._embed_text_side(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            do_cfg,
            clip_skip,
            _lora_scale(cross_attention_kwargs),
        )
        n_prompts, arrays = self._prompts(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds
        )
        vsf = self.vae_scale_factor
        if image is not None:
            height = image.shape[1] if height is None else height
            width = image.shape[2] if width is None else width
            if (height, width) != image.shape[1:3]:
                raise ValueError(
                    f"image is {image.shape[2]}x{image.shape[1]} (W x H) but height={height}, "
                    f"width={width}: resize the image first"
                )
        height = _check_size("height", self.default_size if height is None else height)
        width = _check_size("width", self.default_size if width is None else width)
        total = n_prompts * int(num_images_per_prompt)

        # One key per image. A (n,) key array must match the number of images.
        base = resolve_key(key, seed)
        if getattr(base, "ndim", 0) == 1 and base.shape[0] != total:
            raise ValueError(
                f"key holds {base.shape[0]} keys but {n_prompts} prompt(s) x "
                f"num_images_per_prompt={num_images_per_prompt} make {total} images"
            )
        keys = sampling.image_keys(base, total)
        per_image = {k: np.repeat(v, num_images_per_prompt, axis=0) for k, v in arrays.items()}
        latent_shape = (total, height // vsf, width // vsf, self.unet.config.out_channels)
        if latents is not None:
            name = "latents" if self.task in ("txt2img", "inpaint") else "noise"
            latents = float_array(latents, name, f"an array {latent_shape} (NHWC)")
            if latents.shape != latent_shape:
                raise ValueError(
                    f"{name} must have shape {latent_shape} (images, height/{vsf}, width/{vsf}, "
                    f"channels; NHWC), got {latents.shape}"
                )
            per_image["latents"] = latents
        if masked_latents is not None:
            want = (latent_shape[1], latent_shape[2], self.vae.config.latent_channels)
            if masked_latents.ndim != 4 or masked_latents.shape[1:] != want:
                raise ValueError(
                    f"masked_image_latents must have shape (N, {want[0]}, {want[1]}, {want[2]}) "
                    f"(height/{vsf}, width/{vsf}, latent channels; NHWC; N = 1, one per prompt "
                    f"or one per output image), got {masked_latents.shape}"
                )
        inputs = (("image", image), ("mask", mask), ("depth", depth))
        for name, value in (*inputs, ("masked_latents", masked_latents)):
            if value is not None:
                arg = {"mask": "mask_image", "masked_latents": "masked_image_latents"}
                per_image[name] = _per_image(
                    value, n_prompts, int(num_images_per_prompt), arg.get(name, name)
                )

        schedule = custom_schedule(self.scheduler, timesteps, sigmas)
        if schedule:  # as diffusers' retrieve_timesteps: N is the custom schedule's length
            custom = self.scheduler.set_timesteps(None, **schedule)
            num_inference_steps = int(custom.timesteps.shape[0])
        steps = num_inference_steps
        begin = 0
        if self.task != "txt2img":
            if not is_real(strength):
                raise TypeError(f"strength must be a number in [0, 1], got {strength!r}")
            if not 0.0 <= strength <= 1.0:
                raise ValueError(f"strength must be in [0, 1], got {strength}")
            begin = begin_index_for_strength(steps, strength, getattr(self.scheduler, "order", 1))

        n_dev = jax.local_device_count()
        padded = sampling.padded_batch_size(total, n_dev)
        if padded != total:
            extra = jax.vmap(lambda i: jax.random.fold_in(keys[0], i))(
                jnp.arange(total, padded) + 2**20
            )
            keys = jnp.concatenate([keys, extra])
            per_image = {
                k: np.concatenate([v, np.repeat(v[-1:], padded - total, axis=0)])
                for k, v in per_image.items()
            }
        per_image["keys"] = keys
        shape = (padded,) + latent_shape[1:]
        traced = type(self.scheduler).__name__ in TRACED_STEP_SCHEDULERS
        spec = _Spec(
            task=self.task,
            shape=shape,
            do_cfg=do_cfg,
            clip_skip=clip_skip,
            output_type=output_type,
            given_embeds=prompt_embeds is not None,
            given_latents=latents is not None,
            begin_index=0 if traced else begin,
            traced_steps=traced,
            sample_posterior=bool(sample_posterior),
            fresh_start=latents is not None or strength == 1.0,
            step_callback=callback_on_step_end is not None,
            given_masked_latents=masked_latents is not None,
        )
        scalars = {"guidance_scale": jnp.float32(guidance_scale)}
        if guidance_rescale is not None:  # text2img: always traced, so a new value never recompiles
            scalars["guidance_rescale"] = jnp.float32(guidance_rescale)
        from jaxdiff.schedulers.ddim import DDIMScheduler

        if isinstance(self.scheduler, DDIMScheduler):  # as diffusers: eta only where accepted
            scalars["eta"] = jnp.float32(eta)
        if self.task == "depth2img":
            per_image["depth"] = self._prepare_depth(per_image["depth"], shape[1:3])
        params = self._lora_params(
            ("unet", "vae", "text_encoder"), _lora_scale(cross_attention_kwargs)
        )

        callback = self._step_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, total, use_pmap
        )
        if callback is not None:
            scalars["callback_id"] = jnp.int32(callback.id)
        if use_pmap:
            out = self._pmap_run(spec, params, per_image, scalars, steps, begin, schedule)
        else:
            state, more = self._state(steps, shape, begin, traced, schedule)
            scalars.update(more)
            mesh = sampling.batch_mesh() if n_dev > 1 else None
            batch = {k: jnp.asarray(v) for k, v in per_image.items()}
            if mesh is not None:
                batch = {k: sampling.shard_batch(v, mesh) for k, v in batch.items()}
                params = sampling.replicate(params, mesh)
            total_steps = int(more.get("num_steps", state.timesteps.shape[0])) - begin
            with (
                self._progress_bar(total_steps, progress) as bar,
                callback if callback is not None else contextlib.nullcontext(),
            ):
                pid = jnp.asarray(bar.id) if bar.enabled else None
                out = self._program(spec)(params, batch, scalars, state, pid)
                out = jax.block_until_ready(out)
        out = np.asarray(out)[:total]
        if output_type == "latent":
            output = ImagePipelineOutput(images=out)
        else:
            output = to_output(out, output_type)
        return pipeline_result(output, return_dict, None)

    def _step_callback(self, fn, tensor_inputs, n_images: int, use_pmap: bool):
        """diffusers' ``callback_on_step_end(pipe, i, t, {"latents": ...}) -> dict`` as a
        :class:`~jaxdiff.sampling.StepCallback`, or None."""
        if fn is None:
            if tensor_inputs is not None:
                raise ValueError("callback_on_step_end_tensor_inputs needs callback_on_step_end")
            return None
        if not callable(fn):
            raise TypeError(f"callback_on_step_end must be callable, got {fn!r}")
        names = ["latents"] if tensor_inputs is None else list(tensor_inputs)
        if names != ["latents"]:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: jaxdiff passes only ['latents'] (NHWC), "
                f"got {names}"
            )
        if use_pmap:
            raise ValueError("callback_on_step_end runs on the sharded (jit) path, not use_pmap")

        def host(i, t, latents):
            out = fn(self, i, t, {"latents": latents})
            return None if out is None else out.get("latents")

        return sampling.StepCallback(host, n_images)

    def _state(self, steps: int, shape: tuple, begin: int, traced: bool, schedule=None):
        """The scheduler state starting at step ``begin`` (of ``steps``, or of the custom
        ``schedule``), and the program's step arguments (padded to ``max_model_calls`` entries
        when ``traced``)."""
        if schedule:
            state = self.scheduler.set_timesteps(None, shape=shape, **schedule)
        else:
            state = self.scheduler.set_timesteps(steps, shape=shape)
        state = state.replace(step_index=jnp.asarray(begin, state.step_index.dtype))
        if not traced:
            return state, {}
        n = int(state.timesteps.shape[0])
        state = sampling.pad_state(
            state, max_model_calls(self.scheduler.config.num_train_timesteps)
        )
        return state, {"num_steps": jnp.int32(n), "begin": jnp.int32(begin)}

    def _pmap_run(self, spec, params, per_image, scalars, steps, begin, schedule):
        n = jax.local_device_count()
        per_dev = spec.shape[0] // n
        spec_dev = _Spec(**{**spec.__dict__, "shape": (per_dev,) + spec.shape[1:]})
        state, more = self._state(steps, spec_dev.shape, begin, spec.traced_steps, schedule)
        scalars = {**scalars, **more}

        def split(a):
            a = jnp.asarray(a)
            return a.reshape((n, a.shape[0] // n) + a.shape[1:])

        def make_fn():
            run = self._run_fn(spec_dev)
            return lambda p, b, s, st: run(p, b, s, st, None)

        args = (params, {k: split(v) for k, v in per_image.items()}, scalars, state)
        key = ("sd-pmap", *self._component_ids(), spec_dev)
        program = sampling.pmap_program(self._jit_cache, key, make_fn, (None, 0, None, None), *args)
        out = program(*args)
        return out.reshape((-1,) + out.shape[2:])

    def _prepare_depth(self, depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        key: jax.Array | None = None,
        seed: int | None = None,
        latents: Any = None,
        eta: float = 0.0,
        output_type: str = "pil",
        progress: bool = True,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        clip_skip: int | None = None,
        guidance_rescale: float = 0.0,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        use_pmap: bool = False,
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generates images from text.

        Args:
            prompt: a prompt or a list of prompts (or pass ``prompt_embeds``).
            negative_prompt: the unconditional text of classifier-free guidance: one string, or
                one per prompt (default ``""``).
            height, width: image size, multiples of 8 (default ``unet.sample_size * 8``).
            num_inference_steps: scheduler steps.
            guidance_scale: :math:`w` of classifier-free guidance; at most 1 turns it off.
            num_images_per_prompt: images per prompt.
            key / seed: a PRNG key, a ``(n_images,)`` array of keys (one per image), or an int.
            latents: optional starting noise ``(n_images, height/8, width/8, 4)`` (NHWC); it is
                multiplied by the scheduler's ``init_noise_sigma``, as in diffusers.
            eta: DDIM's :math:`\\eta` (ignored by other schedulers, as in diffusers).
            output_type: ``"pil"``, ``"np"`` (float (B, H, W, 3) in [0, 1]) or ``"latent"``.
            progress: a progress bar driven from inside the compiled loop.
            prompt_embeds, negative_prompt_embeds: precomputed text-encoder states
                ``(batch, seq, cross_attention_dim)``; either may go with text on the other
                side (``prompt_embeds`` + ``negative_prompt``, ``prompt`` +
                ``negative_prompt_embeds``), as diffusers.
            clip_skip: use the text encoder's hidden state ``clip_skip`` layers before the last
                (then its final layer norm), as diffusers.
            guidance_rescale: :math:`\\phi` of *Lin et al. (2024)*, Sec. 3.4: rescales the
                guided prediction towards the conditional one's standard deviation (against
                over-exposure with zero terminal SNR); 0 turns it off. Only under guidance.
            timesteps / sigmas: a custom schedule instead of ``num_inference_steps``, for the
                schedulers whose ``set_timesteps`` takes one (DDPM, Euler, DPM-Solver++:
                ``timesteps``; Euler: ``sigmas``, N + 1 values), as diffusers'
                ``retrieve_timesteps``; N is then its length. New values do not recompile.
            use_pmap: ``jax.pmap`` over local devices instead of the sharded ``jit``.
            return_dict: False returns the tuple ``(images, None)``, as diffusers' ``(images,
                nsfw_content_detected)`` without a safety checker.
            cross_attention_kwargs: ``{"scale": s}`` scales the loaded LoRA adapters (UNet and
                text encoder), as diffusers; new values do not recompile.
            callback_on_step_end: ``fn(pipe, i, t, {"latents": z}) -> dict | None``, called on
                the host after each step ``i`` from inside the compiled loop; ``z`` is NHWC
                numpy, and a returned ``"latents"`` replaces it. A new function does not
                recompile. ``pipe._interrupt`` and other tensor inputs are not supported.
            callback_on_step_end_tensor_inputs: only ``["latents"]``.
        """
        return self._run(**_forwarded(locals()))


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    r"""Image-to-image (SDEdit, *Meng et al. (2022)*): noise the image's latents to step
    :math:`b = N - \lfloor N\,\text{strength}\rfloor` and denoise from there."""

    task = "img2img"

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        key: jax.Array | None = None,
        seed: int | None = None,
        noise: Any = None,
        eta: float = 0.0,
        output_type: str = "pil",
        progress: bool = True,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        clip_skip: int | None = None,
        sample_posterior: bool = True,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        use_pmap: bool = False,
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """As :class:`StableDiffusionPipeline`, plus:

        Args:
            image: PIL image(s) or an array (B, H, W, 3) in [0, 1]; one, or one per prompt.
                H and W must be multiples of 8.
            strength: how much of the schedule to run, in [0, 1] (1: ignore the image).
            noise: optional forward-process noise (n_images, H/8, W/8, 4) instead of the key's.
            sample_posterior: sample the VAE posterior (diffusers' default) or take its mode.
        """
        if image is None:
            raise ValueError("image is required: PIL image(s) or an array (B, H, W, 3) in [0, 1]")
        return self._run(
            **_forwarded(locals()),
            latents=noise,
            image=images_to_array(image),
        )


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    r"""Inpainting: repaint where ``mask_image`` is white. With a 9-channel inpainting UNet the
    mask and the masked image's latents are extra UNet inputs; with a 4-channel UNet the known
    region is re-noised and blended in after every step (the legacy method)."""

    task = "inpaint"

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        key: jax.Array | None = None,
        seed: int | None = None,
        latents: Any = None,
        eta: float = 0.0,
        output_type: str = "pil",
        progress: bool = True,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        clip_skip: int | None = None,
        sample_posterior: bool = True,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        use_pmap: bool = False,
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        padding_mask_crop: int | None = None,
        masked_image_latents: Any = None,
    ) -> ImagePipelineOutput | tuple:
        """As :class:`StableDiffusionPipeline`, plus:

        Args:
            image: PIL image(s) or an array (B, H, W, 3) in [0, 1].
            mask_image: PIL mask(s) or an array (B, H, W) in [0, 1], the image's size;
                values >= 0.5 are repainted.
            strength: as img2img; 1 starts from pure noise. ``latents`` (the noise) always
                starts from pure noise, as in diffusers.
            padding_mask_crop: repaint only the box around the mask's white pixels, this many
                pixels larger on each side and widened to the output's aspect ratio: the box
                is resized to ``height`` x ``width`` (default: the UNet's sample size), and
                the result is pasted back into the original image, which shows through
                where the mask is black (:mod:`jaxdiff.utils.mask_crop`). Needs one PIL
                image and one PIL mask (any size) and ``output_type="pil"``, as diffusers.
            masked_image_latents: the VAE latents of the masked image, NHWC (1 or one per
                prompt, height/8, width/8, latent channels), already multiplied by the VAE's
                ``scaling_factor``: the 9-channel UNet's extra input, used instead of
                encoding ``image * (mask < 0.5)`` (as diffusers).
        """
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both image and mask_image")
        if padding_mask_crop is not None:
            if masked_image_latents is not None:
                raise ValueError("masked_image_latents cannot be used with padding_mask_crop")
            arguments = {
                k: v for k, v in locals().items() if k not in ("self", "masked_image_latents")
            }
            return self._crop_and_paste(**arguments)
        in_ch = self.unet.config.in_channels
        if in_ch not in (4, 9):
            raise ValueError(
                f"inpainting needs a 9-channel (inpainting) or 4-channel UNet, got in_channels="
                f"{in_ch}"
            )
        if masked_image_latents is not None:
            if in_ch != 9:
                raise ValueError(
                    "masked_image_latents are an input of the 9-channel inpainting UNet; this "
                    "UNet has 4 channels (the legacy mask blend)"
                )
            masked_image_latents = float_array(
                masked_image_latents, "masked_image_latents", "an array (N, h, w, C) (NHWC)"
            )
        image = images_to_array(image)
        mask = mask_to_array(mask_image)
        if mask.shape[1:3] != image.shape[1:3]:
            raise ValueError(
                f"mask_image is {mask.shape[2]}x{mask.shape[1]} but image is "
                f"{image.shape[2]}x{image.shape[1]} (W x H): they must match"
            )
        return self._run(
            **_forwarded(locals()), image=image, mask=mask, masked_latents=masked_image_latents
        )

    def _crop_and_paste(self, *, image, mask_image, padding_mask_crop, **kwargs):
        """``padding_mask_crop``: inpaint the box around the mask, paste it back."""
        if not isinstance(padding_mask_crop, (int, np.integer)) or padding_mask_crop < 0:
            raise ValueError(
                f"padding_mask_crop must be an int >= 0 (pixels), got {padding_mask_crop!r}"
            )
        if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
            raise ValueError(
                "padding_mask_crop needs image and mask_image as single PIL images, got "
                f"{type(image).__name__} and {type(mask_image).__name__}"
            )
        if kwargs.get("output_type", "pil") != "pil":
            raise ValueError(
                f"padding_mask_crop pastes into the PIL image: output_type must be 'pil', got "
                f"{kwargs['output_type']!r}"
            )
        if mask_image.size != image.size:
            raise ValueError(
                f"mask_image is {mask_image.width}x{mask_image.height} but image is "
                f"{image.width}x{image.height} (W x H): they must match"
            )
        height = _check_size("height", kwargs.pop("height", None) or self.default_size)
        width = _check_size("width", kwargs.pop("width", None) or self.default_size)
        box = mask_crop.crop_region(mask_image, width, height, int(padding_mask_crop))
        crop = mask_crop.crop_and_fill(image, box, width, height)
        crop_mask = mask_crop.crop_and_fill(mask_image, box, width, height).convert("L")
        out = self(image=crop, mask_image=crop_mask, height=height, width=width, **kwargs)
        images = out[0]
        pasted = [mask_crop.paste_back(mask_image, image, im, box) for im in images]
        if isinstance(out, tuple):
            return (pasted, *out[1:])
        out.images = pasted
        return out


class StableDiffusionDepth2ImgPipeline(StableDiffusionPipeline):
    r"""Depth-conditioned image-to-image: a 5-channel UNet sees the latents and the depth map.

    jaxdiff has no depth estimator yet: pass ``depth_map`` (an array (B, H, W) or PIL image).
    """

    task = "depth2img"

    def _prepare_depth(self, depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        # diffusers' prepare_depth_map: bicubic resize to the latents, then per image
        # 2 (d - min) / (max - min) - 1.
        rows = torch_bicubic_matrix(depth.shape[1], size[0])
        cols = torch_bicubic_matrix(depth.shape[2], size[1])
        d = np.einsum("ih,bhw,jw->bij", rows, depth.astype(np.float32), cols)
        lo = d.min(axis=(1, 2), keepdims=True)
        hi = d.max(axis=(1, 2), keepdims=True)
        return (2.0 * (d - lo) / (hi - lo) - 1.0)[..., None].astype(np.float32)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        depth_map: Any = None,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        key: jax.Array | None = None,
        seed: int | None = None,
        noise: Any = None,
        eta: float = 0.0,
        output_type: str = "pil",
        progress: bool = True,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        clip_skip: int | None = None,
        sample_posterior: bool = True,
        use_pmap: bool = False,
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """As :class:`StableDiffusionImg2ImgPipeline`, plus ``depth_map``: (B, H, W) or (H, W)
        array, or PIL image(s), any size (resized to the latents)."""
        if image is None:
            raise ValueError("image is required: PIL image(s) or an array (B, H, W, 3) in [0, 1]")
        if depth_map is None:
            raise ValueError(
                "depth2img needs depth_map (an array (B, H, W) or PIL image): jaxdiff has no "
                "depth estimator component yet"
            )
        if self.unet.config.in_channels != 5:
            raise ValueError(
                f"depth2img needs a 5-channel depth UNet, got in_channels="
                f"{self.unet.config.in_channels}"
            )
        if isinstance(depth_map, Image.Image):
            depth_map = [depth_map]
        if (
            isinstance(depth_map, (list, tuple))
            and depth_map
            and isinstance(depth_map[0], Image.Image)
        ):
            depth = np.stack([np.asarray(d, np.float32) for d in depth_map])
        else:
            depth = float_array(depth_map, "depth_map", "an array (B, H, W) or PIL image(s)")
        if depth.ndim == 2:
            depth = depth[None]
        if depth.ndim != 3:
            raise ValueError(f"depth_map must be (B, H, W) or (H, W), got shape {depth.shape}")
        return self._run(
            **_forwarded(locals()),
            latents=noise,
            image=images_to_array(image),
            depth=depth,
        )
