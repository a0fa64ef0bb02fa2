r"""Train state, optimizer, EMA and the jitted data-parallel train step.

One step of Ho et al. (2020), Algorithm 1, as one compiled XLA program::

    state = TrainState.create(params, optimizer)
    step = make_train_step(model, scheduler, optimizer, ema_decay=0.9999)
    state, metrics = step(state, batch_uint8_or_float, jax.random.fold_in(key, i))

The batch is split along a 1-D ``"batch"`` mesh over all local devices (``NamedSharding``); the
state (fp32 params, their EMA and the optimizer state) is replicated. XLA inserts the gradient
all-reduce. Example ``i`` of a batch draws its timestep and noise from ``fold_in(key, i)``, so
the result does not depend on the device count beyond the float round-off of that reduction.

``step.steps(state, batches, keys)`` runs ``n`` such steps in one compiled program
(``lax.scan`` over ``batches`` of shape ``(n, batch, H, W, C)`` and ``keys`` of shape ``(n,)``),
with the same result as ``n`` calls of ``step`` up to float round-off. Fewer, longer calls are
what make training fast on the CPU: XLA:CPU allocates a program's temp buffer at every call and
glibc hands an allocation that large back to the kernel when it is freed, so each call
page-faults the whole buffer in again (about 127,000 faults, a quarter of the cats-32 train
step's time on 2 cores; ``benchmarks/README.md``, "What limits the ratios"). A scan of 4 steps
takes one call's faults for 4 steps. (The model is traced under
:func:`jaxdiff.models.conv_grads.canonical_gradients`, without which XLA:CPU runs the
convolution gradients inside the scan as naive loops.)

With ``compute_dtype=jnp.bfloat16`` the model runs in bf16 (convolutions, matmuls) while the
params, gradients, Adam moments and EMA stay float32 ("master weights"); the loss is float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import sampling
from jaxdiff.models import conv_grads
from jaxdiff.models.modeling_utils import check_dtype
from jaxdiff.training.losses import check_prediction_type, check_snr_gamma, diffusion_loss
from jaxdiff.utils.xla import compiler_options


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree; checkpointed as a whole).

    Attributes:
        step: scalar int32, optimizer steps done so far.
        params: float32 model params (master weights).
        ema_params: the exponential moving average of ``params`` (used for sampling/export).
        opt_state: the optax state (Adam moments, schedule count).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> TrainState:
        """A fresh state: step 0, EMA = params, the optimizer's initial state."""
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree_util.tree_map(jnp.array, params),
            opt_state=optimizer.init(params),
        )


