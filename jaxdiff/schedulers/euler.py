r"""Euler sampler in σ-space (Karras et al. 2022, Algorithm 2), as diffusers'
EulerDiscreteScheduler.

A discrete-time model trained on
:math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon`
is also a model of the variance-exploding variable
:math:`\tilde x = x_t / \sqrt{\bar\alpha_t} = x_0 + \sigma_t \epsilon` with

.. math:: \sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}
    \qquad \text{(Karras et al. 2022, Table 1, "VP" column; Song et al. 2021, Eq. 30).}

The probability-flow ODE in that variable is (Karras et al. 2022, Eq. 4 with :math:`s(t)=1`)

.. math:: \frac{d\tilde x}{d\sigma} = \frac{\tilde x - \hat x_0(\tilde x; \sigma)}{\sigma},

and the sampler takes Euler steps along it between consecutive noise levels
:math:`\sigma_i \to \sigma_{i+1}`. The network sees :math:`x_t = \tilde x / \sqrt{\sigma^2+1}`
(``scale_model_input``). With ``s_churn > 0`` each step first raises the noise level to
:math:`\hat\sigma = \sigma (1+\gamma)`, :math:`\gamma = \min(S_{churn}/N, \sqrt2 - 1)` when
:math:`S_{tmin} \le \sigma \le S_{tmax}`, by adding fresh noise
:math:`\sqrt{\hat\sigma^2 - \sigma^2}\,S_{noise}\,\epsilon` (Algorithm 2, lines 4-6).

Noise levels (``set_timesteps``):

* ``timestep_spacing`` picks N timesteps in [0, T-1] (Lin et al. 2024, Table 2), and σ is
  interpolated linearly in t from the training table (``interpolation_type="linear"``), or taken
  geometrically between σ_max and σ_min (``"log_linear"``, as diffusers: N + 1 levels);
* ``use_karras_sigmas``: :math:`\sigma_i = (\sigma_{max}^{1/\rho} + \frac{i}{N-1}
  (\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho}))^\rho`, ρ = 7 (Karras et al. 2022, Eq. 5),
  timesteps mapped back by interpolating :math:`\log\sigma` in the training table;
  ``use_exponential_sigmas`` (geometric) and ``use_beta_sigmas`` (Lee et al. 2024) likewise;
* the last level is 0 (``final_sigmas_type="zero"``) or σ of t = 0 (``"sigma_min"``).

The helpers here (:func:`sigma_to_t`, :func:`karras_sigmas`, :func:`sigma_schedule_tables`,
...) are shared with the ancestral Euler and DPM-Solver schedulers. Schedules are computed in
numpy with diffusers' dtypes (float32 tables, float64 interpolation) so they match it to
float32 rounding.
"""

from __future__ import annotations

import math
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
    alpha_bar_from_betas,
    bcast,
    check_choice,
    check_custom_sigmas,
    check_custom_timesteps,
    check_forward_inputs,
    check_num_inference_steps,
    check_step_index,
    check_step_inputs,
    check_step_option,
    check_timestep_range,
    count_steps,
    make_betas,
    rescale_zero_terminal_snr,
    resolve_noise,
    schedule_index,
)

# ----------------------------------------------------------------------------------------------
# σ-schedule helpers shared by the σ-space schedulers (Euler, Euler ancestral, DPM-Solver).
# ----------------------------------------------------------------------------------------------


