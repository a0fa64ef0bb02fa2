r"""Multistep DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b), as diffusers'
DPMSolverMultistepScheduler.

Write :math:`\alpha_t = \sqrt{\bar\alpha_t} = 1/\sqrt{\sigma^2+1}`,
:math:`\sigma_t = \sqrt{1-\bar\alpha_t} = \sigma\,\alpha_t` (σ the VE noise level of
:mod:`jaxdiff.schedulers.euler`) and the half log-SNR :math:`\lambda_t = \log\alpha_t -
\log\sigma_t`. The diffusion ODE has the exact solution, from s to t with
:math:`h = \lambda_t - \lambda_s` (Lu et al. 2022a, Eq. 3.4; Lu et al. 2022b, Eq. 8)

.. math::
    x_t = \frac{\alpha_t}{\alpha_s} x_s - \alpha_t \int_{\lambda_s}^{\lambda_t}
          e^{-\lambda}\hat\epsilon\,d\lambda
    \qquad\text{(noise prediction, "dpmsolver")},

.. math::
    x_t = \frac{\sigma_t}{\sigma_s} x_s + \sigma_t \int_{\lambda_s}^{\lambda_t}
          e^{\lambda}\hat x_0\,d\lambda
    \qquad\text{(data prediction, "dpmsolver++")}.

Taylor-expanding the predicted ε̂ or x̂₀ in λ and reusing the model outputs of previous steps
gives the multistep solvers (with :math:`r_0 = h_{i-1}/h`, :math:`D_0 = m_0`,
:math:`D_1 = (m_0 - m_1)/r_0`):

* order 1 (DPM-Solver-1, Lu et al. 2022a, Eq. 3.7; DDIM):
  :math:`x_t = \frac{\sigma_t}{\sigma_s}x_s - \alpha_t(e^{-h}-1)D_0` (++) and
  :math:`x_t = \frac{\alpha_t}{\alpha_s}x_s - \sigma_t(e^{h}-1)D_0`;
* order 2 (DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2), "midpoint":
  :math:`\ldots - \tfrac12\alpha_t(e^{-h}-1)D_1`, or "heun":
  :math:`\ldots + \alpha_t(\frac{e^{-h}-1}{h}+1)D_1`;
* order 3 (multistep DPM-Solver-3, Lu et al. 2022b, App. B): with the second divided
  difference :math:`D_2`, adds :math:`-\alpha_t(\frac{e^{-h}-1+h}{h^2}-\tfrac12)D_2`.

The SDE variants ("sde-dpmsolver++", Lu et al. 2022b, Sec. 5 / App. "SDE-DPM-Solver++(2M)")
solve the reverse SDE instead: :math:`e^{-h}` weights on :math:`x_s`, doubled exponent on the
model term, and fresh noise :math:`\sigma_t\sqrt{1-e^{-2h}}\,\epsilon`.

Like diffusers, step i uses order 1 at the first step, order 2 at the second (warm-up:
``lower_order_nums``), and lower orders for the last one or two steps when
``lower_order_final``/``euler_at_final``/``final_sigmas_type="zero"`` ask for it. Those choices
depend on traced counters, so they are made with ``lax.switch``; the model-output history is a
fixed-shape buffer ``(solver_order, *shape)``.
"""

from __future__ import annotations

import functools
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
    bcast,
    check_choice,
    check_custom_timesteps,
    check_num_inference_steps,
    check_step_index,
    check_step_inputs,
    check_timestep_range,
    count_steps,
    resolve_noise,
    schedule_index,
    threshold_sample,
)
from jaxdiff.schedulers.euler import (
    check_sigma_options,
    convert_sigmas,
    sigma_schedule_tables,
    sigmas_to_timesteps,
)

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


