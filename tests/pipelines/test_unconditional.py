"""Unconditional pipelines and the scan driver against diffusers' denoising loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff import sampling
from jaxdiff.cli import main as cli_main
from jaxdiff.pipelines import DDIMPipeline, DDPMPipeline, DiffusionPipeline
from jaxdiff.pipelines.pipeline_utils import scheduler_class
from jaxdiff.schedulers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from tests.compile_events import RECORD_COMPILES
from tests.reference_io import load_case, reference_dir, requires_reference

COMPONENT = "pipelines_unconditional"
CASES = ["ddim_10", "euler_8", "dpmpp2m_8", "pndm_6"]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return reference_dir(COMPONENT) / "ddpm_tiny"


@pytest.fixture(scope="module")
def pipe(tiny_dir) -> DDPMPipeline:
    return DiffusionPipeline.from_pretrained(tiny_dir)


def _model_fn(pipe, params=None):
    params = pipe.params["unet"] if params is None else params

    def model_fn(x, t):
        return pipe.unet.apply({"params": params}, x, jnp.broadcast_to(t, x.shape[:1])).sample

    return model_fn


def test_dispatch_and_repr(pipe):
    assert type(pipe) is DDPMPipeline
    assert isinstance(pipe.scheduler, DDPMScheduler)
    text = repr(pipe)
    assert text.startswith("DDPMPipeline {")
    config = json.loads(text[len("DDPMPipeline ") :])
    assert config["unet"] == ["diffusers", "UNet2DModel"]
    assert config["scheduler"] == ["diffusers", "DDPMScheduler"]


@pytest.mark.parametrize("case", CASES)
def test_scan_loop_matches_diffusers_loop(pipe, case):
    arrays, meta = load_case(COMPONENT, case)
    scheduler = scheduler_class(meta["scheduler"]).from_config(
        pipe.scheduler.config, **meta["extra_config"]
    )
    x_T = jnp.asarray(arrays["x_T"])
    state = scheduler.set_timesteps(meta["num_inference_steps"], shape=x_T.shape)
    keys = sampling.image_keys(jax.random.key(0), x_T.shape[0])
    run = jax.jit(
        lambda params, x, st: sampling.denoise(_model_fn(pipe, params), scheduler, st, x, keys)
    )
    x_0 = run(pipe.params["unet"], x_T * state.init_noise_sigma, state)
    images = np.clip(np.asarray(x_0) / 2 + 0.5, 0, 1)
    # Each step feeds float32 UNet outputs (1e-6 relative apart) back into the sample; after
    # <= 10 steps the images agree to well under one uint8 level.
    np.testing.assert_allclose(images, arrays["images"], atol=2e-4, rtol=0)


def test_seed_changes_do_not_recompile(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    a = pipe(batch_size=2, num_inference_steps=3, seed=0, output_type="np", progress=False)
    b = pipe(batch_size=2, num_inference_steps=3, seed=1, output_type="np", progress=False)
    c = pipe(
        batch_size=2, num_inference_steps=3, key=jax.random.key(0), output_type="np", progress=False
    )
    fn = pipe._sample_fn(None)
    assert fn._cache_size() == 1
    assert not np.allclose(a.images, b.images)
    np.testing.assert_array_equal(a.images, c.images)


def test_images_depend_only_on_their_own_key(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    three = pipe(batch_size=3, num_inference_steps=3, seed=5, output_type="np", progress=False)
    one = pipe(batch_size=1, num_inference_steps=3, seed=5, output_type="np", progress=False)
    assert three.images.shape == (3, 16, 16, 3)
    # Same noise for image 0; XLA picks other conv blockings for batch 3 than for batch 1, so
    # the float32 sums differ in the last bits (seen: 5e-6 after 3 steps).
    np.testing.assert_allclose(three.images[:1], one.images, atol=5e-5)


def test_scheduler_swap_and_pil_output(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert DDPMScheduler in pipe.scheduler.compatibles
    out = pipe(batch_size=2, num_inference_steps=4, seed=0, progress=False)
    assert len(out.images) == 2 and isinstance(out.images[0], Image.Image)
    assert out.images[0].size == (16, 16)


def test_ddpm_pipeline_stochastic_steps_are_reproducible(pipe):
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    a = pipe(batch_size=1, num_inference_steps=5, seed=3, output_type="np", progress=False)
    b = pipe(batch_size=1, num_inference_steps=5, seed=3, output_type="np", progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    assert np.all((a.images >= 0) & (a.images <= 1))
    # the output indexes as diffusers' BaseOutput; return_dict=False gives the tuple (images,)
    assert a[0] is a.images and a["images"] is a.images and a.to_tuple() == (a.images,)
    with pytest.raises(KeyError, match="has only 'images'"):
        a["nsfw_content_detected"]
    (c,) = pipe(
        batch_size=1, num_inference_steps=5, seed=3, output_type="np", progress=False,
        return_dict=False,
    )  # fmt: skip
    np.testing.assert_array_equal(c, a.images)


def test_ddim_pipeline_eta_is_traced(tiny_dir):
    pipe = DDIMPipeline.from_pretrained(tiny_dir)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    a = pipe(batch_size=1, num_inference_steps=3, seed=0, eta=0.0, output_type="np", progress=False)
    b = pipe(batch_size=1, num_inference_steps=3, seed=0, eta=1.0, output_type="np", progress=False)
    assert pipe._sample_fn(None)._cache_size() == 1
    assert not np.allclose(a.images, b.images)


def test_progress_bar_is_driven_from_the_scan(pipe, capsys):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe(batch_size=1, num_inference_steps=4, seed=0, output_type="np", progress=True)
    err = capsys.readouterr().err
    assert "denoising" in err and "4/4" in err
    pipe.set_progress_bar_config(desc="cats", leave=True)  # diffusers' method: tqdm options
    pipe(batch_size=1, num_inference_steps=3, seed=0, output_type="np", progress=True)
    err = capsys.readouterr().err
    assert "cats" in err and "denoising" not in err and "3/3" in err
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=1, num_inference_steps=3, seed=0, output_type="np", progress=True)
    assert "3/3" not in capsys.readouterr().err
    pipe.set_progress_bar_config()


def test_bad_arguments(pipe, tiny_dir):
    with pytest.raises(ValueError, match="pass seed=<int> or key="):
        pipe(batch_size=1, num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type must be 'pil' or 'np'"):
        pipe(batch_size=1, num_inference_steps=2, seed=0, output_type="pt")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        pipe(batch_size=0, num_inference_steps=2, seed=0)
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 and"):
        pipe(batch_size=1, num_inference_steps=0, seed=0)
    with pytest.raises(ValueError, match="unknown scheduler 'lms'"):
        scheduler_class("lms")
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        pipe(batch_size=1, num_inference_steps=2, seed=2**70)
    ddim = DDIMPipeline.from_pipe(pipe)
    for eta in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            ddim(batch_size=1, num_inference_steps=2, seed=0, eta=eta)
    with pytest.raises(TypeError, match="eta must be a number, got 'a'"):
        ddim(batch_size=1, num_inference_steps=2, seed=0, eta="a")
    with pytest.raises(TypeError, match="scheduler must be a jaxdiff scheduler object"):
        DiffusionPipeline.from_pretrained(tiny_dir, scheduler="ddim")
    with pytest.raises(ValueError, match="needs the component"):
        DDPMPipeline(unet=None, scheduler=pipe.scheduler)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['schedular'\]"):
        DDPMPipeline(unet=pipe.unet, schedular=pipe.scheduler)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['safety_checker'\]"):
        DDPMPipeline.from_pretrained(tiny_dir, safety_checker=None)


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "saved")
    again = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(again) is DDPMPipeline and isinstance(again.scheduler, DDIMScheduler)
    a = pipe(batch_size=1, num_inference_steps=3, seed=0, output_type="np", progress=False)
    b = again(batch_size=1, num_inference_steps=3, seed=0, output_type="np", progress=False)
    np.testing.assert_array_equal(a.images, b.images)


@requires_reference
def test_saved_pipeline_loads_in_diffusers(pipe, tmp_path):
    import diffusers
    import torch

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "saved")
    ref = diffusers.DDPMPipeline.from_pretrained(tmp_path / "saved")
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref.unet(torch.from_numpy(x).permute(0, 3, 1, 2), 10).sample.permute(0, 2, 3, 1)
    got = _model_fn(pipe)(jnp.asarray(x), jnp.asarray(10))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=1e-4)


def test_missing_folder_and_bad_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FancyPipeline"}))
    with pytest.raises(ValueError, match="jaxdiff has no pipeline 'FancyPipeline'"):
        DiffusionPipeline.from_pretrained(tmp_path)


# ------------------------------------------------------------------ multiple devices
_MULTI = RECORD_COMPILES + textwrap.dedent(
    """
    import sys, numpy as np, jax
    from jaxdiff.pipelines import DiffusionPipeline
    from jaxdiff.schedulers import DDPMScheduler
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    assert jax.local_device_count() == int(sys.argv[3]), jax.devices()
    out = {}
    for b in (3, 8):
        out[f"jit{b}"] = pipe(batch_size=b, num_inference_steps=4, seed=0, output_type="np",
                              progress=False).images
    for name in ("pmap8", "pmap8_again"):
        compiles.clear()
        out[name] = pipe(batch_size=8, num_inference_steps=4, seed=0, output_type="np",
                         progress=False, use_pmap=True).images
    assert not compiles, f"the second pmap call compiled again: {compiles}"
    np.savez(sys.argv[2], **out)
    """
)


def _run_devices(tiny_dir, tmp_path, n):
    script = tmp_path / "multi.py"
    script.write_text(_MULTI)
    out = tmp_path / f"out{n}.npz"
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu"
    )
    subprocess.run(
        [sys.executable, str(script), str(tiny_dir), str(out), str(n)],
        check=True,
        env=env,
        cwd=Path(__file__).parents[2],
        timeout=600,
    )
    return np.load(out)


def test_eight_devices_equal_one_device(tiny_dir, tmp_path):
    one = _run_devices(tiny_dir, tmp_path, 1)
    eight = _run_devices(tiny_dir, tmp_path, 8)
    # Per-image keys make every image independent of batch size, padding and device count;
    # only XLA's per-shape kernel choices differ, at float32 round-off.
    for k in ("jit3", "jit8", "pmap8"):
        np.testing.assert_allclose(eight[k], one[k], atol=5e-5, err_msg=k)
    np.testing.assert_allclose(one["jit3"], one["jit8"][:3], atol=5e-5)
    np.testing.assert_allclose(one["pmap8"], one["jit8"], atol=5e-5)
    for out in (one, eight):  # the script asserts that the second pmap call compiled nothing
        np.testing.assert_array_equal(out["pmap8_again"], out["pmap8"])


# ------------------------------------------------------------------ CLI
def test_cli_generate_writes_a_grid(tiny_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = [
        "generate",
        "--model",
        str(tiny_dir),
        "--steps",
        "3",
        "--scheduler",
        "ddim",
        "--batch",
        "4",
        "--seed",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli_main(args) == 0
    assert Image.open(out).size == (32, 32)  # 2 x 2 grid of 16 x 16 images
    assert cli_main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0


def test_cli_errors_are_clear(tiny_dir, tmp_path, capsys):
    base = ["generate", "--steps", "2", "--out", str(tmp_path / "g.png"), "--no-progress"]
    assert cli_main(base + ["--model", str(tiny_dir), "--scheduler", "nope"]) == 2
    assert "unknown scheduler 'nope'" in capsys.readouterr().err
    assert cli_main(base + ["--model", str(tmp_path / "missing")]) == 2
    assert "neither an existing folder nor a Hub repo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(base + ["--model", str(tiny_dir), "--batch", "0"])
