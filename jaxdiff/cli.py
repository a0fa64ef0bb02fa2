"""``jaxdiff`` command line: ``jaxdiff generate ...``, ``jaxdiff train ...``, ``jaxdiff bench``.

    jaxdiff generate --model PATH_OR_REPO --steps 50 --scheduler ddim --seed 0 --batch 16 \\
        --out grid.png
    jaxdiff generate "a photo of a cat" --model SD_DIR --negative "blurry" --steps 20 \\
        --scheduler dpm++ --guidance 7.5 --batch 4 --height 512 --width 512 --out cats.png
    jaxdiff generate "a cat" --model SD_DIR --image in.png [--mask mask.png] --strength 0.7
    jaxdiff train --data cifar10-cats --resolution 32 --steps 20000 --batch 64 --out runs/cats
    jaxdiff bench [--quick] [--only NAME] [--out DIR] [--list]   # from a source checkout
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path

DEFAULT_MODEL_DIR = "assets/ddpm-cats-32"
# The shipped model's sampler when --scheduler / --steps are not given. Its own scheduler is
# DDPM (1000 steps), but this undertrained eps-model's x0 estimates at large t are poor, and
# ancestral DDPM sampling drifts into saturated colour fields; DDIM with its x0 clipping keeps
# CIFAR colours (SWD on 7x7 patches, 64 samples: DDPM-1000 0.279, DDIM-50 0.215; TRAINING.md).
SHIPPED_MODEL_SAMPLER = ("ddim", 50)


def default_model() -> str | None:
    """The model shipped inside the package, if this install has one."""
    path = resources.files("jaxdiff").joinpath(DEFAULT_MODEL_DIR)
    return str(path) if path.is_dir() else None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _number_list(convert: type, example: str):
    """An argparse type: ``"999,850,736"`` -> ``[999, 850, 736]`` (a custom schedule)."""
    what = "integers" if convert is int else "numbers"

    def parse(text: str) -> list:
        try:
            return [convert(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} such as {example}, got {text!r}"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description="Diffusion models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="sample images from a pipeline and save a grid PNG",
        description="Unconditional pipelines (DDPM/DDIM) take no prompt; Stable Diffusion "
        "pipelines take a prompt, and --image (img2img) or --image and --mask (inpaint).",
    )
    gen.add_argument("prompt", nargs="?", default=None, help="text prompt (Stable Diffusion)")
    gen.add_argument("--negative", default=None, help="negative prompt (Stable Diffusion)")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="guidance rescale phi (Lin et al. 2024; SD text2img, e.g. 0.7; default off)",
    )
    gen.add_argument(
        "--clip-skip",
        type=_positive_int,
        default=None,
        help="use the text encoder's state this many layers before the last (SD)",
    )
    gen.add_argument("--height", type=_positive_int, default=None, help="image height (SD)")
    gen.add_argument("--width", type=_positive_int, default=None, help="image width (SD)")
    gen.add_argument("--image", default=None, help="init image file: img2img, or inpaint")
    gen.add_argument("--mask", default=None, help="mask image file (white = repaint): inpaint")
    gen.add_argument("--strength", type=float, default=None, help="img2img/inpaint strength")
    gen.add_argument(
        "--padding-mask-crop",
        type=int,
        default=None,
        help="inpaint only the box around the mask, this many pixels larger, at --height x "
        "--width, and paste it back into the full-size image",
    )
    gen.add_argument(
        "--cache-dir", default=None, help="persistent compilation cache ($JAXDIFF_CACHE_DIR)"
    )
    gen.add_argument(
        "--model",
        default=None,
        help="pipeline folder in diffusers layout or Hub repo id (default: the shipped model), "
        "or an original SD 1.x/2.x single-file .safetensors checkpoint",
    )
    gen.add_argument(
        "--config",
        default=None,
        help="diffusers pipeline folder or repo with the configs of a single-file --model "
        "(default: SD 1.5's repo)",
    )
    gen.add_argument("--steps", type=_positive_int, default=None, help="inference steps")
    gen.add_argument(
        "--timesteps",
        type=_number_list(int, "999,850,736"),
        default=None,
        help="custom schedule instead of --steps, e.g. 999,850,736 (SD; DDPM, Euler, DPM++)",
    )
    gen.add_argument(
        "--sigmas",
        type=_number_list(float, "14.6,6.5,0.0"),
        default=None,
        help="custom sigmas instead of --steps: N+1 values, the last usually 0 (SD; Euler)",
    )
    gen.add_argument(
        "--scheduler",
        default=None,
        help="ddpm, ddim, pndm, euler, euler_a, dpm++ (or a class name); default: the model's",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=None,
        help="LoRA file, folder or repo (SD; diffusers, PEFT or kohya-ss keys); repeatable",
    )
    gen.add_argument(
        "--lora-scale",
        type=_number_list(float, "0.8,0.5"),
        default=None,
        help="LoRA weight: one for all, or one per --lora (default 1)",
    )
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--batch", type=_positive_int, default=4, help="number of images")
    gen.add_argument("--eta", type=float, default=None, help="DDIM eta (DDIM scheduler only)")
    gen.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="compute dtype",
    )
    gen.add_argument("--out", default="grid.png", help="output PNG (a grid of all images)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    from jaxdiff.training.cli import add_train_parser

    add_train_parser(sub)
    # Options belong to the runner (benchmarks/__main__.py) and are parsed there: see bench().
    sub.add_parser(
        "bench",
        add_help=False,
        help="run the jaxdiff vs PyTorch benchmark suite (source checkout only; -h for options)",
    )
    return parser


def _fail(message: str) -> int:
    print(f"jaxdiff: error: {message}", file=sys.stderr)
    return 2


def generate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from jaxdiff import hub
    from jaxdiff.pipelines.pipeline_utils import scheduler_class
    from jaxdiff.utils.images import grid_shape, make_image_grid

    model = args.model or default_model()
    if model is None:
        return _fail("no --model given and this install ships no default model")
    args = argparse.Namespace(**vars(args))  # defaults are filled in below; the caller's stay
    schedule = [f"--{name}" for name in ("steps", "timesteps", "sigmas") if getattr(args, name)]
    if len(schedule) > 1:
        return _fail(f"give one of --steps, --timesteps and --sigmas, got {' and '.join(schedule)}")
    if args.model is None:
        args.scheduler = args.scheduler or SHIPPED_MODEL_SAMPLER[0]
        if not schedule:
            args.steps = SHIPPED_MODEL_SAMPLER[1]
    out = os.path.abspath(args.out)
    if not out.lower().endswith(".png"):
        return _fail(f"--out must name a .png file, got {args.out!r}")
    if os.path.exists(out) and not args.overwrite:
        return _fail(f"--out {args.out!r} exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(out)):
        return _fail(f"the folder of --out {args.out!r} does not exist")
    if args.cache_dir:
        from jaxdiff.utils.compile_cache import enable_compilation_cache

        enable_compilation_cache(args.cache_dir)
    try:
        new_scheduler = scheduler_class(args.scheduler) if args.scheduler else None
        pipe = _load_pipeline(model, args.config, getattr(jnp, args.dtype))
    except (hub.HubFileNotFoundError, ValueError, TypeError) as err:
        return _fail(str(err))
    if new_scheduler is not None:
        pipe.scheduler = new_scheduler.from_config(pipe.scheduler.config)
    # the pipeline's own default: DDPM/DDIM pipelines say theirs, Stable Diffusion's __call__ 50
    if args.timesteps or args.sigmas:  # as diffusers' retrieve_timesteps: N is their length
        args.steps = len(args.timesteps) if args.timesteps else len(args.sigmas) - 1
    args.steps = args.steps or getattr(pipe, "default_steps", 50)
    start = time.perf_counter()
    try:
        result = _run_pipeline(pipe, args)
    except (ValueError, TypeError, OSError) as err:
        return _fail(str(err))
    rows, cols = grid_shape(args.batch)
    make_image_grid(result.images, rows, cols).save(out)
    took = time.perf_counter() - start
    print(
        f"wrote {args.batch} image(s) from {model} ({type(pipe.scheduler).__name__}, "
        f"{args.steps} steps) to {out} in {took:.1f} s"
    )
    return 0


def _load_pipeline(model: str, config: str | None, dtype):
    """A pipeline folder or repo, or a single-file checkpoint (with ``--config``)."""
    from jaxdiff.loaders.weights import checkpoint_format
    from jaxdiff.pipelines import DiffusionPipeline
    from jaxdiff.pipelines.stable_diffusion import StableDiffusionPipeline

    if os.path.isfile(model):
        kind = checkpoint_format(model)
        if kind != "safetensors":
            what = "is a pickled checkpoint" if kind else "is not a model checkpoint"
            raise ValueError(
                f"--model {model} {what}. --model takes a pipeline folder in diffusers layout "
                "(with model_index.json), a Hub repo id (owner/name), or a single-file Stable "
                "Diffusion .safetensors checkpoint; a pickled .ckpt only in Python, with "
                "StableDiffusionPipeline.from_single_file(path, allow_pickle=True) (or convert "
                "it to safetensors)"
            )
        return StableDiffusionPipeline.from_single_file(model, config=config, dtype=dtype)
    if config is not None:
        raise ValueError("--config is for a single-file --model checkpoint")
    return DiffusionPipeline.from_pretrained(model, dtype=dtype)


def _run_pipeline(pipe, args: argparse.Namespace):
    """Calls an unconditional or a Stable Diffusion pipeline with the CLI's options."""
    from PIL import Image

    from jaxdiff.pipelines.stable_diffusion import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    common = dict(seed=args.seed, output_type="pil", progress=not args.no_progress)
    sd_only = (
        "--negative",
        "--height",
        "--width",
        "--image",
        "--mask",
        "--strength",
        "--padding-mask-crop",
        "--guidance-rescale",
        "--clip-skip",
        "--timesteps",
        "--sigmas",
        "--lora",
        "--lora-scale",
    )
    if not isinstance(pipe, StableDiffusionPipeline):
        given = [f for f in sd_only if getattr(args, f[2:].replace("-", "_")) is not None]
        if args.prompt is not None or given:
            raise ValueError(
                f"{type(pipe).__name__} is unconditional: it takes no prompt or "
                f"{'/'.join(sd_only)} (got {['prompt'] if args.prompt else []}{given})"
            )
        options = {} if args.eta is None else {"eta": args.eta}
        return pipe(batch_size=args.batch, num_inference_steps=args.steps, **common, **options)
    if args.prompt is None:
        raise ValueError(f'{type(pipe).__name__} needs a prompt: jaxdiff generate "a photo" ...')
    if args.mask is not None and args.image is None:
        raise ValueError("--mask needs --image (inpainting)")
    if args.padding_mask_crop is not None and args.mask is None:
        raise ValueError("--padding-mask-crop needs --image and --mask (inpainting)")
    _fuse_loras(pipe, args.lora or [], args.lora_scale)
    sd = dict(
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.batch,
        eta=0.0 if args.eta is None else args.eta,
        timesteps=args.timesteps,
        sigmas=args.sigmas,
        clip_skip=args.clip_skip,
        **common,
    )
    if args.image is None:
        if args.strength is not None:
            raise ValueError("--strength needs --image (img2img or inpaint)")
        rescale = (
            {} if args.guidance_rescale is None else {"guidance_rescale": args.guidance_rescale}
        )
        return pipe(args.prompt, height=args.height, width=args.width, **sd, **rescale)
    if args.guidance_rescale is not None:
        raise ValueError("--guidance-rescale is a text2img option: it does not take --image")
    image = Image.open(args.image).convert("RGB")
    crop = args.padding_mask_crop is not None  # then --height/--width size the crop
    if (args.width or args.height) and not crop:
        image = image.resize((args.width or image.width, args.height or image.height))
    if args.mask is None:
        img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        strength = 0.8 if args.strength is None else args.strength
        return img2img(args.prompt, image=image, strength=strength, **sd)
    mask = Image.open(args.mask).convert("L").resize(image.size)
    inpaint = StableDiffusionInpaintPipeline.from_pipe(pipe)
    strength = 1.0 if args.strength is None else args.strength
    if crop:
        sd.update(padding_mask_crop=args.padding_mask_crop, height=args.height, width=args.width)
    return inpaint(args.prompt, image=image, mask_image=mask, strength=strength, **sd)


