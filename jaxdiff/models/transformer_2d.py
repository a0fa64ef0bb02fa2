r"""The spatial transformer of Stable Diffusion's UNet (*Rombach et al. (2022), Sec. 3.3*).

A :class:`Transformer2DModel` turns an NHWC feature map into a sequence of ``H * W`` tokens,
runs :class:`BasicTransformerBlock` s on it (self-attention, cross-attention to the text
context :math:`c`, gated feed-forward) and adds the result back to its input. Submodules carry
diffusers' PyTorch attribute names (``norm``, ``proj_in``, ``transformer_blocks_0/attn2/to_k``,
``ff/net_0/proj`` ...) so the strict key table maps them one to one to
``transformer_blocks.0.attn2.to_k.weight``, ``ff.net.0.proj.weight`` etc. (the model lists
``transformer_blocks``, ``net`` and ``to_out`` among its ``_list_names``).

Layer norms and group norms run in float32; projections in ``dtype``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import Attention, apply_norm, conv, group_norm

Array = jax.Array


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
    """A float32 ``torch.nn.LayerNorm`` (affine); ``scale``/``bias`` map to ``weight``/``bias``."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


class GEGLU(nn.Module):
    r"""Gated GELU, *Shazeer (2020), Eq. 5* ("GLU Variants Improve Transformer").

    .. math:: \mathrm{GEGLU}(x) = (x W + b) \odot \mathrm{GELU}(x V + c)

    :math:`W` and :math:`V` are the two halves (value first, gate second) of the one
    projection ``proj`` of width ``2 * dim_out``. GELU is the exact erf form (``F.gelu``),
    evaluated in float32.
    """

    dim_in: int
    dim_out: int
    bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: Array) -> Array:
        h = nn.Dense(2 * self.dim_out, use_bias=self.bias, dtype=self.dtype, name="proj")(
            hidden_states.astype(self.dtype)
        )
        value, gate = jnp.split(h, 2, axis=-1)
        gate = jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(self.dtype)
        return value * gate


class FeedForward(nn.Module):
    r"""The transformer's position-wise feed-forward network, GEGLU variant (*Vaswani et al.
    (2017), Eq. 2*; *Shazeer (2020)*).

    .. math:: \mathrm{FF}(x) = W_2\,\mathrm{dropout}(\mathrm{GEGLU}(x)) + b_2

    with hidden width ``mult * dim``. Submodules ``net_0`` (the :class:`GEGLU`, PyTorch
    ``net.0``) and ``net_2`` (the output ``Linear``, PyTorch ``net.2``; ``net.1`` is the
    parameter-free dropout).
    """

    dim: int
    dim_out: int | None = None
    mult: int = 4
    dropout: float = 0.0
    activation_fn: str = "geglu"
    inner_dim: int | None = None
    bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: Array, train: bool = False) -> Array:
        if self.activation_fn != "geglu":
            raise NotImplementedError(
                f"FeedForward(activation_fn={self.activation_fn!r}) is not supported; only "
                "'geglu' (every Stable Diffusion UNet) is"
            )
        inner = self.inner_dim if self.inner_dim is not None else int(self.dim * self.mult)
        h = GEGLU(self.dim, inner, bias=self.bias, dtype=self.dtype, name="net_0")(hidden_states)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return nn.Dense(
            self.dim_out if self.dim_out is not None else self.dim,
            use_bias=self.bias,
            dtype=self.dtype,
            name="net_2",
        )(h)


class BasicTransformerBlock(nn.Module):
    r"""Pre-LN transformer block with cross-attention (*Vaswani et al. (2017)*; *Rombach et al.
    (2022), Eq. 3*), diffusers' ``BasicTransformerBlock`` with ``norm_type="layer_norm"``.

    .. math::
        h &= x + \mathrm{Attn}_1(\mathrm{LN}_1(x)) \\
        h &= h + \mathrm{Attn}_2(\mathrm{LN}_2(h),\ c) \\
        y &= h + \mathrm{FF}(\mathrm{LN}_3(h))

    ``attn1`` is self-attention, or cross-attention to :math:`c` with
    ``only_cross_attention``; ``attn2`` (and ``norm2``) exist when ``cross_attention_dim`` is
    set (or ``double_self_attention``, which makes it a second self-attention).
    """

    dim: int
    num_attention_heads: int
    attention_head_dim: int
    dropout: float = 0.0
    cross_attention_dim: int | None = None
    activation_fn: str = "geglu"
    attention_bias: bool = False
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False
    norm_eps: float = 1e-5
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    def _attention(self, cross_attention_dim: int | None, name: str) -> Attention:
        return Attention(
            self.dim,
            cross_attention_dim=cross_attention_dim,
            heads=self.num_attention_heads,
            dim_head=self.attention_head_dim,
            dropout=self.dropout,
            bias=self.attention_bias,
            upcast_attention=self.upcast_attention,
            attention_chunk_size=self.attention_chunk_size,
            dtype=self.dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        encoder_hidden_states: Array | None = None,
        encoder_attention_mask: Array | None = None,
        train: bool = False,
    ) -> Array:
        """
        Args:
            hidden_states: ``(B, L, dim)`` tokens.
            encoder_hidden_states: ``(B, S, cross_attention_dim)`` context.
            encoder_attention_mask: optional boolean ``(B, S)``, True for context tokens to
                attend to; used by ``attn2`` only (as in diffusers).
            train: enables dropout (rng ``"dropout"``).
        """
        dtype = self.dtype
        x = hidden_states

        # 1. self-attention (cross-attention with only_cross_attention)
        h = apply_norm(layer_norm(self.norm_eps, "norm1"), x, dtype)
        if self.only_cross_attention:
            # diffusers gives attn1 the (self-)attention_mask, not encoder_attention_mask,
            # even here where it attends to the context: mirrored, so no mask.
            attn1 = self._attention(self.cross_attention_dim, "attn1")
            h = attn1(h, encoder_hidden_states, train=train)
        else:
            h = self._attention(None, "attn1")(h, train=train)
        x = x.astype(dtype) + h

        # 2. cross-attention
        if self.cross_attention_dim is not None or self.double_self_attention:
            h = apply_norm(layer_norm(self.norm_eps, "norm2"), x, dtype)
            if self.double_self_attention:
                h = self._attention(None, "attn2")(h, train=train)
            else:
                attn2 = self._attention(self.cross_attention_dim, "attn2")
                h = attn2(h, encoder_hidden_states, encoder_attention_mask, train=train)
            x = x + h

        # 3. feed-forward
        h = apply_norm(layer_norm(self.norm_eps, "norm3"), x, dtype)
        h = FeedForward(
            self.dim,
            dropout=self.dropout,
            activation_fn=self.activation_fn,
            dtype=dtype,
            name="ff",
        )(h, train=train)
        return (x + h).astype(dtype)


