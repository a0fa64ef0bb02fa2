"""UNet2DConditionModel: parity with diffusers, strict loading, round trip, input errors."""

from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.loaders.state_dict import WeightLoadError
from jaxdiff.models.unet_2d_condition import (
    UNet2DConditionModel,
    UNet2DConditionOutput,
    sd15_config,
    sd21_config,
)
from tests.reference_io import load_case, reference_dir, relative_l2, requires_reference

COMPONENT = "unet_2d_condition"
CASES = ("sd15_tiny", "sd21_inpaint_tiny", "depth_tiny")
# float32 on both sides with exact matmuls (conftest): what remains is summation order across
# ~30 layers (observed ~1e-6); 1e-4 still catches any wrong weight, layout or op.
RTOL_L2 = 1e-4


@functools.cache
def _load_cached(name: str, dtype=jnp.float32):
    return UNet2DConditionModel.from_pretrained(reference_dir(COMPONENT) / name, dtype=dtype)


def _load(name: str, dtype=jnp.float32):
    return _load_cached(name, dtype)


@functools.cache
def _jitted(model):
    """One compiled apply per model config (eager Linen dispatch of a UNet is slow on CPU)."""

    def fn(params, sample, timesteps, context, kwargs):
        out = model.apply({"params": params}, sample, timesteps, context, **kwargs)
        assert isinstance(out, UNet2DConditionOutput)
        return out.sample

    return jax.jit(fn)


def _apply(model, params, inputs, **kwargs) -> np.ndarray:
    out = _jitted(model)(
        params, inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"], kwargs
    )
    return np.asarray(out, np.float32)


# ------------------------------------------------------------------------------------------
# Golden parity (files made by weights_conversion/reference/unet_2d_condition.py)


@pytest.mark.parametrize("name", CASES)
def test_golden_parity(name):
    arrays, meta = load_case(COMPONENT, name)
    model, params = _load(name)
    assert model.in_channels == meta["config"]["in_channels"]
    out = _apply(model, params, arrays)
    assert out.shape == arrays["expected"].shape
    assert relative_l2(out, arrays["expected"]) < RTOL_L2


def test_golden_parity_encoder_attention_mask():
    arrays, _ = load_case(COMPONENT, "sd15_tiny")
    model, params = _load("sd15_tiny")
    mask = arrays["encoder_attention_mask"].astype(bool)
    out = _apply(model, params, arrays, encoder_attention_mask=mask)
    assert relative_l2(out, arrays["expected_masked"]) < RTOL_L2
    # the mask matters: the masked and unmasked references differ in the masked row only
    assert relative_l2(arrays["expected_masked"][1], arrays["expected"][1]) > 1e-3
    np.testing.assert_allclose(
        arrays["expected_masked"][0], arrays["expected"][0], rtol=0, atol=1e-6
    )


def test_scalar_timestep_broadcasts_over_batch():
    arrays, _ = load_case(COMPONENT, "depth_tiny")
    model, params = _load("depth_tiny")
    t = int(arrays["timesteps"][1])
    a = _apply(model, params, {**arrays, "timesteps": np.int64(t)})
    b = _apply(model, params, {**arrays, "timesteps": np.full((2,), t, np.int64)})
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_params_tree_and_state_dict_keys():
    model, params = _load("sd15_tiny")
    sd = model.state_dict(params)
    assert "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight" in sd
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight" in sd
    assert "up_blocks.1.attentions.2.proj_in.weight" in sd
    assert sd["up_blocks.1.attentions.2.proj_in.weight"].shape == (16, 16, 1, 1)  # 1x1 conv
    assert "mid_block.attentions.0.norm.weight" in sd
    p = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert p["attn2"]["to_k"]["kernel"].shape == (16, 16)  # (cross_attention_dim, inner)
    assert "bias" not in p["attn2"]["to_k"]  # attention_bias=False
    assert p["ff"]["net_0"]["proj"]["kernel"].shape == (16, 2 * 4 * 16)
    # the golden file's keys are exactly the model's keys
    from jaxdiff.loaders.safetensors_io import load_file

    stored = load_file(
        reference_dir(COMPONENT) / "sd15_tiny" / "diffusion_pytorch_model.safetensors"
    )
    assert set(stored) == set(sd)


def test_linear_projection_params_are_dense():
    model, params = _load("sd21_inpaint_tiny")
    t = params["down_blocks_1"]["attentions_0"]
    assert t["proj_in"]["kernel"].shape == (32, 32)
    assert model.state_dict(params)["down_blocks.1.attentions.0.proj_out.weight"].shape == (32, 32)


