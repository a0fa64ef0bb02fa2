r"""PNDM: pseudo numerical methods for diffusion models (Liu et al. 2022), as diffusers'
PNDMScheduler.

The "transfer" φ moves x_t to x_{t-δ} given a noise estimate e (Liu et al. 2022, Eq. 9):

.. math::
    x_{t-\delta} = \frac{\sqrt{\bar\alpha_{t-\delta}}}{\sqrt{\bar\alpha_t}}\,x_t
      - \frac{\bar\alpha_{t-\delta} - \bar\alpha_t}
             {\bar\alpha_t\sqrt{1-\bar\alpha_{t-\delta}}
              + \sqrt{\bar\alpha_t (1-\bar\alpha_t)\,\bar\alpha_{t-\delta}}}\;e .

The estimate e combines model outputs like a classical ODE solver (Eq. 11-13):

* **PRK** (pseudo Runge-Kutta, Eq. 13) warm-up over the first 3 steps, 4 model calls each, at
  t, t-δ/2, t-δ/2, t-δ: :math:`e' = \frac16(e_1 + 2e_2 + 2e_3 + e_4)`;
* **PLMS** (pseudo linear multistep, Eq. 12) afterwards, one model call per step:
  :math:`e' = \frac1{24}(55e_t - 59e_{t-\delta} + 37e_{t-2\delta} - 9e_{t-3\delta})`,
  with the lower-order Adams-Bashforth formulas while fewer than 4 outputs are known.

With ``skip_prk_steps`` (the PLMS sampler of latent diffusion, used by Stable Diffusion) there
is no PRK warm-up: the first step is repeated, its second model call averaged with the first
(a second-order Heun-like start), then PLMS of increasing order. v-prediction is turned into
ε̂ before the transfer.

diffusers drives this with a step ``counter``, a list ``ets`` of past outputs, the running
RK sum ``cur_model_output`` and the RK base sample ``cur_sample``. Here they are fixed-shape
state arrays (``ets`` is (4, *shape), newest last, with ``num_ets`` valid entries) and the
branches are selected with ``jnp.where`` on the traced counter, so ``step`` traces once and
reproduces diffusers' step-by-step arithmetic exactly.
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
    TIMESTEP_SPACINGS,
    SchedulerMixin,
    SchedulerOutput,
    check_choice,
    check_num_inference_steps,
    check_step_inputs,
    check_timestep,
    check_timestep_range,
)

PNDM_ORDER = 4


@struct.dataclass
class PNDMState:
    """Sampling state of :class:`PNDMScheduler` (a valid ``lax.scan`` carry).

    Attributes:
        timesteps: (M,) int32 timesteps to call the model at (PRK steps, then PLMS steps;
            diffusers' values; M = N + 9 with PRK, N + 1 with ``skip_prk_steps``).
        init_noise_sigma: scalar float32 (1).
        step_index: scalar int32, number of ``step`` calls so far.
        counter: scalar int32, diffusers' ``counter`` (steps since ``set_timesteps``).
        alpha_bar: (T,) float32 training table ᾱ_t.
        final_alpha_bar: scalar float32 ᾱ used beyond t = 0 (``set_alpha_to_one``).
        step_ratio: scalar int32 δ = ``num_train_timesteps // N``.
        num_prk_steps: scalar int32, how many of ``timesteps`` are PRK steps.
        ets: (4, *shape) past noise estimates, newest last (``None`` until the first step
            when ``set_timesteps`` got no ``shape``).
        num_ets: scalar int32, how many entries of ``ets`` are filled (at most 4).
        cur_model_output: (*shape) running Runge-Kutta sum of Eq. 13.
        cur_sample: (*shape) x_t at the start of the current RK / Heun step.
    """

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    step_index: jax.Array
    counter: jax.Array
    alpha_bar: jax.Array
    final_alpha_bar: jax.Array
    step_ratio: jax.Array
    num_prk_steps: jax.Array
    ets: jax.Array | None
    num_ets: jax.Array
    cur_model_output: jax.Array | None
    cur_sample: jax.Array | None


class PNDMScheduler(SchedulerMixin):
    r"""Pseudo numerical methods sampler (Liu et al. 2022, Eq. 9, 12, 13) with explicit state.

    Config fields and defaults are diffusers' ``PNDMScheduler``'s.

    Args:
        num_train_timesteps: T, the number of training steps.
        beta_start, beta_end, beta_schedule, trained_betas: the β schedule (see ``make_betas``).
        skip_prk_steps: no Runge-Kutta warm-up (PLMS only, as Stable Diffusion uses it).
        set_alpha_to_one: ᾱ beyond t = 0 is 1 (else ᾱ_0).
        prediction_type: "epsilon" or "v_prediction".
        timestep_spacing: "leading", "trailing" or "linspace" (Lin et al. 2024, Table 2).
        steps_offset: added to ``"leading"`` timesteps.
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
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self._init_schedule()
        self.final_alpha_cumprod = np.float32(1.0 if set_alpha_to_one else self.alphas_cumprod[0])

    def _timesteps(self, n: int) -> tuple[np.ndarray, int]:
        """(all timesteps, number of PRK timesteps) for N inference steps, as diffusers."""
        c = self.config
        t_max = c.num_train_timesteps
        # the N base timesteps, low to high
        if c.timestep_spacing == "linspace":
            base = np.linspace(0, t_max - 1, n).round().astype(np.int64)
        elif c.timestep_spacing == "leading":
            base = (np.arange(0, n) * (t_max // n)).round() + c.steps_offset
        else:  # trailing
            base = np.round(np.arange(t_max, 0, -t_max / n))[::-1].astype(np.int64) - 1
        if c.skip_prk_steps:
            # the first timestep twice: [t_N, t_{N-1}, t_{N-1}, t_{N-2}, ..., t_1]
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            # each of the last 3 intervals at t, t - δ/2, t - δ/2, t - δ (Eq. 13)
            half = np.array([0, t_max // n // 2])
            prk = np.repeat(base[-PNDM_ORDER:], 2) + np.tile(half, PNDM_ORDER)
            prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
            plms = base[:-3][::-1]
        timesteps = np.concatenate([prk, plms]).astype(np.int64)
        check_timestep_range(timesteps, t_max, c.steps_offset)
        return timesteps, len(prk)

    def set_timesteps(
        self,
        num_inference_steps: int,
        shape: tuple[int, ...] | None = None,
        dtype: Any = jnp.float32,
    ) -> PNDMState:
        """The state for N inference steps (``len(state.timesteps)`` model calls).

        Args:
            num_inference_steps: N.
            shape: the sample shape, for the fixed-shape history (``None``: made at the first
                ``step``, for eager loops).
            dtype: dtype of the history buffers.
        """
        c = self.config
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps)
        if not c.skip_prk_steps and n < PNDM_ORDER:
            raise ValueError(
                f"num_inference_steps must be at least {PNDM_ORDER} for PNDM with Runge-Kutta "
                f"warm-up steps (skip_prk_steps=False), got {n}; use skip_prk_steps=True"
            )
        timesteps, num_prk = self._timesteps(n)
        if shape is None:
            ets = cur_model_output = cur_sample = None
        else:
            shape = tuple(shape)
            ets = jnp.zeros((PNDM_ORDER, *shape), dtype)
            cur_model_output = jnp.zeros(shape, dtype)
            cur_sample = jnp.zeros(shape, dtype)
        return PNDMState(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            init_noise_sigma=jnp.asarray(1.0, jnp.float32),
            step_index=jnp.zeros((), jnp.int32),
            counter=jnp.zeros((), jnp.int32),
            alpha_bar=jnp.asarray(self.alphas_cumprod),
            final_alpha_bar=jnp.asarray(self.final_alpha_cumprod, jnp.float32),
            step_ratio=jnp.asarray(c.num_train_timesteps // n, jnp.int32),
            num_prk_steps=jnp.asarray(num_prk, jnp.int32),
            ets=ets,
            num_ets=jnp.zeros((), jnp.int32),
            cur_model_output=cur_model_output,
            cur_sample=cur_sample,
        )

    def _transfer(
        self,
        state: PNDMState,
        x_t: jax.Array,
        t: jax.Array,
        prev_t: jax.Array,
        model_output: jax.Array,
    ) -> jax.Array:
        r"""x_{t-δ} from x_t and a noise estimate (Liu et al. 2022, Eq. 9)."""
        alpha_bar_t = state.alpha_bar[t]
        alpha_bar_prev = jnp.where(
            prev_t >= 0, state.alpha_bar[jnp.maximum(prev_t, 0)], state.final_alpha_bar
        )
        beta_bar_t = 1 - alpha_bar_t
        beta_bar_prev = 1 - alpha_bar_prev
        if self.config.prediction_type == "v_prediction":
            # ε̂ = sqrt(ᾱ_t) v̂ + sqrt(1 - ᾱ_t) x_t (Salimans & Ho 2022)
            model_output = jnp.sqrt(alpha_bar_t) * model_output + jnp.sqrt(beta_bar_t) * x_t
        # (ᾱ_{t-δ} - ᾱ_t) / (sqrt(ᾱ_t) (sqrt(ᾱ_{t-δ}) + sqrt(ᾱ_t))) + 1 = sqrt(ᾱ_{t-δ} / ᾱ_t)
        sample_coeff = jnp.sqrt(alpha_bar_prev / alpha_bar_t)
        # denominator of e in Eq. 9
        denom = alpha_bar_t * jnp.sqrt(beta_bar_prev) + jnp.sqrt(
            alpha_bar_t * beta_bar_t * alpha_bar_prev
        )
        # Eq. 9
        return sample_coeff * x_t - (alpha_bar_prev - alpha_bar_t) * model_output / denom

    def step(
        self,
        state: PNDMState,
        model_output: jax.Array,
        timestep: Any,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> SchedulerOutput:
        r"""One model call's worth of PRK (Eq. 13) or PLMS (Eq. 12), then the transfer (Eq. 9).

        Which one is decided by ``state.counter`` exactly as diffusers' ``step_prk`` /
        ``step_plms``; both are computed and selected with ``jnp.where``.

        Args:
            state: from ``set_timesteps`` or the previous ``step``.
            model_output: the model's output (ε̂ or v̂) at (``sample``, ``timestep``).
            timestep: the current timestep, ``state.timesteps[state.step_index]`` (a Python int
                or a traced scalar); ``None`` takes that value.
            sample: the current sample.
            key, noise: unused (PNDM is deterministic); accepted for the common contract.

        Returns:
            ``SchedulerOutput(prev_sample, state, None)``.
        """
        del key, noise
        check_step_inputs(model_output, sample, history=state.ets)
        check_timestep(timestep, self.config.num_train_timesteps)
        out_dtype = sample.dtype
        x = sample.astype(jnp.float32)
        e = model_output.astype(jnp.float32)
        if state.ets is None:  # eager loop without a shape: make the history now
            buf_dtype = sample.dtype
            state = state.replace(
                ets=jnp.zeros((PNDM_ORDER, *x.shape), buf_dtype),
                cur_model_output=jnp.zeros(x.shape, buf_dtype),
                cur_sample=jnp.zeros(x.shape, buf_dtype),
            )
        if timestep is None:
            timestep = state.timesteps[state.step_index]
        t = jnp.asarray(timestep, jnp.int32)
        counter = state.counter
        ratio = state.step_ratio
        ets = state.ets.astype(jnp.float32)
        num_ets = state.num_ets
        cur_mo = state.cur_model_output.astype(jnp.float32)
        cur_sample = state.cur_sample.astype(jnp.float32)

        def push(buf: jax.Array, value: jax.Array) -> jax.Array:
            return jnp.concatenate([buf[1:], value[None]], axis=0)

        # ---- PLMS (diffusers' step_plms), Eq. 12 -----------------------------------------
        second = counter == 1  # the repeated first step of skip_prk_steps
        plms_prev_t = jnp.where(second, t, t - ratio)
        plms_t = jnp.where(second, t + ratio, t)
        plms_ets = jnp.where(second, ets, push(ets, e))
        plms_num = jnp.where(second, num_ets, jnp.minimum(num_ets + 1, PNDM_ORDER))
        e1, e2, e3, e4 = plms_ets[3], plms_ets[2], plms_ets[1], plms_ets[0]
        first = (plms_num == 1) & (counter == 0)
        heun = (plms_num == 1) & (counter == 1)
        plms_e = jnp.select(
            [first, heun, plms_num == 2, plms_num == 3],
            [
                e,  # first step: e_t itself
                (e + e1) / 2,  # second call of the first step: average (Heun)
                (3 * e1 - e2) / 2,  # 2nd-order Adams-Bashforth
                (23 * e1 - 16 * e2 + 5 * e3) / 12,  # 3rd order
            ],
            (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),  # Eq. 12, 4th order
        )
        plms_x = jnp.where(heun, cur_sample, x)  # the Heun call restarts from the stored x_t
        plms_cur_sample = jnp.where(first, x, cur_sample)
        plms_prev = self._transfer(state, plms_x, plms_t, plms_prev_t, plms_e)

        if self.config.skip_prk_steps:
            prev_sample = plms_prev
            new_ets, new_num, new_cur_mo, new_cur_sample = (
                plms_ets,
                plms_num,
                cur_mo,
                plms_cur_sample,
            )
        else:
            # ---- PRK (diffusers' step_prk), Eq. 13 ---------------------------------------
            phase = counter % 4
            # model calls at t, t - δ/2, t - δ/2, t - δ; the transfer always starts at t
            prk_prev_t = t - jnp.where(counter % 2 == 1, 0, ratio // 2)
            prk_t = state.timesteps[jnp.clip(counter // 4 * 4, 0, state.timesteps.shape[0] - 1)]
            prk_cur_mo = jnp.select(
                [phase == 0, phase == 3],
                [(1 / 6) * e, jnp.zeros_like(e)],
                cur_mo + (1 / 3) * e,  # phases 1, 2: + e/3
            )
            prk_e = jnp.where(phase == 3, cur_mo + (1 / 6) * e, e)  # (e1 + 2e2 + 2e3 + e4) / 6
            prk_ets = jnp.where(phase == 0, push(ets, e), ets)
            prk_num = jnp.where(phase == 0, jnp.minimum(num_ets + 1, PNDM_ORDER), num_ets)
            prk_cur_sample = jnp.where(phase == 0, x, cur_sample)
            prk_prev = self._transfer(state, prk_cur_sample, prk_t, prk_prev_t, prk_e)

            is_prk = counter < state.num_prk_steps
            prev_sample = jnp.where(is_prk, prk_prev, plms_prev)
            new_ets = jnp.where(is_prk, prk_ets, plms_ets)
            new_num = jnp.where(is_prk, prk_num, plms_num)
            new_cur_mo = jnp.where(is_prk, prk_cur_mo, cur_mo)
            new_cur_sample = jnp.where(is_prk, prk_cur_sample, plms_cur_sample)

        buf_dtype = state.ets.dtype
        new_state = state.replace(
            step_index=state.step_index + 1,
            counter=counter + 1,
            ets=new_ets.astype(buf_dtype),
            num_ets=new_num,
            cur_model_output=new_cur_mo.astype(buf_dtype),
            cur_sample=new_cur_sample.astype(buf_dtype),
        )
        return SchedulerOutput(prev_sample=prev_sample.astype(out_dtype), state=new_state)


__all__ = ["PNDMScheduler", "PNDMState"]
