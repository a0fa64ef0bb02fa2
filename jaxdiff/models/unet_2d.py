r"""``UNet2DModel``: the unconditional DDPM / score-SDE UNet of diffusers, in Flax Linen (NHWC).

The architecture of *Ho et al. (2020), App. B* (a PixelCNN++-style UNet of wide ResNet blocks
with self-attention at low resolution, after *Salimans et al. (2017)*), with diffusers'
options: Fourier noise-level features (*Song et al. (2021)*), adaptive group norm
(``resnet_time_scale_shift="scale_shift"``, *Dhariwal & Nichol (2021)*), class embeddings.

    model, params = UNet2DModel.from_pretrained("google/ddpm-cat-256")
    eps_hat = model.apply({"params": params}, x_t, t).sample      # x_t: (B, H, W, C)
"""

from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.configuration import NONNEG_INT, OPT_POS_INT, POS_INT
from jaxdiff.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from jaxdiff.models.layers import apply_norm, conv, group_norm
from jaxdiff.models.modeling_utils import FlaxModelMixin
from jaxdiff.models.unet_2d_blocks import (
    SKIP_DOWN_BLOCKS,
    SKIP_UP_BLOCKS,
    UNetMidBlock2D,
    get_down_block,
    get_up_block,
)
from jaxdiff.utils.checks import host_numbers

Array = jax.Array

# Attention blocks of checkpoints saved before diffusers 0.14 used these names.
_LEGACY_ATTENTION = re.compile(
    r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$"
)
_LEGACY_TARGET = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@flax.struct.dataclass
class UNet2DOutput:
    """Output of :class:`UNet2DModel`.

    Attributes:
        sample: ``(B, H, W, out_channels)``, the model output (e.g. ``eps_hat``).
    """

    sample: Array


def check_unet_inputs(
    sample: Array, timesteps: Array, in_channels: int, num_blocks: int, any_size: bool = False
) -> None:
    """Validates a UNet's NHWC ``sample`` and its ``timesteps`` (at trace time: shapes are static).

    ``any_size`` skips the check that H and W are multiples of ``2 ** (num_blocks - 1)`` (for
    UNets that resize on the way up, as diffusers' ``UNet2DConditionModel`` does).

    Raises:
        ValueError: naming the argument and the expected shape.
    """
    if sample.ndim != 4:
        raise ValueError(
            f"sample must be a 4-D NHWC array (batch, height, width, {in_channels}), "
            f"got shape {sample.shape}"
        )
    b, h, w, c = sample.shape
    if 0 in (b, h, w):
        raise ValueError(
            f"sample must have a non-empty batch, height and width (batch, height, width, "
            f"{in_channels}), got shape {sample.shape}"
        )
    if c != in_channels:
        raise ValueError(
            f"sample has {c} channels (last axis, NHWC) but the model expects "
            f"in_channels={in_channels}; got shape {sample.shape}"
        )
    factor = 2 ** (num_blocks - 1)
    if not any_size and (h % factor or w % factor):
        raise ValueError(
            f"sample height and width must be multiples of {factor} "
            f"(2 ** (len(block_out_channels) - 1)), got {h}x{w}"
        )
    if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, b)):
        raise ValueError(
            f"timesteps must be a scalar or a (batch,) = ({b},) array, got shape {timesteps.shape}"
        )


def check_unet_timesteps(timesteps: Any) -> Array:
    """``timesteps`` as an array, after checking host-known values (traced ones are not).

    Raises:
        TypeError: when ``timesteps`` is missing or not numeric.
        ValueError: when a host-known timestep is NaN or infinite (the output would be NaN).
    """
    expected = "a number or a (batch,) array of numbers"
    if timesteps is None:
        raise TypeError(f"timesteps must be {expected}, got None")
    t = host_numbers(timesteps, "timesteps", expected)
    if t is not None and not np.isfinite(t).all():
        raise ValueError(f"timesteps must be finite, got {t.tolist()}")
    return jnp.asarray(timesteps)


