r"""What the schedulers share: noise schedules, the ε / x̂₀ / v conversions, thresholding.

The forward process of Ho et al. (2020), Eq. 4, in closed form:

.. math:: q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I\big),
          \qquad \bar\alpha_t = \prod_{s \le t} (1 - \beta_s).

A network may predict the noise ε (``"epsilon"``), the clean sample x₀ (``"sample"``) or the
velocity :math:`v = \sqrt{\bar\alpha_t}\,ε - \sqrt{1-\bar\alpha_t}\,x_0` (``"v_prediction"``,
Salimans & Ho 2022, Sec. 4). :func:`x0_hat_eps_hat` turns any of them into both x̂₀ and ε̂;
it is written once here and used by every scheduler.

Schedules are computed in numpy float32 with the same operations as diffusers (PyTorch
float32), so ``alpha_bar`` matches it to the last bit or two; the arrays go into the jitted
state as fp32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.configuration import ConfigMixin
from jaxdiff.utils.checks import check_key, check_real, host_numbers, host_value

# diffusers' KarrasDiffusionSchedulers: every one of these can be built from another's config.
KARRAS_DIFFUSION_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@struct.dataclass
class SchedulerOutput:
    """What ``step`` returns: x_{t-1}, the new state, and x̂₀ where the algorithm has one."""

    prev_sample: jax.Array
    state: Any
    pred_original_sample: jax.Array | None = None


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    r"""The cosine schedule of Nichol & Dhariwal (2021), Eq. 17:
    :math:`\bar\alpha(t) = \cos^2\big(\frac{t + 0.008}{1.008}\frac{\pi}{2}\big)`,
    :math:`\beta_i = \min\big(1 - \bar\alpha(\frac{i+1}{T}) / \bar\alpha(\frac{i}{T}),\ \beta_{max}\big)`."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=torch.float32)`` bit for bit.

    PyTorch works in float32: ``step = (end - start) / (num - 1)``, then the first half is
    ``start + step * i`` and the second half ``end - step * (num - 1 - i)``, each a fused
    multiply-add (one rounding), emulated here in float64. ``np.linspace`` rounds differently
    (up to 2 ulp on betas, 1e-6 relative on alpha_bar after 1000 steps)."""
    f32 = np.float32
    start32, end32 = f32(start), f32(end)
    if num == 1:
        return np.array([start32], dtype=np.float32)
    step = f32(f32(end32 - start32) / f32(num - 1))
    i = np.arange(num, dtype=np.float64)
    head = np.float64(start32) + np.float64(step) * i
    tail = np.float64(end32) - np.float64(step) * (num - 1 - i)
    return np.where(i < num // 2, head, tail).astype(np.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas: Any = None,
) -> np.ndarray:
    """β_1..β_T (float32) for a diffusers ``beta_schedule`` or explicit ``trained_betas``."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.ndim != 1 or betas.shape[0] != num_train_timesteps:
            raise ValueError(
                f"trained_betas must be a 1-D list of num_train_timesteps={num_train_timesteps} "
                f"values, got shape {betas.shape}"
            )
        return check_betas(betas, "trained_betas")
    if beta_schedule == "linear":
        return check_betas(linspace_f32(beta_start, beta_end, num_train_timesteps))
    if beta_schedule == "scaled_linear":
        # Latent diffusion (Rombach et al. 2022): linear in sqrt(beta).
        check_betas(np.asarray([beta_start, beta_end], np.float32))
        root = linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return root**2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(
        f"beta_schedule must be one of {BETA_SCHEDULES} (or pass trained_betas), "
        f"got {beta_schedule!r}"
    )


def check_betas(betas: np.ndarray, name: str = "beta_start/beta_end") -> np.ndarray:
    """Raises unless every β is a finite number in [0, 1) (else ᾱ_t is NaN, 0 or negative)."""
    if not (np.isfinite(betas).all() and (betas >= 0).all() and (betas < 1).all()):
        raise ValueError(
            f"{name} must give betas in [0, 1), got values in [{np.min(betas)}, {np.max(betas)}]"
        )
    return betas


