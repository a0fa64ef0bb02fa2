"""Code for test scripts that run in a subprocess: records XLA compiles as they happen."""

# Defines ``compiles`` (a list the listener appends each backend compile to); the script clears
# it before a call and asserts it empty after.
RECORD_COMPILES = """
import jax
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: compiles.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None)
"""
