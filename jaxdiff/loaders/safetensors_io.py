"""safetensors files <-> dicts of numpy arrays, with clear errors, bf16 included.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"}``,
then the raw little-endian tensor bytes. jaxdiff reads it itself so that a truncated or corrupt
file is reported by name, and bf16 (via ``ml_dtypes``, a jax dependency) needs no torch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: truncated, corrupt or of an unknown dtype."""


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Returns (header dict, byte offset where tensor data starts)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path} is not a safetensors file: it has only {size} bytes")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(
                f"{path} is truncated or corrupt: its header claims {n} bytes but the file "
                f"has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsError(f"{path} is corrupt: its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} is corrupt: its header is not a JSON object")
    return header, 8 + n


def _tensors(path: str) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    """The checked table of a file: ``name -> (dtype, shape, start, end)``, byte offsets from
    the beginning of the file.

    Raises:
        SafetensorsError: the file is truncated, corrupt, or holds an unsupported dtype.
    """
    header, start = read_header(path)
    size = os.path.getsize(path)
    header.pop("__metadata__", None)
    table = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsError(
                f"{path} is corrupt or uses an unsupported dtype: tensor {name!r} has header "
                f"{info!r}; supported dtypes are {sorted(_DTYPES)}"
            ) from err
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or start + end > size:
            raise SafetensorsError(
                f"{path} is truncated or corrupt: tensor {name!r} ({info['dtype']} {list(shape)}) "
                f"needs bytes {begin}..{end} of the data section, which has {size - start}"
            )
        table[name] = (dtype, shape, start + begin, start + end)
    return table


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a safetensors file as a numpy array (memory-mapped, read-only).

    Raises:
        SafetensorsError: the file is truncated, corrupt, or holds an unsupported dtype.
    """
    path = os.fspath(path)
    table = _tensors(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {
        name: data[begin:end].view(dtype).reshape(shape)
        for name, (dtype, shape, begin, end) in table.items()
    }


class LazyTensor:
    """One tensor of a safetensors file, read from disk only when converted with
    ``np.asarray`` (each time: nothing is cached). ``shape``, ``ndim`` and ``dtype`` need no
    read. Loaders convert tensor by tensor, so a model's weights are never in memory twice (a
    memory map keeps every page it has read resident until it is closed)."""

    def __init__(self, path: str, dtype: np.dtype, shape: tuple[int, ...], offset: int):
        self.path, self.dtype, self.shape, self.offset = path, dtype, shape, offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = np.fromfile(f, dtype=self.dtype, count=count)
        if data.size != count:
            raise SafetensorsError(f"{self.path} changed or was truncated while being read")
        data = data.reshape(self.shape)
        return data if dtype is None else data.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor({self.path!r}, {self.dtype}, {list(self.shape)})"


def open_file(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file as a :class:`LazyTensor` (the header is checked now,
    the data is read on use).

    Raises:
        SafetensorsError: the file is truncated, corrupt, or holds an unsupported dtype.
    """
    path = os.fspath(path)
    table = _tensors(path)
    return {
        name: LazyTensor(path, dtype, shape, begin)
        for name, (dtype, shape, begin, _) in table.items()
    }


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes numpy (or jax) arrays as a safetensors file that torch/safetensors can read.

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(
            "save_file(tensors, path): tensors must be a dict of {name: array}, got "
            f"{type(tensors).__name__}"
        )
    bad = [k for k in tensors if not isinstance(k, str) or k == "__metadata__"]
    if bad:
        raise TypeError(
            f"save_file: tensor names must be strings (other than '__metadata__'), got {bad[0]!r}"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"save_file(tensors, path): path must be a file path, got {type(path).__name__}"
        )
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(
            f"save_file: metadata must be a dict of strings or None, got {type(metadata).__name__}"
        )
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"save_file: path {path!r} is a folder, expected a file name")
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = {}
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype.newbyteorder("<") != arr.dtype and arr.dtype.itemsize > 1:
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        key = np.dtype(arr.dtype).newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        if key not in _NAMES:
            raise TypeError(
                f"tensor {name!r} has dtype {arr.dtype}, which safetensors cannot store"
            )
        header[name] = {
            "dtype": _NAMES[key],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        arrays[name] = arr
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as safetensors does
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in sorted(arrays):
                f.write(arrays[name].tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
