r"""The encoder and decoder of the KL autoencoder (*Rombach et al. (2022), App. G*; the VQGAN
convolutional backbone of *Esser et al. (2021)*), diffusers' ``Encoder`` / ``Decoder``.

Submodules carry diffusers' PyTorch attribute names (``conv_in``, ``down_blocks_<i>``,
``mid_block``, ``up_blocks_<i>``, ``conv_norm_out``, ``conv_out``, ``resnets_<i>``,
``downsamplers_0``, ``upsamplers_0``) so the strict key table maps Flax params to diffusers'
state-dict keys one to one. Arrays are NHWC. There is no time embedding: every ResNet block is
built with ``temb_channels=None``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    apply_norm,
    conv,
    group_norm,
)
from jaxdiff.models.unet_2d_blocks import UNetMidBlock2D, block_attention

Array = jax.Array

DOWN_ENCODER_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_DECODER_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


class _VaeBlockFields(nn.Module):
    """Fields the encoder and decoder blocks share (diffusers' argument names)."""

    in_channels: int
    out_channels: int
    dropout: float = 0.0
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    # The Attn* variants follow every ResNet block with a self-attention (group norm of
    # ``resnet_groups`` groups, heads of width ``attention_head_dim``; the VAE passes the block
    # width: one head).
    has_attention = False
    attention_head_dim: int | None = None
    attention_chunk_size: int | None = None

    def _resnets(self, hidden_states: Array, train: bool) -> Array:
        if self.resnet_time_scale_shift != "default":
            raise ValueError(
                f"{type(self).__name__} supports resnet_time_scale_shift='default' only "
                "(the 'spatial' norm of MoVQ is not implemented), got "
                f"{self.resnet_time_scale_shift!r}"
            )
        for i in range(self.num_layers):
            hidden_states = ResnetBlock2D(
                in_channels=self.in_channels if i == 0 else self.out_channels,
                out_channels=self.out_channels,
                temb_channels=None,
                eps=self.resnet_eps,
                groups=self.resnet_groups,
                dropout=self.dropout,
                non_linearity=self.resnet_act_fn,
                output_scale_factor=self.output_scale_factor,
                dtype=self.dtype,
                name=f"resnets_{i}",
            )(hidden_states, None, train)
            if self.has_attention:
                hidden_states = block_attention(
                    self,
                    self.out_channels,
                    self.attention_head_dim,
                    self.resnet_groups,
                    f"attentions_{i}",
                )(hidden_states, train=train)
        return hidden_states


class DownEncoderBlock2D(_VaeBlockFields):
    """``num_layers`` ResNet blocks without time embedding, then a stride-2 3x3 conv.

    ``downsample_padding=0`` (what the VAE uses) pads one row and column at the bottom/right
    before the unpadded stride-2 conv, as the original LDM code does.
    """

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, hidden_states: Array, train: bool = False) -> Array:
        hidden_states = self._resnets(hidden_states, train)
        if self.add_downsample:
            hidden_states = Downsample2D(
                self.out_channels,
                use_conv=True,
                out_channels=self.out_channels,
                padding=self.downsample_padding,
                dtype=self.dtype,
                name="downsamplers_0",
            )(hidden_states)
        return hidden_states


class UpDecoderBlock2D(_VaeBlockFields):
    """``num_layers`` ResNet blocks without time embedding, then nearest x2 and a 3x3 conv."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, hidden_states: Array, train: bool = False) -> Array:
        hidden_states = self._resnets(hidden_states, train)
        if self.add_upsample:
            hidden_states = Upsample2D(
                self.out_channels,
                use_conv=True,
                out_channels=self.out_channels,
                dtype=self.dtype,
                name="upsamplers_0",
            )(hidden_states)
        return hidden_states


class AttnDownEncoderBlock2D(DownEncoderBlock2D):
    """:class:`DownEncoderBlock2D` with a self-attention after every ResNet block."""

    has_attention = True


class AttnUpDecoderBlock2D(UpDecoderBlock2D):
    """:class:`UpDecoderBlock2D` with a self-attention after every ResNet block."""

    has_attention = True


_BLOCKS = {
    "DownEncoderBlock2D": DownEncoderBlock2D,
    "AttnDownEncoderBlock2D": AttnDownEncoderBlock2D,
    "UpDecoderBlock2D": UpDecoderBlock2D,
    "AttnUpDecoderBlock2D": AttnUpDecoderBlock2D,
}


def _check_block_types(kind: str, types: tuple[str, ...], allowed: tuple[str, ...], n: int) -> None:
    if len(types) != n:
        raise ValueError(
            f"{kind} has {len(types)} entries but block_out_channels has {n}; they must match"
        )
    bad = [t for t in types if t not in allowed]
    if bad:
        raise ValueError(
            f"{kind} {bad} are not supported by jaxdiff's AutoencoderKL; supported: {list(allowed)}"
        )


def _mid_block(
    channels: int, groups: int, act_fn: str, add_attention: bool, chunk, dtype
) -> UNetMidBlock2D:
    """The VAE's mid block: ResNet, single-head self-attention with group norm, ResNet."""
    return UNetMidBlock2D(
        in_channels=channels,
        temb_channels=None,
        resnet_eps=1e-6,
        resnet_act_fn=act_fn,
        output_scale_factor=1.0,
        resnet_time_scale_shift="default",
        attention_head_dim=channels,  # one head of width C, as diffusers' VAE
        resnet_groups=groups,
        add_attention=add_attention,
        attention_chunk_size=chunk,
        dtype=dtype,
        name="mid_block",
    )


