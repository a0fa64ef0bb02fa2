"""AutoencoderKL against diffusers: golden parity, tiling, slicing, sampling, loading, errors."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.loaders.safetensors_io import load_file
from jaxdiff.loaders.state_dict import WeightLoadError
from jaxdiff.models.autoencoder_kl import (
    AutoencoderKL,
    AutoencoderKLOutput,
    DecoderOutput,
    DiagonalGaussianDistribution,
    blend_h,
    blend_v,
)
from tests.reference_io import load_case, reference_dir, relative_l2, requires_reference

COMPONENT = "autoencoder_kl"
CASES = ["base", "no_quant_conv", "legacy_attention"]
# fp32 on both sides; the differences are summation order in convs, group norms and the
# attention softmax (measured ~1e-6). 1e-4 leaves margin for other BLAS/XLA builds.
TOL = 1e-4


@functools.cache
def _load(name: str, **kwargs):
    """(module, params) of a golden case, loaded once per test session (tests never mutate them)."""
    return AutoencoderKL.from_pretrained(reference_dir(COMPONENT) / name, **kwargs)


@pytest.fixture(scope="module")
def base():
    return _load("base")


@functools.cache
def _jitted(model: AutoencoderKL, method: str, **kw):
    """One jitted ``model.apply(..., method=method)`` per (module, method, options): tests that
    share a model and input shape share one compilation."""
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=method, **kw))


def _encode(model, params, x, **kw) -> DiagonalGaussianDistribution:
    out = _jitted(model, "encode", **kw)(params, jnp.asarray(x))
    assert isinstance(out, AutoencoderKLOutput)
    return out.latent_dist


def _decode(model, params, z, **kw) -> jax.Array:
    out = _jitted(model, "decode", **kw)(params, jnp.asarray(z))
    assert isinstance(out, DecoderOutput)
    return out.sample


# --------------------------------------------------------------------------------------------
# Golden parity


@pytest.mark.parametrize("name", CASES)
def test_golden_parity(name):
    arrays, meta = load_case(COMPONENT, name)
    model, params = _load(name)
    post = _encode(model, params, arrays["x"])
    assert isinstance(post, DiagonalGaussianDistribution)
    assert relative_l2(post.mean, arrays["mean"]) < TOL
    assert relative_l2(post.logvar, arrays["logvar"]) < TOL
    decoded = _decode(model, params, arrays["z"])
    assert decoded.shape == arrays["decoded"].shape
    assert relative_l2(decoded, arrays["decoded"]) < TOL


def test_golden_tiled_encode_and_decode_match_diffusers_enable_tiling(base):
    arrays, meta = load_case(COMPONENT, "base")
    model, params = base
    assert model.tile_sample_min_size == meta["tiling"]["tile_sample_min_size"]
    assert model.tile_latent_min_size == meta["tiling"]["tile_latent_min_size"]
    tiled = model.clone(use_tiling=True)
    post = _encode(tiled, params, arrays["x_tile"])
    assert relative_l2(post.mean, arrays["tiled_mean"]) < TOL
    assert relative_l2(post.logvar, arrays["tiled_logvar"]) < TOL
    decoded = _decode(tiled, params, arrays["z_tile"])
    assert decoded.shape == arrays["tiled_decoded"].shape == (2, 40, 24, 3)
    assert relative_l2(decoded, arrays["tiled_decoded"]) < TOL
    # (the generator checks that diffusers' tiled decode differs from its untiled one)


def test_blend_matches_diffusers_loop():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, 6, 5, 2)).astype(np.float32)
    b = rng.standard_normal((1, 4, 5, 2)).astype(np.float32)
    e = 3
    want = b.copy()
    for y in range(e):  # diffusers' blend_v, on the H axis of NHWC
        want[:, y] = a[:, -e + y] * (1 - y / e) + b[:, y] * (y / e)
    np.testing.assert_allclose(blend_v(a, b, e), want, rtol=1e-6, atol=1e-6)
    a4, want = a[:, :4], b.copy()
    for x in range(e):  # diffusers' blend_h, on the W axis
        want[:, :, x] = a4[:, :, -e + x] * (1 - x / e) + b[:, :, x] * (x / e)
    np.testing.assert_allclose(blend_h(a4, b, e), want, rtol=1e-6, atol=1e-6)
    # the extent is clipped to the smaller tile, as in diffusers
    np.testing.assert_allclose(blend_v(a[:, :2], b, 5)[:, 2:], b[:, 2:])


def test_scaling_factor_is_config_only(base):
    model, _ = base
    assert model.scaling_factor == pytest.approx(0.18215)
    assert model.config.scaling_factor == pytest.approx(0.18215)
    other = _load("no_quant_conv")[0]
    assert other.scaling_factor == pytest.approx(0.13025)
    # no hidden scaling: test_golden_parity decodes z exactly as diffusers' decode(z) does


# --------------------------------------------------------------------------------------------
# Posterior


def test_sample_is_mean_plus_std_times_the_keys_eps(base):
    model, params = base
    arrays, _ = load_case(COMPONENT, "base")
    post = _encode(model, params, arrays["x"])
    key = jax.random.key(3)
    eps = jax.random.normal(key, post.mean.shape, post.mean.dtype)
    np.testing.assert_array_equal(post.sample(key), post.mean + jnp.exp(0.5 * post.logvar) * eps)
    np.testing.assert_array_equal(post.std, jnp.exp(0.5 * post.logvar))
    np.testing.assert_array_equal(post.var, jnp.exp(post.logvar))
    np.testing.assert_array_equal(post.mode(), post.mean)
    assert not np.allclose(post.sample(jax.random.key(4)), post.sample(key))
    with pytest.raises(ValueError, match="PRNG key"):
        post.sample(None)
    with pytest.raises(TypeError, match=r"key must be a PRNG key, e.g. jax.random.key\(seed\)"):
        post.sample(3)
    # the model call with sample_posterior decodes that very sample
    call = jax.jit(lambda p, x, k: model.apply({"params": p}, x, sample_posterior=True, key=k))
    out = call(params, arrays["x"], key)
    assert isinstance(out, DecoderOutput)
    np.testing.assert_allclose(
        out.sample, _decode(model, params, post.sample(key)), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="needs key="):
        model.apply({"params": params}, arrays["x"], sample_posterior=True)


def test_posterior_statistics_and_kl():
    rng = np.random.default_rng(1)
    moments = rng.standard_normal((2, 3, 3, 8)).astype(np.float32)
    moments[0, 0, 0, 4], moments[0, 0, 1, 4] = 50.0, -50.0  # clipped log-variances
    post = DiagonalGaussianDistribution.from_moments(jnp.asarray(moments))
    mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30.0, 20.0)
    np.testing.assert_array_equal(post.mean, mean)
    np.testing.assert_array_equal(post.logvar, logvar)
    kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(), kl, rtol=1e-5)
    other = DiagonalGaussianDistribution.from_moments(jnp.asarray(moments[::-1].copy()))
    kl_other = 0.5 * np.sum(
        (mean - other.mean) ** 2 / other.var
        + np.exp(logvar) / other.var
        - 1.0
        - logvar
        + other.logvar,
        axis=(1, 2, 3),
    )
    np.testing.assert_allclose(post.kl(other), kl_other, rtol=1e-5)
    # Monte-Carlo check of the sampler: z ~ N(mean, var)
    big = DiagonalGaussianDistribution(
        jnp.full((4000, 1, 1, 1), 1.5), jnp.full((4000, 1, 1, 1), np.log(0.25))
    )
    z = np.asarray(big.sample(jax.random.key(0)))
    assert abs(z.mean() - 1.5) < 4 * 0.5 / np.sqrt(4000)
    assert abs(z.std() - 0.5) < 0.03
    det = DiagonalGaussianDistribution.from_moments(jnp.asarray(moments), deterministic=True)
    np.testing.assert_array_equal(det.sample(jax.random.key(0)), det.mean)
    # a pytree: it crosses jit
    out = jax.jit(lambda m: DiagonalGaussianDistribution.from_moments(m))(jnp.asarray(moments))
    np.testing.assert_array_equal(out.logvar, logvar)


# --------------------------------------------------------------------------------------------
# Slicing, precision


def test_slicing_equals_unsliced(base):
    model, params = base
    arrays, _ = load_case(COMPONENT, "base")
    sliced = model.clone(use_slicing=True)
    # per-example and batched convolutions may sum in another order: ~1e-6 relative
    np.testing.assert_allclose(
        _decode(sliced, params, arrays["z"]),
        _decode(model, params, arrays["z"]),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        _encode(model, params, arrays["x"], slice=True).mean,
        _encode(model, params, arrays["x"]).mean,
        rtol=1e-4,
        atol=1e-5,
    )


def test_bfloat16_close_to_float32(base):
    arrays, _ = load_case(COMPONENT, "base")
    model, params = _load("base", dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.bfloat16
    decoded = _decode(model, params, arrays["z"])
    post = _encode(model, params, arrays["x"])
    assert decoded.dtype == jnp.bfloat16
    assert post.mean.dtype == jnp.float32  # moments are returned in float32
    err_dec = relative_l2(decoded, arrays["decoded"])
    err_mean = relative_l2(post.mean, arrays["mean"])
    print(f"bf16 vs fp32 reference: decode rel-L2 {err_dec:.2e}, encode mean rel-L2 {err_mean:.2e}")
    # bf16 keeps 8 mantissa bits (~4e-3 relative per op); a dozen layers stay within ~2e-2.
    assert err_dec < 5e-2 and err_mean < 5e-2


# --------------------------------------------------------------------------------------------
# Loading and saving


def test_legacy_attention_names_load_and_save_as_current(tmp_path):
    folder = reference_dir(COMPONENT) / "legacy_attention"
    stored = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert "encoder.mid_block.attentions.0.query.weight" in stored
    model, params = _load("legacy_attention")
    model.save_pretrained(tmp_path, params)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert "encoder.mid_block.attentions.0.to_q.weight" in saved
    assert "decoder.mid_block.attentions.0.to_out.0.bias" in saved
    assert not any(k.rsplit(".", 2)[-2] in ("query", "key", "value", "proj_attn") for k in saved)
    renamed = {
        k.replace(".query.", ".to_q.")
        .replace(".key.", ".to_k.")
        .replace(".value.", ".to_v.")
        .replace(".proj_attn.", ".to_out.0."): v
        for k, v in stored.items()
    }
    assert sorted(saved) == sorted(renamed)
    for k in saved:
        np.testing.assert_array_equal(saved[k], renamed[k])
    # both names at once is an error, not a silent pick
    both = dict(
        stored,
        **{
            "encoder.mid_block.attentions.0.to_q.weight": stored[
                "encoder.mid_block.attentions.0.query.weight"
            ]
        },
    )
    with pytest.raises(ValueError, match="both its legacy and its current name"):
        model.params_from_state_dict(both)


def test_attention_weights_stored_as_1x1_convs_load():
    model, params = _load("legacy_attention")
    sd = model.state_dict(params)
    key = "decoder.mid_block.attentions.0.to_k.weight"
    sd[key] = sd[key][:, :, None, None]
    again = model.params_from_state_dict(sd)
    np.testing.assert_array_equal(
        again["decoder"]["mid_block"]["attentions_0"]["to_k"]["kernel"],
        params["decoder"]["mid_block"]["attentions_0"]["to_k"]["kernel"],
    )


def test_state_dict_round_trip_and_config(base, tmp_path):
    model, params = base
    folder = reference_dir(COMPONENT) / "base"
    stored = load_file(folder / "diffusion_pytorch_model.safetensors")
    sd = model.state_dict(params)
    assert sorted(sd) == sorted(stored)
    for k in sd:
        np.testing.assert_array_equal(sd[k], stored[k])
    tiled = model.clone(use_tiling=True, use_slicing=True)
    tiled.save_pretrained(tmp_path, params)
    config = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    for k in ("use_tiling", "use_slicing", "tile_overlap_factor", "dtype", "attention_chunk_size"):
        assert k not in config
    for k, v in original.items():
        if not k.startswith("_"):
            assert config[k] == v, k


def test_missing_key_is_a_strict_error(base):
    model, params = base
    sd = model.state_dict(params)
    del sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    sd["encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(
        WeightLoadError, match=r"missing keys: decoder\.up_blocks\.0\.upsamplers\.0\.conv\.weight"
    ) as err:
        model.params_from_state_dict(sd)
    assert "unexpected keys: encoder.extra.weight" in str(err.value)


def test_config_weights_mismatch_is_reported(base):
    model, params = base
    other, _ = _load("legacy_attention")  # same blocks, 16 groups: same shapes, loads
    other.params_from_state_dict(model.state_dict(params))
    wrong = AutoencoderKL.from_config(
        dict(model.config), block_out_channels=(16, 64), norm_num_groups=8
    )
    with pytest.raises(WeightLoadError, match="shape mismatches") as err:
        wrong.params_from_state_dict(model.state_dict(params))
    assert "decoder.conv_in.weight: file has [32, 4, 3, 3], model expects [64, 4, 3, 3]" in str(
        err.value
    )
    no_quant = AutoencoderKL.from_config(dict(model.config), use_quant_conv=False)
    with pytest.raises(
        WeightLoadError, match="unexpected keys: quant_conv.bias, quant_conv.weight"
    ):
        no_quant.params_from_state_dict(model.state_dict(params))


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("method", "shape", "match"),
    [
        ("encode", (2, 16, 16, 4), "x has 4 channels .* in_channels=3"),
        ("encode", (16, 16, 3), "4-D NHWC"),
        ("encode", (1, 1, 16, 3), "at least 2x2 pixels .* got 1x16"),
        ("decode", (1, 8, 8, 3), "z has 3 channels .* latent_channels=4"),
        ("decode", (8, 8, 4), "4-D NHWC"),
        ("__call__", (1, 3, 16, 16), "x has 16 channels"),
        (
            "encode",
            (0, 16, 16, 3),
            r"non-empty batch, height and width, got shape \(0, 16, 16, 3\)",
        ),
        ("encode", (1, 0, 0, 3), r"non-empty batch, height and width, got shape \(1, 0, 0, 3\)"),
        ("decode", (1, 0, 2, 4), r"decode expects z with a non-empty batch, height and width"),
    ],
)
def test_bad_inputs_raise_clear_errors(base, method, shape, match):
    model, params = base
    with pytest.raises(ValueError, match=match):
        model.apply({"params": params}, jnp.zeros(shape), method=method)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(
        ValueError, match="down_block_types has 1 entries but block_out_channels has 2"
    ):
        AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8).init_weights(
            jax.random.key(0)
        )
    with pytest.raises(ValueError, match=r"down_block_types \['DownBlock2D'\] are not supported"):
        AutoencoderKL(
            block_out_channels=(32,),
            norm_num_groups=8,
            down_block_types=("DownBlock2D",),
        ).init_weights(jax.random.key(0))
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide"):
        AutoencoderKL(block_out_channels=(48,)).init_weights(jax.random.key(0))
    for field, value, match in [
        ("latent_channels", 0, "latent_channels must be a positive int, got 0"),
        ("norm_num_groups", None, "norm_num_groups must be a positive int, got None"),
        ("sample_size", None, "sample_size must be a positive int or a"),
        ("scaling_factor", "0.18", "scaling_factor must be a finite number, got '0.18'"),
        ("latents_mean", "abc", "latents_mean must be a list of finite numbers or None"),
    ]:
        with pytest.raises(ValueError, match="AutoencoderKL config: " + match):
            AutoencoderKL.from_config({field: value})
    assert AutoencoderKL(sample_size=[32, 32], latents_mean=[0.1] * 4).sample_size == [32, 32]


def test_init_weights_builds_the_loaded_tree(base):
    model, params = base
    shapes = model.param_shapes()  # abstract init: no compute
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    for want, got in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(params)):
        assert want.shape == got.shape
    assert set(params) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    no_quant = _load("no_quant_conv")[1]
    assert set(no_quant) == {"encoder", "decoder", "post_quant_conv"}
    assert "attentions_0" not in no_quant["encoder"]["mid_block"]


# --------------------------------------------------------------------------------------------
# Live parity (torch + diffusers in-process)


def _torch_vae(config: dict, seed: int = 0):
    from weights_conversion.reference.autoencoder_kl import build

    return build(config, seed)


def _jax_twin(tv):
    """jaxdiff's AutoencoderKL and params for the diffusers model ``tv``."""
    model = AutoencoderKL.from_config(dict(tv.config))
    return model, model.params_from_state_dict({k: v.numpy() for k, v in tv.state_dict().items()})