class Transformer2DModel(nn.Module):
    r"""Spatial transformer over an NHWC map, diffusers' ``Transformer2DModel`` for continuous
    inputs (*Rombach et al. (2022), Sec. 3.3*, the LDM "SpatialTransformer").

    .. math::
        z = \mathrm{proj\_in}(\mathrm{GN}(x)),\quad
        z = \mathrm{Block}_L \circ \dots \circ \mathrm{Block}_1(z;\ c),\quad
        y = x + \mathrm{proj\_out}(z)

    ``proj_in``/``proj_out`` are 1x1 convolutions (SD 1.x) or, with ``use_linear_projection``
    (SD 2.x), ``Linear`` layers applied to the token sequence; both are pointwise maps, so the
    two differ only in the weight layout. ``norm`` is a GroupNorm with eps 1e-6 (fixed, as in
    diffusers). The inner width is ``num_attention_heads * attention_head_dim``.
    """

    num_attention_heads: int = 16
    attention_head_dim: int = 88
    in_channels: int | None = None
    out_channels: int | None = None
    num_layers: int = 1
    dropout: float = 0.0
    norm_num_groups: int = 32
    cross_attention_dim: int | None = None
    attention_bias: bool = False
    activation_fn: str = "geglu"
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False
    norm_eps: float = 1e-5
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        encoder_hidden_states: Array | None = None,
        encoder_attention_mask: Array | None = None,
        train: bool = False,
    ) -> Array:
        """
        Args:
            hidden_states: NHWC ``(B, H, W, in_channels)``.
            encoder_hidden_states: ``(B, S, cross_attention_dim)``.
            encoder_attention_mask: optional boolean ``(B, S)`` (True attends).
            train: enables dropout.

        Returns:
            ``(B, H, W, out_channels)``.
        """
        if self.in_channels is None:
            raise ValueError("Transformer2DModel needs in_channels (continuous inputs only)")
        if hidden_states.ndim != 4 or hidden_states.shape[-1] != self.in_channels:
            raise ValueError(
                f"Transformer2DModel expects NHWC hidden_states (B, H, W, {self.in_channels}), "
                f"got shape {hidden_states.shape}"
            )
        dtype = self.dtype
        b, h, w, _ = hidden_states.shape
        inner_dim = self.num_attention_heads * self.attention_head_dim
        out_channels = self.out_channels if self.out_channels is not None else self.in_channels
        residual = hidden_states

        x = apply_norm(group_norm(self.norm_num_groups, 1e-6, "norm"), hidden_states, dtype)
        if self.use_linear_projection:
            x = x.reshape(b, h * w, self.in_channels)
            x = nn.Dense(inner_dim, dtype=dtype, name="proj_in")(x)
        else:
            x = conv(inner_dim, kernel_size=1, padding=0, dtype=dtype, name="proj_in")(x)
            x = x.reshape(b, h * w, inner_dim)

        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner_dim,
                self.num_attention_heads,
                self.attention_head_dim,
                dropout=self.dropout,
                cross_attention_dim=self.cross_attention_dim,
                activation_fn=self.activation_fn,
                attention_bias=self.attention_bias,
                only_cross_attention=self.only_cross_attention,
                double_self_attention=self.double_self_attention,
                upcast_attention=self.upcast_attention,
                norm_eps=self.norm_eps,
                attention_chunk_size=self.attention_chunk_size,
                dtype=dtype,
                name=f"transformer_blocks_{i}",
            )(x, encoder_hidden_states, encoder_attention_mask, train=train)

        if self.use_linear_projection:
            x = nn.Dense(out_channels, dtype=dtype, name="proj_out")(x)
            x = x.reshape(b, h, w, out_channels)
        else:
            x = x.reshape(b, h, w, inner_dim)
            x = conv(out_channels, kernel_size=1, padding=0, dtype=dtype, name="proj_out")(x)
        return (x + residual.astype(dtype)).astype(dtype)
