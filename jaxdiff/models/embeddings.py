r"""Timestep embeddings: sinusoidal, Gaussian Fourier features, and the MLP that follows them."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import get_activation

Array = jax.Array


def get_timestep_embedding(
    timesteps: Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> Array:
    r"""Sinusoidal timestep embedding (*Vaswani et al. (2017), Sec. 3.5*; *Ho et al. (2020)*).

    With :math:`d = \lfloor \text{embedding\_dim} / 2 \rfloor` and
    :math:`\omega_i = \text{max\_period}^{-i / (d - \text{downscale\_freq\_shift})}`,

    .. math:: e(t) = [\sin(s\,t\,\omega_i)]_{i<d} \,\Vert\, [\cos(s\,t\,\omega_i)]_{i<d}

    (cos first with ``flip_sin_to_cos``; a zero column is appended for an odd dimension).

    Args:
        timesteps: ``(N,)`` timesteps, possibly fractional.
        embedding_dim: output width.
        flip_sin_to_cos: order ``cos, sin`` instead of ``sin, cos``.
        downscale_freq_shift: shift of the frequency denominator (1 in the DDPM code, 0 in SD).
        scale: multiplies the arguments :math:`s`.
        max_period: the longest period.

    Returns:
        ``(N, embedding_dim)`` float32 embeddings.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D array, got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    args = scale * (timesteps.astype(jnp.float32)[:, None] * freqs[None, :])
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nn.Module):
    """:func:`get_timestep_embedding` as a (parameter-free) module, diffusers' ``Timesteps``."""

    num_channels: int
    flip_sin_to_cos: bool = True
    downscale_freq_shift: float = 1
    scale: float = 1
    max_period: int = 10000

    def __call__(self, timesteps: Array) -> Array:
        return get_timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
            max_period=self.max_period,
        )


class GaussianFourierProjection(nn.Module):
    r"""Gaussian Fourier features of the noise level (*Song et al. (2021)*, App. C).

    .. math:: e(\sigma) = [\sin(2\pi\,w\,\log\sigma) \,\Vert\, \cos(2\pi\,w\,\log\sigma)],
              \quad w \sim \mathcal{N}(0, \text{scale}^2)\ \text{(fixed, not trained)}

    ``log=False`` uses :math:`\sigma` itself. The param is ``weight`` (diffusers' name; old
    checkpoints call it ``W``, mapped on load by the model).
    """

    embedding_size: int = 256
    scale: float = 1.0
    log: bool = True
    flip_sin_to_cos: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param(
            "weight",
            lambda key, shape: jax.random.normal(key, shape) * self.scale,
            (self.embedding_size,),
        )
        weight = jax.lax.stop_gradient(weight).astype(jnp.float32)  # requires_grad=False
        x = jnp.asarray(x, jnp.float32)
        if self.log:
            x = jnp.log(x)
        x_proj = x[:, None] * weight[None, :] * 2 * math.pi
        if self.flip_sin_to_cos:
            return jnp.concatenate([jnp.cos(x_proj), jnp.sin(x_proj)], axis=-1)
        return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class TimestepEmbedding(nn.Module):
    r"""The timestep MLP, :math:`W_2\,\phi(W_1 e + b_1) + b_2` (*Ho et al. (2020), App. B*).

    Submodules ``linear_1``, ``linear_2`` and, with ``cond_proj_dim``, ``cond_proj`` (LCM's
    guidance embedding is added to the input); ``post_act_fn`` applies after ``linear_2``.
    """

    in_channels: int
    time_embed_dim: int
    act_fn: str = "silu"
    out_dim: int | None = None
    post_act_fn: str | None = None
    cond_proj_dim: int | None = None
    sample_proj_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: Array, condition: Array | None = None) -> Array:
        if sample.shape[-1] != self.in_channels:
            raise ValueError(
                f"TimestepEmbedding expects {self.in_channels} input features, got {sample.shape}"
            )
        sample = sample.astype(self.dtype)
        if self.cond_proj_dim is not None and condition is None and self.is_initializing():
            condition = jnp.zeros(sample.shape[:-1] + (self.cond_proj_dim,), self.dtype)
        if self.cond_proj_dim is not None and condition is not None:
            sample = sample + nn.Dense(
                self.in_channels, use_bias=False, dtype=self.dtype, name="cond_proj"
            )(condition.astype(self.dtype))
        sample = nn.Dense(
            self.time_embed_dim, use_bias=self.sample_proj_bias, dtype=self.dtype, name="linear_1"
        )(sample)
        if self.act_fn is not None:
            sample = get_activation(self.act_fn)(sample)
        sample = nn.Dense(
            self.out_dim or self.time_embed_dim,
            use_bias=self.sample_proj_bias,
            dtype=self.dtype,
            name="linear_2",
        )(sample)
        if self.post_act_fn is not None:
            sample = get_activation(self.post_act_fn)(sample)
        return sample
