"""EulerDiscreteScheduler: parity with diffusers, scan/jit behaviour, config round trips, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers.euler import EulerDiscreteScheduler, karras_sigmas
from tests.reference_io import requires_reference
from tests.schedulers._trajectory_sigma import (
    case_names,
    check_eager_matches_scan,
    check_golden,
    run_live,
)

CASES = case_names("EulerDiscreteScheduler")


def test_cases_cover_options():
    assert len(CASES) >= 12


@pytest.mark.parametrize("name", CASES)
def test_golden_trajectory(name):
    check_golden(EulerDiscreteScheduler, name)


@pytest.mark.parametrize("name", ["euler_karras", "euler_churn", "euler_log_linear"])
def test_eager_loop_matches_scan_and_reference(name):
    check_eager_matches_scan(EulerDiscreteScheduler, name)


@requires_reference
@pytest.mark.parametrize(
    ("config", "n", "step_kwargs"),
    [
        (
            {
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "timestep_spacing": "leading",
                "steps_offset": 1,
                "use_karras_sigmas": True,
            },
            13,
            {},
        ),
        ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 5, {"s_churn": 3.0}),
    ],
)
def test_live_parity(config, n, step_kwargs):
    run_live(EulerDiscreteScheduler, config, n, step_kwargs, name="euler_live")


@requires_reference
def test_live_parity_log_linear_churn():
    """Regression: diffusers' γ = min(S_churn / (len(sigmas) - 1), √2 - 1), and "log_linear"
    has N + 2 levels, so the divisor is N + 1 there (jaxdiff divided by N)."""
    run_live(
        EulerDiscreteScheduler,
        {"interpolation_type": "log_linear", "timestep_spacing": "trailing"},
        6,
        {"s_churn": 1.0},
        name="euler_log_linear_churn_live",
    )


@requires_reference
@pytest.mark.parametrize(
    ("config", "n", "step_kwargs"),
    [
        # S_churn / N with N = len(sigmas) - 1 (timesteps are negative here, N + 1 levels
        # after a Karras conversion of "log_linear", N + 1 timesteps for "trailing" at 61)
        ({"prediction_type": "v_prediction", "timestep_type": "continuous"}, 10, {"s_churn": 1.0}),
        ({"interpolation_type": "log_linear", "use_karras_sigmas": True}, 10, {"s_churn": 1.0}),
        ({"interpolation_type": "log_linear", "use_beta_sigmas": True}, 7, {"s_churn": 2.0}),
        ({"timestep_spacing": "trailing", "use_karras_sigmas": True}, 61, {"s_churn": 1.0}),
        ({"timestep_spacing": "trailing", "interpolation_type": "log_linear"}, 61, {}),
    ],
)
def test_live_parity_step_count_edge_cases(config, n, step_kwargs):
    """Regressions found by fuzzing against diffusers: the Karras/exponential/beta and
    "log_linear" levels are sized by num_inference_steps, not by the timesteps' length."""
    run_live(EulerDiscreteScheduler, config, n, step_kwargs, name="euler_edge_live")


def test_karras_sigmas_eq5():
    s = karras_sigmas(0.1, 10.0, 5, rho=7.0)
    ramp = np.linspace(0, 1, 5)
    expected = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, expected, rtol=1e-12)
    assert s[0] == pytest.approx(10.0) and s[-1] == pytest.approx(0.1)


def test_scale_model_input_and_sigma_definition():
    sched = EulerDiscreteScheduler()
    state = sched.set_timesteps(10)
    ab = sched.alphas_cumprod[999]
    # σ_0 = sqrt((1 - ᾱ)/ᾱ) at t = 999 (linspace starts at T - 1).
    assert float(state.sigmas[0]) == pytest.approx(np.sqrt((1 - ab) / ab), rel=1e-6)
    assert float(state.init_noise_sigma) == pytest.approx(float(state.sigmas[0]), rel=1e-7)
    x = jnp.ones((1, 2, 2, 3))
    y = sched.scale_model_input(state, x, state.timesteps[0])
    np.testing.assert_allclose(y, 1 / np.sqrt(float(state.sigmas[0]) ** 2 + 1), rtol=1e-6)
    # the model input is the VP sample: x̃ / sqrt(σ² + 1) = sqrt(ᾱ) x̃
    np.testing.assert_allclose(y, np.sqrt(ab), rtol=1e-5)


def test_euler_equals_ddim_at_integer_timesteps():
    r"""With ε-prediction an Euler step in x̃ = x/√ᾱ is DDIM(η=0) (Song et al. 2021, Eq. 12):
    x̃_{i+1} = x̃_i + (σ_{i+1} - σ_i) ε̂ (Karras et al. 2022, Sec. 4)."""
    sched = EulerDiscreteScheduler(timestep_spacing="leading")
    state = sched.set_timesteps(10)  # integer timesteps 900, 800, ..., 0
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
    for i in range(9):
        eps = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
        ab_s = float(sched.alphas_cumprod[int(state.timesteps[i])])
        ab_t = float(sched.alphas_cumprod[int(state.timesteps[i + 1])])
        x_s = np.sqrt(ab_s) * np.asarray(x, np.float64)
        x0 = (x_s - np.sqrt(1 - ab_s) * np.asarray(eps)) / np.sqrt(ab_s)
        x_t = np.sqrt(ab_t) * x0 + np.sqrt(1 - ab_t) * np.asarray(eps)  # DDIM, η = 0
        out = sched.step(state, eps, state.timesteps[i], x)
        np.testing.assert_allclose(out.prev_sample, x_t / np.sqrt(ab_t), rtol=1e-5, atol=1e-6)
        state, x = out.state, out.prev_sample