def sigma_schedule_tables(config: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""(β, ᾱ, σ) float32 tables over the T training steps, σ = √((1-ᾱ)/ᾱ) (Karras Table 1).

    Applies ``rescale_betas_zero_snr`` where the config has it (ᾱ_T is then set to 2⁻²⁴ so
    that σ_T stays finite, as diffusers does)."""
    betas = make_betas(
        config.beta_schedule,
        config.num_train_timesteps,
        config.beta_start,
        config.beta_end,
        config.trained_betas,
    )
    rescale = config.get("rescale_betas_zero_snr", False)
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = alpha_bar_from_betas(betas)
    if rescale:
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = 2.0**-24
    sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float32)
    return betas, alphas_cumprod, sigmas


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    r"""The (fractional) training timestep of noise level σ: linear interpolation of
    :math:`\log\sigma` in the ascending table ``log_sigmas`` (k-diffusion's ``sigma_to_t``)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def sigmas_to_timesteps(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """:func:`sigma_to_t` of each noise level (float64)."""
    return np.array([sigma_to_t(s, log_sigmas) for s in np.asarray(sigmas)])


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    r"""Karras et al. (2022), Eq. 5: :math:`\sigma_i = \big(\sigma_{max}^{1/\rho} + \tfrac{i}{n-1}
    (\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho})\big)^\rho`, i = 0..n-1 (float64)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    r"""Geometric noise levels
    :math:`\exp(\mathrm{linspace}(\log\sigma_{max}, \log\sigma_{min}, n))`."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(
    sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    r"""Noise levels at the quantiles of a Beta(α, β) distribution (Lee et al. 2024, Eq. 4):
    :math:`\sigma_i = \sigma_{min} + F^{-1}_{Beta}(1 - \tfrac{i}{n-1})
    (\sigma_{max} - \sigma_{min})`."""
    import scipy.stats  # a dependency of jax itself

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def check_sigma_options(config: Any) -> None:
    """At most one of the Karras / exponential / beta noise-level options may be set."""
    used = [
        k
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        if config.get(k, False)
    ]
    if len(used) > 1:
        raise ValueError(f"only one of {used} can be True")


def convert_sigmas(config: Any, in_sigmas: np.ndarray, n: int) -> np.ndarray | None:
    """The Karras / exponential / beta noise levels between ``in_sigmas``' ends (or the config's
    ``sigma_min`` / ``sigma_max`` where it has them); None when no option is set."""
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    sigma_max = sigma_max if sigma_max is not None else float(in_sigmas[0])
    if config.get("use_karras_sigmas", False):
        return karras_sigmas(sigma_min, sigma_max, n)
    if config.get("use_exponential_sigmas", False):
        return exponential_sigmas(sigma_min, sigma_max, n)
    if config.get("use_beta_sigmas", False):
        return beta_sigmas(sigma_min, sigma_max, n)
    return None


def float_spaced_timesteps(config: Any, n: int) -> np.ndarray:
    """N float32 timesteps, high to low, for ``timestep_spacing`` (Lin et al. 2024, Table 2);
    ``steps_offset`` shifts the "leading" spacing as in Stable Diffusion."""
    T = config.num_train_timesteps
    spacing = config.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        step_ratio = T // n
        t = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
        t = t + np.float32(config.steps_offset)
        check_timestep_range(t, T, config.steps_offset)  # σ(t) would be clamped silently
        return t
    if spacing == "trailing":
        step_ratio = T / n
        t = np.arange(T, 0, -step_ratio).round().copy().astype(np.float32)
        return t - np.float32(1)
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def init_noise_sigma_of(sigmas: np.ndarray, timestep_spacing: str) -> np.float32:
    r"""Std of the initial noise as diffusers computes it: σ_max for "linspace"/"trailing",
    :math:`\sqrt{\sigma_{max}^2 + 1}` for "leading" (whose first timestep is below T-1)."""
    max_sigma = np.float32(np.max(sigmas))
    if timestep_spacing in ("linspace", "trailing"):
        return max_sigma
    return np.float32((max_sigma**2 + 1) ** 0.5)


def sigma_add_noise(
    train_sigmas: np.ndarray,
    original_samples: jax.Array,
    noise: jax.Array,
    timesteps: jax.Array,
    state: Any = None,
) -> jax.Array:
    r""":math:`\tilde x = x_0 + \sigma(t)\,\epsilon` (the VE variable, Karras Table 1), one
    ``timesteps`` entry per example.

    Without ``state``, σ(t) is linearly interpolated in the training table at the (possibly
    fractional) training timestep, so it does not depend on ``set_timesteps`` (diffusers'
    ``add_noise`` before ``set_timesteps``, and after it for a linearly interpolated schedule).
    With ``state``, a timestep found in ``state.timesteps`` takes that step's σ (diffusers'
    ``add_noise`` after ``set_timesteps``: Karras, exponential or beta σ differ from σ(t));
    one not found keeps σ(t)."""
    check_forward_inputs(original_samples, noise, timesteps, len(train_sigmas))
    table = jnp.asarray(train_sigmas)
    t = jnp.asarray(timesteps, jnp.float32)
    sigma = jnp.interp(t, jnp.arange(table.shape[0], dtype=jnp.float32), table)
    if state is not None:
        index = schedule_index(state.timesteps, t)
        sigma = jnp.where(index >= 0, state.sigmas[jnp.maximum(index, 0)], sigma)
    return original_samples + noise * bcast(sigma, original_samples).astype(original_samples.dtype)


def sigma_add_noise_at_step(
    state: Any, original_samples: jax.Array, noise: jax.Array, step_index: Any
) -> jax.Array:
    r""":math:`\tilde x = x_0 + \sigma_i\,\epsilon` at inference step ``i = step_index``."""
    sigma = bcast(state.sigmas[step_index], original_samples).astype(original_samples.dtype)
    return original_samples + sigma * noise


# ----------------------------------------------------------------------------------------------
# The scheduler.
# ----------------------------------------------------------------------------------------------


@struct.dataclass
class EulerState:
    """Sampling state of :class:`EulerDiscreteScheduler` (a valid ``lax.scan`` carry).

    Attributes:
        timesteps: (N,) float32 timesteps to feed the model, high to low (diffusers' values).
        sigmas: (N+1,) float32 noise levels σ_0 > ... > σ_N (σ_N = 0 or σ_min); N+2 levels for
            ``interpolation_type="log_linear"``, as in diffusers.
        init_noise_sigma: scalar float32, std of the initial noise.
        step_index: scalar int32, index i of the current σ_i; advanced by ``step``.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    step_index: jax.Array


class EulerDiscreteScheduler(SchedulerMixin):
    r"""Euler sampler of the probability-flow ODE in σ-space (Karras et al. 2022, Algorithm 2).

    Config fields and defaults are diffusers' ``EulerDiscreteScheduler``'s.

    Args:
        num_train_timesteps: T, the number of training steps.
        beta_start, beta_end, beta_schedule, trained_betas: the β schedule (see ``make_betas``).
        prediction_type: what the model predicts: "epsilon", "sample" or "v_prediction".
        interpolation_type: "linear" (σ interpolated in t) or "log_linear".
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: noise-level spacing.
        sigma_min, sigma_max: ends of those spacings (default: ends of the interpolated σ).
        timestep_spacing: "linspace", "leading" or "trailing".
        timestep_type: "discrete", or "continuous" (with v-prediction: t = log(σ)/4).
        steps_offset: added to "leading" timesteps.
        rescale_betas_zero_snr: rescale β for zero terminal SNR (Lin et al. 2024).
        final_sigmas_type: last noise level "zero" or "sigma_min".
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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        check_choice("prediction_type", prediction_type, (*PREDICTION_TYPES, "original_sample"))
        check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_sigma_options(self.config)
        self.betas, self.alphas_cumprod, self.train_sigmas = sigma_schedule_tables(self.config)
        self.alphas = (1.0 - self.betas).astype(np.float32)

    # -- schedule --------------------------------------------------------------------------

    def _schedule(self, num_inference_steps, timesteps, sigmas) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        log_sigmas = np.log(self.train_sigmas)
        if sigmas is not None:
            sigmas = check_custom_sigmas(sigmas).astype(np.float32)
            return sigmas_to_timesteps(sigmas[:-1], log_sigmas), sigmas
        if timesteps is not None:
            timesteps = check_custom_timesteps(timesteps, c.num_train_timesteps).astype(np.float32)
        else:
            timesteps = float_spaced_timesteps(c, num_inference_steps)
        # N: "trailing" can give N + 1 timesteps (T / N does not divide T), but the levels
        # below are sized by N itself, as diffusers.
        n = num_inference_steps if num_inference_steps is not None else len(timesteps)
        if c.interpolation_type == "linear":
            sig = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        else:  # log_linear: N + 1 geometric levels from σ_max to σ_min, as diffusers
            ends = np.log(self.train_sigmas[[-1, 0]])
            sig = np.exp(np.linspace(ends[0], ends[1], n + 1, dtype=np.float32))
        converted = convert_sigmas(c, sig, n)
        if converted is not None:
            sig = converted
            timesteps = sigmas_to_timesteps(sig, log_sigmas)
        if c.final_sigmas_type == "sigma_min":
            sigma_last = self.train_sigmas[0]
        else:
            sigma_last = 0.0
        return timesteps, np.concatenate([sig, [sigma_last]]).astype(np.float32)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: Any = jnp.float32,
        *,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> EulerState:
        """Noise levels and timesteps for N inference steps (or custom ``timesteps`` / ``sigmas``
        with N+1 entries, as diffusers). ``shape``/``dtype`` are accepted for the common
        contract; Euler keeps no history."""
        c = self.config
        given = [x is not None for x in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError(
                "pass exactly one of num_inference_steps, timesteps or sigmas to set_timesteps"
            )
        if timesteps is not None and any(
            c[k] for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        ):
            raise ValueError("custom timesteps cannot be used with Karras/exponential/beta sigmas")
        if timesteps is not None and (c.timestep_type, c.prediction_type) == (
            "continuous",
            "v_prediction",
        ):
            raise ValueError(
                "custom timesteps cannot be used with timestep_type='continuous' and "
                "prediction_type='v_prediction' (its timesteps are log(σ)/4): pass sigmas"
            )
        if num_inference_steps is not None:
            check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
        t, sig = self._schedule(num_inference_steps, timesteps, sigmas)
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            t = 0.25 * np.log(sig[:-1])  # continuous-time v models take c_noise = log(σ)/4
        return EulerState(
            timesteps=jnp.asarray(np.asarray(t, np.float32)),
            sigmas=jnp.asarray(sig),
            init_noise_sigma=jnp.asarray(init_noise_sigma_of(sig, c.timestep_spacing)),
            step_index=jnp.zeros((), jnp.int32),
        )

    def set_begin_index(self, state: EulerState, begin_index: int = 0) -> EulerState:
        """Starts sampling at step ``begin_index`` (image-to-image: skip the first steps)."""
        return state.replace(step_index=jnp.asarray(begin_index, jnp.int32))

    def scale_model_input(
        self, state: EulerState, sample: jax.Array, timestep: Any = None
    ) -> jax.Array:
        r"""The model's input :math:`x_t = \tilde x / \sqrt{\sigma_i^2 + 1}` at the current step."""
        sigma = state.sigmas[state.step_index]
        return (sample / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)

    # -- step ------------------------------------------------------------------------------

    def step(
        self,
        state: EulerState,
        model_output: jax.Array,
        timestep: Any,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ) -> SchedulerOutput:
        r"""One Euler step :math:`\sigma_i \to \sigma_{i+1}` (Karras et al. 2022, Algorithm 2).

        Args:
            state: from ``set_timesteps`` or the previous ``step``.
            model_output: the model's output on ``scale_model_input(state, sample)``.
            timestep: the current timestep (unused: the step is located by ``state.step_index``).
            sample: the current :math:`\tilde x_i` (VE-scaled sample).
            key: PRNG key; needed only when ``s_churn`` may be nonzero.
            noise: explicit churn noise (overrides ``key``).
            s_churn, s_tmin, s_tmax, s_noise: stochastic churn (Algorithm 2, lines 4-6).

        Returns:
            ``SchedulerOutput(prev_sample, state, pred_original_sample)``.
        """
        check_step_inputs(model_output, sample)
        check_step_index(state, type(self).__name__)
        check_step_option("s_churn", s_churn)
        check_step_option("s_noise", s_noise)
        out_dtype = sample.dtype
        x = sample.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        i = state.step_index
        sigma = state.sigmas[i]
        # diffusers divides S_churn by len(sigmas) - 1: N, or N + 1 where the schedule has
        # N + 2 levels ("log_linear" without a Karras/exponential/beta conversion). count_steps
        # is N also for padded states (traced), which pad_state keeps at N + 1 levels.
        n_steps = count_steps(state.timesteps) + (
            state.sigmas.shape[0] - 1 - state.timesteps.shape[0]
        )

        # Algorithm 2, line 4: γ_i = min(S_churn / N, √2 - 1) if S_tmin <= σ_i <= S_tmax else 0
        # (N = len(sigmas) - 1, as diffusers).
        churn = not (isinstance(s_churn, (int, float)) and s_churn == 0)
        if churn:
            in_range = (s_tmin <= sigma) & (sigma <= s_tmax)
            gamma = jnp.where(in_range, jnp.minimum(s_churn / n_steps, 2**0.5 - 1), 0.0)
            sigma_hat = sigma * (gamma + 1)  # line 5: σ̂ = σ (1 + γ)
            eps = (
                resolve_noise(key, noise, x, type(self).__name__) * s_noise
            )  # line 5: ε ~ N(0, S_noise² I)
            # line 6: x̂ = x + sqrt(σ̂² - σ²) ε
            x = jnp.where(gamma > 0, x + eps * jnp.sqrt(sigma_hat**2 - sigma**2), x)
        else:
            sigma_hat = sigma

        # x̂₀ from the model output (the network sees x_t = x̃ / sqrt(σ² + 1)).
        pt = self.config.prediction_type
        if pt in ("sample", "original_sample"):
            x0_hat = model_output
        elif pt == "epsilon":
            x0_hat = x - sigma_hat * model_output  # x̃ = x₀ + σ ε
        else:  # v_prediction (Salimans & Ho 2022) in σ-space
            x0_hat = model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)

        d = (x - x0_hat) / sigma_hat  # Algorithm 2, line 7 / Eq. 4: d = (x̂ - D(x̂; σ̂)) / σ̂
        dt = state.sigmas[i + 1] - sigma_hat  # line 8: σ_{i+1} - σ̂_i
        prev_sample = x + d * dt  # line 8: x_{i+1} = x̂ + (σ_{i+1} - σ̂) d

        new_state = state.replace(step_index=i + 1)
        return SchedulerOutput(
            prev_sample=prev_sample.astype(out_dtype),
            state=new_state,
            pred_original_sample=x0_hat,
        )

    # -- training --------------------------------------------------------------------------

    def add_noise(
        self,
        original_samples: jax.Array,
        noise: jax.Array,
        timesteps: jax.Array,
        state: EulerState | None = None,
    ) -> jax.Array:
        r""":math:`\tilde x = x_0 + \sigma\,\epsilon` at ``timesteps``: σ(t) of the training
        table, or with ``state`` the σ of that step of the schedule (:func:`sigma_add_noise`).
        Continuous timesteps (``timestep_type="continuous"`` with v-prediction) are
        :math:`t = \tfrac14 \log\sigma`, so :math:`\sigma = e^{4t}` with or without a state."""
        c = self.config
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            check_forward_inputs(original_samples, noise, None, c.num_train_timesteps)
            sigma = jnp.exp(4.0 * jnp.asarray(timesteps, jnp.float32))
            sigma = bcast(sigma, original_samples).astype(original_samples.dtype)
            return original_samples + sigma * noise
        return sigma_add_noise(self.train_sigmas, original_samples, noise, timesteps, state)

    def add_noise_at_step(
        self, state: EulerState, original_samples: jax.Array, noise: jax.Array, step_index: Any
    ) -> jax.Array:
        r""":math:`\tilde x = x_0 + \sigma_i\,\epsilon` at inference step ``step_index``."""
        return sigma_add_noise_at_step(state, original_samples, noise, step_index)
