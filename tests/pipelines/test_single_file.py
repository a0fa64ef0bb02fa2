"""``StableDiffusionPipeline.from_single_file`` on an LDM-layout checkpoint of the tiny SD
pipeline. The checkpoint is written with jaxdiff's key tables; diffusers' own
``from_single_file`` reading it back into the original weights is what proves the tables."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdiff.loaders.safetensors_io import load_file, save_file
from jaxdiff.loaders.single_file import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    diffusers_to_ldm_keys,
    open_clip_text_encoder,
)
from jaxdiff.loaders.state_dict import WeightLoadError
from jaxdiff.pipelines.stable_diffusion import StableDiffusionPipeline
from tests.pipelines.sd_helpers import diffusers_sd_pipe
from tests.reference_io import reference_dir

pytestmark = [
    pytest.mark.xdist_group("single_file"),  # one checkpoint and pipeline for the module
    pytest.mark.filterwarnings("ignore:.*clip_sample"),  # SD 1.5's PNDM config carries it
]


@pytest.fixture(scope="module")
def sd_dir() -> Path:
    return reference_dir("pipelines_stable_diffusion") / "sd_tiny"


def _ldm_checkpoint(sd_dir: Path) -> dict[str, np.ndarray]:
    ckpt = {}
    for comp in ("unet", "vae"):
        weights = load_file(sd_dir / comp / "diffusion_pytorch_model.safetensors")
        config = json.loads((sd_dir / comp / "config.json").read_text())
        for key, ldm in diffusers_to_ldm_keys(list(weights), config, comp).items():
            value = weights[key]
            if comp == "vae" and ".attentions." in key and key.endswith("weight") and value.ndim == 2:  # fmt: skip
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
            ckpt[ldm] = value
    for key, value in load_file(sd_dir / "text_encoder" / "model.safetensors").items():
        ckpt[CLIP_PREFIX + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    # what real checkpoints also carry, and loaders skip
    ckpt["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)
    ckpt["model_ema.decay"] = np.float32(0.9999)
    return ckpt


@pytest.fixture(scope="module")
def ckpt_path(sd_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "sd_tiny.safetensors"
    save_file(_ldm_checkpoint(sd_dir), path)
    return path


@pytest.mark.parity
def test_diffusers_reads_the_checkpoint_back(sd_dir, ckpt_path):
    """diffusers' converter maps the checkpoint onto the original weights: jaxdiff's tables
    (used to write it) and diffusers' agree."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    kw = dict(safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
    single = diffusers.StableDiffusionPipeline.from_single_file(str(ckpt_path), config=str(sd_dir), **kw)  # fmt: skip
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, **kw)
    for comp in ("unet", "vae", "text_encoder"):
        want = getattr(ref, comp).state_dict()
        got = getattr(single, comp).state_dict()
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=f"{comp} {k}")


def test_from_single_file_equals_from_pretrained(sd_dir, ckpt_path):
    pipe = StableDiffusionPipeline.from_single_file(ckpt_path, config=sd_dir)
    ref = StableDiffusionPipeline.from_pretrained(sd_dir)
    assert type(pipe.scheduler) is type(ref.scheduler) and pipe.unet.config == ref.unet.config
    for comp in ("unet", "vae", "text_encoder"):
        flat = jax.tree_util.tree_leaves_with_path(pipe.params[comp])
        want = dict(jax.tree_util.tree_leaves_with_path(ref.params[comp]))
        assert len(flat) == len(want)
        for path, leaf in flat:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[path]))


