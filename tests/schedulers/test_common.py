"""Shared scheduler math: ε / x̂₀ / v conversions, β and ᾱ tables, the forward process."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers.common import make_betas, x0_hat_eps_hat
from tests.reference_io import requires_reference


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_x0_hat_eps_hat_round_trip(prediction_type):
    """x_t = sqrt(ᾱ) x₀ + sqrt(1-ᾱ) ε (Ho et al. 2020, Eq. 4); each parametrisation of the
    model output (ε, x₀, or v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x₀) gives back both x₀ and ε."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    a = np.array([0.9, 0.5, 0.05], np.float32)  # one ᾱ per example
    ab = a[:, None, None, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    output = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0,
    }[prediction_type]
    x0_hat, eps_hat = x0_hat_eps_hat(
        prediction_type, jnp.asarray(output), jnp.asarray(x_t), jnp.asarray(a)
    )
    # float32 round trip; ᾱ = 0.05 divides by sqrt(ᾱ) ~ 0.22: 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(x0_hat), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(eps_hat), eps, rtol=1e-5, atol=1e-5)


def test_x0_hat_eps_hat_rejects_unknown_prediction_type():
    x = jnp.ones((1, 2))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        x0_hat_eps_hat("score", x, x, jnp.asarray(0.5))


@requires_reference
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize(
    ("num_train_timesteps", "beta_start", "beta_end"),
    [(1000, 0.0001, 0.02), (1000, 0.00085, 0.012), (37, 0.001, 0.03), (1234, 0.0001, 0.02)],
)
def test_betas_and_alpha_bar_match_diffusers(
    beta_schedule, num_train_timesteps, beta_start, beta_end
):
    from diffusers import DDIMScheduler as TorchDDIM

    from jaxdiff.schedulers.ddim import DDIMScheduler

    kw = dict(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
    )
    ref = TorchDDIM(**kw)
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    # linspace_f32 emulates torch.linspace's fused float32 arithmetic and ᾱ is accumulated in
    # float64 like torch.cumprod: equal in practice; 1e-6 relative is the contract.
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(
        DDIMScheduler(**kw).alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0
    )


@requires_reference
@pytest.mark.parametrize(
    "config",
    [
        {"trained_betas": [0.001 * (i + 1) for i in range(50)], "num_train_timesteps": 50},
        {"rescale_betas_zero_snr": True},
        {"rescale_betas_zero_snr": True, "beta_schedule": "scaled_linear"},
        {"beta_schedule": "sigmoid"},
    ],
)
def test_special_schedules_match_diffusers(config):
    from diffusers import DDIMScheduler as TorchDDIM
    from diffusers import DDPMScheduler as TorchDDPM

    from jaxdiff.schedulers.ddim import DDIMScheduler
    from jaxdiff.schedulers.ddpm import DDPMScheduler

    pairs = [(DDPMScheduler, TorchDDPM)]
    if config.get("beta_schedule") != "sigmoid":  # only DDPM has the sigmoid schedule
        pairs.append((DDIMScheduler, TorchDDIM))
    # PyTorch's vectorised float32 sqrt is not always correctly rounded (1 ulp off on ~1% of
    # entries here), and the rescaled β_t = 1 - ᾱ_t / ᾱ_{t-1} cancels ~4 digits: 1e-4 relative
    # on β after rescaling; ᾱ itself stays within 1e-6.
    beta_rtol = 1e-4 if config.get("rescale_betas_zero_snr") else 1e-6
    for ours, theirs in pairs:
        a, b = ours(**config), theirs(**config)
        # betas = 1 - ᾱ_t / ᾱ_{t-1} in float32 carry a few ulp(1) ~ 6e-8 of absolute rounding
        np.testing.assert_allclose(a.betas, b.betas.numpy(), rtol=beta_rtol, atol=5e-7)
        # zero terminal SNR: ᾱ_T is 0 (to ~1e-9) on both sides.
        np.testing.assert_allclose(a.alphas_cumprod, b.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-9)


