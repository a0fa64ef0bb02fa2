"""Generators of tests/reference/: one module per component, each with ``generate(out_dir)``."""
