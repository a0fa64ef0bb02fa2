"""Tokenizer glue: the openai CLIP vocabulary built from its BPE file, loading, padding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.hub import HubFileNotFoundError
from jaxdiff.utils.tokenizer import build_clip_vocab, load_tokenizer, tokenize, write_clip_tokenizer

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # openai/clip-vit-large-patch14


def shared_data_dir() -> Path:
    """``$JAXDIFF_SHARED_DATA``, else ``<repo root>/../shared/data`` (never inside the repo)."""
    env = os.environ.get("JAXDIFF_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def bpe_path() -> Path:
    path = shared_data_dir() / BPE_NAME
    if not path.is_file():
        pytest.fail(
            f"the CLIP BPE merges file {path} is missing: set JAXDIFF_SHARED_DATA to the folder "
            f"holding {BPE_NAME} (openai CLIP, MIT; shipped in the open-clip-torch wheel)"
        )
    return path


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, bpe_path) -> Path:
    """A pipeline folder whose ``tokenizer/`` holds the files built from the BPE file."""
    root = tmp_path_factory.mktemp("sd")
    write_clip_tokenizer(bpe_path, root / "tokenizer")
    return root


def test_build_clip_vocab(bpe_path):
    vocab, merges = build_clip_vocab(bpe_path)
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert sorted(vocab.values()) == list(range(49408))
    assert merges[0] == "i n"  # the file's line 1 (line 0 is the "#version" header)


def test_written_files(pipeline_dir):
    folder = pipeline_dir / "tokenizer"
    assert {p.name for p in folder.iterdir()} == {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == "<|endoftext|>"
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\ni n\n")


def test_a_photo_of_a_cat(pipeline_dir):
    tok = load_tokenizer(pipeline_dir)  # subfolder="tokenizer" by default
    assert tok.model_max_length == 77
    assert tok("a photo of a cat")["input_ids"] == A_PHOTO_OF_A_CAT
    ids = tokenize(tok, "a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids[0, :7], A_PHOTO_OF_A_CAT)
    assert (ids[0, 7:] == 49407).all()  # padded with <|endoftext|>, as SD pipelines do
    # The tokenizer folder itself, and a batch: one row per prompt.
    tok2 = load_tokenizer(pipeline_dir / "tokenizer", subfolder=None)
    batch = tokenize(tok2, ["a photo of a cat", "A  Photo of a CAT"])
    np.testing.assert_array_equal(batch[0], batch[1])  # lower-cased, whitespace collapsed


def test_truncation(pipeline_dir):
    tok = load_tokenizer(pipeline_dir)
    with pytest.warns(UserWarning, match="truncated to 77 tokens"):
        ids = tokenize(tok, ["cat " * 100, "a photo of a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0, 1:-1] == 2368).all()
    with pytest.warns(UserWarning, match=r"dropped text: \['a cat'\]"):
        short = tokenize(tok, "a photo of a cat", max_length=5)
    np.testing.assert_array_equal(short[0], [49406, 320, 1125, 539, 49407])


def test_missing_tokenizer_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(HubFileNotFoundError, match="No CLIP tokenizer in .*tokenizer"):
        load_tokenizer(tmp_path)


def test_bad_inputs(pipeline_dir, tmp_path):
    tok = load_tokenizer(pipeline_dir)
    with pytest.raises(TypeError, match="prompts must be a string"):
        tokenize(tok, [1, 2])
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenize(tok, "cat", max_length=1)
    bad = tmp_path / "merges.txt"
    bad.write_text("#version\na b\n")
    with pytest.raises(ValueError, match="is not CLIP's BPE merges file"):
        build_clip_vocab(bad)
    with pytest.raises(FileNotFoundError, match="CLIP BPE merges file not found"):
        build_clip_vocab(tmp_path / "nope.txt.gz")