class UNet2DModel(FlaxModelMixin, nn.Module):
    r"""The 2-D UNet of DDPM (*Ho et al. (2020), App. B*), diffusers' ``UNet2DModel``.

    .. math::
        e = \mathrm{MLP}(\gamma(t)) [+ \mathrm{class\ emb}],\quad
        h_0 = \mathrm{conv\_in}(x_t),\quad
        \hat\epsilon = \mathrm{conv\_out}(\phi(\mathrm{GN}(
            \mathrm{up}(\mathrm{mid}(\mathrm{down}(h_0, e), e), e))))

    where :math:`\gamma` is the sinusoidal embedding (``"positional"``), Gaussian Fourier
    features of :math:`\log\sigma` (``"fourier"``, the output is then divided by
    :math:`\sigma`, *Song et al. (2021)*) or a learned table (``"learned"``). The up path
    concatenates every down-path activation (skip connections, *Ronneberger et al. (2015)*).

    Every field is a diffusers config field with diffusers' default (list fields as tuples);
    ``dtype`` (compute dtype) and ``attention_chunk_size`` (query-chunked attention for long
    sequences on CPU) are runtime settings, not config.

    Call: ``model.apply({"params": params}, sample, timesteps, class_labels=None, train=False)``
    with ``sample`` NHWC ``(B, H, W, in_channels)``, ``timesteps`` a scalar or ``(B,)`` array;
    returns :class:`UNet2DOutput`. ``train=True`` enables dropout (rng ``"dropout"``).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = (
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    _config_rules = {
        "layers_per_block": NONNEG_INT,
        "attention_head_dim": OPT_POS_INT,
        "norm_num_groups": POS_INT,  # diffusers: None fails there too
    }
    _list_names = (
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "downsamplers",
        "upsamplers",
        "to_out",
    )

    # ---------------------------------------------------------------------------------------
    # Loading helpers

    @classmethod
    def _normalize_state_dict(cls, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Maps legacy names to current ones: ``query/key/value/proj_attn`` of the old
        attention blocks -> ``to_q/to_k/to_v/to_out.0`` (diffusers'
        ``_fix_state_dict_keys_on_load``), and the Fourier projection's ``W`` -> ``weight``."""
        out = {}
        for key, value in state_dict.items():
            m = _LEGACY_ATTENTION.match(key)
            if m:
                key = f"{m.group(1)}.{_LEGACY_TARGET[m.group(2)]}.{m.group(3)}"
            elif key == "time_proj.W":
                key = "time_proj.weight"
            if key in out:
                raise ValueError(
                    f"the state dict holds {key!r} under both its legacy and its current name"
                )
            out[key] = value
        return out

    def dummy_inputs(self) -> tuple:
        size = 2 ** (len(self.block_out_channels) - 1)
        sample = jnp.zeros((1, size, size, self.in_channels), jnp.float32)
        timesteps = jnp.ones((1,), jnp.float32)
        if self.class_embed_type is None and self.num_class_embeds is not None:
            return sample, timesteps, jnp.zeros((1,), jnp.int32)
        if self.class_embed_type == "timestep":
            return sample, timesteps, jnp.ones((1,), jnp.float32)
        if self.class_embed_type == "identity":
            return sample, timesteps, jnp.zeros((1, self._time_embed_dim()), jnp.float32)
        return sample, timesteps

    def _time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    # ---------------------------------------------------------------------------------------
    # Validation

    def _check_config(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != len(self.up_block_types):
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}) and up_block_types "
                f"({len(self.up_block_types)}) must have the same length"
            )
        if len(self.down_block_types) != n:
            raise ValueError(
                f"block_out_channels ({n}) and down_block_types ({len(self.down_block_types)}) "
                "must have the same length"
            )
        if self.time_embedding_type not in ("positional", "fourier", "learned"):
            raise ValueError(
                "time_embedding_type must be 'positional', 'fourier' or 'learned', got "
                f"{self.time_embedding_type!r}"
            )
        if self.time_embedding_type == "learned" and not self.num_train_timesteps:
            raise ValueError("time_embedding_type='learned' needs num_train_timesteps")
        if self.class_embed_type not in (None, "timestep", "identity"):
            raise ValueError(
                "class_embed_type must be None, 'timestep' or 'identity', got "
                f"{self.class_embed_type!r}"
            )

        # Skip blocks that resample (all but the last level) hold 3-channel skip convs.
        def resampling_skip_block(types: tuple[str, ...]) -> bool:
            return any("Skip" in t for t in types[: n - 1])

        if resampling_skip_block(self.down_block_types) and self.in_channels != 3:
            raise ValueError(
                "Skip down blocks (SkipDownBlock2D, AttnSkipDownBlock2D) take the 3-channel "
                f"input image (diffusers hard-codes skip_conv to 3 channels); got in_channels="
                f"{self.in_channels}"
            )
        if resampling_skip_block(self.up_block_types) and self.out_channels != 3:
            raise ValueError(
                "Skip up blocks (SkipUpBlock2D, AttnSkipUpBlock2D) add a 3-channel output "
                f"branch (diffusers hard-codes skip_conv to 3 channels); got out_channels="
                f"{self.out_channels}"
            )
        if self.mid_block_type not in (None, "UNetMidBlock2D"):
            raise ValueError(
                f"mid_block_type must be 'UNetMidBlock2D' or None, got {self.mid_block_type!r}"
            )

    def _check_inputs(self, sample: Array, timesteps: Array) -> None:
        check_unet_inputs(sample, timesteps, self.in_channels, len(self.block_out_channels))

    # ---------------------------------------------------------------------------------------

    @nn.compact
    def __call__(
        self,
        sample: Array,
        timesteps: Array | float | int,
        class_labels: Array | None = None,
        train: bool = False,
    ) -> UNet2DOutput:
        self._check_config()
        sample = jnp.asarray(sample)
        timesteps = check_unet_timesteps(timesteps)
        self._check_inputs(sample, timesteps)
        dtype = self.dtype
        boc = tuple(self.block_out_channels)
        batch = sample.shape[0]
        temb_dim = self._time_embed_dim()

        if self.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time embedding
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (batch,))
        if self.time_embedding_type == "fourier":
            time_proj = GaussianFourierProjection(embedding_size=boc[0], scale=16, name="time_proj")
            timestep_input_dim = 2 * boc[0]
        elif self.time_embedding_type == "positional":
            time_proj = Timesteps(boc[0], self.flip_sin_to_cos, self.freq_shift, name="time_proj")
            timestep_input_dim = boc[0]
        else:
            embed = nn.Embed(self.num_train_timesteps, boc[0], name="time_proj")
            time_proj = lambda t: embed(t.astype(jnp.int32)).astype(jnp.float32)  # noqa: E731
            timestep_input_dim = boc[0]
        t_emb = time_proj(timesteps).astype(dtype)
        emb = TimestepEmbedding(timestep_input_dim, temb_dim, dtype=dtype, name="time_embedding")(
            t_emb
        )

        # 2. class embedding
        has_class = self.class_embed_type is not None or self.num_class_embeds is not None
        if has_class:
            if class_labels is None:
                raise ValueError(
                    "class_labels should be provided when doing class conditioning "
                    f"(class_embed_type={self.class_embed_type!r}, "
                    f"num_class_embeds={self.num_class_embeds})"
                )
            class_labels = jnp.asarray(class_labels)
            if self.class_embed_type is None:
                class_emb = nn.Embed(
                    self.num_class_embeds, temb_dim, dtype=dtype, name="class_embedding"
                )(class_labels.astype(jnp.int32))
            elif self.class_embed_type == "timestep":
                class_emb = TimestepEmbedding(
                    timestep_input_dim, temb_dim, dtype=dtype, name="class_embedding"
                )(time_proj(class_labels.reshape(-1)).astype(dtype))
            else:
                class_emb = class_labels
            emb = emb + class_emb.astype(dtype)
        elif class_labels is not None:
            raise ValueError(
                "class_labels were given but the model has no class embedding "
                "(class_embed_type=None, num_class_embeds=None)"
            )

        # 3. down path (skip blocks also carry the 3-channel input, NCSN++'s progressive input)
        skip_sample = sample
        h = conv(boc[0], dtype=dtype, name="conv_in")(sample.astype(dtype))
        skips: tuple[Array, ...] = (h,)
        output_channel = boc[0]
        for i, block_type in enumerate(self.down_block_types):
            input_channel, output_channel = output_channel, boc[i]
            block = get_down_block(
                block_type,
                num_layers=self.layers_per_block,
                in_channels=input_channel,
                out_channels=output_channel,
                temb_channels=temb_dim,
                add_downsample=i < len(boc) - 1,
                resnet_eps=self.norm_eps,
                resnet_act_fn=self.act_fn,
                resnet_groups=self.norm_num_groups,
                attention_head_dim=self.attention_head_dim
                if self.attention_head_dim is not None
                else output_channel,
                downsample_padding=self.downsample_padding,
                resnet_time_scale_shift=self.resnet_time_scale_shift,
                downsample_type=self.downsample_type,
                dropout=self.dropout,
                attention_chunk_size=self.attention_chunk_size,
                dtype=dtype,
                name=f"down_blocks_{i}",
            )
            if isinstance(block, SKIP_DOWN_BLOCKS):
                h, res, skip_sample = block(h, emb, skip_sample=skip_sample, train=train)
            else:
                h, res = block(h, emb, train)
            skips += res

        # 4. mid
        if self.mid_block_type is not None:
            h = UNetMidBlock2D(
                in_channels=boc[-1],
                temb_channels=temb_dim,
                dropout=self.dropout,
                resnet_eps=self.norm_eps,
                resnet_act_fn=self.act_fn,
                output_scale_factor=self.mid_block_scale_factor,
                resnet_time_scale_shift=self.resnet_time_scale_shift,
                attention_head_dim=self.attention_head_dim
                if self.attention_head_dim is not None
                else boc[-1],
                resnet_groups=self.norm_num_groups,
                attn_groups=self.attn_norm_num_groups,
                add_attention=self.add_attention,
                attention_chunk_size=self.attention_chunk_size,
                dtype=dtype,
                name="mid_block",
            )(h, emb, train)

        # 5. up path
        reversed_boc = boc[::-1]
        output_channel = reversed_boc[0]
        n_skips = self.layers_per_block + 1
        skip_sample = None
        for i, block_type in enumerate(self.up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_boc[i]
            input_channel = reversed_boc[min(i + 1, len(boc) - 1)]
            block = get_up_block(
                block_type,
                num_layers=n_skips,
                in_channels=input_channel,
                out_channels=output_channel,
                prev_output_channel=prev_output_channel,
                temb_channels=temb_dim,
                add_upsample=i < len(boc) - 1,
                resnet_eps=self.norm_eps,
                resnet_act_fn=self.act_fn,
                resnet_groups=self.norm_num_groups,
                attention_head_dim=self.attention_head_dim
                if self.attention_head_dim is not None
                else output_channel,
                resnet_time_scale_shift=self.resnet_time_scale_shift,
                upsample_type=self.upsample_type,
                dropout=self.dropout,
                attention_chunk_size=self.attention_chunk_size,
                dtype=dtype,
                name=f"up_blocks_{i}",
            )
            res, skips = skips[-n_skips:], skips[:-n_skips]
            if isinstance(block, SKIP_UP_BLOCKS):
                h, skip_sample = block(h, res, emb, skip_sample=skip_sample, train=train)
            else:
                h = block(h, res, emb, train=train)

        # 6. out
        groups_out = (
            self.norm_num_groups if self.norm_num_groups is not None else min(boc[0] // 4, 32)
        )
        h = apply_norm(group_norm(groups_out, self.norm_eps, "conv_norm_out"), h, dtype)
        h = nn.silu(h)  # diffusers' conv_act is always SiLU
        h = conv(self.out_channels, dtype=dtype, name="conv_out")(h)
        if skip_sample is not None:  # the output branch of the skip up blocks
            h = h + skip_sample.astype(h.dtype)

        if self.time_embedding_type == "fourier":
            h = h / timesteps.reshape(batch, 1, 1, 1).astype(h.dtype)
        return UNet2DOutput(sample=h)
