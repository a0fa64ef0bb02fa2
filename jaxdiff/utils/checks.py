"""Argument checks shared by models, schedulers and pipelines (no model or scheduler imports).

Checks of array *values* only look at host-known values (Python numbers, numpy arrays,
concrete jax arrays); traced values (inside ``jit`` / ``scan``) are never inspected, so
compiled code is unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def host_value(x: Any) -> np.ndarray | None:
    """``x`` as a numpy array when its value is known on the host (a Python or numpy number,
    a list, a concrete array); None for traced values (inside ``jit`` / ``scan``)."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_key(key: Any, who: str) -> None:
    """Raises unless ``key`` is a PRNG key: ``jax.random.key(seed)`` or a legacy
    ``jax.random.PRNGKey(seed)`` (uint32)."""
    dtype = getattr(key, "dtype", None)
    if dtype is None or not (
        jnp.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == jnp.uint32 and key.shape[-1:] == (2,))
    ):
        raise TypeError(f"{who}: key must be a PRNG key, e.g. jax.random.key(seed), got {key!r}")