def test_extract_ema_and_errors(sd_dir, tmp_path):
    ckpt = _ldm_checkpoint(sd_dir)
    key = "model.diffusion_model.input_blocks.0.0.weight"  # conv_in
    ema = {"model_ema." + "".join(k.split(".")[1:]): v * 2 for k, v in ckpt.items() if k.startswith("model.")}  # fmt: skip
    save_file({**ckpt, **ema}, tmp_path / "ema.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(tmp_path / "ema.safetensors", config=sd_dir, extract_ema=True)  # fmt: skip
    kernel = np.asarray(pipe.params["unet"]["conv_in"]["kernel"])  # HWIO
    np.testing.assert_array_equal(kernel, 2 * ckpt[key].transpose(2, 3, 1, 0))

    broken = dict(ckpt)
    del broken[key]
    broken["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = np.zeros(4, np.float32)
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(WeightLoadError) as err:
        StableDiffusionPipeline.from_single_file(tmp_path / "broken.safetensors", config=sd_dir)
    assert "1 missing keys: conv_in.weight" in str(err.value)
    assert "input_blocks.99.0.in_layers.0.weight" in str(err.value)

    no_clip = {k: v for k, v in ckpt.items() if not k.startswith(CLIP_PREFIX)}
    save_file(no_clip, tmp_path / "v2.safetensors")
    with pytest.raises(ValueError, match="neither cond_stage_model"):
        StableDiffusionPipeline.from_single_file(tmp_path / "v2.safetensors", config=sd_dir)
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        StableDiffusionPipeline.from_single_file(tmp_path / "model.ckpt", config=sd_dir)
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint file"):
        StableDiffusionPipeline.from_single_file(tmp_path / "missing.safetensors", config=sd_dir)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for path in (tmp_path / "image.png", sd_dir / "unet" / "config.json"):
        with pytest.raises(ValueError, match="is not a model checkpoint: from_single_file reads"):
            StableDiffusionPipeline.from_single_file(path, config=sd_dir)


def test_cli_model_file_that_is_not_a_checkpoint(sd_dir, tmp_path, capsys):
    from jaxdiff.cli import main as cli_main

    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    base = ["generate", "a cat", "--out", str(tmp_path / "o.png"), "--no-progress"]
    for model, what in [
        (tmp_path / "image.png", "is not a model checkpoint"),
        (sd_dir / "unet" / "config.json", "is not a model checkpoint"),
        (tmp_path / "model.ckpt", "is a pickled checkpoint"),
    ]:
        assert cli_main([*base, "--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert f"--model {model} {what}" in err
        assert "a pipeline folder in diffusers layout" in err and "Hub repo id" in err
        assert ".safetensors checkpoint" in err and "allow_pickle=True" in err


def test_cli_generates_from_a_single_file(sd_dir, ckpt_path, tmp_path, capsys):
    from PIL import Image

    from jaxdiff.cli import main as cli_main

    args = ["generate", "a cat", "--model", str(ckpt_path), "--config", str(sd_dir), "--steps",
            "2", "--batch", "1", "--no-progress", "--out", str(tmp_path / "a.png")]  # fmt: skip
    assert cli_main(args) == 0
    ref = StableDiffusionPipeline.from_pretrained(sd_dir)
    want = ref("a cat", num_inference_steps=2, seed=0, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(want))
    args = ["generate", "a cat", "--model", str(sd_dir), "--config", str(sd_dir)]
    assert cli_main([*args, "--out", str(tmp_path / "b.png")]) == 2
    assert "--config is for a single-file --model" in capsys.readouterr().err


@pytest.mark.parity
@pytest.mark.parametrize("component", ["unet", "vae"])
def test_key_tables_at_the_sd15_config_match_diffusers(component):
    """Every SD 1.5 weight key through jaxdiff's table to the LDM layout, and back through
    diffusers' converter: each arrives at its own name (tagged values, no weights needed)."""
    pytest.importorskip("torch")
    from diffusers.loaders import single_file_utils as sfu

    from jaxdiff.loaders.state_dict import key_table
    from jaxdiff.models.autoencoder_kl import AutoencoderKL
    from jaxdiff.models.unet_2d_condition import UNet2DConditionModel, sd15_config

    if component == "unet":
        model = UNet2DConditionModel(**sd15_config())
        convert = sfu.convert_ldm_unet_checkpoint
    else:  # stabilityai/sd-vae-ft-mse, the SD 1.5 VAE
        config = dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
        model = AutoencoderKL.from_config(config)
        convert = sfu.convert_ldm_vae_checkpoint
    table = key_table(model.param_shapes(), model._list_names, type(model)._torch_rename)
    keys = [key for key, _ in table.values()]
    assert len(keys) == (686 if component == "unet" else 248)
    mapping = diffusers_to_ldm_keys(keys, dict(model.config), component)
    assert len(set(mapping.values())) == len(keys)  # one LDM key each
    tagged = {ldm: np.array([i], np.float32) for i, ldm in enumerate(mapping.values())}
    back = convert(tagged, dict(model.config))
    assert sorted(back) == sorted(keys)
    for i, key in enumerate(mapping):
        assert float(np.asarray(back[key])[0]) == i, key


def _open_clip_checkpoint(sd_dir: Path) -> dict[str, np.ndarray]:
    """The tiny checkpoint with its text encoder in SD 2.x's OpenCLIP layout, one extra
    resblock (as SD 2.x's unused 24th) and the projection heads."""
    ckpt = {k: v for k, v in _ldm_checkpoint(sd_dir).items() if not k.startswith(CLIP_PREFIX)}
    te = load_file(sd_dir / "text_encoder" / "model.safetensors")
    te = {k.removeprefix("text_model."): v for k, v in te.items()}
    p = OPEN_CLIP_PREFIX
    ckpt[p + "positional_embedding"] = te["embeddings.position_embedding.weight"]
    ckpt[p + "token_embedding.weight"] = te["embeddings.token_embedding.weight"]
    n = json.loads((sd_dir / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    for i, src in [(i, i) for i in range(n)] + [(n, 0)]:  # block n: a copy, to be dropped
        src, dst = f"encoder.layers.{src}.", f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            ckpt[f"{dst}ln_1.{leaf}"] = te[f"{src}layer_norm1.{leaf}"]
            ckpt[f"{dst}ln_2.{leaf}"] = te[f"{src}layer_norm2.{leaf}"]
            qkv = [te[f"{src}self_attn.{x}_proj.{leaf}"] for x in "qkv"]
            ckpt[f"{dst}attn.in_proj_{leaf}"] = np.concatenate(qkv)
            ckpt[f"{dst}attn.out_proj.{leaf}"] = te[f"{src}self_attn.out_proj.{leaf}"]
            ckpt[f"{dst}mlp.c_fc.{leaf}"] = te[f"{src}mlp.fc1.{leaf}"]
            ckpt[f"{dst}mlp.c_proj.{leaf}"] = te[f"{src}mlp.fc2.{leaf}"]
    ckpt[p + "ln_final.weight"] = te["final_layer_norm.weight"]
    ckpt[p + "ln_final.bias"] = te["final_layer_norm.bias"]
    width = te["final_layer_norm.weight"].shape[0]
    ckpt[p + "text_projection"] = np.eye(width, dtype=np.float32)
    ckpt[p + "logit_scale"] = np.float32(4.6)
    return ckpt


def test_open_clip_text_encoder_sd2_layout(sd_dir, tmp_path):
    ckpt = _open_clip_checkpoint(sd_dir)
    save_file(ckpt, tmp_path / "sd2.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(tmp_path / "sd2.safetensors", config=sd_dir)
    ref = StableDiffusionPipeline.from_pretrained(sd_dir)
    got = pipe.text_encoder.state_dict(pipe.params["text_encoder"])
    want = ref.text_encoder.state_dict(ref.params["text_encoder"])
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parity
def test_open_clip_conversion_matches_diffusers(sd_dir):
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    ref = diffusers_sd_pipe(sd_dir)
    ckpt = {k: torch.from_numpy(np.array(v)) for k, v in _open_clip_checkpoint(sd_dir).items()}
    theirs = convert_open_clip_checkpoint(ref.text_encoder, ckpt)
    ours = open_clip_text_encoder(_open_clip_checkpoint(sd_dir), ref.text_encoder.config.num_hidden_layers)  # fmt: skip
    assert set(ours) <= set(
        theirs
    )  # diffusers also keeps the extra block (it drops SD 2's 24th by name)
    assert len(ours) == len(ref.text_encoder.state_dict())
    for k, v in ours.items():
        np.testing.assert_array_equal(np.asarray(v), theirs[k].numpy(), err_msg=k)
