r"""Convolution gradients written in the layout XLA:CPU's Eigen convolution runs, for loops.

Reverse-mode autodiff of ``lax.conv_general_dilated`` (NHWC, HWIO) gives two convolutions in
other dimension layouts: the input gradient convolves :math:`\partial y` with the flipped kernel
with its in/out axes swapped (``b01f_01oi->b01f``), the weight gradient correlates :math:`x`
with :math:`\partial y` over the batch, treating the batch as the feature axis
(``f01b_i01o->01bf``). At the top level of a program XLA:CPU (jaxlib 0.10) moves those layouts
into explicit transposes so Eigen can run them; inside a ``while`` loop (``lax.scan``) it does
not, and they run as naive loops: a ``lax.scan`` over 4 cats-32 train steps took 19 s a step
instead of 0.5 s. :func:`conv2d` is the same convolution with its two gradients written with
the transposes already explicit, every convolution in the layout ``b01f_01io->b01f``::

    dx = conv(dilate(dy, s), transpose_io(flip(w)), pad = (k - 1 - lo, hi'))
    dw = transpose(conv(x^T, dy^T, rhs_dilation = s, pad = (lo, hi'')))  # x^T: (C_in, H, W, N)

(the transpose rules of ``jax.lax.conv_general_dilated``; ``hi'`` and ``hi''`` make the output
sizes exact for any stride). It is a :func:`jax.custom_vjp`, so forward-mode ``jax.jvp`` does
not go through it: :class:`~jaxdiff.models.layers.Conv2d` uses it only while
:func:`canonical_gradients` is active, which :func:`~jaxdiff.training.make_train_step` sets
while it traces the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

Array = jax.Array

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_active = contextvars.ContextVar("jaxdiff_canonical_conv_gradients", default=False)


@contextlib.contextmanager
def canonical_gradients() -> Iterator[None]:
    """Within this context, :class:`~jaxdiff.models.layers.Conv2d` traced on the CPU uses
    :func:`conv2d` (gradients in Eigen's layout; no forward-mode autodiff)."""
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


def active() -> bool:
    """Whether the convolution being traced should use :func:`conv2d`."""
    return _active.get() and jax.default_backend() == "cpu"


def _conv(lhs: Array, rhs: Array, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)) -> Array:
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        (1, 1),
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=DIMENSION_NUMBERS,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, kernel: Array, stride: tuple[int, int], padding) -> Array:
    """``lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=("NHWC",
    "HWIO", "NHWC"))`` with ``padding`` as ``((top, bottom), (left, right))``; its gradients
    are convolutions in the same layout (module docstring)."""
    return jax.lax.conv_general_dilated(
        x, kernel, stride, padding, dimension_numbers=DIMENSION_NUMBERS
    )


def _conv2d_fwd(x, kernel, stride, padding):
    return conv2d(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, dy):
    x, kernel = residuals
    pad_dx, pad_dw = [], []
    for size, k, s, (lo, _), out in zip(
        x.shape[1:3], kernel.shape[:2], stride, padding, dy.shape[1:3]
    ):
        span = (out - 1) * s + 1  # the strided output, dilated back onto the input grid
        pad_dx.append((k - 1 - lo, size - span + lo))
        pad_dw.append((lo, span - size + k - 1 - lo))
    flipped = jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))
    dx = _conv(dy, flipped, pad_dx, lhs_dilation=stride)
    dw = _conv(
        jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), pad_dw, rhs_dilation=stride
    )
    return dx, jnp.transpose(dw, (1, 2, 0, 3)).astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)

__all__ = ["DIMENSION_NUMBERS", "active", "canonical_gradients", "conv2d"]