def _fuse_loras(pipe, paths: list[str], scales: list[float] | None) -> None:
    """Loads each ``--lora`` and fuses them with their ``--lora-scale`` weights into the
    params, so every task (text2img, img2img, inpaint) runs with them."""
    if scales is not None and not paths:
        raise ValueError("--lora-scale needs --lora")
    if not paths:
        return
    scales = scales or [1.0]
    if len(scales) not in (1, len(paths)):
        raise ValueError(
            f"--lora-scale takes one value or one per --lora ({len(paths)}), got {len(scales)}"
        )
    names = [f"lora_{i}" for i in range(len(paths))]
    for name, path in zip(names, paths, strict=True):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, scales * len(paths) if len(scales) == 1 else scales)
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def bench(argv: list[str]) -> int:
    """``jaxdiff bench``: ``python -m benchmarks`` of the source checkout this runs from.

    The benchmarks (they import torch) live next to the package in the repository, not in
    the wheel: looked for beside the imported ``jaxdiff`` (editable install), then in the
    current folder.
    """
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if all((root / "benchmarks" / f).is_file() for f in ("__main__.py", "suite.py")):
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    else:
        return _fail(
            "`jaxdiff bench` runs the benchmarks/ folder of a jaxdiff source checkout, which "
            "this install does not have: run it from the repository root (git clone, then "
            "pip install -e '.[parity]'), or run `python -m benchmarks` there"
        )
    from benchmarks.__main__ import main as run_suite

    return run_suite(argv, prog="jaxdiff bench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(extra)
    if extra:  # what parse_args does: only ``bench`` passes unknown options on
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "generate":
        return generate(args)
    if args.command == "train":
        from jaxdiff.training.cli import run_train

        return run_train(args)
    return _fail(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it


if __name__ == "__main__":
    sys.exit(main())
