r"""Multi-host sampling: data parallel over processes, sharded over devices within each.

jaxdiff scales out on JAX's own runtime (no launcher of its own). Start one Python process per
host (``srun``, ``mpirun``, a TPU pod's workers, or by hand) and call :func:`initialize` first
in each: it wraps :func:`jax.distributed.initialize`, which connects the processes through a
coordinator (process 0) and makes every device of the cluster visible in ``jax.devices()``.

Sampling is then split in two levels:

* **over hosts, data parallel.** A global batch of :math:`n` images is cut into one contiguous
  block per process (:func:`process_share`, sizes differing by at most one). Each process
  runs the whole pipeline on its own block; nothing crosses hosts while denoising, so the
  hosts' interconnect only carries the finished images (:func:`gather_images`).
* **within a host, sharded.** The pipeline splits its block over the host's local devices
  (``jax.sharding`` over ``jax.local_devices()``, see :func:`jaxdiff.sampling.shard_batch`).

Randomness is keyed per image: image :math:`b` of the global batch uses
``image_keys(key, n)[b]`` whatever process, batch, padding or device count makes it, so
:func:`generate` on any number of hosts returns the images a single process would make with
``pipe(prompts, key=image_keys(key, n))``.

Example, on each of two hosts (process ids 0 and 1)::

    import jax
    import jaxdiff.distributed as dist
    from jaxdiff.pipelines import DiffusionPipeline

    dist.initialize("10.0.0.1:1234", num_processes=2, process_id=PROCESS_ID)
    pipe = DiffusionPipeline.from_pretrained("path/to/sd")
    images = dist.generate(pipe, prompts, jax.random.key(0), num_inference_steps=30)
    if jax.process_index() == 0:
        ...  # every process holds all images; save them once
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxdiff import sampling

ENV_COORDINATOR = "JAXDIFF_COORDINATOR"
ENV_NUM_PROCESSES = "JAXDIFF_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXDIFF_PROCESS_ID"
_MAX_NDIM = 8  # the most image axes gather_images moves

__all__ = [
    "initialize",
    "is_initialized",
    "process_share",
    "split_for_process",
    "gather_images",
    "generate",
]


# ----------------------------------------------------------------------------- initialize
def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def is_initialized() -> bool:
    """Whether the JAX distributed runtime is up (through :func:`initialize` or directly)."""
    return jax.distributed.is_initialized()


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> None:
    """Joins this process to a multi-host JAX cluster (:func:`jax.distributed.initialize`).

    Call it once per process, before any other JAX call (JAX refuses to start the distributed
    runtime once a backend exists). A second call is a no-op, so library code can call it
    defensively; it raises only if the second call asks for a different ``num_processes`` or
    ``process_id`` than the running cluster has.

    Arguments left ``None`` fall back to the environment variables ``JAXDIFF_COORDINATOR``,
    ``JAXDIFF_NUM_PROCESSES`` and ``JAXDIFF_PROCESS_ID``; if all three are still unset, JAX
    detects the cluster itself (Slurm, Open MPI, Cloud TPU, ``JAX_COORDINATOR_ADDRESS``, ...).

    On CPU, cross-process collectives (needed by :func:`gather_images`) go through gloo: if
    ``jax_cpu_collectives_implementation`` is unset it is set to ``"gloo"`` (jax 0.10's
    default); an explicit choice such as ``"mpi"`` is kept.

    Args:
        coordinator_address: ``"host:port"`` of process 0, where the coordinator listens.
        num_processes: the number of processes in the cluster.
        process_id: this process's index in ``[0, num_processes)``; given together with
            ``num_processes``.
        local_device_ids: restricts this process to these local devices (e.g. one GPU each).
        **kwargs: passed to :func:`jax.distributed.initialize` (``initialization_timeout``,
            ``cluster_detection_method``, ...).

    Raises:
        ValueError: ``num_processes`` without ``process_id`` or the reverse, a value out of
            range, a malformed address, a cluster that cannot be detected, or a second call
            that disagrees with the running cluster.
        RuntimeError: from JAX, if a JAX backend was already started in this process.
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)

    if (num_processes is None) != (process_id is None):
        given, missing = (
            ("num_processes", "process_id")
            if process_id is None
            else ("process_id", "num_processes")
        )
        raise ValueError(
            f"{given} was given without {missing}: pass both (or set {ENV_NUM_PROCESSES} and "
            f"{ENV_PROCESS_ID}), or neither to let JAX detect the cluster"
        )
    if num_processes is not None:
        num_processes = _check_int("num_processes", num_processes, 1)
        process_id = _check_int("process_id", process_id, 0)
        if process_id >= num_processes:
            raise ValueError(
                f"process_id must be in [0, num_processes), got process_id={process_id} with "
                f"num_processes={num_processes}"
            )
    if coordinator_address is not None:
        host, sep, port = str(coordinator_address).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"coordinator_address must be 'host:port' (process 0's address), got "
                f"{coordinator_address!r}"
            )

    if jax.distributed.is_initialized():
        current = (jax.process_count(), jax.process_index())
        if num_processes is not None and (num_processes, process_id) != current:
            raise ValueError(
                f"the distributed runtime is already running as process {current[1]} of "
                f"{current[0]}; initialize() was called again with process_id={process_id}, "
                f"num_processes={num_processes}"
            )
        return

    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            **kwargs,
        )
    except ValueError as err:
        if coordinator_address is None or num_processes is None:
            raise ValueError(
                f"{err} No cluster was detected: pass coordinator_address, num_processes and "
                f"process_id, or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}."
            ) from err
        raise


