"""PyTorch state dicts <-> Flax params through an explicit, strict key table.

Flax submodules are named after the PyTorch attributes they replace, so the table is written
as rules over the Flax param path (nanoGPT's ``from_pretrained`` style, one rule per case):

* path segments are joined with ``.``; a segment ``<list>_<i>`` whose ``<list>`` is one of the
  model's ``list_names`` (``down_blocks_0``) becomes ``<list>.<i>`` (``down_blocks.0``);
* leaf ``kernel`` -> ``weight``: 4-D conv kernels are transposed OIHW -> HWIO, 2-D dense
  kernels (out, in) -> (in, out); ``scale`` (norms) and ``embedding`` -> ``weight``;
  ``bias`` and any other leaf keep their name and layout;
* a model may pass ``rename``, a function applied to the PyTorch key last, for legacy names.

Every missing key, unexpected key and shape mismatch is collected and raised together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

Rename = Callable[[str], str]


class WeightLoadError(ValueError):
    """Weights that do not match the model: lists every missing, unexpected and misshapen key."""


def _segment(seg: str, list_names: Iterable[str]) -> str:
    m = re.fullmatch(r"(.+)_(\d+)", seg)
    if m and m.group(1) in list_names:
        return f"{m.group(1)}.{m.group(2)}"
    return seg


def torch_key(
    path: tuple[str, ...], ndim: int, list_names: Iterable[str] = (), rename: Rename | None = None
) -> tuple[str, str]:
    """Flax param path -> (PyTorch key, layout) where layout is "conv", "linear" or "none"."""
    *mods, leaf = path
    prefix = ".".join(_segment(s, list_names) for s in mods)
    layout = "none"
    if leaf == "kernel":
        leaf, layout = "weight", {4: "conv", 2: "linear"}.get(ndim, "none")
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    key = f"{prefix}.{leaf}" if prefix else leaf
    return (rename(key) if rename else key), layout


# Flax layout = np.transpose(PyTorch layout, axes): OIHW -> HWIO, (out, in) -> (in, out).
_TO_FLAX_AXES = {"conv": (2, 3, 1, 0), "linear": (1, 0)}


def to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    axes = _TO_FLAX_AXES.get(layout)
    return array if axes is None else np.transpose(array, axes)


def _flax_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...] | None:
    """The shape :func:`to_flax_layout` gives an array of ``shape`` (None: wrong rank)."""
    axes = _TO_FLAX_AXES.get(layout)
    if axes is None:
        return tuple(shape)
    return tuple(shape[a] for a in axes) if len(shape) == len(axes) else None


def torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf of ``shape`` (the inverse of :func:`_flax_shape`)."""
    return to_torch_layout(np.empty(shape, dtype=np.uint8), layout).shape


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    axes = _TO_FLAX_AXES.get(layout)
    return array if axes is None else np.transpose(array, np.argsort(axes))


def key_table(
    param_shapes: Mapping[str, Any], list_names: Iterable[str] = (), rename: Rename | None = None
) -> dict[tuple[str, ...], tuple[str, str]]:
    """The explicit table {flax path: (torch key, layout)} for a params (shape) tree."""
    flat = traverse_util.flatten_dict(param_shapes)
    list_names = tuple(list_names)
    return {
        path: torch_key(path, len(leaf.shape), list_names, rename) for path, leaf in flat.items()
    }


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    param_shapes: Mapping[str, Any],
    list_names: Iterable[str] = (),
    rename: Rename | None = None,
    ignore_unexpected: Callable[[str], bool] | None = None,
    model_name: str = "model",
    convert: Callable[[np.ndarray], Any] | None = None,
) -> dict:
    """Converts a PyTorch state dict into a Flax params tree of exactly ``param_shapes``.

    Args:
        state_dict: PyTorch key -> array, or anything ``np.asarray`` reads (any dtype).
        param_shapes: the target tree, e.g. from ``jax.eval_shape(model.init, ...)["params"]``.
        list_names: module-list attributes whose ``_<i>`` suffix is an index.
        rename: applied to each generated PyTorch key (legacy names).
        ignore_unexpected: predicate for PyTorch keys that are known buffers, not weights.
        convert: applied to each array in Flax layout as soon as it is read (e.g. a cast to the
            compute dtype on the device), so the source is never held twice.

    Raises:
        WeightLoadError: listing every missing key, unexpected key and shape mismatch at once.
    """
    table = key_table(param_shapes, list_names, rename)
    flat_shapes = traverse_util.flatten_dict(param_shapes)
    missing, mismatched, out = [], [], {}
    for path, (key, layout) in table.items():
        if key not in state_dict:
            missing.append(key)
            continue
        want = tuple(flat_shapes[path].shape)
        if _flax_shape(np.shape(state_dict[key]), layout) != want:
            torch_want = torch_shape(want, layout)
            mismatched.append(
                f"{key}: file has {list(state_dict[key].shape)}, model expects {list(torch_want)}"
            )
            continue
        value = to_flax_layout(np.asarray(state_dict[key]), layout)
        out[path] = convert(value) if convert is not None else value
    used = {key for key, _ in table.values()}
    unexpected = [
        k for k in state_dict if k not in used and not (ignore_unexpected and ignore_unexpected(k))
    ]
    if missing or unexpected or mismatched:
        parts = [f"The weights do not match {model_name}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                parts.append(f"  {len(items)} {title}: " + ", ".join(sorted(items)))
        parts.append(
            "  Check that the config matches the weights (e.g. block_out_channels, "
            "layers_per_block, attention settings)."
        )
        raise WeightLoadError("\n".join(parts))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(
    params: Mapping[str, Any], list_names: Iterable[str] = (), rename: Rename | None = None
) -> dict[str, np.ndarray]:
    """The inverse of :func:`torch_to_flax`: PyTorch key names and layouts."""
    flat = traverse_util.flatten_dict(params)
    table = key_table(params, list_names, rename)
    return {
        key: np.ascontiguousarray(to_torch_layout(np.asarray(flat[path]), layout))
        for path, (key, layout) in table.items()
    }
