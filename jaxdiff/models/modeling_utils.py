"""What every jaxdiff model shares: config, ``from_pretrained`` and ``save_pretrained``.

A model is a Flax Linen module whose fields are the diffusers config fields; its weights live
in a separate params pytree::

    model, params = UNet2DModel.from_pretrained("google/ddpm-cat-256")
    out = model.apply({"params": params}, sample, timesteps).sample
    model.save_pretrained("my-unet", params)   # diffusers layout, loadable by PyTorch diffusers
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff import hub
from jaxdiff.configuration import ModelConfigMixin, load_config
from jaxdiff.loaders import state_dict as sd
from jaxdiff.loaders.safetensors_io import save_file
from jaxdiff.loaders.weights import find_weight_files, read_state_dict

_FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def check_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    """Returns ``jnp.dtype(dtype)``, or raises naming the argument if it is not a float dtype."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(
            f"{name} must be jnp.float32, jnp.float16 or jnp.bfloat16, got {dtype!r}"
        ) from err
    if dt not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise TypeError(f"{name} must be jnp.float32, jnp.float16 or jnp.bfloat16, got {dt}")
    return dt


def _cast_floating_leaf(x: Any, dtype: Any) -> Any:
    """``x`` as a ``dtype`` array if it is floating; other leaves are left alone."""
    return jnp.asarray(x, dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts every floating leaf of a pytree to ``dtype`` (integer leaves are left alone)."""
    return jax.tree_util.tree_map(lambda x: _cast_floating_leaf(x, dtype), tree)


class FlaxModelMixin(ModelConfigMixin):
    """Loading and saving in diffusers layout for a Linen module.

    Subclasses set ``weights_name`` (``"diffusion_pytorch_model"``; transformers models use
    ``"model"``), ``_list_names`` (module-list attributes, see ``loaders.state_dict``), and
    implement ``dummy_inputs()``; they may override ``_torch_rename`` and ``_ignore_unexpected``.
    """

    weights_name: str = "diffusion_pytorch_model"
    _list_names: tuple[str, ...] = ()
    _torch_rename: Callable[[str], str] | None = None

    @staticmethod
    def _ignore_unexpected(key: str) -> bool:
        """True for PyTorch keys that are buffers, not weights (e.g. ``position_ids``)."""
        return False

    @classmethod
    def _normalize_state_dict(cls, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Maps legacy PyTorch key names to current ones before the strict conversion."""
        return state_dict

    def dummy_inputs(self) -> tuple:
        """Positional inputs of the smallest valid call, used to build the params tree."""
        raise NotImplementedError

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """Flax's ``Module.apply``, with a clear error when ``variables`` is not
        ``{"params": params}`` (a common slip: passing the params tree itself, or None)."""
        if not isinstance(variables, Mapping) or "params" not in variables:
            name = type(self).__name__
            hint = ""
            if isinstance(variables, Mapping) and variables:
                got = f"a dict with keys {sorted(map(str, variables))[:5]}"
                hint = " (the params tree itself? pass {'params': params})"
            else:
                got = repr(variables)[:80]
            raise TypeError(
                f"{name}.apply: variables must be {{'params': params}} with the params of "
                f"{name}.from_pretrained or init_weights, got {got}{hint}"
            )
        return super().apply(variables, *args, **kwargs)

    def init_weights(self, key: jax.Array) -> dict:
        """Random params (the module's own initializers)."""
        return self.init(key, *self.dummy_inputs())["params"]

    def param_shapes(self) -> dict:
        """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
        return jax.eval_shape(self.init_weights, jax.random.key(0))

    def params_from_state_dict(self, state_dict: dict[str, np.ndarray]) -> dict:
        """PyTorch-layout weights -> params of this module (strict; see ``WeightLoadError``)."""
        dtype = jnp.dtype(self.dtype)
        return sd.torch_to_flax(
            self._normalize_state_dict(dict(state_dict)),
            self.param_shapes(),
            self._list_names,
            type(self)._torch_rename,
            self._ignore_unexpected,
            model_name=f"{type(self).__name__} (its config)",
            # one tensor at a time, straight to the device: the weights are never held twice
            convert=lambda x: _cast_floating_leaf(x, dtype),
        )

    def state_dict(self, params: dict) -> dict[str, np.ndarray]:
        """Params -> PyTorch key names and layouts (numpy arrays)."""
        return sd.flax_to_torch(params, self._list_names, type(self)._torch_rename)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        dtype: Any = jnp.float32,
        variant: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> tuple[Any, dict]:
        """Loads ``(module, params)`` from a local folder or Hub repo in diffusers layout.

        Args:
            pretrained_model_name_or_path: folder or repo id.
            subfolder: e.g. ``"unet"`` inside a pipeline repo.
            dtype: the compute dtype (float32, bfloat16 or float16), whatever dtype is stored;
                params are cast to it.
            variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
            allow_pickle: also accept ``.bin`` checkpoints (read with ``weights_only=True``).
            **kwargs: Hub options (revision, cache_dir, token, local_files_only) and config
                overrides.
        """
        dtype = check_dtype(dtype)
        hub_kwargs = hub.pop_hub_kwargs(kwargs)
        config = load_config(
            pretrained_model_name_or_path, subfolder, cls.config_name, **hub_kwargs
        )
        module = cls.from_config(config, dtype=dtype, **kwargs)
        files = find_weight_files(
            pretrained_model_name_or_path,
            subfolder,
            cls.weights_name,
            variant=variant,
            allow_pickle=allow_pickle,
            **hub_kwargs,
        )
        state = read_state_dict(files, allow_pickle=allow_pickle)
        return module, module.params_from_state_dict(state)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        params: dict,
        variant: str | None = None,
        dtype: Any = None,
    ) -> None:
        """Writes ``config.json`` and ``<weights_name>[.variant].safetensors`` (PyTorch layout).

        Args:
            params: the params tree to save.
            variant: e.g. ``"fp16"``; also pass ``dtype=jnp.float16`` to store half precision.
            dtype: storage dtype; default keeps the params' own dtype.
        """
        # Every argument is checked before anything is written: a wrong call leaves the folder
        # as it was.
        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(
                "save_pretrained(save_directory, params): save_directory must be a folder path "
                f"(str or os.PathLike), got {type(save_directory).__name__}"
            )
        if not isinstance(params, dict) or not params:
            raise TypeError(
                f"save_pretrained(save_directory, params): params must be the params tree, "
                f"got {type(params).__name__}"
            )
        if variant is not None and (
            not isinstance(variant, str) or not variant or any(c in variant for c in "/\\")
        ):
            raise ValueError(
                f"variant must be a name such as 'fp16' (or None), got {variant!r}; pass the "
                "storage dtype as dtype="
            )
        if isinstance(params.get("params"), dict) and len(params) == 1:
            params = params["params"]
        self._check_params_tree(params)
        if dtype is not None:
            params = cast_floating(params, check_dtype(dtype))
        tensors = {k: np.asarray(v) for k, v in self.state_dict(params).items()}
        name = (
            f"{self.weights_name}.{variant}.safetensors"
            if variant
            else f"{self.weights_name}.safetensors"
        )
        self.save_config(save_directory)
        save_file(tensors, os.path.join(os.fspath(save_directory), name), metadata={"format": "pt"})

    def _check_params_tree(self, params: dict) -> None:
        """Raises unless ``params`` has exactly this module's parameter names and shapes."""
        want = traverse_util.flatten_dict(self.param_shapes())
        try:
            got = traverse_util.flatten_dict(params)
        except Exception as err:  # a tree that is not nested dicts of arrays
            raise TypeError(f"params must be a nested dict of arrays: {err}") from err
        missing = sorted("/".join(k) for k in want.keys() - got.keys())
        unexpected = sorted("/".join(map(str, k)) for k in got.keys() - want.keys())
        shapes = sorted(
            f"{'/'.join(k)}: {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}"
            for k in want.keys() & got.keys()
            if tuple(np.shape(got[k])) != tuple(want[k].shape)
        )
        if missing or unexpected or shapes:
            parts = [
                f"{label} ({len(items)}): {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("wrong shape", shapes),
                )
                if items
            ]
            raise ValueError(
                f"save_pretrained: params are not the params tree of this {type(self).__name__} "
                f"(its config); nothing was written. " + "; ".join(parts)
            )
