"""``jaxdiff.utils.compiler_options``: on the CPU, convolutions leave YNNPACK for Eigen while dots
and reductions stay with YNNPACK; the user's own XLA_FLAGS win; jaxdiff's programs use them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.utils import xla
from jaxdiff.utils.xla import compiler_options

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")

YNN = "__ynn_fusion"  # the fusion kind XLA:CPU gives the ops it hands to YNNPACK


@pytest.fixture(autouse=True)
def _default_precision():
    """conftest asks for "highest" matmul precision, which XLA:CPU never hands to YNNPACK; users
    get the default precision, whose ops YNNPACK takes."""
    with jax.default_matmul_precision("default"):
        yield


def _conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip


def _hlo(fn, *args, options=None) -> str:
    return jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()


def _ynn_convolutions(hlo: str) -> int:
    """Convolutions inside the computations that YNNPACK fusions call, in optimized HLO text."""
    bodies = {}
    for block in hlo.split("\n\n"):
        header = block.lstrip().split("\n", 1)[0]
        bodies[header.split(" ", 1)[0].lstrip("%")] = block
    callees = [
        m.group(1)
        for line in hlo.splitlines()
        if YNN in line and (m := re.search(r"calls=%?([\w.\-]+)", line))
    ]
    return sum(bodies.get(c, "").count("convolution(") for c in callees)


def _conv_args():
    return jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))  # YNNPACK takes >= 32 channels


def test_options_move_convolutions_off_ynnpack_only():
    options = compiler_options()
    assert options == {xla.YNN_FUSION_TYPE: xla.YNN_WITHOUT_CONVOLUTION}
    conv_args = _conv_args()
    # XLA's defaults give the convolution to YNNPACK; with the options it is a plain conv.
    assert _ynn_convolutions(_hlo(_conv, *conv_args)) == 1
    assert _ynn_convolutions(_hlo(_conv, *conv_args, options=options)) == 0
    # Dots and reductions keep YNNPACK: the options drop only the convolution from the list.
    a = jnp.ones((256, 256))
    for fn in (jnp.matmul, lambda a, b: jnp.sum(a * b, axis=0)):
        assert (YNN in _hlo(fn, a, a)) and (YNN in _hlo(fn, a, a, options=options))


def test_same_convolution_result():
    rng = np.random.default_rng(0)
    x, k = (jnp.asarray(rng.standard_normal(a.shape, np.float32)) for a in _conv_args())
    assert _ynn_convolutions(_hlo(_conv, x, k)) == 1  # the default really is the other kernel
    ours = jax.jit(_conv, compiler_options=compiler_options())(x, k)
    default = jax.jit(_conv)(x, k)
    # Two fp32 summation orders of 288 products of unit normals (sums of size ~17): ~1e-6.
    np.testing.assert_allclose(np.asarray(ours), np.asarray(default), rtol=1e-5, atol=1e-4)


def test_exported_at_top_level():
    import jaxdiff

    assert jaxdiff.compiler_options is compiler_options


def test_users_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{xla.YNN_FUSION_TYPE}=individual_dot")
    assert compiler_options() == {}


def test_jaxdiff_programs_compile_with_them():
    from jaxdiff.models.unet_2d import UNet2DModel
    from jaxdiff.pipelines import DDPMPipeline
    from jaxdiff.schedulers import DDPMScheduler
    from jaxdiff.training.train_state import TrainState, make_optimizer, make_train_step

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(32, 32),  # convs XLA would give YNNPACK
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    params = unet.init_weights(jax.random.key(0))
    scheduler = DDPMScheduler(num_train_timesteps=10)
    opt = make_optimizer(1e-3, 0, 10)
    step = make_train_step(unet, scheduler, opt, ema_decay=0.9)
    state = TrainState.create(params, opt)
    x0 = np.zeros((2, 8, 8, 3), np.uint8)
    train_hlo = step.jitted.lower(state, x0, jax.random.key(1)).compile().as_text()
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler, params={"unet": params})
    pipe(batch_size=1, num_inference_steps=2, seed=0, output_type="np", progress=False)
    (sample_fn,) = pipe._jit_cache.values()
    shape = (jax.local_device_count(), 8, 8, 3)
    keys = jax.random.split(jax.random.key(0), shape[0])
    state = scheduler.set_timesteps(2, shape=shape)
    sample_hlo = sample_fn.lower(params, keys, state, {}, None, shape=shape).compile().as_text()
    # The pmap path: compiled once per signature with the same options.
    pipe(batch_size=1, num_inference_steps=2, seed=0, output_type="np", progress=False, use_pmap=True)  # fmt: skip
    pipe(batch_size=1, num_inference_steps=2, seed=0, output_type="np", progress=False, use_pmap=True)  # fmt: skip
    (pmap_program,) = (v for k, v in pipe._jit_cache.items() if k[0][0] == "pmap_denoise")
    assert len(pipe._jit_cache) == 2
    for hlo in (train_hlo, sample_hlo, pmap_program.as_text()):
        assert "convolution(" in hlo and _ynn_convolutions(hlo) == 0
