"""Golden references for jaxdiff.models.clip_text: tiny random transformers CLIPTextModels.

Writes ``tests/reference/clip_text/<case>/{config.json, model.safetensors}`` and the expected
outputs ``<case>.{safetensors,json}``. Two cases cover both activations and both pooling rules:

* ``quick_gelu_eos2``: the SD 1.x kind (``quick_gelu``, legacy ``eos_token_id=2`` so pooling is
  ``argmax(input_ids)``), weights stored with the ``text_model.`` prefix and the
  ``position_ids`` buffer, as in the Stable Diffusion v1.5 repo;
* ``gelu_eos_id``: the SD 2.x kind (``gelu``, ``eos_token_id`` a real id so pooling is the first
  position equal to it; one row has a larger id after its EOS so the two rules differ), saved by
  ``transformers.save_pretrained`` itself (transformers 5 writes no ``text_model.`` prefix).

Inputs are padded (with the EOS id, as SD tokenizers pad, or with ``pad_token_id``) and are run
twice: without an attention mask (what SD pipelines do) and with the right-padding mask.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from weights_conversion.reference._io import save_case

CASES = {
    "quick_gelu_eos2": dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
    "gelu_eos_id": dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        projection_dim=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=998,
        eos_token_id=997,
        pad_token_id=1,
    ),
}
BOS, EOS = 998, 999  # the ids the legacy case's prompts use (EOS is the largest id, as 49407)


def make_inputs(name: str, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 (3, seq): prompts of 5, 9 and seq-2 tokens + padding."""
    rng = np.random.default_rng(7)
    cfg = CASES[name]
    if name == "quick_gelu_eos2":
        bos, eos, pad = BOS, EOS, EOS  # SD 1.x pads with <|endoftext|>
    else:
        bos, eos, pad = cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]
    ids = np.full((3, seq), pad, np.int64)
    mask = np.zeros((3, seq), np.int64)
    for row, n in enumerate((5, 9, seq - 2)):
        ids[row, 0] = bos
        ids[row, 1 : n + 1] = rng.integers(3, 990, n)
        ids[row, n + 1] = eos
        mask[row, : n + 2] = 1
    if name == "gelu_eos_id":
        ids[0, 7] = 999  # a larger id after EOS: argmax(ids) != first EOS position
    return ids, mask


def build(name: str, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**CASES[name])).eval()
    with torch.no_grad():  # non-trivial norms and biases (transformers inits them to 1 / 0)
        for key, p in model.named_parameters():
            if "norm" in key and key.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif key.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def run(model, ids: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )
    arrays = {
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": out.pooler_output.numpy(),
    }
    for i, h in enumerate(out.hidden_states):
        arrays[f"hidden_states_{i}"] = h.numpy()
    return arrays


def save_with_prefix(model, folder: Path) -> None:
    """The Stable Diffusion repos' layout: ``text_model.`` keys plus the position_ids buffer."""
    import torch
    from safetensors.torch import save_file

    model.save_pretrained(folder)
    tensors = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def generate(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for seed, (name, seq) in enumerate((("quick_gelu_eos2", 77), ("gelu_eos_id", 16))):
        model = build(name, seed)
        if name == "quick_gelu_eos2":
            save_with_prefix(model, out_dir / name)
        else:
            model.save_pretrained(out_dir / name)
        ids, mask = make_inputs(name, seq)
        arrays = {"input_ids": ids, "attention_mask": mask}
        arrays.update(run(model, ids, None))
        arrays.update({f"masked_{k}": v for k, v in run(model, ids, mask).items()})
        meta = {
            "config": CASES[name],
            "inputs": "input_ids (3, seq) padded; outputs without mask, masked_* with mask",
            "num_hidden_states": CASES[name]["num_hidden_layers"] + 1,
            "model_folder": name,
        }
        save_case(out_dir, name, arrays, meta)
