r"""The down, mid and up blocks of diffusers' ``UNet2DModel`` (*Ho et al. (2020)*, App. B).

Each block holds ``resnets`` (and ``attentions``) lists and an optional ``downsamplers`` /
``upsamplers`` list of one module, named as in diffusers so the key table maps
``down_blocks_1/attentions_0/to_q`` to ``down_blocks.1.attentions.0.to_q``. Down blocks return
``(hidden_states, skip states)``; up blocks consume the skips last-first.

Block types: ``DownBlock2D``, ``AttnDownBlock2D``, ``ResnetDownsampleBlock2D`` and the
score-SDE skip blocks ``SkipDownBlock2D`` / ``AttnSkipDownBlock2D`` (which also carry a
3-channel ``skip_sample`` and return it third; their ResNet resamplers sit in ``resnet_down`` /
``resnet_up``), with the matching up blocks.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    apply_norm,
    conv,
    fir_downsample_2d,
    fir_upsample_2d,
    group_norm,
)

Array = jax.Array


def _heads(channels: int, attention_head_dim: int | None) -> tuple[int, int]:
    """(heads, dim_head) of diffusers' deprecated-style attention blocks.

    ``heads = channels // attention_head_dim`` rounds down, as in diffusers: a head width that
    does not divide the channels gives an attention of inner width ``heads * dim_head`` (< C).
    """
    dim_head = attention_head_dim if attention_head_dim is not None else channels
    if dim_head < 1 or channels // dim_head < 1:
        raise ValueError(
            f"attention_head_dim={dim_head} must be between 1 and the block's {channels} "
            "channels (diffusers builds channels // attention_head_dim heads)"
        )
    return channels // dim_head, dim_head


def block_attention(
    block: nn.Module, channels: int, attention_head_dim: int | None, groups, name: str
) -> Attention:
    """The residual self-attention of diffusers' UNet2D / VAE blocks, built from ``block``'s
    ``output_scale_factor``, ``resnet_eps``, ``attention_chunk_size`` and ``dtype``."""
    heads, dim_head = _heads(channels, attention_head_dim)
    return Attention(
        channels,
        heads=heads,
        dim_head=dim_head,
        rescale_output_factor=block.output_scale_factor,
        eps=block.resnet_eps,
        norm_num_groups=groups,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        attention_chunk_size=block.attention_chunk_size,
        dtype=block.dtype,
        name=name,
    )


class _BlockFields(nn.Module):
    """Fields every UNet2D block shares (diffusers' argument names)."""

    in_channels: int
    out_channels: int
    temb_channels: int | None
    dropout: float = 0.0
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int = 32
    output_scale_factor: float = 1.0
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    def _resnet(self, in_ch: int, out_ch: int, name: str, **kw) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels=in_ch,
            out_channels=out_ch,
            temb_channels=self.temb_channels,
            eps=self.resnet_eps,
            groups=self.resnet_groups,
            dropout=self.dropout,
            time_embedding_norm=self.resnet_time_scale_shift,
            non_linearity=self.resnet_act_fn,
            output_scale_factor=self.output_scale_factor,
            dtype=self.dtype,
            name=name,
            **kw,
        )