def alpha_bar_from_betas(betas: np.ndarray) -> np.ndarray:
    r""":math:`\bar\alpha_t = \prod_{s\le t}(1-\beta_s)`, returned in float32.

    The running product is accumulated in float64 and rounded once, as PyTorch's CPU
    ``cumprod`` does for float32 tensors: a float32 accumulator drifts by ~1e-6 relative."""
    alphas = (1.0 - np.asarray(betas, np.float32)).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    r"""Rescales β to zero terminal SNR (Lin et al. 2024, Algorithm 1): :math:`\sqrt{\bar\alpha}`
    is shifted so that its last value is 0 and scaled so that its first is kept; float32 as
    diffusers (the cumulative product accumulated as in :func:`alpha_bar_from_betas`)."""
    alphas_bar_sqrt = np.sqrt(alpha_bar_from_betas(betas)).astype(np.float32)
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def spaced_timesteps(
    timestep_spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0
) -> np.ndarray:
    """N integer timesteps in [0, T-1], high to low, as diffusers' DDPM/DDIM ``set_timesteps``.

    Lin et al. (2024), Table 2: ``"linspace"`` rounds ``linspace(0, T-1, N)``; ``"leading"``
    takes ``i * (T // N) + steps_offset``; ``"trailing"`` rounds ``arange(T, 0, -T/N) - 1``
    (it always includes t = T-1)."""
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    t_max, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "linspace":
        steps = np.linspace(0, t_max - 1, n).round()[::-1]
    elif timestep_spacing == "leading":
        steps = (np.arange(0, n) * (t_max // n)).round()[::-1] + steps_offset
    else:
        steps = np.round(np.arange(t_max, 0, -t_max / n)) - 1
    check_timestep_range(steps, num_train_timesteps, steps_offset)
    return np.ascontiguousarray(steps).astype(np.int64)


def check_timestep_range(
    timesteps: np.ndarray, num_train_timesteps: int, steps_offset: int
) -> None:
    """Raises when ``steps_offset`` pushes a timestep past T - 1 (there is no ᾱ to look up)
    or below 0."""
    if len(timesteps) and int(np.min(timesteps)) < 0:
        raise ValueError(
            f"steps_offset={steps_offset} pushes timestep {int(np.min(timesteps))} below 0; "
            "steps_offset must be >= 0"
        )
    if len(timesteps) and int(np.max(timesteps)) >= num_train_timesteps:
        raise ValueError(
            f"steps_offset={steps_offset} pushes timestep {int(np.max(timesteps))} past "
            f"num_train_timesteps - 1 = {num_train_timesteps - 1}; use fewer inference steps "
            "or a smaller steps_offset"
        )


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    """Validates ``num_inference_steps`` (a Python int, 1..num_train_timesteps)."""
    if isinstance(num_inference_steps, bool) or not isinstance(
        num_inference_steps, (int, np.integer)
    ):
        raise TypeError(
            f"num_inference_steps must be a Python int, got {type(num_inference_steps).__name__}"
        )
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps="
            f"{num_train_timesteps}, got {num_inference_steps}"
        )
    return int(num_inference_steps)


def check_custom_timesteps(timesteps: Any, num_train_timesteps: int) -> np.ndarray:
    """Custom ``set_timesteps(timesteps=...)``: a non-empty 1-D list of numbers, strictly
    descending, in [0, num_train_timesteps) (as diffusers' DDPM checks them)."""
    steps = np.asarray(timesteps)
    if steps.ndim != 1 or steps.size == 0 or not np.issubdtype(steps.dtype, np.number):
        raise ValueError(f"timesteps must be a non-empty 1-D list of numbers, got {timesteps!r}")
    if np.any(np.diff(steps) >= 0):
        raise ValueError(f"timesteps must be in descending order, got {steps.tolist()}")
    if not (np.isfinite(steps).all() and steps[0] < num_train_timesteps and steps[-1] >= 0):
        raise ValueError(
            f"timesteps must lie in [0, num_train_timesteps={num_train_timesteps}), "
            f"got {steps.tolist()}"
        )
    return steps


def check_custom_sigmas(sigmas: Any) -> np.ndarray:
    """Custom ``set_timesteps(sigmas=...)``: N + 1 >= 2 finite noise levels >= 0."""
    sig = np.asarray(sigmas)
    if sig.ndim != 1 or sig.size < 2 or not np.issubdtype(sig.dtype, np.number):
        raise ValueError(
            f"sigmas must be a 1-D list of N + 1 >= 2 noise levels (the last one usually 0), "
            f"got {sigmas!r}"
        )
    if not (np.isfinite(sig).all() and (sig >= 0).all()):
        raise ValueError(f"sigmas must be finite and >= 0, got {sig.tolist()}")
    return sig


def check_timestep(timestep: Any, num_train_timesteps: int, name: str = "timestep") -> None:
    """Raises when a host-known ``timestep`` is not a number in [0, num_train_timesteps)
    (an index past ᾱ's table would be clamped silently by XLA). Traced values are not checked."""
    t = host_numbers(timestep, name, "an integer timestep")
    if t is None:
        return
    if t.size and not (np.isfinite(t).all() and t.min() >= 0 and t.max() < num_train_timesteps):
        raise ValueError(
            f"{name} must lie in [0, num_train_timesteps={num_train_timesteps}), got {t.tolist()}"
        )


def check_scheduled_timestep(timestep: Any, timesteps: Any, who: str) -> None:
    """Raises when a host-known ``timestep`` is not one of a host-known schedule's
    ``timesteps`` (diffusers' ``previous_timestep`` finds no index there and raises
    IndexError; a lookup by value would silently take the schedule's second step).
    Traced values are not checked."""
    t = host_value(timestep)
    steps = host_value(timesteps)
    if t is None or steps is None:
        return
    missing = sorted({int(v) for v in np.ravel(t)} - {int(v) for v in np.ravel(steps)})
    if missing:
        shown = (
            steps.tolist()
            if steps.size <= 12
            else f"{steps[:6].tolist()} ... {steps[-3:].tolist()}"
        )
        raise ValueError(
            f"{who}.step: timestep {missing[0]} is not in the state's schedule "
            f"({steps.size} timesteps: {shown}); step at the timesteps of the state that "
            "set_timesteps returned"
        )


def check_step_index(state: Any, who: str) -> None:
    """Raises when a host-known ``state.step_index`` is past the schedule's last step (the
    σ lookup would read past its end and give NaN). Traced states are not checked."""
    i = host_value(state.step_index)
    if i is None or isinstance(state.timesteps, jax.core.Tracer):
        return
    n = int(count_steps(state.timesteps))
    if not 0 <= int(i) < n:
        raise ValueError(
            f"{who}.step was called at step_index={int(i)}, but the state holds {n} steps: "
            "call set_timesteps again to sample anew"
        )


def check_step_option(name: str, value: Any, low: float = 0.0) -> None:
    """Raises when a host-known step option (``eta``, ``s_churn``, ...) is not a finite number
    >= ``low``; traced values are not checked."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    check_real(name, value, low=low)


def check_sample(sample: jax.Array, name: str = "sample") -> None:
    """Samples are batched NHWC images or latents (rank 4) or, for toy problems, rank >= 1."""
    if jnp.ndim(sample) < 1:
        raise ValueError(f"{name} must be an array with a batch axis, got a scalar")


def check_step_inputs(
    model_output: jax.Array,
    sample: jax.Array,
    learned_variance: bool = False,
    history: jax.Array | None = None,
) -> None:
    """Shape checks of ``step`` (static, so they cost nothing under jit).

    Args:
        model_output: must have the sample's shape, or twice its channels on the last axis when
            the scheduler's ``variance_type`` is learned.
        sample: x_t, with a batch axis.
        history: a fixed-shape history buffer of the state, ``(order, *sample.shape)``.

    Raises:
        ValueError: naming the argument, its shape and the expected shape.
    """
    check_sample(sample)
    got, want = tuple(jnp.shape(model_output)), tuple(jnp.shape(sample))
    doubled = want[:-1] + (2 * want[-1],)
    if got != want and not (learned_variance and got == doubled):
        extra = f" or {doubled} (learned variance)" if learned_variance else ""
        raise ValueError(f"model_output must have the sample's shape {want}{extra}, got {got}")
    if history is not None and tuple(history.shape[1:]) != want:
        raise ValueError(
            f"sample has shape {want} but the state was made for {tuple(history.shape[1:])}: "
            "call set_timesteps(num_inference_steps, shape=sample.shape)"
        )


def check_forward_inputs(
    x0: Any, noise: Any, timesteps: Any, num_train_timesteps: int, x0_name: str = "original_samples"
) -> None:
    """``add_noise`` / ``get_velocity``: ``noise`` has the samples' shape and host-known
    ``timesteps`` are training timesteps in [0, num_train_timesteps)."""
    if tuple(jnp.shape(noise)) != tuple(jnp.shape(x0)):
        raise ValueError(
            f"noise must have the shape of {x0_name} {tuple(jnp.shape(x0))}, "
            f"got {tuple(jnp.shape(noise))}"
        )
    check_timestep(timesteps, num_train_timesteps, "timesteps")


def bcast(x: jax.Array, like: jax.Array) -> jax.Array:
    """Reshapes a per-example (B,) or scalar coefficient to broadcast against ``like``."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (jnp.ndim(like) - x.ndim))


def schedule_index(schedule_timesteps: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Per example, the index of ``timesteps`` in ``schedule_timesteps`` by diffusers'
    ``index_for_timestep`` rule: the second match when there are several (so that starting in
    the middle of a schedule with repeated timesteps does not skip a level), else the first;
    -1 where the timestep is not in the schedule. Fractional timesteps match within a few
    float32 ulp (1e-6 relative), so the same schedule computed elsewhere (diffusers) is found.
    Jit-safe (no host round trip)."""
    t = jnp.atleast_1d(jnp.asarray(timesteps, jnp.float32))
    schedule = jnp.asarray(schedule_timesteps, jnp.float32)[None, :]
    hits = jnp.isclose(schedule, t[:, None], rtol=1e-6, atol=1e-6)
    count = hits.sum(axis=1)
    first = jnp.argmax(hits, axis=1)
    # the second match: the first one after clearing the first
    second = jnp.argmax(hits.at[jnp.arange(t.shape[0]), first].set(False), axis=1)
    index = jnp.where(count > 1, second, first)
    return jnp.where(count > 0, index, -1).reshape(jnp.shape(timesteps))


def x0_hat_eps_hat(
    prediction_type: str, model_output: jax.Array, x_t: jax.Array, alpha_bar_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Converts a model output into (x̂₀, ε̂) at noise level :math:`\bar\alpha_t`.

    * ε-prediction: :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}`
      (Ho et al. 2020, Eq. 15);
    * x₀-prediction: :math:`\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1-\bar\alpha_t}`;
    * v-prediction: :math:`\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,\hat v`,
      :math:`\hat\epsilon = \sqrt{\bar\alpha_t}\,\hat v + \sqrt{1-\bar\alpha_t}\,x_t`
      (Salimans & Ho 2022, Sec. 4).
    """
    a = bcast(alpha_bar_t, x_t)
    sqrt_a, sqrt_1ma = jnp.sqrt(a), jnp.sqrt(1 - a)
    if prediction_type == "epsilon":
        eps_hat = model_output
        x0_hat = (x_t - sqrt_1ma * eps_hat) / sqrt_a
    elif prediction_type == "sample":
        x0_hat = model_output
        eps_hat = (x_t - sqrt_a * x0_hat) / sqrt_1ma
    elif prediction_type == "v_prediction":
        x0_hat = sqrt_a * x_t - sqrt_1ma * model_output
        eps_hat = sqrt_a * model_output + sqrt_1ma * x_t
    else:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    return x0_hat, eps_hat


def threshold_sample(x0_hat: jax.Array, ratio: float, max_value: float) -> jax.Array:
    r"""Dynamic thresholding (Saharia et al. 2022, Sec. 2.3): per example, s is the
    ``ratio`` quantile of :math:`|\hat x_0|`, clamped to [1, max_value]; then
    :math:`\hat x_0 \leftarrow \mathrm{clip}(\hat x_0, -s, s) / s`."""
    flat = x0_hat.reshape(x0_hat.shape[0], -1).astype(jnp.float32)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0_hat.shape).astype(x0_hat.dtype)


def resolve_noise(
    key: jax.Array | None, noise: jax.Array | None, like: jax.Array, who: str
) -> jax.Array:
    """The Gaussian noise of a stochastic step: ``noise`` if given, else drawn from ``key``."""
    if noise is not None:
        if tuple(jnp.shape(noise)) != tuple(like.shape):
            raise ValueError(
                f"{who}.step: noise must have the sample's shape {tuple(like.shape)}, "
                f"got {tuple(jnp.shape(noise))}"
            )
        return jnp.asarray(noise, like.dtype)
    if key is None:
        raise ValueError(
            f"{who}.step is stochastic and needs a PRNG key: pass key=jax.random.key(seed) "
            "(or noise=... to inject the noise yourself)."
        )
    check_key(key, f"{who}.step")
    return jax.random.normal(key, like.shape, like.dtype)


class SchedulerMixin(ConfigMixin):
    """Base of every scheduler: config, ``compatibles``, and the training-time forward process.

    A scheduler object holds only its frozen config and schedule arrays derived from it;
    everything that changes while sampling lives in the state that ``set_timesteps`` returns.
    """

    config_name = "scheduler_config.json"
    _compatibles: tuple[str, ...] = ()
    order: int = 1

    def _init_schedule(self) -> None:
        """Sets ``self.betas`` and ``self.alphas_cumprod`` (float32 numpy) from the config."""
        c = self.config
        self.betas = make_betas(
            c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas
        )
        self.alphas = (1.0 - self.betas).astype(np.float32)
        self.alphas_cumprod = alpha_bar_from_betas(self.betas)

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes that can be built from this one's config."""
        from jaxdiff import schedulers

        names = dict.fromkeys((type(self).__name__, *self._compatibles))
        return [getattr(schedulers, n) for n in names if hasattr(schedulers, n)]

    def add_noise(
        self,
        original_samples: jax.Array,
        noise: jax.Array,
        timesteps: jax.Array,
        state: Any = None,
    ) -> jax.Array:
        r"""Samples :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon`
        (Ho et al. 2020, Eq. 4) at integer training ``timesteps`` (one per example).

        ``state`` is accepted for a uniform interface and not needed: ᾱ is indexed by the
        timestep itself (the σ schedulers use it, see theirs)."""
        check_forward_inputs(original_samples, noise, timesteps, len(self.alphas_cumprod))
        a = jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps, jnp.int32)]
        a = bcast(a, original_samples).astype(original_samples.dtype)
        return jnp.sqrt(a) * original_samples + jnp.sqrt(1 - a) * noise

    def add_noise_at_step(
        self, state: Any, original_samples: jax.Array, noise: jax.Array, step_index: Any
    ) -> jax.Array:
        """The forward process at inference step ``step_index`` of ``state`` (a traced scalar
        is fine): diffusers' ``add_noise`` after ``set_begin_index`` (image-to-image, and the
        legacy inpainting blend), whatever the scheduler's parametrisation."""
        t = jnp.broadcast_to(state.timesteps[step_index], (original_samples.shape[0],))
        return self.add_noise(original_samples, noise, t)

    def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        r"""The v-prediction target :math:`v = \sqrt{\bar\alpha_t}\,\epsilon -
        \sqrt{1-\bar\alpha_t}\,x_0` (Salimans & Ho 2022, Sec. 4)."""
        check_forward_inputs(sample, noise, timesteps, len(self.alphas_cumprod), "sample")
        a = jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps, jnp.int32)]
        a = bcast(a, sample).astype(sample.dtype)
        return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * sample

    def scale_model_input(self, state: Any, sample: jax.Array, timestep: Any = None) -> jax.Array:
        """The model input for ``sample`` at ``timestep``: unchanged for ᾱ-space schedulers."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def count_steps(timesteps: jax.Array) -> jax.Array:
    """N, the number of inference steps in ``state.timesteps``.

    Fixed-shape pipelines pad every state to the ``num_train_timesteps`` state so that a new
    step count does not recompile (:func:`jaxdiff.sampling.pad_state`); the padding holds
    timestep NaN (float timesteps, which may be negative: continuous-time v-prediction uses
    log(σ)/4) or ``-1`` (integer ones), so N counts the other entries (a traced scalar).
    """
    t = jnp.asarray(timesteps)
    real = ~jnp.isnan(t) if jnp.issubdtype(t.dtype, jnp.floating) else t >= 0
    return jnp.sum(real).astype(jnp.int32)
