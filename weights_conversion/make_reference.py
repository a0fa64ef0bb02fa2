"""Regenerates tests/reference/ from the PyTorch reference (diffusers / transformers).

    python weights_conversion/make_reference.py            # every component
    python weights_conversion/make_reference.py unet_2d    # one component

Each module in ``weights_conversion/reference/`` (not starting with ``_``) has
``generate(out_dir)`` and writes ``tests/reference/<module name>/``. Needs the ``[parity]``
extra (torch==2.13.0 CPU first, then diffusers and transformers).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "reference"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import weights_conversion.reference as reference  # noqa: E402


def main(argv: list[str]) -> None:
    names = [m.name for m in pkgutil.iter_modules(reference.__path__) if not m.name.startswith("_")]
    wanted = argv or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"unknown reference module(s) {unknown}; known: {names}")
    for name in wanted:
        module = importlib.import_module(f"weights_conversion.reference.{name}")
        print(f"generating tests/reference/{name}/")
        module.generate(OUT / name)


if __name__ == "__main__":
    main(sys.argv[1:])
