"""oneDNN convolutions (opt-in custom calls) must equal XLA's convolution, forward and backward.

The parity tests need oneDNN's headers and library (``apt install libdnnl-dev``; ``.ci/run``
installs them) and g++; without them they skip and say why. The error tests run everywhere.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import UNet2DModel
from jaxdiff.models import onednn_conv
from jaxdiff.models.layers import Conv2d

DN = ("NHWC", "HWIO", "NHWC")

try:
    onednn_conv.find_onednn()
    MISSING = None
except RuntimeError as error:
    MISSING = str(error)
needs_onednn = pytest.mark.skipif(MISSING is not None, reason=f"no oneDNN: {MISSING}")


@pytest.fixture
def onednn():
    """oneDNN convolutions on for one test, and off again after it."""
    onednn_conv.use_onednn_convolutions(True)
    yield
    onednn_conv.use_onednn_convolutions(False)


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@needs_onednn
@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((2, 9, 7, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
        ((2, 9, 7, 4), (3, 3, 4, 6), (2, 2), ((0, 1), (0, 1))),  # diffusers' padded downsample
        ((1, 8, 8, 4), (3, 3, 4, 4), (2, 2), ((1, 1), (1, 1))),
        ((3, 5, 6, 2), (5, 5, 2, 3), (1, 1), ((2, 0), (1, 3))),  # asymmetric padding, 5x5
        ((2, 6, 6, 3), (3, 3, 3, 2), (1, 2), ((0, 0), (1, 1))),  # unequal strides, no padding
    ],
)
def test_forward_and_both_gradients_equal_lax(shape, kernel, stride, padding):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)

    def want(x, w):
        return jax.lax.conv_general_dilated(
            x, w, stride, padding, dimension_numbers=DN, precision="highest"
        )

    def got(x, w):
        return onednn_conv.conv2d(x, w, stride, padding)

    y = jax.jit(got)(x, w)
    y_ref = want(x, w)
    assert y.shape == y_ref.shape
    assert rel(y, y_ref) < 1e-6
    dy = jax.random.normal(jax.random.key(2), y.shape)
    dx, dw = jax.jit(lambda x, w, dy: jax.vjp(got, x, w)[1](dy))(x, w, dy)
    dx_ref, dw_ref = jax.vjp(want, x, w)[1](dy)
    assert rel(dx, dx_ref) < 1e-6
    assert rel(dw, dw_ref) < 1e-6


@needs_onednn
def test_vmap_runs_one_call_per_element():
    x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    pad = ((1, 1), (1, 1))
    y = jax.vmap(lambda x: onednn_conv.conv2d(x, w, (1, 1), pad))(x)
    for i in range(3):
        want = jax.lax.conv_general_dilated(x[i], w, (1, 1), pad, dimension_numbers=DN)
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_conv2d_calls_onednn_only_when_switched_on(onednn):
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 6))  # 1,024 output pixels
    module = Conv2d(7)
    params = module.init(jax.random.key(1), x)["params"]
    on = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x).as_text()
    assert "jaxdiff_onednn_conv_fwd" in on
    y_on = module.apply({"params": params}, x)
    onednn_conv.use_onednn_convolutions(False)
    off = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x).as_text()
    assert "jaxdiff_onednn_conv" not in off
    np.testing.assert_allclose(
        np.asarray(y_on), np.asarray(module.apply({"params": params}, x)), rtol=1e-5, atol=1e-5
    )


@needs_onednn
def test_conv2d_keeps_xla_for_bf16_1x1_and_small_outputs(onednn):
    def lowered(module, x):
        params = module.init(jax.random.key(1), x)["params"]
        return jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x).as_text()

    big = jnp.ones((4, 16, 16, 4))
    assert "onednn" in lowered(Conv2d(4), big)
    assert "onednn" in lowered(Conv2d(4, stride=2), jnp.ones((4, 32, 32, 4)))
    assert "onednn" not in lowered(Conv2d(4, dtype=jnp.bfloat16), big)
    assert "onednn" not in lowered(Conv2d(4, 1, padding=0), big)
    assert "onednn" not in lowered(Conv2d(4), jnp.ones((3, 16, 16, 4)))  # 768 < 1,024 pixels
    assert "onednn" not in lowered(Conv2d(4), jnp.ones((64, 4, 4, 4)))  # 16 a map: im2col


def test_more_than_one_device_keeps_xla(monkeypatch):
    monkeypatch.setattr(onednn_conv, "_enabled", True)
    monkeypatch.setattr(onednn_conv.jax, "device_count", lambda: 8)
    assert not onednn_conv.enabled()
    monkeypatch.setattr(onednn_conv.jax, "device_count", lambda: 1)
    assert onednn_conv.enabled() == (jax.default_backend() == "cpu")


@needs_onednn
def test_unet_forward_and_gradient_match_xla(onednn):
    model = UNet2DModel(
        sample_size=32,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    params = model.init_weights(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    t = jnp.array([10, 500])

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t).sample ** 2)

    assert "jaxdiff_onednn_conv_bwd_weights" in jax.jit(jax.grad(loss)).lower(params).as_text()
    # Each mode traces its own function: jit caches by function, not by the switch.
    y_on, g_on = jax.jit(lambda p: jax.value_and_grad(loss)(p))(params)
    onednn_conv.use_onednn_convolutions(False)
    y_off, g_off = jax.jit(lambda p: jax.value_and_grad(loss)(p))(params)
    np.testing.assert_allclose(float(y_on), float(y_off), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@needs_onednn
def test_environment_variable_switches_it_on():
    code = "from jaxdiff.models import onednn_conv; print(onednn_conv.enabled())"
    env = {**os.environ, onednn_conv.ENV_SWITCH: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


@needs_onednn
def test_build_caches_one_library_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = onednn_conv.build()
    assert path.parent == tmp_path / "jaxdiff" / "onednn" and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert onednn_conv.build() == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    assert onednn_conv.onednn_version().count(".") == 2


def test_missing_onednn_names_what_to_install(tmp_path):
    with pytest.raises(RuntimeError, match=r"libdnnl-dev.*DNNL_ROOT") as error:
        onednn_conv.find_onednn([tmp_path])
    assert str(tmp_path) in str(error.value)


@needs_onednn
@pytest.mark.parametrize(
    "cxx, message",
    [
        ("no-such-compiler-xyz", "the C\\+\\+ compiler 'no-such-compiler-xyz' was not found"),
        ("false", "compiling the oneDNN custom calls failed"),  # shows the command and stderr
    ],
)
def test_build_errors_name_the_compiler_and_leave_no_library(tmp_path, monkeypatch, cxx, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(RuntimeError, match=message):
        onednn_conv.build()
    assert not list((tmp_path / "jaxdiff" / "onednn").glob("*.so"))


@needs_onednn
def test_benchmarks_name_the_switch_and_count_flops_inside_the_custom_call(onednn):
    from benchmarks.common import device_name, library_versions, xla_flops

    assert device_name().endswith("-onednn")
    assert library_versions()["convolutions"].startswith("oneDNN ")
    x = jnp.ones((4, 16, 16, 8))
    module = Conv2d(6, use_bias=False)
    params = module.init(jax.random.key(0), x)["params"]

    def fn(p, x):
        return module.apply({"params": p}, x)

    compiled = jax.jit(fn).lower(params, x).compile()
    assert "jaxdiff_onednn_conv_fwd" in compiled.as_text()
    # XLA counts the multiply-adds over real input only: per image (3 * 16 - 2)^2 of the
    # 16 * 16 * 9 kernel taps land inside the 16 x 16 map.
    assert xla_flops(compiled, fn, (params, x)) == 2 * 4 * 46 * 46 * 8 * 6
    assert onednn_conv.enabled()  # the count switched it off only while lowering
