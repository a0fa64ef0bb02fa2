"""Convolution gradients in Eigen's layout (``jaxdiff.models.conv_grads``): the same values as
autodiff of ``lax.conv_general_dilated``, and only canonical convolutions inside a scan."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import conv_grads
from jaxdiff.models.layers import Conv2d
from jaxdiff.utils.xla import compiler_options

DN = ("NHWC", "HWIO", "NHWC")


def _lax(stride, padding):
    return lambda x, w: jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=DN)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((2, 9, 7, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
        ((2, 9, 7, 4), (3, 3, 4, 6), (2, 2), ((0, 1), (0, 1))),  # diffusers' padded downsample
        ((2, 9, 7, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),  # odd sizes, stride 2
        ((3, 5, 6, 2), (5, 5, 2, 3), (1, 1), ((2, 0), (1, 3))),  # asymmetric padding, 5x5
        ((2, 6, 6, 3), (3, 3, 3, 2), (1, 2), ((0, 0), (1, 1))),  # unequal strides, no padding
        ((1, 10, 11, 2), (4, 4, 2, 3), (3, 2), ((2, 1), (0, 3))),  # even kernel, stride 3
    ],
)
def test_forward_and_gradients_equal_autodiff_of_lax(shape, kernel, stride, padding):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    y_ref, vjp_ref = jax.vjp(_lax(stride, padding), x, w)
    y, vjp = jax.vjp(lambda x, w: conv_grads.conv2d(x, w, stride, padding), x, w)
    np.testing.assert_array_equal(y, y_ref)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    for got, want, name in zip(vjp(dy), vjp_ref(dy), ("dx", "dw")):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        # the same convolutions XLA runs for autodiff's: equal up to summation order
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_bf16_gradients_keep_the_dtype():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4), jnp.bfloat16)
    stride, padding = (2, 2), ((1, 1), (1, 1))
    dx, dw = jax.grad(lambda x, w: conv_grads.conv2d(x, w, stride, padding).sum(), (0, 1))(x, w)
    dx_ref, dw_ref = jax.grad(lambda x, w: _lax(stride, padding)(x, w).sum(), (0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(dx), np.float32(dx_ref), atol=0.1)
    np.testing.assert_allclose(np.float32(dw), np.float32(dw_ref), rtol=0.02, atol=0.1)


def _loop_dim_labels(module, x, params, canonical: bool) -> set[str]:
    """The dim_labels of the convolutions in an optimized loop of 2 gradient steps."""

    def loss(params):
        if canonical:
            with conv_grads.canonical_gradients():
                return jnp.sum(module.apply({"params": params}, x) ** 2)
        return jnp.sum(module.apply({"params": params}, x) ** 2)

    def steps(params):
        def body(i, p):
            return jax.tree.map(lambda a, g: a - 1e-3 * g, p, jax.grad(loss)(p))

        return jax.lax.fori_loop(0, 2, body, params)

    hlo = jax.jit(steps, compiler_options=compiler_options()).lower(params).compile().as_text()
    return set(re.findall(r"dim_labels=([^ ,]*)", hlo))


def test_inside_a_loop_every_convolution_stays_in_eigen_layout():
    """The reason for the module: XLA:CPU leaves autodiff's gradient convolutions inside a while
    loop in layouts Eigen does not run (naive loops, 30x slower); these are all canonical."""
    if jax.default_backend() != "cpu":
        pytest.skip("the layout rewrite in question is XLA:CPU's")
    module = Conv2d(8, kernel_size=3, stride=2, padding=1)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 8))
    variables = module.init(jax.random.key(1), x)
    params = variables["params"]
    assert _loop_dim_labels(module, x, params, canonical=True) == {"b01f_01io->b01f"}
    # what the module works around (jaxlib 0.10.2)
    assert "f01b_i01o->01bf" in _loop_dim_labels(module, x, params, canonical=False)


def test_conv2d_uses_it_only_inside_the_context():
    module = Conv2d(4)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = module.init(jax.random.key(1), x)
    plain = jax.make_jaxpr(lambda v: module.apply(v, x))(variables)
    with conv_grads.canonical_gradients():
        assert conv_grads.active() == (jax.default_backend() == "cpu")
        inside = jax.make_jaxpr(lambda v: module.apply(v, x))(variables)
    assert not conv_grads.active()
    assert "custom_vjp_call" not in str(plain)
    if jax.default_backend() == "cpu":
        assert "custom_vjp_call" in str(inside)
    # forward-mode autodiff still works outside the context
    jax.jvp(lambda v: module.apply(v, x), (variables,), (variables,))
