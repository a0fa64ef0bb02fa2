"""Find and read a component's weight files: single file, fp16 variant, sharded index.

diffusers names them ``diffusion_pytorch_model[.<variant>].safetensors``, or, sharded,
``diffusion_pytorch_model.safetensors[.index].<variant>.json`` listing the shards; transformers
uses ``model`` as the stem. Pickled ``.bin`` files are read only with ``allow_pickle=True``
(and then with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxdiff import hub
from jaxdiff.loaders.safetensors_io import open_file

# Suffixes of torch.save files (pickles; read only with allow_pickle=True).
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def checkpoint_format(path: str | os.PathLike) -> str | None:
    """``"safetensors"``, ``"pickle"`` (a ``torch.save`` file, by its suffix or its first bytes:
    a zip archive or a pickle stream) or None for any other file (a config, an image...)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.lower().endswith(PICKLE_SUFFIXES):
        return "pickle"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    return None


def _add_variant(filename: str, variant: str | None) -> str:
    """``model.safetensors`` + ``fp16`` -> ``model.fp16.safetensors`` (diffusers' _add_variant)."""
    if not variant:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def find_weight_files(
    path_or_repo: str | os.PathLike,
    subfolder: str | None = None,
    weights_name: str = "diffusion_pytorch_model",
    variant: str | None = None,
    allow_pickle: bool = False,
    **hub_kwargs,
) -> list[str]:
    """Local paths of the weight files of one component, in load order.

    Tries, in order: ``<stem>[.variant].safetensors``, its sharded index, and, only with
    ``allow_pickle=True``, ``<stem>[.variant].bin`` (transformers: ``pytorch_model.bin``).

    Raises:
        hub.HubFileNotFoundError: naming every file name that was tried and what is there.
    """
    tried = []
    single = _add_variant(f"{weights_name}.safetensors", variant)
    index = _add_variant(f"{weights_name}.safetensors.index.json", variant)
    candidates = [("single", single), ("index", index)]
    if allow_pickle:
        bin_stem = "pytorch_model" if weights_name == "model" else weights_name
        candidates += [
            ("single", _add_variant(f"{bin_stem}.bin", variant)),
            ("index", _add_variant(f"{bin_stem}.bin.index.json", variant)),
        ]
    for kind, name in candidates:
        tried.append(name)
        path = hub.resolve_file(path_or_repo, name, subfolder, required=False, **hub_kwargs)
        if path is None:
            continue
        if kind == "single":
            return [path]
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path} is not a valid shard index: it has no 'weight_map'")
        shards = sorted(set(weight_map.values()))
        return [hub.resolve_file(path_or_repo, s, subfolder, **hub_kwargs) for s in shards]
    where = os.path.join(os.fspath(path_or_repo), subfolder or "")
    try:
        present = hub.list_files(path_or_repo, subfolder, **hub_kwargs)
    except hub.HubFileNotFoundError:
        present = []
    hint = ""
    if not allow_pickle and any(p.endswith((".bin", ".ckpt", ".pt")) for p in present):
        hint = (
            " Only pickled weights are there: pass allow_pickle=True to read them with "
            "torch.load(weights_only=True), or convert them to safetensors."
        )
    if variant is None and any(".fp16." in p or ".bf16." in p for p in present):
        hint += " A variant is there: pass variant='fp16' (or 'bf16')."
    raise hub.HubFileNotFoundError(
        f"No weights found in {where!r}: tried {tried}; the folder holds {present}.{hint}"
    )


def read_state_dict(files: list[str], allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Merges the tensors of all files (shards) into one dict. safetensors tensors come as
    :class:`~jaxdiff.loaders.safetensors_io.LazyTensor` (read when ``np.asarray`` converts
    them), pickled ones as numpy arrays."""
    state: dict[str, np.ndarray] = {}
    for path in files:
        if path.endswith(".safetensors"):
            part = open_file(path)
        elif allow_pickle:
            part = _torch_load(path)
        else:
            raise ValueError(
                f"{path} is a pickled checkpoint; pass allow_pickle=True to read it "
                "(torch.load(weights_only=True))."
            )
        dup = state.keys() & part.keys()
        if dup:
            raise ValueError(f"tensors {sorted(dup)[:5]} appear in more than one shard ({path})")
        state.update(part)
    return state


def _torch_load(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading the pickled checkpoint {path} needs torch installed") from err
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
