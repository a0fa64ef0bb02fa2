"""CLIPTextModel: golden and live parity with transformers, loading/saving, bad inputs."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.hub import HubFileNotFoundError
from jaxdiff.loaders.safetensors_io import load_file
from jaxdiff.loaders.state_dict import WeightLoadError
from jaxdiff.models.clip_text import CLIPTextModel
from tests.reference_io import load_case, reference_dir, relative_l2, requires_reference

CASES = ("quick_gelu_eos2", "gelu_eos_id")
# Both sides compute in fp32; what differs is summation order in matmuls, layer norms and the
# softmax, ~1e-7 relative per op, well below 1e-4 after a few layers.
RTOL_FP32 = 1e-4


def _load(case: str, **kwargs):
    return CLIPTextModel.from_pretrained(reference_dir("clip_text"), subfolder=case, **kwargs)


@functools.cache
def _cached(case: str, dtype=jnp.float32):
    """The golden models, loaded once per session (modules and params are immutable)."""
    return _load(case, dtype=dtype)


_JITTED: dict = {}


def _run(model, params, ids, mask=None, hidden=True):
    """The jitted forward (one compile per model instead of op-by-op dispatch)."""
    key = (id(model), hidden)
    if key not in _JITTED:
        _JITTED[key] = (
            model,  # keeps the id alive
            jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, output_hidden_states=hidden)),
        )
    fwd = _JITTED[key][1]
    return fwd(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
def test_golden_parity(case, masked):
    arrays, meta = load_case("clip_text", case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' standard config keys load quietly
        model, params = _cached(case)
    mask = arrays["attention_mask"] if masked else None
    out = _run(model, params, arrays["input_ids"], mask)
    prefix = "masked_" if masked else ""
    for name in ("last_hidden_state", "pooler_output"):
        err = relative_l2(out.__getattribute__(name), arrays[prefix + name])
        assert err < RTOL_FP32, f"{case} {name}: relative L2 {err:.2e}"
    assert len(out.hidden_states) == meta["num_hidden_states"]
    for i, h in enumerate(out.hidden_states):
        err = relative_l2(h, arrays[f"{prefix}hidden_states_{i}"])
        assert err < RTOL_FP32, f"{case} hidden_states[{i}]: relative L2 {err:.2e}"
    # Pooling rule: eos_token_id == 2 -> argmax(input_ids); else the first position of the EOS id.
    ids = arrays["input_ids"]
    if model.eos_token_id == 2:
        pos = np.argmax(ids, axis=-1)
    else:
        pos = np.argmax(ids == model.eos_token_id, axis=-1)
        assert pos[0] != np.argmax(ids[0])  # the case is built so that the two rules differ
    np.testing.assert_array_equal(
        np.asarray(out.pooler_output), np.asarray(out.last_hidden_state)[np.arange(3), pos]
    )


def test_config_is_transformers_config():
    model, _ = _cached("gelu_eos_id")
    cfg = model.config
    assert cfg.architectures == ["CLIPTextModel"] and cfg.model_type == "clip_text_model"
    assert "_class_name" not in cfg and "_diffusers_version" not in cfg
    assert cfg.transformers_version and cfg.hidden_act == "gelu" and cfg.num_hidden_layers == 3
    # Defaults are transformers' CLIPTextConfig defaults.
    default = CLIPTextModel().config
    assert (default.vocab_size, default.hidden_size, default.eos_token_id) == (49408, 512, 49407)
    # A full CLIPConfig (model_type "clip"): its text_config is used.
    full = CLIPTextModel.from_config({"model_type": "clip", "text_config": {"hidden_size": 64}})
    assert full.hidden_size == 64 and full.num_hidden_layers == 12


def test_save_reload_round_trip(tmp_path):
    model, params = _cached("quick_gelu_eos2")
    model.save_pretrained(tmp_path, params)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["CLIPTextModel"] and "_class_name" not in saved
    assert saved["dtype"] == "float32" and saved["eos_token_id"] == 2
    model.save_pretrained(tmp_path / "half", params, variant="fp16", dtype=jnp.float16)
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    half = load_file(tmp_path / "half" / "model.fp16.safetensors")
    assert half["text_model.final_layer_norm.weight"].dtype == np.float16
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys
    again, params2 = CLIPTextModel.from_pretrained(tmp_path)
    assert again.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


@requires_reference
@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_jaxdiff_save(tmp_path, case):
    import torch
    import transformers

    arrays, _ = load_case("clip_text", case)
    model, params = _cached(case)
    model.save_pretrained(tmp_path / "text_encoder", params)
    ref, info = transformers.CLIPTextModel.from_pretrained(
        tmp_path / "text_encoder", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        got = ref.eval()(input_ids=torch.from_numpy(arrays["input_ids"])).last_hidden_state
    err = relative_l2(got.numpy(), arrays["last_hidden_state"])
    assert err < 1e-6, err  # the same weights in the same framework: identical up to fp32 noise


def test_bf16_compute_close_to_fp32():
    case = "quick_gelu_eos2"  # 77 tokens; the SD 2.x kind at full size: test_live_parity_*
    arrays, _ = load_case("clip_text", case)
    model, params = _cached(case)
    model16, params16 = _cached(case, jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.bfloat16
    ref = _run(model, params, arrays["input_ids"], hidden=False).last_hidden_state
    out = _run(model16, params16, arrays["input_ids"], hidden=False).last_hidden_state
    assert out.dtype == jnp.bfloat16
    err = relative_l2(out, ref)
    print(f"{case}: bf16 vs fp32 last_hidden_state relative L2 = {err:.2e}")
    # bf16 has an 8-bit mantissa (~4e-3 relative per rounding); weights, matmul inputs and the
    # output are rounded, norms/softmax/residual stay fp32: a few 1e-3 expected, 2e-2 is a bug.
    assert err < 2e-2


def test_init_scales_and_first_eos_pooling():
    model = CLIPTextModel(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        eos_token_id=49,
    )
    params = jax.jit(model.init_weights)(jax.random.key(0))
    ids = jnp.array([[48, 3, 4, 49, 49, 49, 49, 49]], jnp.int32)
    out = _run(model, params, ids)
    assert out.last_hidden_state.shape == (1, 8, 16) and len(out.hidden_states) == 2
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[:, 3])  # first EOS
    # transformers' init scale for q_proj: hidden^-0.5 * (2 * num_layers)^-0.5
    std = float(
        np.std(params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    )
    assert 0.5 * 16**-0.5 * 2**-0.5 < std < 1.5 * 16**-0.5 * 2**-0.5


# ---------------------------------------------------------------- bad inputs


def test_bad_input_ids():
    model, params = _cached("gelu_eos_id")
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seq\)"):
        _run(model, params, np.ones((16,), np.int32))
    with pytest.raises(ValueError, match="more than max_position_embeddings=77"):
        _run(model, params, np.ones((1, 78), np.int32))
    with pytest.raises(TypeError, match="input_ids must be integer"):
        _run(model, params, np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        _run(model, params, np.ones((1, 4), np.int32), np.ones((1, 5), np.int32))
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        CLIPTextModel(hidden_act="gelu_fancy")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        CLIPTextModel(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"input_ids must hold at least one prompt"):
        _run(model, params, np.ones((1, 0), np.int32))
    with pytest.raises(ValueError, match=r"input_ids must hold at least one prompt"):
        _run(model, params, np.ones((0, 4), np.int32))
    with pytest.raises(
        ValueError, match=r"CLIPTextModel config: vocab_size must be a positive int"
    ):
        CLIPTextModel(vocab_size="49408")
    with pytest.raises(ValueError, match=r"layer_norm_eps must be a finite number >= 0"):
        CLIPTextModel(layer_norm_eps=None)


def test_token_ids_outside_the_vocabulary():
    model, params = _cached("gelu_eos_id")
    n = model.vocab_size
    match = rf"input_ids must be token ids in \[0, vocab_size={n}\), got ids from"
    for bad in (n, 10**6, -3):
        ids = np.full((1, 4), 5, np.int32)
        ids[0, 2] = bad
        with pytest.raises(ValueError, match=match):  # host-known ids: checked
            model.apply({"params": params}, ids)
        with pytest.raises(ValueError, match=match):
            model.apply({"params": params}, jnp.asarray(ids))
    # traced ids are not checked (nothing changes in compiled code)
    out = _run(model, params, np.full((1, 4), n - 1, np.int32))
    assert np.isfinite(np.asarray(out.last_hidden_state)).all()


def test_config_not_matching_weights_names_keys():
    with pytest.raises(WeightLoadError) as err:
        _load("gelu_eos_id", num_hidden_layers=4, intermediate_size=96)
    msg = str(err.value)
    assert "text_model.encoder.layers.3.self_attn.q_proj.weight" in msg  # missing layer
    assert "text_model.encoder.layers.0.mlp.fc1.weight: file has [128, 64]" in msg
    assert "model expects [96, 64]" in msg


def test_missing_text_encoder_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(HubFileNotFoundError, match="text_encoder.*does not exist"):
        CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")


def test_import_does_not_import_torch():
    code = (
        "import sys, jaxdiff.models.clip_text, jaxdiff.utils.tokenizer; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# A tiny text encoder whose pad token is its EOS, as in the SD 1.x tokenizer.
TINY_TEXT = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=8,
    bos_token_id=62,
    eos_token_id=63,
    pad_token_id=63,
)


@requires_reference
def test_live_parity_left_padding():
    """Left padding with an ``attention_mask``: the leading padding queries have no key to
    attend to; transformers' default (sdpa) attention gives them a zero attention output, and
    with pad == EOS (the SD 1.x tokenizer) the pooled token is one of them. jaxdiff averaged
    every value there (eager attention's result)."""
    import torch
    import transformers

    cfg = TINY_TEXT
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    assert ref.config._attn_implementation == "sdpa"  # transformers' default
    with torch.no_grad():
        for p in ref.parameters():  # not the small init: 1-D perturbed, matrices x3
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
            else:
                p.mul_(3.0)
    ids = np.array([[63, 63, 62, 5, 9, 63], [62, 7, 8, 9, 10, 63]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = ref(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            output_hidden_states=True,
        )
    model = CLIPTextModel.from_config(cfg)
    params = model.params_from_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    out = _run(model, params, ids, mask)
    pairs = [
        (out.last_hidden_state, want.last_hidden_state),
        (out.pooler_output, want.pooler_output),
    ]
    pairs += list(zip(out.hidden_states, want.hidden_states, strict=True))
    for got, exp in pairs:
        assert relative_l2(got, exp.numpy()) < RTOL_FP32


@requires_reference
def test_with_projection_matches_transformers_and_round_trips(tmp_path):
    """CLIPTextModelWithProjection (SDXL's second text encoder): text_embeds and the hidden
    states against transformers, loading transformers' save, and transformers loading
    jaxdiff's save (``text_projection.weight`` outside the ``text_model.`` prefix)."""
    import torch
    import transformers

    from jaxdiff.models.clip_text import CLIPTextModelWithProjection

    cfg = {**TINY_TEXT, "projection_dim": 12, "hidden_act": "gelu"}
    torch.manual_seed(0)
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    ref.save_pretrained(tmp_path / "ref")
    ids = np.array([[62, 5, 9, 63, 63, 63], [62, 7, 8, 9, 10, 63]])
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), output_hidden_states=True)

    model, params = CLIPTextModelWithProjection.from_pretrained(tmp_path / "ref")
    assert params["text_projection"]["kernel"].shape == (16, 12)
    out = model.apply({"params": params}, ids, output_hidden_states=True)
    assert out.text_embeds.shape == (2, 12)
    assert relative_l2(out.text_embeds, want.text_embeds.numpy()) < RTOL_FP32
    assert relative_l2(out.last_hidden_state, want.last_hidden_state.numpy()) < RTOL_FP32
    for got, exp in zip(out.hidden_states, want.hidden_states, strict=True):
        assert relative_l2(got, exp.numpy()) < RTOL_FP32

    model.save_pretrained(tmp_path / "ours", params)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [
        "CLIPTextModelWithProjection"
    ]
    back, info = transformers.CLIPTextModelWithProjection.from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        again = back.eval()(input_ids=torch.from_numpy(ids)).text_embeds.numpy()
    np.testing.assert_allclose(again, want.text_embeds.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="projection_dim must be a positive int"):
        CLIPTextModelWithProjection(projection_dim=None)


# ---------------------------------------------------------------- live parity, real SD configs

SD15_TEXT = dict(  # runwayml/stable-diffusion-v1-5 text_encoder/config.json (openai ViT-L/14)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
SD21_TEXT = dict(  # stabilityai/stable-diffusion-2-1 text_encoder (OpenCLIP ViT-H/14)
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
    bos_token_id=0,
    eos_token_id=49407,  # the non-legacy pooling rule at full size
    pad_token_id=1,
)


def _prompt_ids() -> np.ndarray:
    """Two SD-style rows of 77: BOS, words, EOS, EOS padding (one short, one full)."""
    rng = np.random.default_rng(0)
    ids = np.full((2, 77), 49407, np.int64)
    ids[:, 0] = 49406
    ids[0, 1:8] = rng.integers(300, 49000, 7)
    ids[1, 1:76] = rng.integers(300, 49000, 75)
    return ids


@requires_reference
@pytest.mark.slow
@pytest.mark.parametrize(
    "name,cfg", [("sd15", SD15_TEXT), ("sd21", SD21_TEXT)], ids=["sd15", "sd21"]
)
def test_live_parity_real_config(name, cfg):
    import torch
    import transformers

    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    ids = _prompt_ids()
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    want_last = want.last_hidden_state.numpy()
    want_pool = want.pooler_output.numpy()
    want_skip = want.hidden_states[-2].numpy()
    del ref, want

    model = CLIPTextModel.from_config(cfg)
    params = model.params_from_state_dict(state)
    del state
    out = _run(model, params, ids)
    for got, exp, what in (
        (out.last_hidden_state, want_last, "last_hidden_state"),
        (out.pooler_output, want_pool, "pooler_output"),
        (out.hidden_states[-2], want_skip, "hidden_states[-2]"),
    ):
        err = relative_l2(got, exp)
        print(f"{name} {what}: fp32 relative L2 = {err:.2e}")
        assert err < RTOL_FP32, f"{name} {what}: relative L2 {err:.2e}"

    model16 = CLIPTextModel.from_config(cfg, dtype=jnp.bfloat16)
    params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    del params
    err16 = relative_l2(_run(model16, params16, ids, hidden=False).last_hidden_state, want_last)
    print(f"{name}: bf16 vs fp32 reference last_hidden_state relative L2 = {err16:.2e}")
    assert err16 < 5e-2  # bf16 rounding through 12-23 layers; see test_bf16_compute_close_to_fp32
