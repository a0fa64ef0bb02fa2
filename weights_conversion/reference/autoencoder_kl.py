"""Golden references for jaxdiff.models.autoencoder_kl: tiny random diffusers AutoencoderKLs.

Writes ``tests/reference/autoencoder_kl/<case>/{config.json, diffusion_pytorch_model.safetensors}``
and the expected outputs ``<case>.{safetensors,json}`` (arrays NHWC). Every parameter is
perturbed (norm scales around 1, biases and diffusers' zero-inits non-zero) so that a mapping
error cannot hide behind an initial value. Cases:

* ``base``: 2 blocks (16, 32), 1 layer per block, 8 groups, ``sample_size=16`` so that the
  tiled encode/decode (diffusers' ``enable_tiling()``) runs on several tiles, including small
  edge tiles, of a non-square input;
* ``no_quant_conv``: 3 blocks (16, 16, 32), 2 layers per block, 16 groups, ``act_fn="mish"``,
  no ``quant_conv``, no mid-block attention;
* ``legacy_attention``: 2 blocks, 16 groups, saved with the pre-0.14 attention names
  (``query/key/value/proj_attn``); diffusers itself is checked to load it to the same outputs.

Arrays per case: ``x`` (image), ``mean``/``logvar`` (posterior of ``x``), ``z`` (latent) and
``decoded`` (decode of ``z``); ``base`` also has ``x_tile``/``tiled_mean``/``tiled_logvar`` and
``z_tile``/``tiled_decoded``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from weights_conversion.reference._io import save_case

CASES = {
    "base": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    ),
    "no_quant_conv": dict(
        block_out_channels=(16, 16, 32),
        layers_per_block=2,
        norm_num_groups=16,
        latent_channels=4,
        sample_size=32,
        act_fn="mish",
        use_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=0.13025,
    ),
    "legacy_attention": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=16,
        latent_channels=4,
        sample_size=32,
    ),
}
_CURRENT = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def full_config(cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    return dict(
        cfg,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
    )


def build(cfg: dict, seed: int):
    """A diffusers AutoencoderKL with every parameter perturbed away from its initial value."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**full_config(cfg)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key and key.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif key.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                # std() of a 1-element tensor is NaN (Bessel's correction): use |p| there.
                scale = float(p.std()) if p.numel() > 1 else float(p.abs().mean())
                p.add_(0.3 * scale * torch.randn_like(p))
    return model


def nchw(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def run(model, x: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    """Encode ``x`` and decode ``z`` (NHWC in, NHWC out)."""
    import torch

    with torch.no_grad():
        post = model.encode(nchw(x)).latent_dist
        dec = model.decode(nchw(z)).sample
    return {"mean": nhwc(post.mean), "logvar": nhwc(post.logvar), "decoded": nhwc(dec)}


def legacy_state_dict(model) -> dict:
    """The state dict with the pre-0.14 attention names."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"^(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.{_CURRENT[m.group(2)]}.{m.group(3)}"
        out[k] = v.contiguous()
    return out


def generate(out_dir: Path) -> None:
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for seed, (name, cfg) in enumerate(CASES.items()):
        model = build(cfg, seed)
        folder = out_dir / name
        model.save_pretrained(folder, safe_serialization=True)
        f = 2 ** (len(cfg["block_out_channels"]) - 1)
        c = cfg["latent_channels"]
        x = rng.uniform(-1, 1, (2, 8 * f, 6 * f, 3)).astype(np.float32)
        z = rng.standard_normal((2, 8, 6, c)).astype(np.float32)
        arrays = {"x": x, "z": z}
        arrays.update(run(model, x, z))
        meta = {"config": full_config(cfg), "model_folder": name}
        if name == "base":
            # Tiles: sample_size 16 -> latent tiles of 8 with stride 6; 20x12 latents give a
            # 4x2 grid with 2-high bottom tiles. Image tiles of 16 with stride 12 on 40x16: a
            # 4x1 column (4-high last tile; few tile shapes keep the test's compile time low).
            x_tile = rng.uniform(-1, 1, (1, 40, 16, 3)).astype(np.float32)
            z_tile = rng.standard_normal((2, 20, 12, c)).astype(np.float32)
            model.enable_tiling()
            tiled = run(model, x_tile, z_tile)
            model.disable_tiling()
            untiled = run(model, x_tile, z_tile)
            assert np.abs(tiled["decoded"] - untiled["decoded"]).max() > 1e-3, (
                "tiling had no effect"
            )
            arrays.update(
                x_tile=x_tile,
                z_tile=z_tile,
                tiled_mean=tiled["mean"],
                tiled_logvar=tiled["logvar"],
                tiled_decoded=tiled["decoded"],
            )
            meta["tiling"] = {
                "tile_sample_min_size": model.tile_sample_min_size,
                "tile_latent_min_size": model.tile_latent_min_size,
                "tile_overlap_factor": model.tile_overlap_factor,
            }
        if name == "legacy_attention":
            legacy = legacy_state_dict(model)
            assert any(k.endswith("proj_attn.weight") for k in legacy)
            save_file(
                legacy,
                str(folder / "diffusion_pytorch_model.safetensors"),
                metadata={"format": "pt"},
            )
            reloaded = AutoencoderKL.from_pretrained(folder).eval()
            again = run(reloaded, x, z)
            for k, v in again.items():
                np.testing.assert_array_equal(
                    v, arrays[k], err_msg=f"diffusers reload of legacy names: {k}"
                )
            meta["legacy_names"] = True
        config = json.loads((folder / "config.json").read_text())
        meta["diffusers_config"] = config
        save_case(out_dir, name, arrays, meta)
        del model
        torch.manual_seed(0)
