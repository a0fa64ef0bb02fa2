r"""LoRA files (diffusers, PEFT, kohya-ss) -> low-rank factors on a model's Flax params.

LoRA (*Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3*) adapts a
frozen weight :math:`W_0 \in \mathbb{R}^{d_{out} \times d_{in}}` by a product of rank :math:`r`,

.. math:: W = W_0 + w\,\frac{\alpha}{r}\,B A, \qquad A \in \mathbb{R}^{r \times d_{in}},\;
          B \in \mathbb{R}^{d_{out} \times r},

with the file's :math:`\alpha` (default :math:`r`, a scale of 1, as diffusers/PEFT) and a user
weight :math:`w` (``set_adapters`` weights times ``cross_attention_kwargs["scale"]``, or
``fuse_lora(lora_scale=)``). rsLoRA (*Kalajdzievski (2023)*) uses :math:`\alpha/\sqrt{r}`.
A convolution's LoRA has :math:`A` of shape (r, in, kh, kw) and :math:`B` of shape
(out, r, 1, 1); :math:`BA` is taken over the flattened kernel.

Key formats read (each module's two factors and optional ``alpha``):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and
  ``text_encoder.``), with the ``LoraConfig`` in the file's ``lora_adapter_metadata``;
* older diffusers: ``<module>.lora.down.weight`` / ``.lora.up.weight``,
  ``<attn>.processor.to_q_lora.down.weight``, ``<module>.lora_linear_layer.down.weight``;
* kohya-ss: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``
  and ``lora_te_``; the flattened names are matched against the model's own module names.

Loading is strict: a module the model does not have, a factor without its partner, a shape
that does not fit, and formats that are not plain LoRA (DoRA, LoHa, LoKr, LoRA biases) are all
reported together in one :class:`LoraLoadError`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff import hub
from jaxdiff.loaders import state_dict as sd
from jaxdiff.loaders.safetensors_io import open_file, read_header
from jaxdiff.loaders.weights import checkpoint_format, read_state_dict

LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# Old diffusers attention-processor names -> the module they adapt, per component.
_PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_B.bias": "LoRA biases",
}


class LoraLoadError(ValueError):
    """A LoRA file that does not fit the model: lists every problem at once."""


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ``down`` :math:`A` (r, in[, kh, kw]) and ``up`` :math:`B`
    (out, r[, 1, 1]) in PyTorch layout, and ``scale`` :math:`\\alpha / r`."""

    down: np.ndarray
    up: np.ndarray
    scale: float


# ---------------------------------------------------------------------------- reading files
def read_lora_file(
    pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, Any],
    weight_name: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    **hub_kwargs,
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The LoRA state dict and the adapter metadata of a file, folder, Hub repo or dict.

    A folder or repo without ``weight_name`` uses ``pytorch_lora_weights.safetensors`` if it
    is there, else its only ``.safetensors`` file, as diffusers' ``_best_guess_weight_name``.
    """
    source = pretrained_model_name_or_path_or_dict
    if isinstance(source, Mapping):
        return dict(source), None
    name = os.fspath(source)
    if os.path.isfile(name):
        path = name
    else:
        if weight_name is None:
            weight_name = _guess_weight_name(name, subfolder, **hub_kwargs)
        path = hub.resolve_file(name, weight_name, subfolder, **hub_kwargs)
    kind = checkpoint_format(path)
    if kind is None:
        raise ValueError(
            f"{path} is not a LoRA checkpoint: expected a .safetensors file (a pickled .bin "
            "only with allow_pickle=True), a folder or Hub repo holding one, or a state dict"
        )
    if kind != "safetensors" and not allow_pickle:
        raise ValueError(
            f"{path} is a pickled checkpoint; pass allow_pickle=True to read it "
            "(torch.load(weights_only=True)), or convert it to safetensors"
        )
    metadata = None
    if path.endswith(".safetensors"):
        header, _ = read_header(path)
        raw = header.get("__metadata__", {}).get(METADATA_KEY)
        metadata = json.loads(raw) if raw else None
        return dict(open_file(path)), metadata
    return read_state_dict([path], allow_pickle=True), None


def _guess_weight_name(name: str, subfolder: str | None, **hub_kwargs) -> str:
    files = [f for f in hub.list_files(name, subfolder, **hub_kwargs) if f.endswith(".safetensors")]
    files = [f for f in files if not any(s in f for s in ("scheduler", "optimizer", "checkpoint"))]
    if LORA_WEIGHT_NAME_SAFE in files:
        return LORA_WEIGHT_NAME_SAFE
    if len(files) == 1:
        return files[0]
    raise hub.HubFileNotFoundError(
        f"Cannot tell which file of {name!r} holds the LoRA: it has "
        f"{files or 'no .safetensors files'}; pass weight_name=..."
    )


# ---------------------------------------------------------------------------- key formats
def _parse_key(key: str) -> tuple[str, str, str, bool] | None:
    """``key`` -> (component, module, role, kohya) with role ``down``/``up``/``alpha``/``dora``,
    or None for a key that is not plain LoRA."""
    for prefix, comp in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            flat, _, suffix = key[len(prefix) :].partition(".")
            role = {
                "lora_down.weight": "down",
                "lora_up.weight": "up",
                "alpha": "alpha",
                "dora_scale": "dora",
            }.get(suffix)
            return (comp, flat, role, True) if role else None
    comp = "unet"
    for name in COMPONENTS:
        if key.startswith(name + "."):
            comp, key = name, key[len(name) + 1 :]
            break
    m = re.fullmatch(
        r"(.+?)\.(?:lora_A\.weight|lora\.down\.weight|lora_linear_layer\.down\.weight)", key
    )
    if m:
        return comp, m.group(1), "down", False
    m = re.fullmatch(
        r"(.+?)\.(?:lora_B\.weight|lora\.up\.weight|lora_linear_layer\.up\.weight)", key
    )
    if m:
        return comp, m.group(1), "up", False
    m = re.fullmatch(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key)
    if m:
        return comp, f"{m.group(1)}.{_PROCESSOR_NAMES[comp][m.group(2)]}", m.group(3), False
    if key.endswith(".alpha"):
        return comp, key[: -len(".alpha")], "alpha", False
    return None


def _flat_names(modules: set[str]) -> dict[str, str]:
    """kohya-ss's flattened module names (``.`` -> ``_``) -> the model's names; a text
    encoder's also without the ``text_model_`` prefix."""
    flat = {m.replace(".", "_"): m for m in modules}
    flat.update(
        {k[len("text_model_") :]: m for k, m in flat.items() if k.startswith("text_model_")}
    )
    return flat