@struct.dataclass
class DPMSolverMultistepState:
    """Sampling state of :class:`DPMSolverMultistepScheduler` (a valid ``lax.scan`` carry).

    Attributes:
        timesteps: (N,) int32 timesteps, high to low (diffusers' values).
        sigmas: (N+1,) float32 VE noise levels; the last is 0 or σ_min (``final_sigmas_type``).
        init_noise_sigma: scalar float32 (1.0: DPM-Solver works on the VP sample x_t).
        step_index: scalar int32, index of the current step; advanced by ``step``.
        model_outputs: (solver_order, *shape) history of converted model outputs (x̂₀ or ε̂),
            newest last; None until the first ``step`` when ``set_timesteps`` got no ``shape``.
        lower_order_nums: scalar int32, how many steps have run, capped at solver_order
            (the warm-up counter of diffusers).
    """

    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    step_index: jax.Array
    model_outputs: jax.Array | None
    lower_order_nums: jax.Array


def _alpha_sigma(sigma: jax.Array, flow: bool) -> tuple[jax.Array, jax.Array]:
    r"""VE σ -> (α_t, σ_t): :math:`\alpha_t = 1/\sqrt{\sigma^2+1}`,
    :math:`\sigma_t = \sigma\alpha_t`
    (flow matching: :math:`\alpha_t = 1-\sigma`, :math:`\sigma_t = \sigma`)."""
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / jnp.sqrt(sigma**2 + 1)
    return alpha_t, sigma * alpha_t


def _unpack(f, operands):
    return f(*operands)


def _sqrt0(v: jax.Array) -> jax.Array:
    r"""The SDE solvers' noise scales :math:`\sqrt{1-e^{-2h}}` and :math:`\sqrt{e^{2h}-1}`
    (Lu et al. 2022b, Eq. 11), clamped at 0: a last step to ``final_sigmas_type="sigma_min"``
    can have :math:`h` a rounding error below 0, where the square root would be NaN."""
    return jnp.sqrt(jnp.maximum(v, 0.0))


