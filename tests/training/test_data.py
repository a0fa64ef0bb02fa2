"""Data sources, their errors, the CIFAR-10 extraction and the deterministic batch order."""

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from jaxdiff.training import data as data_lib
from jaxdiff.training.data import BatchIterator, DatasetError, load_dataset


def _save(path, size, color=(200, 30, 10)):
    Image.new("RGB", size, color).save(path)


def test_folder_resize_center_crop(tmp_path):
    im = np.zeros((20, 40, 3), np.uint8)
    im[:, 10:30] = 255  # the central 20x20 square is white, the sides black
    Image.fromarray(im).save(tmp_path / "wide.png")
    _save(tmp_path / "b.bmp", (16, 16))
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    out = load_dataset(tmp_path, 10)
    assert out.shape == (2, 10, 10, 3) and out.dtype == np.uint8
    # files in sorted order: b.bmp, wide.png; the crop of wide.png keeps its white centre (the
    # bicubic kernel reaches one pixel into the black sides: the border columns stay > 200)
    assert out[1, :, 1:-1].min() == 255 and out[1].min() > 200
    assert (out[0] == (200, 30, 10)).all()


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="holds no images"):
        load_dataset(tmp_path, 8)


def test_unreadable_image_is_named(tmp_path):
    _save(tmp_path / "good.png", (8, 8))
    (tmp_path / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        load_dataset(tmp_path, 8)


def test_mixed_sizes_without_resize(tmp_path):
    _save(tmp_path / "a.png", (8, 8))
    _save(tmp_path / "b.png", (12, 12))
    with pytest.raises(
        DatasetError, match=r"different sizes \(8x8 \(e.g. a.png\); 12x12 \(e.g. b.png\)\)"
    ):
        load_dataset(tmp_path, 8, resize=False)
    # with resizing on the same folder loads
    assert load_dataset(tmp_path, 8).shape == (2, 8, 8, 3)


def test_npz_sources(tmp_path):
    imgs = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "one.npz", anything=imgs)
    np.savez(tmp_path / "two.npz", train=imgs, test=imgs[:1])
    np.savez(tmp_path / "bad.npz", a=imgs, b=imgs)
    np.testing.assert_array_equal(load_dataset(tmp_path / "one.npz", 4), imgs)
    np.testing.assert_array_equal(load_dataset(tmp_path / "two.npz", 4), imgs)
    assert load_dataset(tmp_path / "two.npz", 8).shape == (2, 8, 8, 3)
    with pytest.raises(DatasetError, match="expected one named 'train'"):
        load_dataset(tmp_path / "bad.npz", 4)
    with pytest.raises(DatasetError, match="resizing is off"):
        load_dataset(tmp_path / "two.npz", 8, resize=False)
    np.savez(tmp_path / "float.npz", train=imgs.astype(np.float32))
    with pytest.raises(DatasetError, match="expected uint8"):
        load_dataset(tmp_path / "float.npz", 4)
    with pytest.raises(DatasetError, match="neither an image folder"):
        load_dataset(tmp_path / "nope", 4)


def _fake_cifar_archive(path, rng):
    """The official layout: cifar-10-batches-py/{data_batch_1..5,test_batch}, pickled dicts
    with b"data" (N, 3072) uint8 CHW rows and b"labels"."""
    expected = {"train": [], "test": []}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
            labels = [3, 1, 3, 0, 9, 3]
            blob = pickle.dumps({b"data": data, b"labels": labels, b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            cats = data[np.array(labels) == 3].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            expected["test" if name == "test_batch" else "train"].append(cats)
    return {k: np.concatenate(v) for k, v in expected.items()}


def test_cifar10_cat_extraction(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    archive = tmp_path / "cifar-10-python.tar.gz"
    expected = _fake_cifar_archive(archive, rng)
    train = data_lib.extract_cifar10_class(archive, 3, "train")
    assert train.shape == (15, 32, 32, 3)  # 3 cats in each of 5 batches
    np.testing.assert_array_equal(train, expected["train"])
    np.testing.assert_array_equal(
        data_lib.extract_cifar10_class(archive, 3, "test"), expected["test"]
    )

    # the download path: no shared data, the archive "downloaded" is checked by MD5 first
    monkeypatch.setattr(data_lib, "shared_data_dir", lambda: None)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    with pytest.raises(DatasetError, match="has MD5 .* expected c58f30108f718f92721af3b95e74349a"):
        data_lib.load_cifar10_cats("train", cache_dir=cache)
    monkeypatch.setattr(data_lib, "CIFAR10_MD5", data_lib.md5sum(archive))
    np.testing.assert_array_equal(
        data_lib.load_cifar10_cats("train", cache_dir=cache), expected["train"]
    )
    assert (cache / "cifar10_cats_32.npz").is_file()  # extracted once, then read from the cache


def test_cifar10_archive_missing_batches(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz"):
        pass
    with pytest.raises(DatasetError, match="not the CIFAR-10 python archive"):
        data_lib.extract_cifar10_class(path)


def test_batch_order_is_a_function_of_seed_and_step():
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    a, b = BatchIterator(images, 4, seed=7), BatchIterator(images, 4, seed=7)
    seq = [a.uint8_batch(s) for s in range(7)]  # 2 steps per epoch (10 // 4), 2 images dropped
    # random access (a fresh iterator jumping to step 5, as a resumed run does) gives the same
    np.testing.assert_array_equal(b.uint8_batch(5), seq[5])
    # an epoch visits distinct images
    idx0, _ = a.indices(0)
    idx1, _ = a.indices(1)
    assert len(set(idx0) | set(idx1)) == 8
    # flips: flipped images are the mirror of the stored ones
    sel, flips = a.indices(3)
    np.testing.assert_array_equal(a.uint8_batch(3)[flips], images[sel][flips][:, :, ::-1])
    np.testing.assert_array_equal(a.uint8_batch(3)[~flips], images[sel][~flips])
    assert flips.any() or BatchIterator(images, 4, seed=8).indices(3)[1].any()
    f = a.batch(2)
    assert f.dtype == np.float32 and f.min() >= -1 and f.max() <= 1
    assert not np.array_equal(BatchIterator(images, 4, seed=8).uint8_batch(0), seq[0])
    with pytest.raises(ValueError, match="batch_size must be between 1 and the 10 images"):
        BatchIterator(images, 11, seed=0)
