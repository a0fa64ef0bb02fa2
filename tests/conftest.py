"""Shared test setup."""

import jax

# Parity tests compare against float32 PyTorch; keep XLA's default matmul precision exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")
