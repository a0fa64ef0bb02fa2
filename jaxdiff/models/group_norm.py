r"""Group normalization (*Wu & He (2018)*) with a reduction layout that is fast on XLA:CPU.

For a sample :math:`x` with channels split into :math:`G` groups, each group :math:`g` of
:math:`m` values (all positions times the group's channels) is normalized with its own
statistics, then scaled and shifted per channel:

.. math::
    \mu_g = \frac{1}{m}\sum_{i \in g} x_i,\quad
    \sigma_g^2 = \frac{1}{m}\sum_{i \in g} (x_i - \mu_g)^2,\quad
    \hat x_i = \frac{x_i - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}},\quad
    y_i = \gamma_c\,\hat x_i + \beta_c .

The variance is the two-pass (biased) one, as in PyTorch's ``GroupNorm``.

Every sum is taken per channel over the positions first, giving ``(N, C)`` arrays, and only
then over the channels of a group. On XLA:CPU that is several times faster than reducing the
``(N, L, G, C/G)`` view over two axes at once (``flax.linen.GroupNorm``), and autodiff keeps
the same layout in the backward pass: reductions transpose to broadcasts and back. Measured
at the cats model's shapes, GroupNorm + SiLU forward and backward: 24.8 -> 8.4 ms on
``(32, 32, 32, 64)``; the whole train step about 7-10% faster. A hand-written ``custom_vjp``
(two per-channel reductions in the backward pass) was no faster, and would have ruled out
forward-mode autodiff (``jax.jvp``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _group_mean(per_channel: Array, num_groups: int, count: int) -> Array:
    """``(N, C)`` per-channel sums -> each group's mean, broadcast back to ``(N, 1, C)``."""
    n, c = per_channel.shape
    grouped = per_channel.reshape(n, num_groups, c // num_groups).sum(-1, keepdims=True)
    return jnp.broadcast_to(grouped / count, (n, num_groups, c // num_groups)).reshape(n, 1, c)


def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, eps: float) -> Array:
    """Group-normalizes ``x`` of shape ``(N, ..., C)`` over all axes but the batch, with ``C``
    split into ``num_groups`` groups, then applies the per-channel ``scale`` and ``bias`` of
    shape ``(C,)``."""
    n, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(n, -1, c)
    count = x3.shape[1] * (c // num_groups)
    mean = _group_mean(x3.sum(1), num_groups, count)
    centered = x3 - mean
    var = _group_mean(jnp.square(centered).sum(1), num_groups, count)
    y = centered * (jax.lax.rsqrt(var + eps) * scale) + bias
    return y.reshape(x.shape)


class GroupNorm(nn.Module):
    """Float32 group norm with PyTorch's param names (``scale`` = ``weight``, ``bias``); a
    drop-in for ``flax.linen.GroupNorm(use_fast_variance=False)`` with :func:`group_norm`'s
    faster reduction layout."""

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim < 2 or x.shape[-1] % self.num_groups:
            raise ValueError(
                f"GroupNorm({self.num_groups} groups) expects input of shape (N, ..., C) with C "
                f"divisible by {self.num_groups}, got shape {x.shape}"
            )
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        return group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon)
