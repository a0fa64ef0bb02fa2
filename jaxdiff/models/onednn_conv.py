"""oneDNN convolutions on the CPU, as XLA custom calls (opt-in).

XLA:CPU (jaxlib 0.10) runs 3x3 convolutions with Eigen or YNNPACK; PyTorch runs them with
oneDNN, which is 1.1-1.4x faster at most UNet and VAE shapes on the AMD Zen 5 VM of
``benchmarks/results`` (fp32, NHWC). jaxlib ships no way to hand convolutions to oneDNN
(``benchmarks/README.md``, "oneDNN through XLA"), so jaxdiff can: ``csrc/onednn_conv.cc``
defines three XLA FFI handlers (forward, input gradient, weight gradient) over the system's
oneDNN, compiled with ``g++`` on first use and cached.

Turn it on before tracing anything::

    jaxdiff.use_onednn_convolutions()      # or JAXDIFF_ONEDNN=1 in the environment

after which every float32 ``Conv2d`` with a k x k kernel (k > 1) traced on the CPU calls oneDNN
when its batch has at least ``MIN_OUTPUT_PIXELS`` output pixels. Below that the kernel
reorder dominates: each call reorders the HWIO kernel into oneDNN's blocked layout (14.5 ms
for a 1280 -> 1280 3x3 kernel, 59 MB), and a 3x3 1280 -> 1280 convolution on 2 x 16 x 16
(512 output pixels) took 1.5x Eigen's time, on 2 x 8 x 8 2.5x; from 1,024 pixels up
(16 x 8 x 8 at 256-512 channels, SD 1.5's 32 x 32 and 64 x 64 levels at batch 2, the VAE) oneDNN
took 0.83-0.93x Eigen's time, and 0.76-0.85x at the 32-128-channel 32 x 32 maps of the cats
and DDIM UNets (Zen 5 VM, one-off script).
It needs oneDNN 2.x or 3.x with headers (Debian/Ubuntu: ``apt install libdnnl-dev``; another
prefix: ``DNNL_ROOT``) and a C++17 compiler (``CXX``, default ``g++``).

The convolution is a :func:`jax.custom_vjp`: ``jax.grad`` works (both gradients come from
oneDNN), forward-mode ``jax.jvp`` does not. ``vmap`` runs the call once per mapped element.
Under ``jit`` with a batch sharded over several devices XLA cannot split a custom call and
gathers its operands, so :class:`~jaxdiff.models.layers.Conv2d` keeps XLA's convolution when
more than one device is visible.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SOURCE = Path(__file__).parent / "csrc" / "onednn_conv.cc"
TARGETS = ("fwd", "bwd_data", "bwd_weights")
ENV_SWITCH = "JAXDIFF_ONEDNN"
# Fewest output pixels (batch x height x width) for which Conv2d calls oneDNN (module docstring).
MIN_OUTPUT_PIXELS = 1024

_enabled = os.environ.get(ENV_SWITCH, "").lower() in ("1", "true", "yes", "on")


def use_onednn_convolutions(enabled: bool = True) -> None:
    """Route jaxdiff's float32 k x k convolutions on the CPU through oneDNN (or back to XLA).

    Builds and loads the custom calls now when ``enabled``, so a missing oneDNN or compiler is
    an error here rather than at the first trace. Programs already traced keep the kernels they
    were traced with; set this before building pipelines or train steps.
    """
    global _enabled
    if enabled:
        load()
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether :class:`~jaxdiff.models.layers.Conv2d` should call oneDNN in the program being
    traced: switched on, the CPU backend, and a single visible device."""
    return _enabled and jax.default_backend() == "cpu" and jax.device_count() == 1


def _search_roots() -> list[Path]:
    roots = [Path(os.environ["DNNL_ROOT"])] if os.environ.get("DNNL_ROOT") else []
    return roots + [Path("/usr"), Path("/usr/local"), Path("/opt/intel/oneapi/dnnl/latest")]


