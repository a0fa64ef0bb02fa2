"""LoRA adapters on the tiny SD pipeline: against diffusers (UNet, its own ``load_lora_weights``
and ``fuse_lora``) and peft (text encoder), plus the merge math, the adapter API and errors.

The reference LoRA files are made in-process with peft on the tiny pipeline (random A and B,
``init_lora_weights=False``). diffusers 0.42 loads text-encoder LoRAs through transformers 5,
which asks for peft >= 0.22 (not on PyPI here), so the text encoder's reference is peft itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxdiff.loaders.lora import LoraLoadError, delta, lora_targets
from jaxdiff.loaders.safetensors_io import save_file
from tests.pipelines.sd_helpers import diffusers_sd_pipe

# one pipeline and one set of reference LoRA files: keep the tests on one worker
pytestmark = pytest.mark.xdist_group("lora")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut"]  # fmt: skip
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
KOHYA_UNET_ALPHA, KOHYA_TE_ALPHA = 3.0, 1.0  # ranks 4 and 2: scales 0.75 and 0.5


@pytest.fixture()
def pipe(shared_pipe):
    """One pipeline (one compiled program) for the module; each test starts without LoRAs."""
    params = dict(shared_pipe.params)
    yield shared_pipe
    shared_pipe.unload_lora_weights()
    shared_pipe.params.update(params)


def _kohya(peft_state: dict, prefix: str, alpha: float) -> dict:
    """PEFT keys ``<module>.lora_A.weight`` -> kohya-ss ``<prefix><module_>.lora_down.weight``."""
    out = {}
    for key, value in peft_state.items():
        module, _, role = key.rpartition(".lora_")
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.float32(alpha)
    return out


@pytest.fixture(scope="module")
def lora_files(sd_dir, tmp_path_factory):
    """LoRA files made with peft: ``peft`` (UNet, diffusers' own save_lora_weights, r=4,
    alpha=8 in its metadata), ``kohya_unet`` (the same factors, kohya keys, alpha 3) and
    ``kohya`` (UNet + text encoder, text_model_ names as kohya writes them)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        sd_dir, safety_checker=None, requires_safety_checker=False
    )
    torch.manual_seed(0)
    ucfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS)
    tcfg = peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=TE_TARGETS)
    ref.unet.add_adapter(ucfg)
    peft.inject_adapter_in_model(tcfg, ref.text_encoder)
    unet = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(ref.unet).items()}
    te = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(ref.text_encoder).items()}
    root = tmp_path_factory.mktemp("lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root / "peft",
        unet_lora_layers={k: torch.from_numpy(v) for k, v in unet.items()},
        unet_lora_adapter_metadata=ucfg.to_dict(),
    )
    kohya_unet = _kohya(unet, "lora_unet_", KOHYA_UNET_ALPHA)
    save_file(kohya_unet, root / "kohya_unet.safetensors")
    kohya = {**kohya_unet, **_kohya(te, "lora_te_text_model_", KOHYA_TE_ALPHA)}
    save_file(kohya, root / "kohya.safetensors")
    return {
        "peft": root / "peft",
        "kohya_unet": root / "kohya_unet.safetensors",
        "kohya": root / "kohya.safetensors",
        "te_state": te,
    }


# ------------------------------------------------------------------ parity
@pytest.mark.parity
@pytest.mark.parametrize("fmt", ["peft", "kohya_unet"])
def test_fused_unet_weights_match_diffusers(sd_dir, pipe, lora_files, fmt):
    ref = diffusers_sd_pipe(sd_dir)
    base = {k: v.numpy().copy() for k, v in ref.unet.state_dict().items()}
    ref.load_lora_weights(str(lora_files[fmt]))
    ref.fuse_lora(components=["unet"], lora_scale=0.7)
    ref.unload_lora_weights()
    want = {k: v.numpy() for k, v in ref.unet.state_dict().items()}

    pipe.load_lora_weights(lora_files[fmt])
    pipe.fuse_lora(components=["unet"], lora_scale=0.7)
    pipe.unload_lora_weights()
    got = pipe.unet.state_dict(pipe.params["unet"])
    assert sorted(got) == sorted(want)
    changed = [k for k in want if not np.array_equal(want[k], base[k])]
    assert sorted(changed) == sorted(lora_targets_in(want, UNET_TARGETS))  # every target moved
    for k in want:  # fp32 B A on both sides; the factors are O(1), so agree to ~1e-6
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def lora_targets_in(state: dict, targets: list[str]) -> list[str]:
    """The weight keys of ``state`` whose module ends with one of ``targets``."""
    return [
        k
        for k in state
        if k.endswith(".weight") and any(k[: -len(".weight")].endswith(t) for t in targets)
    ]


