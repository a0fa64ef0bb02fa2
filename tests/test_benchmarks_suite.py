"""The benchmark suite runner (``python -m benchmarks``) and its summary, without real benchmarks.

Result files are written through ``benchmarks.common.write_results`` with the dicts the scripts
build, so the summary reads exactly what the scripts write.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import __main__ as runner
from benchmarks import suite
from benchmarks.common import write_results

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu-2core-test"
VERSIONS = {"jax": "0.10.2", "torch": "2.13.0+cpu"}


def unet2d_result() -> dict:
    """As bench_unet2d.main builds it (times chosen as powers of two: exact ratios)."""
    j = {
        "forward_s": 0.5,
        "forward_compile_s": 5.0,
        "forward_gflops": 117.0,
        "forward_gflop_per_s": 234.0,
        "sampling_s": 32.0,
        "sampling_compile_s": 6.0,
    }
    t = {"forward_s": 1.0, "sampling_s": 16.0}
    return {
        "device": DEVICE,
        "versions": VERSIONS,
        "config": {
            "batch": 16,
            "size": 32,
            "steps": 50,
            "repeats": 3,
            "unet": "ddpm-cat-256 layout",
            "dtype": "float32",
        },  # fmt: skip
        "jaxdiff": j,
        "diffusers": t,
        "forward_speedup": t["forward_s"] / j["forward_s"],
        "sampling_images_per_s": {"jaxdiff": 16 / 32.0, "diffusers": 16 / 16.0},
        "sampling_speedup": t["sampling_s"] / j["sampling_s"],
    }


def sd_components_result() -> dict:
    """As bench_sd_components.main builds it; the CLIP record has no PyTorch side."""

    def side(run_s):
        return {"run_s": run_s, "compile_s": 1.0, "gflop": 10.0, "peak_rss_mib": 100.0}

    return {
        "device": DEVICE,
        "versions": VERSIONS,
        "config": {
            "sd15": False,
            "batch": 2,
            "unet_sizes": [16],
            "vae_sizes": [8],
            "repeats": 1,
            "dtype": "float32",
        },  # fmt: skip
        "results": [
            {
                "component": "unet",
                "case": "batch 2, 16x16x4 latents, 77x32 context",
                "size": 16,
                "jaxdiff": side(0.25),
                "pytorch": side(0.125),
                "weights": "w",
                "time_ratio_jax_over_torch": 2.0,
            },  # fmt: skip
            {
                "component": "vae",
                "case": "decode 8x8x4 -> 16x16x3",
                "size": 8,
                "jaxdiff": side(0.0625),
                "pytorch": side(0.25),
                "weights": "w",
                "time_ratio_jax_over_torch": 0.25,
            },  # fmt: skip
            {
                "component": "clip",
                "case": "batch 2 x 77 tokens",
                "size": 77,
                "jaxdiff": side(2e-3),
                "pytorch": None,
                "weights": "w",
            },  # fmt: skip
        ],
    }


def train_result() -> dict:
    """As bench_train.main builds it with ``--bf16``."""
    return {
        "device": DEVICE,
        "versions": VERSIONS,
        "config": {
            "model": "cats-32",
            "size": 32,
            "batch": 32,
            "steps": 5,
            "repeats": 5,
            "bf16": True,
            "no_torch": False,
            "unet": {},
            "params": 4314307,
        },  # fmt: skip
        "jaxdiff": {
            "compile_s": 23.0,
            "step_s": 1.0,
            "images_per_s": 32.0,
            "devices": 1,
            "dtype": "float32",
        },  # fmt: skip
        "jaxdiff_bf16": {
            "compile_s": 20.0,
            "step_s": 0.5,
            "images_per_s": 64.0,
            "devices": 1,
            "dtype": "bfloat16 compute",
        },  # fmt: skip
        "torch": {"step_s": 0.5, "images_per_s": 64.0, "threads": 2, "dtype": "float32"},
        "peak_rss_mib": 3000.0,
        "speedup_vs_torch": 0.5,
    }


def write_all(out: Path) -> list[Path]:
    write_results("unet2d", unet2d_result(), ["| table |"], out=out)
    write_results("sd_components_tiny", sd_components_result(), ["| table |"], out=out)
    write_results("train", train_result(), ["| table |"], out=out)
    return [out / f"{s}_{DEVICE}.json" for s in ("unet2d", "sd_components_tiny", "train")]


EXPECTED_ROWS = [
    # benchmark, measure, unit, jaxdiff, pytorch, higher_is_better, ratio
    ("unet2d", "UNet2DModel forward, batch 16, 32x32", "s", 0.5, 1.0, False, 2.0),
    ("unet2d", "50-step DDIM sampling, batch 16, 32x32", "images/s", 0.5, 1.0, True, 0.5),
    (
        "sd_components_tiny",
        "unet: batch 2, 16x16x4 latents, 77x32 context",
        "s",
        0.25,
        0.125,
        False,
        0.5,
    ),  # fmt: skip
    ("sd_components_tiny", "vae: decode 8x8x4 -> 16x16x3", "s", 0.0625, 0.25, False, 4.0),
    ("sd_components_tiny", "clip: batch 2 x 77 tokens", "s", 2e-3, None, False, None),
    (
        "train",
        "train step, cats-32 UNet, batch 32, 32x32, fp32",
        "images/s",
        32.0,
        64.0,
        True,
        0.5,
    ),  # fmt: skip
    (
        "train",
        "train step, cats-32 UNet, batch 32, 32x32, jaxdiff bf16 vs PyTorch fp32",
        "images/s",
        64.0,
        64.0,
        True,
        1.0,
    ),  # fmt: skip
]
KEYS = ("benchmark", "measure", "unit", "jaxdiff", "pytorch", "higher_is_better", "ratio")


def test_collect_rows_from_script_results(tmp_path):
    rows, results = suite.collect(write_all(tmp_path))
    assert [tuple(r[k] for k in KEYS) for r in rows] == EXPECTED_ROWS
    assert list(results) == ["unet2d", "sd_components_tiny", "train"]
    assert results["train"] == train_result()
    # The suite's ratios are the scripts' own speedups (and the inverse of sd_components' time
    # ratio), so the two tables never disagree.
    assert rows[0]["ratio"] == unet2d_result()["forward_speedup"]
    assert rows[1]["ratio"] == unet2d_result()["sampling_speedup"]
    assert rows[2]["ratio"] == 1 / sd_components_result()["results"][0]["time_ratio_jax_over_torch"]
    assert rows[5]["ratio"] == train_result()["speedup_vs_torch"]


def test_train_without_torch_has_no_ratio(tmp_path):
    result = train_result()
    del result["torch"], result["jaxdiff_bf16"], result["speedup_vs_torch"]
    write_results("train", result, [], out=tmp_path)
    rows, _ = suite.collect([tmp_path / f"train_{DEVICE}.json"])
    assert [(r["jaxdiff"], r["pytorch"], r["ratio"]) for r in rows] == [(32.0, None, None)]


def test_train_rows_name_the_steps_per_call(tmp_path):
    """bench_train's default: K steps per call, with one call per step beside it."""
    result = train_result()
    result["jaxdiff"]["steps_per_call"] = 8
    result["jaxdiff_one_call_per_step"] = {**result["jaxdiff"], "images_per_s": 16.0}
    result["jaxdiff_one_call_per_step"]["steps_per_call"] = 1
    write_results("train", result, [], out=tmp_path)
    rows, _ = suite.collect([tmp_path / f"train_{DEVICE}.json"])
    what = "train step, cats-32 UNet, batch 32, 32x32"
    assert [(r["measure"], r["ratio"]) for r in rows] == [
        (f"{what}, fp32, 8 steps per call", 0.5),
        (f"{what}, fp32, one call per step", 0.25),
        (f"{what}, jaxdiff bf16, 8 steps per call vs PyTorch fp32", 1.0),
    ]


