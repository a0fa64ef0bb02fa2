"""``layers.dot_product_attention``: the CPU path (heads-first, deferred normalisation,
automatic query chunking) against a float64 numpy softmax and ``jax.nn.dot_product_attention``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import layers
from jaxdiff.models.layers import dot_product_attention


def numpy_attention(q, k, v, mask=None, scale=None):
    """softmax(s Q K^T) V in float64, (B, T, N, H) layout."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def qkv(shape_q, shape_kv, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, shape_q),
        jax.random.normal(kk, shape_kv),
        jax.random.normal(kv, shape_kv),
    )


@pytest.mark.parametrize("chunk", [None, 16, 7, 1000])
def test_matches_float64_softmax(chunk):
    q, k, v = qkv((2, 70, 3, 8), (2, 45, 3, 8))
    got = jax.jit(functools.partial(dot_product_attention, chunk_size=chunk))(q, k, v)
    np.testing.assert_allclose(got, numpy_attention(q, k, v), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(
        got, jax.nn.dot_product_attention(q, k, v, implementation="xla"), atol=2e-6
    )


def test_key_mask_and_scale():
    q, k, v = qkv((2, 40, 2, 8), (2, 12, 2, 8), seed=1)
    mask = np.ones((2, 1, 1, 12), bool)
    mask[0, ..., 5:] = False  # padding keys of the first sequence
    for chunk in (None, 8):
        got = dot_product_attention(q, k, v, mask=jnp.asarray(mask), scale=0.3, chunk_size=chunk)
        np.testing.assert_allclose(got, numpy_attention(q, k, v, mask, 0.3), atol=2e-6)


@pytest.mark.parametrize("chunk", [None, 4, 9])
def test_per_query_causal_mask(chunk):
    q, k, v = qkv((2, 9, 2, 4), (2, 9, 2, 4), seed=2)
    causal = np.tril(np.ones((9, 9), bool))[None, None]  # (1, 1, T, S), as CLIP's
    got = dot_product_attention(q, k, v, mask=jnp.asarray(causal), chunk_size=chunk)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, causal), atol=2e-6)


@pytest.mark.parametrize("chunk", [8, 13])
def test_xla_implementation_in_query_chunks(chunk):
    """The GPU-side path (``jax.nn.dot_product_attention``), which runs off the GPU with an
    explicit ``implementation``: query chunks, a remainder, and a key mask."""
    q, k, v = qkv((2, 30, 2, 8), (2, 11, 2, 8), seed=3)
    mask = np.ones((2, 1, 1, 11), bool)
    mask[1, ..., 7:] = False
    got = dot_product_attention(
        q, k, v, mask=jnp.asarray(mask), chunk_size=chunk, implementation="xla"
    )
    np.testing.assert_allclose(got, numpy_attention(q, k, v, mask), atol=2e-6)


def test_gradients_match_jax_reference():
    q, k, v = qkv((1, 33, 2, 8), (1, 33, 2, 8), seed=3)

    def loss(fn, q, k, v):
        return (fn(q, k, v) ** 2).sum()

    mine = jax.grad(functools.partial(loss, functools.partial(dot_product_attention, chunk_size=8)), (0, 1, 2))(q, k, v)  # fmt: skip
    ref = jax.grad(functools.partial(loss, functools.partial(jax.nn.dot_product_attention, implementation="xla")), (0, 1, 2))(q, k, v)  # fmt: skip
    for a, b in zip(mine, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_bfloat16_inputs_keep_their_dtype():
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv((1, 20, 2, 16), (1, 20, 2, 16), seed=4))
    got = dot_product_attention(q, k, v)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), numpy_attention(q, k, v), atol=3e-2)


def test_auto_chunk_bounds_the_logits_block(monkeypatch):
    # SD 1.5 at 64x64 latents: batch 2, 8 heads, 4096 x 4096: 1 GiB of logits in all,
    # 16 KiB per query and head.
    q = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.float32)
    assert layers.ATTENTION_BLOCK_BYTES == 8 * 2**20
    assert layers._auto_chunk(q, q) == 512  # 512 * 16 KiB = 8 MiB per block
    small = jax.ShapeDtypeStruct((2, 77, 8, 40), jnp.float32)
    assert layers._auto_chunk(small, small) is None  # all logits below the block: one pass
    monkeypatch.setattr(layers, "ATTENTION_BLOCK_BYTES", 1)
    assert layers._auto_chunk(q, q) == 16  # never below 16 queries


def test_auto_chunking_runs_under_lax_map(monkeypatch):
    monkeypatch.setattr(layers, "ATTENTION_BLOCK_BYTES", 4 * 45 * 16)  # 16 queries of one head
    q, k, v = qkv((2, 70, 3, 8), (2, 45, 3, 8), seed=5)
    assert "scan" in str(jax.make_jaxpr(dot_product_attention)(q, k, v))  # lax.map
    np.testing.assert_allclose(dot_product_attention(q, k, v), numpy_attention(q, k, v), atol=2e-6)


@pytest.mark.parametrize("bad", [0, -4, 2.5])
def test_bad_chunk_size(bad):
    q, k, v = qkv((1, 8, 1, 4), (1, 8, 1, 4))
    with pytest.raises(ValueError, match="attention_chunk_size must be a positive int"):
        dot_product_attention(q, k, v, chunk_size=bad)
