"""UNet2DModel: golden and live parity with diffusers, loading/saving, dtypes, errors."""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.loaders.safetensors_io import SafetensorsError, load_file, save_file
from jaxdiff.loaders.state_dict import WeightLoadError
from jaxdiff.models import Attention, ResnetBlock2D, UNet2DModel, get_timestep_embedding
from jaxdiff.models.layers import dot_product_attention
from tests.reference_io import load_case, reference_dir, relative_l2, requires_reference

COMPONENT = "unet_2d"
GOLDEN = [
    "ddpm_attn",
    "fourier_scale_shift_classes",
    "resnet_sampling",
    "plain_learned",
    "legacy_names",
]
# fp32 vs fp32 PyTorch: both sum the same products in a different order; across ~20 layers the
# observed relative L2 is ~1e-6, so 1e-4 leaves two orders of margin while any mapping error
# (a transposed kernel, a wrong norm, a swapped sin/cos) gives O(1).
TOL = 1e-4


@functools.partial(jax.jit, static_argnums=(0, 5))
def _apply(model, params, sample, timesteps, class_labels=None, train=False, rngs=None):
    return model.apply(
        {"params": params}, sample, timesteps, class_labels=class_labels, train=train, rngs=rngs
    ).sample


def _case_dir(name: str):
    return reference_dir(COMPONENT) / name


def _run(model, params, arrays):
    return np.asarray(
        _apply(model, params, arrays["sample"], arrays["timesteps"], arrays.get("class_labels"))
    )


# ------------------------------------------------------------------------------------------
# Golden parity (no torch needed)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_parity(name):
    arrays, meta = load_case(COMPONENT, name)
    model, params = UNet2DModel.from_pretrained(_case_dir(name))
    for key, value in meta["config"].items():
        assert getattr(model, key) == (tuple(value) if isinstance(value, list) else value), key
    out = _run(model, params, arrays)
    assert out.shape == arrays["expected"].shape
    assert relative_l2(out, arrays["expected"]) < TOL


def test_fp16_variant_loads():
    arrays, _ = load_case(COMPONENT, "fp16_variant")
    with pytest.raises(Exception, match="variant='fp16'"):
        UNet2DModel.from_pretrained(_case_dir("fp16_variant"))
    model, params = UNet2DModel.from_pretrained(_case_dir("fp16_variant"), variant="fp16")
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    # Expected = fp32 PyTorch on the same fp16-rounded weights: only summation order differs.
    assert relative_l2(_run(model, params, arrays), arrays["expected"]) < TOL


@pytest.mark.parametrize(
    "dtype, bound",
    [
        # bf16 has an 8-bit mantissa (rounding 2**-9 ~ 2e-3 per op); through ~20 layers, with
        # norms and softmax kept in fp32, the observed relative L2 is ~1.3e-2.
        (jnp.bfloat16, 5e-2),
        # fp16 has a 11-bit mantissa: 8x finer than bf16.
        (jnp.float16, 1e-2),
    ],
)
def test_half_precision_close_to_float32(dtype, bound):
    arrays, _ = load_case(COMPONENT, "ddpm_attn")
    model, params = UNet2DModel.from_pretrained(_case_dir("ddpm_attn"), dtype=dtype)
    assert model.dtype == dtype
    assert all(p.dtype == dtype for p in jax.tree_util.tree_leaves(params))
    out = _run(model, params, arrays)
    assert out.dtype == dtype
    err = relative_l2(out.astype(np.float32), arrays["expected"])
    print(f"{jnp.dtype(dtype).name} vs fp32 reference relative L2: {err:.2e}")
    assert err < bound


def test_scalar_timestep_broadcasts_and_shapes():
    arrays, _ = load_case(COMPONENT, "legacy_names")
    model, params = UNet2DModel.from_pretrained(_case_dir("legacy_names"))
    t = int(arrays["timesteps"][0])
    both = _apply(model, params, arrays["sample"], jnp.array([t, t]))  # cached by golden test
    scalar = _apply(model, params, arrays["sample"], jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(both), np.asarray(scalar))
    # A 1-element timesteps array broadcasts too (diffusers multiplies by ones(batch)).
    shape = jax.eval_shape(
        lambda p: model.apply({"params": p}, arrays["sample"], jnp.array([t])), params
    ).sample.shape
    assert shape == arrays["sample"].shape[:3] + (model.out_channels,)