def test_churn_needs_key_and_traces_once():
    sched = EulerDiscreteScheduler()
    state = sched.set_timesteps(4)
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sched.step(state, x, state.timesteps[0], x, s_churn=1.0)
    # s_churn = 0 (the default) is deterministic and needs no key
    sched.step(state, x, state.timesteps[0], x)

    traces = []

    @jax.jit
    def f(state, x, key):
        traces.append(1)
        return sched.step(state, x, state.timesteps[0], x, key, s_churn=2.0).prev_sample

    a = f(state, x, jax.random.key(0))
    b = f(state, x, jax.random.key(1))
    assert len(traces) == 1
    assert not np.allclose(a, b)


def test_bf16_model_output_keeps_fp32_arithmetic():
    sched = EulerDiscreteScheduler()
    state = sched.set_timesteps(5)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 2, 2, 3)), jnp.float32) * 10
    mo = jnp.asarray(rng.standard_normal((1, 2, 2, 3)), jnp.bfloat16)
    out = sched.step(state, mo, state.timesteps[0], x)
    ref = sched.step(state, mo.astype(jnp.float32), state.timesteps[0], x)
    assert out.prev_sample.dtype == jnp.float32
    np.testing.assert_array_equal(out.prev_sample, ref.prev_sample)
    out16 = sched.step(state, mo, state.timesteps[0], x.astype(jnp.bfloat16))
    assert out16.prev_sample.dtype == jnp.bfloat16


def test_add_noise_uses_sigma_of_training_timestep():
    sched = EulerDiscreteScheduler()
    x0 = jnp.ones((2, 1, 1, 1))
    noise = jnp.full((2, 1, 1, 1), 2.0)
    t = jnp.asarray([10, 500])
    out = sched.add_noise(x0, noise, t)
    sig = np.sqrt((1 - sched.alphas_cumprod[[10, 500]]) / sched.alphas_cumprod[[10, 500]])
    np.testing.assert_allclose(np.asarray(out).ravel(), 1 + 2 * sig, rtol=1e-6)


def test_set_begin_index():
    sched = EulerDiscreteScheduler()
    state = sched.set_begin_index(sched.set_timesteps(10), 3)
    assert int(state.step_index) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta_schedule": "quadratic"}, "beta_schedule"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"interpolation_type": "cubic"}, "interpolation_type"),
        ({"final_sigmas_type": "one"}, "final_sigmas_type"),
        ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EulerDiscreteScheduler(**kwargs)


def test_custom_timesteps_and_custom_sigmas_errors():
    """As diffusers: custom timesteps cannot be combined with Karras sigmas or with continuous
    v-prediction (whose timesteps are log(σ)/4, computed from σ)."""
    with pytest.raises(ValueError, match="Karras/exponential/beta"):
        EulerDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 500])
    continuous_v = EulerDiscreteScheduler(
        prediction_type="v_prediction", timestep_type="continuous"
    )
    with pytest.raises(ValueError, match="timestep_type='continuous'.*pass sigmas"):
        continuous_v.set_timesteps(timesteps=[900, 500, 100])
    state = continuous_v.set_timesteps(sigmas=[14.0, 1.0, 0.1, 0.0])
    np.testing.assert_allclose(np.asarray(state.timesteps), 0.25 * np.log([14.0, 1.0, 0.1]))


@pytest.mark.parametrize("n", [0, 1001])
def test_bad_num_inference_steps(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        EulerDiscreteScheduler().set_timesteps(n)


@requires_reference
def test_from_pretrained_diffusers_config(tmp_path):
    import diffusers

    from jaxdiff.schedulers.dpm_solver import DPMSolverMultistepScheduler
    from jaxdiff.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler

    ref = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=True,
    )
    ref.save_config(tmp_path)
    sched = EulerDiscreteScheduler.from_pretrained(tmp_path)
    for k, v in ref.config.items():
        if not k.startswith("_"):
            assert sched.config[k] == v, k
    ref.set_timesteps(20)
    state = sched.set_timesteps(20)
    np.testing.assert_allclose(state.timesteps, ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(state.sigmas, ref.sigmas.numpy(), rtol=2e-6)
    # swapping schedulers, as in diffusers
    other = DPMSolverMultistepScheduler.from_config(sched.config)
    assert other.config.beta_schedule == "scaled_linear" and other.config.use_karras_sigmas
    back = EulerDiscreteScheduler.from_config(
        EulerAncestralDiscreteScheduler.from_config(sched.config).config
    )
    assert back.config.steps_offset == 1
    assert EulerDiscreteScheduler in sched.compatibles
