"""Training DDPMs: the loss, the train state and step, data, checkpoints and the loop.

from jaxdiff.training import TrainConfig, train
train(TrainConfig(data="cifar10-cats", out="runs/cats", steps=20_000, batch=64))
"""

from jaxdiff.training.checkpoints import CheckpointManager, restore_latest
from jaxdiff.training.data import BatchIterator, DatasetError, load_dataset
from jaxdiff.training.loop import (
    MODEL_PRESETS,
    TrainConfig,
    TrainResult,
    build_scheduler,
    build_unet,
    train,
)
from jaxdiff.training.losses import PREDICTION_TYPES, diffusion_loss, min_snr_weights, snr
from jaxdiff.training.train_state import (
    TrainState,
    TrainStep,
    ema_decay_at,
    ema_update,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
)

__all__ = [
    "MODEL_PRESETS",
    "PREDICTION_TYPES",
    "BatchIterator",
    "CheckpointManager",
    "DatasetError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainStep",
    "build_scheduler",
    "build_unet",
    "diffusion_loss",
    "ema_decay_at",
    "ema_update",
    "load_dataset",
    "make_lr_schedule",
    "make_optimizer",
    "make_train_step",
    "min_snr_weights",
    "restore_latest",
    "snr",
    "train",
]
