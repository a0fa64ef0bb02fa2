"""End-to-end training runs of a tiny UNet2DModel through ``jaxdiff train`` in subprocesses.

One module fixture runs, on the same 16 images (8x8) and config:

* ``a``: an uninterrupted 1-device run of 40 steps;
* ``b``: the same run killed with SIGKILL once its first checkpoint exists, then resumed;
* ``d``: the same run on 8 fake CPU devices (``--xla_force_host_platform_device_count=8``).

With a checkpoint every 5 steps and ``--steps-per-call 4`` each run alternates a scan of 4 steps
and a single step, so both compiled programs are in every comparison.

The runs share a persistent XLA compilation cache, so ``b`` reuses ``a``'s compiled step.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdiff.training.checkpoints import load_checkpoint_arrays
from tests.reference_io import relative_l2, requires_reference

# the module fixture trains three runs (minutes): one worker runs it once
pytestmark = pytest.mark.xdist_group("train_runs")

STEPS = 40
RUNNER = str(Path(__file__).with_name("_run_cli.py"))
REPO = Path(__file__).resolve().parents[2]


def _dataset(path: Path) -> None:
    """16 smooth 8x8 images: horizontal gradients between two random colours."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 255, (2, 16, 1, 1, 3))
    ramp = np.linspace(0, 1, 8)[None, None, :, None]
    images = a + (b - a) * ramp * np.ones((16, 8, 1, 1))
    np.savez(path, train=images.round().astype(np.uint8))


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, RUNNER, "train", "--data", str(data), "--out", str(out),
        "--resolution", "8", "--batch", "8", "--steps", str(STEPS), "--lr", "1e-3",
        "--warmup", "5", "--model", "tiny", "--checkpoint-every", "5", "--keep", "2",
        "--sample-every", "0", "--sample-count", "4", "--sample-steps", "4", "--log-every", "5",
        "--ema-decay", "0.99", "--steps-per-call", "4", "--no-progress", *extra,
    ]  # fmt: skip


def _env(cache: Path, devices: int = 1) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return env


def _finish(proc: subprocess.Popen, what: str) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n{out[-4000:]}"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 500) -> None:
    """Waits until ``path`` (a finished orbax checkpoint folder) exists or ``proc`` ends."""
    deadline = time.monotonic() + timeout
    while not path.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_runs")
    data, cache = root / "cats.npz", root / "xla_cache"
    _dataset(data)
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    # a (1 device) and d (8 devices) compile different programs: run them side by side
    a = subprocess.Popen(_args(data, root / "a"), env=_env(cache), **popen)
    d = subprocess.Popen(
        _args(data, root / "d", "--sample-every", "-1"), env=_env(cache, 8), **popen
    )
    # once a has a checkpoint its train step is in the compilation cache: b can start
    _wait_for(root / "a" / "checkpoints" / "5", a)
    # b: killed with SIGKILL as soon as its first checkpoint is complete, then resumed
    b = subprocess.Popen(_args(data, root / "b"), env=_env(cache), **popen)
    _wait_for(root / "b" / "checkpoints" / "5", b)
    still_running = b.poll() is None
    b.send_signal(signal.SIGKILL)
    b.communicate()
    killed_at = sorted(
        int(p.name) for p in (root / "b" / "checkpoints").iterdir() if p.name.isdigit()
    )
    c = subprocess.Popen(_args(data, root / "b", "--resume"), env=_env(cache), **popen)
    _finish(a, "run a")
    _finish(c, "resumed run b")
    _finish(d, "run d (8 devices)")
    return {"root": root, "data": data, "b_was_running": still_running, "killed_at": killed_at}