class DPMSolverMultistepScheduler(SchedulerMixin):
    r"""Multistep DPM-Solver / DPM-Solver++ of order 1-3 (Lu et al. 2022a, Eq. 3.7; Lu et al.
    2022b, Algorithm 2).

    Config fields and defaults are diffusers' ``DPMSolverMultistepScheduler``'s. As there,
    ``algorithm_type="deis"`` is read as "dpmsolver++" and ``solver_type`` "logrho"/"bh1"/"bh2"
    as "midpoint" (configs of other schedulers); "sde-dpmsolver" has no third-order update.
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
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        fixes = {}
        if algorithm_type == "deis":
            fixes["algorithm_type"] = algorithm_type = "dpmsolver++"
        if solver_type in ("logrho", "bh1", "bh2"):
            fixes["solver_type"] = solver_type = "midpoint"
        if fixes:
            self._register_config({**dict(self.config), **fixes})
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("prediction_type", prediction_type, (*PREDICTION_TYPES, "flow_prediction"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError("algorithm_type 'sde-dpmsolver' has no third-order update")
        if algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
            raise ValueError(
                f"final_sigmas_type 'zero' is not supported for algorithm_type {algorithm_type!r}: "
                "use final_sigmas_type='sigma_min'"
            )
        if prediction_type == "flow_prediction" and algorithm_type not in (
            "dpmsolver++",
            "sde-dpmsolver++",
        ):
            raise ValueError("prediction_type 'flow_prediction' needs a dpmsolver++ algorithm_type")
        check_sigma_options(self.config)
        self.betas, self.alphas_cumprod, self.train_sigmas = sigma_schedule_tables(self.config)
        self.alphas = (1.0 - self.betas).astype(np.float32)
        alpha_t = np.sqrt(self.alphas_cumprod)
        sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = (np.log(alpha_t) - np.log(sigma_t)).astype(np.float32)
        # lax.switch branches, made once so that eager calls hit jax's trace cache.
        updates = (self._first_order, self._second_order, self._third_order)[:solver_order]
        self._branches = [functools.partial(_unpack, f) for f in updates]

    # -- schedule --------------------------------------------------------------------------

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        c = self.config
        T = c.num_train_timesteps
        # lambda_min_clipped: drop the noisiest timesteps whose λ is below the clip (cosine).
        clipped_idx = int(np.searchsorted(np.flip(self.lambda_t), c.lambda_min_clipped))
        last_timestep = T - clipped_idx
        if c.timestep_spacing == "linspace":
            t = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1]
            return t.copy().astype(np.int64)
        if c.timestep_spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            t = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            return t + c.steps_offset
        step_ratio = T / n  # trailing
        return np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64) - 1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: Any = jnp.float32,
        *,
        timesteps: Any = None,
        mu: float | None = None,
    ) -> DPMSolverMultistepState:
        """Timesteps, noise levels and an empty history for N inference steps.

        Args:
            num_inference_steps: N (or pass custom integer ``timesteps``).
            shape: the sample shape; sizes the history buffer ``(solver_order, *shape)``.
            dtype: dtype of the history buffer (arithmetic is float32 regardless).
            timesteps: custom timesteps, high to low (not with Karras/Lu/exponential/beta sigmas).
            mu: with ``use_dynamic_shifting``, flow_shift = exp(mu).
        """
        c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "pass exactly one of num_inference_steps or timesteps to set_timesteps"
            )
        special = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas")
        if timesteps is not None and any(c[k] for k in (*special, "use_beta_sigmas")):
            raise ValueError(
                "custom timesteps cannot be used with Karras/Lu/exponential/beta sigmas"
            )
        flow_shift = c.flow_shift
        if mu is not None:
            if not (c.use_dynamic_shifting and c.time_shift_type == "exponential"):
                raise ValueError(
                    "mu needs use_dynamic_shifting=True, time_shift_type='exponential'"
                )
            flow_shift = float(np.exp(mu))
        if timesteps is not None:
            t = check_custom_timesteps(timesteps, c.num_train_timesteps).astype(np.int64)
            n = len(t)
        else:
            n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
            t = self._spaced_timesteps(n)

        train_sigmas = self.train_sigmas
        log_sigmas = np.log(train_sigmas)
        round_t = c.beta_schedule != "squaredcos_cap_v2"
        converted = convert_sigmas(c, np.flip(train_sigmas).copy(), n)
        if converted is not None:
            sig = converted
            t = sigmas_to_timesteps(sig, log_sigmas)
            if c.use_karras_sigmas and round_t:
                t = t.round()
        elif c.use_lu_lambdas:  # Lu et al. 2022b, App.: uniform steps in log σ
            lam_max, lam_min = float(log_sigmas[-1]), float(log_sigmas[0])  # float64, as diffusers
            lambdas = lam_max + np.linspace(0, 1, n) * (lam_min - lam_max)
            sig = np.exp(lambdas)
            t = sigmas_to_timesteps(sig, log_sigmas)
            if round_t:
                t = t.round()
        elif c.use_flow_sigmas:
            alphas = np.linspace(1, 1 / c.num_train_timesteps, n + 1)
            s = 1.0 - alphas
            sig = np.flip(flow_shift * s / (1 + (flow_shift - 1) * s))[:-1].copy()
            t = (sig * c.num_train_timesteps).copy()
        else:
            check_timestep_range(t, c.num_train_timesteps, c.steps_offset)  # interp would clamp
            sig = np.interp(t, np.arange(0, len(train_sigmas)), train_sigmas)
        sigma_last = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
        sig = np.concatenate([sig, [sigma_last]]).astype(np.float32)
        t = np.asarray(t).astype(np.int64).astype(np.int32)

        history = None
        if shape is not None:
            history = jnp.zeros((c.solver_order, *shape), dtype)
        return DPMSolverMultistepState(
            timesteps=jnp.asarray(t),
            sigmas=jnp.asarray(sig),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
            step_index=jnp.zeros((), jnp.int32),
            model_outputs=history,
            lower_order_nums=jnp.zeros((), jnp.int32),
        )

    def set_begin_index(
        self, state: DPMSolverMultistepState, begin_index: int = 0
    ) -> DPMSolverMultistepState:
        """Starts sampling at step ``begin_index`` (image-to-image: skip the first steps)."""
        return state.replace(step_index=jnp.asarray(begin_index, jnp.int32))

    # -- model output -> x̂₀ (DPM-Solver++) or ε̂ (DPM-Solver) -----------------------------

    def convert_model_output(
        self, state: DPMSolverMultistepState, model_output: jax.Array, sample: jax.Array
    ) -> jax.Array:
        r"""The quantity the solver integrates: x̂₀ for "dpmsolver++" (Lu et al. 2022b, Sec. 3),
        ε̂ for "dpmsolver" (Lu et al. 2022a), at :math:`\sigma_i`, thresholded if configured."""
        c = self.config
        flow = c.use_flow_sigmas
        sigma = state.sigmas[state.step_index]
        alpha_t, sigma_t = _alpha_sigma(sigma, flow)
        # Any other variance_type (None, or DDPM's "fixed_small" carried over by from_config)
        # means the model predicts no variance channels, as in diffusers.
        learned = c.variance_type in ("learned", "learned_range")
        if learned and c.prediction_type == "epsilon":
            # The model also predicts its variance: keep the ε channels (NHWC: last axis).
            model_output = model_output[..., : sample.shape[-1]]
        if c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if c.prediction_type == "epsilon":
                x0_hat = (sample - sigma_t * model_output) / alpha_t  # Ho et al. 2020, Eq. 15
            elif c.prediction_type == "sample":
                x0_hat = model_output
            elif c.prediction_type == "v_prediction":
                x0_hat = alpha_t * sample - sigma_t * model_output  # Salimans & Ho 2022, Sec. 4
            else:  # flow_prediction: x_t = (1-σ) x₀ + σ ε, v = ε - x₀
                x0_hat = sample - sigma_t * model_output
            if c.thresholding:
                x0_hat = threshold_sample(x0_hat, c.dynamic_thresholding_ratio, c.sample_max_value)
            return x0_hat
        if c.prediction_type == "epsilon":
            eps_hat = model_output
        elif c.prediction_type == "sample":
            eps_hat = (sample - alpha_t * model_output) / sigma_t
        else:  # v_prediction
            eps_hat = alpha_t * model_output + sigma_t * sample
        if c.thresholding:
            x0_hat = (sample - sigma_t * eps_hat) / alpha_t
            x0_hat = threshold_sample(x0_hat, c.dynamic_thresholding_ratio, c.sample_max_value)
            eps_hat = (sample - alpha_t * x0_hat) / sigma_t
        return eps_hat

    # -- the three updates -----------------------------------------------------------------

    def _levels(self, sigmas: jax.Array, i: jax.Array, k: int):
        """(α, σ_t, λ) at σ_{i+1} (target) and σ_i, σ_{i-1}, ..., k levels back."""
        flow = self.config.use_flow_sigmas
        out = []
        for j in range(k + 1):
            alpha, sig = _alpha_sigma(sigmas[i + 1 - j], flow)
            out.append((alpha, sig, jnp.log(alpha) - jnp.log(sig)))
        return out

    def _first_order(self, sigmas, i, history, x, noise):
        r"""DPM-Solver-1 (Lu et al. 2022a, Eq. 3.7) / DPM-Solver++(1) (= DDIM, Lu et al. 2022b)."""
        (alpha_t, sigma_t, lam_t), (alpha_s, sigma_s, lam_s) = self._levels(sigmas, i, 1)
        m0 = history[-1].astype(jnp.float32)
        h = lam_t - lam_s
        algo = self.config.algorithm_type
        if algo == "dpmsolver++":
            return (sigma_t / sigma_s) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * m0
        if algo == "dpmsolver":
            return (alpha_t / alpha_s) * x - (sigma_t * (jnp.exp(h) - 1.0)) * m0
        if algo == "sde-dpmsolver++":
            return (
                (sigma_t / sigma_s * jnp.exp(-h)) * x
                + (alpha_t * (1 - jnp.exp(-2.0 * h))) * m0
                + sigma_t * _sqrt0(1.0 - jnp.exp(-2 * h)) * noise
            )
        return (  # sde-dpmsolver
            (alpha_t / alpha_s) * x
            - 2.0 * (sigma_t * (jnp.exp(h) - 1.0)) * m0
            + sigma_t * _sqrt0(jnp.exp(2 * h) - 1.0) * noise
        )

    def _second_order(self, sigmas, i, history, x, noise):
        r"""Multistep second order (DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2)."""
        (alpha_t, sigma_t, lam_t), (alpha_s0, sigma_s0, lam_s0), (_, _, lam_s1) = self._levels(
            sigmas, i, 2
        )
        m0, m1 = history[-1].astype(jnp.float32), history[-2].astype(jnp.float32)
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)  # first divided difference in λ, times h
        algo, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        if algo == "dpmsolver++":
            base = (sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * D0
            if midpoint:
                return base - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * D1
            return base + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * D1
        if algo == "dpmsolver":
            base = (alpha_t / alpha_s0) * x - (sigma_t * (jnp.exp(h) - 1.0)) * D0
            if midpoint:
                return base - 0.5 * (sigma_t * (jnp.exp(h) - 1.0)) * D1
            return base - (sigma_t * ((jnp.exp(h) - 1.0) / h - 1.0)) * D1
        if algo == "sde-dpmsolver++":
            base = (
                (sigma_t / sigma_s0 * jnp.exp(-h)) * x
                + (alpha_t * (1 - jnp.exp(-2.0 * h))) * D0
                + sigma_t * _sqrt0(1.0 - jnp.exp(-2 * h)) * noise
            )
            if midpoint:
                return base + 0.5 * (alpha_t * (1 - jnp.exp(-2.0 * h))) * D1
            return base + (alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
        base = (  # sde-dpmsolver
            (alpha_t / alpha_s0) * x
            - 2.0 * (sigma_t * (jnp.exp(h) - 1.0)) * D0
            + sigma_t * _sqrt0(jnp.exp(2 * h) - 1.0) * noise
        )
        if midpoint:
            return base - (sigma_t * (jnp.exp(h) - 1.0)) * D1
        return base - 2.0 * (sigma_t * ((jnp.exp(h) - 1.0) / h - 1.0)) * D1

    def _third_order(self, sigmas, i, history, x, noise):
        r"""Multistep third order (DPM-Solver-3 / DPM-Solver++(3M), Lu et al. 2022b, App. B)."""
        levels = self._levels(sigmas, i, 3)
        (alpha_t, sigma_t, lam_t), (alpha_s0, sigma_s0, lam_s0) = levels[0], levels[1]
        lam_s1, lam_s2 = levels[2][2], levels[3][2]
        m0, m1, m2 = (history[k].astype(jnp.float32) for k in (-1, -2, -3))
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)  # first derivative, second-order accurate
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)  # second divided difference
        algo = self.config.algorithm_type
        if algo == "dpmsolver++":
            return (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (jnp.exp(-h) - 1.0)) * D0
                + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * D1
                - (alpha_t * ((jnp.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
            )
        if algo == "dpmsolver":
            return (
                (alpha_t / alpha_s0) * x
                - (sigma_t * (jnp.exp(h) - 1.0)) * D0
                - (sigma_t * ((jnp.exp(h) - 1.0) / h - 1.0)) * D1
                - (sigma_t * ((jnp.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
            )
        return (  # sde-dpmsolver++
            (sigma_t / sigma_s0 * jnp.exp(-h)) * x
            + (alpha_t * (1.0 - jnp.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (alpha_t * ((1.0 - jnp.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
            + sigma_t * _sqrt0(1.0 - jnp.exp(-2 * h)) * noise
        )

    # -- forward process at a schedule step ----------------------------------------------------

    def add_noise(
        self,
        original_samples: jax.Array,
        noise: jax.Array,
        timesteps: jax.Array,
        state: DPMSolverMultistepState | None = None,
    ) -> jax.Array:
        r""":math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` at ``timesteps``: ᾱ of the training
        timestep (Ho et al. 2020, Eq. 4), or with ``state`` the (α_t, σ_t) of that step of the
        schedule (diffusers' ``add_noise`` after ``set_timesteps``: Karras/Lu/exponential/beta
        and flow σ differ from the training table's); a timestep not in the schedule keeps ᾱ."""
        out = super().add_noise(original_samples, noise, timesteps)
        if state is None:
            return out
        index = schedule_index(state.timesteps, timesteps)
        at_step = self.add_noise_at_step(state, original_samples, noise, jnp.maximum(index, 0))
        return jnp.where(bcast(index >= 0, out), at_step, out)

    def add_noise_at_step(
        self,
        state: DPMSolverMultistepState,
        original_samples: jax.Array,
        noise: jax.Array,
        step_index: Any,
    ) -> jax.Array:
        r""":math:`x = \alpha_i x_0 + \sigma_i \epsilon` at inference step ``step_index``, with
        :math:`(\alpha_i, \sigma_i)` from the step's VE σ (or flow σ)."""
        alpha_t, sigma_t = _alpha_sigma(state.sigmas[step_index], self.config.use_flow_sigmas)
        dtype = original_samples.dtype
        alpha_t = bcast(alpha_t, original_samples).astype(dtype)
        sigma_t = bcast(sigma_t, original_samples).astype(dtype)
        return alpha_t * original_samples + sigma_t * noise

    # -- step ------------------------------------------------------------------------------

    def step(
        self,
        state: DPMSolverMultistepState,
        model_output: jax.Array,
        timestep: Any,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> SchedulerOutput:
        r"""One multistep DPM-Solver step from :math:`\sigma_i` to :math:`\sigma_{i+1}`.

        The order is diffusers': 1 if ``solver_order == 1``, during warm-up
        (``lower_order_nums < 1``) or at a lower-order final step; else 2 if ``solver_order == 2``,
        ``lower_order_nums < 2`` or at the second-to-last step with ``lower_order_final`` and
        N < 15; else 3. ``timestep`` is unused (the step is located by ``state.step_index``);
        ``key``/``noise`` are needed only by the "sde-" algorithms.

        Returns:
            ``SchedulerOutput(prev_sample, state, None)`` (diffusers' step returns no x̂₀).
        """
        check_step_inputs(
            model_output,
            sample,
            self.config.variance_type in ("learned", "learned_range"),
            state.model_outputs,
        )
        check_step_index(state, type(self).__name__)
        c = self.config
        out_dtype = sample.dtype
        x = sample.astype(jnp.float32)
        n = count_steps(state.timesteps)  # N (traced: states may be padded)
        i = state.step_index
        so = c.solver_order

        short = jnp.logical_and(c.lower_order_final, n < 15)
        final_lower = jnp.logical_or(c.euler_at_final or c.final_sigmas_type == "zero", short)
        lower_order_final = (i == n - 1) & final_lower
        lower_order_second = (i == n - 2) & short

        m = self.convert_model_output(state, model_output.astype(jnp.float32), x)
        history = state.model_outputs
        if history is None:  # eager loop without `shape`: the buffer is made on first use
            history = jnp.zeros((so, *m.shape), jnp.float32)
        history = jnp.concatenate([history[1:], m[None].astype(history.dtype)], axis=0)

        if c.algorithm_type.startswith("sde-"):
            eps = resolve_noise(key, noise, x, type(self).__name__).astype(jnp.float32)
        else:
            eps = None

        use_first = (so == 1) | (state.lower_order_nums < 1) | lower_order_final
        use_second = (so == 2) | (state.lower_order_nums < 2) | lower_order_second
        branch = jnp.where(use_first, 0, jnp.where(use_second, 1, 2))
        if so == 1:
            prev_sample = self._first_order(state.sigmas, i, history, x, eps)
        else:
            prev_sample = jax.lax.switch(
                jnp.minimum(branch, so - 1), self._branches, (state.sigmas, i, history, x, eps)
            )

        new_state = state.replace(
            step_index=i + 1,
            model_outputs=history,
            lower_order_nums=jnp.minimum(state.lower_order_nums + 1, so).astype(jnp.int32),
        )
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype), state=new_state)
