"""The cats model shipped inside the package: in the wheel, small, and `jaxdiff generate`'s
offline default."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

from jaxdiff.cli import DEFAULT_MODEL_DIR, default_model
from jaxdiff.cli import main as cli_main
from jaxdiff.training.loop import MODEL_PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_model_is_a_small_cats_ddpm():
    path = default_model()
    assert path is not None and Path(path).is_dir(), "jaxdiff/assets/ddpm-cats-32 is missing"
    index = json.loads((Path(path) / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    config = json.loads((Path(path) / "unet" / "config.json").read_text())
    preset = MODEL_PRESETS["cats-32"]
    assert config["sample_size"] == 32
    assert tuple(config["block_out_channels"]) == preset["block_out_channels"]
    weights = Path(path) / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024  # the limit
    assert (Path(path) / "TRAINING.md").is_file()  # how it was trained


def test_generate_without_model_writes_cats_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cats.png"
    args = ["generate", "--scheduler", "ddim", "--steps", "5", "--batch", "4", "--no-progress"]
    assert cli_main([*args, "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)  # a 2 x 2 grid of 32 x 32 cats
    assert DEFAULT_MODEL_DIR in capsys.readouterr().out


def test_generate_samples_the_shipped_model_with_50_step_ddim(tmp_path, capsys):
    """Without --scheduler/--steps the shipped model samples with DDIM, 50 steps (its own DDPM
    scheduler drifts into saturated colours, see SHIPPED_MODEL_SAMPLER); given ones win."""
    out = tmp_path / "cats.png"
    args = ["generate", "--batch", "1", "--no-progress", "--out", str(out)]
    assert cli_main(args) == 0
    assert "(DDIMScheduler, 50 steps)" in capsys.readouterr().out
    assert cli_main([*args, "--overwrite", "--steps", "3"]) == 0
    assert "(DDIMScheduler, 3 steps)" in capsys.readouterr().out
    assert cli_main([*args, "--overwrite", "--scheduler", "euler", "--steps", "2"]) == 0
    assert "(EulerDiscreteScheduler, 2 steps)" in capsys.readouterr().out


def test_the_wheel_ships_the_model(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        timeout=600,
    )
    wheel = next(tmp_path.glob("jaxdiff-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    base = "jaxdiff/" + DEFAULT_MODEL_DIR
    for f in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ):
        assert f"{base}/{f}" in names
