r"""The training loop: ``train(TrainConfig(...))`` trains a ``UNet2DModel`` DDPM end to end.

Ho et al. (2020), Algorithm 1, repeated ``steps`` times through the jitted data-parallel step
of :mod:`jaxdiff.training.train_state`, with everything a run needs around it::

    <out>/run.json            the run's config (what --resume checks against)
    <out>/loss.csv            step, loss (mean over the last log_every steps), lr
    <out>/loss.png            the loss curve (drawn with PIL)
    <out>/samples/step_N.png  DDIM samples from the EMA weights every sample_every steps
    <out>/checkpoints/N/      orbax checkpoints (state + data position), the last `keep`
    <out>/pipeline/           the final DDPMPipeline (EMA weights) in diffusers layout

Step ``s`` uses the batch ``BatchIterator(seed).uint8_batch(s)`` and the key
``fold_in(fold_in(key(seed), 1), s)``: both pure functions of (seed, s), so a run resumed from
the checkpoint of step ``s`` (``resume=True``) ends with exactly the params of an uninterrupted
run. Steps run ``steps_per_call`` at a time in one compiled program (``TrainStep.steps``) wherever
no checkpoint or sample falls among them, one at a time otherwise; a resumed run does the same
from the same step, so it repeats the uninterrupted run's calls exactly (a different
``steps_per_call`` gives the same params up to float round-off).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.training import data as data_lib
from jaxdiff.training.checkpoints import CheckpointManager
from jaxdiff.training.losses import check_prediction_type, check_snr_gamma
from jaxdiff.training.train_state import (
    TrainState,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
    replicate_state,
)

RUN_FILE = "run.json"

# UNet2DModel configs by name (diffusers config fields). ``sample_size`` is set from the
# resolution.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Test size: 2 levels, attention at the lower one.
    "tiny": {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    },
    # Small CIFAR-size DDPM: 32 -> 16 -> 8 -> 4, attention at 8x8 (Ho et al. 2020 use 16x16 in a
    # 35.7M-param model). 4.31M params: 17.3 MB of fp32 safetensors.
    "cats-32": {
        "block_out_channels": (32, 64, 64, 128),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "attention_head_dim": 32,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    },
}

# Fields that define a run: resuming with any of them changed is refused. (``steps`` may grow:
# the cosine schedule then stretches to the new end.)
_RUN_FIELDS = (
    "data",
    "resolution",
    "batch",
    "lr",
    "warmup",
    "ema_decay",
    "seed",
    "prediction_type",
    "snr_gamma",
    "model",
    "unet_config",
    "num_train_timesteps",
    "beta_schedule",
    "bf16",
    "flip",
    "weight_decay",
    "grad_clip",
    "init_from",
)


@dataclass
class TrainConfig:
    """A training run (every field has a ``jaxdiff train`` flag of the same name).

    Attributes:
        data: an image folder, an ``.npz`` file or ``"cifar10-cats"``.
        out: the run folder (see the module docstring).
        resolution: square image size.
        steps: total optimizer steps.
        batch: global batch size (split over all local devices; a multiple of their count).
        lr: peak learning rate (AdamW); ``warmup`` linear warmup steps, then cosine decay to 0.
        ema_decay: maximum EMA decay (with diffusers' (1+s)/(10+s) warmup).
        seed: one seed for the init, the data order, the flips and the noise.
        checkpoint_every: save a checkpoint every this many steps (and at the end); 0: end only.
        keep: checkpoints kept.
        sample_every: sample grid every this many steps (and at the end); 0: end only;
            negative: never.
        sample_count, sample_steps: images in the grid and their DDIM steps.
        log_every: loss.csv / progress-bar interval.
        steps_per_call: optimizer steps per compiled call (a ``lax.scan``; see
            :class:`~jaxdiff.training.train_state.TrainStep`): fewer calls, less per-call
            overhead (on the CPU, the temp buffer's page faults). 1: a call per step.
        prediction_type: "epsilon", "v_prediction" or "sample".
        snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's value);
            None: the unweighted loss.
        model: a preset of ``MODEL_PRESETS``; ``unet_config`` overrides its fields.
        num_train_timesteps, beta_schedule: the DDPM forward process (DDPMScheduler).
        bf16: bfloat16 compute, float32 master weights.
        resume: continue from the newest checkpoint in ``out``.
        flip: random horizontal flips.
        resize: resize + center-crop folder / npz images to ``resolution``.
        weight_decay, grad_clip: AdamW decay and global-norm clipping.
        init_from: start from a trained ``UNet2DModel`` instead of a random init: a pipeline
            folder or repo in diffusers layout (its ``unet/``), or a UNet folder. Its config
            replaces ``model`` / ``unet_config``; the EMA starts at its weights, the optimizer
            and the schedule start fresh (fine-tuning, or training on after an export).
        progress: show the tqdm bar.
        async_checkpoints: write checkpoints in the background.
    """

    data: str
    out: str
    resolution: int = 32
    steps: int = 10_000
    batch: int = 64
    lr: float = 2e-4
    warmup: int = 500
    ema_decay: float = 0.9999
    seed: int = 0
    checkpoint_every: int = 1000
    keep: int = 3
    sample_every: int = 1000
    sample_count: int = 16
    sample_steps: int = 50
    log_every: int = 10
    steps_per_call: int = 8
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    model: str = "cats-32"
    unet_config: dict[str, Any] = field(default_factory=dict)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    bf16: bool = False
    resume: bool = False
    flip: bool = True
    resize: bool = True
    weight_decay: float = 1e-6
    grad_clip: float | None = 1.0
    init_from: str | None = None
    progress: bool = True
    async_checkpoints: bool = True

    def validate(self) -> None:
        positive = (
            "resolution",
            "steps",
            "batch",
            "log_every",
            "steps_per_call",
            "keep",
            "sample_count",
            "sample_steps",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "checkpoint_every", "sample_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("warmup", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "ema_decay", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if name == "grad_clip" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise ValueError(
                f"grad_clip must be a finite number > 0 (or None: off), got {self.grad_clip}"
            )
        check_prediction_type(self.prediction_type)
        check_snr_gamma(self.snr_gamma)
        if self.init_from is not None and self.unet_config:
            raise ValueError(
                "unet_config cannot be combined with init_from: the model's config comes from "
                f"{self.init_from!r}"
            )
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"model must be one of {sorted(MODEL_PRESETS)}, got {self.model!r}")

    def run_fields(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps({k: d[k] for k in _RUN_FIELDS}))


@dataclass
class TrainResult:
    """What :func:`train` returns: the final state (host arrays), paths and the last loss."""

    state: TrainState
    out: Path
    pipeline_dir: Path
    last_loss: float | None
    steps_run: int
    seconds: float


def _unet_subfolder(path_or_repo: str) -> str | None:
    """``"unet"`` for a pipeline folder/repo (it has ``model_index.json``), else None."""
    from jaxdiff import hub

    return "unet" if hub.resolve_file(path_or_repo, "model_index.json", required=False) else None


def load_init_unet(path_or_repo: str):
    """``(UNet2DModel, float32 params)`` of ``TrainConfig.init_from``."""
    from jaxdiff.models.unet_2d import UNet2DModel

    return UNet2DModel.from_pretrained(
        path_or_repo, subfolder=_unet_subfolder(path_or_repo), dtype=jnp.float32
    )


def build_unet(config: TrainConfig):
    """The ``UNet2DModel`` of ``config`` (float32 module; the step clones it for bf16)."""
    from jaxdiff.models.unet_2d import UNet2DModel

    if config.init_from is not None:  # the architecture only: no weights are read
        from jaxdiff.configuration import load_config

        path = config.init_from
        return UNet2DModel.from_config(load_config(path, subfolder=_unet_subfolder(path)))

    fields = {**MODEL_PRESETS[config.model], **(config.unet_config or {})}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    fields["sample_size"] = config.resolution
    return UNet2DModel(**fields)


def build_scheduler(config: TrainConfig):
    """The training ``DDPMScheduler`` (also the exported pipeline's scheduler)."""
    from jaxdiff.schedulers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
    )


# ----------------------------------------------------------------------------- run folder
def _check_out_dir(config: TrainConfig) -> bool:
    """Creates or checks ``out``. Returns True if a run is to be resumed from it."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out {str(out)!r} exists and is not a folder")
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    run_file = out / RUN_FILE
    if not entries:
        out.mkdir(parents=True, exist_ok=True)
        return False
    if not run_file.is_file():
        raise FileExistsError(
            f"out {str(out)!r} is not empty and holds no {RUN_FILE}: it is not a jaxdiff training "
            "run; choose an empty or new folder (nothing there is overwritten)"
        )
    if not config.resume:
        raise FileExistsError(
            f"out {str(out)!r} already holds a training run; pass --resume to continue it, or "
            "choose another --out"
        )
    saved = json.loads(run_file.read_text())
    mine = config.run_fields()
    diff = {k: (saved.get(k), mine[k]) for k in mine if saved.get(k) != mine[k]}
    if diff:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"cannot resume the run in {str(out)!r} with a different config ({listed})"
        )
    return True


def _write_run_file(config: TrainConfig) -> None:
    data = {**config.run_fields(), "steps": config.steps, "jax_version": jax.__version__}
    path = Path(config.out) / RUN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- loss log
def _read_loss_log(path: Path, upto: int) -> list[tuple[int, float, float]]:
    """Rows of loss.csv with step <= upto (rows a killed run wrote past its checkpoint go)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if int(row["step"]) <= upto:
                    rows.append((int(row["step"]), float(row["loss"]), float(row["lr"])))
    return rows


def _write_loss_log(path: Path, rows: list[tuple[int, float, float]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr"])
        for step, loss, lr in rows:
            w.writerow([step, f"{loss:.6g}", f"{lr:.6g}"])
    os.replace(tmp, path)


def plot_loss_curve(
    rows: list[tuple[int, float, float]], path: str | os.PathLike, size=(640, 400)
) -> None:
    """Draws loss against step (log-scale loss axis) into a PNG with PIL."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 16, 24, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((left, 4), "training loss (log scale)", fill="black")
    pts = [(s, v) for s, v, _ in rows if v > 0 and math.isfinite(v)]
    if pts:
        steps = np.array([p[0] for p in pts], np.float64)
        logs = np.log10(np.array([p[1] for p in pts], np.float64))
        s0, s1 = steps.min(), max(steps.max(), steps.min() + 1)
        l0, l1 = logs.min(), logs.max()
        if l1 - l0 < 1e-6:
            l0, l1 = l0 - 0.5, l1 + 0.5
        xs = left + (steps - s0) / (s1 - s0) * (w - left - right)
        ys = (h - bottom) - (logs - l0) / (l1 - l0) * (h - top - bottom)
        if len(xs) > 1:
            d.line(list(zip(xs.tolist(), ys.tolist())), fill=(31, 119, 180), width=2)
        else:
            d.ellipse([xs[0] - 2, ys[0] - 2, xs[0] + 2, ys[0] + 2], fill=(31, 119, 180))
        for frac in (0.0, 0.5, 1.0):
            y = (h - bottom) - frac * (h - top - bottom)
            d.text((4, y - 6), f"{10 ** (l0 + frac * (l1 - l0)):.3g}", fill="black")
        d.text((left, h - bottom + 6), f"{int(s0)}", fill="black")
        d.text((w - right - 60, h - bottom + 6), f"step {int(s1)}", fill="black")
    img.save(path)


# ----------------------------------------------------------------------------- samples
class _Sampler:
    """DDIM samples from the EMA weights through ``DDPMPipeline`` (compiled once per run)."""

    def __init__(self, unet, scheduler, config: TrainConfig):
        from jaxdiff.pipelines.unconditional import DDPMPipeline
        from jaxdiff.schedulers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler.config)
        self.pipe = DDPMPipeline(params={"unet": None}, unet=unet, scheduler=ddim)
        self.config = config

    def __call__(self, ema_params, step: int) -> Path:
        from jaxdiff.utils.images import grid_shape, make_image_grid

        c = self.config
        self.pipe.params["unet"] = ema_params
        images = self.pipe(
            batch_size=c.sample_count,
            num_inference_steps=c.sample_steps,
            seed=c.seed,
            output_type="np",
            progress=False,
        ).images
        rows, cols = grid_shape(c.sample_count)
        folder = Path(c.out) / "samples"
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{step:07d}.png"
        make_image_grid(images, rows, cols).save(path)
        return path


class _LossLog:
    """Turns the metrics of the steps run so far into loss.csv rows: one per ``log_every``
    steps (and at the last step), the mean loss since the previous row and the last lr.

    Metrics stay on the device until a row is due (no host sync between rows); a call of
    several steps may cross several row boundaries.
    """

    def __init__(self, log_every: int, total: int, start: int):
        self.log_every, self.total, self.logged = log_every, total, start
        self.pending: list[dict] = []  # metrics of the steps after ``logged``, in order

    def add(self, metrics: dict, done: int) -> list[tuple[int, float, float]]:
        """Adds the metrics of the steps up to ``done`` (scalars, or arrays of one value per
        step); returns the rows now due."""
        self.pending.append(metrics)
        due = [b for b in range(self.logged + 1, done + 1) if b % self.log_every == 0]
        if done == self.total and (not due or due[-1] != done):
            due.append(done)
        if not due:
            return []
        fetched = jax.device_get(self.pending)
        losses = np.concatenate([np.atleast_1d(m["loss"]) for m in fetched]).astype(np.float64)
        lrs = np.concatenate([np.atleast_1d(m["lr"]) for m in fetched]).astype(np.float64)
        rows = []
        for b in due:  # losses[i] belongs to step logged + 1 + i
            first, upto = rows[-1][0] if rows else self.logged, b
            i, j = first - self.logged, upto - self.logged
            rows.append((b, float(np.mean(losses[i:j])), float(lrs[j - 1])))
        cut = due[-1] - self.logged
        rest = {"loss": losses[cut:], "lr": lrs[cut:]}
        self.pending = [rest] if len(rest["loss"]) else []
        self.logged = due[-1]
        return rows


# ----------------------------------------------------------------------------- train
def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) the training run described by ``config``; see the module docstring."""
    from tqdm.auto import tqdm

    from jaxdiff import sampling
    from jaxdiff.pipelines.unconditional import DDPMPipeline

    config.validate()
    resuming = _check_out_dir(config)
    out = Path(config.out)
    images = data_lib.load_dataset(config.data, config.resolution, resize=config.resize)
    n_dev = jax.local_device_count()
    if config.batch % n_dev:
        raise ValueError(f"batch ({config.batch}) must be a multiple of the {n_dev} local devices")
    batches = data_lib.BatchIterator(images, config.batch, config.seed, flip=config.flip)
    if config.init_from is not None:
        unet, init_params = load_init_unet(config.init_from)
    else:
        unet, init_params = build_unet(config), None
    scheduler = build_scheduler(config)
    if images.shape[-1] != unet.in_channels:
        raise ValueError(
            f"the data has {images.shape[-1]} channels, the model expects {unet.in_channels}"
        )

    schedule = make_lr_schedule(
        config.lr, min(config.warmup, max(config.steps - 1, 0)), config.steps
    )
    optimizer = make_optimizer(
        schedule, weight_decay=config.weight_decay, grad_clip=config.grad_clip
    )
    mesh = sampling.batch_mesh()
    step_fn = make_train_step(
        unet,
        scheduler,
        optimizer,
        ema_decay=config.ema_decay,
        prediction_type=config.prediction_type,
        snr_gamma=config.snr_gamma,
        compute_dtype=jnp.bfloat16 if config.bf16 else None,
        lr_schedule=schedule,
        mesh=mesh,
    )
    root_key = jax.random.key(config.seed)
    init_key, train_key = jax.random.fold_in(root_key, 0), jax.random.fold_in(root_key, 1)
    if init_params is None:
        init_params = jax.jit(unet.init_weights)(init_key)
    state = replicate_state(TrainState.create(init_params, optimizer), mesh)

    ckpt = CheckpointManager(
        out / "checkpoints", keep=config.keep, async_save=config.async_checkpoints
    )
    start = 0
    if resuming:
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state, meta = restored
            start = int(meta["data_position"])
            if int(jax.device_get(state.step)) != start:
                raise ValueError(
                    f"checkpoint of step {meta['step']} is inconsistent (state step {state.step})"
                )
            print(f"resuming {out} from step {start}", file=sys.stderr)
        else:
            print(f"no checkpoint in {out}: starting from step 0", file=sys.stderr)
    _write_run_file(config)
    log_path = out / "loss.csv"
    rows = _read_loss_log(log_path, start) if resuming else []
    _write_loss_log(log_path, rows)

    sampler = _Sampler(unet, scheduler, config) if config.sample_every >= 0 else None
    last_loss = rows[-1][1] if rows else None
    t0 = time.perf_counter()
    bar = tqdm(
        total=config.steps, initial=start, desc="train", unit="step", disable=not config.progress
    )

    def save_checkpoint(done: int) -> None:
        meta = {"data_seed": config.seed, "data_position": done, "batch": config.batch}
        ckpt.save(done, state, meta)

    def events_after(step: int) -> int:
        """The first step after ``step`` at which the loop must stop to checkpoint or sample."""
        stops = [config.steps]
        for every in (config.checkpoint_every, config.sample_every if sampler else 0):
            if every > 0:
                stops.append((step // every + 1) * every)
        return min(stops)

    fold_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))  # step s: fold_in(train_key, s)
    log = _LossLog(config.log_every, config.steps, start)
    step = start
    while step < config.steps:
        # steps_per_call steps in one call where no checkpoint or sample falls inside them
        n = config.steps_per_call if events_after(step) - step >= config.steps_per_call else 1
        keys = fold_keys(train_key, jnp.arange(step, step + n))
        if n == 1:
            state, metrics = step_fn(state, batches.uint8_batch(step), keys[0])
        else:
            chunk = np.stack([batches.uint8_batch(s) for s in range(step, step + n)])
            state, metrics = step_fn.steps(state, chunk, keys)
        done = step + n
        bar.update(n)
        final = done == config.steps
        for row in log.add(metrics, done):
            if not math.isfinite(row[1]):
                bar.close()
                ckpt.close()
                raise FloatingPointError(f"the loss became {row[1]} at step {row[0]}; lower --lr")
            rows.append(row)
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow([row[0], f"{row[1]:.6g}", f"{row[2]:.6g}"])
            last_loss = row[1]
            bar.set_postfix(loss=f"{row[1]:.4f}", lr=f"{row[2]:.2e}")
        if final or (config.checkpoint_every and done % config.checkpoint_every == 0):
            save_checkpoint(done)
            plot_loss_curve(rows, out / "loss.png")
        if sampler is not None and (
            final or (config.sample_every and done % config.sample_every == 0)
        ):
            sampler(state.ema_params, done)
        step = done
    bar.close()
    ckpt.close()
    seconds = time.perf_counter() - t0
    if start >= config.steps:
        plot_loss_curve(rows, out / "loss.png")

    host_state = jax.device_get(state)
    pipe = DDPMPipeline(params={"unet": host_state.ema_params}, unet=unet, scheduler=scheduler)
    pipeline_dir = out / "pipeline"
    pipe.save_pretrained(pipeline_dir)
    return TrainResult(
        state=host_state,
        out=out,
        pipeline_dir=pipeline_dir,
        last_loss=last_loss,
        steps_run=config.steps - start,
        seconds=seconds,
    )


__all__ = [
    "MODEL_PRESETS",
    "TrainConfig",
    "TrainResult",
    "build_scheduler",
    "build_unet",
    "plot_loss_curve",
    "train",
]
