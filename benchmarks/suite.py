r"""Suite summary: the benchmark scripts' JSON results -> one table, one chart, one JSON.

Every row compares jaxdiff with PyTorch on the same work and carries one *speed ratio*,

.. math::

    \text{ratio} = \frac{\text{jaxdiff speed}}{\text{PyTorch speed}}
    = \frac{t_\text{PyTorch}}{t_\text{jaxdiff}}
    \quad\text{or}\quad
    \frac{\text{throughput}_\text{jaxdiff}}{\text{throughput}_\text{PyTorch}},

so above 1 always means jaxdiff is faster, whatever the unit of the measure.

How a result file becomes rows: a result JSON that has a top-level ``"measures"`` list is read
as it stands (the convention for new scripts, no code here needed)::

    "measures": [
        {"measure": "text2img 512x512, 50 steps", "unit": "s", "jaxdiff": 12.3,
         "pytorch": 15.1, "higher_is_better": false}
    ]

(``pytorch`` may be null when the PyTorch side was skipped). The older scripts' formats are
read by the functions in ``EXTRACTORS``, keyed by result-file stem.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

RATIO_NOTE = (
    "ratio = jaxdiff speed / PyTorch speed on the same work (PyTorch time / jaxdiff time, or "
    "jaxdiff throughput / PyTorch throughput): above 1 means jaxdiff is faster, below 1 means "
    "PyTorch is faster."
)


def make_row(
    benchmark: str,
    measure: str,
    unit: str,
    jaxdiff: float,
    pytorch: float | None,
    higher_is_better: bool,
) -> dict:
    """One table row; ``ratio`` is jaxdiff speed over PyTorch speed (None without PyTorch)."""
    ratio = None
    if pytorch is not None and jaxdiff and pytorch:
        ratio = jaxdiff / pytorch if higher_is_better else pytorch / jaxdiff
    return {
        "benchmark": benchmark,
        "measure": measure,
        "unit": unit,
        "jaxdiff": jaxdiff,
        "pytorch": pytorch,
        "higher_is_better": higher_is_better,
        "ratio": ratio,
    }


def _rows_unet2d(stem: str, result: dict) -> list[dict]:
    c, j, t = result["config"], result["jaxdiff"], result["diffusers"]
    shape = f"batch {c['batch']}, {c['size']}x{c['size']}"
    per_s = result["sampling_images_per_s"]
    return [
        make_row(stem, f"UNet2DModel forward, {shape}", "s", j["forward_s"], t["forward_s"], False),
        make_row(
            stem,
            f"{c['steps']}-step DDIM sampling, {shape}",
            "images/s",
            per_s["jaxdiff"],
            per_s["diffusers"],
            True,
        ),
    ]


def _rows_sd_components(stem: str, result: dict) -> list[dict]:
    rows = []
    for rec in result["results"]:
        torch = rec.get("pytorch")
        rows.append(
            make_row(
                stem,
                f"{rec['component']}: {rec['case']}",
                "s",
                rec["jaxdiff"]["run_s"],
                torch["run_s"] if torch else None,
                False,
            )
        )
    return rows


def _rows_train(stem: str, result: dict) -> list[dict]:
    c = result["config"]
    what = f"train step, {c['model']} UNet, batch {c['batch']}, {c['size']}x{c['size']}"
    torch = result.get("torch")
    torch_ips = torch["images_per_s"] if torch else None
    k = result["jaxdiff"].get("steps_per_call", 1)
    per_call = f", {k} steps per call" if k > 1 else ""
    rows = [make_row(stem, f"{what}, fp32{per_call}", "images/s", result["jaxdiff"]["images_per_s"], torch_ips, True)]  # fmt: skip
    if "jaxdiff_one_call_per_step" in result:
        one = result["jaxdiff_one_call_per_step"]["images_per_s"]
        rows.append(make_row(stem, f"{what}, fp32, one call per step", "images/s", one, torch_ips, True))  # fmt: skip
    if "jaxdiff_bf16" in result:
        bf16 = result["jaxdiff_bf16"]["images_per_s"]
        rows.append(make_row(stem, f"{what}, jaxdiff bf16{per_call} vs PyTorch fp32", "images/s", bf16, torch_ips, True))  # fmt: skip
    return rows


EXTRACTORS: dict[str, Callable[[str, dict], list[dict]]] = {
    "unet2d": _rows_unet2d,
    "sd_components": _rows_sd_components,
    "sd_components_tiny": _rows_sd_components,
    "train": _rows_train,
}


def result_stem(path: Path, result: dict) -> str:
    """``train`` for ``train_<device>.json`` (the device is read from the file itself)."""
    suffix = f"_{result['device']}"
    name = Path(path).stem
    if not name.endswith(suffix):
        raise ValueError(f"{path}: file name does not end in its device {suffix!r}")
    return name[: -len(suffix)]


def rows_from_result(stem: str, result: dict) -> list[dict]:
    """The rows of one script's result (``"measures"`` first, else ``EXTRACTORS[stem]``)."""
    if "measures" in result:
        return [
            make_row(
                stem,
                m["measure"],
                m["unit"],
                m["jaxdiff"],
                m.get("pytorch"),
                bool(m["higher_is_better"]),
            )
            for m in result["measures"]
        ]
    if stem not in EXTRACTORS:
        raise ValueError(
            f"no summary for result {stem!r}: write a 'measures' list into its JSON "
            "(see benchmarks/suite.py) or add an extractor to EXTRACTORS"
        )
    return EXTRACTORS[stem](stem, result)


