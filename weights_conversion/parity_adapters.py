r"""One way to run each model class in jaxdiff and in its PyTorch reference, on the same input.

A :class:`ParityAdapter` knows, for one class name (diffusers/transformers spelling), how to

* load the PyTorch reference model from a folder (``load_torch``),
* make a small fixed input from the jaxdiff module's config (``make_inputs``, numpy, NHWC),
* run the jaxdiff module (``run_jax``) and the PyTorch model (``run_torch``) on it, each
  returning a dict of named NHWC numpy outputs.

:func:`compare` returns the relative L2 error
:math:`\lVert y_{\mathrm{jax}} - y_{\mathrm{torch}} \rVert_2 / \lVert y_{\mathrm{torch}} \rVert_2`
of every output. The converter (``convert_to_jaxdiff.py``), the tests and the benchmarks share
these adapters. torch, diffusers and transformers are imported only inside the functions that
need them, so importing this module costs nothing without them.

Classes: ``UNet2DModel`` (x, t[, class_labels]), ``UNet2DConditionModel`` (x, t, context),
``AutoencoderKL`` (encode mean, decode), ``CLIPTextModel`` (input_ids -> last_hidden_state,
pooler_output).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

TORCH_LIBRARIES = ("torch", "diffusers", "transformers")


def reference_available() -> bool:
    """True when torch, diffusers and transformers are all importable."""
    return all(importlib.util.find_spec(m) is not None for m in TORCH_LIBRARIES)


def relative_l2(actual: Any, expected: Any) -> float:
    r"""Relative L2 error :math:`\lVert a - e \rVert_2 / \lVert e \rVert_2` over the whole array."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: jaxdiff {a.shape} vs PyTorch {e.shape}")
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().transpose(0, 2, 3, 1)


def _spatial(block_out_channels, minimum: int = 8) -> int:
    """A small height/width that every down-sampling level accepts."""
    factor = 2 ** (len(block_out_channels) - 1)
    return max(2 * factor, minimum)


def _diffusers_loader(class_name: str) -> Callable:
    def load(folder, subfolder=None, variant=None, allow_pickle=False):
        import diffusers
        import torch

        cls = getattr(diffusers, class_name)
        model = cls.from_pretrained(
            os.fspath(folder),
            subfolder=subfolder,
            variant=variant,
            use_safetensors=not allow_pickle,
            dtype=torch.float32,
        )
        return model.float().eval()

    return load


def _load_clip(folder, subfolder=None, variant=None, allow_pickle=False):
    import torch
    import transformers

    kwargs = {"subfolder": subfolder} if subfolder else {}
    model = transformers.CLIPTextModel.from_pretrained(
        os.fspath(folder),
        variant=variant,
        use_safetensors=not allow_pickle,
        dtype=torch.float32,
        **kwargs,
    )
    return model.float().eval()


# ----------------------------------------------------------------------------- UNet2DModel


