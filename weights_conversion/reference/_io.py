"""Writing golden reference cases: arrays as safetensors, plus a JSON record of how they were made."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from jaxdiff.loaders.safetensors_io import save_file


def versions() -> dict[str, str]:
    """The library versions that produced a reference (recorded beside every case)."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def save_case(
    out_dir: str | os.PathLike, name: str, arrays: dict, meta: dict | None = None
) -> None:
    """Writes ``<out_dir>/<name>.safetensors`` (float arrays as float32/float64, ints as int64)
    and ``<out_dir>/<name>.json`` (``meta`` + library versions)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in arrays.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        tensors[k] = np.ascontiguousarray(np.asarray(v))
    save_file(tensors, out_dir / f"{name}.safetensors")
    record = {"meta": meta or {}, "versions": versions()}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
