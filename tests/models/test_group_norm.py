"""jaxdiff's GroupNorm (per-channel sums first) must equal flax's and PyTorch's, values and
gradients, in reverse and forward mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.group_norm import GroupNorm

SHAPES = [
    ((2, 8, 8, 64), 32),  # NHWC, 2 channels per group
    ((3, 5, 7, 12), 4),  # odd sizes
    ((2, 16, 96), 32),  # (N, L, C): the attention blocks' norm
    ((1, 4, 4, 4, 32), 1),  # rank 5, one group (layer norm over everything)
]


def _inputs(shape):
    c = shape[-1]
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], shape) * 3.0 + 1.5  # a mean and scale far from 0 and 1
    scale = 1.0 + 0.5 * jax.random.normal(keys[1], (c,))
    bias = jax.random.normal(keys[2], (c,))
    weights = jax.random.normal(keys[3], shape)
    return x, scale, bias, weights


def _loss(norm_fn, x, scale, bias, weights):
    # A downstream SiLU and a weighted sum, as in the ResNet blocks, so no gradient is trivial.
    return jnp.sum(jax.nn.silu(norm_fn(x, scale, bias)) * weights)


@pytest.mark.parametrize("shape, groups", SHAPES)
def test_forward_and_gradients_equal_flax_autodiff(shape, groups):
    x, scale, bias, weights = _inputs(shape)
    ours = GroupNorm(groups, 1e-5)
    flax_gn = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)

    def ours_fn(x, s, b):
        return ours.apply({"params": {"scale": s, "bias": b}}, x)

    def flax_fn(x, s, b):
        return flax_gn.apply({"params": {"scale": s, "bias": b}}, x)

    np.testing.assert_allclose(
        ours_fn(x, scale, bias), flax_fn(x, scale, bias), rtol=1e-5, atol=1e-5
    )
    got = jax.grad(_loss, argnums=(1, 2, 3))(ours_fn, x, scale, bias, weights)
    want = jax.grad(_loss, argnums=(1, 2, 3))(flax_fn, x, scale, bias, weights)
    for name, g, w in zip(("x", "scale", "bias"), got, want, strict=True):
        rel = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
        assert rel < 1e-5, (name, rel)


def test_forward_mode_equals_flax():
    # Researchers take JVPs through the UNet (e.g. divergence estimates, consistency training).
    x, scale, bias, weights = _inputs((2, 6, 6, 16))
    tangents = jax.random.normal(jax.random.key(5), x.shape), jnp.ones(16), jnp.ones(16)
    flax_gn = nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False)

    def ours_fn(x, s, b):
        return GroupNorm(4, 1e-5).apply({"params": {"scale": s, "bias": b}}, x)

    def flax_fn(x, s, b):
        return flax_gn.apply({"params": {"scale": s, "bias": b}}, x)

    _, got = jax.jvp(ours_fn, (x, scale, bias), tangents)
    _, want = jax.jvp(flax_fn, (x, scale, bias), tangents)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_init_and_jit_and_error():
    x = jnp.ones((2, 4, 4, 8))
    params = GroupNorm(4).init(jax.random.key(0), x)["params"]
    assert params["scale"].shape == (8,) and params["bias"].shape == (8,)
    assert params["scale"].dtype == jnp.float32
    # A constant input normalizes to zero, then the bias.
    y = jax.jit(GroupNorm(4).apply)({"params": params}, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    with pytest.raises(ValueError, match=r"C divisible by 3, got shape \(2, 4, 4, 8\)"):
        GroupNorm(3).init(jax.random.key(0), x)


@pytest.mark.parity
@pytest.mark.parametrize("shape, groups", SHAPES[:3])
def test_gradients_equal_pytorch(shape, groups):
    torch = pytest.importorskip("torch")
    x, scale, bias, weights = _inputs(shape)

    def ours_fn(x, s, b):
        return GroupNorm(groups, 1e-6).apply({"params": {"scale": s, "bias": b}}, x)

    loss, got = jax.value_and_grad(_loss, argnums=(1, 2, 3))(ours_fn, x, scale, bias, weights)

    def t(a):
        return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)

    # PyTorch is channels-first: move C to axis 1.
    perm = (0, len(shape) - 1, *range(1, len(shape) - 1))
    tx, ts, tb = t(np.transpose(np.asarray(x), perm)), t(scale), t(bias)
    tw = torch.tensor(np.transpose(np.asarray(weights), perm), dtype=torch.float64)
    y = torch.nn.functional.group_norm(tx, groups, ts, tb, eps=1e-6)
    ref_loss = (torch.nn.functional.silu(y) * tw).sum()
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    inverse = np.argsort(perm)
    want = (np.transpose(tx.grad.numpy(), inverse), ts.grad.numpy(), tb.grad.numpy())
    for name, g, w in zip(("x", "scale", "bias"), got, want, strict=True):
        rel = np.linalg.norm(np.asarray(g, np.float64) - w) / np.linalg.norm(w)
        assert rel < 1e-5, (name, rel)
