r"""Ancestral Euler sampler in σ-space (k-diffusion's ``sample_euler_ancestral``), as diffusers'
EulerAncestralDiscreteScheduler.

Same σ-space variable as :mod:`jaxdiff.schedulers.euler`:
:math:`\tilde x = x_0 + \sigma\epsilon`, :math:`\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}`
(Karras et al. 2022, Table 1). Each step from :math:`\sigma_i` to :math:`\sigma_{i+1}` is split
into a deterministic Euler step down to :math:`\sigma_{down}` and fresh noise of std
:math:`\sigma_{up}`, chosen so that the marginal variance is the one of DDPM's ancestral step
(Ho et al. 2020, Eq. 6-7, with η = 1 of Song et al. 2021a, Eq. 16) -- k-diffusion's
``get_ancestral_step``:

.. math::
    \sigma_{up} = \sqrt{\frac{\sigma_{i+1}^2 (\sigma_i^2 - \sigma_{i+1}^2)}{\sigma_i^2}},
    \qquad \sigma_{down} = \sqrt{\max(\sigma_{i+1}^2 - \sigma_{up}^2,\ 0)},

.. math::
    \tilde x_{i+1} = \tilde x_i + (\sigma_{down} - \sigma_i)\,
    \frac{\tilde x_i - \hat x_0}{\sigma_i} + \sigma_{up}\,\epsilon,
    \qquad \epsilon\sim\mathcal N(0, I).

The step is stochastic and requires a PRNG key (or explicit ``noise=``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.configuration import register_to_config
from jaxdiff.schedulers.common import (
    KARRAS_DIFFUSION_SCHEDULERS,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerMixin,
    SchedulerOutput,
    check_choice,
    check_num_inference_steps,
    check_step_index,
    check_step_inputs,
    resolve_noise,
)
from jaxdiff.schedulers.euler import (
    float_spaced_timesteps,
    init_noise_sigma_of,
    sigma_add_noise,
    sigma_add_noise_at_step,
    sigma_schedule_tables,
)


@struct.dataclass
class EulerAncestralState:
    """Sampling state of :class:`EulerAncestralDiscreteScheduler` (a valid ``lax.scan`` carry).

    Attributes:
        timesteps: (N,) float32 timesteps, high to low (diffusers' values).
        sigmas: (N+1,) float32 noise levels, the last one 0.
        init_noise_sigma: scalar float32, std of the initial noise.
        step_index: scalar int32, index of the current σ; advanced by ``step``.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    step_index: jax.Array


class EulerAncestralDiscreteScheduler(SchedulerMixin):
    r"""Ancestral Euler sampling in σ-space (k-diffusion ``sample_euler_ancestral``; Karras et
    al. 2022, Algorithm 2 with the ancestral noise split of Ho et al. 2020, Eq. 6-7).

    Config fields and defaults are diffusers' ``EulerAncestralDiscreteScheduler``'s.
    ``prediction_type="sample"`` (x̂₀ = model output), which diffusers leaves unimplemented,
    is supported.
    """

    _compatibles = KARRAS_DIFFUSION_SCHEDULERS
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas, self.alphas_cumprod, self.train_sigmas = sigma_schedule_tables(self.config)
        self.alphas = (1.0 - self.betas).astype(np.float32)

    def set_timesteps(
        self,
        num_inference_steps: int,
        shape: tuple[int, ...] | None = None,
        dtype: Any = jnp.float32,
    ) -> EulerAncestralState:
        """Timesteps for ``timestep_spacing`` and σ interpolated linearly in t, then 0.
        ``shape``/``dtype`` are accepted for the common contract (no history is kept)."""
        c = self.config
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
        timesteps = float_spaced_timesteps(c, n)
        sig = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        sig = np.concatenate([sig, [0.0]]).astype(np.float32)
        return EulerAncestralState(
            timesteps=jnp.asarray(timesteps),
            sigmas=jnp.asarray(sig),
            init_noise_sigma=jnp.asarray(init_noise_sigma_of(sig, c.timestep_spacing)),
            step_index=jnp.zeros((), jnp.int32),
        )

    def set_begin_index(
        self, state: EulerAncestralState, begin_index: int = 0
    ) -> EulerAncestralState:
        """Starts sampling at step ``begin_index`` (image-to-image: skip the first steps)."""
        return state.replace(step_index=jnp.asarray(begin_index, jnp.int32))

    def scale_model_input(
        self, state: EulerAncestralState, sample: jax.Array, timestep: Any = None
    ) -> jax.Array:
        r"""The model's input :math:`x_t = \tilde x / \sqrt{\sigma_i^2 + 1}` at the current step."""
        sigma = state.sigmas[state.step_index]
        return (sample / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)

    def step(
        self,
        state: EulerAncestralState,
        model_output: jax.Array,
        timestep: Any,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> SchedulerOutput:
        r"""One ancestral Euler step :math:`\sigma_i \to \sigma_{i+1}` (stochastic: needs ``key``
        or ``noise``). ``timestep`` is unused: the step is located by ``state.step_index``."""
        check_step_inputs(model_output, sample)
        check_step_index(state, type(self).__name__)
        out_dtype = sample.dtype
        x = sample.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        eps = resolve_noise(key, noise, x, type(self).__name__)
        i = state.step_index
        sigma_from, sigma_to = state.sigmas[i], state.sigmas[i + 1]

        pt = self.config.prediction_type
        if pt == "epsilon":
            x0_hat = x - sigma_from * model_output  # x̃ = x₀ + σ ε
        elif pt == "v_prediction":  # Salimans & Ho 2022, in σ-space
            x0_hat = model_output * (-sigma_from / jnp.sqrt(sigma_from**2 + 1)) + x / (
                sigma_from**2 + 1
            )
        else:
            x0_hat = model_output

        # k-diffusion get_ancestral_step: split σ_{i+1}² into σ_down² + σ_up².
        sigma_up = jnp.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
        # σ_down² = σ_{i+1}² - σ_up² (= σ_{i+1}⁴ / σ_i² exactly) cancels to ~0 when σ_i ≫ σ_{i+1}
        # (cosine schedule, σ_0 ~ 2e4): diffusers' float32 rounds it to 0, but XLA may contract
        # it into an FMA that lands a few ulp below 0, so clamp before the square root.
        sigma_down = jnp.sqrt(jnp.maximum(sigma_to**2 - sigma_up**2, 0.0))
        d = (x - x0_hat) / sigma_from  # Karras Eq. 4: dx̃/dσ = (x̃ - x̂₀) / σ
        prev_sample = x + d * (sigma_down - sigma_from)  # Euler step to σ_down
        prev_sample = prev_sample + eps * sigma_up  # ancestral noise back up to σ_{i+1}

        return SchedulerOutput(
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=i + 1),
            pred_original_sample=x0_hat,
        )

    def add_noise(
        self,
        original_samples: jax.Array,
        noise: jax.Array,
        timesteps: jax.Array,
        state: EulerAncestralState | None = None,
    ) -> jax.Array:
        r""":math:`\tilde x = x_0 + \sigma\,\epsilon` at ``timesteps``: σ(t) of the training
        table, or with ``state`` the σ of that step of the schedule (see
        :func:`jaxdiff.schedulers.euler.sigma_add_noise`)."""
        return sigma_add_noise(self.train_sigmas, original_samples, noise, timesteps, state)

    def add_noise_at_step(
        self,
        state: EulerAncestralState,
        original_samples: jax.Array,
        noise: jax.Array,
        step_index: Any,
    ) -> jax.Array:
        r""":math:`\tilde x = x_0 + \sigma_i\,\epsilon` at inference step ``step_index``."""
        return sigma_add_noise_at_step(state, original_samples, noise, step_index)
