r"""Single ops, jaxdiff/JAX vs PyTorch: where the model-level ratios come from.

    python -m benchmarks.bench_ops [--repeats 5] [--quick] [--out DIR]

Times, on the same random fp32 inputs, the ops the UNets and the VAE spend their time in:

* **matmul** ``(M, K) @ (K, N)``: the machine's peak, the same BLAS-like kernel class both use;
* **3x3 convolution**, stride 1, padding 1, at the UNets' shapes: jaxdiff's ``layers.Conv2d``
  (``lax.conv_general_dilated`` in NHWC, or an im2col matmul for tiny outputs), compiled with
  :func:`jaxdiff.utils.compiler_options` (Eigen, not YNNPACK, convolutions on the CPU) as
  every jaxdiff program is, against ``torch.nn.functional.conv2d`` (oneDNN) in channels-last;
  the "plain JAX" column is the same conv under XLA's default options;
* **attention** ``softmax(Q K^T / sqrt(d)) V`` (*Vaswani et al. (2017), Eq. 1*) at SD 1.5's
  shapes: ``layers.dot_product_attention`` (heads first, chunked on the CPU) against
  ``torch.nn.functional.scaled_dot_product_attention``; "plain JAX" is
  ``jax.nn.dot_product_attention(implementation="xla")``.

Each time is the minimum over ``--repeats`` calls after a warm-up (the minimum, not the median:
single ops of milliseconds are where a shared machine's noise shows most), JAX calls ending in
``block_until_ready``. GFLOP/s count the multiply-adds of the op (2 per MAC). Writes
``<out>/ops_<device>.json`` (with a ``"measures"`` list for ``python -m benchmarks``) and ``.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, library_versions, write_results
from jaxdiff.utils.xla import compiler_options

# (batch, height, width, in channels, out channels)
CONVS = [
    (16, 32, 32, 128, 128),  # ddpm-cat-256 layout at 32x32: the dominant level
    (16, 16, 16, 256, 256),
    (16, 4, 4, 512, 512),  # im2col matmul in layers.Conv2d
    (2, 64, 64, 320, 320),  # SD 1.5 UNet at 64x64 latents
    (2, 32, 32, 640, 640),
    (2, 16, 16, 1280, 1280),
]
MATMULS = [(2048, 2048, 2048), (16384, 128, 128)]
# (batch, query tokens, key tokens, heads, head dim)
ATTENTIONS = [
    (2, 4096, 4096, 8, 40),  # SD 1.5 self-attention at 64x64 latents
    (2, 4096, 77, 8, 40),  # its cross-attention to CLIP
    (2, 1024, 1024, 8, 80),  # at 32x32 latents
]
QUICK = dict(convs=[(2, 16, 16, 64, 64), (2, 4, 4, 128, 128)], matmuls=[(256, 256, 256)],
             attentions=[(1, 256, 256, 2, 32)])  # fmt: skip


def min_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_matmul(shape, repeats, torch):
    m, k, n = shape
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    f = jax.jit(jnp.matmul, compiler_options=compiler_options())
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    t_jax = min_time(lambda: f(ja, jb).block_until_ready(), repeats)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t_torch = min_time(lambda: ta @ tb, repeats)
    return f"matmul ({m}x{k}) @ ({k}x{n})", 2 * m * k * n, t_jax, t_torch


def bench_conv(shape, repeats, torch):
    from jaxdiff.models.layers import Conv2d

    b, h, w, ci, co = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, w, ci), np.float32)
    kernel = (rng.standard_normal((3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)
    conv = Conv2d(co)
    params = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((co,))}
    f = jax.jit(lambda p, x: conv.apply({"params": p}, x), compiler_options=compiler_options())
    plain = jax.jit(lambda p, x: conv.apply({"params": p}, x))
    jx = jnp.asarray(x)
    t_jax = min_time(lambda: f(params, jx).block_until_ready(), repeats)
    t_plain = min_time(lambda: plain(params, jx).block_until_ready(), repeats)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels-last
    tk = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    tbias = torch.zeros(co)
    with torch.inference_mode():
        t_torch = min_time(lambda: torch.nn.functional.conv2d(tx, tk, tbias, padding=1), repeats)
    what = f"conv 3x3 {ci}->{co} on {b}x{h}x{w}"
    return what, 2 * b * h * w * ci * co * 9, t_jax, t_torch, t_plain


def bench_attention(shape, repeats, torch):
    from jaxdiff.models.layers import dot_product_attention

    b, t, s, n, d = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, t, n, d), np.float32)
    k, v = (rng.standard_normal((b, s, n, d), np.float32) for _ in range(2))
    jq, jk, jv = (jnp.asarray(a) for a in (q, k, v))
    ours = jax.jit(dot_product_attention, compiler_options=compiler_options())
    t_jax = min_time(lambda: ours(jq, jk, jv).block_until_ready(), repeats)
    plain = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    t_plain = min_time(lambda: plain(jq, jk, jv).block_until_ready(), repeats)
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        t_torch = min_time(lambda: sdpa(tq, tk, tv), repeats)
    what = f"attention {n} heads x {d}, {t} x {s} tokens, batch {b}"
    return what, 4 * b * n * t * s * d, t_jax, t_torch, t_plain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="result folder")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    import torch

    shapes = QUICK if args.quick else dict(convs=CONVS, matmuls=MATMULS, attentions=ATTENTIONS)
    records = []
    for fn, key in ((bench_matmul, "matmuls"), (bench_conv, "convs"), (bench_attention, "attentions")):  # fmt: skip
        for shape in shapes[key]:
            what, flop, t_jax, t_torch, *plain = fn(shape, args.repeats, torch)
            rec = {"op": what, "shape": list(shape), "flop": flop, "jaxdiff_s": t_jax}
            rec.update(pytorch_s=t_torch, plain_jax_s=plain[0] if plain else None)
            records.append(rec)
            print(
                f"{what}: jaxdiff {t_jax * 1e3:.1f} ms, PyTorch {t_torch * 1e3:.1f} ms", flush=True
            )
    result = {
        "device": device_name(),
        "versions": library_versions(),
        "config": {"repeats": args.repeats, "quick": args.quick, "dtype": "float32"},
        "results": records,
        "measures": [
            {
                "measure": r["op"],
                "unit": "ms",
                "jaxdiff": r["jaxdiff_s"] * 1e3,
                "pytorch": r["pytorch_s"] * 1e3,
                "higher_is_better": False,
            }
            for r in records
        ],  # fmt: skip
    }
    rows = [
        f"Single fp32 ops, minimum of {args.repeats} calls after a warm-up; GFLOP/s = 2 x MACs "
        "/ time. Plain JAX: convs under XLA's default options (YNNPACK convolutions), attention "
        "as `jax.nn.dot_product_attention(implementation='xla')`.",
        "",
        "| op | jaxdiff (ms) | PyTorch (ms) | PyTorch / jaxdiff time | jaxdiff GFLOP/s | "
        "PyTorch GFLOP/s | plain JAX (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        gj, gt = r["flop"] / r["jaxdiff_s"] / 1e9, r["flop"] / r["pytorch_s"] / 1e9
        plain = "-" if r["plain_jax_s"] is None else f"{r['plain_jax_s'] * 1e3:.1f}"
        rows.append(
            f"| {r['op']} | {r['jaxdiff_s'] * 1e3:.1f} | {r['pytorch_s'] * 1e3:.1f} | "
            f"{r['pytorch_s'] / r['jaxdiff_s']:.2f} | {gj:.0f} | {gt:.0f} | {plain} |"
        )
    print(write_results("ops", result, rows, out=args.out))


if __name__ == "__main__":
    main()
