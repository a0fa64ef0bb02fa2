r"""Stable Diffusion 1.5 text2img end to end, jaxdiff vs diffusers PyTorch, same weights.

    python -m benchmarks.bench_sd_pipeline [--sizes 256 512] [--batches 1 4] [--steps 20]
        [--guidance 7.5] [--repeats 2] [--warmup-steps 1] [--tiny] [--no-torch] [--out DIR]

A pipeline folder in diffusers layout is built once: the SD 1.5 ``UNet2DConditionModel``,
``AutoencoderKL`` and CLIP text tower at their real configs with random weights (the builders
of :mod:`benchmarks.bench_sd_components`, ``torch.manual_seed(0)``), the openai CLIP tokenizer
(written from the shared BPE merges by :func:`jaxdiff.utils.tokenizer.write_clip_tokenizer`)
and SD 1.5's scheduler config. ``--tiny`` uses the tiny random SD pipeline of the test
references (``tests/reference/pipelines_stable_diffusion/sd_tiny``) instead: a smoke test.

For every image size (``--sizes``, pixels) and batch (``--batches``, prompts per call) both
libraries load that folder, swap in ``DPMSolverMultistepScheduler`` (DPM-Solver++, order 2,
*Lu et al. (2022)*) and time the whole call, text encoding + ``--steps`` denoising steps with
classifier-free guidance (*Ho & Salimans (2022), Eq. 6*) at ``--guidance`` + the VAE decode to
a numpy image:

* **images/s** = batch / median wall time of ``--repeats`` full calls after a warm-up call of
  ``--warmup-steps`` steps (both libraries); the ratio jaxdiff / PyTorch is the issue's
  measure (target on the CPU: at least 1.25);
* **JAX first compile** = the summed durations of JAX's own compile events during the first
  call in a fresh process (``trace_s`` + ``lower_s`` + ``backend_compile_s``: tracing,
  lowering to StableHLO and XLA compilation). The calls use ``--warmup-steps`` denoising steps
  (default 1); the step count is a traced argument of the pipeline's one program, so the
  warm-up and the timed ``--steps`` calls run the same compiled program (``programs`` in the
  JSON stays 1). First call minus second call is reported beside it (``call_diff_s``); it also
  holds the call's eager ops and the run-to-run noise of a full call, which made it useless at
  512x512 batch 4 (-0.6 s in one run, 7.2 s in the next);
* **JAX cached compile** = the same event sum in a *second* fresh process that finds the first
  one's programs in JAX's persistent compilation cache (``jax_compilation_cache_dir``, a
  temporary folder per case), with its cache hits and misses; it makes only two short calls.
  There ``backend_compile_s`` is the time to read and load the cached executable; tracing and
  lowering the Python program are still paid;
* **peak RSS**: ``ru_maxrss`` of each process (one framework, one case, weights included).

Each framework and case runs in its own subprocess. Both start from the same latents (numpy,
seed 0), so the images must agree: the mean absolute difference in uint8 levels is reported,
which catches a fast but wrong run. On a GPU jaxdiff runs in bfloat16 (``pipe.to``) and
PyTorch in float16 with SDPA attention; on a CPU both run in float32.

Writes ``<out>/sd_pipeline_<device>.json`` (``--tiny``: ``sd_pipeline_tiny_<device>``) and
``.md``; the JSON's ``"measures"`` list is what ``python -m benchmarks`` summarises.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    device_name,
    library_versions,
    peak_rss_mib,
    write_results,
)

TINY_DIR = ROOT / "tests" / "reference" / "pipelines_stable_diffusion" / "sd_tiny"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a cat wearing a tiny wizard hat, studio lighting",
    "an isometric render of a cozy cabin in the snow",
)
RESULT_MARK = "BENCH_RESULT "
TARGET_RATIO = 1.25  # the issue's CPU target for jaxdiff / PyTorch images/s
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}


def _has_torch() -> bool:
    return all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers"))


def prompts_for(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def latents_for(batch: int, size: int, factor: int = 8) -> np.ndarray:
    """The starting noise both frameworks get: NHWC float32, seed 0."""
    shape = (batch, size // factor, size // factor, 4)
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def timed_call(call) -> float:
    """Wall time of ``call()`` (which blocks until its work is done)."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- workers


def shared_bpe_file() -> Path | None:
    """The CLIP BPE merges in the shared data folder (``$JAXDIFF_SHARED_DATA`` or
    ``<repo>/../shared/data``), or None."""
    from jaxdiff.training.data import shared_data_dir

    folder = shared_data_dir()
    path = folder / BPE_FILE if folder is not None else None
    return path if path is not None and path.is_file() else None


