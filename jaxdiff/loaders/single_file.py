r"""Original Stable Diffusion checkpoints (one ``.safetensors`` of the CompVis/LDM layout) ->
the diffusers-layout state dicts jaxdiff's strict loaders take.

An LDM checkpoint holds the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and, for SD 1.x, the transformers CLIP text encoder under
``cond_stage_model.transformer.``. The key tables are built from the diffusers configs:

* UNet: ``input_blocks[1 + i (L + 1) + j]`` is down block ``i``'s resnet ``j`` (``.0``) and its
  attention (``.1``), ``input_blocks[(i + 1)(L + 1)].0.op`` its downsampler (``L`` =
  ``layers_per_block``); ``middle_block.0/1/2`` the mid resnet, attention, resnet;
  ``output_blocks[i (L + 1) + j]`` up block ``i``'s resnet ``j`` and attention, the last one
  also its upsampler (``.1``, or ``.2`` after an attention). Inside a resnet ``in_layers.0/2``,
  ``emb_layers.1``, ``out_layers.0/3`` and ``skip_connection`` are ``norm1``, ``conv1``,
  ``time_emb_proj``, ``norm2``, ``conv2`` and ``conv_shortcut``.
* VAE: ``encoder.down[i].block[j]`` and ``decoder.up[n - 1 - i].block[j]`` (the decoder is
  numbered from the bottom), ``mid.block_1/attn_1/block_2``, ``nin_shortcut``; the attention's
  ``q/k/v/proj_out`` are 1x1 convolutions that become linear layers.

Only the non-EMA weights are read unless ``extract_ema=True`` (then ``model_ema.<key without
dots>``), as diffusers. SD 2.x checkpoints hold an OpenCLIP text transformer under
``cond_stage_model.model.`` instead (:func:`open_clip_text_encoder`). The tables are explicit and strict: a key under a component's prefix
that does not map, or a weight the model lacks, is reported by the component's loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff import hub
from jaxdiff.loaders import state_dict as sd
from jaxdiff.loaders.safetensors_io import open_file
from jaxdiff.loaders.weights import checkpoint_format, read_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
_OPEN_CLIP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# What OpenCLIP keeps beside the text transformer and CLIPTextModel has no use for.
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _layers(config: Mapping[str, Any]) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"single-file loading needs an int layers_per_block, got {lpb!r}")
    return lpb


def unet_block_table(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for a UNet2DConditionModel config."""
    lpb, n = _layers(config), len(config["down_block_types"])
    table = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(n):
        for j in range(lpb):
            k = 1 + i * (lpb + 1) + j
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (
                f"input_blocks.{(i + 1) * (lpb + 1)}.0.op"
            )
    for i, block in enumerate(config["up_block_types"]):
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        if i < n - 1:
            slot = 2 if "CrossAttn" in block else 1
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (lpb + 1) + lpb}.{slot}"
    return table


