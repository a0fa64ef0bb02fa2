r"""Unconditional image generation: ``DDPMPipeline`` and ``DDIMPipeline``.

Both sample :math:`x_T \sim \mathcal N(0, \sigma_{init}^2 I)` and run the reverse process with
the pipeline's scheduler through :func:`jaxdiff.sampling.denoise`; the whole loop and the
final :math:`x_0 \mapsto (x_0 + 1)/2` are one compiled XLA program per (batch size, step count,
scheduler). The seed is an argument of that program, so a new seed never recompiles::

    pipe = DiffusionPipeline.from_pretrained("path/to/ddpm-cats")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe(batch_size=4, num_inference_steps=50, seed=0).images
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import sampling
from jaxdiff.pipelines.pipeline_utils import (
    DiffusionPipeline,
    ImagePipelineOutput,
    pipeline_result,
    to_output,
)
from jaxdiff.utils.checks import check_real
from jaxdiff.utils.xla import compiler_options


def resolve_key(key: jax.Array | None, seed: int | None) -> jax.Array:
    """The pipeline's PRNG key from ``key=`` or ``seed=`` (exactly one is required)."""
    if key is not None and seed is not None:
        raise ValueError("pass either key= or seed=, not both")
    if key is None and seed is None:
        raise ValueError(
            "sampling is random: pass seed=<int> or key=jax.random.key(<int>) "
            "(or a (batch_size,) array of keys, one per image)"
        )
    if key is None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits, in [-2**63, 2**63), got {seed}")
        return jax.random.key(int(seed))
    return key