@requires_reference
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler"])
def test_add_noise_and_get_velocity_match_diffusers(name):
    import diffusers
    import torch

    import jaxdiff.schedulers as ours

    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ref, sched = getattr(diffusers, name)(**config), getattr(ours, name)(**config)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    expected = ref.add_noise(to_t(x0), to_t(eps), torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
    actual = sched.add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t))
    # float32 on both sides: a couple of ulp.
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-6, atol=1e-6)
    if hasattr(ref, "get_velocity"):
        expected = ref.get_velocity(to_t(x0), to_t(eps), torch.from_numpy(t)).numpy()
        actual = sched.get_velocity(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t))
        np.testing.assert_allclose(
            np.asarray(actual), expected.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6
        )


@requires_reference
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spaced_timesteps_match_diffusers(spacing):
    from diffusers import DDIMScheduler as TorchDDIM

    from jaxdiff.schedulers.common import spaced_timesteps

    for t_max, n, offset in [(1000, 10, 0), (1000, 333, 1), (1000, 7, 1), (37, 37, 0), (100, 1, 0)]:
        ref = TorchDDIM(num_train_timesteps=t_max, timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(
            spaced_timesteps(spacing, t_max, n, offset), ref.timesteps.numpy()
        )


ALL_SCHEDULERS = [
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]


@pytest.mark.parametrize("name", ALL_SCHEDULERS)
def test_wrong_shapes_are_named(name):
    from jaxdiff import schedulers

    sched = getattr(schedulers, name)()
    shape = (2, 4, 4, 3)
    state = sched.set_timesteps(5, shape=shape)
    x = jnp.ones(shape)
    t = state.timesteps[0]
    with pytest.raises(
        ValueError, match=r"model_output must have the sample's shape \(2, 4, 4, 3\)"
    ):
        sched.step(state, jnp.ones((2, 4, 4)), t, x, noise=x)
    with pytest.raises(ValueError, match="sample must be an array with a batch axis"):
        sched.step(state, jnp.ones(()), t, jnp.ones(()), noise=jnp.ones(()))
    if name in ("PNDMScheduler", "DPMSolverMultistepScheduler"):
        y = jnp.ones((1, 4, 4, 3))
        with pytest.raises(ValueError, match=r"the state was made for \(2, 4, 4, 3\)"):
            sched.step(state, y, t, y)


def test_schedule_index_follows_diffusers_index_for_timestep():
    """diffusers' ``index_for_timestep``: the second match when a timestep repeats, else the
    first; jaxdiff marks a timestep not in the schedule with -1 (diffusers raises IndexError)."""
    from jaxdiff.schedulers.common import schedule_index

    schedule = jnp.asarray([999.0, 500.0, 500.0, 20.0, 3.0])
    index = schedule_index(schedule, jnp.asarray([999, 500, 20, 3, 7]))
    np.testing.assert_array_equal(np.asarray(index), [0, 2, 3, 4, -1])
    assert int(schedule_index(schedule, 20.0)) == 3


SIGMA_ADD_NOISE_CASES = [
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
    ("EulerDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True, "timestep_spacing": "trailing"}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    (
        "DPMSolverMultistepScheduler",
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
]


@requires_reference
@pytest.mark.parametrize("name,config", SIGMA_ADD_NOISE_CASES)
def test_add_noise_with_state_matches_diffusers_after_set_timesteps(name, config):
    """After ``set_timesteps``, diffusers' σ schedulers look each timestep up in the inference
    schedule (``index_for_timestep``) and take that step's σ; ``add_noise(..., state=)`` does
    the same, jitted. ``add_noise_at_step`` is the ``set_begin_index`` variant the pipelines
    use."""
    import diffusers
    import jax
    import torch

    import jaxdiff.schedulers as ours

    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **config}
    ref, sched = getattr(diffusers, name)(**config), getattr(ours, name)(**config)
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    # Before set_timesteps: the training table. (diffusers' DPM-Solver pairs its descending
    # training timesteps with ascending σ there, so t = 999 gets σ(0): not compared.)
    if name.startswith("Euler"):
        t = ref.timesteps[[0, 10, 500, 999]]
        expected = ref.add_noise(to_t(x0), to_t(eps), t).numpy().transpose(0, 2, 3, 1)
        actual = sched.add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t.numpy()))
        np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5)
    n = 12
    ref.set_timesteps(n)
    state = sched.set_timesteps(n)
    np.testing.assert_allclose(np.asarray(state.timesteps), ref.timesteps.numpy(), 1e-6, 1e-7)
    t = ref.timesteps[[0, 3, 7, n - 1]]
    expected = ref.add_noise(to_t(x0), to_t(eps), t).numpy().transpose(0, 2, 3, 1)
    add = jax.jit(lambda x, e, t, s: sched.add_noise(x, e, t, state=s))
    actual = add(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t.numpy()), state)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5)
    # Without the state, DPM-Solver uses ᾱ of the (rounded) training timestep: about 1.5e-4
    # off for Karras/Lu σ (measured), and a different process for flow σ. Euler's fractional
    # timesteps give back their σ to ~1e-6 either way.
    if name.startswith("DPM") and config.keys() & {
        "use_karras_sigmas",
        "use_lu_lambdas",
        "use_flow_sigmas",
    }:
        stateless = sched.add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t.numpy()))
        assert np.abs(np.asarray(stateless) - expected).max() > 1e-4 * np.abs(expected).max()

    ref.set_begin_index(5)
    t5 = ref.timesteps[[5] * 4]
    expected = ref.add_noise(to_t(x0), to_t(eps), t5).numpy().transpose(0, 2, 3, 1)
    actual = sched.add_noise_at_step(state, jnp.asarray(x0), jnp.asarray(eps), 5)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler"])