def make_lr_schedule(
    learning_rate: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.0
) -> optax.Schedule:
    r"""Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then a cosine decay
    (*Loshchilov & Hutter (2017)*) to ``end_ratio * learning_rate`` at ``total_steps``."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * end_ratio,
    )


def make_optimizer(
    learning_rate: float | optax.Schedule,
    warmup_steps: int = 0,
    total_steps: int = 1,
    *,
    weight_decay: float = 1e-6,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float | None = 1.0,
) -> optax.GradientTransformation:
    r"""AdamW (*Loshchilov & Hutter (2019)*) with global-norm gradient clipping and the
    warmup + cosine schedule of :func:`make_lr_schedule`.

    Args:
        learning_rate: peak learning rate, or a ready optax schedule (then ``warmup_steps``
            and ``total_steps`` are ignored).
        warmup_steps, total_steps: the schedule.
        weight_decay: decoupled weight decay (diffusers' unconditional example uses 1e-6).
        b1, b2, eps: Adam's moment decays and epsilon.
        grad_clip: clip the global gradient norm to this (None: no clipping).
    """
    schedule = (
        learning_rate
        if callable(learning_rate)
        else make_lr_schedule(learning_rate, warmup_steps, total_steps)
    )
    parts = []
    if grad_clip is not None:
        if grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def ema_decay_at(step: jax.Array, max_decay: float) -> jax.Array:
    r"""The EMA decay at optimizer step ``step`` (0-based), with diffusers' ``EMAModel`` warmup:
    :math:`\min\big(d_\text{max}, \tfrac{1 + s}{10 + s}\big)`, so early averages do not
    remember the random init for long."""
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(max_decay), (1.0 + s) / (10.0 + s))


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    r"""One EMA step, :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta`."""
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


def to_model_input(batch: jax.Array) -> jax.Array:
    """uint8 images in [0, 255] -> float32 in [-1, 1]; float batches are taken as already in
    [-1, 1]."""
    if batch.dtype == jnp.uint8:
        return batch.astype(jnp.float32) / 127.5 - 1.0
    return batch.astype(jnp.float32)


class TrainStep:
    """The compiled train step ``(state, batch, key) -> (state, metrics)``.

    ``batch``: NHWC images, uint8 in [0, 255] or float in [-1, 1]; its size must be a multiple
    of the number of devices of the mesh. ``metrics``: float32 scalars ``loss``, ``grad_norm``,
    ``lr`` and ``ema_decay`` (of the step just taken). The state argument is donated.
    ``jitted`` is the underlying ``jax.jit`` function (``.lower(...).compile()`` for timing);
    ``jitted_steps`` that of :meth:`steps`.
    """

    def __init__(self, jitted: Callable, jitted_steps: Callable, mesh: Mesh):
        self.jitted = jitted
        self.jitted_steps = jitted_steps
        self.mesh = mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def _check_batch(self, shape: Any, name: str, leading: str = "") -> None:
        rank = 4 + bool(leading)
        if shape is None or len(shape) != rank:
            raise ValueError(
                f"{name} must be NHWC images ({leading}batch, height, width, channels), got "
                f"shape {shape}"
            )
        if shape[-4] % self.num_devices:
            raise ValueError(
                f"the batch size {shape[-4]} must be a multiple of the number of devices "
                f"({self.num_devices}) it is split over"
            )

    def __call__(self, state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, dict]:
        self._check_batch(getattr(batch, "shape", None), "batch")
        return self.jitted(state, batch, key)

    def steps(self, state: TrainState, batches: Any, keys: jax.Array) -> tuple[TrainState, dict]:
        """``n`` train steps in one call: step ``i`` takes ``batches[i]`` and ``keys[i]``.

        Args:
            state: as for a single step (donated).
            batches: ``(n, batch, height, width, channels)``, uint8 or float as for one step.
            keys: ``n`` PRNG keys, shape ``(n,)`` (e.g. ``jax.vmap(partial(fold_in, key))``
                over the step numbers).

        Returns:
            ``(state, metrics)`` with each metric of shape ``(n,)``, one value per step. One
            program is compiled per ``n``.
        """
        shape = getattr(batches, "shape", None)
        self._check_batch(shape, "batches", "steps, ")
        key_shape = getattr(keys, "shape", None)
        if key_shape != shape[:1]:
            raise ValueError(
                f"keys must hold one PRNG key per step, shape ({shape[0]},), got shape {key_shape}"
            )
        return self.jitted_steps(state, batches, keys)


def make_train_step(
    model: Any,
    scheduler: Any,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float = 0.9999,
    prediction_type: str | None = None,
    snr_gamma: float | None = None,
    compute_dtype: Any = None,
    lr_schedule: optax.Schedule | None = None,
    mesh: Mesh | None = None,
    donate: bool = True,
) -> TrainStep:
    r"""Builds the jitted, data-parallel DDPM train step (Ho et al. (2020), Algorithm 1).

    Per step: the loss of :func:`~jaxdiff.training.losses.diffusion_loss` and its gradient,
    the optimizer update (clip, AdamW, schedule), then the EMA update of the new params with
    :func:`ema_decay_at`.

    Args:
        model: a Linen module called as ``model.apply({"params": p}, x_t, t, train=True).sample``
            (``UNet2DModel``).
        scheduler: the training scheduler (``DDPMScheduler``): ᾱ table, ``add_noise``,
            ``get_velocity``.
        optimizer: from :func:`make_optimizer`.
        ema_decay: the maximum EMA decay.
        prediction_type: the target; default ``scheduler.config.prediction_type``.
        snr_gamma: Min-SNR-:math:`\gamma` loss weighting (Hang et al. 2023); None: off.
        compute_dtype: None/float32, or bfloat16/float16 for the model's compute (params stay
            float32).
        lr_schedule: reported as ``metrics["lr"]`` (0 when None).
        mesh: a 1-D mesh with axis ``"batch"``; default all local devices.
        donate: donate the state buffers to the step (saves memory; the old state is invalid).
    """
    prediction_type = check_prediction_type(prediction_type or scheduler.config.prediction_type)
    check_snr_gamma(snr_gamma)
    if compute_dtype is not None:
        model = model.clone(dtype=check_dtype(compute_dtype, "compute_dtype"))
    mesh = mesh if mesh is not None else sampling.batch_mesh()
    if mesh.axis_names != ("batch",):
        raise ValueError(f"mesh must be 1-D with the axis name 'batch', got axes {mesh.axis_names}")
    replicated = NamedSharding(mesh, PartitionSpec())
    by_batch = NamedSharding(mesh, PartitionSpec("batch"))
    use_dropout = float(getattr(model, "dropout", 0.0) or 0.0) > 0.0

    def apply_fn(params, x_t, t, dropout_key):
        rngs = {"dropout": dropout_key} if use_dropout else None
        x_in = x_t.astype(model.dtype)
        with conv_grads.canonical_gradients():  # fast convolution gradients in steps()' scan
            return model.apply({"params": params}, x_in, t, train=use_dropout, rngs=rngs).sample

    def step(state: TrainState, batch: jax.Array, key: jax.Array):
        x0 = jax.lax.with_sharding_constraint(to_model_input(batch), by_batch)
        noise_key, dropout_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

        def loss_fn(params):
            loss, _ = diffusion_loss(
                apply_fn, params, scheduler, x0, noise_key, prediction_type, dropout_key, snr_gamma
            )
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, ema_decay)
        ema_params = ema_update(state.ema_params, params, decay)
        lr = lr_schedule(state.step) if lr_schedule is not None else 0.0
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": jnp.asarray(lr, jnp.float32),
            "ema_decay": decay,
        }
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        return new_state, metrics

    def steps(state: TrainState, batches: jax.Array, keys: jax.Array):
        def body(s, xs):
            return step(s, *xs)

        return jax.lax.scan(body, state, (batches, keys))

    def jit(fn, batch_sharding):
        return jax.jit(
            fn,
            in_shardings=(replicated, batch_sharding, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=(0,) if donate else (),
            compiler_options=compiler_options(),
        )

    by_step_and_batch = NamedSharding(mesh, PartitionSpec(None, "batch"))
    return TrainStep(jit(step, by_batch), jit(steps, by_step_and_batch), mesh)


def replicate_state(state: TrainState, mesh: Mesh) -> TrainState:
    """Places the state on every device of ``mesh`` (what the train step expects)."""
    return jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


__all__ = [
    "TrainState",
    "TrainStep",
    "ema_decay_at",
    "ema_update",
    "make_lr_schedule",
    "make_optimizer",
    "make_train_step",
    "replicate_state",
    "to_model_input",
]