def test_measures_convention_and_unknown_stem(tmp_path):
    """A new script (e.g. bench_sd_pipeline) needs no extractor when it writes ``measures``."""
    result = {
        "device": DEVICE,
        "measures": [
            {
                "measure": "text2img, 25 steps",
                "unit": "s",
                "jaxdiff": 4.0,
                "pytorch": 8.0,
                "higher_is_better": False,
            },  # fmt: skip
            {
                "measure": "text2img",
                "unit": "images/s",
                "jaxdiff": 0.25,
                "pytorch": None,
                "higher_is_better": True,
            },  # fmt: skip
        ],
    }
    write_results("sd_pipeline", result, [], out=tmp_path)
    rows, _ = suite.collect([tmp_path / f"sd_pipeline_{DEVICE}.json"])
    assert [(r["benchmark"], r["measure"], r["ratio"]) for r in rows] == [
        ("sd_pipeline", "text2img, 25 steps", 2.0),
        ("sd_pipeline", "text2img", None),
    ]
    del result["measures"]
    write_results("mystery", result, [], out=tmp_path)
    with pytest.raises(ValueError, match="no summary for result 'mystery'"):
        suite.collect([tmp_path / f"mystery_{DEVICE}.json"])


def test_markdown_table(tmp_path):
    rows, _ = suite.collect(write_all(tmp_path))
    failures = [{"name": "train", "error": "exit code 1", "stderr_tail": "Traceback\nMemoryError"}]
    md = suite.write_markdown(
        tmp_path / "s.md",
        rows,
        DEVICE,
        versions=VERSIONS,
        command="python -m benchmarks",
        timestamp="2026-01-01T00:00:00+00:00",
        failures=failures,
    )
    assert (tmp_path / "s.md").read_text() == md
    expected_table = textwrap.dedent(
        """\
        | benchmark | measure | jaxdiff | PyTorch | ratio |
        |---|---|---|---|---|
        | unet2d | UNet2DModel forward, batch 16, 32x32 (s) | 0.5 | 1 | 2.00x |
        | unet2d | 50-step DDIM sampling, batch 16, 32x32 (images/s) | 0.5 | 1 | 0.50x |
        | sd_components_tiny | unet: batch 2, 16x16x4 latents, 77x32 context (s) | 0.25 | 0.125 | 0.50x |
        | sd_components_tiny | vae: decode 8x8x4 -> 16x16x3 (s) | 0.0625 | 0.25 | 4.00x |
        | sd_components_tiny | clip: batch 2 x 77 tokens (s) | 0.002 | - | - |
        | train | train step, cats-32 UNet, batch 32, 32x32, fp32 (images/s) | 32 | 64 | 0.50x |
        | train | train step, cats-32 UNet, batch 32, 32x32, jaxdiff bf16 vs PyTorch fp32 (images/s) | 64 | 64 | 1.00x |
        """
    )
    assert expected_table in md
    assert md.startswith(
        "# jaxdiff vs PyTorch benchmark suite\n\n"
        f"Device: `{DEVICE}`; run at 2026-01-01T00:00:00+00:00; command `python -m benchmarks`\n\n"
        "Versions: jax 0.10.2, torch 2.13.0+cpu\n\n" + suite.RATIO_NOTE + "\n\n| benchmark"
    )
    assert "above 1 means jaxdiff is faster" in suite.RATIO_NOTE
    assert md.endswith(
        "## Failures\n\n* `train`: exit code 1\n\n  ```\n  Traceback\n  MemoryError\n  ```\n"
    )