def test_add_noise_state_is_optional_for_alpha_bar_schedulers(name):
    """ᾱ schedulers index ᾱ by the timestep itself: ``state=`` changes nothing, and
    ``add_noise_at_step`` is ``add_noise`` at that step's timestep."""
    import jaxdiff.schedulers as ours

    sched = getattr(ours, name)()
    state = sched.set_timesteps(10)
    x0, eps = jnp.ones((2, 2, 2, 1)), jnp.full((2, 2, 2, 1), 0.5)
    t = jnp.asarray([state.timesteps[2]] * 2)
    plain = sched.add_noise(x0, eps, t)
    np.testing.assert_array_equal(sched.add_noise(x0, eps, t, state=state), plain)
    np.testing.assert_array_equal(sched.add_noise_at_step(state, x0, eps, 2), plain)


@pytest.mark.parametrize("name", ALL_SCHEDULERS)
def test_bad_step_and_forward_inputs_are_named(name):
    """Host-known bad values raise instead of being clamped by XLA into a wrong (or NaN) x."""
    import jax

    from jaxdiff import schedulers

    sched = getattr(schedulers, name)()
    x = jnp.ones((1, 4, 4, 3))
    state = sched.set_timesteps(5, shape=x.shape)
    t = state.timesteps[0]
    with pytest.raises(ValueError, match=r"noise must have the shape of original_samples"):
        sched.add_noise(x, jnp.ones((1, 2, 2, 3)), jnp.array([1]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, num_train_timesteps=1000\)"):
        sched.add_noise(x, x, jnp.array([5000]))
    if hasattr(sched, "alphas_cumprod") and name not in ("EulerDiscreteScheduler",):
        with pytest.raises(ValueError, match="timesteps must lie in"):
            sched.get_velocity(x, x, np.array([-1]))
    if name in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler"):  # t indexes the ᾱ table
        for bad in (5000, -5):
            with pytest.raises(ValueError, match=r"timestep must lie in \[0, num_train_timesteps"):
                sched.step(state, x, bad, x, key=jax.random.key(0))
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"):  # fmt: skip
        done = state.replace(step_index=jnp.int32(5))
        with pytest.raises(
            ValueError, match=r"called at step_index=5, but the state holds 5 steps"
        ):
            sched.step(done, x, t, x, key=jax.random.key(0))
    if name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler"):  # stochastic
        with pytest.raises(TypeError, match="key must be a PRNG key"):
            sched.step(state, x, t, x, key=3)
        with pytest.raises(ValueError, match="noise must have the sample's shape"):
            sched.step(state, x, t, x, noise=jnp.ones((2, 2)))
        sched.step(state, x, t, x, key=jax.random.PRNGKey(0))  # legacy keys still work


def test_bad_step_options_are_named():
    import jax

    from jaxdiff.schedulers import DDIMScheduler, EulerDiscreteScheduler

    x = jnp.ones((1, 4, 4, 3))
    ddim = DDIMScheduler()
    state = ddim.set_timesteps(5)
    for eta in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            ddim.step(state, x, state.timesteps[0], x, key=jax.random.key(0), eta=eta)
    with pytest.raises(TypeError, match="eta must be a number"):
        ddim.step(state, x, state.timesteps[0], x, eta="a")
    euler = EulerDiscreteScheduler()
    state = euler.set_timesteps(5)
    with pytest.raises(ValueError, match="s_churn must be >= 0"):
        euler.step(state, x, state.timesteps[0], x, key=jax.random.key(0), s_churn=float("nan"))


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])  # fmt: skip
def test_bad_custom_timesteps_are_named(name):
    from jaxdiff import schedulers

    sched = getattr(schedulers, name)()
    with pytest.raises(ValueError, match="timesteps must be in descending order"):
        sched.set_timesteps(timesteps=[1, 5, 9])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, num_train_timesteps=1000\)"):
        sched.set_timesteps(timesteps=[5000, 10])
    with pytest.raises(ValueError, match="timesteps must lie in"):
        sched.set_timesteps(timesteps=[10, -5])
    with pytest.raises(ValueError, match="timesteps must be a non-empty 1-D list"):
        sched.set_timesteps(timesteps=[])