class Encoder(nn.Module):
    r"""The VAE encoder :math:`\mathcal{E}` (*Rombach et al. (2022), Sec. 3*): image -> moments.

    .. math::
        h = \mathrm{mid}(\mathrm{down}(\mathrm{conv\_in}(x))),\quad
        \mathrm{moments} = \mathrm{conv\_out}(\mathrm{SiLU}(\mathrm{GN}(h)))

    With ``double_z`` the output has ``2 * out_channels`` channels: the mean and log-variance
    of the diagonal Gaussian posterior. Spatial size shrinks by
    ``f = 2 ** (len(block_out_channels) - 1)`` (``floor(H / f)`` for any ``H >= f``).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    double_z: bool = True
    mid_block_add_attention: bool = True
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: Array, train: bool = False) -> Array:
        boc = tuple(self.block_out_channels)
        _check_block_types(
            "down_block_types", tuple(self.down_block_types), DOWN_ENCODER_BLOCKS, len(boc)
        )
        f = 2 ** (len(boc) - 1)
        if min(sample.shape[1:3]) < f:  # a stride-2 3x3 conv would then see fewer than 3 rows
            raise ValueError(
                f"the VAE encoder needs images (or tiles) of at least {f}x{f} pixels "
                f"({len(boc) - 1} stride-2 downsamplings), got "
                f"{sample.shape[1]}x{sample.shape[2]}"
            )
        dtype = self.dtype
        h = conv(boc[0], dtype=dtype, name="conv_in")(sample.astype(dtype))
        output_channel = boc[0]
        for i in range(len(boc)):
            input_channel, output_channel = output_channel, boc[i]
            h = _BLOCKS[self.down_block_types[i]](
                in_channels=input_channel,
                out_channels=output_channel,
                num_layers=self.layers_per_block,
                resnet_eps=1e-6,
                resnet_act_fn=self.act_fn,
                resnet_groups=self.norm_num_groups,
                add_downsample=i < len(boc) - 1,
                downsample_padding=0,
                attention_head_dim=output_channel,
                attention_chunk_size=self.attention_chunk_size,
                dtype=dtype,
                name=f"down_blocks_{i}",
            )(h, train)
        h = _mid_block(
            boc[-1],
            self.norm_num_groups,
            self.act_fn,
            self.mid_block_add_attention,
            self.attention_chunk_size,
            dtype,
        )(h, None, train)
        h = apply_norm(group_norm(self.norm_num_groups, 1e-6, "conv_norm_out"), h, dtype)
        h = nn.silu(h)  # diffusers' conv_act is always SiLU
        out = 2 * self.out_channels if self.double_z else self.out_channels
        return conv(out, dtype=dtype, name="conv_out")(h)


class Decoder(nn.Module):
    r"""The VAE decoder :math:`\mathcal{D}` (*Rombach et al. (2022), Sec. 3*): latent -> image.

    .. math::
        h = \mathrm{up}(\mathrm{mid}(\mathrm{conv\_in}(z))),\quad
        x = \mathrm{conv\_out}(\mathrm{SiLU}(\mathrm{GN}(h)))

    Each up block has ``layers_per_block + 1`` ResNet blocks; spatial size grows by
    ``2 ** (len(block_out_channels) - 1)``.
    """

    in_channels: int = 3
    out_channels: int = 3
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array, train: bool = False) -> Array:
        boc = tuple(self.block_out_channels)
        _check_block_types(
            "up_block_types", tuple(self.up_block_types), UP_DECODER_BLOCKS, len(boc)
        )
        dtype = self.dtype
        h = conv(boc[-1], dtype=dtype, name="conv_in")(z.astype(dtype))
        h = _mid_block(
            boc[-1],
            self.norm_num_groups,
            self.act_fn,
            self.mid_block_add_attention,
            self.attention_chunk_size,
            dtype,
        )(h, None, train)
        reversed_boc = boc[::-1]
        output_channel = reversed_boc[0]
        for i in range(len(boc)):
            prev_output_channel, output_channel = output_channel, reversed_boc[i]
            h = _BLOCKS[self.up_block_types[i]](
                in_channels=prev_output_channel,
                out_channels=output_channel,
                num_layers=self.layers_per_block + 1,
                resnet_eps=1e-6,
                resnet_act_fn=self.act_fn,
                resnet_groups=self.norm_num_groups,
                add_upsample=i < len(boc) - 1,
                attention_head_dim=output_channel,
                attention_chunk_size=self.attention_chunk_size,
                dtype=dtype,
                name=f"up_blocks_{i}",
            )(h, train)
        h = apply_norm(group_norm(self.norm_num_groups, 1e-6, "conv_norm_out"), h, dtype)
        h = nn.silu(h)  # diffusers' conv_act is always SiLU
        return conv(self.out_channels, dtype=dtype, name="conv_out")(h)
