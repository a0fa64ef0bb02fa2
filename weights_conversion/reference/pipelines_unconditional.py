"""Golden references for the unconditional pipelines and the scan sampling driver.

Writes ``ddpm_tiny/``: a small random-weight diffusers ``DDPMPipeline`` (UNet2DModel with
attention + DDPMScheduler) saved by diffusers itself, so ``model_index.json`` and every file
are exactly what diffusers writes. For deterministic schedulers it runs diffusers' denoising
loop from a fixed x_T and saves x_T and the final images (NHWC, in [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

from weights_conversion.reference._io import save_case

UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)
# (case name, scheduler class, extra config, steps)
CASES = [
    ("ddim_10", "DDIMScheduler", {}, 10),
    ("euler_8", "EulerDiscreteScheduler", {}, 8),
    ("dpmpp2m_8", "DPMSolverMultistepScheduler", {"solver_order": 2}, 8),
    ("pndm_6", "PNDMScheduler", {"skip_prk_steps": True}, 6),
]


def generate(out_dir: Path) -> None:
    import diffusers
    import torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET).eval()
    with torch.no_grad():
        for p in unet.parameters():  # no zero-initialised layers: every weight matters
            p.add_(0.05 * torch.randn_like(p))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir / "ddpm_tiny")
    # Swap schedulers from the *saved* config, as a user of the saved pipeline does (an
    # in-memory config would let the new class use its own defaults; see _use_default_values).
    scheduler = diffusers.DDPMScheduler.from_pretrained(out_dir / "ddpm_tiny" / "scheduler")

    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for name, cls_name, extra, steps in CASES:
        sched = getattr(diffusers, cls_name).from_config(scheduler.config, **extra)
        sched.set_timesteps(steps)
        x = x_T * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                model_in = sched.scale_model_input(x, t)
                eps = unet(model_in, t).sample
                x = sched.step(eps, t, x).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        save_case(
            out_dir,
            name,
            {"x_T": x_T.permute(0, 2, 3, 1), "images": images},
            {"scheduler": cls_name, "extra_config": extra, "num_inference_steps": steps},
        )