def test_dropout_only_in_train():
    arrays, _ = load_case(COMPONENT, "plain_learned")
    model, params = UNet2DModel.from_pretrained(_case_dir("plain_learned"))
    assert model.dropout > 0
    x, t = arrays["sample"], arrays["timesteps"]
    a = _apply(model, params, x, t, None, True, {"dropout": jax.random.key(1)})
    b = _apply(model, params, x, t, None, True, {"dropout": jax.random.key(1)})
    c = _apply(model, params, x, t, None, True, {"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert relative_l2(a, c) > 1e-3
    assert relative_l2(a, arrays["expected"]) > 1e-3  # eval output is the reference


# ------------------------------------------------------------------------------------------
# Loading and saving


def test_legacy_attention_names_normalised_and_saved_with_current_names(tmp_path):
    legacy = load_file(_case_dir("legacy_names") / "diffusion_pytorch_model.safetensors")
    assert any(".query." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    model, params = UNet2DModel.from_pretrained(_case_dir("legacy_names"))
    model.save_pretrained(tmp_path, params)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert set(saved) == set(UNet2DModel._normalize_state_dict(legacy))
    assert not any(k.rsplit(".", 2)[-2] in ("query", "key", "value", "proj_attn") for k in saved)
    for k, v in UNet2DModel._normalize_state_dict(legacy).items():
        np.testing.assert_array_equal(saved[k], v)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"
    assert config["block_out_channels"] == list(model.block_out_channels)


def test_sharded_checkpoint_loads(tmp_path):
    src = _case_dir("ddpm_attn")
    state = load_file(src / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, tmp_path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    _, sharded = UNet2DModel.from_pretrained(tmp_path)
    _, single = UNet2DModel.from_pretrained(src)
    for a, b in zip(
        jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(single), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_strict_errors_name_every_bad_key():
    model, params = UNet2DModel.from_pretrained(_case_dir("ddpm_attn"))
    state = model.state_dict(params)
    state.pop("mid_block.attentions.0.to_q.weight")
    state["down_blocks.0.extra.weight"] = np.zeros(3, np.float32)
    state["conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    with pytest.raises(WeightLoadError) as err:
        model.params_from_state_dict(state)
    msg = str(err.value)
    assert "1 missing keys: mid_block.attentions.0.to_q.weight" in msg
    assert "1 unexpected keys: down_blocks.0.extra.weight" in msg
    assert "conv_in.weight: file has [16, 3, 5, 5], model expects [16, 3, 3, 3]" in msg


def test_state_dict_round_trip_exact():
    model, params = UNet2DModel.from_pretrained(_case_dir("resnet_sampling"))
    state = model.state_dict(params)
    original = load_file(_case_dir("resnet_sampling") / "diffusion_pytorch_model.safetensors")
    assert set(state) == set(original)
    for k in original:
        np.testing.assert_array_equal(state[k], original[k])


def test_truncated_and_corrupt_safetensors(tmp_path):
    src = _case_dir("plain_learned")
    for kind in ("truncated", "corrupt"):
        d = tmp_path / kind
        shutil.copytree(src, d)
        f = d / "diffusion_pytorch_model.safetensors"
        data = f.read_bytes()
        if kind == "truncated":
            f.write_bytes(data[: len(data) // 2])
        else:
            f.write_bytes(data[:8] + b"\x00garbage" + data[16:])
        with pytest.raises(SafetensorsError, match=str(f)):
            UNet2DModel.from_pretrained(d)


# ------------------------------------------------------------------------------------------
# Input validation (raised at trace time)


@pytest.fixture(scope="module")
def small_model():
    model = UNet2DModel(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    return model, model.param_shapes()


@pytest.mark.parametrize(
    "shape, t, match",
    [
        ((8, 8, 3), 1, r"sample must be a 4-D NHWC array .* got shape \(8, 8, 3\)"),
        ((1, 3, 8, 8), 1, r"sample has 8 channels .* in_channels=3"),
        ((1, 9, 8, 3), 1, r"multiples of 2 .* got 9x8"),
        ((2, 8, 8, 3), np.ones(3), r"timesteps must be a scalar or a \(batch,\) = \(2,\) array"),
        ((0, 8, 8, 3), 1, r"sample must have a non-empty batch, height and width"),
        ((1, 0, 8, 3), 1, r"sample must have a non-empty batch, height and width"),
        ((1, 8, 8, 3), float("nan"), r"timesteps must be finite, got nan"),
        ((2, 8, 8, 3), np.array([1.0, np.inf]), r"timesteps must be finite, got \[1.0, inf\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(small_model, shape, t, match):
    model, shapes = small_model
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros(shape), t), shapes)


def test_non_numeric_timesteps_raise(small_model):
    model, shapes = small_model
    for t in ("a", None):
        with pytest.raises(TypeError, match="timesteps must be a number"):
            model.apply({"params": shapes}, jnp.zeros((1, 8, 8, 3)), t)


def test_apply_without_the_params_collection_raises(small_model):
    model, shapes = small_model
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(TypeError, match=r"the params tree itself\? pass \{'params': params\}"):
        model.apply(shapes, x, 1)  # Flax: "the collection is empty" deep inside
    for bad in (None, {}):
        with pytest.raises(TypeError, match=r"UNet2DModel.apply: variables must be"):
            model.apply(bad, x, 1)


def test_traced_timesteps_are_not_checked(small_model):
    model, shapes = small_model  # a NaN inside jit is the caller's business: no host sync
    out = jax.eval_shape(
        jax.jit(lambda p, t: model.apply({"params": p}, jnp.zeros((1, 8, 8, 3)), t)),
        shapes,
        jnp.float32(np.nan),
    )
    assert out.sample.shape == (1, 8, 8, 3)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("in_channels", "3", r"UNet2DModel config: in_channels must be a positive int, got '3'"),
        ("in_channels", 0, r"in_channels must be a positive int, got 0"),
        ("in_channels", True, r"in_channels must be a positive int, got True"),
        ("norm_num_groups", 0, r"norm_num_groups must be a positive int, got 0"),
        ("norm_num_groups", None, r"norm_num_groups must be a positive int, got None"),
        ("norm_eps", "a", r"norm_eps must be a finite number >= 0, got 'a'"),
        ("norm_eps", float("nan"), r"norm_eps must be a finite number >= 0, got nan"),
        ("sample_size", "x", r"sample_size must be a positive int or a \[height, width\]"),
        ("block_out_channels", "abc", r"block_out_channels must be a non-empty list"),
        ("block_out_channels", (8, -16), r"block_out_channels must be a non-empty list"),
        ("layers_per_block", -1, r"layers_per_block must be an int >= 0, got -1"),
        ("attention_head_dim", [2, 2], r"attention_head_dim must be a positive int or None"),
        ("dropout", 2, r"dropout must be a number in \[0, 1\], got 2"),
        ("down_block_types", "DownBlock2D", r"down_block_types must be a non-empty list of str"),
    ],
)
def test_bad_config_values_raise_when_built(small_model, field, value, match):
    config = dict(small_model[0].config)
    with pytest.raises(ValueError, match=match):
        UNet2DModel.from_config({**config, field: value})
    with pytest.raises(ValueError, match=match):
        UNet2DModel(**{field: value})


def test_bad_config_value_in_config_json(tmp_path):
    tmp_path = tmp_path / "unet"
    shutil.copytree(_case_dir(GOLDEN[0]), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "in_channels": "3"}))
    with pytest.raises(ValueError, match="UNet2DModel config: in_channels must be a positive int"):
        UNet2DModel.from_pretrained(tmp_path)


def test_valid_config_variants_still_build():
    assert UNet2DModel(sample_size=[16, 32]).sample_size == [16, 32]
    assert UNet2DModel(sample_size=None, attention_head_dim=None, norm_eps=0).norm_eps == 0
    assert UNet2DModel(layers_per_block=0, attn_norm_num_groups=None).layers_per_block == 0


def test_class_labels_errors(small_model):
    model, shapes = small_model
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="no class embedding"):
        jax.eval_shape(
            lambda p: model.apply({"params": p}, x, 1, class_labels=jnp.zeros(1)), shapes
        )
    cls_model = model.clone(num_class_embeds=4)
    with pytest.raises(ValueError, match="class_labels should be provided"):
        jax.eval_shape(lambda: cls_model.init(jax.random.key(0), x, 1))


def test_save_pretrained_bad_arguments_write_nothing(small_model, tmp_path):
    model, shapes = small_model
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    model.save_pretrained(tmp_path, params)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = UNet2DModel(
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
    )
    wrong_shape = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), other.param_shapes())
    for args, kwargs, error, match in [
        (({"foo": np.zeros(2)},), {}, ValueError, r"params are not the params tree .* missing"),
        (({**params, "extra": {"w": np.zeros(2)}},), {}, ValueError, r"unexpected \(1\)"),
        ((wrong_shape,), {}, ValueError, r"wrong shape"),
        ((params, jnp.float16), {}, ValueError, r"variant must be a name such as 'fp16'"),
        ((params, "a/b"), {}, ValueError, r"variant must be a name"),
    ]:
        with pytest.raises(error, match=match):
            model.save_pretrained(tmp_path, *args, **kwargs)
    with pytest.raises(TypeError, match="save_directory must be a folder path"):
        model.save_pretrained(params, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_config_round_trip():
    model, _ = UNet2DModel.from_pretrained(_case_dir("fourier_scale_shift_classes"))
    stored = json.loads((_case_dir("fourier_scale_shift_classes") / "config.json").read_text())
    mine = model.config.to_dict()
    for key, value in stored.items():
        if not key.startswith("_"):
            assert mine[key] == value, key
    assert "dtype" not in mine and "attention_chunk_size" not in mine


# ------------------------------------------------------------------------------------------
# Attention


def test_chunked_attention_matches_full():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 70, 2, 8))
    full = dot_product_attention(q, k, v)
    # 16 leaves a remainder chunk of 6; 100 > 70 is the single-pass path.
    for chunk in (16, 100):
        chunked = jax.jit(functools.partial(dot_product_attention, chunk_size=chunk))(q, k, v)
        np.testing.assert_allclose(chunked, full, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Live parity (PyTorch reference built in-process)


LIVE = {
    # scale_shift: the mid attention has no group norm; identity class embedding; batch 3.
    "scale_shift_identity_classes": dict(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        layers_per_block=1,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    ),
    # No mid block, padding-0 conv downsampling in an attention block, relu, eps 1e-6.
    "no_mid_block": dict(
        sample_size=8,
        block_out_channels=(8, 8),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        mid_block_type=None,
        norm_num_groups=2,
        attention_head_dim=2,
        layers_per_block=1,
        downsample_padding=0,
        act_fn="relu",
        norm_eps=1e-6,
        in_channels=2,
        out_channels=1,
    ),
    # ResnetDownsampleBlock2D / ResnetUpsampleBlock2D (ResNet resamplers as separate block
    # types; jaxdiff used to reject them), two layers, adaptive group norm.
    "resnet_sample_blocks": dict(
        sample_size=8,
        block_out_channels=(8, 16, 16),
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        layers_per_block=2,
        resnet_time_scale_shift="scale_shift",
    ),
    # NCSN++-style score-SDE UNet: FIR skip blocks with the 3-channel progressive input/output
    # branches, Fourier features, attention with its fixed 32 groups and head_dim=None.
    "ncsnpp_skip_blocks": dict(
        sample_size=16,
        block_out_channels=(32, 32, 64),
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
        layers_per_block=1,
        time_embedding_type="fourier",
        resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=1.41421356,
        center_input_sample=True,
        norm_eps=1e-6,
    ),
    # Skip blocks mixed with plain ones, two layers (attention skip block first).
    "mixed_skip_blocks": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("AttnSkipDownBlock2D", "DownBlock2D"),
        up_block_types=("AttnUpBlock2D", "SkipUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        layers_per_block=2,
    ),
    # attention_head_dim not dividing the channels: diffusers builds channels // head_dim heads
    # (inner width < channels); jaxdiff used to reject it.
    "head_dim_not_dividing": dict(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=3,
        layers_per_block=1,
    ),
    # add_attention=False: the mid block builds no attention, so diffusers never checks
    # attention_head_dim against its channels (jaxdiff used to reject 64 > 16 here).
    "mid_block_without_attention": dict(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=64,
        add_attention=False,
        layers_per_block=1,
    ),
}


def _live(config, batch=2, seed=0):
    import torch

    from weights_conversion.reference import unet_2d as ref

    torch_model = ref.build(config, seed=seed)
    inputs = ref.make_inputs(config, seed=seed)
    if batch != 2:
        rng = np.random.default_rng(seed)
        inputs["sample"] = rng.standard_normal((batch,) + inputs["sample"].shape[1:]).astype(
            np.float32
        )
        inputs["timesteps"] = inputs["timesteps"][:1].repeat(batch)
    if config.get("class_embed_type") == "identity":
        temb = config.get("time_embedding_dim") or config["block_out_channels"][0] * 4
        inputs["class_labels"] = (
            np.random.default_rng(seed).standard_normal((batch, temb)).astype(np.float32)
        )
    expected = ref.run(torch_model, inputs)
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    model = UNet2DModel.from_config(dict(torch_model.config))
    params = model.params_from_state_dict(state)
    return torch, torch_model, model, params, inputs, expected


@requires_reference
@pytest.mark.parametrize("name", sorted(LIVE))
def test_live_parity(name):
    *_, model, params, inputs, expected = _live(LIVE[name], batch=3)
    assert relative_l2(_run(model, params, inputs), expected) < TOL


@requires_reference
def test_fir_resampling_matches_diffusers():
    import torch
    from diffusers.models.downsampling import downsample_2d
    from diffusers.models.upsampling import upsample_2d

    from jaxdiff.models.layers import fir_downsample_2d, fir_upsample_2d

    x = np.random.default_rng(0).standard_normal((2, 6, 10, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    for jax_fn, torch_fn in ((fir_upsample_2d, upsample_2d), (fir_downsample_2d, downsample_2d)):
        want = torch_fn(xt, kernel=(1, 3, 3, 1)).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(jax_fn(x)), want, atol=1e-6)


def test_skip_blocks_need_three_channels():
    kw = dict(
        block_out_channels=(32, 32),
        down_block_types=("SkipDownBlock2D", "DownBlock2D"),
        up_block_types=("SkipUpBlock2D", "SkipUpBlock2D"),
        norm_num_groups=8,
    )
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match="Skip down blocks .* got in_channels=1"):
        jax.eval_shape(lambda: UNet2DModel(in_channels=1, **kw).init(jax.random.key(0), x, 1))
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="Skip up blocks .* got out_channels=2"):
        jax.eval_shape(lambda: UNet2DModel(out_channels=2, **kw).init(jax.random.key(0), x, 1))
    # At the last level a skip block does not resample and has no skip conv: any width works.
    last_only = dict(
        kw,
        down_block_types=("DownBlock2D", "SkipDownBlock2D"),
        up_block_types=("UpBlock2D", "SkipUpBlock2D"),
    )
    model = UNet2DModel(in_channels=1, out_channels=2, **last_only)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x[..., :1], 1))[0]
    assert out.sample.shape == (1, 8, 8, 2)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            dict(attention_head_dim=32),
            r"attention_head_dim=32 must be between 1 and the block.s 16 channels",
        ),
        (
            dict(mid_block_type="UNetMidBlock2DCrossAttn"),
            r"mid_block_type .* 'UNetMidBlock2DCrossAttn'",
        ),
        (dict(class_embed_type="projection"), r"class_embed_type .* got 'projection'"),
        (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "'CrossAttnDownBlock2D'"),
    ],
)
def test_unsupported_configs_name_the_field(small_model, overrides, match):
    model = small_model[0].clone(**overrides)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), 1))


