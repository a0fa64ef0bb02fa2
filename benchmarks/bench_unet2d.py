"""UNet2DModel forward and 50-step DDIM sampling: jaxdiff vs diffusers PyTorch, same weights.

    python -m benchmarks.bench_unet2d [--batch 16] [--size 32] [--steps 50] [--repeats 3]

Builds a diffusers UNet2DModel with the google/ddpm-cat-256 block layout (random weights,
fixed seed), saves it in diffusers layout, loads that folder in both libraries and times, on the
same inputs:

* the UNet forward at (batch, size, size, 3);
* the whole DDIM sampling loop (diffusers ``DDIMPipeline`` vs jaxdiff ``DDIMPipeline``).

JAX numbers separate compile time (first call) from run time (median of ``--repeats`` calls,
each ending in ``block_until_ready``). GFLOP/s come from XLA's cost analysis of the forward.
Writes ``benchmarks/results/unet2d_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import device_name, library_versions, median_time, write_results, xla_flops

CAT_256_LIKE = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=(
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=(
        "UpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
    ),
    attention_head_dim=None,
    norm_eps=1e-6,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)


def build_reference(folder: Path, size: int):
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, **CAT_256_LIKE).eval()
    with torch.no_grad():
        for p in unet.parameters():  # no zero-initialised layers: every weight matters
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(folder / "unet")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDIMPipeline",
                "_diffusers_version": "0.42.1",
                "scheduler": ["diffusers", "DDIMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            }
        )
    )
    return unet, scheduler


def bench_torch(unet, scheduler, batch, size, steps, repeats):
    import torch
    from diffusers import DDIMPipeline

    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500)
    with torch.no_grad():
        unet(x, t)  # warm-up
        forward = median_time(lambda: unet(x, t), repeats)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        with torch.no_grad():
            pipe(
                batch_size=batch,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )

    sample()  # warm-up
    return {"forward_s": forward, "sampling_s": median_time(sample, repeats)}


def bench_jax(folder: Path, batch, size, steps, repeats):
    from jaxdiff.pipelines import DiffusionPipeline
    from jaxdiff.utils.xla import compiler_options

    pipe = DiffusionPipeline.from_pretrained(folder)
    unet, params = pipe.unet, pipe.params["unet"]
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    t = jnp.full((batch,), 500)

    def forward_fn(p, x, t):
        return unet.apply({"params": p}, x, t).sample

    fwd = jax.jit(forward_fn, compiler_options=compiler_options())
    start = time.perf_counter()
    compiled = fwd.lower(params, x, t).compile()
    compile_fwd = time.perf_counter() - start
    flops = xla_flops(compiled, forward_fn, (params, x, t))
    jax.block_until_ready(compiled(params, x, t))
    forward = median_time(lambda: jax.block_until_ready(compiled(params, x, t)), repeats)

    def sample(seed):
        return pipe(
            batch_size=batch, num_inference_steps=steps, seed=seed, output_type="np", progress=False
        )

    start = time.perf_counter()
    sample(0)
    first = time.perf_counter() - start
    sampling = median_time(lambda: sample(1), repeats)
    return {
        "forward_s": forward,
        "forward_compile_s": compile_fwd,
        "forward_gflops": flops / 1e9,
        "forward_gflop_per_s": flops / 1e9 / forward,
        "sampling_s": sampling,
        "sampling_compile_s": max(first - sampling, 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=None, help="result folder (default: benchmarks/results)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        unet, scheduler = build_reference(folder, args.size)
        j = bench_jax(folder, args.batch, args.size, args.steps, args.repeats)
        t = bench_torch(unet, scheduler, args.batch, args.size, args.steps, args.repeats)
    images = args.batch
    result = {
        "device": device_name(),
        "versions": library_versions(),
        "config": {
            "batch": args.batch,
            "size": args.size,
            "steps": args.steps,
            "repeats": args.repeats,
            "unet": "ddpm-cat-256 layout",
            "dtype": "float32",
        },
        "jaxdiff": j,
        "diffusers": t,
        "forward_speedup": t["forward_s"] / j["forward_s"],
        "sampling_images_per_s": {
            "jaxdiff": images / j["sampling_s"],
            "diffusers": images / t["sampling_s"],
        },
        "sampling_speedup": t["sampling_s"] / j["sampling_s"],
    }
    rows = [
        "| measure | jaxdiff (JAX) | diffusers (PyTorch) | ratio |",
        "|---|---|---|---|",
        f"| UNet forward, batch {args.batch}, {args.size}x{args.size} (s) | "
        f"{j['forward_s']:.3f} | {t['forward_s']:.3f} | {result['forward_speedup']:.2f}x |",
        f"| {args.steps}-step DDIM sampling (images/s) | "
        f"{result['sampling_images_per_s']['jaxdiff']:.2f} | "
        f"{result['sampling_images_per_s']['diffusers']:.2f} | {result['sampling_speedup']:.2f}x |",
        f"| forward compile (s) | {j['forward_compile_s']:.1f} | - | |",
        f"| sampling compile (s) | {j['sampling_compile_s']:.1f} | - | |",
        f"| forward GFLOP/s (XLA cost analysis) | {j['forward_gflop_per_s']:.0f} | - | |",
    ]
    print(write_results("unet2d", result, rows, out=args.out))


if __name__ == "__main__":
    main()