@pytest.mark.parity
def test_text_encoder_lora_matches_peft(sd_dir, pipe, lora_files):
    """kohya ``lora_te_text_model_*`` keys, alpha 1 at rank 2, against peft's merge."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict

    ref = diffusers_sd_pipe(sd_dir)
    cfg = peft.LoraConfig(r=2, lora_alpha=KOHYA_TE_ALPHA, target_modules=TE_TARGETS)
    peft.inject_adapter_in_model(cfg, ref.text_encoder)
    state = {k: torch.from_numpy(v) for k, v in lora_files["te_state"].items()}
    set_peft_model_state_dict(ref.text_encoder, state)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        want_hidden = ref.text_encoder(ids).last_hidden_state.numpy()
        for module in ref.text_encoder.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    want = {
        "text_model." + k.replace("base_layer.", ""): v.numpy()
        for k, v in ref.text_encoder.state_dict().items()
        if "lora_" not in k
    }

    pipe.load_lora_weights(lora_files["kohya"])
    params = pipe._lora_params(("text_encoder",), 1.0)["text_encoder"]
    hidden = pipe.text_encoder.apply({"params": params}, jnp.asarray(ids.numpy())).last_hidden_state
    np.testing.assert_allclose(np.asarray(hidden), want_hidden, rtol=1e-4, atol=1e-5)
    got = pipe.text_encoder.state_dict(params)
    base = pipe.text_encoder.state_dict(pipe.params["text_encoder"])
    assert sorted(k for k in got if k in want) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    moved = [k for k in got if not np.array_equal(got[k], base[k])]
    layers = pipe.text_encoder.config.num_hidden_layers
    assert len(moved) == 6 * layers  # q, k, v, out, fc1, fc2 in each layer


@pytest.mark.parity
def test_two_adapters_with_weights_and_scale_match_diffusers(sd_dir, pipe, lora_files):
    """The unfused path: two adapters, set_adapters weights and cross_attention_kwargs."""
    torch = pytest.importorskip("torch")
    ref = diffusers_sd_pipe(sd_dir)
    ref.load_lora_weights(str(lora_files["peft"]), adapter_name="a")
    ref.load_lora_weights(str(lora_files["kohya_unet"]), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.6, -0.3])
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=3, output_type="np", cross_attention_kwargs={"scale": 0.5})
    prompts = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        want = ref(
            prompts, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), **kw
        ).images
        plain = ref(
            prompts,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            num_inference_steps=3,
            output_type="np",
            cross_attention_kwargs={"scale": 0.0},
        ).images

    pipe.load_lora_weights(lora_files["peft"], adapter_name="a")
    pipe.load_lora_weights(lora_files["kohya_unet"], adapter_name="b")
    assert pipe.get_active_adapters() == ["b"]  # as diffusers: the newest one
    pipe.set_adapters(["a", "b"], adapter_weights=[0.6, -0.3])
    got = pipe(prompts, latents=latents, seed=0, progress=False, **kw).images
    assert np.abs(want - plain).mean() > 2 / 255  # the LoRA moves the images past the bound
    assert np.abs(got - want).max() <= 2 / 255
    assert np.abs(np.round(got * 255) - np.round(want * 255)).mean() <= 1.0
    assert pipe.get_list_adapters() == {"unet": ["a", "b"]}


# ------------------------------------------------------------------ without torch
def _synthetic_lora(pipe, rng, kohya=False, rank=3):
    """Random factors for a linear, a 1x1-conv and a 3x3-conv UNet module and a text-encoder
    projection, in PEFT or kohya-ss keys."""
    modules = {
        "unet": [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "down_blocks.0.attentions.0.proj_in",
            "up_blocks.1.resnets.0.conv1",
        ],
        "text_encoder": ["text_model.encoder.layers.1.mlp.fc2"],
    }
    state = {}
    for comp, names in modules.items():
        targets = lora_targets(getattr(pipe, comp))
        for name in names:
            _, _, shape = targets[name]
            down = rng.standard_normal((rank, *shape[1:])).astype(np.float32)
            up = rng.standard_normal((shape[0], rank) + (1,) * (len(shape) - 2)).astype(np.float32)
            if kohya:
                flat = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[comp] + name.replace(".", "_")  # fmt: skip
                state |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up}
                state[f"{flat}.alpha"] = np.float32(rank)
            else:
                state |= {f"{comp}.{name}.lora_A.weight": down, f"{comp}.{name}.lora_B.weight": up}
    return state, modules


def test_merge_is_w_plus_scaled_ba_in_flax_layout(pipe):
    state, modules = _synthetic_lora(pipe, np.random.default_rng(0))
    pipe.load_lora_weights(state)
    pipe.fuse_lora(lora_scale=0.25)
    for comp, names in modules.items():
        model = getattr(pipe, comp)
        fused = model.state_dict(pipe.params[comp])
        base = model.state_dict(_unfused(pipe, comp))
        for name in names:
            a = state[f"{comp}.{name}.lora_A.weight"]
            b = state[f"{comp}.{name}.lora_B.weight"]
            ba = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(fused[name + ".weight"].shape)  # fmt: skip
            np.testing.assert_allclose(
                fused[name + ".weight"], base[name + ".weight"] + 0.25 * ba, rtol=1e-5, atol=1e-5
            )
        untouched = set(fused) - {n + ".weight" for n in names}
        assert all(np.array_equal(fused[k], base[k]) for k in untouched)


def _unfused(pipe, comp):
    flat = traverse_util.flatten_dict(pipe.params[comp])
    return traverse_util.unflatten_dict({**flat, **pipe._lora_state()["originals"][comp]})


def test_delta_matches_numpy_for_linear_and_conv():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 5)), rng.standard_normal((3, 2))
    np.testing.assert_allclose(delta(jnp.asarray(a), jnp.asarray(b), (3, 5), "linear"), (b @ a).T, rtol=1e-6)  # fmt: skip
    a, b = rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((6, 2, 1, 1))
    want = np.einsum("or,rihw->oihw", b[:, :, 0, 0], a).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    np.testing.assert_allclose(delta(jnp.asarray(a), jnp.asarray(b), (6, 4, 3, 3), "conv"), want, rtol=1e-5, atol=1e-6)  # fmt: skip


def test_kohya_and_peft_keys_give_the_same_params(pipe):
    state, _ = _synthetic_lora(pipe, np.random.default_rng(2))
    kohya, _ = _synthetic_lora(pipe, np.random.default_rng(2), kohya=True)
    names = ("unet", "text_encoder")
    pipe.load_lora_weights(state)
    want = pipe._lora_params(names, 0.8)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(kohya)  # alpha = rank: scale 1, as PEFT without metadata
    got = pipe._lora_params(names, 0.8)
    assert got is not want
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fuse_unfuse_unload_and_disable(pipe):
    base = jax.tree_util.tree_map(np.asarray, pipe.params)
    kw = dict(num_inference_steps=2, output_type="np", progress=False, seed=0)
    plain = pipe("a cat", **kw).images
    pipe.load_lora_weights(_synthetic_lora(pipe, np.random.default_rng(3))[0], adapter_name="x")
    live = pipe("a cat", **kw).images
    assert np.abs(live - plain).max() > 1e-3
    pipe.disable_lora()
    np.testing.assert_array_equal(pipe("a cat", **kw).images, plain)
    pipe.enable_lora()
    pipe.fuse_lora()
    np.testing.assert_allclose(pipe("a cat", **kw).images, live, atol=1e-6)  # not applied twice
    pipe.unfuse_lora()
    for x, y in zip(jax.tree_util.tree_leaves(pipe.params), jax.tree_util.tree_leaves(base), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(x), y)  # bit for bit
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    half = pipe("a cat", **kw).images  # the fused weights stay
    assert np.abs(half - plain).max() > 1e-4 and np.abs(half - live).max() > 1e-4


def test_text_encoder_lora_reaches_the_text_encoded_beside_prompt_embeds(pipe):
    """With prompt_embeds under guidance, the negative side ("" by default) is encoded by the
    text encoder with its LoRA, as diffusers' encode_prompt (it was encoded without it)."""
    from jaxdiff.utils.tokenizer import tokenize

    pipe.load_lora_weights(_synthetic_lora(pipe, np.random.default_rng(7))[0])
    te = pipe._lora_params(("text_encoder",), 0.5)["text_encoder"]

    def embed(text):
        ids = jnp.asarray(tokenize(pipe.tokenizer, [text]))
        return np.asarray(pipe.text_encoder.apply({"params": te}, ids).last_hidden_state)

    kw = dict(num_inference_steps=2, output_type="np", progress=False, seed=0)
    kw["cross_attention_kwargs"] = {"scale": 0.5}
    want = pipe("a cat", **kw).images
    np.testing.assert_allclose(pipe(prompt_embeds=embed("a cat"), **kw).images, want, atol=1e-5)
    got = pipe("a cat", negative_prompt_embeds=embed(""), **kw).images
    np.testing.assert_allclose(got, want, atol=1e-5)
    want = pipe("a cat", negative_prompt="ugly", **kw).images
    got = pipe(prompt_embeds=embed("a cat"), negative_prompt="ugly", **kw).images
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_new_scale_weights_and_adapters_do_not_recompile(pipe):
    pipe._jit_cache.clear()
    kw = dict(num_inference_steps=2, output_type="np", progress=False, seed=0)
    pipe("a cat", **kw)
    pipe.load_lora_weights(_synthetic_lora(pipe, np.random.default_rng(4))[0], adapter_name="x")
    a = pipe("a cat", cross_attention_kwargs={"scale": 0.3}, **kw).images
    programs = sum(f._cache_size() for f in pipe._jit_cache.values())
    b = pipe("a cat", cross_attention_kwargs={"scale": 0.9}, **kw).images
    pipe.load_lora_weights(_synthetic_lora(pipe, np.random.default_rng(5))[0], adapter_name="y")
    pipe.set_adapters(["x", "y"], [0.5, {"unet": 0.2, "text_encoder": 1.0}])
    c = pipe("a cat", **kw).images
    assert sum(f._cache_size() for f in pipe._jit_cache.values()) == programs == 1
    assert np.abs(a - b).max() > 1e-4 and np.abs(b - c).max() > 1e-4