def find_onednn(roots: list[Path] | None = None) -> tuple[Path, Path]:
    """(include dir, lib dir) of the first oneDNN with headers and a shared library under
    ``roots`` (default: ``$DNNL_ROOT``, then ``/usr``, ``/usr/local`` and oneAPI's prefix)."""
    roots = _search_roots() if roots is None else roots
    for root in roots:
        if (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
            for lib in (root / "lib", root / "lib64", *sorted(root.glob("lib/*-linux-gnu"))):
                if any(lib.glob("libdnnl.so*")):
                    return root / "include", lib
    raise RuntimeError(
        "use_onednn_convolutions: oneDNN headers and library not found (looked for "
        "include/oneapi/dnnl/dnnl.hpp and lib*/libdnnl.so under "
        f"{', '.join(str(r) for r in roots)}); install them (Debian/Ubuntu: "
        "`apt install libdnnl-dev`) or set DNNL_ROOT to oneDNN's install prefix"
    )


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxdiff" / "onednn"


def build() -> Path:
    """Compile ``csrc/onednn_conv.cc`` (once per source, jaxlib and oneDNN) and return the
    shared library's path. Written to a temporary name and renamed, so concurrent builds and
    interrupted ones leave no half-written library behind."""
    include, lib = find_onednn()
    tag = hashlib.sha256(
        SOURCE.read_bytes()
        + jax.ffi.include_dir().encode()
        + jax.__version__.encode()
        + str(sorted(p.name for p in lib.glob("libdnnl.so*"))).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"libjaxdiff_onednn_conv-{tag}.so"
    if out.is_file():
        return out
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"use_onednn_convolutions: the C++ compiler {cxx!r} was not found; install g++ "
            "or set CXX"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        command = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w"]
        command += [f"-I{jax.ffi.include_dir()}", f"-I{include}", str(SOURCE), "-o", str(target)]
        command += [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ldnnl"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                "use_onednn_convolutions: compiling the oneDNN custom calls failed:\n"
                f"{' '.join(command)}\n{result.stderr[-4000:]}"
            )
        os.replace(target, out)
    return out


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]


def onednn_version() -> str:
    """The version of the oneDNN library jaxdiff builds against, e.g. ``"2.6.3"``."""
    _, lib = find_onednn()
    dnnl = ctypes.CDLL(str(sorted(lib.glob("libdnnl.so*"))[0]))
    dnnl.dnnl_version.restype = ctypes.POINTER(_Version)
    v = dnnl.dnnl_version().contents
    return f"{v.major}.{v.minor}.{v.patch}"


@functools.cache
def load() -> Path:
    """Build if needed, load the library and register its three FFI targets (once)."""
    path = build()
    library = ctypes.cdll.LoadLibrary(str(path))
    for name in TARGETS:
        symbol = getattr(library, f"jaxdiff_onednn_conv_{name}")
        jax.ffi.register_ffi_target(
            f"jaxdiff_onednn_conv_{name}", jax.ffi.pycapsule(symbol), platform="cpu"
        )
    return path


def _call(name: str, out_shape: tuple[int, ...], a: Array, b: Array, stride, padding) -> Array:
    (pad_top, pad_bottom), (pad_left, pad_right) = padding
    return jax.ffi.ffi_call(
        f"jaxdiff_onednn_conv_{name}",
        jax.ShapeDtypeStruct(out_shape, jnp.float32),
        vmap_method="sequential",
    )(
        a,
        b,
        stride_h=np.int64(stride[0]),
        stride_w=np.int64(stride[1]),
        pad_top=np.int64(pad_top),
        pad_bottom=np.int64(pad_bottom),
        pad_left=np.int64(pad_left),
        pad_right=np.int64(pad_right),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, kernel: Array, stride: tuple[int, int], padding) -> Array:
    """``lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=("NHWC",
    "HWIO", "NHWC"))`` for float32 ``x`` (N, H, W, C_in) and ``kernel`` (kh, kw, C_in, C_out),
    with ``padding`` as ``((top, bottom), (left, right))``, computed by oneDNN."""
    load()
    shape = jax.lax.conv_general_shape_tuple(
        x.shape, kernel.shape, stride, padding, ("NHWC", "HWIO", "NHWC")
    )
    return _call("fwd", tuple(map(int, shape)), x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
    return conv2d(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, dy):
    x, kernel = residuals
    dx = _call("bwd_data", x.shape, dy, kernel, stride, padding)
    dkernel = _call("bwd_weights", kernel.shape, x, dy, stride, padding)
    return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)

__all__ = [
    "ENV_SWITCH",
    "MIN_OUTPUT_PIXELS",
    "build",
    "conv2d",
    "enabled",
    "find_onednn",
    "load",
    "onednn_version",
    "use_onednn_convolutions",
]
