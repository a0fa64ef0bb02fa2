"""convert_to_jaxdiff.py: a tiny SD-like pipeline folder -> a jaxdiff copy and its report.

The pipeline is assembled from the committed golden reference models (tiny random weights made
by diffusers/transformers): ``unet`` = unet_2d_condition/sd15_tiny (stored float16),
``vae`` = autoencoder_kl/base, ``text_encoder`` = clip_text/quick_gelu_eos2, plus a scheduler,
tokenizer files, a feature-extractor config and a fake safety checker (a model class jaxdiff
does not have).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import hub
from jaxdiff.loaders.safetensors_io import load_file, save_file
from jaxdiff.models.autoencoder_kl import AutoencoderKL
from jaxdiff.models.clip_text import CLIPTextModel
from jaxdiff.models.unet_2d import UNet2DModel
from jaxdiff.models.unet_2d_condition import UNet2DConditionModel
from tests.reference_io import REFERENCE, requires_reference
from weights_conversion import convert_to_jaxdiff as conv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "weights_conversion" / "convert_to_jaxdiff.py"
MODELS = {
    "unet": ("UNet2DConditionModel", REFERENCE / "unet_2d_condition" / "sd15_tiny"),
    "vae": ("AutoencoderKL", REFERENCE / "autoencoder_kl" / "base"),
    "text_encoder": ("CLIPTextModel", REFERENCE / "clip_text" / "quick_gelu_eos2"),
}
JAX_CLASSES = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "AutoencoderKL": AutoencoderKL,
    "CLIPTextModel": CLIPTextModel,
    "UNet2DModel": UNet2DModel,
}
TOKENIZER_FILES = {
    "vocab.json": json.dumps(
        {"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "a": 3, "</w>": 4}
    ),
    "merges.txt": "#version: 0.2\na </w>\n",
    "tokenizer_config.json": json.dumps({"model_max_length": 77}),
}


@pytest.fixture(scope="module")
def sd_tiny(tmp_path_factory) -> Path:
    """A StableDiffusionPipeline-shaped folder of tiny components."""
    root = tmp_path_factory.mktemp("sd_tiny")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    for name, (cls, src) in MODELS.items():
        shutil.copytree(src, root / name)
        index[name] = ["transformers" if cls.startswith("CLIP") else "diffusers", cls]
    shutil.copytree(
        REFERENCE / "pipelines_unconditional" / "ddpm_tiny" / "scheduler", root / "scheduler"
    )
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (root / "tokenizer").mkdir()
    for fname, text in TOKENIZER_FILES.items():
        (root / "tokenizer" / fname).write_text(text)
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (root / "feature_extractor").mkdir()
    (root / "feature_extractor" / "preprocessor_config.json").write_text('{"size": 224}')
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (root / "safety_checker").mkdir()
    (root / "safety_checker" / "config.json").write_text('{"architectures": ["X"]}')
    save_file({"w": np.zeros(3, np.float32)}, root / "safety_checker" / "model.safetensors")
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["image_encoder"] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def _saved_numel(folder: Path) -> int:
    return sum(int(v.size) for f in folder.glob("*.safetensors") for v in load_file(f).values())


def _assert_same_params(a: dict, b: dict) -> None:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_convert_pipeline_report_and_reload(sd_tiny, tmp_path):
    out = tmp_path / "out"
    report = conv.convert(sd_tiny, out, parity=False)

    assert report["layout"] == "pipeline"
    assert report["pipeline_class"] == "StableDiffusionPipeline"
    assert not report["parity_checked"]
    written = json.loads((out / conv.REPORT_JSON).read_text())
    assert written["components"].keys() == report["components"].keys()
    md = (out / conv.REPORT_MD).read_text()
    for name in MODELS:
        assert f"| {name} |" in md

    for name, (cls_name, src) in MODELS.items():
        c = report["components"][name]
        assert c["class"] == cls_name
        assert c["parity"] is None and c["parity_skipped"] == "--no-parity"
        # The parameter count is the number of values in the written safetensors files.
        assert c["param_count"] == c["saved_numel"] == _saved_numel(out / name)
        # Stored dtypes come from the source headers; the references are float16 (unet) / float32.
        stored = {v.dtype.name for f in src.glob("*.safetensors") for v in load_file(f).values()}
        assert set(c["stored_dtypes"]) == stored
        assert c["saved_dtypes"] == {"float32": c["saved_tensors"]}
        assert c["reload_exact"] is True
        # The output reloads in jaxdiff to exactly the params read from the source.
        cls = JAX_CLASSES[cls_name]
        _, p_src = cls.from_pretrained(sd_tiny, subfolder=name)
        _, p_out = cls.from_pretrained(out, subfolder=name)
        _assert_same_params(p_src, p_out)
    assert report["components"]["unet"]["stored_dtypes"] == {
        "float16": report["components"]["unet"]["source_tensors"]
    }
    # CLIP: transformers' layout and file name.
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float32"

    # Non-model components are copied byte for byte; the unknown model class is dropped.
    for fname, text in TOKENIZER_FILES.items():
        assert (out / "tokenizer" / fname).read_text() == text
    assert report["components"]["scheduler"]["action"] == "copied"
    assert report["components"]["safety_checker"]["action"] == "skipped"
    assert not (out / "safety_checker").exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    assert index["image_encoder"] == [None, None]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_convert_component_bf16_storage(tmp_path):
    src = MODELS["vae"][1]
    report = conv.convert(src, tmp_path / "vae", dtype="bfloat16", parity=False)
    c = report["components"]["base"]
    assert report["layout"] == "component"
    assert c["saved_dtypes"] == {"bfloat16": c["saved_tensors"]}
    assert c["reload_exact"]
    _, p_src = AutoencoderKL.from_pretrained(src)
    _, p_out = AutoencoderKL.from_pretrained(tmp_path / "vae", dtype=jnp.bfloat16)
    expected = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), p_src)
    _assert_same_params(expected, p_out)


def test_fp16_variant_becomes_plain_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ref = MODELS["unet"][1]
    shutil.copy(ref / "config.json", src / "config.json")
    shutil.copy(
        ref / "diffusion_pytorch_model.safetensors",
        src / "diffusion_pytorch_model.fp16.safetensors",
    )
    with pytest.raises(hub.HubFileNotFoundError, match="variant='fp16'"):
        conv.convert(src, tmp_path / "a", parity=False)
    report = conv.convert(src, tmp_path / "b", variant="fp16", parity=False)
    c = report["components"]["src"]
    assert c["source_files"] == ["diffusion_pytorch_model.fp16.safetensors"]
    assert c["saved_files"] == ["diffusion_pytorch_model.safetensors"]
    assert c["saved_dtypes"] == {"float32": c["saved_tensors"]}


def test_overwrite_refusal(tmp_path):
    src = MODELS["text_encoder"][1]
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        conv.convert(src, out, parity=False)
    assert (out / "stale.txt").read_text() == "x"  # nothing touched
    conv.convert(src, out, parity=False, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    # An output inside (or equal to) the source is refused even with overwrite.
    with pytest.raises(conv.ConversionError, match="overlaps the source"):
        conv.convert(out, out / "nested", parity=False, overwrite=True)


def test_bad_sources(tmp_path, sd_tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(conv.ConversionError, match="neither a diffusers pipeline folder"):
        conv.convert(tmp_path / "empty", tmp_path / "o1", parity=False)
    broken = tmp_path / "broken"
    shutil.copytree(sd_tiny, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(hub.HubFileNotFoundError, match="component 'vae'"):
        conv.convert(broken, tmp_path / "o2", parity=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        conv.convert(sd_tiny, tmp_path / "o3", dtype="int8")
    with pytest.raises(hub.HubFileNotFoundError, match="HF_HUB_OFFLINE"):
        conv.convert("jaxdiff-test/not-cached", tmp_path / "o4", local_files_only=True)


def test_cli_subprocess_without_torch(sd_tiny, tmp_path):
    """The script runs as a command; with --no-parity it never imports torch."""
    out = tmp_path / "cli"
    code = (
        "import sys, runpy; "
        f"sys.argv = [{str(SCRIPT)!r}, {str(sd_tiny)!r}, '--out', {str(out)!r}, '--no-parity', "
        "'--dtype', 'float16']; "
        "rc = 0\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'the converter imported torch'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| unet | UNet2DConditionModel |" in proc.stdout
    report = json.loads((out / conv.REPORT_JSON).read_text())
    for name in MODELS:
        c = report["components"][name]
        assert c["saved_dtypes"] == {"float16": c["saved_tensors"]}

    # The refusal of a non-empty output folder, through the command-line entry point.
    with pytest.raises(FileExistsError, match="--overwrite"):
        conv.main([str(sd_tiny), "--out", str(out), "--no-parity"])


# ----------------------------------------------------------------------------- live parity


@requires_reference
def test_parity_against_pytorch(sd_tiny, tmp_path):
    report = conv.convert(sd_tiny, tmp_path / "out")
    assert report["parity_checked"]
    assert "torch" in report["versions"]
    expected_outputs = {
        "unet": {"sample"},
        "vae": {"encode_mean", "decode"},
        "text_encoder": {"last_hidden_state", "pooler_output"},
    }
    for name, outputs in expected_outputs.items():
        c = report["components"][name]
        assert set(c["parity"]) == outputs
        # float32 on both sides; the golden tests of these models pass at ~1e-6.
        assert c["parity_max"] < 1e-4, (name, c["parity"])


@requires_reference
def test_unet2d_pipeline_parity(tmp_path):
    src = REFERENCE / "pipelines_unconditional" / "ddpm_tiny"
    report = conv.convert(src, tmp_path / "out")
    assert report["components"]["unet"]["parity_max"] < 1e-4


@requires_reference
def test_pickle_needs_allow_pickle(tmp_path):
    import torch

    src = tmp_path / "bin_vae"
    src.mkdir()
    ref = MODELS["vae"][1]
    shutil.copy(ref / "config.json", src / "config.json")
    state = {
        k: torch.from_numpy(np.array(v))
        for k, v in load_file(next(ref.glob("*.safetensors"))).items()
    }
    torch.save(state, src / "diffusion_pytorch_model.bin")
    with pytest.raises(hub.HubFileNotFoundError, match="allow_pickle=True"):
        conv.convert(src, tmp_path / "a", parity=False)
    report = conv.convert(src, tmp_path / "b", allow_pickle=True)
    c = report["components"]["bin_vae"]
    assert c["source_format"] == "pickle"
    assert c["saved_files"] == ["diffusion_pytorch_model.safetensors"]
    assert c["param_count"] == c["saved_numel"] == _saved_numel(tmp_path / "b")
    assert c["parity_max"] < 1e-4
    assert not any(p.suffix == ".bin" for p in (tmp_path / "b").iterdir())
    os.remove(src / "diffusion_pytorch_model.bin")
