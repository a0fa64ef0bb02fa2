"""DDPMScheduler: golden trajectories against diffusers, variance types, the contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers.ddpm import DDPMScheduler, DDPMState
from tests.reference_io import load_case, requires_reference
from tests.schedulers._trajectory_discrete import (
    COMPONENT,
    assert_trajectory_close,
    jax_trajectory,
)
from weights_conversion.reference.schedulers_ddpm_ddim_pndm import (
    DDPM_CASES,
    fake_model_output,
    initial_sample,
    step_noise,
)

# Every case through the jitted lax.scan driver; a few also through the eager Python loop.
GOLDEN = [(name, "scan") for name in sorted(DDPM_CASES)] + [
    (name, "eager") for name in ("default", "learned_range_sd", "small_log_v_trailing")
]


@pytest.mark.parametrize(("name", "mode"), GOLDEN)
def test_golden_trajectory(name, mode):
    arrays, meta = load_case(COMPONENT, f"ddpm_{name}")
    assert meta["class_name"] == "DDPMScheduler"
    sched = DDPMScheduler.from_config(meta["config"])
    actual = jax_trajectory(
        sched, meta["num_inference_steps"], arrays["sample"], arrays["noise"], mode=mode
    )
    # rtol 1e-5: both sides are float32 throughout; see assert_trajectory_close for atol.
    assert_trajectory_close(actual, arrays)


@requires_reference
@pytest.mark.parametrize(
    ("config", "n"),
    [
        (
            {
                "variance_type": "learned_range",
                "prediction_type": "v_prediction",
                "timestep_spacing": "linspace",
            },
            9,
        ),
        (
            {
                "beta_schedule": "squaredcos_cap_v2",
                "variance_type": "fixed_small_log",
                "thresholding": True,
            },
            12,
        ),
        ({"num_train_timesteps": 300, "variance_type": "fixed_large", "steps_offset": 1}, 7),
    ],
)
def test_live_parity(config, n):
    from weights_conversion.reference.schedulers_ddpm_ddim_pndm import torch_trajectory

    sample, noise = initial_sample(5), step_noise(n, seed=6)
    expected = torch_trajectory("ddpm", config, n, {}, sample, noise)
    actual = jax_trajectory(DDPMScheduler(**config), n, sample, noise, mode="scan")
    assert_trajectory_close(actual, expected)


@requires_reference
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, n, offset):
    from diffusers import DDPMScheduler as TorchDDPM

    if spacing == "leading" and offset and n == 1000:  # t = 1000: diffusers fails at step time
        with pytest.raises(ValueError, match="pushes timestep 1000 past"):
            DDPMScheduler(timestep_spacing=spacing, steps_offset=offset).set_timesteps(n)
        return
    ref = TorchDDPM(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    state = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset).set_timesteps(n)
    assert state.timesteps.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())


@requires_reference
def test_custom_timesteps_match_diffusers():
    import torch
    from diffusers import DDPMScheduler as TorchDDPM

    custom = [999, 700, 400, 123, 5]
    ref = TorchDDPM(clip_sample=False)
    ref.set_timesteps(timesteps=custom)
    sched = DDPMScheduler(clip_sample=False)
    state = sched.set_timesteps(timesteps=custom)
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
    x = initial_sample()
    noise = step_noise(1)[0]
    # the previous timestep of 400 is 123 (looked up by value, as diffusers)
    assert int(sched.previous_timestep(state, 400)) == 123
    assert int(sched.previous_timestep(state, 5)) == -1
    import diffusers.schedulers.scheduling_ddpm as mod

    original = mod.randn_tensor
    mod.randn_tensor = lambda *a, **k: torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    try:
        mo = fake_model_output(np, x, 400)
        expected = (
            ref.step(
                torch.from_numpy(mo.transpose(0, 3, 1, 2).copy()),
                400,
                torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            )
            .prev_sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    finally:
        mod.randn_tensor = original
    out = sched.step(state, jnp.asarray(mo), 400, jnp.asarray(x), noise=jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(out.prev_sample), expected, rtol=1e-5, atol=2e-6)


def test_custom_timesteps_errors():
    sched = DDPMScheduler()
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match=r"must lie in \[0, num_train_timesteps=1000\)"):
        sched.set_timesteps(timesteps=[1000, 10])
    with pytest.raises(ValueError, match="exactly one of num_inference_steps or timesteps"):
        sched.set_timesteps(10, timesteps=[10, 5])


def test_no_noise_at_t0():
    sched = DDPMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.asarray(initial_sample())
    mo = 0.3 * x
    a = sched.step(state, mo, 0, x, jax.random.key(0)).prev_sample
    b = sched.step(state, mo, 0, x, jax.random.key(1)).prev_sample
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = sched.step(state, mo, 100, x, jax.random.key(0)).prev_sample
    d = sched.step(state, mo, 100, x, jax.random.key(1)).prev_sample
    assert not np.allclose(c, d)


def test_posterior_mean_and_variance_by_hand():
    """Ho et al. (2020), Eq. 7 at t = 500 with all 1000 steps (t' = t - 1), in float64."""
    sched = DDPMScheduler(clip_sample=False)
    state = sched.set_timesteps(1000)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 2, 3)).astype(np.float32)
    eps = rng.standard_normal(x.shape).astype(np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32)
    out = sched.step(state, jnp.asarray(eps), 500, jnp.asarray(x), noise=jnp.asarray(z))
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    t = 500
    x0 = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])  # Eq. 15
    mean = (
        np.sqrt(ab[t - 1]) * betas[t] / (1 - ab[t]) * x0
        + np.sqrt(1 - betas[t]) * (1 - ab[t - 1]) / (1 - ab[t]) * x
    )
    var = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
    # float32 schedule (β_t from ᾱ_t / ᾱ_{t-1}, as diffusers) against float64: 1e-4 relative.
    np.testing.assert_allclose(
        np.asarray(out.prev_sample), mean + np.sqrt(var) * z, rtol=1e-4, atol=1e-5
    )


