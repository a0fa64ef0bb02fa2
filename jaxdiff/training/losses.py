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

The loss is the mean squared error over every pixel of every example. The randomness of
example ``i`` comes only from ``fold_in(key, i)``, so a batch gives the same loss whatever the
number of devices it is sharded over (up to the float round-off of the mean).
"""

from __future__ import annotations

from collections.abc import Callable
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


def diffusion_loss(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    scheduler: Any,
    x0: jax.Array,
    key: jax.Array,
    prediction_type: str = "epsilon",
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""The simple diffusion loss, Ho et al. (2020), Algorithm 1 / Eq. 14.

    .. math:: L(\theta) = \mathbb E_{t, x_0, \epsilon}\,\big\|y - f_\theta(x_t, t)\big\|^2,
        \quad x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon

    where :math:`y` is :math:`\epsilon`, :math:`v` or :math:`x_0` (``prediction_type``).

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

    Returns:
        ``(loss, aux)`` with ``aux = {"timesteps": (B,) int32}``.
    """
    check_prediction_type(prediction_type)
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
    loss = jnp.mean(jnp.square(model_output - target))  # Eq. 14
    return loss, {"timesteps": timesteps}


__all__ = [
    "PREDICTION_TYPES",
    "diffusion_loss",
    "example_keys",
    "sample_noise_and_timesteps",
    "training_target",
]
