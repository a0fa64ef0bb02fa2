"""Shared test setup."""

import jax
import pytest

# Parity tests compare against float32 PyTorch; keep XLA's default matmul precision exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Full-size (slow) tests hold several GB each (SD2.1 UNet: ~8 GB with the PyTorch
    reference): under ``-n 2 --dist loadgroup`` they share one worker and never run together."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("full_size"))