# ----------------------------------------------------------------------------- splitting
def process_share(
    n_items: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    r"""The contiguous block of a global batch that one process makes.

    Process :math:`p` of :math:`P` gets :math:`\lfloor n/P \rfloor + [p < n \bmod P]` items,
    in order: the blocks tile ``range(n_items)`` and their sizes differ by at most one (with
    fewer items than processes, the last processes get empty slices).

    Args:
        n_items: the global batch size.
        process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.

    Returns:
        ``slice(start, stop)`` into the global batch.
    """
    n_items = _check_int("n_items", n_items, 0)
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    count = _check_int("process_count", count, 1)
    index = _check_int("process_index", index, 0)
    if index >= count:
        raise ValueError(f"process_index must be in [0, {count}), got {index}")
    base, rem = divmod(n_items, count)
    start = index * base + min(index, rem)
    return slice(start, start + base + (index < rem))


def split_for_process(items: Sequence[Any]) -> Sequence[Any]:
    """This process's block of ``items`` (a list, array, ...): ``items[process_share(len)]``."""
    return items[process_share(len(items))]


# ----------------------------------------------------------------------------- gathering
def _allgather(x: np.ndarray) -> np.ndarray:
    """(P, *x.shape): every process's ``x`` (same shape and dtype everywhere), process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def gather_images(local_images: np.ndarray) -> np.ndarray:
    """Concatenates every process's images in process order; every process gets them all.

    The processes' counts may differ (as :func:`process_share` makes them for ``n`` not a
    multiple of the process count, including empty shares ``(0, H, W, C)``): each process pads
    its block to the largest count, one ``process_allgather`` moves them, and the padding is
    trimmed. The trailing shape and dtype must agree across processes (checked); the bytes are
    moved as they are, so any numeric dtype arrives exactly. Every process must call it.

    Args:
        local_images: ``(n_local, ...)`` array of this process's images.

    Returns:
        ``(sum of n_local, ...)`` numpy array, identical on every process.
    """
    local_images = np.asarray(local_images)
    if local_images.ndim == 0:
        raise ValueError("local_images must have a leading batch axis, got a scalar")
    if local_images.dtype.hasobject:
        raise TypeError("local_images must be a numeric array, got dtype object")
    if jax.process_count() == 1:
        return local_images
    if local_images.ndim > _MAX_NDIM:
        raise ValueError(f"local_images has {local_images.ndim} axes, at most {_MAX_NDIM}")
    # One small collective first: every process's (ndim, dtype, shape), to check agreement and
    # learn the counts. process_allgather needs the same shape everywhere, hence a fixed size.
    header = np.zeros(2 + _MAX_NDIM, np.int32)
    header[0], header[1] = local_images.ndim, local_images.dtype.num
    header[2 : 2 + local_images.ndim] = local_images.shape
    headers = _allgather(header)
    if len({tuple(h[:2]) + tuple(h[3:]) for h in headers.tolist()}) != 1:
        raise ValueError(
            "processes hold images of different ranks, dtypes or trailing shapes: "
            f"(ndim, dtype num, shape...) = {headers.tolist()}"
        )
    counts = headers[:, 2]
    n_max = int(counts.max())
    if n_max == 0:
        return local_images
    # Moved as raw bytes: with jax_enable_x64 off, a float64/int64 array would be cut to 32 bits.
    padded = np.zeros((n_max,) + local_images.shape[1:], local_images.dtype)
    padded[: local_images.shape[0]] = local_images
    stacked = _allgather(padded.reshape(n_max, -1).view(np.uint8))
    stacked = stacked.view(local_images.dtype).reshape(
        (len(counts), n_max) + local_images.shape[1:]
    )
    return np.concatenate([stacked[p, : int(c)] for p, c in enumerate(counts)])


# ----------------------------------------------------------------------------- text2img
def generate(
    pipe: Any,
    prompts: str | Sequence[str],
    key: jax.Array,
    *,
    num_images_per_prompt: int = 1,
    negative_prompt: str | Sequence[str] | None = None,
    latents: Any = None,
    output_type: str = "np",
    **kwargs: Any,
) -> np.ndarray:
    r"""Text-to-image over all processes; every process returns the full batch.

    The global batch is ``prompts`` with each prompt repeated ``num_images_per_prompt`` times
    (diffusers' order). Image :math:`b` gets ``image_keys(key, n)[b]``; this process runs
    ``pipe`` on its :func:`process_share` of the images and keys, and :func:`gather_images`
    assembles the result. The images equal those of one process running
    ``pipe(prompts, key=key, num_images_per_prompt=k)`` (up to float rounding from different
    batch sizes). A process whose share is empty (fewer images than processes) makes one
    throw-away image so that it knows the image shape and joins the collective.

    Every process must call it with the same arguments (it is a collective).

    Args:
        pipe: a text-to-image pipeline (e.g. ``StableDiffusionPipeline``) taking
            ``prompt, key=(n,) keys, output_type=...``.
        prompts: a prompt or a list of prompts.
        key: a typed PRNG key (``jax.random.key(seed)``), or an ``(n_images,)`` array of them.
        num_images_per_prompt: images per prompt.
        negative_prompt: one string for all, or one per prompt.
        latents: optional starting noise, ``(n_images, h, w, c)``; split with the images.
        output_type: ``"np"`` (float (n, H, W, 3) in [0, 1]) or ``"latent"``.
        **kwargs: passed to ``pipe`` (``num_inference_steps``, ``guidance_scale``, ``height``,
            ``width``, ``progress``, ...).

    Returns:
        ``(n_images, ...)`` numpy array, the same on every process.
    """
    if output_type not in ("np", "latent"):
        raise ValueError(
            f"output_type must be 'np' or 'latent' (arrays are gathered across processes), got "
            f"{output_type!r}; convert afterwards, e.g. with jaxdiff.utils.numpy_to_pil"
        )
    for name in ("prompt", "prompt_embeds", "negative_prompt_embeds", "seed"):
        if name in kwargs:
            raise TypeError(f"generate() does not take {name}=; pass prompts and key")
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    k = _check_int("num_images_per_prompt", num_images_per_prompt, 1)
    per_image_prompts = [p for p in prompt_list for _ in range(k)]
    n = len(per_image_prompts)
    if isinstance(negative_prompt, (list, tuple)):
        if len(negative_prompt) != len(prompt_list):
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries for {len(prompt_list)} "
                "prompts: give one per prompt, a single string, or None"
            )
        negative_prompt = [q for q in negative_prompt for _ in range(k)]
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        if latents.shape[:1] != (n,):
            raise ValueError(f"latents must hold one entry per image ({n}), got {latents.shape}")
    keys = sampling.image_keys(key, n)

    share = process_share(n)
    empty = share.start == share.stop
    run = slice(0, 1) if empty else share  # an empty share makes one image to learn the shape
    if negative_prompt is not None:
        kwargs["negative_prompt"] = (
            negative_prompt[run] if isinstance(negative_prompt, list) else negative_prompt
        )
    if latents is not None:
        kwargs["latents"] = latents[run]
    images = pipe(per_image_prompts[run], key=keys[run], output_type=output_type, **kwargs).images
    images = np.asarray(images)
    if empty:
        images = images[:0]
    return gather_images(images)