def worker_build(folder: Path) -> dict:
    """Writes the SD 1.5-config random-weight pipeline folder (diffusers layout)."""
    from benchmarks import bench_sd_components as components
    from jaxdiff.pipelines.pipeline_utils import MODEL_INDEX
    from jaxdiff.utils.tokenizer import write_clip_tokenizer

    info = {}
    for component, sub in (("unet", "unet"), ("vae", "vae"), ("clip", "text_encoder")):
        info = components.worker_build(component, folder / sub, tiny=False)
    bpe = shared_bpe_file()
    if bpe is not None:
        write_clip_tokenizer(bpe, folder / "tokenizer")
        info["tokenizer"] = f"write_clip_tokenizer({BPE_FILE})"
    else:  # the same openai CLIP vocabulary, as the tiny pipeline's tokenizer.json
        shutil.copytree(TINY_DIR / "tokenizer", folder / "tokenizer")
        info["tokenizer"] = "copied from sd_tiny/tokenizer (shared BPE file not found)"
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    shutil.copy(TINY_DIR / MODEL_INDEX, folder / MODEL_INDEX)  # the SD 1.x component list
    return info


def worker_torch(folder: Path, case_dir: Path, size: int, batch: int, steps: int, args) -> dict:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    latents = latents_for(batch, size, pipe.vae_scale_factor)
    latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(device, dtype)
    out = {}

    def call(num_steps=steps):
        out["images"] = pipe(
            prompts_for(batch),
            height=size,
            width=size,
            num_inference_steps=num_steps,
            guidance_scale=args.guidance,
            latents=latents,
            generator=torch.Generator(device).manual_seed(0),
            output_type="np",
        ).images
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        first = timed_call(lambda: call(args.warmup_steps))
        times = [timed_call(call) for _ in range(args.repeats)]
    np.save(case_dir / "torch_images.npy", np.asarray(out["images"], np.float32))
    run_s = statistics.median(times)
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": sorted(processors),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "first_call_s": first,
        "call_s": times,
        "run_s": run_s,
        "images_per_s": batch / run_s,
        "peak_rss_mib": peak_rss_mib(),
    }


def worker_jax(folder: Path, case_dir: Path, size: int, batch: int, steps: int, args) -> dict:
    import jax
    import jax.numpy as jnp

    # JAX's persistent cache in this case's folder: the "cold" process fills it, the "cached"
    # one reads it. Cache every program, however small or quick to compile.
    jax.config.update("jax_compilation_cache_dir", str(args.cache_dir))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    counts = {"cache_hits": 0, "cache_misses": 0}
    durations = dict.fromkeys(COMPILE_EVENTS.values(), 0.0)

    def on_event(name, **kwargs):
        key = name.rsplit("/", 1)[-1]
        if key in counts:
            counts[key] += 1

    def on_duration(name, secs, **kwargs):
        if name in COMPILE_EVENTS:
            durations[COMPILE_EVENTS[name]] += secs

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)

    from jaxdiff.pipelines import DiffusionPipeline
    from jaxdiff.schedulers import DPMSolverMultistepScheduler

    gpu = jax.default_backend() == "gpu"
    start = time.perf_counter()
    with warnings.catch_warnings():  # SD 1.5's PNDM config carries clip_sample: a warning
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if gpu:
        pipe.to(jnp.bfloat16)
    jax.block_until_ready(pipe.params)
    load_s = time.perf_counter() - start
    latents = latents_for(batch, size, pipe.vae_scale_factor)
    prompts = prompts_for(batch)
    out = {}

    def call(num_steps=steps):  # returns numpy images: everything has finished
        out["images"] = pipe(
            prompts,
            height=size,
            width=size,
            num_inference_steps=num_steps,
            guidance_scale=args.guidance,
            latents=latents,
            seed=0,
            output_type="np",
            progress=False,
        ).images

    load_counts = {f"load_{k}": v for k, v in counts.items()}  # eager ops while loading
    counts.update(dict.fromkeys(counts, 0))
    durations.update(dict.fromkeys(durations, 0.0))
    first = timed_call(lambda: call(args.warmup_steps))
    first_counts, first_durations = dict(counts), dict(durations)
    second = timed_call(lambda: call(args.warmup_steps))  # same program, already compiled
    second_counts = dict(counts)
    # The cached phase only measures compilation; the cold one also times full calls. The
    # pipeline's program takes the step count as a traced argument, so these reuse it
    # ("programs" stays 1); only the scheduler's small eager set-up ops (set_timesteps at the
    # new step count) compile, once, in the first timed call: milliseconds.
    times = [timed_call(call) for _ in range(args.repeats if args.phase != "cached" else 0)]
    run_s = statistics.median(times) if times else None
    result = {
        "phase": args.phase,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "dtype": "bfloat16" if gpu else "float32",
        "load_s": load_s,
        "first_call_s": first,
        "second_call_s": second,
        "call_s": times,
        "run_s": run_s,
        "images_per_s": batch / run_s if run_s else None,
        "compile_s": sum(first_durations[k] for k in COMPILE_EVENTS.values()),
        "call_diff_s": first - second,
        **first_durations,  # of the first call
        **first_counts,  # of the first call
        **load_counts,
        "compiles_in_second_call": sum(second_counts.values()) - sum(first_counts.values()),
        "eager_compiles_in_timed_calls": sum(counts.values()) - sum(second_counts.values()),
        "programs": len(pipe._jit_cache),
        "peak_rss_mib": peak_rss_mib(),
    }
    ref = case_dir / "torch_images.npy"
    if ref.is_file() and times:
        got = np.round(np.asarray(out["images"], np.float64) * 255)
        want = np.round(np.load(ref).astype(np.float64) * 255)
        result["mean_abs_diff_uint8_vs_torch"] = float(np.abs(got - want).mean())
        result["max_abs_diff_uint8_vs_torch"] = float(np.abs(got - want).max())
    return result


