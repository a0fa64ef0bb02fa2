"""Several train steps in one call (``TrainStep.steps``, ``TrainConfig.steps_per_call``): the
same training as one call per step, and the loss log rows it leads to."""

import csv
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.unet_2d import UNet2DModel
from jaxdiff.schedulers import DDPMScheduler
from jaxdiff.training import TrainConfig, train
from jaxdiff.training.loop import MODEL_PRESETS, _LossLog
from jaxdiff.training.train_state import TrainState, make_optimizer, make_train_step

# One level, no attention: what the tests need (a conv net with gradients), quick to compile.
SMALL = {
    "block_out_channels": (8,),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "down_block_types": ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",),
}


@pytest.fixture(scope="module")
def tiny():
    unet = UNet2DModel(**{**MODEL_PRESETS["tiny"], **SMALL}, sample_size=8)
    optimizer = make_optimizer(1e-3, 2, 10)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    step = make_train_step(unet, scheduler, optimizer, ema_decay=0.9, donate=False)
    params = unet.init_weights(jax.random.key(0))
    batches = np.random.default_rng(0).integers(0, 256, (3, 4, 8, 8, 3), dtype=np.uint8)
    keys = jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(1)))(jnp.arange(3))
    return step, optimizer, params, batches, keys


def test_steps_equal_one_call_per_step(tiny):
    step, optimizer, params, batches, keys = tiny
    one = TrainState.create(params, optimizer)
    losses = []
    for i in range(3):
        one, metrics = step(one, batches[i], keys[i])
        losses.append(metrics["loss"])
    three, metrics = step.steps(TrainState.create(params, optimizer), batches, keys)
    assert {k: v.shape for k, v in metrics.items()} == {
        "loss": (3,),
        "grad_norm": (3,),
        "lr": (3,),
        "ema_decay": (3,),
    }
    assert int(three.step) == 3
    # the same step in a loop body: XLA may fuse it differently, so equal up to round-off
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(three), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_steps_shape_errors_name_the_argument(tiny):
    step, optimizer, params, batches, keys = tiny
    state = TrainState.create(params, optimizer)
    with pytest.raises(ValueError, match=r"batches must be NHWC images \(steps, batch"):
        step.steps(state, batches[0], keys)
    with pytest.raises(ValueError, match=r"keys must hold one PRNG key per step, shape \(3,\)"):
        step.steps(state, batches, keys[:2])
    with pytest.raises(ValueError, match=r"batch must be NHWC images \(batch, height"):
        step(state, batches, keys[0])


def test_loss_log_rows_across_calls_of_several_steps():
    log = _LossLog(log_every=3, total=10, start=0)
    losses = np.arange(1.0, 11.0)  # step s has loss s, lr 10 s
    calls = [(0, 4), (4, 5), (5, 9), (9, 10)]  # (first step, done): 4 + 1 + 4 + 1 steps
    rows = []
    for first, done in calls:
        chunk = losses[first:done]
        metrics = {"loss": jnp.asarray(chunk), "lr": jnp.asarray(10 * chunk)}
        if done - first == 1:  # a single step's metrics are scalars
            metrics = {k: v[0] for k, v in metrics.items()}
        rows += log.add(metrics, done)
    # rows at 3, 6, 9 (every 3) and 10 (the last step): mean loss since the previous row
    assert rows == [(3, 2.0, 30.0), (6, 5.0, 60.0), (9, 8.0, 90.0), (10, 10.0, 100.0)]


def test_loss_log_resumed_counts_from_the_checkpoint():
    log = _LossLog(log_every=5, total=20, start=10)
    assert log.add({"loss": jnp.ones(4), "lr": jnp.zeros(4)}, 14) == []
    assert log.add({"loss": jnp.float32(6.0), "lr": jnp.float32(1.0)}, 15) == [(15, 2.0, 1.0)]


def test_train_runs_the_same_with_and_without_steps_per_call(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", train=images)
    results = {}
    for k in (1, 3):
        config = TrainConfig(
            data=str(tmp_path / "d.npz"),
            out=str(tmp_path / f"k{k}"),
            resolution=8,
            batch=4,
            steps=7,  # with k = 3: calls of 3, 3 and 1 steps
            model="tiny",
            unet_config=SMALL,
            warmup=2,
            lr=1e-3,
            log_every=2,
            checkpoint_every=0,
            sample_every=-1,
            steps_per_call=k,
            progress=False,
            async_checkpoints=False,
        )
        results[k] = train(config)
    for a, b in zip(jax.tree.leaves(results[1].state), jax.tree.leaves(results[3].state)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)

    def rows(k):
        with open(tmp_path / f"k{k}" / "loss.csv") as f:
            return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]

    assert [s for s, _ in rows(3)] == [2, 4, 6, 7]
    np.testing.assert_allclose(np.array(rows(3)), np.array(rows(1)), rtol=1e-5)


def test_steps_per_call_must_be_positive(tmp_path):
    config = TrainConfig(data="x", out=str(tmp_path / "o"), steps_per_call=0)
    with pytest.raises(ValueError, match="steps_per_call must be a positive integer, got 0"):
        train(config)