def vae_block_table(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for an AutoencoderKL config."""
    lpb, n = _layers(config), len(config["block_out_channels"])
    table = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        table[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        table[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(n):
        for j in range(lpb):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"  # fmt: skip
        for j in range(lpb + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        if i < n - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"  # fmt: skip
    return table


def _to_ldm(key: str, table: Mapping[str, str], inner: Mapping[str, Mapping[str, str]]) -> str:
    """One diffusers key -> its LDM key: the longest table prefix, then the names inside it."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            rest = ".".join(parts[cut:])
            for kind, names in inner.items():
                if kind in prefix:
                    for old, new in names.items():
                        if rest.startswith(old + "."):
                            rest = new + rest[len(old) :]
                            break
            return f"{table[prefix]}.{rest}"
    return key


def _inner(component: str) -> dict[str, dict[str, str]]:
    if component == "unet":
        return {"resnets": _RESNET}
    return {"resnets": {"conv_shortcut": "nin_shortcut"}, "attentions": _VAE_ATTENTION}


def diffusers_to_ldm_keys(keys: list[str], config: Mapping[str, Any], component: str) -> dict:
    """{diffusers key: LDM key (with the component's prefix)} for ``unet`` or ``vae``."""
    table = unet_block_table(config) if component == "unet" else vae_block_table(config)
    prefix = UNET_PREFIX if component == "unet" else VAE_PREFIX
    return {k: prefix + _to_ldm(k, table, _inner(component)) for k in keys}


def open_clip_text_encoder(checkpoint: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """SD 2.x's OpenCLIP text transformer (``cond_stage_model.model.``) -> transformers
    ``CLIPTextModel`` keys: ``resblocks.i`` -> ``encoder.layers.i``, the fused
    ``attn.in_proj_{weight,bias}`` split into q, k, v; blocks from ``num_layers`` on (SD 2.x
    uses the penultimate of 24) and the projection heads are dropped, as diffusers does."""
    out: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if not key.startswith(OPEN_CLIP_PREFIX):
            continue
        name = key[len(OPEN_CLIP_PREFIX) :]
        if name in _OPEN_CLIP:
            out[_OPEN_CLIP[name]] = value
            continue
        if name in _OPEN_CLIP_UNUSED:
            continue
        parts = name.split(".")
        if name.startswith("transformer.resblocks.") and len(parts) > 3 and parts[2].isdigit():
            i, rest = int(parts[2]), ".".join(parts[3:])
            if i >= num_layers:
                continue
            layer = f"text_model.encoder.layers.{i}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = rest.rsplit("_", 1)[1]
                q, k, v = np.split(np.asarray(value), 3, axis=0)
                for proj, part in (("q", q), ("k", k), ("v", v)):
                    out[f"{layer}.self_attn.{proj}_proj.{leaf}"] = part
                continue
            module, _, leaf = rest.rpartition(".")
            if module in _OPEN_CLIP_LAYER:
                out[f"{layer}.{_OPEN_CLIP_LAYER[module]}.{leaf}"] = value
                continue
        out[key] = value  # reported as unexpected by the strict loader
    return out


def ldm_component(
    checkpoint: Mapping[str, Any],
    component: str,
    expected_keys: list[str],
    config: Mapping[str, Any] | None = None,
    extract_ema: bool = False,
) -> dict[str, Any]:
    """The diffusers-layout state dict of ``component`` (``unet``, ``vae`` or
    ``text_encoder``) in an LDM checkpoint. ``expected_keys`` are the model's diffusers keys;
    LDM keys under the component's prefix that none of them maps to are kept under their own
    names, so the strict loader names them as unexpected."""
    if component == "text_encoder":
        if any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint):
            return open_clip_text_encoder(checkpoint, config["num_hidden_layers"])
        return {
            k[len(CLIP_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(CLIP_PREFIX)
        }
    mapping = diffusers_to_ldm_keys(expected_keys, config, component)
    prefix = UNET_PREFIX if component == "unet" else VAE_PREFIX

    def read(ldm_key: str) -> Any:
        if extract_ema and component == "unet":
            return checkpoint.get("model_ema." + "".join(ldm_key.split(".")[1:]))
        return checkpoint.get(ldm_key)

    out, used = {}, set()
    for key, ldm_key in mapping.items():
        value = read(ldm_key)
        if value is None:
            continue
        used.add(ldm_key)
        out[key] = value  # the VAE's loader turns 1x1-conv attention weights into linear ones
    for key, value in checkpoint.items():  # leftovers: reported by the strict loader
        if key.startswith(prefix) and key not in used:
            out[key[len(prefix) :]] = value
    return out


# diffusers' default config repos (single_file_utils.DIFFUSERS_DEFAULT_PIPELINE_PATHS)
DEFAULT_CONFIG_REPOS = {
    "v1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "v2": "stabilityai/stable-diffusion-2-1",
}


class FromSingleFileMixin:
    """``StableDiffusionPipeline.from_single_file``: an LDM checkpoint plus diffusers configs."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str,
        config: str | None = None,
        dtype: Any = jnp.float32,
        extract_ema: bool = False,
        allow_pickle: bool = False,
        **kwargs,
    ):
        """Loads an original (CompVis/LDM-layout) Stable Diffusion 1.x or 2.x checkpoint.

        Args:
            pretrained_model_link_or_path: a local ``.safetensors`` file, or
                ``"owner/repo/file.safetensors"`` on the Hub.
            config: a diffusers pipeline folder or repo whose ``model_index.json`` and
                component configs describe the checkpoint (default: SD 1.5's or SD 2.1's
                repo, by the text encoder's layout, through the Hub cache), as diffusers'
                ``config=``.
            dtype: the compute dtype.
            extract_ema: read the UNet's EMA weights (``model_ema.*``) instead.
            allow_pickle: also read ``.ckpt`` files (``torch.load(weights_only=True)``).
            **kwargs: components to use instead (``scheduler=...``) and the Hub options.

        Raises:
            WeightLoadError: per model, every key of the checkpoint that does not fit it.
        """
        from jaxdiff.configuration import load_config
        from jaxdiff.models.autoencoder_kl import AutoencoderKL
        from jaxdiff.models.clip_text import CLIPTextModel
        from jaxdiff.models.unet_2d_condition import UNet2DConditionModel

        hub_kwargs = hub.pop_hub_kwargs(kwargs)
        path = _checkpoint_path(pretrained_model_link_or_path, hub_kwargs)
        kind = checkpoint_format(path)
        if kind is None:
            raise ValueError(
                f"{path} is not a model checkpoint: from_single_file reads a Stable Diffusion "
                "1.x/2.x single-file checkpoint, a .safetensors file (a pickled .ckpt only with "
                "allow_pickle=True); a pipeline folder in diffusers layout or a Hub repo id "
                "loads with from_pretrained"
            )
        if kind == "safetensors":
            checkpoint = open_file(path)
        elif allow_pickle:
            checkpoint = read_state_dict([path], allow_pickle=True)
        else:
            raise ValueError(
                f"{path} is a pickled checkpoint; pass allow_pickle=True to read it "
                "(torch.load(weights_only=True)), or convert it to safetensors"
            )
        open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint)
        if not open_clip and not any(k.startswith(CLIP_PREFIX) for k in checkpoint):
            raise ValueError(
                f"{path} has neither {CLIP_PREFIX}* (SD 1.x) nor {OPEN_CLIP_PREFIX}* (SD 2.x) "
                "text-encoder keys: it is not a Stable Diffusion 1.x/2.x checkpoint that "
                "from_single_file reads (SDXL and others: convert them with diffusers first)"
            )
        if config is None:
            config = DEFAULT_CONFIG_REPOS["v2" if open_clip else "v1"]
        models = {}
        for comp, model_cls in (
            ("unet", UNet2DConditionModel),
            ("vae", AutoencoderKL),
            ("text_encoder", CLIPTextModel),
        ):
            if comp in kwargs:
                continue
            cfg = load_config(config, comp, model_cls.config_name, **hub_kwargs)
            module = model_cls.from_config(cfg, dtype=dtype)
            table = sd.key_table(module.param_shapes(), module._list_names, model_cls._torch_rename)
            keys = [key for key, _ in table.values()]
            state = ldm_component(checkpoint, comp, keys, module.config, extract_ema=extract_ema)
            models[comp] = (module, module.params_from_state_dict(state))
        return cls.from_pretrained(config, dtype=dtype, **models, **kwargs, **hub_kwargs)


def _checkpoint_path(link: str, hub_kwargs: dict) -> str:
    """A local file, or ``owner/repo/path/file`` resolved through the Hub cache."""
    import os

    name = os.fspath(link)
    if os.path.isfile(name):
        return name
    for prefix in ("https://huggingface.co/", "huggingface.co/", "hf.co/", "https://hf.co/"):
        if name.startswith(prefix):
            name = name[len(prefix) :].replace("/blob/main/", "/", 1)
    parts = name.split("/")
    if len(parts) < 3 or os.path.exists(os.path.dirname(name) or "."):
        raise hub.HubFileNotFoundError(
            f"{link!r} is neither a local checkpoint file nor 'owner/repo/file.safetensors'"
        )
    return hub.resolve_file("/".join(parts[:2]), "/".join(parts[2:]), **hub_kwargs)
