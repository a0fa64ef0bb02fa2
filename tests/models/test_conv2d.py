"""Conv2d picks a matmul for 1x1 kernels and tiny outputs; every path must equal the conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.layers import IM2COL_MAX_PIXELS, Conv2d


def reference_conv(x, kernel, bias, stride, padding):
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )
    return y + bias


@pytest.mark.parametrize(
    "size, kernel_size, stride, padding",
    [
        (1, 3, 1, 1),  # one pixel: only the centre tap sees data
        (2, 3, 1, 1),
        (4, 3, 1, 1),  # 16 output pixels: the largest im2col case
        (5, 3, 1, 1),  # 25 output pixels: lax.conv
        (4, 3, 2, 1),  # stride-2 downsample to 2x2
        (5, 3, 2, 0),  # diffusers' padding=0 downsample (input pre-padded by the caller)
        (8, 1, 1, 0),  # 1x1 kernel: a plain matmul
        (3, 5, 1, 2),
    ],
)
def test_every_path_equals_lax_conv(size, kernel_size, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
    module = Conv2d(7, kernel_size, stride, padding)
    params = module.init(jax.random.key(1), x)["params"]
    params["bias"] = jax.random.normal(jax.random.key(2), (7,))
    got = module.apply({"params": params}, x)
    want = reference_conv(x, params["kernel"], params["bias"], stride, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_im2col_threshold_is_a_small_image():
    # The matmul path trades memory (k*k copies of the input) for speed; keep it to tiny maps.
    assert 4 <= IM2COL_MAX_PIXELS <= 64


def test_bf16_compute_keeps_fp32_params():
    x = jnp.ones((1, 2, 2, 4))
    module = Conv2d(3, dtype=jnp.bfloat16)
    params = module.init(jax.random.key(0), x)["params"]
    assert params["kernel"].dtype == jnp.float32
    assert module.apply({"params": params}, x).dtype == jnp.bfloat16
