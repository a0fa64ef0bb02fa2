"""Textual inversion on the tiny SD pipeline: images against diffusers' load_textual_inversion
(diffusers, Automatic1111 safetensors and .pt files, multi-vector tokens), unloading, errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.loaders.safetensors_io import load_file, save_file
from jaxdiff.utils.tokenizer import tokenize
from tests.pipelines.sd_helpers import diffusers_sd_pipe

# one pipeline and its compiled programs for the module
pytestmark = pytest.mark.xdist_group("textual_inversion")

PROMPT = "a photo of a <cat-toy> in <style> style"


@pytest.fixture()
def pipe(shared_pipe):
    yield shared_pipe
    shared_pipe.unload_textual_inversion()


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """A one-vector token in diffusers' layout (a folder) and a 3-vector Automatic1111 file."""
    root = tmp_path_factory.mktemp("ti")
    rng = np.random.default_rng(0)
    (root / "cat_toy").mkdir()
    save_file({"<cat-toy>": rng.standard_normal(16).astype(np.float32)}, root / "cat_toy" / "learned_embeds.safetensors")  # fmt: skip
    save_file({"emb_params": rng.standard_normal((3, 16)).astype(np.float32)}, root / "style.safetensors")  # fmt: skip
    return root


@pytest.mark.parity
def test_images_match_diffusers(sd_dir, pipe, embeddings, tmp_path):
    torch = pytest.importorskip("torch")
    ref = diffusers_sd_pipe(sd_dir)
    # the .pt layout Automatic1111 writes: {"string_to_param": {"*": (n, d)}, "name": ...}
    vectors = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    torch.save({"string_to_param": {"*": torch.from_numpy(vectors)}, "name": "<pt>"}, tmp_path / "e.pt")  # fmt: skip
    ref.load_textual_inversion(str(embeddings / "cat_toy"))
    ref.load_textual_inversion(str(embeddings / "style.safetensors"), token="<style>")
    ref.load_textual_inversion(str(tmp_path / "e.pt"))
    prompts = [PROMPT, "<pt> and <cat-toy>"]
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref(
            prompts,
            negative_prompt=["<style>", ""],
            num_inference_steps=3,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        ).images

    pipe.load_textual_inversion(embeddings / "cat_toy")
    pipe.load_textual_inversion(embeddings / "style.safetensors", token="<style>")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        pipe.load_textual_inversion(tmp_path / "e.pt")
    pipe.load_textual_inversion(tmp_path / "e.pt", allow_pickle=True)
    assert pipe.maybe_convert_prompt(prompts) == ref.maybe_convert_prompt(prompts, ref.tokenizer)
    assert len(pipe.tokenizer) == len(ref.tokenizer) == 49408 + 1 + 3 + 2
    ids = tokenize(pipe.tokenizer, pipe.maybe_convert_prompt(prompts))
    want_ids = ref.tokenizer(ref.maybe_convert_prompt(prompts, ref.tokenizer), padding="max_length", max_length=77).input_ids  # fmt: skip
    np.testing.assert_array_equal(ids, want_ids)
    got = pipe(prompts, negative_prompt=["<style>", ""], num_inference_steps=3, latents=latents,
               output_type="np", seed=0, progress=False).images  # fmt: skip
    assert np.abs(got - want).max() <= 2 / 255
    assert np.abs(np.round(got * 255) - np.round(want * 255)).mean() <= 1.0


def test_unload_restores_the_pipeline(pipe, embeddings):
    kw = dict(num_inference_steps=2, output_type="np", seed=0, progress=False)
    vocab, plain = len(pipe.tokenizer), pipe("a photo of a cat", **kw).images
    table = np.asarray(pipe.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])  # fmt: skip
    pipe.load_textual_inversion(embeddings / "cat_toy")
    pipe.load_textual_inversion(embeddings / "style.safetensors", token="<style>")
    pipe.unload_textual_inversion("<cat-toy>")
    assert pipe.maybe_convert_prompt("<style>") == "<style> <style>_1 <style>_2"
    assert "<cat-toy>" not in pipe.tokenizer.get_vocab() and len(pipe.tokenizer) == vocab + 3
    grown = np.asarray(pipe.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])  # fmt: skip
    style = load_file(embeddings / "style.safetensors")["emb_params"]
    np.testing.assert_array_equal(grown[:vocab], table)  # the original rows, then <style>'s
    np.testing.assert_array_equal(grown[vocab:], style)
    ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in ("<style>", "<style>_1", "<style>_2")]
    assert ids == [vocab, vocab + 1, vocab + 2]
    pipe.unload_textual_inversion()
    assert len(pipe.tokenizer) == vocab and pipe.text_encoder.config.vocab_size == vocab
    np.testing.assert_array_equal(pipe("a photo of a cat", **kw).images, plain)


def test_textual_inversion_errors(pipe, embeddings):
    with pytest.raises(ValueError, match="token 'cat' is already in the tokenizer"):
        pipe.load_textual_inversion({"cat": np.zeros(16, np.float32)})
    with pytest.raises(ValueError, match="has width 8, but the text encoder's token embedding is 16"):  # fmt: skip
        pipe.load_textual_inversion({"<w>": np.zeros(8, np.float32)})
    with pytest.raises(ValueError, match="bare array: pass token"):
        pipe.load_textual_inversion(np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="duplicates"):
        pipe.load_textual_inversion([embeddings / "cat_toy"] * 2, token=["<a>", "<a>"])
    with pytest.raises(FileNotFoundError, match="No textual inversion file"):
        pipe.load_textual_inversion(embeddings)
    assert len(pipe.tokenizer) == 49408  # nothing half-loaded
    pipe.load_textual_inversion(np.ones((2, 16), np.float32), token=["<x>", "<y>"])
    assert pipe.maybe_convert_prompt("<x> <y>") == "<x> <y>"  # one token per row
    with pytest.raises(ValueError, match=r"tokens \['<z>'\] are not loaded"):
        pipe.unload_textual_inversion("<z>")
