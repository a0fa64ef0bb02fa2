"""Stable Diffusion v1.5 components, jaxdiff vs diffusers/transformers PyTorch, same weights.

    python -m benchmarks.bench_sd_components [--only unet|vae|clip] [--repeats 3]
        [--sizes 64 32] [--vae-sizes 64] [--batch 2] [--tiny]

For each component, a PyTorch model is built at the real SD 1.5 config with random weights
(``torch.manual_seed(0)``) and saved in diffusers/transformers layout to a temporary folder;
both libraries then load that same folder and run the same inputs:

* ``unet``: ``UNet2DConditionModel`` forward, batch ``--batch`` (2: the classifier-free
  guidance pair), latents ``size x size x 4`` for each of ``--sizes`` (64: 512 px images,
  32: 256 px), a ``77 x 768`` text context, float32;
* ``vae``: ``AutoencoderKL`` decode of one ``64 x 64 x 4`` latent to a ``512 x 512`` image;
* ``clip``: ``CLIPTextModel`` encode of ``batch x 77`` token ids.

Every (component, input, framework) is measured in its own subprocess, so that the peak
resident memory (``ru_maxrss``) belongs to one framework and one input: it includes loading
the weights. JAX numbers separate the compile time (``lower().compile()``) from the run time
(median of ``--repeats`` calls after one warm-up call, each ending in ``block_until_ready``).
GFLOP per call comes from XLA's cost analysis of the jitted function; the PyTorch GFLOP/s use
the same count. The relative L2 between the two outputs checks that the same work was done.

Writes ``benchmarks/results/sd_components_<device>.json`` and ``.md`` (``--tiny``: small
configs for a smoke test, written as ``sd_components_tiny_<device>``). Without torch the
weights are jaxdiff's own random init and only the jaxdiff columns are filled.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    device_name,
    library_versions,
    median_time,
    peak_rss_mib,
    write_results,
    xla_flops,
)

# ----------------------------------------------------------------------------- configs

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
TINY_VAE.update(
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2
)
TINY_VAE["sample_size"] = 32
# openai/clip-vit-large-patch14's text tower, as in runwayml/stable-diffusion-v1-5/text_encoder
SD15_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
TINY_CLIP = dict(
    SD15_CLIP, vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2
)
TINY_CLIP.update(num_attention_heads=4, projection_dim=32)
SEQ = 77

COMPONENTS = {
    # name: (jaxdiff module, class name, SD 1.5 config, tiny config)
    "unet": ("jaxdiff.models.unet_2d_condition", "UNet2DConditionModel", SD15_UNET, TINY_UNET),
    "vae": ("jaxdiff.models.autoencoder_kl", "AutoencoderKL", SD15_VAE, TINY_VAE),
    "clip": ("jaxdiff.models.clip_text", "CLIPTextModel", SD15_CLIP, TINY_CLIP),
}
RESULT_MARK = "BENCH_RESULT "


def _config(component: str, tiny: bool) -> dict:
    return COMPONENTS[component][3 if tiny else 2]


def _has_torch() -> bool:
    return all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers"))


# ----------------------------------------------------------------------------- inputs


def make_inputs(component: str, cfg: dict, batch: int, size: int) -> dict[str, np.ndarray]:
    """Fixed NHWC numpy inputs (seed 0) for one call."""
    rng = np.random.default_rng(0)
    if component == "unet":
        return {
            "sample": rng.standard_normal((batch, size, size, cfg["in_channels"]), np.float32),
            "timesteps": np.full((batch,), 500, np.int64),
            "context": rng.standard_normal((batch, SEQ, cfg["cross_attention_dim"]), np.float32),
        }
    if component == "vae":
        return {"latent": rng.standard_normal((1, size, size, cfg["latent_channels"]), np.float32)}
    ids = rng.integers(0, cfg["vocab_size"] - 1, (batch, SEQ), dtype=np.int64)
    ids[:, 0] = cfg["vocab_size"] - 2
    ids[:, -1] = cfg["vocab_size"] - 1  # end-of-text: the largest id (eos_token_id == 2 rule)
    return {"input_ids": ids}


def describe(component: str, cfg: dict, batch: int, size: int) -> str:
    if component == "unet":
        return f"batch {batch}, {size}x{size}x4 latents, {SEQ}x{cfg['cross_attention_dim']} context"
    if component == "vae":
        f = 2 ** (len(cfg["block_out_channels"]) - 1)
        return f"decode {size}x{size}x4 -> {size * f}x{size * f}x3"
    return f"batch {batch} x {SEQ} tokens"


# ----------------------------------------------------------------------------- workers


def worker_build(component: str, folder: Path, tiny: bool) -> dict:
    """Builds the random-weight model (PyTorch when available) and saves it to ``folder``."""
    cfg = _config(component, tiny)
    if _has_torch():
        import torch

        torch.manual_seed(0)
        if component == "clip":
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig(**cfg))
        else:
            import diffusers

            model = getattr(diffusers, COMPONENTS[component][1])(**cfg)
        model.eval().save_pretrained(folder)
        return {"weights": "PyTorch random init, torch.manual_seed(0)"}
    import importlib

    import jax

    mod, cls_name = COMPONENTS[component][:2]
    cls = getattr(importlib.import_module(mod), cls_name)
    module = cls.from_config(cfg)
    module.save_pretrained(folder, module.init_weights(jax.random.key(0)))
    return {"weights": "jaxdiff random init, key 0 (torch not installed)"}


def worker_torch(component: str, folder: Path, tiny: bool, batch: int, size: int, repeats: int):
    import torch

    cfg = _config(component, tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    if component == "clip":
        from transformers import CLIPTextModel

        model = CLIPTextModel.from_pretrained(folder, dtype=torch.float32)
    else:
        import diffusers

        model = getattr(diffusers, COMPONENTS[component][1]).from_pretrained(
            folder, dtype=torch.float32
        )
    model = model.eval().to(device)
    load_s = time.perf_counter() - start
    x = {
        k: torch.from_numpy(v).to(device)
        for k, v in make_inputs(component, cfg, batch, size).items()
    }

    def call():
        if component == "unet":
            out = model(x["sample"].permute(0, 3, 1, 2), x["timesteps"], x["context"]).sample
        elif component == "vae":
            out = model.decode(x["latent"].permute(0, 3, 1, 2)).sample
        else:
            out = model(x["input_ids"]).last_hidden_state
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        start = time.perf_counter()
        out = call()
        first = time.perf_counter() - start
        run = median_time(call, repeats)
    out = out.float().cpu().numpy()
    if out.ndim == 4:
        out = out.transpose(0, 2, 3, 1)
    np.save(folder / f"torch_out_{size}.npy", out)
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "first_call_s": first,
        "run_s": run,
        "peak_rss_mib": peak_rss_mib(),
    }


def worker_jax(component: str, folder: Path, tiny: bool, batch: int, size: int, repeats: int):
    import importlib

    import jax
    import jax.numpy as jnp

    from jaxdiff.utils.xla import compiler_options

    cfg = _config(component, tiny)
    mod, cls_name = COMPONENTS[component][:2]
    cls = getattr(importlib.import_module(mod), cls_name)
    start = time.perf_counter()
    module, params = cls.from_pretrained(folder, dtype=jnp.float32)
    params = jax.block_until_ready(jax.device_put(params))
    load_s = time.perf_counter() - start
    inputs = make_inputs(component, cfg, batch, size)
    if component == "clip":
        inputs["input_ids"] = inputs["input_ids"].astype(np.int32)
    args = tuple(jax.device_put(v) for v in inputs.values())

    if component == "unet":

        def fn(p, sample, t, context):
            return module.apply({"params": p}, sample, t, context).sample
    elif component == "vae":

        def fn(p, latent):
            return module.apply({"params": p}, latent, method=cls.decode).sample
    else:

        def fn(p, ids):
            return module.apply({"params": p}, ids).last_hidden_state

    start = time.perf_counter()
    compiled = jax.jit(fn, compiler_options=compiler_options()).lower(params, *args).compile()
    compile_s = time.perf_counter() - start
    flops = xla_flops(compiled, fn, (params, *args))
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(params, *args))
    first = time.perf_counter() - start
    run = median_time(lambda: jax.block_until_ready(compiled(params, *args)), repeats)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "load_s": load_s,
        "compile_s": compile_s,
        "first_call_s": first,
        "run_s": run,
        "gflop": flops / 1e9,
        "peak_rss_mib": peak_rss_mib(),
    }
    ref = folder / f"torch_out_{size}.npy"
    if ref.is_file():
        expected = np.load(ref).astype(np.float64)
        got = np.asarray(out, np.float64)
        result["rel_l2_vs_torch"] = float(
            np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)
        )
    return result


# ----------------------------------------------------------------------------- driver


def _run_worker(kind: str, component: str, folder: Path, args, size: int = 0) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_sd_components",
        "--worker",
        kind,
        "--component",
        component,
        "--folder",
        str(folder),
        "--batch",
        str(args.batch),
        "--size",
        str(size),
        "--repeats",
        str(args.repeats),
    ] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{kind} worker for {component} (size {size}) failed with code {proc.returncode}:\n"
            + proc.stderr[-4000:]
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise RuntimeError(f"{kind} worker for {component} printed no result:\n{proc.stdout[-2000:]}")


def _row(component: str, case: str, j: dict, t: dict | None) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    gf = j["gflop"]
    t_run = t["run_s"] if t else None
    return (
        f"| {component} | {case} | {j['run_s']:.3f} | {f(t_run, '.3f')} | "
        f"{f(j['run_s'] / t_run if t else None, '.2f')} | {gf:.3g} | "
        f"{f(gf / j['run_s'] if gf else None, '.0f')} | "
        f"{f(gf / t_run if t and gf else None, '.0f')} | {j['compile_s']:.1f} | "
        f"{j['peak_rss_mib']:.0f} | {f(t['peak_rss_mib'] if t else None, '.0f')} | "
        f"{f(j.get('rel_l2_vs_torch'), '.1e')} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(COMPONENTS), action="append", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="UNet latent sizes")
    parser.add_argument("--vae-sizes", type=int, nargs="+", default=None, help="VAE latent sizes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="small configs (smoke test)")
    parser.add_argument(
        "--out", type=Path, default=None, help="result folder (default: benchmarks/results)"
    )
    parser.add_argument("--worker", choices=("build", "torch", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--component", choices=sorted(COMPONENTS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    if args.worker:
        fns = {"build": worker_build, "torch": worker_torch, "jax": worker_jax}
        if args.worker == "build":
            out = worker_build(args.component, args.folder, args.tiny)
        else:
            out = fns[args.worker](
                args.component, args.folder, args.tiny, args.batch, args.size, args.repeats
            )
        print(RESULT_MARK + json.dumps(out), flush=True)
        return

    sizes = args.sizes or ([16, 8] if args.tiny else [64, 32])
    vae_sizes = args.vae_sizes or ([8] if args.tiny else [64])
    cases = {"unet": sizes, "vae": vae_sizes, "clip": [SEQ]}
    has_torch = _has_torch()
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="bench_sd_") as tmp:
        for component in args.only or list(COMPONENTS):
            folder = Path(tmp) / component
            cfg = _config(component, args.tiny)
            build = _run_worker("build", component, folder, args)
            for size in cases[component]:
                case = describe(component, cfg, args.batch, size)
                print(f"[{component}] {case} ...", file=sys.stderr, flush=True)
                t = _run_worker("torch", component, folder, args, size) if has_torch else None
                j = _run_worker("jax", component, folder, args, size)
                rec = {"component": component, "case": case, "size": size, "jaxdiff": j}
                rec.update(pytorch=t, weights=build["weights"])
                if t:
                    rec["time_ratio_jax_over_torch"] = j["run_s"] / t["run_s"]
                    rec["torch_gflop_per_s"] = j["gflop"] / t["run_s"]
                rec["jax_gflop_per_s"] = j["gflop"] / j["run_s"]
                records.append(rec)
                rows.append(_row(component, case, j, t))
    result = {
        "device": device_name(),
        "versions": library_versions(),
        "config": {
            "sd15": not args.tiny,
            "batch": args.batch,
            "unet_sizes": sizes,
            "vae_sizes": vae_sizes,
            "repeats": args.repeats,
            "dtype": "float32",
        },
        "results": records,
    }
    table = [
        "| model | input | jaxdiff (s) | PyTorch (s) | jaxdiff / PyTorch time | GFLOP per call | "
        "jaxdiff GFLOP/s | PyTorch GFLOP/s | JAX compile (s) | jaxdiff peak RSS (MiB) | "
        "PyTorch peak RSS (MiB) | rel. L2 jaxdiff vs PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    stem = "sd_components_tiny" if args.tiny else "sd_components"
    print(write_results(stem, result, table, out=args.out))


if __name__ == "__main__":
    main()
