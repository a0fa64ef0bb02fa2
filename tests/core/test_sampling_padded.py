"""A padded scheduler state with a traced step count runs the same loop as the plain state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sampling
from jaxdiff.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from jaxdiff.schedulers.common import count_steps

SCHEDULERS = [
    (DDPMScheduler, {}),
    (DDIMScheduler, {}),
    (EulerDiscreteScheduler, {}),
    (EulerDiscreteScheduler, {"interpolation_type": "log_linear"}),  # N + 2 sigmas
    (EulerAncestralDiscreteScheduler, {}),
    (DPMSolverMultistepScheduler, {"solver_order": 2}),
    (DPMSolverMultistepScheduler, {"solver_order": 3}),  # lower_order_final with N < 15
    (PNDMScheduler, {"skip_prk_steps": True}),  # N + 1 model calls
    (PNDMScheduler, {}),  # Runge-Kutta warm-up: N + 9 model calls, N >= 4
]


def model_fn(x, t):  # a smooth toy "denoiser" that depends on t
    return jnp.tanh(x) * (1.0 + t / 1000.0)


@pytest.mark.parametrize("cls, extra", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4, 9, 20])
def test_padded_state_with_traced_count_equals_plain_scan(cls, extra, steps):
    if cls is PNDMScheduler and not extra and steps < 4:
        pytest.skip("PNDM's Runge-Kutta warm-up needs 4 steps")
    scheduler = cls(num_train_timesteps=1000, **extra)
    shape = (2, 4, 4, 3)
    x_T = jax.random.normal(jax.random.key(0), shape)
    keys = sampling.image_keys(jax.random.key(1), 2)
    state = scheduler.set_timesteps(steps, shape=shape)
    want = sampling.denoise(model_fn, scheduler, state, x_T * state.init_noise_sigma, keys)
    padded = sampling.pad_state(state, 1009)
    assert padded.timesteps.shape == (1009,)
    assert int(count_steps(padded.timesteps)) == len(state.timesteps)

    @jax.jit
    def run(st, n):
        return sampling.denoise(
            model_fn, scheduler, st, x_T * st.init_noise_sigma, keys, num_steps=n
        )

    got = run(padded, jnp.int32(len(state.timesteps)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert run._cache_size() == 1


@pytest.mark.parametrize("steps", [3, 12])
def test_padded_churn_counts_steps_with_negative_continuous_timesteps(steps):
    """Continuous-time v-prediction's timesteps are log(σ)/4, negative below σ = 1: the padding
    (NaN for float timesteps) must still leave N = count_steps for the churn's S_churn / N."""
    scheduler = EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    shape = (2, 4, 4, 3)
    x_T = jax.random.normal(jax.random.key(0), shape)
    keys = sampling.image_keys(jax.random.key(1), 2)
    kw = {"step_kwargs": {"s_churn": 1.0}}
    state = scheduler.set_timesteps(steps)
    assert float(state.timesteps[-1]) < 0
    want = sampling.denoise(model_fn, scheduler, state, x_T * state.init_noise_sigma, keys, **kw)
    padded = sampling.pad_state(state, 1000)
    assert int(count_steps(padded.timesteps)) == steps
    got = jax.jit(
        lambda st, n: sampling.denoise(
            model_fn, scheduler, st, x_T * st.init_noise_sigma, keys, num_steps=n, **kw
        )
    )(padded, jnp.int32(steps))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