def _loss_rows(out: Path) -> list[dict]:
    with open(out / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_run_outputs_and_loss_decreases(runs):
    out = runs["root"] / "a"
    for name in (
        "run.json",
        "loss.csv",
        "loss.png",
        "samples/step_0000040.png",
        "pipeline/model_index.json",
    ):
        assert (out / name).is_file(), name
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [35, 40]  # keep 2
    rows = _loss_rows(out)
    assert [int(r["step"]) for r in rows] == list(range(5, STEPS + 1, 5))
    losses = [float(r["loss"]) for r in rows]
    # each row averages 5 steps x 8 examples of the eps-loss (which starts near 1 for a random
    # init); on 16 smooth images the tiny UNet must clearly learn within 40 steps
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < 0.7 * first, losses
    state, meta = load_checkpoint_arrays(out / "checkpoints")
    assert int(state["step"]) == STEPS and meta["data_position"] == STEPS and meta["data_seed"] == 0


def test_resume_after_sigkill_is_exact(runs):
    assert runs["b_was_running"], (
        "run b finished before it could be killed: make the test run longer"
    )
    assert runs["killed_at"] and max(runs["killed_at"]) < STEPS, runs["killed_at"]
    a, _ = load_checkpoint_arrays(runs["root"] / "a" / "checkpoints")
    b, _ = load_checkpoint_arrays(runs["root"] / "b" / "checkpoints")
    # Same compiled program on the same device, the same state bits restored, and the data order
    # and step keys are functions of (seed, step): the resumed run is bit-identical.
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # the log rows the killed run wrote past its checkpoint were replaced, not duplicated
    assert _loss_rows(runs["root"] / "b") == _loss_rows(runs["root"] / "a")


def test_eight_devices_match_one_device(runs):
    a, _ = load_checkpoint_arrays(runs["root"] / "a" / "checkpoints")
    d, _ = load_checkpoint_arrays(runs["root"] / "d" / "checkpoints")
    assert json.loads((runs["root"] / "d" / "run.json").read_text())["batch"] == 8
    # Per-example keys make the two runs the same computation except for the order of the
    # gradient all-reduce (8 partial sums vs one): ~1e-7 relative round-off per step, which
    # AdamW carries into the params at the same relative size (observed max |diff| ~2e-7 after
    # 40 steps for params of size ~0.1-1). 1e-6 is five times that and 1/1000 of one lr step.
    #
    # One exception, by design of attention rather than of the trainer: the key projection's
    # bias adds q.b_k to every logit of a query alike, so softmax makes its true gradient
    # exactly 0. Its computed gradient is pure round-off, which Adam normalises into steps of
    # up to ~lr in a sign set by that round-off; those leaves only have to stay within the
    # sum of the step sizes (40 steps x lr 1e-3 < 0.04; observed ~3e-4).
    assert (runs["root"] / "d" / "loss.csv").read_text().count("\n") == STEPS // 5 + 1
    for name in ("params", "ema_params"):
        flat_a = jax.tree_util.tree_flatten_with_path(a[name])[0]
        flat_d = jax.tree_util.tree_leaves(d[name])
        assert len(flat_a) == len(flat_d)
        for (path, x), y in zip(flat_a, flat_d):
            key = jax.tree_util.keystr(path)
            if "to_k" in key and "bias" in key:
                np.testing.assert_allclose(y, x, rtol=0, atol=0.04, err_msg=key)
            else:
                np.testing.assert_allclose(y, x, rtol=0, atol=1e-6, err_msg=key)
    la = [float(r["loss"]) for r in _loss_rows(runs["root"] / "a")]
    ld = [float(r["loss"]) for r in _loss_rows(runs["root"] / "d")]
    np.testing.assert_allclose(ld, la, rtol=1e-5)  # the logged losses agree to the CSV's digits


def test_export_round_trip_jaxdiff(runs):
    from jaxdiff.pipelines import DiffusionPipeline
    from jaxdiff.pipelines.unconditional import DDPMPipeline

    folder = runs["root"] / "a" / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, DDPMPipeline)
    assert pipe.unet.sample_size == 8 and pipe.scheduler.config.prediction_type == "epsilon"
    state, _ = load_checkpoint_arrays(runs["root"] / "a" / "checkpoints")
    # the exported weights are the EMA weights, bit for bit
    for x, y in zip(_leaves(state["ema_params"]), _leaves(pipe.params["unet"]), strict=True):
        np.testing.assert_array_equal(x, y)


@requires_reference
def test_export_loads_in_diffusers(runs):
    import diffusers
    import torch

    from jaxdiff.pipelines import DiffusionPipeline

    folder = runs["root"] / "a" / "pipeline"
    ref = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(folder)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    t = np.array([10, 700])
    ours = pipe.unet.apply({"params": pipe.params["unet"]}, x, t).sample
    with torch.no_grad():
        theirs = ref.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    # both float32 with exact matmuls (conftest); only summation order differs
    assert relative_l2(ours, theirs) < 1e-5
    assert ref.scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps


def test_init_from_a_trained_pipeline(runs, tmp_path):
    from jaxdiff.training import TrainConfig, build_unet, train
    from jaxdiff.training.loop import load_init_unet

    folder = runs["root"] / "a" / "pipeline"
    unet, params = load_init_unet(folder)  # pipeline layout: its unet/
    unet_only, params_only = load_init_unet(folder / "unet")  # a UNet folder
    assert unet.block_out_channels == unet_only.block_out_channels == (16, 32)
    for x, y in zip(_leaves(params), _leaves(params_only), strict=True):
        np.testing.assert_array_equal(x, y)

    # lr 1e-12 and no decay: two steps move no weight by more than ~2e-12, so the run's params
    # and EMA are the pretrained weights (a random init differs by O(0.1))
    config = TrainConfig(
        data=str(runs["data"]), out=str(tmp_path / "ft"), resolution=8, batch=8, steps=2,
        lr=1e-12, warmup=0, weight_decay=0.0, sample_every=-1, progress=False,
        init_from=str(folder), model="cats-32", async_checkpoints=False,
    )  # fmt: skip
    result = train(config)
    assert result.steps_run == 2 and int(result.state.step) == 2
    for tree in (result.state.params, result.state.ema_params):
        for x, y in zip(_leaves(params), _leaves(tree), strict=True):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-9)
    # the architecture is the pretrained one, not the "cats-32" preset; build_unet reads it
    # from the config alone
    assert build_unet(config) == unet
    saved = json.loads((result.pipeline_dir / "unet" / "config.json").read_text())
    assert saved["block_out_channels"] == [16, 32]
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["init_from"] == str(folder)


def test_init_from_errors(runs, tmp_path):
    from jaxdiff.training import TrainConfig, train

    base = dict(data=str(runs["data"]), resolution=8, batch=8, steps=1, progress=False)
    with pytest.raises(ValueError, match="unet_config cannot be combined with init_from"):
        train(TrainConfig(out=str(tmp_path / "x"), init_from="m", unet_config={"a": 1}, **base))
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub repo id"):
        train(TrainConfig(out=str(tmp_path / "y"), init_from=str(tmp_path / "nope"), **base))