# ----------------------------------------------------------------------------- driver


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # The benchmark chooses the cache folder itself (jax.config in worker_jax).
    for var in ("JAXDIFF_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
        env.pop(var, None)
    return env


def _run_worker(kind: str, folder: Path, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_sd_pipeline", "--worker", kind]
    cmd += ["--folder", str(folder), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    cmd += ["--guidance", str(args.guidance), "--warmup-steps", str(args.warmup_steps), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=_worker_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{kind} worker ({' '.join(extra)}) failed with code {proc.returncode}:\n"
            + proc.stderr[-4000:]
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise RuntimeError(f"{kind} worker printed no result:\n{proc.stdout[-2000:]}")


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def measures_for(rec: dict, steps: int, guidance: float) -> list[dict]:
    """The case's rows for ``python -m benchmarks`` (see ``benchmarks/suite.py``)."""
    j, c, t = rec["jaxdiff"], rec["jaxdiff_cached"], rec["pytorch"]
    what = f"text2img {rec['size']}x{rec['size']}, batch {rec['batch']}"
    return [
        {
            "measure": f"{what}, {steps} DPM++ steps, CFG {guidance:g}",
            "unit": "images/s",
            "jaxdiff": j["images_per_s"],
            "pytorch": t["images_per_s"] if t else None,
            "higher_is_better": True,
        },
        {
            "measure": f"{what}: JAX first compile (trace + lower + XLA compile)",
            "unit": "s",
            "jaxdiff": j["compile_s"],
            "pytorch": None,
            "higher_is_better": False,
        },
        {
            "measure": f"{what}: JAX cached compile (2nd process, persistent cache)",
            "unit": "s",
            "jaxdiff": c["compile_s"],
            "pytorch": None,
            "higher_is_better": False,
        },
    ]


def table_lines(result: dict, warmup_steps: int) -> list[str]:
    """The markdown table of a run's ``result`` (the JSON this script writes)."""
    c = result["config"]
    records = result["results"]
    j0, t0 = records[0]["jaxdiff"], records[0]["pytorch"]
    dtypes = f"jaxdiff {j0['dtype']}" + (f", PyTorch {t0['dtype']}" if t0 else "")
    return [
        f"Stable Diffusion {'1.5 config' if c['sd15'] else 'tiny test pipeline'}, random "
        f"weights; text2img, {c['steps']} DPM-Solver++ steps, CFG {c['guidance_scale']:g}; "
        f"whole call (text encode + loop + VAE decode); {dtypes}; median of {c['repeats']} "
        f"after a {warmup_steps}-step warm-up. Target on the CPU: jaxdiff / PyTorch images/s "
        f">= {TARGET_RATIO}. Compile = JAX's trace + lower + XLA compile events of the first "
        "call; cached = the same in a second process reading the persistent cache.",
        "",
        "| size | batch | jaxdiff images/s | PyTorch images/s | jaxdiff / PyTorch | "
        "jaxdiff call (s) | PyTorch call (s) | JAX first compile (s) | of it XLA compile (s) | "
        "JAX cached compile (s) | cache hits/misses | jaxdiff peak RSS (MiB) | "
        "jaxdiff cached-run peak RSS (MiB) | PyTorch peak RSS (MiB) | mean diff (uint8) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(table_row(r) for r in records),
    ]


def table_row(rec: dict) -> str:
    j, c, t = rec["jaxdiff"], rec["jaxdiff_cached"], rec["pytorch"]
    return (
        f"| {rec['size']}x{rec['size']} | {rec['batch']} | {j['images_per_s']:.3g} | "
        f"{_f(t['images_per_s'] if t else None, '.3g')} | "
        f"{_f(rec.get('throughput_ratio'), '.2f')} | {j['run_s']:.2f} | "
        f"{_f(t['run_s'] if t else None, '.2f')} | {j['compile_s']:.1f} | "
        f"{j['backend_compile_s']:.1f} | {c['compile_s']:.2f} | "
        f"{c['cache_hits']}/{c['cache_misses']} | {j['peak_rss_mib']:.0f} | "
        f"{c['peak_rss_mib']:.0f} | {_f(t['peak_rss_mib'] if t else None, '.0f')} | "
        f"{_f(j.get('mean_abs_diff_uint8_vs_torch'), '.2g')} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (px)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="prompts per call")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up")
    parser.add_argument(
        "--warmup-steps", type=int, default=1, help="steps of the warm-up (compile) calls"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny test SD pipeline (smoke)")
    parser.add_argument("--no-torch", action="store_true", help="jaxdiff only")
    parser.add_argument(
        "--out", type=Path, default=None, help="result folder (default: benchmarks/results)"
    )
    parser.add_argument("--worker", choices=("build", "torch", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--case-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("cold", "cached"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.warmup_steps < 1:
        parser.error(f"--warmup-steps must be at least 1, got {args.warmup_steps}")

    if args.worker:
        if args.worker == "build":
            out = worker_build(args.folder)
        else:
            fn = worker_torch if args.worker == "torch" else worker_jax
            out = fn(args.folder, args.case_dir, args.size, args.batch, args.steps, args)
        print(RESULT_MARK + json.dumps(out), flush=True)
        return

    sizes = args.sizes or ([64] if args.tiny else [256, 512])
    batches = args.batches or ([1, 2] if args.tiny else [1, 4])
    bad = [s for s in sizes if s <= 0 or s % (16 if args.tiny else 64)]
    if bad:
        parser.error(f"--sizes must be positive multiples of {16 if args.tiny else 64}: {bad}")
    if any(b < 1 for b in batches):
        parser.error(f"--batches must be positive, got {batches}")
    has_torch = not args.no_torch and _has_torch()
    records, measures = [], []
    with tempfile.TemporaryDirectory(prefix="bench_sd_pipeline_") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            folder, weights = TINY_DIR, "tests/reference/pipelines_stable_diffusion/sd_tiny"
            build = {}
        else:
            folder = tmp / "sd15"
            print("[build] SD 1.5-config random-weight pipeline ...", file=sys.stderr, flush=True)
            build = _run_worker("build", folder, args)
            weights = build.pop("weights")
        for size in sizes:
            for batch in batches:
                case = tmp / f"case_{size}_{batch}"
                case.mkdir()
                extra = ["--case-dir", str(case), "--size", str(size), "--batch", str(batch)]
                jax_extra = extra + ["--cache-dir", str(case / "jax_cache")]
                print(f"[{size}x{size}, batch {batch}] ...", file=sys.stderr, flush=True)
                t = _run_worker("torch", folder, args, extra) if has_torch else None
                j = _run_worker("jax", folder, args, jax_extra + ["--phase", "cold"])
                c = _run_worker("jax", folder, args, jax_extra + ["--phase", "cached"])
                rec = {"size": size, "batch": batch, "pytorch": t, "jaxdiff": j}
                rec["jaxdiff_cached"] = c
                rec["throughput_ratio"] = j["images_per_s"] / t["images_per_s"] if t else None
                records.append(rec)
                measures += measures_for(rec, args.steps, args.guidance)
    ratios = [r["throughput_ratio"] for r in records if r["throughput_ratio"] is not None]
    result = {
        "device": device_name(),
        "versions": library_versions(),
        "config": {
            "sd15": not args.tiny,
            "weights": weights,
            **build,
            "sizes": sizes,
            "batches": batches,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "scheduler": "DPMSolverMultistepScheduler (dpmsolver++, order 2)",
            "repeats": args.repeats,
            "warmup_steps": args.warmup_steps,
        },
        "target": {"throughput_ratio_cpu": TARGET_RATIO},
        "min_throughput_ratio": min(ratios) if ratios else None,
        "results": records,
        "measures": measures,
    }
    table = table_lines(result, warmup_steps=args.warmup_steps)
    stem = "sd_pipeline_tiny" if args.tiny else "sd_pipeline"
    print(write_results(stem, result, table, out=args.out))


if __name__ == "__main__":
    main()