class UnconditionalPipeline(DiffusionPipeline):
    """Shared body of DDPMPipeline and DDIMPipeline (they differ only in defaults)."""

    _components = ("unet", "scheduler")
    default_steps = 1000

    def _sample_fn(self, mesh: Any, static_kwargs: tuple = ()):
        cache_key = ("sample", *self._component_ids(), mesh, static_kwargs)
        if cache_key not in self._jit_cache:
            unet, scheduler = self.unet, self.scheduler

            def run(params, keys, state, step_kwargs, progress_id, shape):
                if mesh is not None:
                    keys = jax.lax.with_sharding_constraint(
                        keys, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
                    )

                def model_fn(x, t):
                    t = jnp.broadcast_to(t, (x.shape[0],))
                    return unet.apply({"params": params}, x.astype(unet.dtype), t).sample

                init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
                step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
                x_T = sampling.per_image_normal(init_keys, shape) * state.init_noise_sigma
                x_0 = sampling.denoise(
                    model_fn,
                    scheduler,
                    state,
                    x_T,
                    step_keys,
                    step_kwargs={**step_kwargs, **dict(static_kwargs)},
                    progress_id=progress_id,
                )
                return jnp.clip(x_0.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

            self._jit_cache[cache_key] = jax.jit(
                run, static_argnames=("shape",), compiler_options=compiler_options()
            )
        return self._jit_cache[cache_key]

    def _step_kwargs(self, **kwargs) -> tuple[dict[str, Any], tuple]:
        """(traced step options, static step options as a hashable tuple)."""
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s) {sorted(kwargs)}")
        return {}, ()

    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        key: jax.Array | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        progress: bool = True,
        use_pmap: bool = False,
        return_dict: bool = True,
        **step_options,
    ) -> ImagePipelineOutput:
        """Generates ``batch_size`` images.

        Args:
            batch_size: number of images; on several devices the batch is sharded (and padded
                to a multiple of the device count; the padding is dropped).
            num_inference_steps: scheduler steps (default: 1000 for DDPM, 50 for DDIM).
            key / seed: the randomness: a PRNG key, a (batch_size,) array of keys (one per
                image), or an int seed. Image ``b`` depends only on its own key.
            output_type: ``"pil"`` (list of PIL images) or ``"np"`` (float array in [0, 1]).
            progress: show a progress bar driven from inside the compiled loop.
            use_pmap: run with ``jax.pmap`` instead of a sharded ``jit``.
            return_dict: False returns the tuple ``(images,)``, as diffusers.
            **step_options: scheduler step options (``eta``, ``use_clipped_model_output`` for
                DDIM).
        """
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        keys = sampling.image_keys(resolve_key(key, seed), int(batch_size))
        step_kwargs, static_kwargs = self._step_kwargs(**step_options)
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
        h, w = (size, size) if isinstance(size, int) else size
        n_dev = jax.local_device_count()
        padded = sampling.padded_batch_size(int(batch_size), n_dev)
        if padded != batch_size:
            extra = jax.vmap(lambda i: jax.random.fold_in(keys[0], i))(
                jnp.arange(batch_size, padded) + 2**20
            )
            keys = jnp.concatenate([keys, extra])
        per_shape = (padded // n_dev if use_pmap else padded, h, w, c.in_channels)
        state = self.scheduler.set_timesteps(steps, shape=per_shape)
        params = self.params["unet"]
        if use_pmap:
            images = self._pmap_sample(
                params,
                keys,
                state,
                {**step_kwargs, **dict(static_kwargs)},
                (padded, h, w, c.in_channels),
            )
        else:
            mesh = sampling.batch_mesh() if n_dev > 1 else None
            if mesh is not None:
                keys = sampling.shard_batch(keys, mesh)
                params = sampling.replicate(params, mesh)
            total = int(state.timesteps.shape[0])
            with self._progress_bar(total, progress) as bar:
                images = self._sample_fn(mesh, static_kwargs)(
                    params,
                    keys,
                    state,
                    step_kwargs,
                    jnp.asarray(bar.id) if bar.enabled else None,
                    shape=(padded, h, w, c.in_channels),
                )
                images = jax.block_until_ready(images)
        return pipeline_result(to_output(np.asarray(images)[:batch_size], output_type), return_dict)

    def _pmap_sample(self, params, keys, state, step_kwargs, shape):
        unet = self.unet

        def builder(p):
            def model_fn(x, t):
                t = jnp.broadcast_to(t, (x.shape[0],))
                return unet.apply({"params": p}, x.astype(unet.dtype), t).sample

            return model_fn

        init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        x_T = sampling.per_image_normal(init_keys, shape) * state.init_noise_sigma
        x_0 = sampling.pmap_denoise(
            builder,
            self.scheduler,
            state,
            params,
            x_T,
            step_keys,
            step_kwargs=step_kwargs,
            cache=self._jit_cache,
            cache_key=self._component_ids(),
        )
        return jnp.clip(x_0.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


class DDPMPipeline(UnconditionalPipeline):
    r"""Unconditional sampling as in Ho et al. (2020), Algorithm 2 (1000 steps by default)."""

    default_steps = 1000


class DDIMPipeline(UnconditionalPipeline):
    r"""Unconditional DDIM sampling, Song et al. (2021), Eq. 12 (50 steps, η = 0 by default).

    ``eta`` and ``use_clipped_model_output`` are passed to the scheduler's step; the scheduler
    should be a ``DDIMScheduler`` (diffusers converts it; here any scheduler works, and only
    DDIM takes ``eta``).
    """

    default_steps = 50

    def __init__(self, params=None, dtype=jnp.float32, **components):
        from jaxdiff.schedulers.ddim import DDIMScheduler

        # As diffusers' DDIMPipeline: the scheduler it is given is rebuilt as a DDIMScheduler.
        scheduler = components.get("scheduler")
        if scheduler is not None and not isinstance(scheduler, DDIMScheduler):
            components["scheduler"] = DDIMScheduler.from_config(scheduler.config)
        super().__init__(params=params, dtype=dtype, **components)

    def _step_kwargs(self, eta: float = 0.0, use_clipped_model_output: bool | None = None):
        from jaxdiff.schedulers.ddim import DDIMScheduler

        if not isinstance(self.scheduler, DDIMScheduler):
            if eta != 0.0 or use_clipped_model_output is not None:
                raise ValueError(
                    f"eta / use_clipped_model_output need a DDIMScheduler, the pipeline has "
                    f"{type(self.scheduler).__name__}"
                )
            return {}, ()
        check_real("eta", eta, low=0)
        static = ()
        if use_clipped_model_output is not None:
            static = (("use_clipped_model_output", bool(use_clipped_model_output)),)
        return {"eta": jnp.float32(eta)}, static
