r"""The one denoising driver: ``lax.scan`` over the scheduler's steps.

Every pipeline samples through :func:`denoise`. Given a model function
:math:`f(x, t) \to` (ε̂, x̂₀ or v̂, as the scheduler's ``prediction_type`` says), a scheduler
and its state, it runs, for :math:`i = 0 \dots N-1` with :math:`t = \text{timesteps}[i]`,

.. math:: x_{t_{i+1}} = \text{step}\big(f(\text{scale\_model\_input}(x_{t_i}, t_i), t_i),\ t_i,\ x_{t_i}\big)

as one ``lax.scan``, so the whole loop is a single XLA program. The PRNG key of step ``i`` is
``fold_in(key, i)``: changing the seed changes only an argument, never the program.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6) is a model-function wrapper,
:func:`classifier_free_guidance`, that batches [uncond, cond] through one model call.

Batches are sharded over all local devices with :func:`shard_batch` (``jax.sharding``: the
batch axis split over a 1-D mesh, the params replicated), or run with ``jax.pmap`` through
:func:`pmap_denoise`. A progress bar can be fed from inside the scan (:class:`ScanProgress`),
and a host function can see and change the latents after each step (:class:`StepCallback`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.utils.xla import compiler_options

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- progress bars
class ScanProgress:
    """A tqdm bar advanced from inside a jitted ``lax.scan`` through ``jax.debug.callback``.

    The callback only carries an integer id, so the compiled program does not depend on which
    bar is shown: ``with ScanProgress(total) as p: f(..., progress_id=p.id)``.
    """

    _bars: dict[int, Any] = {}
    _ids = itertools.count(1)
    _lock = threading.Lock()

    def __init__(
        self, total: int, desc: str = "denoising", enabled: bool = True, **tqdm_kwargs: Any
    ):
        self.id = next(self._ids)
        self.total = int(total)
        self.enabled = enabled
        self.tqdm_kwargs = {"desc": desc, "unit": "step", **tqdm_kwargs}

    def __enter__(self) -> ScanProgress:
        if self.enabled:
            from tqdm.auto import tqdm

            with self._lock:
                self._bars[self.id] = tqdm(total=self.total, **self.tqdm_kwargs)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            bar = self._bars.pop(self.id, None)
        if bar is not None:
            bar.close()

    @classmethod
    def _update(cls, bar_id: np.ndarray, i: np.ndarray) -> None:
        with cls._lock:
            bar = cls._bars.get(int(bar_id))
        if bar is not None:
            bar.n = int(i) + 1
            bar.refresh()

    @classmethod
    def tick(cls, progress_id: jax.Array | None, i: jax.Array) -> None:
        """Called inside the scan body; a no-op when ``progress_id`` is None."""
        if progress_id is not None:
            jax.debug.callback(cls._update, progress_id, i)


# ----------------------------------------------------------------------------- step callbacks
class StepCallback:
    """A Python function called on the host after each step of a compiled loop, which may
    return new latents (diffusers' ``callback_on_step_end``), through ``io_callback``.

    As :class:`ScanProgress`, the program carries only an integer id, so a new function never
    recompiles: ``with StepCallback(fn, n_images) as cb: f(..., callback_id=cb.id)``. ``fn(i,
    t, latents)`` gets the step index, the timestep and the (n_images, h, w, c) latents as
    numpy, and returns new latents of that shape or None. An exception inside ``fn`` is kept
    and raised again by ``__exit__``, after the program: the loop itself goes on with the
    latents unchanged.
    """

    _fns: dict[int, StepCallback] = {}
    _ids = itertools.count(1)
    _lock = threading.Lock()

    def __init__(self, fn: Callable, n_images: int):
        self.id = next(self._ids)
        self.fn, self.n_images, self.error = fn, int(n_images), None

    def __enter__(self) -> StepCallback:
        with self._lock:
            self._fns[self.id] = self
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._fns.pop(self.id, None)
        if self.error is not None and exc[0] is None:
            raise self.error

    @classmethod
    def _host(cls, cb_id: np.ndarray, i: np.ndarray, t: np.ndarray, x: np.ndarray) -> np.ndarray:
        with cls._lock:
            cb = cls._fns.get(int(cb_id))
        x = np.asarray(x)
        if cb is None or cb.error is not None:
            return x
        try:
            new = cb.fn(int(i), t.item(), x[: cb.n_images].copy())
            if new is None:
                return x
            new = np.asarray(new)
            if new.shape != (cb.n_images, *x.shape[1:]):
                raise ValueError(
                    f"callback_on_step_end returned latents of shape {new.shape}; expected "
                    f"{(cb.n_images, *x.shape[1:])} (images, h, w, c; NHWC)"
                )
            return np.concatenate([new.astype(x.dtype), x[cb.n_images :]])
        except Exception as err:  # noqa: BLE001 - raised again after the program
            cb.error = err
            return x

    @classmethod
    def apply(cls, callback_id: jax.Array, i: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
        """Inside the loop body: ``x`` after the host function of ``callback_id``."""
        from jax.experimental import io_callback

        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return io_callback(cls._host, shape, callback_id, i, t, x, ordered=True)


# ----------------------------------------------------------------------------- the driver
def image_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """One key per image: ``key`` itself if it is already a (batch_size,) array of keys."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if key.ndim == 1 and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape[0] != batch_size:
            raise ValueError(f"key holds {key.shape[0]} keys for a batch of {batch_size} images")
        return key
    if key.ndim != 0 or not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError(
            "key must be a typed PRNG key (jax.random.key(seed)) or a (batch,) array of them, "
            f"got dtype {key.dtype} and shape {key.shape}"
        )
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def per_image_normal(keys: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Gaussian noise of ``shape`` whose image ``b`` depends only on ``keys[b]``, so results do
    not change with the batch size, its padding, or the number of devices."""
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


def denoise(
    model_fn: ModelFn,
    scheduler: Any,
    state: Any,
    x_T: jax.Array,
    keys: jax.Array,
    *,
    step_kwargs: dict[str, Any] | None = None,
    progress_id: jax.Array | None = None,
    return_trajectory: bool = False,
    begin_index: int | jax.Array = 0,
    post_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    num_steps: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Runs the reverse process from ``x_T`` with ``lax.scan``; jit it from the outside.

    Args:
        model_fn: ``(x_in, t) -> model_output``, ``t`` a scalar timestep (traced).
        scheduler: any jaxdiff scheduler (its config is static Python).
        state: ``scheduler.set_timesteps(n, shape=x_T.shape)``: a pytree with fixed shapes.
        x_T: the starting sample, already scaled by ``state.init_noise_sigma``.
        keys: one PRNG key per image, shape (batch,) (see :func:`image_keys`). The noise of
            step ``i`` for image ``b`` is drawn from ``fold_in(keys[b], i)`` and passed to
            ``scheduler.step(..., noise=...)``; deterministic schedulers ignore it and XLA
            removes the draw.
        step_kwargs: extra ``step`` arguments (e.g. ``{"eta": eta}`` for DDIM); may be traced.
        progress_id: from :class:`ScanProgress`, or None for no bar.
        return_trajectory: also return every step's sample, stacked on a new leading axis.
        begin_index: start at ``state.timesteps[begin_index]`` (img2img's ``strength``, as
            diffusers' ``set_begin_index``); ``state.step_index`` must already equal it.
        post_step: ``(x_prev, i) -> x_prev``, applied after step ``i`` (inpainting's mask
            blend).
        num_steps: the number of steps N as a traced scalar, for a state padded by
            :func:`pad_state`: the loop is then a ``lax.fori_loop`` with traced bounds (an XLA
            while loop), so neither N nor ``begin_index`` is part of the compiled program.
            Default: ``len(state.timesteps)``, static, and a ``lax.scan``.

    Returns:
        x_0, or (x_0, trajectory) when ``return_trajectory``.
    """
    step_kwargs = step_kwargs or {}
    if keys.shape != x_T.shape[:1]:
        raise ValueError(f"keys must have shape {x_T.shape[:1]} (one per image), got {keys.shape}")

    def body(carry, i):
        x_t, st = carry
        t = st.timesteps[i]
        x_in = scheduler.scale_model_input(st, x_t, t)
        model_output = model_fn(x_in, t)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        noise = per_image_normal(step_keys, x_t.shape, jnp.float32)
        out = scheduler.step(st, model_output, t, x_t, noise=noise, **step_kwargs)
        ScanProgress.tick(progress_id, i - begin_index)
        x_prev = out.prev_sample.astype(x_t.dtype)
        if post_step is not None:
            x_prev = post_step(x_prev, i).astype(x_t.dtype)
        return (x_prev, out.state), (x_prev if return_trajectory else None)

    if num_steps is not None or not isinstance(begin_index, int):
        if return_trajectory:
            raise ValueError("return_trajectory needs a static step count (num_steps=None)")
        n = state.timesteps.shape[0] if num_steps is None else num_steps
        x_0, _ = jax.lax.fori_loop(begin_index, n, lambda i, carry: body(carry, i)[0], (x_T, state))
        return x_0
    n = state.timesteps.shape[0]
    if not 0 <= begin_index < n:
        raise ValueError(f"begin_index must be in [0, {n}), got {begin_index}")
    (x_0, _), trajectory = jax.lax.scan(body, (x_T, state), jnp.arange(begin_index, n))
    return (x_0, trajectory) if return_trajectory else x_0


def pad_state(state: Any, max_steps: int) -> Any:
    """``state`` (N steps) padded to the shapes of a ``max_steps`` state, so that every step
    count up to ``max_steps`` gives one program: ``timesteps`` (N,) is padded to
    (max_steps,) with NaN (float timesteps) or ``-1`` (integer ones), which
    :func:`jaxdiff.schedulers.common.count_steps` skips, and
    ``sigmas`` (N + 1,) or (N + 2,), where the scheduler has them, to (max_steps + 1,) or
    (max_steps + 2,) with its last value.
    Run the padded state with ``denoise(..., num_steps=N)``.
    """
    n = int(state.timesteps.shape[0])
    if n > max_steps:
        raise ValueError(f"cannot pad a state of {n} steps to max_steps={max_steps}")

    def pad(a, length, fill):
        a = jnp.asarray(a)
        extra = length - a.shape[0]
        tail = jnp.full((extra,) + a.shape[1:], fill, a.dtype) if fill is not None else None
        return jnp.concatenate([a, jnp.repeat(a[-1:], extra, 0) if tail is None else tail])

    floating = jnp.issubdtype(jnp.asarray(state.timesteps).dtype, jnp.floating)
    new = {"timesteps": pad(state.timesteps, max_steps, jnp.nan if floating else -1)}
    sigmas = getattr(state, "sigmas", None)
    if sigmas is not None:
        levels = sigmas.shape[0] - n  # 1, or 2 for Euler's "log_linear" (N + 2 levels)
        if levels not in (1, 2):
            raise ValueError(f"expected {n + 1} or {n + 2} sigmas for {n} steps, got {n + levels}")
        new["sigmas"] = pad(sigmas, max_steps + levels, None)
    return state.replace(**new)


def classifier_free_guidance(
    model_fn: Callable, guidance_scale: jax.Array, guidance_rescale: jax.Array | None = None
) -> ModelFn:
    r"""Classifier-free guidance, Ho & Salimans (2022), Eq. 6:
    :math:`\tilde\epsilon = \epsilon_\theta(x, \varnothing) + w\,(\epsilon_\theta(x, c) -
    \epsilon_\theta(x, \varnothing))`.

    With ``guidance_rescale`` :math:`\phi > 0`, the guided prediction is rescaled to the
    conditional one's standard deviation and mixed back (*Lin et al. (2024), "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", Sec. 3.4*), per image:

    .. math:: \tilde\epsilon_{\text{rescaled}} = \tilde\epsilon\,
              \frac{\operatorname{std}(\epsilon_\theta(x, c))}{\operatorname{std}(\tilde\epsilon)},
              \qquad \tilde\epsilon \leftarrow \phi\,\tilde\epsilon_{\text{rescaled}}
              + (1 - \phi)\,\tilde\epsilon,

    the standard deviations taken over (H, W, C) with Bessel's correction, as diffusers'
    ``rescale_noise_cfg`` (``torch.std``). :math:`\phi = 0` returns the plain guided prediction.

    ``model_fn(x, t)`` must evaluate a doubled batch ``[x, x]`` against
    ``[uncond, cond]`` contexts (it closes over them); ``guidance_scale`` and
    ``guidance_rescale`` may be traced, so new values do not recompile.
    """

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn(jnp.concatenate([x, x], axis=0), t)
        uncond, cond = jnp.split(out, 2, axis=0)
        cfg = uncond + guidance_scale * (cond - uncond)
        if guidance_rescale is None:
            return cfg
        ratio = _image_std(cond) / _image_std(cfg)
        rescaled = guidance_rescale * (cfg * ratio) + (1 - guidance_rescale) * cfg
        return jnp.where(guidance_rescale > 0, rescaled.astype(cfg.dtype), cfg)

    return guided


def _image_std(a: jax.Array) -> jax.Array:
    """Per-image standard deviation over all but the batch axis, Bessel-corrected, in fp32."""
    axes = tuple(range(1, a.ndim))
    return jnp.std(a.astype(jnp.float32), axis=axes, ddof=1, keepdims=True)


# ----------------------------------------------------------------------------- devices
def batch_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``"batch"`` over ``devices`` (default: all local devices)."""
    devices = devices if devices is not None else jax.local_devices()
    return Mesh(np.asarray(devices), ("batch",))


def padded_batch_size(batch_size: int, num_devices: int) -> int:
    """The smallest multiple of ``num_devices`` >= ``batch_size`` (padding is trimmed later)."""
    return -(-batch_size // num_devices) * num_devices


def shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Places ``x`` with its leading (batch) axis split over the mesh's ``"batch"`` axis."""
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` (e.g. params) on all devices of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def pmap_program(
    cache: dict, key: Any, make_fn: Callable[[], Callable], in_axes: Any, *args: Any
) -> Any:
    """``jax.pmap(make_fn(), in_axes)`` compiled for ``args`` with :func:`compiler_options`,
    cached in ``cache`` under ``key`` and the arguments' tree and abstract values.

    ``jax.pmap`` caches per function object and takes no compiler options; a pipeline that
    builds its per-device function at each call would recompile at each call.
    """
    leaves, tree = jax.tree_util.tree_flatten(args)
    signature = (key, tree, tuple(jax.typeof(x) for x in leaves))
    if signature not in cache:
        lowered = jax.pmap(make_fn(), in_axes=in_axes).lower(*args)
        cache[signature] = lowered.compile(compiler_options=compiler_options() or None)
    return cache[signature]


def pmap_denoise(
    model_fn_builder: Callable[[Any], ModelFn],
    scheduler: Any,
    state: Any,
    params: Any,
    x_T: jax.Array,
    keys: jax.Array,
    *,
    step_kwargs: dict[str, Any] | None = None,
    cache: dict | None = None,
    cache_key: Any = None,
) -> jax.Array:
    """The ``pmap`` path: splits the batch over the local devices, one scan per device.

    Args:
        model_fn_builder: ``params -> model_fn`` (called inside the pmapped function).
        state: a state built for the *per-device* sample shape.
        x_T: the full batch; its size must divide by the number of local devices.
        keys: one key per image, as for :func:`denoise`, so results equal the jit path's.
        cache, cache_key: where the compiled program is kept (:func:`pmap_program`); the key
            must identify ``model_fn_builder`` and ``scheduler``. Default: compile anew.
    """
    n = jax.local_device_count()
    if x_T.shape[0] % n:
        raise ValueError(
            f"pmap sampling needs a batch size divisible by the {n} local devices, "
            f"got {x_T.shape[0]}; use the sharded (jit) path, which pads"
        )

    def split(a):
        return a.reshape((n, a.shape[0] // n) + a.shape[1:])

    def make_fn():
        def per_device(params, x, k, state, step_kwargs):
            model_fn = model_fn_builder(params)
            return denoise(model_fn, scheduler, state, x, k, step_kwargs=step_kwargs)

        return per_device

    args = (params, split(x_T), split(keys), state, step_kwargs or {})
    cache = {} if cache is None else cache
    out = pmap_program(cache, ("pmap_denoise", cache_key), make_fn, (None, 0, 0, None, None), *args)
    return out(*args).reshape(x_T.shape)
