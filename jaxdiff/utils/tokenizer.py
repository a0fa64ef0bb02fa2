"""Tokenizer glue: transformers' ``CLIPTokenizer`` from a repo's ``tokenizer/`` folder, prompt
-> padded ``input_ids``, and the openai CLIP vocabulary built from its BPE merges file.

::

    tok = load_tokenizer("runwayml/stable-diffusion-v1-5")     # or a local folder
    ids = tokenize(tok, ["a photo of a cat"])                  # int32 (1, 77), padded with EOS

CLIP's tokenizer is byte-level BPE (*Sennrich et al. (2016)*; byte-level as in GPT-2,
*Radford et al. (2019)*) over lower-cased text, with ``<|startoftext|>`` (49406) and
``<|endoftext|>`` (49407) around every prompt (*Radford et al. (2021)*).

transformers is imported lazily, inside the functions; it never imports torch for tokenizing.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxdiff import hub

__all__ = ["build_clip_vocab", "load_tokenizer", "tokenize", "write_clip_tokenizer"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# openai CLIP's bpe_simple_vocab_16e6.txt.gz: line 0 is a header, lines 1..48894 are the merges
# used (49152 - 256 - 2 of them), the rest are unused.
_NUM_MERGES = 49152 - 256 - 2

_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
)


def load_tokenizer(
    path_or_repo: str | os.PathLike, subfolder: str | None = "tokenizer", **hub_kwargs
) -> Any:
    """Loads transformers' CLIP tokenizer from ``<path_or_repo>/<subfolder>``.

    The folder holds ``vocab.json`` + ``merges.txt`` (slow-tokenizer files) or ``tokenizer.json``
    (fast), plus ``tokenizer_config.json``; it is found through :mod:`jaxdiff.hub`, so a local
    folder in Hub layout or a Hub repo id (its cache, ``revision``, ``HF_HUB_OFFLINE``) both work.

    Args:
        path_or_repo: a pipeline folder/repo (``subfolder="tokenizer"``), or the tokenizer folder
            itself with ``subfolder=None``.
        subfolder: where the tokenizer files are; ``"tokenizer_2"`` for a second tokenizer.
        **hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``.

    Returns:
        ``transformers.CLIPTokenizer`` (``CLIPTokenizerFast`` when only ``tokenizer.json``
        exists and transformers has a separate fast class).

    Raises:
        hub.HubFileNotFoundError: the folder or its vocabulary files are missing.
    """
    unknown = set(hub_kwargs) - set(hub.HUB_KWARGS)
    if unknown:
        raise TypeError(f"load_tokenizer got unknown argument(s) {sorted(unknown)}")
    found = {
        name: hub.resolve_file(path_or_repo, name, subfolder, required=False, **hub_kwargs)
        for name in _TOKENIZER_FILES
    }
    has_slow = found["vocab.json"] is not None and found["merges.txt"] is not None
    has_fast = found["tokenizer.json"] is not None
    where = os.path.join(os.fspath(path_or_repo), subfolder or "")
    if not (has_slow or has_fast):
        try:
            present = hub.list_files(path_or_repo, subfolder, **hub_kwargs)
        except hub.HubFileNotFoundError:
            present = []
        raise hub.HubFileNotFoundError(
            f"No CLIP tokenizer in {where!r}: expected vocab.json + merges.txt or "
            f"tokenizer.json (with tokenizer_config.json); it holds {present}. For the openai "
            "CLIP vocabulary, write_clip_tokenizer(bpe_simple_vocab_16e6.txt.gz, folder) builds "
            "these files."
        )
    folder = os.path.dirname(next(p for p in found.values() if p is not None))

    import transformers

    cls = transformers.CLIPTokenizer
    if not has_slow and hasattr(transformers, "CLIPTokenizerFast"):
        cls = transformers.CLIPTokenizerFast
    return cls.from_pretrained(folder)


class CLIPTokenizer:
    """The ``tokenizer`` component of a pipeline folder (``["transformers", "CLIPTokenizer"]``
    in ``model_index.json``): ``CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")``
    or ``CLIPTokenizer.from_pretrained(tokenizer_folder)`` is :func:`load_tokenizer`, and
    returns transformers' tokenizer (as every component's ``from_pretrained``, the folder
    itself unless ``subfolder`` is given)."""

    @staticmethod
    def from_pretrained(
        path_or_repo: str | os.PathLike, subfolder: str | None = None, **hub_kwargs
    ) -> Any:
        return load_tokenizer(path_or_repo, subfolder=subfolder, **hub_kwargs)


def tokenize(
    tokenizer: Any, prompts: str | Sequence[str], max_length: int | None = None
) -> np.ndarray:
    """Prompts -> ``input_ids`` as Stable Diffusion pipelines make them.

    Each prompt becomes ``<|startoftext|> ... <|endoftext|>``, truncated and padded to
    ``max_length`` (``padding="max_length", truncation=True``, as in diffusers); SD tokenizers
    pad with ``<|endoftext|>``. A truncated prompt is reported with a warning naming the
    dropped text.

    Args:
        tokenizer: a transformers tokenizer, e.g. from :func:`load_tokenizer`.
        prompts: one prompt or a list of prompts.
        max_length: default ``tokenizer.model_max_length`` (77 for CLIP).

    Returns:
        int32 numpy array ``(len(prompts), max_length)``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings")
    if max_length is None:
        max_length = getattr(tokenizer, "model_max_length", None)
        if max_length is None or max_length > 100_000:  # transformers' "unset" sentinel
            raise ValueError(
                "the tokenizer has no model_max_length (its tokenizer_config.json lacks it): "
                f"pass max_length (CLIP: {MODEL_MAX_LENGTH})"
            )
    if int(max_length) < 2:
        raise ValueError(f"max_length must be at least 2 (BOS + EOS), got {max_length}")
    max_length = int(max_length)
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    )["input_ids"]
    full = tokenizer(prompts, padding="longest", return_tensors="np", verbose=False)["input_ids"]
    if full.shape[-1] > max_length:
        dropped = [
            tokenizer.decode(row[max_length - 1 :], skip_special_tokens=True)
            for row in full
            if (row != tokenizer.pad_token_id).sum() >= max_length
        ]
        warnings.warn(
            f"prompts were truncated to {max_length} tokens; dropped text: {dropped}",
            stacklevel=2,
        )
    return np.asarray(ids, dtype=np.int32)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (*Radford et al. (2019)*)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_vocab(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """openai CLIP's ``(vocab, merges)`` from ``bpe_simple_vocab_16e6.txt.gz``.

    The vocabulary is, in id order: the 256 byte characters, the same with ``</w>``, one entry
    per merge (the pair joined), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407):
    49,408 entries. ``merges`` are the file's lines 1..48894 (``"a b"`` strings).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not the CLIP merges file (too few or malformed lines).
    """
    bpe_path = os.fspath(bpe_path)
    if not os.path.isfile(bpe_path):
        raise FileNotFoundError(f"CLIP BPE merges file not found: {bpe_path!r}")
    opener = gzip.open if bpe_path.endswith(".gz") else open
    with opener(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    if len(merges) != _NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(
            f"{bpe_path} is not CLIP's BPE merges file: expected a header line and at least "
            f"{_NUM_MERGES} lines 'a b', got {len(lines)} lines"
        )
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{bpe_path}: duplicate vocabulary entries")
    return vocab, merges


def write_clip_tokenizer(bpe_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Writes the Hugging Face CLIPTokenizer files of openai/clip-vit-large-patch14 (the SD 1.x
    tokenizer) built from the BPE merges file: ``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json`` (``model_max_length`` 77) and ``special_tokens_map.json`` (pad
    ``<|endoftext|>``). Returns ``out_dir``; load it with :func:`load_tokenizer(out_dir,
    subfolder=None)`.
    """
    vocab, merges = build_clip_vocab(bpe_path)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    def dump(name: str, obj: Any) -> None:
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")

    dump("vocab.json", vocab)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    dump("special_tokens_map.json", special)
    dump(
        "tokenizer_config.json",
        {
            **special,
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": MODEL_MAX_LENGTH,
            "tokenizer_class": "CLIPTokenizer",
        },
    )
    return out_dir
