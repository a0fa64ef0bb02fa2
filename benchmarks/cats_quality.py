"""Sample quality of the shipped cats model: sliced Wasserstein distance on 7x7 patches.

    python -m benchmarks.cats_quality [--model DIR] [--samples 1000] [--steps 20] [--seed 0]

Draws ``--samples`` images with DDIM from the model (default: the one shipped in the package)
and compares their patches with the CIFAR-10 test cats (``jaxdiff.training.metrics``). Two
references make the number readable: the training cats against the test cats (what a perfect
model would score, up to sampling noise) and Gaussian-blurred uniform noise (a blob baseline).
Writes ``benchmarks/results/cats_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    from jaxdiff.cli import default_model
    from jaxdiff.pipelines import DDIMPipeline
    from jaxdiff.training.data import load_cifar10_cats
    from jaxdiff.training.metrics import blurred_noise, sliced_wasserstein

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    model = args.model or default_model()
    test = load_cifar10_cats("test")[: args.samples]
    train = load_cifar10_cats("train")[: args.samples]
    n = len(test)
    pipe = DDIMPipeline.from_pretrained(model)
    start = time.perf_counter()
    images = pipe(batch_size=n, num_inference_steps=args.steps, seed=args.seed, output_type="np")
    took = time.perf_counter() - start
    samples = np.round(images.images * 255).astype(np.uint8)
    noise = blurred_noise(test.shape, 1.5, np.random.default_rng(args.seed))
    rows = {
        "model samples vs test cats": sliced_wasserstein(samples, test),
        "training cats vs test cats (floor)": sliced_wasserstein(train, test),
        "blurred noise vs test cats (ceiling)": sliced_wasserstein(noise, test),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(model),
        "samples": n,
        "ddim_steps": args.steps,
        "seed": args.seed,
        "sampling_seconds": took,
        "swd_7x7": rows,
    }
    (out / "cats_quality.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"Sliced Wasserstein distance on 7x7 patches ({n} images each, lower is better; "
        f"samples: {args.steps}-step DDIM, seed {args.seed}, {took:.0f} s to sample)",
        "",
        "| compared with the CIFAR-10 test cats | SWD |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in rows.items()],
    ]
    (out / "cats_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