def test_fmt():
    assert [suite.fmt(x) for x in (None, 41.0992, 0.81367, 23.997, 1234.4, 2e-3)] == [
        "-",
        "41.1",
        "0.814",
        "24",
        "1234",
        "0.002",
    ]


def test_write_suite_files(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    rows, results = suite.collect(write_all(tmp_path))
    paths = suite.write_suite(tmp_path / "out", DEVICE, rows, results, versions=VERSIONS)
    assert {k: p.name for k, p in paths.items()} == {
        "json": f"suite_{DEVICE}.json",
        "md": f"suite_{DEVICE}.md",
        "png": f"suite_{DEVICE}.png",
    }
    summary = json.loads(paths["json"].read_text())
    assert summary["device"] == DEVICE and summary["versions"] == VERSIONS
    assert summary["rows"] == rows and summary["results"]["unet2d"] == unet2d_result()
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG"
        # 10 x (1.6 + 0.4 * 6 rated rows) inches at 100 dpi
        assert im.size == (1000, 400)


def test_list_prints_the_benchmarks():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == [b.name for b in runner.BENCHMARKS]
    assert names[:3] == ["unet2d", "sd_components", "train"]


FAKE_OK = """
import argparse, json, pathlib, sys
p = argparse.ArgumentParser(); p.add_argument("--out", type=pathlib.Path); p.add_argument("--small", action="store_true")
a = p.parse_args()
result = json.loads({result!r})
result["config"]["small"] = a.small
(a.out / "train_{device}.json").write_text(json.dumps(result))
print("fake train done")
"""
FAKE_FAIL = """
import sys
print("loading weights", file=sys.stderr)
print("RuntimeError: fake out of memory", file=sys.stderr)
sys.exit(3)
"""
FAKE_SILENT = "print('ran, wrote nothing')\n"


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ok.py").write_text(FAKE_OK.format(result=json.dumps(train_result()), device=DEVICE))
    (pkg / "fail.py").write_text(FAKE_FAIL)
    (pkg / "silent.py").write_text(FAKE_SILENT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(
        runner,
        "BENCHMARKS",
        [
            runner.Benchmark("broken", "fakebench.fail"),
            runner.Benchmark("train", "fakebench.ok", quick="--small"),
            runner.Benchmark("silent", "fakebench.silent"),
        ],
    )
    monkeypatch.setattr(runner, "probe_device", lambda: {"device": DEVICE, "versions": VERSIONS})
    return tmp_path / "results"


def test_failing_script_is_recorded_and_the_suite_goes_on(fake_suite, capfd):
    out = fake_suite
    assert runner.main(["--out", str(out), "--quick"]) == 1
    summary = json.loads((out / f"suite_{DEVICE}.json").read_text())
    assert [(f["name"], f["error"]) for f in summary["failures"]] == [
        ("broken", "exit code 3"),
        ("silent", f"exit code 0 but no result file silent_{DEVICE}.json"),
    ]
    assert summary["failures"][0]["stderr_tail"] == (
        "loading weights\nRuntimeError: fake out of memory"
    )
    assert [r["returncode"] for r in summary["runs"]] == [3, 0, 0]
    # The benchmark after the failure ran, with its --quick options, and was summarised.
    assert summary["results"]["train"]["config"]["small"] is True
    assert [r["ratio"] for r in summary["rows"]] == [0.5, 1.0]
    assert summary["quick"] is True and summary["command"] == (
        f"python -m benchmarks --out {out} --quick"
    )
    md = (out / f"suite_{DEVICE}.md").read_text()
    assert "* `broken`: exit code 3" in md and "  RuntimeError: fake out of memory" in md
    captured = capfd.readouterr()
    assert "fake train done" in captured.out
    assert "RuntimeError: fake out of memory" in captured.err  # stderr is shown as well as kept
    assert "2 benchmark(s) failed: broken, silent" in captured.err


def test_only_selects_and_success_exits_zero(fake_suite):
    out = fake_suite
    assert runner.main(["--out", str(out), "--only", "train"]) == 0
    summary = json.loads((out / f"suite_{DEVICE}.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["train"]
    assert summary["failures"] == [] and summary["quick"] is False
    assert summary["results"]["train"]["config"]["small"] is False


def test_args_pass_options_to_one_script(fake_suite, capsys):
    out = fake_suite
    argv = ["--out", str(out), "--only", "train", "--args", "train=--small"]
    assert runner.main(argv) == 0
    summary = json.loads((out / f"suite_{DEVICE}.json").read_text())
    assert summary["results"]["train"]["config"]["small"] is True  # the option reached it
    assert summary["runs"][0]["command"].endswith(f"fakebench.ok --small --out {out}")
    assert summary["command"] == "python -m benchmarks " + " ".join(argv)
    for bad in ("train", "nosuch=--x"):
        with pytest.raises(SystemExit):
            runner.main(["--args", bad])
        assert "--args expects NAME=OPTIONS" in capsys.readouterr().err


def test_jaxdiff_bench_delegates(fake_suite):
    from jaxdiff import cli

    out = fake_suite
    assert cli.main(["bench", "--out", str(out), "--only", "train"]) == 0
    summary = json.loads((out / f"suite_{DEVICE}.json").read_text())
    assert summary["command"] == f"jaxdiff bench --out {out} --only train"


def test_jaxdiff_bench_outside_a_checkout(tmp_path, monkeypatch, capsys):
    from jaxdiff import cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "jaxdiff" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--list"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_other_commands_still_reject_unknown_options(capsys):
    from jaxdiff import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def _cpuinfo(vendor, family, model, flags="fpu avx2 avx512f"):
    return (
        f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        f"model name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\nvendor_id\t: Other\n"
    )


@pytest.mark.parametrize(
    "vendor, family, model, expected",
    [
        ("AuthenticAMD", 26, 2, "amd-zen5"),  # Turin
        ("AuthenticAMD", 25, 17, "amd-zen4"),  # Genoa (0x11)
        ("AuthenticAMD", 25, 1, "amd-zen3"),  # Milan
        ("AuthenticAMD", 25, 160, "amd-zen4"),  # Bergamo (0xA0)
        ("GenuineIntel", 6, 143, "intel-f6m143"),  # Sapphire Rapids: by number
    ],
)
def test_cpu_model_names_the_generation(vendor, family, model, expected):
    from benchmarks.common import cpu_info, cpu_model

    info = cpu_info(_cpuinfo(vendor, family, model))
    assert info["family"] == str(family) and info["vector"] == "avx2 avx512f"
    assert cpu_model(info) == expected
    assert cpu_model({}) == ""  # no /proc/cpuinfo: the device name has no CPU part
