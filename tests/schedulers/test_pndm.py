"""PNDMScheduler: golden PRK / PLMS trajectories against diffusers, counters, the contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers.pndm import PNDMScheduler, PNDMState
from tests.reference_io import load_case, requires_reference
from tests.schedulers._trajectory_discrete import (
    COMPONENT,
    assert_trajectory_close,
    jax_trajectory,
)
from weights_conversion.reference.schedulers_ddpm_ddim_pndm import (
    PNDM_CASES,
    fake_model_output,
    initial_sample,
)

# Every case through the jitted lax.scan driver (fixed-shape history, traced counter); a few
# also through the eager loop, where set_timesteps gets no shape and the history is made at
# the first step.
GOLDEN = [(name, "scan") for name in sorted(PNDM_CASES)] + [
    (name, "eager") for name in ("default_prk", "skip_prk", "plms_two_steps")
]


@pytest.mark.parametrize(("name", "mode"), GOLDEN)
def test_golden_trajectory(name, mode):
    arrays, meta = load_case(COMPONENT, f"pndm_{name}")
    assert meta["class_name"] == "PNDMScheduler"
    sched = PNDMScheduler.from_config(meta["config"])
    actual = jax_trajectory(sched, meta["num_inference_steps"], arrays["sample"], mode=mode)
    # rtol 1e-5: both sides are float32 throughout; see assert_trajectory_close for atol.
    assert_trajectory_close(actual, arrays)


@requires_reference
@pytest.mark.parametrize(
    ("config", "n"),
    [
        (
            {
                "skip_prk_steps": True,
                "beta_schedule": "scaled_linear",
                "timestep_spacing": "trailing",
            },
            25,
        ),
        ({"timestep_spacing": "linspace", "set_alpha_to_one": True, "num_train_timesteps": 500}, 9),
    ],
)
def test_live_parity(config, n):
    from weights_conversion.reference.schedulers_ddpm_ddim_pndm import torch_trajectory

    sample = initial_sample(7)
    expected = torch_trajectory("pndm", config, n, {}, sample, None)
    actual = jax_trajectory(PNDMScheduler(**config), n, sample, mode="scan")
    assert_trajectory_close(actual, expected)


@requires_reference
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [4, 7, 50, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(skip, spacing, n, offset):
    from diffusers import PNDMScheduler as TorchPNDM

    if spacing == "leading" and offset and n == 1000:  # t = 1000: diffusers fails at step time
        with pytest.raises(ValueError, match="pushes timestep 1000 past"):
            PNDMScheduler(skip_prk_steps=skip, steps_offset=offset).set_timesteps(n)
        return
    kw = {"skip_prk_steps": skip, "timestep_spacing": spacing, "steps_offset": offset}
    ref = TorchPNDM(**kw)
    ref.set_timesteps(n)
    state = PNDMScheduler(**kw).set_timesteps(n)
    assert state.timesteps.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
    assert int(state.num_prk_steps) == len(ref.prk_timesteps)


def test_counters_and_history():
    """PRK: 12 calls (3 RK steps of 4), one ε stored per RK step; then PLMS stores every call."""
    sched = PNDMScheduler()
    x = jnp.asarray(initial_sample())
    state = sched.set_timesteps(10, shape=x.shape)
    assert state.timesteps.shape == (19,) and int(state.num_prk_steps) == 12
    assert state.ets.shape == (4, *x.shape)
    nums = []
    for t in np.asarray(state.timesteps)[:14]:
        out = sched.step(state, fake_model_output(jnp, x, int(t)), int(t), x)
        state, x = out.state, out.prev_sample
        nums.append(int(state.num_ets))
    assert nums == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4]
    assert int(state.counter) == 14 and int(state.step_index) == 14


def test_skip_prk_first_step_is_repeated():
    """With skip_prk_steps the first timestep comes twice; the second call restarts from the
    stored sample with the average of both outputs and does not enter the history."""
    sched = PNDMScheduler(skip_prk_steps=True)
    x0 = jnp.asarray(initial_sample())
    state = sched.set_timesteps(10, shape=x0.shape)
    ts = np.asarray(state.timesteps)
    assert ts[1] == ts[2] == ts[0] - 100
    e0, e1 = 0.3 * x0, 0.2 * x0 + 0.1
    out = sched.step(state, e0, int(ts[0]), x0)
    out2 = sched.step(out.state, e1, int(ts[1]), out.prev_sample)
    assert int(out2.state.num_ets) == 1
    # the same as one transfer from x0 at t = ts[0] to ts[1] with (e0 + e1) / 2
    ref_state = sched.set_timesteps(10, shape=x0.shape)
    ref = sched._transfer(ref_state, x0, jnp.int32(ts[0]), jnp.int32(ts[1]), (e0 + e1) / 2)
    np.testing.assert_allclose(np.asarray(out2.prev_sample), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_step_traces_once_across_prk_and_plms():
    sched = PNDMScheduler()
    x = jnp.asarray(initial_sample())
    state = sched.set_timesteps(6, shape=x.shape)
    traces = []

    @jax.jit
    def f(state, x, t):
        traces.append(1)
        out = sched.step(state, 0.3 * x, t, x)
        return out.state, out.prev_sample

    for t in np.asarray(state.timesteps):
        state, x = f(state, x, t)
    assert len(traces) == 1
    assert int(state.counter) == len(state.timesteps)


def test_eager_without_shape_equals_with_shape():
    sched = PNDMScheduler(skip_prk_steps=True)
    x = jnp.asarray(initial_sample())
    s1, s2 = sched.set_timesteps(5), sched.set_timesteps(5, shape=x.shape)
    assert s1.ets is None and s2.ets.shape == (4, *x.shape)
    x1 = x2 = x
    for t in np.asarray(s1.timesteps):
        o1 = sched.step(s1, fake_model_output(jnp, x1, int(t)), int(t), x1)
        o2 = sched.step(s2, fake_model_output(jnp, x2, int(t)), int(t), x2)
        s1, x1, s2, x2 = o1.state, o1.prev_sample, o2.state, o2.prev_sample
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))


def test_bf16_model_output_keeps_fp32_arithmetic():
    sched = PNDMScheduler(skip_prk_steps=True)
    x = jnp.asarray(initial_sample())
    state = sched.set_timesteps(10, shape=x.shape)
    mo = (0.3 * x).astype(jnp.bfloat16)
    out = sched.step(state, mo, 901, x)
    ref = sched.step(state, mo.astype(jnp.float32), 901, x)
    assert out.prev_sample.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.prev_sample), np.asarray(ref.prev_sample))
    assert out.state.ets.dtype == jnp.float32
    state16 = sched.set_timesteps(10, shape=x.shape, dtype=jnp.bfloat16)
    assert sched.step(state16, mo, 901, x).state.ets.dtype == jnp.bfloat16


def test_state_is_a_scan_carry():
    state = PNDMScheduler().set_timesteps(5, shape=(1, 2, 2, 3))
    assert isinstance(state, PNDMState)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(state))


@requires_reference
def test_from_pretrained_reads_diffusers_config(tmp_path):
    from diffusers import PNDMScheduler as TorchPNDM

    ref = TorchPNDM(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        skip_prk_steps=True,
        steps_offset=1,
    )
    ref.save_config(tmp_path)
    sched = PNDMScheduler.from_pretrained(tmp_path)
    assert sched.config.skip_prk_steps is True and sched.config.steps_offset == 1
    np.testing.assert_array_equal(sched.alphas_cumprod, ref.alphas_cumprod.numpy())


def test_prk_needs_four_steps():
    with pytest.raises(ValueError, match="num_inference_steps must be at least 4 for PNDM"):
        PNDMScheduler().set_timesteps(3)
    assert PNDMScheduler(skip_prk_steps=True).set_timesteps(1).timesteps.shape == (1,)


@pytest.mark.parametrize("n", [0, 1001])
def test_bad_num_inference_steps(n):
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 and"):
        PNDMScheduler().set_timesteps(n)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta_schedule", "cubic"),
        ("prediction_type", "sample"),
        ("timestep_spacing", "uniform"),
    ],
)
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        PNDMScheduler(**{field: value})
