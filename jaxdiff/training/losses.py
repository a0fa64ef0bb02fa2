r"""The DDPM training objective, Ho et al. (2020), Algorithm 1 and Eq. 14.

For a clean batch :math:`x_0`, draw per example a timestep :math:`t \sim \mathcal U\{0,\dots,T-1\}`
and noise :math:`\epsilon \sim \mathcal N(0, I)`, form

.. math:: x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon \qquad \text{(Eq. 4)}

with ``scheduler.add_noise``, and regress the model output on the target named by
``prediction_type``:

* ``"epsilon"``: :math:`\epsilon` (the "simple" loss :math:`L_\text{simple}`, Eq. 14);
* ``"v_prediction"``: :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0`
  (Salimans & Ho 2022, Sec. 4), from ``scheduler.get_velocity``;
* ``"sample"``: :math:`x_0` itself.

The loss is the mean squared error over every pixel of every example, or, with ``snr_gamma``,
the Min-SNR-:math:`\gamma` weighted mean of the per-example errors (Hang et al. 2023, see
:func:`min_snr_weights`). The randomness of
example ``i`` comes only from ``fold_in(key, i)``, so a batch gives the same loss whatever the
number of devices it is sharded over (up to the float round-off of the mean).
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    return prediction_type


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """One key per example, ``fold_in(key, i)``: independent of how the batch is sharded."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def sample_noise_and_timesteps(
    key: jax.Array, shape: tuple[int, ...], num_train_timesteps: int
) -> tuple[jax.Array, jax.Array]:
    r"""Per-example :math:`t \sim \mathcal U\{0..T-1\}` and :math:`\epsilon \sim \mathcal N(0, I)`
    (Ho et al. 2020, Algorithm 1, lines 3-4).

    Returns:
        ``(noise, timesteps)``: float32 ``shape`` and int32 ``(shape[0],)``.
    """
    keys = example_keys(key, shape[0])
    t_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    n_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_train_timesteps, jnp.int32))(
        t_keys
    )
    noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(n_keys)
    return noise, timesteps


def training_target(
    scheduler: Any, prediction_type: str, x0: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
    r"""The regression target: :math:`\epsilon`, :math:`v` (Salimans & Ho 2022) or :math:`x_0`."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return x0


def snr(scheduler: Any, timesteps: jax.Array) -> jax.Array:
    r"""The signal-to-noise ratio of the forward process at ``timesteps``
    (Kingma et al. 2021, Eq. 2):

    .. math:: \mathrm{SNR}(t) = \frac{\bar\alpha_t}{1 - \bar\alpha_t}

    (diffusers' ``training_utils.compute_snr``).
    """
    alpha_bar = jnp.asarray(scheduler.alphas_cumprod, jnp.float32)[
        jnp.asarray(timesteps, jnp.int32)
    ]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    r"""Min-SNR-:math:`\gamma` loss weights, Hang et al. (2023), Eq. 9 and Sec. 3.4.

    The :math:`x_0` loss is weighted by :math:`\min(\mathrm{SNR}_t, \gamma)`: large-SNR
    (small-noise) steps no longer dominate the gradient. The same weighting expressed for the
    other targets, since :math:`\|\epsilon - \hat\epsilon\|^2 = \mathrm{SNR}_t
    \|x_0 - \hat x_0\|^2` and :math:`\|v - \hat v\|^2 = (\mathrm{SNR}_t + 1)
    \|x_0 - \hat x_0\|^2`:

    .. math:: w_t^{\epsilon} = \frac{\min(\mathrm{SNR}_t, \gamma)}{\mathrm{SNR}_t}, \qquad
        w_t^{v} = \frac{\min(\mathrm{SNR}_t, \gamma)}{\mathrm{SNR}_t + 1}, \qquad
        w_t^{x_0} = \min(\mathrm{SNR}_t, \gamma)

    as diffusers' training scripts (``--snr_gamma``; the paper recommends :math:`\gamma = 5`).
    At zero terminal SNR :math:`w^{\epsilon}` takes its limit 1 instead of 0/0.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return jnp.minimum(1.0, gamma / snr_t)  # min(SNR, gamma) / SNR, finite at SNR = 0
    clipped = jnp.minimum(snr_t, gamma)
    return clipped / (snr_t + 1.0) if prediction_type == "v_prediction" else clipped


def check_snr_gamma(snr_gamma: float | None) -> float | None:
    if snr_gamma is not None and (
        isinstance(snr_gamma, bool) or not isinstance(snr_gamma, Real) or not snr_gamma > 0
    ):
        raise ValueError(f"snr_gamma must be a number > 0 (or None: off), got {snr_gamma!r}")
    return snr_gamma


def diffusion_loss(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    scheduler: Any,
    x0: jax.Array,
    key: jax.Array,
    prediction_type: str = "epsilon",
    dropout_key: jax.Array | None = None,
    snr_gamma: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""The simple diffusion loss, Ho et al. (2020), Algorithm 1 / Eq. 14.

    .. math:: L(\theta) = \mathbb E_{t, x_0, \epsilon}\,w_t\,\big\|y - f_\theta(x_t, t)\big\|^2,
        \quad x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon

    where :math:`y` is :math:`\epsilon`, :math:`v` or :math:`x_0` (``prediction_type``) and
    :math:`w_t = 1`, or the Min-SNR-:math:`\gamma` weight of :func:`min_snr_weights`.

    Args:
        apply_fn: ``(params, x_t, t, dropout_key) -> model_output`` (NHWC, the shape of
            ``x0``); any compute dtype, the loss is taken in float32.
        params: the model params.
        scheduler: a scheduler with ``add_noise`` / ``get_velocity`` and
            ``config.num_train_timesteps`` (``DDPMScheduler``).
        x0: clean images in [-1, 1], NHWC float.
        key: the PRNG key of this batch; example ``i`` uses ``fold_in(key, i)``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        dropout_key: key for dropout (None when the model has none).
        snr_gamma: :math:`\gamma` of Min-SNR weighting (Hang et al. 2023); None: unweighted.

    Returns:
        ``(loss, aux)`` with ``aux = {"timesteps": (B,) int32}``.
    """
    check_prediction_type(prediction_type)
    check_snr_gamma(snr_gamma)
    x0 = x0.astype(jnp.float32)
    T = scheduler.config.num_train_timesteps
    noise, timesteps = sample_noise_and_timesteps(key, x0.shape, T)
    x_t = scheduler.add_noise(x0, noise, timesteps)  # Eq. 4
    target = training_target(scheduler, prediction_type, x0, noise, timesteps)
    model_output = apply_fn(params, x_t, timesteps, dropout_key).astype(jnp.float32)
    if model_output.shape != target.shape:
        raise ValueError(
            f"the model output has shape {model_output.shape} but the {prediction_type} target "
            f"has shape {target.shape} (a learned-variance model is not supported by this loss)"
        )
    if snr_gamma is None:
        loss = jnp.mean(jnp.square(model_output - target))  # Eq. 14
    else:  # per-example errors, weighted (Hang et al. 2023), then the batch mean
        errors = jnp.mean(jnp.square(model_output - target), axis=tuple(range(1, x0.ndim)))
        loss = jnp.mean(
            min_snr_weights(snr(scheduler, timesteps), snr_gamma, prediction_type) * errors
        )
    return loss, {"timesteps": timesteps}


__all__ = [
    "PREDICTION_TYPES",
    "diffusion_loss",
    "example_keys",
    "min_snr_weights",
    "sample_noise_and_timesteps",
    "snr",
    "training_target",
]
