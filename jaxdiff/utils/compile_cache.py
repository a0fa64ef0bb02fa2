"""JAX's persistent compilation cache, so a second process starts without recompiling.

``JAXDIFF_CACHE_DIR=/path`` (or ``enable_compilation_cache("/path")``) points JAX's own
persistent cache at a folder: every compiled program (a pipeline's sampling loop, a train step)
is written there and a later process with the same program, shapes and devices loads it instead
of compiling again. JAX's own ``JAX_COMPILATION_CACHE_DIR`` works too; ``JAXDIFF_CACHE_DIR`` also
lowers the size/time thresholds so that small programs are cached as well.
"""

from __future__ import annotations

import os

ENV_VAR = "JAXDIFF_CACHE_DIR"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``path`` (default: ``$JAXDIFF_CACHE_DIR``).

    Returns the folder used, or None when neither ``path`` nor the variable is set.
    """
    import jax

    path = path if path is not None else os.environ.get(ENV_VAR)
    if not path:
        return None
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program, however small or quick to compile.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
