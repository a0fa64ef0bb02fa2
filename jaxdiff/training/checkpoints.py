"""Training checkpoints with orbax-checkpoint: the whole :class:`TrainState` plus run metadata.

A checkpoint at step ``s`` is the folder ``<dir>/<s>/`` holding

* ``state``: the params, EMA params, optimizer state and step (orbax ``StandardSave``);
* ``meta``: JSON with the step, the data seed, the data position (the step whose batch comes
  next) and anything else the caller adds.

orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed
mid-write (even with SIGKILL) leaves only whole checkpoints behind; ``max_to_keep`` prunes the
oldest. Because the data order and the step keys are pure functions of (seed, step), restoring
the state of step ``s`` is all a resumed run needs to continue exactly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


class CheckpointManager:
    """Saves and restores training checkpoints under ``directory``.

    Args:
        directory: the checkpoint root (created if missing).
        keep: how many of the most recent checkpoints to keep (None: all).
        async_save: write checkpoints in a background thread (training goes on meanwhile).
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3, async_save: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def save(
        self, step: int, state: Any, meta: dict[str, Any] | None = None, force: bool = True
    ) -> None:
        """Starts writing the checkpoint of ``step`` (returns before it is done when async)."""
        tree = serialization.to_state_dict(state)
        meta = {"step": int(step), **(meta or {})}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of checkpoint ``step``; ``target`` is a state of the same structure
        (e.g. a freshly initialized one) whose shardings the restored arrays take."""
        template = serialization.to_state_dict(target)
        abstract = jax.tree_util.tree_map(_abstract, template)
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        state = serialization.from_state_dict(target, restored.state)
        return state, dict(restored.meta)

    def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, meta)`` of the newest complete checkpoint, or None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, target)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def load_checkpoint_arrays(
    directory: str | os.PathLike, step: int | None = None
) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of checkpoint ``step`` (default: the newest) as nested dicts of
    numpy arrays, without a target state (for inspection and tests)."""
    manager = CheckpointManager(directory, keep=None, async_save=False)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {os.fspath(directory)!r}")
        # Restore onto this process's first device whatever topology wrote the checkpoint.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        metadata = manager._manager.item_metadata(int(step)).state
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
        )
        restored = manager._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    finally:
        manager.close()
    return jax.tree_util.tree_map(np.asarray, restored.state), dict(restored.meta)


def restore_latest(directory: str | os.PathLike, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(state, meta)`` of the newest checkpoint under ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    manager = CheckpointManager(directory, keep=None, async_save=False)
    try:
        return manager.restore_latest(target)
    finally:
        manager.close()


__all__ = ["CheckpointManager", "load_checkpoint_arrays", "restore_latest"]