def collect(paths: Iterable[Path]) -> tuple[list[dict], dict[str, dict]]:
    """Reads result JSON files; returns (rows in file order, {stem: full result})."""
    rows, results = [], {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        stem = result_stem(path, result)
        rows += rows_from_result(stem, result)
        results[stem] = result
    return rows, results


def fmt(x: float | None) -> str:
    """3 significant digits, no exponent for ordinary sizes; ``-`` for a missing value."""
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}"


def markdown(
    rows: list[dict],
    device: str,
    versions: dict | None = None,
    command: str = "",
    timestamp: str = "",
    failures: list[dict] | None = None,
    quick: bool = False,
) -> str:
    """The suite's markdown: a header, the ratio explanation, one table, then any failures."""
    lines = ["# jaxdiff vs PyTorch benchmark suite", "", f"Device: `{device}`"]
    if timestamp:
        lines[-1] += f"; run at {timestamp}"
    if command:
        lines[-1] += f"; command `{command}`"
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    if quick:
        lines += [
            "",
            "Quick mode: small shapes and single repeats, a smoke test, not benchmark results.",
        ]
    lines += ["", RATIO_NOTE, ""]
    lines += ["| benchmark | measure | jaxdiff | PyTorch | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"| {r['benchmark']} | {r['measure']} ({r['unit']}) | {fmt(r['jaxdiff'])} | "
            f"{fmt(r['pytorch'])} | {ratio} |"
        )
    if failures:
        lines += ["", "## Failures", ""]
        for f in failures:
            lines.append(f"* `{f['name']}`: {f['error']}")
            if f.get("stderr_tail"):
                lines += ["", "  ```", *("  " + s for s in f["stderr_tail"].splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: list[dict], device: str, **kwargs) -> str:
    """Writes :func:`markdown` to ``path``; returns it."""
    md = markdown(rows, device, **kwargs)
    Path(path).write_text(md)
    return md


def write_png(path: Path, rows: list[dict], device: str) -> Path:
    """Horizontal bar chart of the speed ratios (one bar per row that has one), line at 1.0.

    Green bars: jaxdiff faster; red: PyTorch faster. Needs matplotlib.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    rated = [r for r in rows if r["ratio"] is not None]
    height = 1.6 + 0.4 * max(len(rated), 1)
    fig = Figure(figsize=(10, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if rated:
        labels = [f"{r['benchmark']}: {r['measure']}" for r in rated]
        ratios = [r["ratio"] for r in rated]
        ys = list(range(len(rated)))[::-1]  # first row on top
        colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
        ax.barh(ys, ratios, color=colors)
        ax.set_yticks(ys, labels, fontsize=8)
        for y, x in zip(ys, ratios):
            ax.annotate(f"{x:.2f}x", (x, y), xytext=(3, 0), textcoords="offset points", va="center")
        ax.set_xlim(0, max(max(ratios), 1.0) * 1.18)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no jaxdiff / PyTorch pairs", ha="center", transform=ax.transAxes)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("jaxdiff speed / PyTorch speed (above 1: jaxdiff faster)")
    ax.set_title(f"jaxdiff vs PyTorch on {device}")
    fig.savefig(path)
    return Path(path)


def write_suite(
    out: Path,
    device: str,
    rows: list[dict],
    results: dict[str, dict],
    *,
    versions: dict | None = None,
    command: str = "",
    timestamp: str = "",
    runs: list[dict] | None = None,
    failures: list[dict] | None = None,
    quick: bool = False,
) -> dict[str, Path]:
    """Writes ``suite_<device>.json``, ``.md`` and ``.png`` to ``out``; returns their paths.

    A missing matplotlib skips only the PNG (recorded in the JSON as ``png_error``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"suite_{device}"
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md")}
    summary = {
        "device": device,
        "versions": versions or {},
        "command": command,
        "timestamp": timestamp,
        "quick": quick,
        "ratio": RATIO_NOTE,
        "rows": rows,
        "runs": runs or [],
        "failures": failures or [],
        "results": results,
    }
    try:
        paths["png"] = write_png(base.with_suffix(".png"), rows, device)
    except ImportError as err:
        summary["png_error"] = f"no chart: {err} (pip install matplotlib)"
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(
        paths["md"],
        rows,
        device,
        versions=versions,
        command=command,
        timestamp=timestamp,
        failures=failures,
        quick=quick,
    )
    return paths
