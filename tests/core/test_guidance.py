"""Classifier-free guidance and its rescaling (``sampling.classifier_free_guidance``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sampling

RNG = np.random.default_rng(0)
# Per image, the unconditional and conditional predictions differ in scale, so the rescaling
# changes the result a lot (unlike on the tiny random SD UNet of the pipeline tests).
UNCOND = RNG.standard_normal((3, 6, 5, 4)).astype(np.float32) * np.float32([[[[0.5]]], [[[1.0]]], [[[2.0]]]])  # fmt: skip
COND = (RNG.standard_normal((3, 6, 5, 4)) + 0.3).astype(np.float32)


def _model_fn(x, t):
    """The doubled batch [x, x] against [uncond, cond]: returns the two fixed predictions."""
    assert x.shape[0] == 2 * COND.shape[0]
    return jnp.concatenate([jnp.asarray(UNCOND), jnp.asarray(COND)]) + 0 * x


def _guided(scale, rescale=None):
    x = jnp.zeros(COND.shape)
    return np.asarray(sampling.classifier_free_guidance(_model_fn, scale, rescale)(x, 0))


def test_plain_guidance_formula():
    np.testing.assert_allclose(_guided(7.5), UNCOND + 7.5 * (COND - UNCOND), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_guided(1.0), COND, atol=1e-6)
    np.testing.assert_allclose(_guided(0.0), UNCOND, atol=1e-6)


def test_rescale_by_hand():
    """Lin et al. (2024), Sec. 3.4, with Bessel-corrected per-image standard deviations."""
    cfg = UNCOND + 7.5 * (COND - UNCOND)

    def std(a):
        return a.reshape(len(a), -1).std(axis=1, ddof=1)[:, None, None, None]

    expected = 0.7 * cfg * std(COND) / std(cfg) + 0.3 * cfg
    np.testing.assert_allclose(_guided(7.5, 0.7), expected, rtol=1e-5, atol=1e-5)
    # phi = 1: each image has exactly the conditional prediction's standard deviation
    full = _guided(7.5, 1.0)
    np.testing.assert_allclose(std(full), std(COND), rtol=1e-5)
    # phi = 0 is plain guidance, bit for bit
    np.testing.assert_array_equal(_guided(7.5, jnp.float32(0.0)), _guided(7.5))


def test_rescale_matches_diffusers():
    torch = pytest.importorskip("torch")
    sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    for scale, rescale in ((7.5, 0.7), (3.0, 1.0), (12.0, 0.3)):
        cfg = UNCOND + scale * (COND - UNCOND)
        cfg_t, cond_t = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (cfg, COND))
        expected = sd.rescale_noise_cfg(cfg_t, cond_t, guidance_rescale=rescale)
        expected = expected.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(_guided(scale, rescale), expected, rtol=1e-5, atol=1e-5)


def test_traced_scale_and_rescale_trace_once():
    traces = []

    @jax.jit
    def run(x, scale, rescale):
        traces.append(1)
        return sampling.classifier_free_guidance(_model_fn, scale, rescale)(x, 0)

    x = jnp.zeros(COND.shape)
    a = run(x, jnp.float32(7.5), jnp.float32(0.0))
    b = run(x, jnp.float32(7.5), jnp.float32(0.7))
    c = run(x, jnp.float32(3.0), jnp.float32(0.7))
    assert len(traces) == 1
    assert np.abs(np.asarray(a - b)).max() > 0.1
    assert np.abs(np.asarray(b - c)).max() > 0.1