def _rank_scale(module: str, rank: int, config: Mapping[str, Any] | None, alphas: dict) -> float:
    r""":math:`\alpha / r` of one module: the LoraConfig of the file's metadata (with PEFT's
    ``alpha_pattern`` matching), else the file's ``alpha`` for the module (missing ones take the
    most common alpha, as diffusers' ``get_peft_kwargs``), else :math:`\alpha = r`."""
    if config is not None:
        alpha = config.get("lora_alpha", rank)
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    if alphas:
        alpha = alphas.get(module, collections.Counter(alphas.values()).most_common(1)[0][0])
        return float(alpha) / rank
    return 1.0


def lora_layers(
    state_dict: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    targets: Mapping[str, Mapping[str, tuple]],
) -> dict[str, dict[str, LoraLayer]]:
    """Groups a LoRA state dict by component and module: ``{"unet": {"down_blocks.0...to_q":
    LoraLayer}, ...}``, the module names as the model's PyTorch names.

    Args:
        state_dict: the file's tensors (any format above).
        metadata: the file's ``lora_adapter_metadata`` (PEFT ``LoraConfig`` per component,
            keys ``"unet.lora_alpha"``, ...), or None.
        targets: per component, the model's ``lora_targets``; kohya's flattened names are
            resolved against their module names.

    Raises:
        LoraLoadError: every key that is not plain LoRA or names no module, every module with
            a missing factor, and every :math:`BA` that does not have its weight's shape.
    """
    parts: dict[str, dict[str, dict[str, Any]]] = {}
    problems: list[str] = []
    dora = False
    flats = {comp: _flat_names(set(modules)) for comp, modules in targets.items()}
    for key, value in state_dict.items():
        parsed = _parse_key(key)
        if parsed is None:
            kind = next((v for k, v in _UNSUPPORTED.items() if k in key), None)
            problems.append(f"{key}: " + (f"{kind} is not supported" if kind else "not a LoRA key"))
            continue
        comp, module, role, kohya = parsed
        if comp not in targets:
            problems.append(f"{key}: the pipeline has no LoRA-capable component {comp!r}")
            continue
        if comp == "text_encoder" and not kohya and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 names CLIPTextModel without it
        if kohya:
            module = flats[comp].get(module, module)
        if role == "dora":  # diffusers drops kohya DoRA scales with a warning, and so do we
            dora = True
            continue
        parts.setdefault(comp, {}).setdefault(module, {})[role] = value
    if dora:
        warnings.warn(
            "The file holds DoRA scales (dora_scale); they are ignored, as diffusers.", stacklevel=3
        )

    out: dict[str, dict[str, LoraLayer]] = {}
    for comp, modules in parts.items():
        alphas = {
            m: float(np.asarray(p["alpha"]).item()) for m, p in modules.items() if "alpha" in p
        }
        config = None
        if metadata:
            prefix = comp + "."
            config = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
            config = config or None
        for module, p in sorted(modules.items()):
            if module not in targets[comp]:
                problems.append(f"{comp}.{module}: the model has no such module")
                continue
            if "down" not in p or "up" not in p:
                have = sorted(r for r in p if r != "alpha")
                problems.append(f"{comp}.{module}: has {have} but needs both down (A) and up (B)")
                continue
            down = np.asarray(p["down"], np.float32)
            up = np.asarray(p["up"], np.float32)
            if up.ndim < 2 or down.shape[0] != up.shape[1]:
                problems.append(
                    f"{comp}.{module}: down {list(down.shape)} and up {list(up.shape)} do not "
                    "share a rank"
                )
                continue
            shape = targets[comp][module][2]
            if (up.shape[0], down[0].size) != (shape[0], int(np.prod(shape[1:]))):
                problems.append(
                    f"{comp}.{module}: B A is {up.shape[0]} x {down[0].size} but the weight is "
                    f"{list(shape)}"
                )
                continue
            scale = _rank_scale(module, down.shape[0], config, alphas)
            out.setdefault(comp, {})[module] = LoraLayer(down, up, scale)
    if problems:
        raise LoraLoadError(
            "The LoRA does not fit this pipeline:\n  " + "\n  ".join(sorted(problems))
        )
    if not out:
        raise LoraLoadError("The LoRA file holds no LoRA weights")
    return out