def test_lora_errors(pipe, tmp_path):
    good, _ = _synthetic_lora(pipe, np.random.default_rng(6))
    k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    bad = dict(good)
    bad["unet.down_blocks.9.nothing.lora_A.weight"] = np.zeros((3, 4), np.float32)
    bad["unet.down_blocks.9.nothing.lora_B.weight"] = np.zeros((4, 3), np.float32)
    del bad[f"{k}.lora_B.weight"]
    bad["unet.mid_block.attentions.0.proj_in.lora_magnitude_vector"] = np.zeros(4, np.float32)
    bad["unet.up_blocks.1.resnets.0.conv1.lokr_w1"] = np.zeros(4, np.float32)
    with pytest.raises(LoraLoadError) as err:
        pipe.load_lora_weights(bad)
    msg = str(err.value)
    for part in ("down_blocks.9.nothing: the model has no such module", f"{k[5:]}: has ['down']",
                 "DoRA is not supported", "LoKr is not supported"):  # fmt: skip
        assert part in msg
    wrong = {f"{k}.lora_A.weight": np.zeros((3, 7), np.float32), f"{k}.lora_B.weight": np.zeros((16, 3), np.float32)}  # fmt: skip
    with pytest.raises(LoraLoadError, match=r"attn2.to_k: B A is 16 x 7 but the weight is \[16, 16\]"):  # fmt: skip
        pipe.load_lora_weights(wrong)
    assert pipe.get_list_adapters() == {}  # nothing half-loaded
    pipe.load_lora_weights(good, adapter_name="g")
    with pytest.raises(ValueError, match="'g' is already loaded"):
        pipe.load_lora_weights(good, adapter_name="g")
    with pytest.raises(ValueError, match=r"\['nope'\] are not loaded"):
        pipe.set_adapters(["g", "nope"])
    with pytest.raises(ValueError, match="adapter_weights has 2 entries for 1 adapters"):
        pipe.set_adapters("g", [1.0, 2.0])
    with pytest.raises(ValueError, match="cross_attention_kwargs takes only"):
        pipe("a cat", num_inference_steps=2, cross_attention_kwargs={"foo": 1}, seed=0)
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "a.safetensors")
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "b.safetensors")
    with pytest.raises(FileNotFoundError, match="pass weight_name"):
        pipe.load_lora_weights(tmp_path)
    (tmp_path / "old.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pass allow_pickle=True"):
        pipe.load_lora_weights(tmp_path / "old.bin")
    (tmp_path / "notes.txt").write_text("a cat")
    with pytest.raises(ValueError, match="notes.txt is not a LoRA checkpoint: expected a"):
        pipe.load_lora_weights(tmp_path / "notes.txt")


