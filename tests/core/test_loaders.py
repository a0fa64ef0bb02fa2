"""Weight-file discovery (variant, shards, pickle flag) and the strict key table."""

import json

import numpy as np
import pytest

from jaxdiff import hub
from jaxdiff.loaders import state_dict as sd
from jaxdiff.loaders.safetensors_io import save_file
from jaxdiff.loaders.weights import find_weight_files, read_state_dict


def _shapes(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.float32), tree)


PARAMS = {
    "conv_in": {"kernel": np.zeros((3, 3, 2, 4)), "bias": np.zeros(4)},
    "down_blocks_0": {"resnets_1": {"norm1": {"scale": np.zeros(4), "bias": np.zeros(4)}}},
    "time_embedding": {"linear_1": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)}},
}
LIST_NAMES = ("down_blocks", "resnets")


def test_key_table_is_explicit_and_mirrors_pytorch_names():
    table = sd.key_table(_shapes(PARAMS), LIST_NAMES)
    assert table[("conv_in", "kernel")] == ("conv_in.weight", "conv")
    assert table[("down_blocks_0", "resnets_1", "norm1", "scale")] == (
        "down_blocks.0.resnets.1.norm1.weight",
        "none",
    )
    # linear_1 is an attribute name in diffusers, not a list index
    assert table[("time_embedding", "linear_1", "kernel")] == (
        "time_embedding.linear_1.weight",
        "linear",
    )


def test_torch_to_flax_transposes_and_round_trips():
    rng = np.random.default_rng(0)
    torch_sd = {
        "conv_in.weight": rng.standard_normal((4, 2, 3, 3)),
        "conv_in.bias": rng.standard_normal(4),
        "down_blocks.0.resnets.1.norm1.weight": rng.standard_normal(4),
        "down_blocks.0.resnets.1.norm1.bias": rng.standard_normal(4),
        "time_embedding.linear_1.weight": rng.standard_normal((8, 4)),
        "time_embedding.linear_1.bias": rng.standard_normal(8),
    }
    params = sd.torch_to_flax(torch_sd, _shapes(PARAMS), LIST_NAMES)
    np.testing.assert_array_equal(
        params["conv_in"]["kernel"], torch_sd["conv_in.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["time_embedding"]["linear_1"]["kernel"], torch_sd["time_embedding.linear_1.weight"].T
    )
    back = sd.flax_to_torch(params, LIST_NAMES)
    assert back.keys() == torch_sd.keys()
    for k, v in torch_sd.items():
        np.testing.assert_array_equal(back[k], v)


def test_every_problem_is_reported_together():
    torch_sd = {
        "conv_in.weight": np.zeros((4, 2, 5, 5)),  # wrong kernel size
        "conv_in.bias": np.zeros(4),
        "down_blocks.0.resnets.1.norm1.weight": np.zeros(4),
        # norm1.bias missing
        "time_embedding.linear_1.weight": np.zeros((8, 4)),
        "time_embedding.linear_1.bias": np.zeros(8),
        "extra.weight": np.zeros(1),
    }
    with pytest.raises(sd.WeightLoadError) as info:
        sd.torch_to_flax(torch_sd, _shapes(PARAMS), LIST_NAMES, model_name="Toy")
    msg = str(info.value)
    assert "1 missing keys: down_blocks.0.resnets.1.norm1.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "conv_in.weight: file has [4, 2, 5, 5], model expects [4, 2, 3, 3]" in msg


def test_wrong_rank_is_a_shape_mismatch_and_convert_sees_flax_layout():
    torch_sd = {
        "conv_in.weight": np.zeros((4, 18)),  # a conv kernel flattened to 2-D
        "conv_in.bias": np.zeros(4),
        "down_blocks.0.resnets.1.norm1.weight": np.zeros(4),
        "down_blocks.0.resnets.1.norm1.bias": np.zeros(4),
        "time_embedding.linear_1.weight": np.zeros((8, 4)),
        "time_embedding.linear_1.bias": np.zeros(8),
    }
    with pytest.raises(sd.WeightLoadError, match=r"conv_in.weight: file has \[4, 18\], model "):
        sd.torch_to_flax(torch_sd, _shapes(PARAMS), LIST_NAMES)
    torch_sd["conv_in.weight"] = np.arange(72.0).reshape(4, 2, 3, 3)
    seen = []

    def convert(a):
        seen.append(a.shape)
        return a.astype(np.float16)

    params = sd.torch_to_flax(torch_sd, _shapes(PARAMS), LIST_NAMES, convert=convert)
    assert sorted(seen) == sorted(np.shape(v) for v in jax_leaves(PARAMS))
    assert params["conv_in"]["kernel"].dtype == np.float16
    np.testing.assert_array_equal(
        params["conv_in"]["kernel"], torch_sd["conv_in.weight"].transpose(2, 3, 1, 0)
    )


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _write(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)


def test_find_single_variant_and_sharded_files(tmp_path):
    unet = tmp_path / "unet"
    _write(unet / "diffusion_pytorch_model.safetensors", {"a": np.ones(2, np.float32)})
    _write(unet / "diffusion_pytorch_model.fp16.safetensors", {"a": np.ones(2, np.float16)})
    assert find_weight_files(tmp_path, "unet")[0].endswith("diffusion_pytorch_model.safetensors")
    fp16 = find_weight_files(tmp_path, "unet", variant="fp16")
    assert fp16[0].endswith("diffusion_pytorch_model.fp16.safetensors")
    assert read_state_dict(fp16)["a"].dtype == np.float16

    shard = tmp_path / "sharded"
    _write(
        shard / "diffusion_pytorch_model-00001-of-00002.safetensors", {"a": np.ones(2, np.float32)}
    )
    _write(
        shard / "diffusion_pytorch_model-00002-of-00002.safetensors", {"b": np.zeros(3, np.float32)}
    )
    (shard / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {
                    "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                    "b": "diffusion_pytorch_model-00002-of-00002.safetensors",
                },
            }
        )
    )
    files = find_weight_files(shard)
    assert len(files) == 2
    assert sorted(read_state_dict(files)) == ["a", "b"]


