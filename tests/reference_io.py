"""Reading golden reference cases made by weights_conversion/make_reference.py.

A missing reference file fails the test (it never skips): regenerate with
``python weights_conversion/make_reference.py <component>``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.loaders.safetensors_io import load_file

REFERENCE = Path(__file__).parent / "reference"


def reference_dir(component: str) -> Path:
    path = REFERENCE / component
    if not path.is_dir():
        pytest.fail(
            f"missing golden reference folder {path}; run "
            f"`python weights_conversion/make_reference.py {component}`"
        )
    return path


def load_case(component: str, name: str) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of ``tests/reference/<component>/<name>.{safetensors,json}``."""
    base = reference_dir(component) / name
    st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
    for f in (st, js):
        if not f.is_file():
            pytest.fail(
                f"missing golden reference file {f}; run "
                f"`python weights_conversion/make_reference.py {component}`"
            )
    arrays = {k: np.array(v) for k, v in load_file(st).items()}
    return arrays, json.loads(js.read_text())["meta"]


def relative_l2(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over the whole array."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


HAS_REFERENCE = all(
    importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers")
)

# Live-parity tests build the PyTorch reference in-process; without torch they skip, saying why.
requires_reference = pytest.mark.skipif(
    not HAS_REFERENCE,
    reason="live parity needs torch, diffusers and transformers: "
    "pip install torch==2.13.0 && pip install -e '.[parity]'",
)
