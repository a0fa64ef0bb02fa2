"""The whole benchmark suite in one command: ``python -m benchmarks`` (or ``jaxdiff bench``).

    python -m benchmarks [--only NAME ...] [--quick] [--out DIR] [--list]

Runs every script in ``BENCHMARKS`` in its own subprocess, one after the other (each gets the
machine and its memory to itself), then reads their JSON results and writes
``suite_<device>.json`` (every result, device, versions, command, timestamp),
``suite_<device>.md`` (one table: benchmark, measure, jaxdiff, PyTorch, speed ratio) and
``suite_<device>.png`` (the ratios as bars, a line at 1.0). A script that fails is recorded in
the summary with the tail of its stderr, the others still run, and the exit code is 1.

``--quick`` passes each script its own small options (minutes in all on a 2-core CPU) and
writes to ``benchmarks/results/quick`` unless ``--out`` is given, so it never overwrites real
results. Adding a script is one line in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Benchmark:
    """One script of the suite.

    Attributes:
        name: the ``--only`` name.
        module: run as ``python -m <module> [quick args] --out DIR``.
        quick: the script's own options for ``--quick``, as on a command line.
        stem: its result file is ``<stem>_<device>.json`` (default: ``name``).
        quick_stem: the stem under ``--quick``, where the script names it differently.
    """

    name: str
    module: str
    quick: str = ""
    stem: str | None = None
    quick_stem: str | None = None

    def result_stem(self, quick: bool) -> str:
        return (self.quick_stem if quick else None) or self.stem or self.name


# fmt: off
BENCHMARKS: list[Benchmark] = [
    Benchmark("unet2d", "benchmarks.bench_unet2d", quick="--batch 2 --steps 5 --repeats 1"),
    Benchmark("sd_components", "benchmarks.bench_sd_components", quick="--tiny --repeats 1", quick_stem="sd_components_tiny"),
    Benchmark("train", "benchmarks.bench_train", quick="--batch 8 --steps 2 --steps-per-call 2 --repeats 1"),
    Benchmark("sd_pipeline", "benchmarks.bench_sd_pipeline", quick="--tiny --repeats 1", quick_stem="sd_pipeline_tiny"),
    Benchmark("ops", "benchmarks.bench_ops", quick="--quick --repeats 1"),
]
# fmt: on

STDERR_TAIL_LINES = 40
STDERR_TAIL_CHARS = 4000
PROBE = (
    "import json; from benchmarks.common import device_name, library_versions; "
    "print(json.dumps({'device': device_name(), 'versions': library_versions()}))"
)


def _env() -> dict[str, str]:
    """The environment for the scripts: the repository root first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def probe_device() -> dict:
    """``{"device", "versions"}`` from a subprocess (this process never starts an accelerator)."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    if proc.returncode == 0:
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            pass
    return {"device": "unknown", "versions": {}, "probe_error": proc.stderr[-STDERR_TAIL_CHARS:]}


def run_one(bench: Benchmark, quick: bool, out: Path, extra: str = "") -> dict:
    """Runs one script (``extra``: more of its own options, after the ``--quick`` ones); its
    stdout passes through, its stderr is shown and its tail kept."""
    cmd = [sys.executable, "-m", bench.module, *shlex.split(bench.quick if quick else "")]
    cmd += [*shlex.split(extra), "--out", str(out)]
    print(f"\n=== {bench.name}: {shlex.join(cmd)}", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
    return {
        "name": bench.name,
        "command": shlex.join(cmd),
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - start,
        "stderr_tail": "\n".join(tail)[-STDERR_TAIL_CHARS:],
    }


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the jaxdiff vs PyTorch benchmark suite and summarise it."
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[b.name for b in BENCHMARKS],
        help="run only this benchmark (repeatable)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small shapes and 1 repeat: a few minutes on a CPU"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result folder (default benchmarks/results; with --quick benchmarks/results/quick)",
    )
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="more options for one script, e.g. --args 'sd_pipeline=--batches 1 --repeats 1' "
        "(repeatable; recorded in the suite's JSON)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


def parse_script_args(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``["sd_pipeline=--repeats 1", ...]`` -> ``{"sd_pipeline": "--repeats 1"}``."""
    names = {b.name for b in BENCHMARKS}
    extra: dict[str, str] = {}
    for pair in pairs:
        name, sep, options = pair.partition("=")
        if not sep or name not in names:
            parser.error(f"--args expects NAME=OPTIONS with NAME one of {sorted(names)}, got {pair!r}")  # fmt: skip
        extra[name] = f"{extra.get(name, '')} {options}".strip()
    return extra


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    """Runs the suite; returns 0 when every benchmark ran and was summarised, else 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    extra = parse_script_args(args.args, parser)
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:16s} python -m {b.module}  (--quick: {b.quick or '-'})")
        return 0
    out = (args.out or (RESULTS / "quick" if args.quick else RESULTS)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    selected = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    command = shlex.join([*shlex.split(prog), *argv])
    timestamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    probe = probe_device()
    device = probe["device"]

    runs, failures, paths = [], [], []
    for bench in selected:
        run = run_one(bench, args.quick, out, extra.get(bench.name, ""))
        result_file = out / f"{bench.result_stem(args.quick)}_{device}.json"
        run["result_file"] = str(result_file)
        runs.append(run)
        if run["returncode"] != 0:
            error = f"exit code {run['returncode']}"
        elif not result_file.is_file():
            error = f"exit code 0 but no result file {result_file.name}"
        else:
            paths.append((bench, result_file))
            continue
        failures.append({"name": bench.name, "error": error, "stderr_tail": run["stderr_tail"]})

    rows, results = [], {}
    for bench, path in paths:
        try:
            r, res = suite.collect([path])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            failures.append({"name": bench.name, "error": f"cannot summarise {path.name}: {err!r}"})
            continue
        rows += r
        results.update(res)
    if "probe_error" in probe:
        failures.append(
            {"name": "device probe", "error": "failed", "stderr_tail": probe["probe_error"]}
        )
    written = suite.write_suite(
        out,
        device,
        rows,
        results,
        versions=probe.get("versions"),
        command=command,
        timestamp=timestamp,
        runs=runs,
        failures=failures,
        quick=args.quick,
    )
    print("\n" + written["md"].read_text(), flush=True)
    print("wrote " + ", ".join(str(p) for p in written.values()), flush=True)
    if "png" not in written:
        print("no PNG chart: matplotlib is not installed", file=sys.stderr)
    if failures:
        names = ", ".join(f["name"] for f in failures)
        print(f"{len(failures)} benchmark(s) failed: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