def test_missing_weights_say_what_was_tried(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(hub.HubFileNotFoundError) as info:
        find_weight_files(tmp_path)
    msg = str(info.value)
    assert "tried ['diffusion_pytorch_model.safetensors'" in msg
    assert "allow_pickle=True" in msg and "variant='fp16'" in msg


def test_pickle_needs_the_flag(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        read_state_dict([str(tmp_path / "model.bin")])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_from_pretrained_never_holds_the_weights_twice(tmp_path):
    """The weights are read tensor by tensor into their device arrays: the peak RSS of a load
    grows by about the weights' size, not twice it (a memory map of the whole file, converted
    all at once, kept every page resident next to the converted params)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux >= 4.0)
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak RSS")
    import jax

    from jaxdiff import UNet2DModel

    model = UNet2DModel(
        sample_size=8,
        block_out_channels=(384, 768),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    shapes = model.param_shapes()
    params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
    model.save_pretrained(tmp_path, params)
    size_kib = sum(a.nbytes for a in jax.tree_util.tree_leaves(params)) // 1024
    assert size_kib > 200 * 1024  # large enough to stand out of the allocator's noise
    del params
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS")
    _, loaded = UNet2DModel.from_pretrained(tmp_path)
    jax.block_until_ready(loaded)
    grew = _rss_kib("VmHWM") - before
    print(f"peak RSS grew {grew} KiB for {size_kib} KiB of weights")
    assert grew < 1.4 * size_kib, (grew, size_kib)
    assert float(loaded["conv_in"]["kernel"][0, 0, 0, 0]) == 0.5