@requires_reference
def test_timestep_embedding_matches_diffusers():
    import torch
    from diffusers.models.embeddings import get_timestep_embedding as torch_emb

    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    for dim, flip, shift, scale in [(32, True, 0, 1), (31, False, 1, 1), (16, True, 1, 2.0)]:
        ref = torch_emb(torch.from_numpy(t), dim, flip, shift, scale).numpy()
        np.testing.assert_allclose(
            get_timestep_embedding(t, dim, flip, shift, scale), ref, atol=2e-4
        )


@requires_reference
def test_cross_attention_and_resnet_match_diffusers():
    import torch
    from diffusers.models.attention_processor import Attention as TorchAttention
    from diffusers.models.resnet import ResnetBlock2D as TorchResnet

    from jaxdiff.loaders.state_dict import torch_to_flax

    torch.manual_seed(0)

    def convert(module, torch_module, *args):
        with torch.no_grad():
            for p in torch_module.parameters():
                p.add_(0.1 * torch.randn_like(p))
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
        sd = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
        return torch_to_flax(sd, shapes, ("to_out",))

    ta = TorchAttention(32, cross_attention_dim=24, heads=4, dim_head=16).eval()
    x, c = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    ja = Attention(32, cross_attention_dim=24, heads=4, dim_head=16, attention_chunk_size=4)
    p = convert(ja, ta, x.numpy(), c.numpy())
    out = ja.apply({"params": p}, x.numpy(), c.numpy(), mask.numpy())
    np.testing.assert_allclose(out, ta(x, c, attention_mask=mask).detach().numpy(), atol=1e-5)

    tr = TorchResnet(in_channels=16, out_channels=None, temb_channels=None, groups=4).eval()
    x = torch.randn(2, 16, 6, 6)
    jr = ResnetBlock2D(16, temb_channels=None, groups=4)
    xj = x.numpy().transpose(0, 2, 3, 1)
    p = convert(jr, tr, xj)
    ref = tr(x, None).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(jr.apply({"params": p}, xj), ref, atol=1e-5)


