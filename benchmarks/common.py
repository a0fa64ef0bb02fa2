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


# AMD "cpu family" / model ranges of /proc/cpuinfo -> microarchitecture (AMD's processor
# programming references: family 19h holds Zen 3 and Zen 4, family 1Ah Zen 5).
_AMD_FAMILY_25_ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))


def cpu_info(cpuinfo: str | None = None) -> dict[str, str]:
    """The CPU's vendor, family, model, model name and vector extensions, from
    ``/proc/cpuinfo`` (Linux; an empty dict elsewhere or when it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if "vendor_id" not in fields:
        return {}
    flags = set(fields.get("flags", "").split())
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {
        "vendor": fields["vendor_id"],
        "family": fields.get("cpu family", "?"),
        "model": fields.get("model", "?"),
        "model_name": fields.get("model name", ""),
        "vector": " ".join(vector),
    }


def cpu_model(info: dict[str, str] | None = None) -> str:
    """A short CPU name for result files: ``amd-zen4``, ``amd-zen5``, ``intel-f6m143``, ...
    (the microarchitecture where the family and model say it, else ``<vendor>-f<F>m<M>``);
    "" when unknown. VMs often report only "AMD EPYC" as the model name, and different
    generations give different ratios, so the name says which one ran."""
    info = cpu_info() if info is None else info
    if not info:
        return ""
    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(info["vendor"], "cpu")
    try:
        family, model = int(info["family"]), int(info["model"])
    except ValueError:
        return vendor
    if vendor == "amd" and family == 0x1A:
        return "amd-zen5"
    if vendor == "amd" and family == 0x19:
        zen4 = any(model in r for r in _AMD_FAMILY_25_ZEN4_MODELS)
        return "amd-zen4" if zen4 else "amd-zen3"
    return f"{vendor}-f{family}m{model}"


def device_name() -> str:
    """``cpu-<cores>core-<arch>-<cpu model>`` (e.g. ``cpu-2core-x86_64-amd-zen5``) or the
    accelerator's device kind, for result file names. On the CPU with jaxdiff's oneDNN
    convolutions switched on (``JAXDIFF_ONEDNN=1``) it ends in ``-onednn``, so those results
    sit beside the XLA-convolution ones instead of replacing them."""
    import jax

    from jaxdiff.models import onednn_conv

    d = jax.devices()[0]
    if d.platform == "cpu":
        name = f"cpu-{os.cpu_count()}core-{platform.machine()}"
        model = cpu_model()
        name = f"{name}-{model}" if model else name
        return f"{name}-onednn" if onednn_conv.enabled() else name
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


def xla_flops(compiled, fn: Callable | None = None, args: tuple = ()) -> float:
    """FLOPs of a compiled JAX executable from XLA's cost analysis (0 if unavailable).

    XLA counts nothing inside a custom call, so with jaxdiff's oneDNN convolutions switched on
    the count comes from ``fn`` (the function that was jitted) on ``args``, lowered again with
    XLA's convolutions: the same arithmetic, counted before optimization.
    """
    from jaxdiff.models import onednn_conv

    if fn is not None and onednn_conv.enabled():
        import jax

        onednn_conv.use_onednn_convolutions(False)
        try:
            cost = jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis()
        finally:
            onednn_conv.use_onednn_convolutions(True)
    else:
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
    from jaxdiff.models import onednn_conv

    if onednn_conv.enabled():
        out["convolutions"] = f"oneDNN {onednn_conv.onednn_version()} (jaxdiff custom calls)"
    info = cpu_info()
    if info:
        out["cpu"] = (
            f"{info['model_name'] or info['vendor']} (family {info['family']}, model "
            f"{info['model']}; {info['vector'] or 'no AVX2'})"
        )
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
