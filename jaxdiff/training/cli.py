"""``jaxdiff train``: the command-line front of :func:`jaxdiff.training.loop.train`.

jaxdiff train --data cifar10-cats --resolution 32 --steps 20000 --batch 64 --out runs/cats
jaxdiff train --data cifar10-cats --resolution 32 --steps 20000 --batch 64 --out runs/cats --resume
"""

from __future__ import annotations

import argparse
import json
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``train`` subcommand to ``subparsers`` and returns its parser."""
    from jaxdiff.training.loop import MODEL_PRESETS, TrainConfig

    d = TrainConfig(data="", out="")
    p = subparsers.add_parser(
        "train",
        help="train an unconditional DDPM (UNet2DModel) on images",
        description="Train a DDPM (Ho et al. 2020) on an image folder, an .npz or cifar10-cats; "
        "checkpoints, loss log, sample grids and a diffusers-layout pipeline go to --out.",
    )
    p.add_argument(
        "--data", required=True, help="image folder, .npz file (key 'train'), or cifar10-cats"
    )
    p.add_argument(
        "--out", required=True, help="run folder (must be new or empty, unless --resume)"
    )
    p.add_argument(
        "--resolution", type=_positive_int, default=d.resolution, help="image size (square)"
    )
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch", type=_positive_int, default=d.batch, help="global batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=_non_negative_int, default=d.warmup, help="linear warmup steps")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="maximum EMA decay")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of init, data order and noise")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=d.checkpoint_every)
    p.add_argument("--keep", type=_positive_int, default=d.keep, help="checkpoints to keep")
    p.add_argument(
        "--sample-every", type=int, default=d.sample_every, help="0: at the end; <0: never"
    )
    p.add_argument("--sample-count", type=_positive_int, default=d.sample_count)
    p.add_argument("--sample-steps", type=_positive_int, default=d.sample_steps, help="DDIM steps")
    p.add_argument("--log-every", type=_positive_int, default=d.log_every)
    p.add_argument(
        "--steps-per-call",
        type=_positive_int,
        default=d.steps_per_call,
        help="optimizer steps per compiled call (a lax.scan); 1: one call per step",
    )
    p.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample"),
        default=d.prediction_type,
    )
    p.add_argument(
        "--snr-gamma",
        type=float,
        default=d.snr_gamma,
        help="Min-SNR-gamma loss weighting (Hang et al. 2023; e.g. 5); default off",
    )
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), default=d.model, help="UNet preset")
    p.add_argument(
        "--unet-config",
        type=_json_dict,
        default={},
        help="JSON overrides of the preset's UNet2DModel fields",
    )
    p.add_argument("--num-train-timesteps", type=_positive_int, default=d.num_train_timesteps)
    p.add_argument(
        "--beta-schedule", default=d.beta_schedule, help="linear, scaled_linear, squaredcos_cap_v2"
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (fp32 master weights)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this trained UNet2DModel (pipeline or unet folder, or repo id) "
        "instead of a random init; its config replaces --model/--unet-config",
    )
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--no-resize", action="store_true", help="images must already be --resolution")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="global-norm clip (<=0: off)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace):
    from jaxdiff.training.loop import TrainConfig

    return TrainConfig(
        data=args.data,
        out=args.out,
        resolution=args.resolution,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        sample_every=args.sample_every,
        sample_count=args.sample_count,
        sample_steps=args.sample_steps,
        log_every=args.log_every,
        steps_per_call=args.steps_per_call,
        prediction_type=args.prediction_type,
        snr_gamma=args.snr_gamma,
        model=args.model,
        unet_config=args.unet_config,
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        bf16=args.bf16,
        resume=args.resume,
        flip=not args.no_flip,
        resize=not args.no_resize,
        weight_decay=args.weight_decay,
        grad_clip=None if args.grad_clip is None or args.grad_clip <= 0 else args.grad_clip,
        init_from=args.init_from,
        progress=not args.no_progress,
    )


def run_train(args: argparse.Namespace) -> int:
    """Runs ``jaxdiff train``; returns the exit status (2 with a message on bad input)."""
    from jaxdiff.training.data import DatasetError
    from jaxdiff.training.loop import train

    try:
        config = config_from_args(args)
        result = train(config)
    except (DatasetError, FileExistsError, FileNotFoundError, ValueError, TypeError) as err:
        print(f"jaxdiff train: error: {err}", file=sys.stderr)
        return 2
    loss = "n/a" if result.last_loss is None else f"{result.last_loss:.4f}"
    print(
        f"trained {result.steps_run} step(s) in {result.seconds:.1f} s (final loss {loss}); "
        f"pipeline saved to {result.pipeline_dir}"
    )
    return 0


__all__ = ["add_train_parser", "config_from_args", "run_train"]