def test_fixed_large_log_equals_fixed_large():
    # diffusers takes sqrt(log β) here (NaN); jaxdiff uses the intended σ² = β.
    x = jnp.asarray(initial_sample())
    outs = []
    for vt in ("fixed_large", "fixed_large_log"):
        sched = DDPMScheduler(variance_type=vt)
        state = sched.set_timesteps(10)
        outs.append(np.asarray(sched.step(state, 0.3 * x, 900, x, jax.random.key(0)).prev_sample))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.isfinite(outs[1]).all()


def test_learned_variance_needs_twice_the_channels():
    sched = DDPMScheduler(variance_type="learned_range")
    state = sched.set_timesteps(10)
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(
        ValueError, match=r"needs model_output with 2 x 3 channels on the last axis"
    ):
        sched.step(state, x, 900, x, jax.random.key(0))
    out = sched.step(state, jnp.concatenate([x, 0 * x], -1), 900, x, jax.random.key(0))
    assert out.prev_sample.shape == x.shape


def test_stochastic_step_needs_a_key():
    sched = DDPMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match="DDPMScheduler.step is stochastic and needs a PRNG key"):
        sched.step(state, x, 900, x)


def test_step_at_a_timestep_outside_the_schedule_raises():
    # diffusers' previous_timestep finds no index for 901 and raises IndexError; a lookup by
    # value would silently continue from the schedule's second timestep.
    sched = DDPMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match=r"timestep 901 is not in the state's schedule"):
        sched.step(state, x, 901, x, jax.random.key(0))
    with pytest.raises(ValueError, match=r"timestep 5 is not in the state's schedule"):
        sched.step(state, x, np.int64(5), x, jax.random.key(0))
    sched.step(state, x, jnp.asarray(900), x, jax.random.key(0))  # a scheduled one is fine


def test_step_outside_the_schedule_raises_in_diffusers_too():
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler as TorchDDPM

    ref = TorchDDPM()
    ref.set_timesteps(10)
    x = torch.ones(1, 3, 2, 2)
    with pytest.raises(IndexError):
        ref.step(x, 901, x, generator=torch.Generator().manual_seed(0))


def test_step_traces_once_for_different_keys_and_timesteps():
    sched = DDPMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.asarray(initial_sample())
    traces = []

    @jax.jit
    def f(state, key, t):
        traces.append(1)
        out = sched.step(state, 0.3 * x, t, x, key)
        return out.prev_sample, out.state

    a, s1 = f(state, jax.random.key(0), 900)
    b, _ = f(state, jax.random.key(1), 801)
    f(s1, jax.random.key(2), 0)
    assert len(traces) == 1
    assert not np.allclose(a, b)
    assert int(s1.step_index) == 1


def test_bf16_model_output_keeps_fp32_arithmetic():
    sched = DDPMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.asarray(initial_sample())
    mo = (0.3 * x).astype(jnp.bfloat16)
    key = jax.random.key(0)
    out = sched.step(state, mo, 900, x, key)
    ref = sched.step(state, mo.astype(jnp.float32), 900, x, key)
    assert out.prev_sample.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.prev_sample), np.asarray(ref.prev_sample))


def test_state_is_a_scan_carry():
    state = DDPMScheduler().set_timesteps(5)
    assert isinstance(state, DDPMState)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(state))


@requires_reference
def test_from_pretrained_reads_diffusers_config(tmp_path):
    from diffusers import DDPMScheduler as TorchDDPM

    ref = TorchDDPM(
        variance_type="learned_range", beta_schedule="squaredcos_cap_v2", clip_sample_range=2.0
    )
    ref.save_config(tmp_path)
    sched = DDPMScheduler.from_pretrained(tmp_path)
    assert sched.config.variance_type == "learned_range"
    assert sched.config.clip_sample_range == 2.0
    np.testing.assert_array_equal(sched.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("n", [0, 1001])
def test_bad_num_inference_steps(n):
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 and"):
        DDPMScheduler().set_timesteps(n)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta_schedule", "cubic"),
        ("prediction_type", "score"),
        ("timestep_spacing", "uniform"),
        ("variance_type", "fixed_medium"),
    ],
)
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        DDPMScheduler(**{field: value})