def _torch_run(tv, x_nhwc, z_nhwc):
    from weights_conversion.reference.autoencoder_kl import run

    return run(tv, x_nhwc, z_nhwc)


@requires_reference
def test_save_pretrained_loads_in_diffusers(base, tmp_path):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    arrays, _ = load_case(COMPONENT, "base")
    model, params = base
    model.save_pretrained(tmp_path, params)
    tv = TorchAutoencoderKL.from_pretrained(tmp_path).eval()
    out = _torch_run(tv, arrays["x"], arrays["z"])
    for k in ("mean", "logvar", "decoded"):
        np.testing.assert_array_equal(out[k], arrays[k], err_msg=k)


@requires_reference
def test_live_parity_other_config_odd_sizes():
    """A config not in the golden set: 3 blocks, 2 layers, 3 latent channels, 1-channel images."""
    cfg = dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=3,
        in_channels=1,
        out_channels=2,
        sample_size=16,
    )
    tv = _torch_vae(cfg, seed=5)
    model, params = _jax_twin(tv)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (1, 12, 20, 1)).astype(np.float32)
    z = rng.standard_normal((1, 5, 3, 3)).astype(np.float32)
    want = _torch_run(tv, x, z)
    post = _encode(model, params, x)
    assert relative_l2(post.mean, want["mean"]) < TOL
    assert relative_l2(post.logvar, want["logvar"]) < TOL
    assert relative_l2(_decode(model, params, z), want["decoded"]) < TOL


