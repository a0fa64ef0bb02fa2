r"""``load_lora_weights`` and the adapter API of diffusers' ``StableDiffusionLoraLoaderMixin``.

Adapters are kept as low-rank factors (:mod:`jaxdiff.loaders.lora`). A call merges the active
ones into the UNet and text-encoder params before the compiled program runs,

.. math:: W = W_0 + s \sum_k w_k\,\frac{\alpha_k}{r_k}\,B_k A_k,

with :math:`s` = ``cross_attention_kwargs["scale"]`` and :math:`w_k` the ``set_adapters``
weights. The merged params have the base params' shapes and dtypes, so neither a new adapter,
nor a new weight, nor a new scale recompiles the pipeline; the merge itself is one small jitted
function whose weights are traced. ``fuse_lora`` writes the merge into the params (and
``unfuse_lora`` restores the stored originals exactly); ``unload_lora_weights`` then drops the
factors and keeps the fused weights, as in diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from flax import traverse_util

from jaxdiff import hub
from jaxdiff.loaders.lora import (
    COMPONENTS,
    lora_layers,
    lora_targets,
    merge_lora,
    read_lora_file,
)
from jaxdiff.models.modeling_utils import cast_floating
from jaxdiff.utils.checks import check_real, is_real


class StableDiffusionLoraLoaderMixin:
    """LoRA adapters for a pipeline with ``unet`` and ``text_encoder`` components."""

    # ------------------------------------------------------------------ state
    def _lora_state(self) -> dict[str, Any]:
        if "_lora" not in self.__dict__:
            object.__setattr__(
                self,
                "_lora",
                {
                    "adapters": {},  # name -> {component: {module: LoraLayer}}
                    "weights": {},  # name -> {component: float}
                    "active": [],
                    "enabled": True,
                    "fused": set(),
                    "originals": {},  # component -> {flax path: unfused leaf}
                    "targets": {},  # component -> lora_targets(model)
                    "merged": None,  # (key, params) of the last call
                },
            )
        return self.__dict__["_lora"]

    def _lora_targets(self, comp: str) -> dict:
        state = self._lora_state()
        if comp not in state["targets"]:
            state["targets"][comp] = lora_targets(getattr(self, comp))
        return state["targets"][comp]

    def _forget_lora(self, comp: str) -> None:
        """A new ``comp`` model: its adapters, originals and module table no longer apply."""
        state = self._lora_state()
        for layers in state["adapters"].values():
            layers.pop(comp, None)
        state["originals"].pop(comp, None)
        state["targets"].pop(comp, None)
        state["merged"] = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in COMPONENTS and "_lora" in self.__dict__:
            self._forget_lora(name)
        super().__setattr__(name, value)

    def _adopt_state(self, source: Any, kept: list[str]) -> None:
        """``from_pipe``: the source's adapters, weights and fused originals, for the kept
        models (containers copied, so loading or deleting on one pipeline leaves the other)."""
        super()._adopt_state(source, kept)
        if "_lora" not in source.__dict__:
            return
        old = source._lora_state()
        state = self._lora_state()
        state["adapters"] = {n: dict(layers) for n, layers in old["adapters"].items()}
        state["weights"] = {n: dict(w) for n, w in old["weights"].items()}
        state["active"] = list(old["active"])
        state["enabled"] = old["enabled"]
        state["fused"] = set(old["fused"])
        state["originals"] = {c: dict(leaves) for c, leaves in old["originals"].items()}
        state["targets"] = dict(old["targets"])
        for comp in COMPONENTS:
            if comp not in kept:
                self._forget_lora(comp)

    def to(self, dtype: Any):
        super().to(dtype)
        state = self._lora_state()
        state["originals"] = cast_floating(state["originals"], self.dtype)
        state["merged"] = None
        return self

    # ------------------------------------------------------------------ loading
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, Any],
        adapter_name: str | None = None,
        **kwargs,
    ) -> None:
        """Loads a LoRA into the UNet and text encoder and makes it the active adapter.

        Args:
            pretrained_model_name_or_path_or_dict: a ``.safetensors`` file, a folder or Hub
                repo holding one, or a state dict (diffusers, PEFT or kohya-ss keys).
            adapter_name: default ``default_<n>``.
            **kwargs: ``weight_name``, ``subfolder``, ``allow_pickle`` (``.bin`` files, read
                with ``weights_only=True``) and the Hub options.

        Raises:
            LoraLoadError: every key that does not fit the pipeline's models, at once.
        """
        hub_kwargs = hub.pop_hub_kwargs(kwargs)
        file_kwargs = {
            k: kwargs.pop(k) for k in ("weight_name", "subfolder", "allow_pickle") if k in kwargs
        }
        if kwargs:
            raise TypeError(f"load_lora_weights got unexpected argument(s) {sorted(kwargs)}")
        state = self._lora_state()
        name = adapter_name if adapter_name is not None else f"default_{len(state['adapters'])}"
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if name in state["adapters"]:
            raise ValueError(f"adapter_name {name!r} is already loaded; pick another name")
        tensors, metadata = read_lora_file(
            pretrained_model_name_or_path_or_dict, **file_kwargs, **hub_kwargs
        )
        comps = [c for c in COMPONENTS if getattr(self, c, None) is not None]
        targets = {c: self._lora_targets(c) for c in comps}
        state["adapters"][name] = lora_layers(tensors, metadata, targets)
        state["weights"][name] = dict.fromkeys(COMPONENTS, 1.0)
        state["active"] = [name]
        state["merged"] = None

    # ------------------------------------------------------------------ adapters
    def _check_names(self, names: str | Sequence[str]) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        loaded = self._lora_state()["adapters"]
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} are not loaded; loaded: {sorted(loaded)}")
        return names

    def set_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: float | Mapping[str, float] | Sequence[Any] | None = None,
    ) -> None:
        """Activates ``adapter_names`` with ``adapter_weights`` (one number, or one per adapter;
        a number or a ``{"unet": w, "text_encoder": w}`` dict each; default 1)."""
        names = self._check_names(adapter_names)
        if adapter_weights is None or not isinstance(adapter_weights, (list, tuple)):
            adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        if len(adapter_weights) != len(names):
            raise ValueError(
                f"adapter_weights has {len(adapter_weights)} entries for {len(names)} adapters"
            )
        state = self._lora_state()
        for name, w in zip(names, adapter_weights, strict=True):
            if isinstance(w, Mapping):
                bad = [k for k, v in w.items() if k not in COMPONENTS or not is_real(v)]
                if bad:
                    raise ValueError(
                        f"adapter_weights for {name!r}: {bad} are not 'unet'/'text_encoder' "
                        "with a number (per-block weights are not supported)"
                    )
                state["weights"][name] = {c: float(w.get(c, 1.0)) for c in COMPONENTS}
            elif is_real(w):
                state["weights"][name] = dict.fromkeys(COMPONENTS, float(w))
            else:
                raise TypeError(f"adapter_weights entries must be numbers or dicts, got {w!r}")
        state["active"] = names
        state["merged"] = None

    def get_active_adapters(self) -> list[str]:
        state = self._lora_state()
        return list(state["active"]) if state["enabled"] else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names]}`` of every loaded adapter."""
        out: dict[str, list[str]] = {}
        for name, layers in self._lora_state()["adapters"].items():
            for comp in layers:
                out.setdefault(comp, []).append(name)
        return out

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        state = self._lora_state()
        for name in self._check_names(adapter_names):
            if name in state["fused"]:
                raise ValueError(f"adapter {name!r} is fused: unfuse_lora() first")
            del state["adapters"][name], state["weights"][name]
            state["active"] = [n for n in state["active"] if n != name]
        state["merged"] = None

    def disable_lora(self) -> None:
        self._lora_state()["enabled"] = False

    def enable_lora(self) -> None:
        self._lora_state()["enabled"] = True

    # ------------------------------------------------------------------ fusing
    def fuse_lora(
        self,
        components: Sequence[str] = COMPONENTS,
        lora_scale: float = 1.0,
        adapter_names: Sequence[str] | None = None,
    ) -> None:
        """Writes the adapters (default: the active ones) into the params, times
        ``lora_scale``; the originals are kept for :meth:`unfuse_lora`."""
        state = self._lora_state()
        names = self._check_names(adapter_names if adapter_names is not None else state["active"])
        names = [n for n in names if n not in state["fused"]]
        if not is_real(lora_scale):
            raise TypeError(f"lora_scale must be a number, got {lora_scale!r}")
        for comp in self._check_components(components):
            adapters = self._weighted(comp, names, float(lora_scale))
            if not adapters:
                continue
            targets = self._lora_targets(comp)
            flat = traverse_util.flatten_dict(self.params[comp])
            saved = state["originals"].setdefault(comp, {})
            for layers, _ in adapters:
                for module in layers:
                    path = targets[module][0]
                    saved.setdefault(path, flat[path])
            self.params[comp] = merge_lora(self.params[comp], adapters, targets)
        state["fused"] |= set(names)
        state["merged"] = None

    def unfuse_lora(self, components: Sequence[str] = COMPONENTS) -> None:
        """Restores the params :meth:`fuse_lora` changed, bit for bit."""
        state = self._lora_state()
        for comp in self._check_components(components):
            saved = state["originals"].pop(comp, None)
            if saved:
                flat = {**traverse_util.flatten_dict(self.params[comp]), **saved}
                self.params[comp] = traverse_util.unflatten_dict(flat)
        if not state["originals"]:
            state["fused"] = set()
        state["merged"] = None

    def unload_lora_weights(self) -> None:
        """Drops every adapter; fused weights stay in the params (``fuse_lora`` then
        ``unload_lora_weights`` gives a plain model with the LoRA baked in)."""
        state = self._lora_state()
        for key in ("adapters", "weights", "originals"):
            state[key].clear()
        state["active"], state["fused"], state["merged"] = [], set(), None

    def _weighted(self, comp: str, names: Sequence[str], scale: float) -> list[tuple[dict, float]]:
        """``[(layers, weight * scale)]`` of the adapters in ``names`` that adapt ``comp``."""
        state = self._lora_state()
        return [
            (state["adapters"][n][comp], state["weights"][n][comp] * scale)
            for n in names
            if comp in state["adapters"][n]
        ]

    def _check_components(self, components: Sequence[str]) -> list[str]:
        components = [components] if isinstance(components, str) else list(components)
        bad = [c for c in components if c not in COMPONENTS]
        if bad or not components:
            raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {bad}")
        return components

    # ------------------------------------------------------------------ at call time
    def _lora_params(self, names: Sequence[str], lora_scale: float | None) -> dict[str, Any]:
        """The params of ``names`` with the active, unfused adapters merged in (cached for
        the last ``lora_scale``)."""
        state = self._lora_state()
        scale = (
            1.0 if lora_scale is None else check_real("cross_attention_kwargs['scale']", lora_scale)
        )
        live = [n for n in state["active"] if n not in state["fused"]] if state["enabled"] else []
        params = {n: self.params[n] for n in names}
        if not live:
            return params
        key = (tuple(live), tuple(tuple(state["weights"][n].items()) for n in live), scale)
        key += tuple(id(self.params[n]) for n in names)
        if state["merged"] is not None and state["merged"][0] == key:
            return state["merged"][1]
        for comp in COMPONENTS:
            adapters = self._weighted(comp, live, scale)
            if comp in params and adapters:
                params[comp] = merge_lora(params[comp], adapters, self._lora_targets(comp))
        state["merged"] = (key, params)
        return params
