"""EulerAncestralDiscreteScheduler: parity with diffusers, keys, scan/jit, config, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from tests.reference_io import requires_reference
from tests.schedulers._trajectory_sigma import (
    case_names,
    check_eager_matches_scan,
    check_golden,
    run_live,
)

CASES = case_names("EulerAncestralDiscreteScheduler")


@pytest.mark.parametrize("name", CASES)
def test_golden_trajectory(name):
    check_golden(EulerAncestralDiscreteScheduler, name)


def test_eager_loop_matches_scan_and_reference():
    check_eager_matches_scan(EulerAncestralDiscreteScheduler, "ancestral_sd_leading")


@requires_reference
def test_live_parity():
    run_live(
        EulerAncestralDiscreteScheduler,
        {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"},
        12,
        name="ancestral_live",
    )


@requires_reference
def test_live_parity_cosine_no_nan_under_jit():
    """Regression: with the cosine schedule σ_0 ~ 2e4 ≫ σ_1, so σ_down² = σ_1² - σ_up² cancels
    to ~0; XLA's fused float32 arithmetic put it a few ulp below 0 and the jitted step returned
    NaN everywhere (diffusers rounds it to 0). The trajectory runs in a jitted lax.scan."""
    run_live(
        EulerAncestralDiscreteScheduler,
        {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"},
        7,
        name="ancestral_cosine_live",
    )


def test_ancestral_split_preserves_variance():
    r"""σ_down² + σ_up² = σ_{i+1}² (k-diffusion get_ancestral_step): with x̂₀ exact (= 0 for
    data at 0), x̃_{i+1} has std σ_{i+1}."""
    sched = EulerAncestralDiscreteScheduler(prediction_type="sample")
    state = sched.set_timesteps(5)
    x = jax.random.normal(jax.random.key(0), (20000,)) * state.sigmas[0]
    out = sched.step(state, jnp.zeros_like(x), state.timesteps[0], x, jax.random.key(1))
    assert float(jnp.std(out.prev_sample)) == pytest.approx(float(state.sigmas[1]), rel=0.02)


def test_needs_key_and_traces_once():
    sched = EulerAncestralDiscreteScheduler()
    state = sched.set_timesteps(4)
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sched.step(state, x, state.timesteps[0], x)
    traces = []

    @jax.jit
    def f(state, x, key):
        traces.append(1)
        return sched.step(state, x, state.timesteps[0], x, key).prev_sample

    a, b = f(state, x, jax.random.key(0)), f(state, x, jax.random.key(1))
    assert len(traces) == 1 and not np.allclose(a, b)


def test_bf16_model_output_keeps_fp32_arithmetic():
    sched = EulerAncestralDiscreteScheduler()
    state = sched.set_timesteps(5)
    x = jnp.linspace(-3, 3, 12, dtype=jnp.float32).reshape(1, 2, 2, 3)
    mo = (x * 0.3).astype(jnp.bfloat16)
    noise = jnp.ones_like(x)
    out = sched.step(state, mo, state.timesteps[0], x, noise=noise)
    ref = sched.step(state, mo.astype(jnp.float32), state.timesteps[0], x, noise=noise)
    assert out.prev_sample.dtype == jnp.float32
    np.testing.assert_array_equal(out.prev_sample, ref.prev_sample)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta_schedule": "quadratic"}, "beta_schedule"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EulerAncestralDiscreteScheduler(**kwargs)


@pytest.mark.parametrize("n", [0, 1001])
def test_bad_num_inference_steps(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        EulerAncestralDiscreteScheduler().set_timesteps(n)


@requires_reference
def test_from_pretrained_diffusers_config(tmp_path):
    import diffusers

    ref = diffusers.EulerAncestralDiscreteScheduler(
        beta_schedule="scaled_linear", timestep_spacing="trailing", rescale_betas_zero_snr=True
    )
    ref.save_config(tmp_path)
    sched = EulerAncestralDiscreteScheduler.from_pretrained(tmp_path)
    assert sched.config.rescale_betas_zero_snr and sched.config.timestep_spacing == "trailing"
    ref.set_timesteps(7)
    state = sched.set_timesteps(7)
    np.testing.assert_allclose(state.timesteps, ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(state.sigmas, ref.sigmas.numpy(), rtol=2e-6)
    np.testing.assert_allclose(
        float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6
    )