def test_cli_lora_equals_the_fused_pipeline(pipe, sd_dir, tmp_path, capsys):
    from PIL import Image

    from jaxdiff.cli import main as cli_main

    state, _ = _synthetic_lora(pipe, np.random.default_rng(7), kohya=True)
    save_file(state, tmp_path / "style.safetensors")
    base = ["generate", "a cat", "--model", str(sd_dir), "--steps", "2", "--batch", "1",
            "--scheduler", "ddim", "--no-progress", "--lora", str(tmp_path / "style.safetensors")]  # fmt: skip
    assert cli_main([*base, "--lora-scale", "0.5", "--out", str(tmp_path / "a.png")]) == 0
    got = np.asarray(Image.open(tmp_path / "a.png"))
    pipe.load_lora_weights(state)
    want = pipe("a cat", num_inference_steps=2, seed=0, progress=False,
                cross_attention_kwargs={"scale": 0.5}).images[0]  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(want))
    plain = pipe("a cat", num_inference_steps=2, seed=0, progress=False,
                 cross_attention_kwargs={"scale": 0.0}).images[0]  # fmt: skip
    assert np.abs(got.astype(int) - np.asarray(plain, dtype=int)).max() > 0
    assert cli_main([*base, "--lora-scale", "0.5,1,2", "--out", str(tmp_path / "b.png")]) == 2
    assert "--lora-scale takes one value or one per --lora (1), got 3" in capsys.readouterr().err
