"""``benchmarks/bench_sd_pipeline.py`` end to end on the tiny SD pipeline (one small case).

Runs the real script (its subprocess workers included) with 2 steps, one 64 px image and one
repeat, with PyTorch when torch + diffusers are importable and ``--no-torch`` otherwise, then
checks the result file: the suite's ``measures``, timings that agree with each other, the
persistent compilation cache doing its job in the second process, and the two frameworks'
images agreeing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as runner
from benchmarks import suite

# the module fixture runs the benchmark once: keep its tests on one worker
pytestmark = pytest.mark.xdist_group("bench_sd_pipeline")

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers"))


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_sd_pipeline", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("sdp")
    args = ["--tiny", "--sizes", "64", "--batches", "1", "--steps", "2", "--repeats", "1"]
    args += ["--out", str(out)] + ([] if HAS_TORCH else ["--no-torch"])
    proc = _run(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = out.glob("sd_pipeline_tiny_*.json")
    return json.loads(path.read_text()), path


def test_measures_for_the_suite(tiny_result):
    result, path = tiny_result
    assert path.name == f"sd_pipeline_tiny_{result['device']}.json"
    md = path.with_suffix(".md").read_text()
    assert md.count("| 64x64 | 1 |") == 1 and "tiny test pipeline" in md
    (rec,) = result["results"]
    j, c, t = rec["jaxdiff"], rec["jaxdiff_cached"], rec["pytorch"]
    throughput, first, cached = result["measures"]
    assert throughput["unit"] == "images/s" and throughput["higher_is_better"] is True
    assert throughput["measure"] == "text2img 64x64, batch 1, 2 DPM++ steps, CFG 7.5"
    assert throughput["jaxdiff"] == pytest.approx(1 / j["run_s"]) and j["run_s"] > 0
    assert first["unit"] == cached["unit"] == "s" and first["pytorch"] is cached["pytorch"] is None
    # Compile time = JAX's trace + lower + XLA compile events of the first call; the call
    # difference (both calls with --warmup-steps steps, the same program) is kept beside it.
    for side, row in ((j, first), (c, cached)):
        events = side["trace_s"] + side["lower_s"] + side["backend_compile_s"]
        assert row["jaxdiff"] == pytest.approx(events) and side["compile_s"] == row["jaxdiff"]
        assert side["call_diff_s"] == pytest.approx(side["first_call_s"] - side["second_call_s"])
        assert 0 < side["trace_s"] and 0 < side["lower_s"]
    # The cached process only measures compilation: no full-length calls.
    assert c["call_s"] == [] and c["run_s"] is None and len(j["call_s"]) == 1
    rows = suite.rows_from_result("sd_pipeline_tiny", result)
    assert [r["measure"] for r in rows] == [m["measure"] for m in result["measures"]]
    if HAS_TORCH:
        assert t["run_s"] > 0 and throughput["pytorch"] == pytest.approx(1 / t["run_s"])
        assert rows[0]["ratio"] == pytest.approx(t["run_s"] / j["run_s"])
        assert rec["throughput_ratio"] == pytest.approx(rows[0]["ratio"])
    else:
        assert t is None and throughput["pytorch"] is None and rows[0]["ratio"] is None


def test_compile_cache_and_memory(tiny_result):
    result, _ = tiny_result
    (rec,) = result["results"]
    cold, cached = rec["jaxdiff"], rec["jaxdiff_cached"]
    # The first process compiles (and writes the cache); the second compiles nothing.
    assert cold["cache_misses"] >= 1 and cold["cache_hits"] == 0
    assert cached["cache_hits"] == cold["cache_misses"] and cached["cache_misses"] == 0
    # One program per call shape, never recompiled by a later call, whatever its step count
    # (the warm-up calls take 1 step, the timed call 2).
    assert cold["programs"] == cached["programs"] == 1
    assert cold["compiles_in_second_call"] == cached["compiles_in_second_call"] == 0
    # Loading from the cache is much cheaper than XLA compiling (about 10x on a 2-core CPU).
    assert 0 < cached["backend_compile_s"] < cold["backend_compile_s"]
    assert cold["first_call_s"] > cold["second_call_s"]
    for side in (cold, cached, rec["pytorch"]):
        if side is not None:
            assert 100 < side["peak_rss_mib"] < 16 * 1024  # MiB: a sane process size


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch, diffusers and transformers")
def test_same_images_as_diffusers(tiny_result):
    result, _ = tiny_result
    cold = result["results"][0]["jaxdiff"]
    assert result["results"][0]["pytorch"]["dtype"] == cold["dtype"] == "float32"
    # Same latents, fp32 both: the images agree to round-off (the SD parity tests' bound).
    assert cold["mean_abs_diff_uint8_vs_torch"] <= 1.0
    assert cold["max_abs_diff_uint8_vs_torch"] <= 2.0


def test_registered_in_the_suite():
    (bench,) = [b for b in runner.BENCHMARKS if b.name == "sd_pipeline"]
    assert bench.module == "benchmarks.bench_sd_pipeline"
    assert "--tiny" in bench.quick and bench.result_stem(quick=True) == "sd_pipeline_tiny"
    assert bench.result_stem(quick=False) == "sd_pipeline"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tiny", "--sizes", "60"], "--sizes must be positive multiples of 16: [60]"),
        (["--sizes", "256", "500"], "--sizes must be positive multiples of 64: [500]"),
        (["--batches", "0"], "--batches must be positive"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_options(args, message):
    proc = _run(*args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