class DownBlock2D(_BlockFields):
    """``num_layers`` ResNet blocks, then a stride-2 conv (``add_downsample``)."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, hidden_states: Array, temb: Array | None = None, train: bool = False):
        output_states = ()
        for i in range(self.num_layers):
            in_ch = self.in_channels if i == 0 else self.out_channels
            hidden_states = self._resnet(in_ch, self.out_channels, f"resnets_{i}")(
                hidden_states, temb, train
            )
            output_states += (hidden_states,)
        if self.add_downsample:
            hidden_states = Downsample2D(
                self.out_channels,
                use_conv=True,
                out_channels=self.out_channels,
                padding=self.downsample_padding,
                dtype=self.dtype,
                name="downsamplers_0",
            )(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class AttnDownBlock2D(_BlockFields):
    """ResNet block + self-attention, ``num_layers`` times, then a downsampler.

    ``downsample_type``: ``"conv"`` (stride-2 conv), ``"resnet"`` (a ResNet block with 2x2
    average pooling) or None (no downsampling; what ``add_downsample=False`` means).
    """

    attention_head_dim: int | None = 1
    downsample_padding: int = 1
    downsample_type: str | None = "conv"

    @nn.compact
    def __call__(self, hidden_states: Array, temb: Array | None = None, train: bool = False):
        output_states = ()
        for i in range(self.num_layers):
            in_ch = self.in_channels if i == 0 else self.out_channels
            hidden_states = self._resnet(in_ch, self.out_channels, f"resnets_{i}")(
                hidden_states, temb, train
            )
            hidden_states = block_attention(
                self,
                self.out_channels,
                self.attention_head_dim,
                self.resnet_groups,
                f"attentions_{i}",
            )(hidden_states, train=train)
            output_states += (hidden_states,)
        if self.downsample_type == "conv":
            hidden_states = Downsample2D(
                self.out_channels,
                use_conv=True,
                out_channels=self.out_channels,
                padding=self.downsample_padding,
                dtype=self.dtype,
                name="downsamplers_0",
            )(hidden_states)
        elif self.downsample_type == "resnet":
            hidden_states = self._resnet(
                self.out_channels, self.out_channels, "downsamplers_0", down=True
            )(hidden_states, temb, train)
        elif self.downsample_type is not None:
            raise ValueError(
                f"downsample_type must be 'conv', 'resnet' or None, got {self.downsample_type!r}"
            )
        if self.downsample_type is not None:
            output_states += (hidden_states,)
        return hidden_states, output_states


class UNetMidBlock2D(nn.Module):
    """ResNet, then (attention, ResNet) ``num_layers`` times, at the lowest resolution.

    ``attn_groups=None`` gives the attention a group norm of ``resnet_groups`` groups when
    ``resnet_time_scale_shift == "default"`` and none otherwise, as in diffusers.
    ``temb_channels=None`` is the VAE's mid block.
    """

    in_channels: int
    temb_channels: int | None
    dropout: float = 0.0
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_time_scale_shift: str = "default"
    resnet_act_fn: str = "swish"
    resnet_groups: int | None = 32
    attn_groups: int | None = None
    add_attention: bool = True
    attention_head_dim: int | None = 1
    output_scale_factor: float = 1.0
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: Array, temb: Array | None = None, train: bool = False):
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(
                "UNetMidBlock2D supports resnet_time_scale_shift 'default' or 'scale_shift', "
                f"got {self.resnet_time_scale_shift!r}"
            )
        c = self.in_channels
        groups = self.resnet_groups if self.resnet_groups is not None else min(c // 4, 32)
        attn_groups = self.attn_groups
        if attn_groups is None:
            attn_groups = groups if self.resnet_time_scale_shift == "default" else None

        def resnet(i: int) -> ResnetBlock2D:
            return ResnetBlock2D(
                in_channels=c,
                out_channels=c,
                temb_channels=self.temb_channels,
                eps=self.resnet_eps,
                groups=groups,
                dropout=self.dropout,
                time_embedding_norm=self.resnet_time_scale_shift,
                non_linearity=self.resnet_act_fn,
                output_scale_factor=self.output_scale_factor,
                dtype=self.dtype,
                name=f"resnets_{i}",
            )

        hidden_states = resnet(0)(hidden_states, temb, train)
        for i in range(self.num_layers):
            if self.add_attention:
                hidden_states = block_attention(
                    self, c, self.attention_head_dim, attn_groups, f"attentions_{i}"
                )(hidden_states, train=train)
            hidden_states = resnet(i + 1)(hidden_states, temb, train)
        return hidden_states


class _UpFields(_BlockFields):
    prev_output_channel: int = 0

    def _resnet_in(self, i: int) -> int:
        """Input width of resnet ``i``: the running features plus the skip it concatenates."""
        res_skip = self.in_channels if i == self.num_layers - 1 else self.out_channels
        running = self.prev_output_channel if i == 0 else self.out_channels
        return running + res_skip

    def _skip_resnets(
        self, hidden_states: Array, res_hidden_states_tuple, temb, train: bool, **kw
    ) -> Array:
        """``num_layers`` ResNet blocks, each on the concatenation [features, next skip]."""
        self._check_skips(res_hidden_states_tuple)
        for i in range(self.num_layers):
            skip = res_hidden_states_tuple[-1 - i]
            hidden_states = jnp.concatenate([hidden_states, skip.astype(hidden_states.dtype)], -1)
            hidden_states = self._resnet(
                self._resnet_in(i), self.out_channels, f"resnets_{i}", **kw
            )(hidden_states, temb, train)
        return hidden_states

    def _check_skips(self, res_hidden_states_tuple) -> None:
        if len(res_hidden_states_tuple) != self.num_layers:
            raise ValueError(
                f"{type(self).__name__} needs {self.num_layers} skip tensors, got "
                f"{len(res_hidden_states_tuple)}"
            )


class UpBlock2D(_UpFields):
    """``num_layers`` ResNet blocks on [features, skip] concatenations, then nearest x2 + conv."""

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        res_hidden_states_tuple: tuple[Array, ...],
        temb: Array | None = None,
        upsample_size: tuple[int, int] | None = None,
        train: bool = False,
    ) -> Array:
        hidden_states = self._skip_resnets(hidden_states, res_hidden_states_tuple, temb, train)
        if self.add_upsample:
            hidden_states = Upsample2D(
                self.out_channels,
                use_conv=True,
                out_channels=self.out_channels,
                dtype=self.dtype,
                name="upsamplers_0",
            )(hidden_states, upsample_size)
        return hidden_states


class AttnUpBlock2D(_UpFields):
    """(ResNet on [features, skip], self-attention) ``num_layers`` times, then an upsampler.

    ``upsample_type``: ``"conv"`` (nearest x2 + conv), ``"resnet"`` (a ResNet block with
    nearest x2) or None (what ``add_upsample=False`` means).
    """

    attention_head_dim: int | None = 1
    upsample_type: str | None = "conv"

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        res_hidden_states_tuple: tuple[Array, ...],
        temb: Array | None = None,
        upsample_size: tuple[int, int] | None = None,
        train: bool = False,
    ) -> Array:
        self._check_skips(res_hidden_states_tuple)
        for i in range(self.num_layers):
            skip = res_hidden_states_tuple[-1 - i]
            hidden_states = jnp.concatenate([hidden_states, skip.astype(hidden_states.dtype)], -1)
            hidden_states = self._resnet(self._resnet_in(i), self.out_channels, f"resnets_{i}")(
                hidden_states, temb, train
            )
            hidden_states = block_attention(
                self,
                self.out_channels,
                self.attention_head_dim,
                self.resnet_groups,
                f"attentions_{i}",
            )(hidden_states, train=train)
        if self.upsample_type == "conv":
            hidden_states = Upsample2D(
                self.out_channels,
                use_conv=True,
                out_channels=self.out_channels,
                dtype=self.dtype,
                name="upsamplers_0",
            )(hidden_states, upsample_size)
        elif self.upsample_type == "resnet":
            hidden_states = self._resnet(
                self.out_channels, self.out_channels, "upsamplers_0", up=True
            )(hidden_states, temb, train)
        elif self.upsample_type is not None:
            raise ValueError(
                f"upsample_type must be 'conv', 'resnet' or None, got {self.upsample_type!r}"
            )
        return hidden_states


class ResnetDownsampleBlock2D(_BlockFields):
    """``num_layers`` ResNet blocks, then a ResNet block with 2x2 average pooling
    (``downsamplers_0``; BigGAN-style, as ``downsample_type="resnet"``)."""

    add_downsample: bool = True
    skip_time_act: bool = False

    @nn.compact
    def __call__(self, hidden_states: Array, temb: Array | None = None, train: bool = False):
        output_states = ()
        for i in range(self.num_layers):
            in_ch = self.in_channels if i == 0 else self.out_channels
            hidden_states = self._resnet(
                in_ch, self.out_channels, f"resnets_{i}", skip_time_act=self.skip_time_act
            )(hidden_states, temb, train)
            output_states += (hidden_states,)
        if self.add_downsample:
            hidden_states = self._resnet(
                self.out_channels,
                self.out_channels,
                "downsamplers_0",
                skip_time_act=self.skip_time_act,
                down=True,
            )(hidden_states, temb, train)
            output_states += (hidden_states,)
        return hidden_states, output_states


class ResnetUpsampleBlock2D(_UpFields):
    """``num_layers`` ResNet blocks on [features, skip] concatenations, then a ResNet block
    with nearest x2 upsampling (``upsamplers_0``)."""

    add_upsample: bool = True
    skip_time_act: bool = False

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        res_hidden_states_tuple: tuple[Array, ...],
        temb: Array | None = None,
        upsample_size: tuple[int, int] | None = None,
        train: bool = False,
    ) -> Array:
        hidden_states = self._skip_resnets(
            hidden_states, res_hidden_states_tuple, temb, train, skip_time_act=self.skip_time_act
        )
        if self.add_upsample:
            # diffusers' ResnetBlock2D(up=True) always doubles; upsample_size is not used.
            hidden_states = self._resnet(
                self.out_channels,
                self.out_channels,
                "upsamplers_0",
                skip_time_act=self.skip_time_act,
                up=True,
            )(hidden_states, temb, train)
        return hidden_states


# ------------------------------------------------------------------------------------------
# Score-SDE (NCSN++) skip blocks: a 3-channel "skip sample" runs alongside the features (the
# progressive input / output branches of *Song et al. (2021), App. H*), resampled with the
# (1, 3, 3, 1) FIR filter. As in diffusers, their group norms use min(C // 4, 32) groups
# (``resnet_groups`` is ignored), attention always 32 groups, and the blocks' residual outputs
# are scaled by 1 / sqrt(2).


def _skip_groups(channels: int) -> int:
    return min(channels // 4, 32)


class _SkipFields(_BlockFields):
    output_scale_factor: float = float(np.sqrt(2.0))

    def _skip_resnet(self, in_ch: int, groups: int, name: str, **kw) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels=in_ch,
            out_channels=self.out_channels,
            temb_channels=self.temb_channels,
            eps=self.resnet_eps,
            groups=groups,
            groups_out=_skip_groups(self.out_channels),
            dropout=self.dropout,
            time_embedding_norm=self.resnet_time_scale_shift,
            non_linearity=self.resnet_act_fn,
            output_scale_factor=self.output_scale_factor,
            dtype=self.dtype,
            name=name,
            **kw,
        )


class SkipDownBlock2D(_SkipFields):
    """``num_layers`` ResNet blocks; with ``add_downsample``, a FIR-downsampling ResNet block
    plus a 1x1 conv of the FIR-downsampled 3-channel ``skip_sample`` added to the features.

    Call: ``(hidden_states, temb, skip_sample, train)`` -> ``(hidden_states, skip states,
    skip_sample)``.
    """

    add_downsample: bool = True
    downsample_padding: int = 1
    has_attention = False
    attention_head_dim: int | None = 1

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        temb: Array | None = None,
        skip_sample: Array | None = None,
        train: bool = False,
    ):
        output_states = ()
        for i in range(self.num_layers):
            in_ch = self.in_channels if i == 0 else self.out_channels
            hidden_states = self._skip_resnet(in_ch, _skip_groups(in_ch), f"resnets_{i}")(
                hidden_states, temb, train
            )
            if self.has_attention:
                hidden_states = block_attention(
                    self, self.out_channels, self.attention_head_dim, 32, f"attentions_{i}"
                )(hidden_states, train=train)
            output_states += (hidden_states,)
        if self.add_downsample:
            if skip_sample is None:
                raise ValueError(f"{type(self).__name__} needs skip_sample")
            hidden_states = self._skip_resnet(
                self.out_channels,
                _skip_groups(self.out_channels),
                "resnet_down",
                use_in_shortcut=True,
                down=True,
                kernel="fir",
            )(hidden_states, temb, train)
            skip_sample = fir_downsample_2d(skip_sample)
            hidden_states = hidden_states + conv(
                self.out_channels, 1, padding=0, dtype=self.dtype, name="skip_conv"
            )(skip_sample.astype(self.dtype))
            output_states += (hidden_states,)
        return hidden_states, output_states, skip_sample


class AttnSkipDownBlock2D(SkipDownBlock2D):
    """:class:`SkipDownBlock2D` with self-attention (32 groups) after every ResNet block."""

    has_attention = True


class SkipUpBlock2D(_SkipFields, _UpFields):
    """ResNet blocks on [features, skip] concatenations; the 3-channel ``skip_sample`` is FIR
    upsampled and, with ``add_upsample``, gets ``skip_conv(SiLU(skip_norm(h)))`` added before a
    FIR-upsampling ResNet block.

    Call: ``(hidden_states, res_hidden_states_tuple, temb, skip_sample, train)`` ->
    ``(hidden_states, skip_sample)`` (``skip_sample`` None stands for diffusers' 0).
    """

    add_upsample: bool = True
    has_attention = False
    attention_head_dim: int | None = 1

    def _resnet_groups(self, i: int) -> int:
        running = self.prev_output_channel if i == 0 else self.out_channels
        res_skip = self.in_channels if i == self.num_layers - 1 else self.out_channels
        return _skip_groups(running + res_skip)

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        res_hidden_states_tuple: tuple[Array, ...],
        temb: Array | None = None,
        skip_sample: Array | None = None,
        train: bool = False,
    ):
        self._check_skips(res_hidden_states_tuple)
        for i in range(self.num_layers):
            skip = res_hidden_states_tuple[-1 - i]
            hidden_states = jnp.concatenate([hidden_states, skip.astype(hidden_states.dtype)], -1)
            hidden_states = self._skip_resnet(
                self._resnet_in(i), self._resnet_groups(i), f"resnets_{i}"
            )(hidden_states, temb, train)
        if self.has_attention:
            hidden_states = block_attention(
                self, self.out_channels, self.attention_head_dim, 32, "attentions_0"
            )(hidden_states, train=train)
        if skip_sample is not None:
            skip_sample = fir_upsample_2d(skip_sample)
        if self.add_upsample:
            s = apply_norm(
                group_norm(_skip_groups(self.out_channels), self.resnet_eps, "skip_norm"),
                hidden_states,
                self.dtype,
            )
            s = conv(3, dtype=self.dtype, name="skip_conv")(nn.silu(s))
            skip_sample = s if skip_sample is None else skip_sample.astype(s.dtype) + s
            hidden_states = ResnetBlock2D(
                in_channels=self.out_channels,
                out_channels=self.out_channels,
                temb_channels=self.temb_channels,
                eps=self.resnet_eps,
                groups=_skip_groups(self.out_channels),
                groups_out=_skip_groups(self.out_channels),
                dropout=self.dropout,
                time_embedding_norm=self.resnet_time_scale_shift,
                non_linearity=self.resnet_act_fn,
                output_scale_factor=self.output_scale_factor,
                use_in_shortcut=True,
                up=True,
                kernel="fir",
                dtype=self.dtype,
                name="resnet_up",
            )(hidden_states, temb, train)
        return hidden_states, skip_sample


class AttnSkipUpBlock2D(SkipUpBlock2D):
    """:class:`SkipUpBlock2D` with one self-attention (32 groups) after the ResNet blocks.

    Its ResNet blocks' first group norm has ``min(C_in + C_skip // 4, 32)`` groups: diffusers'
    operator precedence, kept for weight compatibility.
    """

    has_attention = True

    def _resnet_groups(self, i: int) -> int:
        running = self.prev_output_channel if i == 0 else self.out_channels
        res_skip = self.in_channels if i == self.num_layers - 1 else self.out_channels
        return min(running + res_skip // 4, 32)


SKIP_DOWN_BLOCKS = (SkipDownBlock2D, AttnSkipDownBlock2D)
SKIP_UP_BLOCKS = (SkipUpBlock2D, AttnSkipUpBlock2D)
DOWN_BLOCKS = {
    "DownBlock2D": DownBlock2D,
    "AttnDownBlock2D": AttnDownBlock2D,
    "ResnetDownsampleBlock2D": ResnetDownsampleBlock2D,
    "SkipDownBlock2D": SkipDownBlock2D,
    "AttnSkipDownBlock2D": AttnSkipDownBlock2D,
}
UP_BLOCKS = {
    "UpBlock2D": UpBlock2D,
    "AttnUpBlock2D": AttnUpBlock2D,
    "ResnetUpsampleBlock2D": ResnetUpsampleBlock2D,
    "SkipUpBlock2D": SkipUpBlock2D,
    "AttnSkipUpBlock2D": AttnSkipUpBlock2D,
}


def get_down_block(
    down_block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    temb_channels: int | None,
    add_downsample: bool,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int,
    attention_head_dim: int | None,
    downsample_padding: int,
    resnet_time_scale_shift: str,
    downsample_type: str | None,
    dropout: float,
    attention_chunk_size: int | None,
    dtype,
    name: str,
) -> nn.Module:
    """diffusers' ``get_down_block`` for the UNet2DModel block types (``UNetRes`` prefix ok)."""
    kind = down_block_type[7:] if down_block_type.startswith("UNetRes") else down_block_type
    common = dict(
        num_layers=num_layers,
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        dropout=dropout,
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_groups=resnet_groups,
        resnet_time_scale_shift=resnet_time_scale_shift,
        attention_chunk_size=attention_chunk_size,
        dtype=dtype,
        name=name,
    )
    if kind == "DownBlock2D":
        return DownBlock2D(
            add_downsample=add_downsample, downsample_padding=downsample_padding, **common
        )
    if kind == "AttnDownBlock2D":
        return AttnDownBlock2D(
            attention_head_dim=attention_head_dim,
            downsample_padding=downsample_padding,
            downsample_type=(downsample_type or "conv") if add_downsample else None,
            **common,
        )
    if kind == "ResnetDownsampleBlock2D":
        return ResnetDownsampleBlock2D(add_downsample=add_downsample, **common)
    if kind in ("SkipDownBlock2D", "AttnSkipDownBlock2D"):
        common.pop("resnet_groups")  # the skip blocks use min(C // 4, 32) groups
        extra = {"attention_head_dim": attention_head_dim} if kind.startswith("Attn") else {}
        return DOWN_BLOCKS[kind](add_downsample=add_downsample, **extra, **common)
    raise ValueError(
        f"down block type {down_block_type!r} is not supported by jaxdiff's UNet2DModel; "
        f"supported: {sorted(DOWN_BLOCKS)}"
    )


def get_up_block(
    up_block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    prev_output_channel: int,
    temb_channels: int | None,
    add_upsample: bool,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int,
    attention_head_dim: int | None,
    resnet_time_scale_shift: str,
    upsample_type: str | None,
    dropout: float,
    attention_chunk_size: int | None,
    dtype,
    name: str,
) -> nn.Module:
    """diffusers' ``get_up_block`` for the UNet2DModel block types (``UNetRes`` prefix ok)."""
    kind = up_block_type[7:] if up_block_type.startswith("UNetRes") else up_block_type
    common = dict(
        num_layers=num_layers,
        in_channels=in_channels,
        out_channels=out_channels,
        prev_output_channel=prev_output_channel,
        temb_channels=temb_channels,
        dropout=dropout,
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_groups=resnet_groups,
        resnet_time_scale_shift=resnet_time_scale_shift,
        attention_chunk_size=attention_chunk_size,
        dtype=dtype,
        name=name,
    )
    if kind == "UpBlock2D":
        return UpBlock2D(add_upsample=add_upsample, **common)
    if kind == "AttnUpBlock2D":
        return AttnUpBlock2D(
            attention_head_dim=attention_head_dim,
            upsample_type=(upsample_type or "conv") if add_upsample else None,
            **common,
        )
    if kind == "ResnetUpsampleBlock2D":
        return ResnetUpsampleBlock2D(add_upsample=add_upsample, **common)
    if kind in ("SkipUpBlock2D", "AttnSkipUpBlock2D"):
        common.pop("resnet_groups")  # the skip blocks use min(C // 4, 32) groups
        extra = {"attention_head_dim": attention_head_dim} if kind.startswith("Attn") else {}
        return UP_BLOCKS[kind](add_upsample=add_upsample, **extra, **common)
    raise ValueError(
        f"up block type {up_block_type!r} is not supported by jaxdiff's UNet2DModel; "
        f"supported: {sorted(UP_BLOCKS)}"
    )