@requires_reference
def test_live_parity_encode_sizes_not_multiples_of_the_downsampling():
    """diffusers encodes any size from 2 ** (levels - 1) up (each downsampling pads one row and
    column at the bottom/right), giving floor(H / f) latent rows; jaxdiff used to reject it."""
    cfg = dict(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    )
    tv = _torch_vae(cfg, seed=5)
    model, params = _jax_twin(tv)
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    for shape, latent in (
        ((1, 13, 21, 3), (1, 2)),
        ((2, 37, 30, 3), (4, 3)),
        ((1, 8, 9, 3), (1, 1)),
    ):
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        want = _torch_run(tv, x, z)
        post = _encode(model, params, x)
        assert post.mean.shape[1:3] == want["mean"].shape[1:3] == latent
        assert relative_l2(post.mean, want["mean"]) < TOL
        assert relative_l2(post.logvar, want["logvar"]) < TOL
    with pytest.raises(ValueError, match="at least 8x8 pixels"):
        _encode(model, params, np.zeros((1, 7, 9, 3), np.float32))


@requires_reference
def test_live_parity_attention_encoder_decoder_blocks():
    """AttnDownEncoderBlock2D / AttnUpDecoderBlock2D (self-attention after every ResNet block),
    which diffusers' AutoencoderKL accepts and jaxdiff used to reject."""
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(0)
    tv = TorchAutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=16,
    ).eval()
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model, params = _jax_twin(tv)
    assert "attentions_1" in params["decoder"]["up_blocks_2"]
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 16, 12, 3)).astype(np.float32)
    z = rng.standard_normal((2, 4, 3, 4)).astype(np.float32)
    want = _torch_run(tv, x, z)
    post = _encode(model, params, x)
    assert relative_l2(post.mean, want["mean"]) < TOL
    assert relative_l2(post.logvar, want["logvar"]) < TOL
    assert relative_l2(_decode(model, params, z), want["decoded"]) < TOL


@requires_reference
@pytest.mark.slow
def test_live_parity_sd15_vae_full_config():
    """The Stable Diffusion v1.5 VAE config (stabilityai/sd-vae-ft-mse), random weights."""
    cfg = dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    tv = _torch_vae(cfg, seed=0)
    model, params = _jax_twin(tv)
    assert model.scaling_factor == pytest.approx(0.18215)
    assert model.tile_latent_min_size == 64
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    z = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    want = _torch_run(tv, x, z)
    del tv
    post = _encode(model, params, x)
    assert post.mean.shape == (1, 8, 8, 4)
    assert relative_l2(post.mean, want["mean"]) < TOL
    assert relative_l2(post.logvar, want["logvar"]) < TOL
    decoded = _decode(model, params, z)
    assert decoded.shape == (1, 128, 128, 3)
    assert relative_l2(decoded, want["decoded"]) < TOL
