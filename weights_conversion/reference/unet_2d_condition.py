"""Golden references for jaxdiff.models.unet_2d_condition: tiny random diffusers
``UNet2DConditionModel`` s with the real Stable Diffusion block types.

Writes ``tests/reference/unet_2d_condition/<case>/{config.json,
diffusion_pytorch_model.safetensors}`` (saved by diffusers' own ``save_pretrained``, in
float16 to keep the files small; the float32 model that produced the outputs holds exactly
those float16-representable values) and ``<case>.{safetensors,json}`` with the inputs and
expected outputs in NHWC. Cases:

* ``sd15_tiny``: the SD 1.x layout (CrossAttnDownBlock2D + DownBlock2D, conv ``proj_in``,
  ``attention_head_dim`` an int, ``layers_per_block=2``), in_channels 4; also run with an
  ``encoder_attention_mask`` that drops the last context tokens of one row;
* ``sd21_inpaint_tiny``: the SD 2.x layout (``attention_head_dim`` a list,
  ``use_linear_projection``, ``upcast_attention``), three levels, in_channels 9 (inpainting),
  float timesteps;
* ``depth_tiny``: in_channels 5 (depth), cross-attention at every level,
  ``transformer_layers_per_block=(1, 2)``, ``cross_attention_dim=24``.

Every 1-D parameter (norm scales, biases) is perturbed so that default ones/zeros cannot hide
a mapping error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from weights_conversion.reference._io import save_case

CASES = {
    "sd15_tiny": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ),
    "sd21_inpaint_tiny": dict(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=4,
    ),
    "depth_tiny": dict(
        sample_size=16,
        in_channels=5,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        norm_num_groups=4,
    ),
}
BATCH, HEIGHT, WIDTH, SEQ = 2, 16, 16, 7


def build_model(cfg: dict, seed: int = 0, perturb: bool = True):
    """A diffusers UNet2DConditionModel with random weights (1-D params perturbed), eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg).eval()
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def make_inputs(cfg: dict, seed: int, float_timesteps: bool = False) -> dict[str, np.ndarray]:
    """NHWC sample, timesteps (B,), context (B, SEQ, cross_attention_dim), float32."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((BATCH, HEIGHT, WIDTH, cfg["in_channels"])).astype(np.float32)
    if float_timesteps:
        timesteps = np.array([12.5, 801.25], np.float32)
    else:
        timesteps = np.array([10, 981], np.int64)
    context = rng.standard_normal((BATCH, SEQ, cfg["cross_attention_dim"])).astype(np.float32)
    return {"sample": sample, "timesteps": timesteps, "encoder_hidden_states": context}


def run_torch(model, inputs: dict[str, np.ndarray], mask: np.ndarray | None = None) -> np.ndarray:
    """Runs the PyTorch model on NHWC inputs; returns the NHWC output."""
    import torch

    with torch.no_grad():
        out = model(
            torch.from_numpy(inputs["sample"].transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(inputs["timesteps"]),
            torch.from_numpy(inputs["encoder_hidden_states"]),
            encoder_attention_mask=None if mask is None else torch.from_numpy(mask),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def generate(out_dir: Path) -> None:
    import torch

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for i, (name, cfg) in enumerate(CASES.items()):
        model = build_model(cfg, seed=10 * i)
        with torch.no_grad():  # make every weight float16-representable, then store float16
            for p in model.parameters():
                p.copy_(p.half().float())
        model.to(torch.float16).save_pretrained(out_dir / name, safe_serialization=True)
        model.to(torch.float32)
        inputs = make_inputs(cfg, seed=100 + i, float_timesteps=name == "sd21_inpaint_tiny")
        arrays = dict(inputs)
        arrays["expected"] = run_torch(model, inputs)
        meta = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
        if name == "sd15_tiny":
            mask = np.ones((BATCH, SEQ), bool)
            mask[1, 4:] = False
            arrays["encoder_attention_mask"] = mask.astype(np.int64)
            arrays["expected_masked"] = run_torch(model, inputs, mask)
        meta["layout"] = "NHWC inputs/outputs; weights stored float16 by diffusers.save_pretrained"
        save_case(out_dir, name, arrays, meta)
