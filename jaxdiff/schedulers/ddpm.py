r"""DDPM ancestral sampling (Ho et al. 2020), as diffusers' DDPMScheduler.

Each step samples the forward-process posterior with x₀ replaced by the model's estimate
(Ho et al. 2020, Eq. 6-7), between the current timestep t and the previous inference
timestep t' (t' = t - 1 when all T steps are used):

.. math::
    q(x_{t'} \mid x_t, \hat x_0) = \mathcal N\big(\tilde\mu_t,\ \tilde\beta_t I\big), \qquad
    \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t'}}\,\beta_t}{1-\bar\alpha_t}\,\hat x_0
                + \frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t'})}{1-\bar\alpha_t}\,x_t, \qquad
    \tilde\beta_t = \frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}\,\beta_t,

where, for strided sampling, :math:`\alpha_t = \bar\alpha_t / \bar\alpha_{t'}` and
:math:`\beta_t = 1 - \alpha_t` (and ᾱ_{t'} = 1 past the end). x̂₀ comes from the model output
(ε̂, x̂₀ or v̂; ``prediction_type``), optionally clipped or dynamically thresholded.

The variance (``variance_type``):

* ``"fixed_small"``: :math:`\tilde\beta_t` (clamped at 1e-20); ``"fixed_small_log"`` the same
  through its log (Ho et al. 2020, Sec. 3.2, σ² = β̃);
* ``"fixed_large"``: :math:`\beta_t` (Sec. 3.2, σ² = β); ``"fixed_large_log"``: the same
  (diffusers returns log β here and then takes its square root, which is NaN: jaxdiff uses
  β, the evident intent);
* ``"learned"``: the model's second half of channels is σ² itself;
  ``"learned_range"``: it is v ∈ [-1, 1] interpolating the log variance,
  :math:`\log\sigma^2 = \frac{v+1}{2}\log\beta_t + \frac{1-v}{2}\log\tilde\beta_t`
  (Nichol & Dhariwal 2021, Eq. 15).

With a learned variance the model output has 2C channels, split on the last (NHWC channel)
axis into (mean prediction, variance prediction). No noise is added at t = 0, as diffusers.
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
    check_custom_timesteps,
    check_num_inference_steps,
    check_scheduled_timestep,
    check_step_inputs,
    check_timestep,
    linspace_f32,
    rescale_zero_terminal_snr,
    resolve_noise,
    spaced_timesteps,
    x0_hat_eps_hat,
)
from jaxdiff.schedulers.ddim import clip_or_threshold

VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)


@struct.dataclass
class DDPMState:
    """Sampling state of :class:`DDPMScheduler` (a valid ``lax.scan`` carry).

    Attributes:
        timesteps: (N,) int32 timesteps, high to low (diffusers' values).
        init_noise_sigma: scalar float32, std of the initial noise (1).
        step_index: scalar int32, number of ``step`` calls so far.
        alpha_bar: (T,) float32 training table ᾱ_t.
    """

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    step_index: jax.Array
    alpha_bar: jax.Array


def _sigmoid_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """diffusers' ``"sigmoid"`` schedule (GeoDiff): sigmoid(linspace(-6, 6, T)) mapped to
    [beta_start, beta_end]."""

    x = linspace_f32(-6.0, 6.0, num_train_timesteps)
    sig = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    return (sig * np.float32(beta_end - beta_start) + np.float32(beta_start)).astype(np.float32)


class DDPMScheduler(SchedulerMixin):
    r"""DDPM ancestral sampler (Ho et al. 2020, Eq. 6-7) with explicit state.

    Config fields and defaults are diffusers' ``DDPMScheduler``'s.

    Args:
        num_train_timesteps: T, the number of training steps.
        beta_start, beta_end, beta_schedule, trained_betas: the β schedule (see ``make_betas``;
            DDPM also accepts diffusers' ``"sigmoid"``).
        variance_type: see the module docstring.
        clip_sample: clip x̂₀ to [-clip_sample_range, clip_sample_range].
        prediction_type: what the model predicts: "epsilon", "sample" or "v_prediction".
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x̂₀.
        clip_sample_range: see ``clip_sample``.
        timestep_spacing: "leading", "trailing" or "linspace" (Lin et al. 2024, Table 2).
        steps_offset: added to ``"leading"`` timesteps.
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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, (*BETA_SCHEDULES, "sigmoid"))
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if trained_betas is None and beta_schedule == "sigmoid":
            self.betas = _sigmoid_betas(num_train_timesteps, beta_start, beta_end)
        else:
            self._init_schedule()
            self.betas = np.asarray(self.betas, np.float32)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = (1.0 - self.betas).astype(np.float32)
        self.alphas_cumprod = alpha_bar_from_betas(self.betas)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: Any = jnp.float32,
        *,
        timesteps: Any = None,
    ) -> DDPMState:
        """The state for N inference steps, or for custom descending integer ``timesteps``
        (as diffusers). ``shape``/``dtype`` are accepted for the common contract; DDPM keeps
        no history."""
        c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "pass exactly one of num_inference_steps or timesteps to set_timesteps"
            )
        if timesteps is not None:
            steps = check_custom_timesteps(timesteps, c.num_train_timesteps).astype(np.int64)
        else:
            n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
            steps = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset)
        return DDPMState(
            timesteps=jnp.asarray(steps, jnp.int32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
            step_index=jnp.zeros((), jnp.int32),
            alpha_bar=jnp.asarray(self.alphas_cumprod),
        )

    def set_begin_index(self, state: DDPMState, begin_index: int = 0) -> DDPMState:
        """Starts the step counter at ``begin_index`` (image-to-image). DDPM itself locates the
        step by the ``timestep`` passed to ``step``."""
        return state.replace(step_index=jnp.asarray(begin_index, jnp.int32))

    def previous_timestep(self, state: DDPMState, timestep: Any) -> jax.Array:
        """The inference timestep after ``timestep`` in ``state.timesteps`` (-1 after the last),
        looked up by value as diffusers does."""
        t = jnp.asarray(timestep, jnp.int32)
        timesteps = state.timesteps
        index = jnp.argmax(timesteps == t)  # first match, as diffusers' nonzero()[0]
        nxt = timesteps[jnp.minimum(index + 1, timesteps.shape[0] - 1)]
        return jnp.where(index == timesteps.shape[0] - 1, -1, nxt)

    def step(
        self,
        state: DDPMState,
        model_output: jax.Array,
        timestep: Any,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> SchedulerOutput:
        r"""One ancestral step :math:`x_t \to x_{t'} \sim q(x_{t'} \mid x_t, \hat x_0)`
        (Ho et al. 2020, Eq. 6-7).

        Args:
            state: from ``set_timesteps`` or the previous ``step``.
            model_output: the model's output at (``sample``, ``timestep``); with a learned
                variance, 2C channels on the last axis (mean prediction, then variance).
            timestep: the current integer timestep t (a Python int or a traced scalar);
                ``None`` takes ``state.timesteps[state.step_index]``.
            sample: the current :math:`x_t`.
            key: PRNG key for the posterior noise (required: DDPM is stochastic).
            noise: explicit ε (overrides ``key``). Unused at t = 0, where no noise is added.

        Returns:
            ``SchedulerOutput(prev_sample, state, pred_original_sample)``.
        """
        check_step_inputs(
            model_output, sample, self.config.variance_type in ("learned", "learned_range")
        )
        c = self.config
        check_timestep(timestep, c.num_train_timesteps)
        check_scheduled_timestep(timestep, state.timesteps, type(self).__name__)
        out_dtype = sample.dtype
        x_t = sample.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        if timestep is None:
            timestep = state.timesteps[state.step_index]
        t = jnp.asarray(timestep, jnp.int32)
        prev_t = self.previous_timestep(state, t)

        learned = c.variance_type in ("learned", "learned_range")
        channels = sample.shape[-1]
        if learned:
            if model_output.shape[-1] != 2 * channels:
                raise ValueError(
                    f"variance_type={c.variance_type!r} needs model_output with 2 x {channels} "
                    f"channels on the last axis (mean, variance), got shape {model_output.shape}"
                )
            model_output, predicted_variance = jnp.split(model_output, 2, axis=-1)
        elif model_output.shape != sample.shape:
            raise ValueError(
                f"model_output must have the sample's shape {sample.shape}, "
                f"got {model_output.shape}"
            )

        # 1. ᾱ_t, ᾱ_{t'} (1 past the end), and the step's α_t = ᾱ_t / ᾱ_{t'}, β_t = 1 - α_t
        alpha_bar_t = state.alpha_bar[t]
        alpha_bar_prev = jnp.where(prev_t >= 0, state.alpha_bar[jnp.maximum(prev_t, 0)], 1.0)
        beta_bar_t = 1 - alpha_bar_t
        beta_bar_prev = 1 - alpha_bar_prev
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1 - alpha_t

        # 2. x̂₀ from the model output (Eq. 15 for ε-prediction)
        x0_hat, _ = x0_hat_eps_hat(c.prediction_type, model_output, x_t, alpha_bar_t)
        # 3. clip or threshold x̂₀
        x0_hat = clip_or_threshold(x0_hat, c)

        # 4. coefficients of x̂₀ and x_t in the posterior mean μ̃_t (Eq. 7)
        x0_coeff = jnp.sqrt(alpha_bar_prev) * beta_t / beta_bar_t
        xt_coeff = jnp.sqrt(alpha_t) * beta_bar_prev / beta_bar_t
        # 5. μ̃_t(x_t, x̂₀) (Eq. 7)
        mean = x0_coeff * x0_hat + xt_coeff * x_t

        # 6. + σ_t ε, with σ_t² from variance_type; no noise at t = 0
        beta_tilde = jnp.maximum(beta_bar_prev / beta_bar_t * beta_t, 1e-20)  # β̃_t (Eq. 7)
        vt = c.variance_type
        if vt == "fixed_small":
            std = jnp.sqrt(beta_tilde)
        elif vt == "fixed_small_log":
            std = jnp.exp(0.5 * jnp.log(beta_tilde))
        elif vt in ("fixed_large", "fixed_large_log"):
            std = jnp.sqrt(beta_t)
        elif vt == "learned":
            std = jnp.sqrt(predicted_variance)
        else:  # learned_range (Nichol & Dhariwal 2021, Eq. 15)
            frac = (predicted_variance + 1) / 2
            log_variance = frac * jnp.log(beta_t) + (1 - frac) * jnp.log(beta_tilde)
            std = jnp.exp(0.5 * log_variance)
        eps = resolve_noise(key, noise, x_t, type(self).__name__)
        prev_sample = jnp.where(t > 0, mean + std * eps, mean)

        return SchedulerOutput(
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=state.step_index + 1),
            pred_original_sample=x0_hat.astype(out_dtype),
        )


__all__ = ["DDPMScheduler", "DDPMState", "VARIANCE_TYPES"]