@requires_reference
def test_save_pretrained_loads_in_diffusers(tmp_path):
    from diffusers import UNet2DModel as TorchUNet2DModel

    from weights_conversion.reference import unet_2d as ref

    arrays, _ = load_case(COMPONENT, "fourier_scale_shift_classes")
    model, params = UNet2DModel.from_pretrained(_case_dir("fourier_scale_shift_classes"))
    model.save_pretrained(tmp_path, params)
    torch_model = TorchUNet2DModel.from_pretrained(tmp_path).eval()
    out = ref.run(torch_model, arrays)
    # Same weights, same PyTorch code: bit-identical up to load round trip (exact fp32 copy).
    assert relative_l2(out, arrays["expected"]) < 1e-6


@requires_reference
@pytest.mark.slow
def test_live_parity_ddpm_cat_256_full_config():
    config = dict(
        sample_size=256,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=(
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
        ),
        attention_head_dim=None,
        norm_eps=1e-6,
        act_fn="silu",
        time_embedding_type="positional",
        # google/ddpm-cat-256's config.json (as diffusers reads it): the original DDPM
        # embedding (sin first, denominator half_dim - 1) and padding-0 downsampling.
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        norm_num_groups=32,
    )
    torch, torch_model, model, params, inputs, expected = _live(config, batch=1)
    del torch_model
    out = _run(model, params, inputs)
    assert relative_l2(out, expected) < TOL
