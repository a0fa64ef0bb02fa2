"""Train-step throughput: jaxdiff's jitted DDPM step vs a diffusers + PyTorch training step.

    python -m benchmarks.bench_train [--model cats-32] [--batch 32] [--size 32] \\
        [--steps 8] [--steps-per-call 8] [--repeats 5] [--bf16]

Both sides run the same step on the same UNet2DModel config and batch (Ho et al. 2020,
Algorithm 1): draw t ~ U{0..999} and eps, x_t = add_noise(x0, eps, t), MSE(unet(x_t, t), eps),
backward, global-norm gradient clipping (1.0), AdamW (lr 1e-4, weight decay 1e-6), and an EMA
update of the weights (decay 0.9999). The PyTorch side is diffusers' own ``UNet2DModel`` and
``DDPMScheduler.add_noise`` with ``torch.optim.AdamW`` (its default foreach implementation) and
``torch._foreach_lerp_`` for the EMA, i.e. what diffusers' ``train_unconditional.py`` does per
step, minus data loading.

jaxdiff runs the steps as ``jaxdiff train`` does: ``--steps-per-call`` steps per compiled call
(``TrainStep.steps``, a ``lax.scan``; default ``TrainConfig.steps_per_call``), and, for
comparison, one call per step (``jaxdiff_one_call_per_step``). JAX compile time (lower +
compile) is reported separately; run times are the median over ``--repeats`` of ``--steps``
consecutive steps, ending in ``block_until_ready`` (JAX) or after the last ``optimizer.step()``
(PyTorch, synchronous on CPU). Writes
``benchmarks/results/train_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    device_name,
    library_versions,
    median_time,
    peak_rss_mib,
    write_results,
)
from jaxdiff.training.loop import TrainConfig

LR, WEIGHT_DECAY, CLIP, EMA = 1e-4, 1e-6, 1.0, 0.9999


def unet_fields(model: str, size: int) -> dict:
    from jaxdiff.training.loop import MODEL_PRESETS

    return {**MODEL_PRESETS[model], "sample_size": size}


def bench_jax(
    fields: dict, batch: int, steps: int, repeats: int, bf16: bool, steps_per_call: int = 1
) -> dict:
    from jaxdiff.models.unet_2d import UNet2DModel
    from jaxdiff.schedulers import DDPMScheduler
    from jaxdiff.training.train_state import (
        TrainState,
        make_optimizer,
        make_train_step,
        replicate_state,
    )

    unet = UNet2DModel(**fields)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = make_optimizer(LR, 0, 10**6, weight_decay=WEIGHT_DECAY, grad_clip=CLIP)
    step = make_train_step(
        unet, scheduler, optimizer, ema_decay=EMA, compute_dtype=jnp.bfloat16 if bf16 else None
    )
    state = replicate_state(
        TrainState.create(unet.init_weights(jax.random.key(0)), optimizer), step.mesh
    )
    size = fields["sample_size"]
    x0 = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    key = jax.random.key(1)
    k = steps_per_call
    if steps % k:
        raise ValueError(f"--steps ({steps}) must be a multiple of --steps-per-call ({k})")
    start = time.perf_counter()
    if k == 1:
        compiled = step.jitted.lower(state, x0, key).compile()
    else:
        x0s = np.stack([x0] * k)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(k))
        compiled = step.jitted_steps.lower(state, x0s, keys).compile()
    compile_s = time.perf_counter() - start
    box = {"state": state}

    def run():
        s = box["state"]
        for i in range(steps // k):
            if k == 1:
                s, metrics = compiled(s, x0, jax.random.fold_in(key, i))
            else:
                s, metrics = compiled(s, x0s, keys)
        jax.block_until_ready(s)
        box["state"] = s

    run()  # warm-up
    t = median_time(run, repeats)
    return {
        "compile_s": compile_s,
        "step_s": t / steps,
        "images_per_s": batch * steps / t,
        "devices": step.num_devices,
        "dtype": "bfloat16 compute" if bf16 else "float32",
        "steps_per_call": k,
    }


def bench_torch(fields: dict, batch: int, steps: int, repeats: int) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    ).train()
    ema = [p.detach().clone() for p in unet.parameters()]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    size = fields["sample_size"]
    x0 = torch.rand(batch, 3, size, size) * 2 - 1
    params = list(unet.parameters())

    def one_step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        x_t = scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - EMA)

    def run():
        for _ in range(steps):
            one_step()

    run()  # warm-up
    t = median_time(run, repeats)
    return {
        "step_s": t / steps,
        "images_per_s": batch * steps / t,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cats-32", help="a jaxdiff.training MODEL_PRESETS name")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed repeat")
    parser.add_argument(
        "--steps-per-call",
        type=int,
        default=TrainConfig.steps_per_call,
        help="jaxdiff steps per compiled call, as `jaxdiff train --steps-per-call`",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="also time jaxdiff with bf16 compute")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument(
        "--out", type=Path, default=None, help="result folder (default: benchmarks/results)"
    )
    args = parser.parse_args(argv)

    fields = unet_fields(args.model, args.size)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(_param_shapes(fields)))
    result = {
        "device": device_name(),
        "versions": library_versions(),
        "config": {**_config(args), "unet": {k: v for k, v in fields.items()}, "params": n_params},
    }
    k, timing = args.steps_per_call, (args.batch, args.steps, args.repeats)
    result["jaxdiff"] = bench_jax(fields, *timing, bf16=False, steps_per_call=k)
    if k > 1:
        result["jaxdiff_one_call_per_step"] = bench_jax(fields, *timing, bf16=False)
    if args.bf16:
        result["jaxdiff_bf16"] = bench_jax(fields, *timing, bf16=True, steps_per_call=k)
    if not args.no_torch:
        result["torch"] = bench_torch(fields, args.batch, args.steps, args.repeats)
    result["peak_rss_mib"] = peak_rss_mib()

    table = [
        f"Train step, UNet2DModel preset `{args.model}` ({n_params / 1e6:.2f}M params), "
        f"{args.size}x{args.size}, batch {args.batch}; "
        f"median of {args.repeats} x {args.steps} steps.",
        "",
        "| implementation | images/s | step (ms) | compile (s) |",
        "|---|---|---|---|",
    ]
    per_call = f", {k} steps per call" if k > 1 else ""
    for name, label in (("jaxdiff", f"jaxdiff (jit, fp32{per_call})"),
                        ("jaxdiff_one_call_per_step", "jaxdiff (jit, fp32, one call per step)"),
                        ("jaxdiff_bf16", f"jaxdiff (jit, bf16{per_call})"),
                        ("torch", "diffusers + PyTorch (fp32)")):  # fmt: skip
        if name in result:
            r = result[name]
            comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            table.append(
                f"| {label} | {r['images_per_s']:.1f} | {1e3 * r['step_s']:.1f} | {comp} |"
            )
    if "torch" in result:
        speedup = result["jaxdiff"]["images_per_s"] / result["torch"]["images_per_s"]
        result["speedup_vs_torch"] = speedup
        table += ["", f"jaxdiff / PyTorch throughput: {speedup:.2f}x"]
        if "jaxdiff_one_call_per_step" in result:
            one = result["jaxdiff_one_call_per_step"]["images_per_s"]
            result["one_call_per_step_vs_torch"] = one / result["torch"]["images_per_s"]
            table += [f"(one call per step: {result['one_call_per_step_vs_torch']:.2f}x)"]
    print(write_results("train", result, table, out=args.out))


def _config(args) -> dict:
    """The command-line options that define the measurement (not where it is written)."""
    return {k: v for k, v in vars(args).items() if k != "out"}


def _param_shapes(fields: dict):
    from jaxdiff.models.unet_2d import UNet2DModel

    return UNet2DModel(**fields).param_shapes()


if __name__ == "__main__":
    main()
