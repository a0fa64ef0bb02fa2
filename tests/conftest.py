"""Shared test setup: torch/diffusers availability for the live-parity tests."""

from __future__ import annotations

import importlib.util

import pytest

HAS_REFERENCE = all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


def requires_reference():
    """Marks a live-parity test: skipped, with the reason, when torch/diffusers are absent."""
    return pytest.mark.skipif(
        not HAS_REFERENCE,
        reason="live parity needs torch and diffusers: pip install torch==2.13.0 && "
        "pip install -e '.[parity]'",
    )