def test_strict_loader_reports_mismatches_by_name():
    base, params = _load("sd15_tiny")
    sd = dict(base.state_dict(params))
    # SD 1.x weights (1x1 conv projections) into an SD 2.x-style config (linear projections)
    linear = UNet2DConditionModel.from_config(base.config, use_linear_projection=True)
    with pytest.raises(WeightLoadError, match=r"shape mismatches: .*proj_in\.weight"):
        linear.params_from_state_dict(sd)
    del sd["conv_in.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(
        WeightLoadError, match=r"missing keys: conv_in\.bias[\s\S]*unexpected keys: extra\.weight"
    ):
        base.params_from_state_dict(sd)


# ------------------------------------------------------------------------------------------
# Memory-efficient attention and precision


def test_chunked_attention_equals_one_pass():
    arrays, _ = load_case(COMPONENT, "sd15_tiny")
    model, params = _load("sd15_tiny")
    # 16x16 latents: 256 query tokens at the top level; chunks of 48 leave a remainder chunk
    chunked = model.clone(attention_chunk_size=48)
    a = _apply(model, params, arrays)
    b = _apply(chunked, params, arrays)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert relative_l2(b, arrays["expected"]) < RTOL_L2


def test_bfloat16_close_to_float32():
    arrays, _ = load_case(COMPONENT, "sd21_inpaint_tiny")
    model16, params16 = _load("sd21_inpaint_tiny", dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.bfloat16
    out = _jitted(model16)(
        params16, arrays["sample"], arrays["timesteps"], arrays["encoder_hidden_states"], {}
    )
    assert out.dtype == jnp.bfloat16
    err = relative_l2(np.asarray(out, np.float32), arrays["expected"])
    print(f"bf16 vs fp32 reference: relative L2 {err:.2e}")
    # bf16 has an 8-bit mantissa (rel. rounding 2**-9 ~ 2e-3 per op); through ~20 layers the
    # observed error is ~1e-2. 5e-2 catches a broken dtype path (e.g. an fp16 overflow or a
    # norm computed in bf16 without upcast) while leaving room for bf16 noise.
    assert err < 5e-2


# ------------------------------------------------------------------------------------------
# Bad inputs and unsupported configs: clear errors at trace time


@pytest.fixture(scope="module")
def tiny():
    return _load("sd15_tiny")


def _call(model, params, sample, t=1, context=None, **kw):
    if context is None:
        context = np.zeros((sample.shape[0], 7, 16), np.float32)
    return model.apply({"params": params}, sample, t, context, **kw)


def test_error_wrong_context_width(tiny):
    model, params = tiny
    with pytest.raises(
        ValueError, match=r"encoder_hidden_states has width 768 .*cross_attention_dim=16"
    ):
        _call(model, params, np.zeros((1, 16, 16, 4)), context=np.zeros((1, 77, 768)))
    with pytest.raises(
        ValueError, match=r"encoder_hidden_states must have shape \(batch, sequence"
    ):
        _call(model, params, np.zeros((1, 16, 16, 4)), context=np.zeros((77, 16)))


def test_error_wrong_in_channels(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"sample has 9 channels .*in_channels=4"):
        _call(model, params, np.zeros((1, 16, 16, 9)))
    with pytest.raises(ValueError, match=r"sample has 16 channels"):  # NCHW by mistake
        _call(model, params, np.zeros((1, 4, 16, 16)))


def test_error_wrong_rank(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"sample must be a 4-D NHWC array"):
        _call(model, params, np.zeros((16, 16, 4)))


def test_error_timesteps_and_batch(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or a \(batch,\)"):
        _call(model, params, np.zeros((2, 16, 16, 4)), t=np.ones((3,)))
    with pytest.raises(ValueError, match=r"encoder_hidden_states has batch 1, sample has batch 2"):
        _call(model, params, np.zeros((2, 16, 16, 4)), context=np.zeros((1, 7, 16)))
    with pytest.raises(ValueError, match=r"encoder_attention_mask must have shape"):
        _call(model, params, np.zeros((1, 16, 16, 4)), encoder_attention_mask=np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"class_labels were given"):
        _call(model, params, np.zeros((1, 16, 16, 4)), class_labels=np.zeros((1,), int))


def test_error_missing_or_empty_inputs(tiny):
    model, params = tiny
    x = np.zeros((1, 16, 16, 4))
    with pytest.raises(ValueError, match=r"encoder_hidden_states is required: a \(batch, seq"):
        model.apply({"params": params}, x, 1, None)
    with pytest.raises(ValueError, match=r"sample must have a non-empty batch, height and width"):
        _call(model, params, np.zeros((1, 0, 0, 4)))
    with pytest.raises(ValueError, match=r"sample must have a non-empty batch, height and width"):
        _call(model, params, np.zeros((0, 16, 16, 4)))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must hold at least one token"):
        _call(model, params, x, context=np.zeros((1, 0, 16)))
    with pytest.raises(ValueError, match=r"timesteps must be finite, got \[nan\]"):
        _call(model, params, x, t=np.array([np.nan]))


def test_bad_config_values_raise_when_built(tiny):
    config = dict(tiny[0].config)
    for field, value, match in [
        ("cross_attention_dim", "768", r"cross_attention_dim must be a positive int, a list"),
        ("attention_head_dim", [5, 0], r"attention_head_dim must be a positive int, a list"),
        ("sample_size", [64], r"sample_size must be a positive int or a \[height, width\]"),
        ("norm_num_groups", 0, r"norm_num_groups must be a positive int or None, got 0"),
    ]:
        with pytest.raises(ValueError, match="UNet2DConditionModel config: " + match):
            UNet2DConditionModel.from_config({**config, field: value})
    # diffusers' own variants still build: per-block lists, None sample_size
    ok = UNet2DConditionModel.from_config(
        {**config, "attention_head_dim": [2, 4], "sample_size": None, "layers_per_block": [1, 2]}
    )
    assert ok.attention_head_dim == (2, 4)


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("encoder_hid_dim", 1024, NotImplementedError, r"encoder_hid_dim=1024"),
        ("class_embed_type", "timestep", NotImplementedError, r"class_embed_type='timestep'"),
        ("addition_embed_type", "text_image", NotImplementedError, r"addition_embed_type"),
        ("addition_embed_type", "text_time", ValueError, r"needs addition_time_embed_dim"),
        ("dual_cross_attention", True, NotImplementedError, r"dual_cross_attention"),
        ("time_embedding_type", "fourier", NotImplementedError, r"time_embedding_type"),
        ("num_attention_heads", 8, ValueError, r"num_attention_heads must be None"),
        (
            "down_block_types",
            ("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
            NotImplementedError,
            r"SimpleCrossAttnDownBlock2D",
        ),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", NotImplementedError, r"mid_block_type"),
        (
            "attention_head_dim",
            (2, 4, 8),
            ValueError,
            r"attention_head_dim must have one entry per down block",
        ),
    ],
)
def test_unsupported_config_errors(tiny, field, value, error, match):
    model = UNet2DConditionModel.from_config(tiny[0].config, **{field: value})
    with pytest.raises(error, match=match):
        model.param_shapes()


def test_dummy_inputs_and_init_shapes():
    model = UNet2DConditionModel(**CASE_CONFIG["sd15_tiny"])
    shapes = model.param_shapes()
    _, params = _load("sd15_tiny")
    got = jax.tree_util.tree_map(lambda x: tuple(x.shape), shapes)
    want = jax.tree_util.tree_map(lambda x: tuple(x.shape), params)
    assert got == want
    sample, t, ctx = model.dummy_inputs()
    assert sample.shape == (1, 2, 2, 4) and ctx.shape == (1, 1, 16) and t.shape == (1,)


def test_config_presets():
    sd15 = UNet2DConditionModel(**sd15_config())
    assert sd15.context_dim == 768 and sd15.attention_head_dim == 8
    sd21 = UNet2DConditionModel(**sd21_config())
    assert sd21.context_dim == 1024 and sd21.use_linear_projection and sd21.upcast_attention


CASE_CONFIG = {
    "sd15_tiny": dict(
        sample_size=16,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ),
}


# ------------------------------------------------------------------------------------------
# Live parity against diffusers (in-process)


def _torch_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _to_torch(value):
    import torch

    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    return torch.from_numpy(np.asarray(value))


def _live_parity(
    cfg: dict,
    batch: int,
    size: int | tuple[int, int],
    seq: int,
    seed: int = 0,
    extra: dict | None = None,
):
    """Builds diffusers' model from cfg (random weights, 1-D params perturbed), converts it,
    runs both on the same inputs (``size``: H = W, or ``(H, W)``); returns the relative L2
    error."""
    import torch

    from weights_conversion.reference.unet_2d_condition import build_model

    tmodel = build_model(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    x = rng.standard_normal((batch, h, w, tmodel.config.in_channels)).astype(np.float32)
    t = np.linspace(1, 999, batch).astype(np.int64)
    ctx_dim = tmodel.config.cross_attention_dim
    c = rng.standard_normal((batch, seq, ctx_dim)).astype(np.float32)
    extra = extra or {}
    with torch.no_grad():
        ref = (
            tmodel(
                torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                torch.from_numpy(t),
                torch.from_numpy(c),
                **{k: _to_torch(v) for k, v in extra.items()},
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    model = UNet2DConditionModel.from_config(dict(tmodel.config))
    params = model.params_from_state_dict(_torch_state_dict(tmodel))
    del tmodel
    gc.collect()
    fn = jax.jit(lambda p, x, t, c, e: model.apply({"params": p}, x, t, c, **e).sample)
    out = np.asarray(fn(params, x, t, c, extra))
    del params
    gc.collect()
    return relative_l2(out, ref)


@requires_reference
@pytest.mark.parametrize(
    "overrides, extra",
    [
        # LCM-style guidance embedding, class labels, UNetMidBlock2D, per-level layer counts,
        # only_cross_attention, scale-shift norms, sin/cos order and shift, 1x1 conv_in
        (
            dict(
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                layers_per_block=(1, 2),
                attention_head_dim=(2, 4),
                only_cross_attention=(True, False),
                mid_block_type="UNetMidBlock2D",
                center_input_sample=True,
                flip_sin_to_cos=False,
                freq_shift=1,
                time_cond_proj_dim=8,
                num_class_embeds=3,
                resnet_time_scale_shift="scale_shift",
                time_embedding_act_fn="silu",
                conv_in_kernel=1,
            ),
            dict(
                timestep_cond=np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8),
                class_labels=np.array([0, 2]),
            ),
        ),
        # no mid block, class embeddings concatenated to the time embedding, upcast + linear
        (
            dict(
                mid_block_type=None,
                num_class_embeds=3,
                class_embeddings_concat=True,
                use_linear_projection=True,
                upcast_attention=True,
                transformer_layers_per_block=2,
                time_embedding_dim=48,
            ),
            dict(class_labels=np.array([1, 2])),
        ),
    ],
)
def test_live_parity_tiny_variants(overrides, extra):
    cfg = {**CASE_CONFIG["sd15_tiny"], "layers_per_block": 1, **overrides}
    assert _live_parity(cfg, batch=2, size=8, seq=5, extra=extra) < RTOL_L2


SDXL_TINY = {
    **CASE_CONFIG["sd15_tiny"],
    "layers_per_block": 1,
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4, 4),
    "transformer_layers_per_block": (1, 2, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 12 + 6 * 8,
}
SDXL_ADDED = {
    "text_embeds": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 12),
    "time_ids": np.array([[64, 64, 0, 0, 64, 64], [48, 32, 8, 4, 64, 64]], np.float32),
}


@requires_reference
def test_live_parity_sdxl_text_time_embedding():
    """SDXL's addition_embed_type="text_time" (pooled text embedding + 6 size/crop ids, each
    embedded like a timestep, through an MLP added to the time embedding), with SDXL's block
    layout (no attention at the first level, 2 transformer layers, linear projections)."""
    extra = {"added_cond_kwargs": SDXL_ADDED}
    assert _live_parity(SDXL_TINY, batch=2, size=8, seq=5, extra=extra) < RTOL_L2


def test_text_time_errors():
    model = UNet2DConditionModel.from_config(SDXL_TINY)
    params = model.init_weights(jax.random.key(0))
    assert params["add_embedding"]["linear_1"]["kernel"].shape == (60, 64)
    x, t, c = np.zeros((2, 8, 8, 4), np.float32), np.ones((2,)), np.zeros((2, 5, 16), np.float32)

    def call(added):
        return model.apply({"params": params}, x, t, c, added_cond_kwargs=added)

    assert call(SDXL_ADDED).sample.shape == (2, 8, 8, 4)
    with pytest.raises(ValueError, match=r"needs added_cond_kwargs .* missing \['time_ids'\]"):
        call({"text_embeds": SDXL_ADDED["text_embeds"]})
    with pytest.raises(ValueError, match="missing \\['text_embeds', 'time_ids'\\]"):
        call(None)
    with pytest.raises(ValueError, match=r"width 12 \+ 5 time_ids .* = 52, but projection_class_embeddings_input_dim is 60"):  # fmt: skip
        call({**SDXL_ADDED, "time_ids": SDXL_ADDED["time_ids"][:, :5]})
    with pytest.raises(ValueError, match=r"text_embeds must be \(batch=2, P\)"):
        call({**SDXL_ADDED, "text_embeds": SDXL_ADDED["text_embeds"][:1]})
    sd15 = UNet2DConditionModel.from_config(CASE_CONFIG["sd15_tiny"])
    p15 = sd15.init_weights(jax.random.key(0))
    with pytest.raises(ValueError, match="added_cond_kwargs were given but .*=None"):
        sd15.apply({"params": p15}, np.zeros((1, 16, 16, 4)), 1, np.zeros((1, 5, 16)),
                   added_cond_kwargs=SDXL_ADDED)  # fmt: skip


@requires_reference
def test_live_parity_encoder_mask_with_no_token():
    """A row of ``encoder_attention_mask`` that masks every token: diffusers' -10000 bias
    shifts all its logits equally, so it attends to every token as if unmasked (jaxdiff
    averaged the values uniformly)."""
    mask = np.array([[0, 0, 0, 0, 0], [1, 1, 0, 1, 0]])
    extra = dict(encoder_attention_mask=mask)
    # ~3e-5, not ~1e-6: diffusers' logits - 10000 keep only ~1e-3 absolute precision in float32
    assert _live_parity(CASE_CONFIG["sd15_tiny"], batch=2, size=8, seq=5, extra=extra) < RTOL_L2


@requires_reference
def test_live_parity_asymmetric_transformer_layers():
    """Nested ``transformer_layers_per_block`` (an asymmetric UNet such as SSD-1B): the
    one-layer mid block gets the last level's per-layer list and, as in diffusers, uses its
    first entry (jaxdiff rejected the list as one entry too long)."""
    cfg = {
        **CASE_CONFIG["sd15_tiny"],
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "transformer_layers_per_block": [[1, 0], [2, 1]],
        "reverse_transformer_layers_per_block": [[1, 0, 2], [0, 1, 1]],
    }
    assert _live_parity(cfg, batch=2, size=8, seq=5) < RTOL_L2


@requires_reference
@pytest.mark.parametrize("size, padding", [((10, 7), 1), ((5, 9), 0)])
def test_live_parity_size_not_multiple_of_factor(size, padding):
    """H, W not multiples of 2 ** (levels - 1): the stride-2 convs round up on the way down
    and each upsampler resizes to its skip's size, as diffusers' ``forward_upsample_size``
    does (jaxdiff rejected such sizes)."""
    cfg = {
        **CASE_CONFIG["sd15_tiny"],
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "downsample_padding": padding,
    }
    assert _live_parity(cfg, batch=1, size=size, seq=3) < RTOL_L2


@requires_reference
def test_round_trip_save_pretrained_loads_in_diffusers(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    arrays, _ = load_case(COMPONENT, "sd21_inpaint_tiny")
    model, params = _load("sd21_inpaint_tiny")
    ours = _apply(model, params, arrays)
    model.save_pretrained(tmp_path / "unet", params)
    tmodel = TorchUNet.from_pretrained(tmp_path / "unet").eval()
    assert tmodel.config.use_linear_projection and tmodel.config.in_channels == 9
    with torch.no_grad():
        theirs = (
            tmodel(
                torch.from_numpy(arrays["sample"].transpose(0, 3, 1, 2).copy()),
                torch.from_numpy(arrays["timesteps"]),
                torch.from_numpy(arrays["encoder_hidden_states"]),
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    assert relative_l2(ours, theirs) < RTOL_L2
    # and back: the saved folder loads in jaxdiff to the same params
    model2, params2 = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert model2.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


# Full-size configs: ~860M params (3.4 GB fp32) per side; run one at a time.
@requires_reference
@pytest.mark.slow
def test_live_parity_sd15_full_config():
    err = _live_parity(sd15_config(), batch=2, size=32, seq=77, seed=1)
    print(f"SD1.5 config: relative L2 {err:.2e}")
    assert err < RTOL_L2


@requires_reference
@pytest.mark.slow
def test_live_parity_sd21_full_config():
    err = _live_parity(sd21_config(), batch=2, size=32, seq=77, seed=2)
    print(f"SD2.1 config: relative L2 {err:.2e}")
    assert err < RTOL_L2