def test_bad_custom_sigmas_are_named():
    from jaxdiff.schedulers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler()
    for sigmas in ([], [1.0], [[1.0, 0.0]]):
        with pytest.raises(ValueError, match="sigmas must be a 1-D list of N \\+ 1 >= 2"):
            euler.set_timesteps(sigmas=sigmas)
    for sigmas in ([float("nan"), 0.0], [1.0, -1.0, 0.0]):
        with pytest.raises(ValueError, match="sigmas must be finite and >= 0"):
            euler.set_timesteps(sigmas=sigmas)


@pytest.mark.parametrize("name", ALL_SCHEDULERS)
def test_betas_outside_0_1_and_negative_offsets_are_named(name):
    from jaxdiff import schedulers

    cls = getattr(schedulers, name)
    for kw in (dict(beta_end=2.0), dict(beta_start=-0.1), dict(beta_end=float("nan"))):
        with pytest.raises(ValueError, match=r"beta_start/beta_end must give betas in \[0, 1\)"):
            cls(**kw)
    with pytest.raises(ValueError, match=r"trained_betas must give betas in \[0, 1\)"):
        cls(trained_betas=[2.0] * 1000)
    if name != "DPMSolverMultistepScheduler":  # its "leading" timesteps never reach t = 0
        with pytest.raises(ValueError, match="steps_offset=-1 pushes timestep -1 below 0"):
            cls(steps_offset=-1, timestep_spacing="leading").set_timesteps(4)
    with pytest.raises(ValueError, match=r"steps_offset=2000 pushes timestep \d+ past num_train"):
        cls(steps_offset=2000, timestep_spacing="leading").set_timesteps(4)
    cls(steps_offset=1, timestep_spacing="leading").set_timesteps(4)  # Stable Diffusion's
