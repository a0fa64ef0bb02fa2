r"""The cross-attention blocks of Stable Diffusion's UNet (*Rombach et al. (2022), Sec. 3.3*).

Each resolution level interleaves ResNet blocks (``resnets``) with spatial transformers
(``attentions``, :class:`~jaxdiff.models.transformer_2d.Transformer2DModel`) that attend to
the text context. Names follow diffusers (``down_blocks_0/attentions_1/transformer_blocks_0``
<-> ``down_blocks.0.attentions.1.transformer_blocks.0``). The plain ``DownBlock2D`` /
``UpBlock2D`` / ``UNetMidBlock2D`` are those of :mod:`jaxdiff.models.unet_2d_blocks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import Downsample2D, ResnetBlock2D, Upsample2D
from jaxdiff.models.transformer_2d import Transformer2DModel

Array = jax.Array


def _per_layer(value: int | Sequence[int], num_layers: int, name: str) -> tuple[int, ...]:
    """``transformer_layers_per_block`` as one int per layer.

    A longer list is cut to its first ``num_layers`` entries, since diffusers indexes it by
    layer: an asymmetric UNet (nested ``transformer_layers_per_block``, e.g. SSD-1B) gives
    the one-layer mid block the last level's per-layer list, of which diffusers uses entry 0.
    """
    if isinstance(value, int):
        return (value,) * num_layers
    value = tuple(int(v) for v in value)
    if len(value) < num_layers:
        raise ValueError(f"{name} has {len(value)} entries, expected one per layer ({num_layers})")
    return value[:num_layers]


class _CrossAttnFields(nn.Module):
    """Fields the cross-attention blocks share (diffusers' argument names)."""

    in_channels: int
    temb_channels: int
    out_channels: int | None = None  # None: in_channels
    dropout: float = 0.0
    num_layers: int = 1
    transformer_layers_per_block: int | tuple[int, ...] = 1
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    num_attention_heads: int = 1
    cross_attention_dim: int = 1280
    output_scale_factor: float = 1.0
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    @property
    def _out(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    def _resnet(
        self, in_ch: int, out_ch: int, name: str, groups: int | None = None
    ) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels=in_ch,
            out_channels=out_ch,
            temb_channels=self.temb_channels,
            eps=self.resnet_eps,
            groups=groups if groups is not None else self.resnet_groups,
            dropout=self.dropout,
            time_embedding_norm=self.resnet_time_scale_shift,
            non_linearity=self.resnet_act_fn,
            output_scale_factor=self.output_scale_factor,
            dtype=self.dtype,
            name=name,
        )

    def _transformer(self, channels: int, num_layers: int, name: str, groups: int | None = None):
        heads = self.num_attention_heads
        return Transformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=channels // heads,
            in_channels=channels,
            num_layers=num_layers,
            dropout=self.dropout,
            norm_num_groups=groups if groups is not None else self.resnet_groups,
            cross_attention_dim=self.cross_attention_dim,
            use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention,
            attention_chunk_size=self.attention_chunk_size,
            dtype=self.dtype,
            name=name,
        )


class CrossAttnDownBlock2D(_CrossAttnFields):
    """(ResNet block, spatial transformer) ``num_layers`` times, then a stride-2 conv.

    Returns ``(hidden_states, skips)`` with one skip per layer plus the downsampled map.
    """

    downsample_padding: int = 1
    add_downsample: bool = True

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        temb: Array,
        encoder_hidden_states: Array,
        encoder_attention_mask: Array | None = None,
        train: bool = False,
    ) -> tuple[Array, tuple[Array, ...]]:
        layers = _per_layer(
            self.transformer_layers_per_block, self.num_layers, "transformer_layers_per_block"
        )
        output_states = ()
        for i in range(self.num_layers):
            in_ch = self.in_channels if i == 0 else self._out
            hidden_states = self._resnet(in_ch, self._out, f"resnets_{i}")(
                hidden_states, temb, train
            )
            hidden_states = self._transformer(self._out, layers[i], f"attentions_{i}")(
                hidden_states, encoder_hidden_states, encoder_attention_mask, train=train
            )
            output_states += (hidden_states,)
        if self.add_downsample:
            hidden_states = Downsample2D(
                self._out,
                use_conv=True,
                out_channels=self._out,
                padding=self.downsample_padding,
                dtype=self.dtype,
                name="downsamplers_0",
            )(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class CrossAttnUpBlock2D(_CrossAttnFields):
    """(ResNet on [features, skip], spatial transformer) ``num_layers`` times, then nearest x2
    and a 3x3 conv. Skips are consumed last-first."""

    prev_output_channel: int = 0
    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        res_hidden_states_tuple: tuple[Array, ...],
        temb: Array,
        encoder_hidden_states: Array,
        encoder_attention_mask: Array | None = None,
        upsample_size: tuple[int, int] | None = None,
        train: bool = False,
    ) -> Array:
        if len(res_hidden_states_tuple) != self.num_layers:
            raise ValueError(
                f"CrossAttnUpBlock2D needs {self.num_layers} skip tensors, "
                f"got {len(res_hidden_states_tuple)}"
            )
        layers = _per_layer(
            self.transformer_layers_per_block, self.num_layers, "transformer_layers_per_block"
        )
        for i in range(self.num_layers):
            res_skip = self.in_channels if i == self.num_layers - 1 else self._out
            running = self.prev_output_channel if i == 0 else self._out
            skip = res_hidden_states_tuple[-1 - i]
            hidden_states = jnp.concatenate(
                [hidden_states, skip.astype(hidden_states.dtype)], axis=-1
            )
            hidden_states = self._resnet(running + res_skip, self._out, f"resnets_{i}")(
                hidden_states, temb, train
            )
            hidden_states = self._transformer(self._out, layers[i], f"attentions_{i}")(
                hidden_states, encoder_hidden_states, encoder_attention_mask, train=train
            )
        if self.add_upsample:
            hidden_states = Upsample2D(
                self._out,
                use_conv=True,
                out_channels=self._out,
                dtype=self.dtype,
                name="upsamplers_0",
            )(hidden_states, upsample_size)
        return hidden_states


class UNetMidBlock2DCrossAttn(_CrossAttnFields):
    """ResNet, then (spatial transformer, ResNet) ``num_layers`` times, at the lowest resolution.

    ``out_channels`` defaults to ``in_channels``; ``resnet_groups=None`` means
    ``min(in_channels // 4, 32)`` as in diffusers.
    """

    resnet_groups: int | None = 32

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        temb: Array,
        encoder_hidden_states: Array,
        encoder_attention_mask: Array | None = None,
        train: bool = False,
    ) -> Array:
        out_ch = self._out
        groups = (
            self.resnet_groups if self.resnet_groups is not None else min(self.in_channels // 4, 32)
        )
        layers = _per_layer(
            self.transformer_layers_per_block, self.num_layers, "transformer_layers_per_block"
        )
        hidden_states = self._resnet(self.in_channels, out_ch, "resnets_0", groups)(
            hidden_states, temb, train
        )
        for i in range(self.num_layers):
            hidden_states = self._transformer(out_ch, layers[i], f"attentions_{i}", groups)(
                hidden_states, encoder_hidden_states, encoder_attention_mask, train=train
            )
            hidden_states = self._resnet(out_ch, out_ch, f"resnets_{i + 1}", groups)(
                hidden_states, temb, train
            )
        return hidden_states