def _unet2d_inputs(module, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = _spatial(module.block_out_channels)
    out = {
        "sample": rng.standard_normal((2, size, size, module.in_channels)).astype(np.float32),
        "timesteps": np.array([10, 981], np.int64),
    }
    if module.class_embed_type is None and module.num_class_embeds is not None:
        out["class_labels"] = np.array([0, module.num_class_embeds - 1], np.int64)
    elif module.class_embed_type == "timestep":
        out["class_labels"] = np.array([3, 500], np.int64)
    return out


def _unet2d_jax(module, params, inputs):
    @jax.jit
    def run(params, sample, timesteps, labels):
        return module.apply({"params": params}, sample, timesteps, labels).sample

    out = run(params, inputs["sample"], inputs["timesteps"], inputs.get("class_labels"))
    return {"sample": np.asarray(out, np.float32)}


def _unet2d_torch(model, inputs):
    import torch

    labels = inputs.get("class_labels")
    with torch.no_grad():
        out = model(
            _nchw(inputs["sample"]),
            torch.from_numpy(inputs["timesteps"]),
            class_labels=None if labels is None else torch.from_numpy(labels),
        ).sample
    return {"sample": _nhwc(out)}


# ----------------------------------------------------------------------------- UNet2DConditionModel


def _unet_cond_inputs(module, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = _spatial(module.block_out_channels)
    sample = rng.standard_normal((2, size, size, module.in_channels)).astype(np.float32)
    context = rng.standard_normal((2, 8, module.context_dim)).astype(np.float32)
    return {
        "sample": sample,
        "timesteps": np.array([10, 981], np.int64),
        "encoder_hidden_states": context,
    }


def _unet_cond_jax(module, params, inputs):
    @jax.jit
    def run(params, sample, timesteps, context):
        return module.apply({"params": params}, sample, timesteps, context).sample

    out = run(params, inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"])
    return {"sample": np.asarray(out, np.float32)}


def _unet_cond_torch(model, inputs):
    import torch

    with torch.no_grad():
        out = model(
            _nchw(inputs["sample"]),
            torch.from_numpy(inputs["timesteps"]),
            torch.from_numpy(inputs["encoder_hidden_states"]),
        ).sample
    return {"sample": _nhwc(out)}


# ----------------------------------------------------------------------------- AutoencoderKL


def _vae_inputs(module, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = _spatial(module.block_out_channels, minimum=16)
    latent = size // 2 ** (len(module.block_out_channels) - 1)
    return {
        "image": rng.uniform(-1, 1, (1, size, size, module.in_channels)).astype(np.float32),
        "latent": rng.standard_normal((1, latent, latent, module.latent_channels)).astype(
            np.float32
        ),
    }


def _vae_jax(module, params, inputs):
    from jaxdiff.models.autoencoder_kl import AutoencoderKL

    @jax.jit
    def run(params, image, latent):
        v = {"params": params}
        mean = module.apply(v, image, method=AutoencoderKL.encode).latent_dist.mean
        return mean, module.apply(v, latent, method=AutoencoderKL.decode).sample

    mean, dec = run(params, inputs["image"], inputs["latent"])
    return {"encode_mean": np.asarray(mean, np.float32), "decode": np.asarray(dec, np.float32)}


def _vae_torch(model, inputs):
    import torch

    with torch.no_grad():
        mean = model.encode(_nchw(inputs["image"])).latent_dist.mean
        dec = model.decode(_nchw(inputs["latent"])).sample
    return {"encode_mean": _nhwc(mean), "decode": _nhwc(dec)}


# ----------------------------------------------------------------------------- CLIPTextModel


def _clip_inputs(module, seed: int, seq: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = min(seq, module.max_position_embeddings)
    top = module.vocab_size - 1  # keep the largest id free for the end-of-text token
    ids = rng.integers(0, top, (2, seq), dtype=np.int64)
    eos = module.eos_token_id
    eos = eos[0] if isinstance(eos, tuple) else eos
    end = top if eos in (None, 2) or eos >= module.vocab_size else eos
    ids[0, seq // 2] = end  # a short prompt, then padding after its end token
    ids[1, -1] = end  # a prompt that fills the row
    return {"input_ids": ids}


def _clip_jax(module, params, inputs):
    out = jax.jit(module.apply)({"params": params}, inputs["input_ids"].astype(np.int32))
    return {
        "last_hidden_state": np.asarray(out.last_hidden_state, np.float32),
        "pooler_output": np.asarray(out.pooler_output, np.float32),
    }


def _clip_torch(model, inputs):
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(inputs["input_ids"]))
    return {
        "last_hidden_state": out.last_hidden_state.float().numpy(),
        "pooler_output": out.pooler_output.float().numpy(),
    }


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ParityAdapter:
    """How to run one model class in both libraries (see the module docstring)."""

    load_torch: Callable[..., Any]
    make_inputs: Callable[[Any, int], dict[str, np.ndarray]]
    run_jax: Callable[[Any, dict, dict[str, np.ndarray]], dict[str, np.ndarray]]
    run_torch: Callable[[Any, dict[str, np.ndarray]], dict[str, np.ndarray]]


ADAPTERS: dict[str, ParityAdapter] = {
    "UNet2DModel": ParityAdapter(
        _diffusers_loader("UNet2DModel"), _unet2d_inputs, _unet2d_jax, _unet2d_torch
    ),
    "UNet2DConditionModel": ParityAdapter(
        _diffusers_loader("UNet2DConditionModel"),
        _unet_cond_inputs,
        _unet_cond_jax,
        _unet_cond_torch,
    ),
    "AutoencoderKL": ParityAdapter(
        _diffusers_loader("AutoencoderKL"), _vae_inputs, _vae_jax, _vae_torch
    ),
    "CLIPTextModel": ParityAdapter(_load_clip, _clip_inputs, _clip_jax, _clip_torch),
}


def adapter(class_name: str) -> ParityAdapter:
    """The adapter of a class name; raises naming the supported classes otherwise."""
    if class_name not in ADAPTERS:
        raise ValueError(f"no parity adapter for {class_name!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[class_name]


def compare(
    class_name: str, module: Any, params: dict, torch_model: Any, seed: int = 0
) -> dict[str, float]:
    """Relative L2 of every output, jaxdiff ``(module, params)`` against ``torch_model``.

    Args:
        class_name: e.g. ``"UNet2DConditionModel"``.
        module: the jaxdiff module (compute dtype float32 for a parity number).
        params: its params tree.
        torch_model: the PyTorch reference in float32, eval mode.
        seed: seed of the fixed input.
    """
    ad = adapter(class_name)
    inputs = ad.make_inputs(module, seed)
    with jax.default_matmul_precision("highest"):  # no TF32/bf16 passes on GPU/TPU
        ours = ad.run_jax(module, params, inputs)
    theirs = ad.run_torch(torch_model, inputs)
    return {name: relative_l2(ours[name], theirs[name]) for name in theirs}


def parity_from_folder(
    class_name: str,
    module: Any,
    params: dict,
    folder: str | os.PathLike,
    subfolder: str | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Loads the PyTorch reference from ``folder[/subfolder]`` and runs :func:`compare`."""
    ad = adapter(class_name)
    torch_model = ad.load_torch(folder, subfolder, variant, allow_pickle)
    try:
        return compare(class_name, module, params, torch_model, seed)
    finally:
        del torch_model
