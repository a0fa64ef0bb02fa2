r"""Training data: image folders, ``.npz`` arrays, CIFAR-10 cats, and a deterministic batch order.

Sources (:func:`load_dataset`):

* a folder of images (any format PIL reads, searched recursively, in sorted order), each
  resized so its short side is ``resolution`` and center-cropped to a square;
* an ``.npz`` file holding uint8 images ``(N, H, W, C)`` under the key ``train`` (or as its only
  array);
* ``"cifar10-cats"``: the 5,000 cat images (class 3) of the CIFAR-10 training set
  (*Krizhevsky (2009)*), read from ``cifar10_cats_32.npz`` in ``$JAXDIFF_SHARED_DATA`` or
  ``<repo>/../shared/data`` when present, otherwise downloaded from the official archive and
  checksummed.

:class:`BatchIterator` gives the batch of any step as a pure function of ``(seed, step)``:
epoch ``e`` visits the images in the order of ``default_rng([seed, e]).permutation(N)`` and flips
each image horizontally with probability 1/2 drawn from ``default_rng([seed, e, 1])``. That is
what lets a resumed run see exactly the data an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CAT = 3
CATS_FILE = "cifar10_cats_32.npz"
DATASET_NAMES = ("cifar10-cats",)


class DatasetError(ValueError):
    """A training data source that cannot be used, with the reason and the file at fault."""


# ----------------------------------------------------------------------------- image folders
def _image_extensions() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Files under ``folder`` (recursive, sorted) whose extension PIL registers, hidden ones
    skipped."""
    root = Path(folder)
    exts = _image_extensions()
    files = [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in exts
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return files


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resizes so the short side is ``resolution`` (bicubic, antialiased), then center-crops a
    ``resolution x resolution`` square."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image_folder(
    folder: str | os.PathLike, resolution: int | None, resize: bool = True, channels: int = 3
) -> np.ndarray:
    """Every image of ``folder`` as uint8 ``(N, resolution, resolution, channels)``.

    Args:
        folder: the folder (searched recursively).
        resolution: the square size; required when ``resize``. With ``resize=False`` the
            images must already all share one size (square, equal to ``resolution`` if given).
        resize: resize + center-crop each image (else sizes must match).
        channels: 3 (RGB) or 1 (grayscale).

    Raises:
        DatasetError: no images; an image PIL cannot read (named); mixed sizes without resizing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"data folder {str(folder)!r} does not exist")
    files = list_image_files(folder)
    if not files:
        exts = ", ".join(
            sorted(
                e for e in _image_extensions() if e in {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
            )
        )
        raise DatasetError(f"data folder {str(folder)!r} holds no images (looked for {exts}, ...)")
    if resize and not resolution:
        raise DatasetError("resolution is required to resize the images of a folder")
    mode = {3: "RGB", 1: "L"}.get(channels)
    if mode is None:
        raise DatasetError(f"channels must be 1 or 3, got {channels}")
    arrays, sizes = [], {}
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                im = im.convert(mode)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DatasetError(f"cannot read image {str(path)!r}: {err}") from err
        if resize:
            im = resize_center_crop(im, resolution)
        else:
            sizes.setdefault(im.size, path)
        arr = np.asarray(im, dtype=np.uint8)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    if not resize:
        if len(sizes) > 1:
            listed = "; ".join(f"{w}x{h} (e.g. {p.name})" for (w, h), p in sorted(sizes.items()))
            raise DatasetError(
                f"images of {str(folder)!r} have different sizes ({listed}); resizing is off, so "
                "they must all be the same size (turn resizing on to resize and center-crop them)"
            )
        (w, h), path = next(iter(sizes.items()))
        if w != h or (resolution and w != resolution):
            want = f"{resolution}x{resolution}" if resolution else "square"
            raise DatasetError(
                f"images of {str(folder)!r} are {w}x{h} (e.g. {path.name}), expected {want}"
            )
    return np.stack(arrays)


# ----------------------------------------------------------------------------- npz files
def load_npz(path: str | os.PathLike, key: str = "train") -> np.ndarray:
    """uint8 images ``(N, H, W, C)`` from ``path`` (key ``key``, or the file's only array).
    Never unpickles: object arrays are refused."""
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            if key in names:
                arr = f[key]
            elif len(names) == 1:
                arr = f[names[0]]
            else:
                raise DatasetError(
                    f"{str(path)!r} holds the arrays {names}: expected one named {key!r} "
                    "or a single array"
                )
    except (OSError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"cannot read {str(path)!r} as an .npz of images: {err}") from err
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DatasetError(
            f"{str(path)!r}: expected images (N, H, W, C) with C in 1, 3, got shape {arr.shape}"
        )
    if arr.dtype != np.uint8:
        raise DatasetError(
            f"{str(path)!r}: expected uint8 images in [0, 255], got dtype {arr.dtype}"
        )
    return arr


def resize_array(images: np.ndarray, resolution: int) -> np.ndarray:
    """Resize + center-crop every image of a uint8 ``(N, H, W, C)`` array."""
    if images.shape[1] == images.shape[2] == resolution:
        return images
    out = []
    for im in images:
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        arr = np.asarray(resize_center_crop(pil, resolution))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out)


# ----------------------------------------------------------------------------- CIFAR-10 cats
def shared_data_dir() -> Path | None:
    """``$JAXDIFF_SHARED_DATA``, else ``<repo root>/../shared/data`` if it exists."""
    env = os.environ.get("JAXDIFF_SHARED_DATA")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def extract_cifar10_class(
    archive: str | os.PathLike, label: int = CIFAR10_CAT, split: str = "train"
) -> np.ndarray:
    r"""The images of one class from the official CIFAR-10 python archive, uint8 ``(N, 32, 32, 3)``.

    The archive (``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch``) stores each batch
    as a **pickled** dict with ``b"data"`` (N, 3072) uint8 rows in CHW order and ``b"labels"``.
    Reading it needs ``pickle``: this function is the one place in jaxdiff that unpickles, only
    for this archive, after :func:`download_cifar10` has verified its MD5 checksum. User files
    are never unpickled.
    """
    import pickle  # the official archive's format; see the docstring

    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    found: dict[str, np.ndarray] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if base in names and member.isfile():
                batch = pickle.load(io.BytesIO(tar.extractfile(member).read()), encoding="bytes")
                data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(batch[b"labels"])
                found[base] = data[labels == label].transpose(0, 2, 3, 1)
    missing = [n for n in names if n not in found]
    if missing:
        raise DatasetError(
            f"{str(archive)!r} is not the CIFAR-10 python archive: it lacks {missing}"
        )
    return np.concatenate([found[n] for n in names])


def download_cifar10(cache_dir: str | os.PathLike) -> Path:
    """Downloads the official CIFAR-10 python archive into ``cache_dir`` (once) and checks its
    MD5 (``CIFAR10_MD5``)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "cifar-10-python.tar.gz"
    if not path.is_file():
        tmp = path.with_suffix(".part")
        try:
            urllib.request.urlretrieve(CIFAR10_URL, tmp)
        except OSError as err:
            raise DatasetError(
                f"cannot download CIFAR-10 from {CIFAR10_URL} ({err}); put {CATS_FILE} in "
                "$JAXDIFF_SHARED_DATA or pass an image folder / .npz with --data"
            ) from err
        os.replace(tmp, path)
    digest = md5sum(path)
    if digest != CIFAR10_MD5:
        raise DatasetError(
            f"{str(path)!r} has MD5 {digest}, expected {CIFAR10_MD5}: delete it and retry"
        )
    return path


def load_cifar10_cats(
    split: str = "train", cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """The CIFAR-10 cats, uint8 ``(N, 32, 32, 3)``: from the shared ``cifar10_cats_32.npz`` when
    present, else downloaded (``cache_dir``, default ``~/.cache/jaxdiff``), checked and
    extracted (class 3); the extracted cats are cached as ``cifar10_cats_32.npz``."""
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    shared = shared_data_dir()
    if shared is not None and (shared / CATS_FILE).is_file():
        return load_npz(shared / CATS_FILE, key=split)
    cache = Path(cache_dir or Path.home() / ".cache" / "jaxdiff")
    cached = cache / CATS_FILE
    if not cached.is_file():
        archive = download_cifar10(cache)
        arrays = {s: extract_cifar10_class(archive, CIFAR10_CAT, s) for s in ("train", "test")}
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / (CATS_FILE + ".part.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cached)
    return load_npz(cached, key=split)


# ----------------------------------------------------------------------------- entry point
def load_dataset(
    source: str | os.PathLike,
    resolution: int | None,
    resize: bool = True,
    cache_dir: str | None = None,
) -> np.ndarray:
    """uint8 images ``(N, resolution, resolution, C)`` from a folder, an ``.npz`` or a dataset
    name (``"cifar10-cats"``).

    Raises:
        DatasetError: naming the source and what is wrong with it.
    """
    text = os.fspath(source)
    if text in DATASET_NAMES:
        images = load_cifar10_cats("train", cache_dir)
    elif os.path.isdir(text):
        return load_image_folder(text, resolution, resize=resize)
    elif text.endswith(".npz"):
        if not os.path.isfile(text):
            raise DatasetError(f"data file {text!r} does not exist")
        images = load_npz(text)
    else:
        raise DatasetError(
            f"--data {text!r} is neither an image folder, an .npz file nor a dataset name "
            f"({', '.join(DATASET_NAMES)})"
        )
    if resolution and images.shape[1:3] != (resolution, resolution):
        if not resize:
            raise DatasetError(
                f"{text!r} holds {images.shape[1]}x{images.shape[2]} images but resolution is "
                f"{resolution} and resizing is off"
            )
        images = resize_array(images, resolution)
    return images


class BatchIterator:
    r"""The batch of step ``s`` as a pure function of ``(seed, s)``.

    With :math:`N` images and batch :math:`B`, an epoch has :math:`\lfloor N/B \rfloor` steps
    (the remainder is dropped, a different one each epoch). Step ``s`` is step
    ``s mod (N // B)`` of epoch ``s // (N // B)``, whose order is
    ``default_rng([seed, epoch]).permutation(N)``; its flips come from
    ``default_rng([seed, epoch, 1])``.

    Args:
        images: uint8 ``(N, H, W, C)``.
        batch_size: B (at most N).
        seed: the data seed.
        flip: random horizontal flips (p = 1/2).
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, flip: bool = True):
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}"
            )
        if not 1 <= batch_size <= len(images):
            raise ValueError(
                f"batch_size must be between 1 and the {len(images)} images, got {batch_size}"
            )
        self.images = images
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.flip = flip
        self.steps_per_epoch = len(images) // self.batch_size
        self._epoch: int | None = None
        self._order = self._flips = None

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            n = len(self.images)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._flips = np.random.default_rng([self.seed, epoch, 1]).random(n) < 0.5
            self._epoch = epoch

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, flip mask) of step ``step``."""
        epoch, i = divmod(int(step), self.steps_per_epoch)
        self._set_epoch(epoch)
        sel = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        return sel, (self._flips[sel] if self.flip else np.zeros(len(sel), bool))

    def uint8_batch(self, step: int) -> np.ndarray:
        """The batch of step ``step`` as uint8 ``(B, H, W, C)``, flips applied."""
        sel, flips = self.indices(step)
        batch = self.images[sel]
        return np.where(flips[:, None, None, None], batch[:, :, ::-1], batch)

    def batch(self, step: int) -> np.ndarray:
        """The batch of step ``step`` as float32 ``(B, H, W, C)`` in [-1, 1]."""
        return self.uint8_batch(step).astype(np.float32) / 127.5 - 1.0


__all__ = [
    "BatchIterator",
    "DatasetError",
    "download_cifar10",
    "extract_cifar10_class",
    "load_cifar10_cats",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "resize_center_crop",
]
