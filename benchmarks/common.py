"""Shared benchmark plumbing: device names, timing, peak memory, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def device_name() -> str:
    """``cpu-<cores>core-<arch>`` or the accelerator's device kind, for result file names."""
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu-{os.cpu_count()}core-{platform.machine()}"
    return d.device_kind.replace(" ", "-")


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (the caller makes ``fn`` block until done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def xla_flops(compiled) -> float:
    """FLOPs of a compiled JAX executable from XLA's cost analysis (0 if unavailable)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("jax", "flax", "torch", "diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        import torch

        out["torch_threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    return out


def write_results(stem: str, result: dict, table: list[str], out: Path | None = None) -> str:
    """Writes ``<out>/<stem>_<device>.json`` and ``.md``; returns the markdown.

    Args:
        out: the folder (created if missing); default ``benchmarks/results``.
    """
    out = Path(out) if out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_{result['device']}"
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        f"Device: {result['device']}; versions: {json.dumps(result.get('versions', {}))}\n\n"
        + "\n".join(table)
        + "\n"
    )
    path.with_suffix(".md").write_text(md)
    return md
