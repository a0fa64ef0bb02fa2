r"""DDIM: denoising diffusion implicit models (Song et al. 2021), as diffusers' DDIMScheduler.

From x_t at timestep t the sampler jumps to the previous inference timestep t' = t - T/N
(``prev_timestep``; ᾱ_{t'} = ``final_alpha_bar`` when t' < 0) by Song et al. (2021), Eq. 12:

.. math::
    x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0
             + \sqrt{\max(1 - \bar\alpha_{t'} - \sigma_t^2,\ 0)}\;\hat\epsilon
             + \sigma_t\,\epsilon, \qquad
    \hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon}{\sqrt{\bar\alpha_t}},

with the noise scale of Eq. 16,

.. math::
    \sigma_t(\eta) = \eta\,\sqrt{\frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}}
                      \sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_{t'}}}.

η = 0 is the deterministic DDIM sampler (a first-order solver of the probability-flow ODE);
η = 1 is ancestral DDPM sampling on the sub-sequence of timesteps. The model output may be
ε̂, x̂₀ or v̂ (``prediction_type``; see :func:`~jaxdiff.schedulers.common.x0_hat_eps_hat`).
x̂₀ may be clipped to [-r, r] (``clip_sample``) or dynamically thresholded (Saharia et al.
2022, ``thresholding``); ``use_clipped_model_output`` then re-derives ε̂ from the clipped x̂₀
(as GLIDE does).

Like diffusers, the previous timestep is always ``t - num_train_timesteps // N`` whatever the
``timestep_spacing``; ``set_alpha_to_one`` picks ᾱ beyond t = 0 (1, or ᾱ_0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.configuration import register_to_config
from jaxdiff.schedulers.common import (
    BETA_SCHEDULES,
    KARRAS_DIFFUSION_SCHEDULERS,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerMixin,
    SchedulerOutput,
    alpha_bar_from_betas,
    check_choice,
    check_num_inference_steps,
    check_step_inputs,
    check_step_option,
    check_timestep,
    rescale_zero_terminal_snr,
    resolve_noise,
    spaced_timesteps,
    threshold_sample,
    x0_hat_eps_hat,
)


@struct.dataclass
class DDIMState:
    """Sampling state of :class:`DDIMScheduler` (a valid ``lax.scan`` carry).

    Attributes:
        timesteps: (N,) int32 timesteps, high to low (diffusers' values).
        init_noise_sigma: scalar float32, std of the initial noise (1).
        step_index: scalar int32, number of ``step`` calls so far.
        alpha_bar: (T,) float32 training table ᾱ_t.
        final_alpha_bar: scalar float32 ᾱ used beyond t = 0 (1 or ᾱ_0, ``set_alpha_to_one``).
        step_ratio: scalar int32 ``num_train_timesteps // N``, the jump t -> t'.
    """

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    step_index: jax.Array
    alpha_bar: jax.Array
    final_alpha_bar: jax.Array
    step_ratio: jax.Array


def is_zero(x: Any) -> bool:
    """True for a Python (or numpy) number equal to 0; False for anything that may be traced."""
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and x == 0


def clip_or_threshold(x0_hat: jax.Array, config: Any) -> jax.Array:
    """Dynamic thresholding (Saharia et al. 2022) or clipping of x̂₀ to the config's range."""
    if config.thresholding:
        return threshold_sample(x0_hat, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        r = config.clip_sample_range
        return jnp.clip(x0_hat, -r, r)
    return x0_hat


class DDIMScheduler(SchedulerMixin):
    r"""DDIM sampler (Song et al. 2021, Eq. 12 and 16) with explicit state.

    Config fields and defaults are diffusers' ``DDIMScheduler``'s.

    Args:
        num_train_timesteps: T, the number of training steps.
        beta_start, beta_end, beta_schedule, trained_betas: the β schedule (see ``make_betas``).
        clip_sample: clip x̂₀ to [-clip_sample_range, clip_sample_range].
        set_alpha_to_one: ᾱ beyond t = 0 is 1 (else ᾱ_0).
        steps_offset: added to ``"leading"`` timesteps.
        prediction_type: what the model predicts: "epsilon", "sample" or "v_prediction".
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x̂₀.
        clip_sample_range: see ``clip_sample``.
        timestep_spacing: "leading", "trailing" or "linspace" (Lin et al. 2024, Table 2).
        rescale_betas_zero_snr: rescale β for zero terminal SNR (Lin et al. 2024, Algorithm 1).
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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self._init_schedule()
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
            self.alphas = (1.0 - self.betas).astype(np.float32)
            self.alphas_cumprod = alpha_bar_from_betas(self.betas)
        self.final_alpha_cumprod = np.float32(1.0 if set_alpha_to_one else self.alphas_cumprod[0])

    def set_timesteps(
        self,
        num_inference_steps: int,
        shape: tuple[int, ...] | None = None,
        dtype: Any = jnp.float32,
    ) -> DDIMState:
        """The state for N inference steps. ``shape``/``dtype`` are accepted for the common
        contract; DDIM keeps no history."""
        c = self.config
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
        timesteps = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset)
        return DDIMState(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
            step_index=jnp.zeros((), jnp.int32),
            alpha_bar=jnp.asarray(self.alphas_cumprod),
            final_alpha_bar=jnp.asarray(self.final_alpha_cumprod, jnp.float32),
            step_ratio=jnp.asarray(c.num_train_timesteps // n, jnp.int32),
        )

    def set_begin_index(self, state: DDIMState, begin_index: int = 0) -> DDIMState:
        """Starts the step counter at ``begin_index`` (image-to-image). DDIM itself only uses
        the ``timestep`` passed to ``step``."""
        return state.replace(step_index=jnp.asarray(begin_index, jnp.int32))

    def step(
        self,
        state: DDIMState,
        model_output: jax.Array,
        timestep: Any,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
        eta: float | jax.Array = 0.0,
        use_clipped_model_output: bool = False,
    ) -> SchedulerOutput:
        r"""One DDIM step :math:`x_t \to x_{t'}` (Song et al. 2021, Eq. 12).

        Args:
            state: from ``set_timesteps`` or the previous ``step``.
            model_output: the model's output at (``sample``, ``timestep``).
            timestep: the current integer timestep t (a Python int or a traced scalar);
                ``None`` takes ``state.timesteps[state.step_index]``.
            sample: the current :math:`x_t`.
            key: PRNG key; needed only when ``eta`` may be nonzero.
            noise: explicit ε for the σ_t ε term (overrides ``key``; diffusers' ``variance_noise``).
            eta: η of Eq. 16 (0: deterministic DDIM, 1: DDPM-like). A Python 0 needs no key.
            use_clipped_model_output: re-derive ε̂ from the clipped/thresholded x̂₀.

        Returns:
            ``SchedulerOutput(prev_sample, state, pred_original_sample)``.
        """
        check_step_inputs(model_output, sample)
        check_timestep(timestep, self.config.num_train_timesteps)
        check_step_option("eta", eta)
        c = self.config
        out_dtype = sample.dtype
        x_t = sample.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        if timestep is None:
            timestep = state.timesteps[state.step_index]
        t = jnp.asarray(timestep, jnp.int32)

        # 1. previous timestep t' = t - T // N
        prev_t = t - state.step_ratio
        # 2. ᾱ_t and ᾱ_{t'} (ᾱ_{t'} = final_alpha_bar beyond t = 0)
        alpha_bar_t = state.alpha_bar[t]
        alpha_bar_prev = jnp.where(
            prev_t >= 0, state.alpha_bar[jnp.maximum(prev_t, 0)], state.final_alpha_bar
        )
        beta_bar_t = 1 - alpha_bar_t

        # 3. "predicted x_0" of Eq. 12 (and ε̂) from the model output
        x0_hat, eps_hat = x0_hat_eps_hat(c.prediction_type, model_output, x_t, alpha_bar_t)
        # 4. clip or threshold x̂₀
        x0_hat = clip_or_threshold(x0_hat, c)

        # 5. σ_t(η) of Eq. 16
        variance = ((1 - alpha_bar_prev) / beta_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        std_dev_t = eta * jnp.sqrt(variance)

        if use_clipped_model_output:
            # ε̂ re-derived from the clipped x̂₀ (GLIDE)
            eps_hat = (x_t - jnp.sqrt(alpha_bar_t) * x0_hat) / jnp.sqrt(beta_bar_t)

        # 6. "direction pointing to x_t" of Eq. 12. With η = 1 and ᾱ_t = 0 (zero terminal SNR)
        # σ_t² = 1 - ᾱ_{t'} and the radicand cancels to ~0; XLA's fused float32 arithmetic can
        # land it a few ulp below 0 (NaN), so it is clamped at 0.
        direction = jnp.sqrt(jnp.maximum(1 - alpha_bar_prev - std_dev_t**2, 0.0)) * eps_hat
        # 7. x_{t'} without the random noise of Eq. 12
        prev_sample = jnp.sqrt(alpha_bar_prev) * x0_hat + direction
        if not is_zero(eta):
            # 8. + σ_t ε, the "random noise" of Eq. 12 (only when η > 0, as diffusers)
            eps = resolve_noise(key, noise, x_t, type(self).__name__)
            prev_sample = jnp.where(
                jnp.asarray(eta) > 0, prev_sample + std_dev_t * eps, prev_sample
            )

        return SchedulerOutput(
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=state.step_index + 1),
            pred_original_sample=x0_hat.astype(out_dtype),
        )

    def previous_timestep(self, state: DDIMState, timestep: Any) -> jax.Array:
        """t' = t - T // N, the timestep ``step`` jumps to (negative past the end)."""
        return jnp.asarray(timestep, jnp.int32) - state.step_ratio


__all__ = ["DDIMScheduler", "DDIMState"]
