"""jaxdiff.loaders.safetensors_io against the safetensors library, and its error messages."""

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.loaders.safetensors_io import (
    LazyTensor,
    SafetensorsError,
    load_file,
    open_file,
    save_file,
)


def test_round_trip_with_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float16),
        "c": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 2), np.float32),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    theirs = safetensors.numpy.load_file(str(path))
    ours = load_file(path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
        np.testing.assert_array_equal(ours[k], v)
        assert ours[k].dtype == v.dtype
    other = tmp_path / "y.safetensors"
    safetensors.numpy.save_file(tensors, str(other))
    for k, v in load_file(other).items():
        np.testing.assert_array_equal(v, tensors[k])


def test_bfloat16(tmp_path):
    x = np.linspace(-2, 2, 7).astype(ml_dtypes.bfloat16)
    save_file({"x": x}, tmp_path / "b.safetensors")
    y = load_file(tmp_path / "b.safetensors")["x"]
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y.astype(np.float32), x.astype(np.float32))


def test_open_file_reads_each_tensor_lazily(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "half": rng.standard_normal(5).astype(np.float16),
        "bf": np.linspace(-1, 1, 6).astype(ml_dtypes.bfloat16).reshape(2, 3),
        "ids": np.arange(4, dtype=np.int64),
        "empty": np.zeros((0, 2), np.float32),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    lazy = open_file(path)
    assert lazy.keys() == tensors.keys()
    for k, v in tensors.items():
        t = lazy[k]
        assert isinstance(t, LazyTensor)
        assert (t.shape, t.ndim, t.dtype) == (v.shape, v.ndim, v.dtype)
        assert np.shape(t) == v.shape and np.ndim(t) == v.ndim
        got = np.asarray(t)
        assert got.dtype == v.dtype
        np.testing.assert_array_equal(got, v)
    np.testing.assert_array_equal(np.asarray(lazy["half"], np.float32), tensors["half"])
    # The data is read on use: a file cut after opening is still reported by name.
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(SafetensorsError, match=r"x.safetensors changed or was truncated"):
        np.asarray(lazy["conv.weight"])


@pytest.mark.parametrize("read", [load_file, open_file])
def test_truncated_file_is_named(tmp_path, read):
    path = tmp_path / "t.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match=r"t.safetensors is truncated or corrupt.*'w'"):
        read(path)


def test_corrupt_header_is_named(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage}")
    with pytest.raises(SafetensorsError, match="c.safetensors is corrupt"):
        load_file(path)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="only 3 bytes"):
        load_file(tiny)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(SafetensorsError, match="header claims"):
        load_file(huge)


def test_bad_arguments_raise_before_anything_is_written(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones(2, np.float32)}, path)
    before = path.read_bytes()
    x = np.zeros(2, np.float32)
    for args, error, match in [
        (({1: x}, path), TypeError, r"tensor names must be strings .* got 1"),
        (({"__metadata__": x}, path), TypeError, "tensor names must be strings"),
        ((str(path), {"a": x}), TypeError, r"save_file\(tensors, path\): tensors must be a dict"),
        (({"a": x}, {"b": x}), TypeError, "path must be a file path, got dict"),
        (({"a": x}, path, "pt"), TypeError, "metadata must be a dict of strings or None"),
        (({"a": x}, tmp_path), IsADirectoryError, "is a folder, expected a file name"),
    ]:
        with pytest.raises(error, match=match):
            save_file(*args)
    assert path.read_bytes() == before  # the earlier file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temp files