# ---------------------------------------------------------------------------- models
def lora_targets(model: Any) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """The modules of a jaxdiff model a LoRA can adapt: PyTorch module name -> (Flax path of
    its kernel, layout, PyTorch weight shape)."""
    shapes = model.param_shapes()
    flat = traverse_util.flatten_dict(shapes)
    table = sd.key_table(shapes, model._list_names, type(model)._torch_rename)
    out = {}
    for path, (key, layout) in table.items():
        if path[-1] == "kernel" and key.endswith(".weight"):
            torch_shape = sd.torch_shape(flat[path].shape, layout)
            out[key[: -len(".weight")]] = (path, layout, tuple(torch_shape))
    return out


def delta(layer_down: jax.Array, layer_up: jax.Array, torch_shape: tuple, layout: str):
    r""":math:`B A` in the Flax layout of the weight it adapts (fp32)."""
    r = layer_down.shape[0]
    prod = layer_up.reshape(layer_up.shape[0], r) @ layer_down.reshape(r, -1)
    prod = prod.reshape(torch_shape)
    axes = sd._TO_FLAX_AXES.get(layout)
    return prod if axes is None else jnp.transpose(prod, axes)


@jax.jit
def _merge(leaves: dict, factors: dict, weights: jax.Array) -> dict:
    """``leaves[p] + sum_k weights[k] * scale_k * (B_k A_k)``, in fp32, cast back."""
    out = {}
    for p, w in leaves.items():
        acc = w.astype(jnp.float32)
        for k, (down, up, scale, torch_shape, layout) in factors[p]:
            acc = acc + (weights[k] * scale) * delta(down, up, torch_shape.value, layout.value)
        out[p] = acc.astype(w.dtype)
    return out


def merge_lora(params: dict, adapters: list[tuple[dict, float]], targets: Mapping) -> dict:
    """``params`` with the LoRAs merged in: ``adapters`` is ``[(layers, weight), ...]``, each
    ``layers`` one component's ``{module: LoraLayer}``. Only the adapted leaves are new
    arrays; the weights are traced, so a new weight reuses the compiled merge."""
    factors: dict[tuple[str, ...], list] = {}
    for k, (layers, _) in enumerate(adapters):
        for module, layer in layers.items():
            path, layout, shape = targets[module]
            entry = (jnp.asarray(layer.down), jnp.asarray(layer.up), layer.scale)
            factors.setdefault(path, []).append((k, (*entry, _Static(shape), _Static(layout))))
    if not factors:
        return params
    flat = traverse_util.flatten_dict(params)
    weights = jnp.asarray([w for _, w in adapters], jnp.float32)
    merged = _merge({p: flat[p] for p in factors}, factors, weights)
    flat = {**flat, **merged}
    return traverse_util.unflatten_dict(flat)


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Static:
    """A hashable value carried through ``jax.jit`` as static pytree structure."""

    value: Any
