"""Argument checks shared by models, schedulers and pipelines (no model or scheduler imports).

Checks of array *values* only look at host-known values (Python numbers, numpy arrays,
concrete jax arrays); traced values (inside ``jit`` / ``scan``) are never inspected, so
compiled code is unchanged.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_real(value: Any) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is a finite real number in ``[low, high]``; else raises
    naming ``name`` (TypeError for a non-number, ValueError for NaN, inf or out of range)."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    bounds = (
        f"in [{low}, {high}]"
        if low is not None and high is not None
        else f">= {low}"
        if low is not None
        else "finite"
    )
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be {bounds} (a finite number), got {value!r}")
    return v


def host_value(x: Any) -> np.ndarray | None:
    """``x`` as a numpy array when its value is known on the host (a Python or numpy number,
    a list, a concrete array); None for traced values (inside ``jit`` / ``scan``)."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def host_numbers(x: Any, name: str, expected: str) -> np.ndarray | None:
    """``x`` as a numpy array of real numbers when its value is known on the host; None when
    it is traced (or None).

    Raises:
        TypeError: for a string, or a host-known value that is not real numbers (naming
            ``name`` and what was ``expected``).
    """
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be {expected}, got {x!r}")
    t = host_value(x)
    if t is not None and (
        not np.issubdtype(t.dtype, np.number) or np.issubdtype(t.dtype, np.complexfloating)
    ):
        raise TypeError(f"{name} must be {expected}, got {x!r}")
    return t


def check_key(key: Any, who: str) -> None:
    """Raises unless ``key`` is a PRNG key: ``jax.random.key(seed)`` or a legacy
    ``jax.random.PRNGKey(seed)`` (uint32)."""
    dtype = getattr(key, "dtype", None)
    if dtype is None or not (
        jnp.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == jnp.uint32 and key.shape[-1:] == (2,))
    ):
        raise TypeError(f"{who}: key must be a PRNG key, e.g. jax.random.key(seed), got {key!r}")
