"""Golden references for ``UNet2DModel``: tiny random-weight diffusers UNets + their outputs.

Each case writes ``<out>/<case>/config.json + diffusion_pytorch_model[.fp16].safetensors``
(Hub layout) and ``<out>/<case>.{safetensors,json}`` with the NHWC inputs and the expected
NHWC output. Every parameter gets Gaussian noise before saving, so that norms (initialised to
1/0) and any transposition mistake change the output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weights_conversion.reference._io import save_case

SMALL = dict(
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=4,
    attention_head_dim=8,
)

# name -> (config overrides, input kind)
CASES: dict[str, dict] = {
    # DDPM layout: positional embedding, plain + attention blocks, default time conditioning.
    "ddpm_attn": dict(
        SMALL,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6,
    ),
    # Score-SDE style: Fourier features of sigma, adaptive group norm, class embedding table,
    # centred input, three levels.
    "fourier_scale_shift_classes": dict(
        SMALL,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        time_embedding_type="fourier",
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=10,
        center_input_sample=True,
        in_channels=1,
        out_channels=2,
    ),
    # ResNet resampling (BigGAN-style), attention everywhere, head dim = channels,
    # "timestep" class embedding, sin-first embedding with freq_shift 1, mish, wider temb.
    "resnet_sampling": dict(
        SMALL,
        block_out_channels=(8, 16, 16),
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        attention_head_dim=None,
        class_embed_type="timestep",
        flip_sin_to_cos=False,
        freq_shift=1,
        act_fn="mish",
        time_embedding_dim=24,
        mid_block_scale_factor=1.414,
        attn_norm_num_groups=4,
    ),
    # No attention anywhere, learned time embedding, padding-0 downsampling, gelu, no mid attn.
    "plain_learned": dict(
        SMALL,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        time_embedding_type="learned",
        num_train_timesteps=1000,
        add_attention=False,
        downsample_padding=0,
        act_fn="gelu",
        dropout=0.1,
    ),
}


def build(config: dict, seed: int = 0):
    """A diffusers UNet2DModel of ``config`` with noisy random weights (eval mode, fp32)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def make_inputs(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed NHWC inputs for ``config`` (batch 2)."""
    rng = np.random.default_rng(seed)
    size = config.get("sample_size", 16)
    c = config.get("in_channels", 3)
    out = {"sample": rng.standard_normal((2, size, size, c)).astype(np.float32)}
    if config.get("time_embedding_type") == "fourier":
        out["timesteps"] = np.array([0.5, 3.0], np.float32)  # sigmas
    else:
        out["timesteps"] = np.array([10, 731], np.int64)
    if config.get("num_class_embeds") is not None:
        out["class_labels"] = np.array([3, 7], np.int64)
    elif config.get("class_embed_type") == "timestep":
        out["class_labels"] = np.array([5, 120], np.int64)
    return out


def run(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The torch model on NHWC numpy inputs -> NHWC numpy output (float32)."""
    import torch

    sample = torch.from_numpy(inputs["sample"].transpose(0, 3, 1, 2).copy())
    sample = sample.to(next(model.parameters()).dtype)
    t = torch.from_numpy(inputs["timesteps"])
    kwargs = {}
    if "class_labels" in inputs:
        kwargs["class_labels"] = torch.from_numpy(inputs["class_labels"])
    with torch.no_grad():
        out = model(sample, t, **kwargs).sample
    return out.float().numpy().transpose(0, 2, 3, 1)


def _legacy_names(state: dict) -> dict:
    """Renames attention weights to the pre-0.14 names (query/key/value/proj_attn)."""
    renames = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    out = {}
    for k, v in state.items():
        for new, old in renames.items():
            if ".attentions." in k and new in k:
                k = k.replace(new, old)
        out[k] = v
    return out


def generate(out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    for name, config in CASES.items():
        model = build(config)
        inputs = make_inputs(config)
        model.save_pretrained(out_dir / name)
        save_case(out_dir, name, {**inputs, "expected": run(model, inputs)}, {"config": config})

    # Legacy attention key names (checkpoints such as google/ddpm-cat-256).
    config = dict(CASES["ddpm_attn"], layers_per_block=1)
    model = build(config, seed=3)
    inputs = make_inputs(config, seed=3)
    model.save_pretrained(out_dir / "legacy_names")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (out_dir / "legacy_names" / "diffusion_pytorch_model.safetensors").unlink()
    save_file(
        _legacy_names(state),
        str(out_dir / "legacy_names" / "diffusion_pytorch_model.safetensors"),
        metadata={"format": "pt"},
    )
    save_case(
        out_dir, "legacy_names", {**inputs, "expected": run(model, inputs)}, {"config": config}
    )

    # fp16 variant: weights stored in half precision; the expected output is the fp32 model
    # run on the fp16-rounded weights, so jaxdiff (loading fp16 -> fp32) must match it closely.
    model = build(config, seed=4)
    model = model.half()
    model.save_pretrained(out_dir / "fp16_variant", variant="fp16")
    model = model.float()
    inputs = make_inputs(config, seed=4)
    save_case(
        out_dir, "fp16_variant", {**inputs, "expected": run(model, inputs)}, {"config": config}
    )

    print(f"wrote {len(CASES) + 2} UNet2DModel cases to {out_dir}")
