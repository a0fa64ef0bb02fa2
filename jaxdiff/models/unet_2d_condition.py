r"""The text-conditional UNet of Stable Diffusion, diffusers' ``UNet2DConditionModel``, in Flax.

The latent-diffusion UNet (*Rombach et al. (2022), Sec. 3.3 and App. E*) predicts
``eps_hat`` (or ``v_hat``, SD 2.x 768-v) from the noisy latent ``x_t``, the timestep and the
text context :math:`c`::

    unet, params = UNet2DConditionModel.from_pretrained(repo, subfolder="unet")
    out = unet.apply({"params": params}, x_t, t, encoder_hidden_states)   # x_t NHWC
    eps_hat = out.sample                                                  # (B, H, W, 4)
    unet.save_pretrained("my-unet", params)      # PyTorch diffusers can load it

SD 1.x is the default config with ``cross_attention_dim=768``; SD 2.x sets
``attention_head_dim=(5, 10, 20, 20)`` (heads per level, see :class:`UNet2DConditionModel`),
``cross_attention_dim=1024``, ``use_linear_projection=True``. The inpainting UNet has
``in_channels=9`` (latent, mask, masked-image latent), the depth UNet ``in_channels=5``.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff.models.embeddings import TimestepEmbedding, Timesteps
from jaxdiff.models.layers import apply_norm, conv, get_activation, group_norm
from jaxdiff.models.modeling_utils import FlaxModelMixin
from jaxdiff.models.unet_2d import check_unet_inputs, check_unet_timesteps
from jaxdiff.models.unet_2d_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D
from jaxdiff.models.unet_2d_condition_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    UNetMidBlock2DCrossAttn,
)

__all__ = ["UNet2DConditionModel", "UNet2DConditionOutput"]

Array = jax.Array

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


@flax.struct.dataclass
class UNet2DConditionOutput:
    """Output of :class:`UNet2DConditionModel`.

    Attributes:
        sample: ``(B, H, W, out_channels)``, the model output (``eps_hat`` or ``v_hat``).
    """

    sample: Array


def _as_tuple(value, n: int, name: str) -> tuple:
    """A per-block config value (scalar or sequence of ``n``) as a tuple of ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{name} must have one entry per down block ({n}), got {len(value)}: {tuple(value)}"
            )
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return (value,) * n


class UNet2DConditionModel(FlaxModelMixin, nn.Module):
    r"""The conditional UNet of latent diffusion (*Rombach et al. (2022), Sec. 3.3*).

    .. math::
        e = \mathrm{MLP}(\gamma(t)),\quad
        h_0 = \mathrm{conv\_in}(x_t),\quad
        \hat\epsilon = \mathrm{conv\_out}(\phi(\mathrm{GN}(
            \mathrm{up}(\mathrm{mid}(\mathrm{down}(h_0; e, c); e, c); e, c))))

    with :math:`\gamma` the sinusoidal timestep embedding (*Vaswani et al. (2017), Sec. 3.5*),
    ResNet blocks conditioned on :math:`e` and spatial transformers cross-attending to the
    context :math:`c` (*Rombach et al. (2022), Eq. 3*); the up path concatenates the down
    path's activations (*Ronneberger et al. (2015)*).

    Every field is a diffusers config field with diffusers' default (sequences as tuples).
    Supported: the block types ``CrossAttnDownBlock2D``/``DownBlock2D``,
    ``CrossAttnUpBlock2D``/``UpBlock2D``, mid ``UNetMidBlock2DCrossAttn``/``UNetMidBlock2D``/
    None (SD 1.x, 2.x, inpainting, depth, LCM's ``time_cond_proj_dim``, ``num_class_embeds``),
    and SDXL's ``addition_embed_type="text_time"`` (*Podell et al. (2023), Sec. 2.2*: the
    pooled text embedding and the size/crop conditioning ``time_ids``, each id embedded like a
    timestep, go through an MLP added to :math:`e`). Fields of other variants
    (``encoder_hid_dim``, ``class_embed_type``, other ``addition_embed_type`` ...) raise
    ``NotImplementedError`` when set.

    ``attention_head_dim`` is, as in diffusers, really the number of heads per level
    (``num_attention_heads`` defaults to it, and diffusers rejects setting
    ``num_attention_heads`` itself); each level's head width is ``channels // heads``.

    ``dtype`` (compute dtype) and ``attention_chunk_size`` (query-chunked attention, bounding
    the memory of the 4096-token self-attention at 512 px on CPU) are runtime settings, not
    config.

    Call: ``model.apply({"params": p}, sample, timesteps, encoder_hidden_states, train=False)``
    with ``sample`` NHWC ``(B, H, W, in_channels)``, ``timesteps`` a scalar or ``(B,)`` array,
    ``encoder_hidden_states`` ``(B, S, cross_attention_dim)``; returns
    :class:`UNet2DConditionOutput`. Optional keywords: ``encoder_attention_mask`` (boolean
    ``(B, S)``), ``timestep_cond`` (with ``time_cond_proj_dim``), ``class_labels`` (with
    ``num_class_embeds``), ``added_cond_kwargs={"text_embeds": (B, P), "time_ids": (B, K)}``
    (with ``addition_embed_type="text_time"``). ``train=True`` enables dropout (rng
    ``"dropout"``).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    _list_names = (
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "downsamplers",
        "upsamplers",
        "transformer_blocks",
        "to_out",
        "net",
    )

    # ---------------------------------------------------------------------------------------
    # Config

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
        for kind, allowed, name in (
            (self.down_block_types, _DOWN_BLOCKS, "down_block_types"),
            (self.up_block_types, _UP_BLOCKS, "up_block_types"),
        ):
            bad = [t for t in kind if t not in allowed]
            if bad:
                raise NotImplementedError(
                    f"{name} {bad} not supported by jaxdiff's UNet2DConditionModel; "
                    f"supported: {list(allowed)}"
                )
        if self.mid_block_type not in _MID_BLOCKS:
            raise NotImplementedError(
                f"mid_block_type {self.mid_block_type!r} not supported; "
                f"supported: {list(_MID_BLOCKS)}"
            )
        unsupported = {
            "encoder_hid_dim": (self.encoder_hid_dim, None),
            "encoder_hid_dim_type": (self.encoder_hid_dim_type, None),
            "class_embed_type": (self.class_embed_type, None),
            "dual_cross_attention": (self.dual_cross_attention, False),
            "attention_type": (self.attention_type, "default"),
            "time_embedding_type": (self.time_embedding_type, "positional"),
        }
        if self.addition_embed_type not in (None, "text_time"):
            raise NotImplementedError(
                f"UNet2DConditionModel(addition_embed_type={self.addition_embed_type!r}) is not "
                "supported by jaxdiff yet; only None (SD 1.x/2.x) and 'text_time' (SDXL)"
            )
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                "addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise NotImplementedError(
                    f"UNet2DConditionModel({name}={value!r}) is not supported by jaxdiff yet; "
                    f"only {name}={supported!r} (Stable Diffusion 1.x/2.x UNets)"
                )
        if self.num_attention_heads is not None:
            # diffusers' own constructor rejects it (diffusers issue #2011): the number of heads
            # is read from attention_head_dim.
            raise ValueError(
                "num_attention_heads must be None, as in diffusers: the number of heads per "
                "level is given by attention_head_dim (diffusers issue #2011)"
            )
        if self.norm_num_groups is None:
            raise NotImplementedError(
                "norm_num_groups=None is not supported: the ResNet blocks need a group count"
            )
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(
                "resnet_time_scale_shift must be 'default' or 'scale_shift', got "
                f"{self.resnet_time_scale_shift!r}"
            )
        if (
            self.transformer_layers_per_block_is_nested()
            and self.reverse_transformer_layers_per_block is None
        ):
            raise ValueError(
                "transformer_layers_per_block with per-layer lists needs "
                "reverse_transformer_layers_per_block"
            )
        for k in (self.conv_in_kernel, self.conv_out_kernel):
            if k % 2 != 1:
                raise ValueError(f"conv_in_kernel/conv_out_kernel must be odd, got {k}")
        if len(set(self._per_block("cross_attention_dim"))) != 1:
            raise NotImplementedError(
                "per-block cross_attention_dim with different values is not supported, got "
                f"{self.cross_attention_dim}"
            )
        get_activation(self.act_fn)

    def transformer_layers_per_block_is_nested(self) -> bool:
        tl = self.transformer_layers_per_block
        return isinstance(tl, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tl)

    def _per_block(self, name: str) -> tuple:
        return _as_tuple(getattr(self, name), len(self.down_block_types), name)

    @property
    def context_dim(self) -> int:
        """The width ``encoder_hidden_states`` must have (``cross_attention_dim``)."""
        return int(self._per_block("cross_attention_dim")[0])

    def _time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def _text_time_embedding(self, added: dict | None, batch: int, temb_dim: int, dtype):
        r"""SDXL's added embedding (Podell et al. 2023, Sec. 2.2):
        :math:`\mathrm{MLP}([\text{text\_embeds}, \gamma(\text{time\_ids}_1), \ldots,
        \gamma(\text{time\_ids}_K)])`, :math:`\gamma` the sinusoidal embedding of width
        ``addition_time_embed_dim``."""
        width = self.projection_class_embeddings_input_dim
        if added is None and self.is_initializing():
            add_embeds = jnp.zeros((batch, width), dtype)
        else:
            missing = [k for k in ("text_embeds", "time_ids") if k not in (added or {})]
            if missing:
                raise ValueError(
                    "addition_embed_type='text_time' needs added_cond_kwargs with 'text_embeds' "
                    f"(batch, pooled width) and 'time_ids' (batch, K); missing {missing}"
                )
            text_embeds = jnp.asarray(added["text_embeds"])
            time_ids = jnp.asarray(added["time_ids"])
            if (
                text_embeds.ndim != 2
                or time_ids.ndim != 2
                or {
                    text_embeds.shape[0],
                    time_ids.shape[0],
                }
                != {batch}
            ):
                raise ValueError(
                    f"added_cond_kwargs: text_embeds must be (batch={batch}, P) and time_ids "
                    f"(batch={batch}, K), got {text_embeds.shape} and {time_ids.shape}"
                )
            got = text_embeds.shape[1] + time_ids.shape[1] * self.addition_time_embed_dim
            if got != width:
                raise ValueError(
                    f"added_cond_kwargs: text_embeds width {text_embeds.shape[1]} + "
                    f"{time_ids.shape[1]} time_ids x addition_time_embed_dim "
                    f"{self.addition_time_embed_dim} = {got}, but "
                    f"projection_class_embeddings_input_dim is {width}"
                )
            time_embeds = Timesteps(
                self.addition_time_embed_dim,
                self.flip_sin_to_cos,
                self.freq_shift,
                name="add_time_proj",
            )(time_ids.reshape(-1))
            time_embeds = time_embeds.reshape(batch, -1)
            add_embeds = jnp.concatenate(
                [text_embeds.astype(jnp.float32), time_embeds.astype(jnp.float32)], axis=-1
            ).astype(dtype)
        return TimestepEmbedding(width, temb_dim, act_fn="silu", dtype=dtype, name="add_embedding")(
            add_embeds
        )

    def dummy_inputs(self) -> tuple:
        size = 2 ** (len(self.block_out_channels) - 1)
        sample = jnp.zeros((1, size, size, self.in_channels), jnp.float32)
        timesteps = jnp.ones((1,), jnp.float32)
        context = jnp.zeros((1, 1, self.context_dim), jnp.float32)
        return sample, timesteps, context

    # ---------------------------------------------------------------------------------------
    # Input validation (at trace time: shapes are static)

    def _check_inputs(self, sample: Array, timesteps: Array, context: Array) -> None:
        n = len(self.block_out_channels)
        check_unet_inputs(sample, timesteps, self.in_channels, n, any_size=True)
        b = sample.shape[0]
        if context.ndim != 3:
            raise ValueError(
                "encoder_hidden_states must have shape (batch, sequence, cross_attention_dim="
                f"{self.context_dim}), got shape {context.shape}"
            )
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"encoder_hidden_states has width {context.shape[-1]} but the model expects "
                f"cross_attention_dim={self.context_dim} (e.g. 768 for SD 1.x, 1024 for SD 2.x); "
                f"got shape {context.shape}"
            )
        if context.shape[1] == 0:
            raise ValueError(
                "encoder_hidden_states must hold at least one token, got shape "
                f"{context.shape} (sequence length 0)"
            )
        if context.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states has batch {context.shape[0]}, sample has batch {b}"
            )

    # ---------------------------------------------------------------------------------------

    @nn.compact
    def __call__(
        self,
        sample: Array,
        timesteps: Array | float | int,
        encoder_hidden_states: Array,
        encoder_attention_mask: Array | None = None,
        timestep_cond: Array | None = None,
        class_labels: Array | None = None,
        added_cond_kwargs: dict[str, Array] | None = None,
        train: bool = False,
    ) -> UNet2DConditionOutput:
        """Predicts the model output for a batch of noisy latents.

        Args:
            sample: NHWC ``(B, H, W, in_channels)``, any H and W (sizes that are not
                multiples of ``2 ** (len(block_out_channels) - 1)`` are upsampled to the skips'
                sizes, as in diffusers).
            timesteps: scalar, ``(1,)`` or ``(B,)`` (integer or float).
            encoder_hidden_states: ``(B, S, cross_attention_dim)``, e.g. the CLIP text
                encoder's ``last_hidden_state``.
            encoder_attention_mask: optional ``(B, S)``, 1/True for context tokens to attend to
                (a row with none attends to all, as in diffusers).
            timestep_cond: ``(B, time_cond_proj_dim)`` (LCM's guidance embedding), only with
                ``time_cond_proj_dim``.
            class_labels: ``(B,)`` integer labels, only with ``num_class_embeds``.
            added_cond_kwargs: SDXL's ``{"text_embeds": (B, P), "time_ids": (B, K)}``, only
                with ``addition_embed_type="text_time"``; ``P + K * addition_time_embed_dim``
                must equal ``projection_class_embeddings_input_dim``.
            train: enables dropout (rng ``"dropout"``).
        """
        self._check_config()
        sample = jnp.asarray(sample)
        timesteps = check_unet_timesteps(timesteps)
        if encoder_hidden_states is None:
            raise ValueError(
                "encoder_hidden_states is required: a (batch, sequence, cross_attention_dim="
                f"{self.context_dim}) array, e.g. the text encoder's last_hidden_state"
            )
        context = jnp.asarray(encoder_hidden_states)
        self._check_inputs(sample, timesteps, context)
        dtype = self.dtype
        boc = tuple(int(c) for c in self.block_out_channels)
        n_blocks = len(boc)
        batch = sample.shape[0]
        temb_dim = self._time_embed_dim()

        mask = None
        if encoder_attention_mask is not None:
            mask = jnp.asarray(encoder_attention_mask)
            if mask.shape != context.shape[:2]:
                raise ValueError(
                    "encoder_attention_mask must have shape (batch, sequence) = "
                    f"{context.shape[:2]}, got {mask.shape}"
                )
            mask = mask.astype(bool)
            # diffusers masks with a -10000 bias, which shifts every logit of a row that masks
            # all its tokens equally: such a row attends to all of them, unmasked.
            mask = mask | ~mask.any(axis=-1, keepdims=True)
        context = context.astype(dtype)

        if self.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time embedding: e = MLP(gamma(t)) [+ class embedding]
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (batch,))
        t_emb = Timesteps(boc[0], self.flip_sin_to_cos, self.freq_shift, name="time_proj")(
            timesteps
        )
        if self.time_cond_proj_dim is None and timestep_cond is not None:
            raise ValueError("timestep_cond was given but the model has time_cond_proj_dim=None")
        if timestep_cond is not None:
            timestep_cond = jnp.asarray(timestep_cond)
            if timestep_cond.shape != (batch, self.time_cond_proj_dim):
                raise ValueError(
                    f"timestep_cond must have shape (batch, time_cond_proj_dim) = "
                    f"({batch}, {self.time_cond_proj_dim}), got {timestep_cond.shape}"
                )
        emb = TimestepEmbedding(
            boc[0],
            temb_dim,
            act_fn=self.act_fn,
            post_act_fn=self.timestep_post_act,
            cond_proj_dim=self.time_cond_proj_dim,
            dtype=dtype,
            name="time_embedding",
        )(t_emb.astype(dtype), timestep_cond)

        if self.num_class_embeds is not None:
            if class_labels is None and self.is_initializing():
                class_labels = jnp.zeros((batch,), jnp.int32)
            if class_labels is None:
                raise ValueError(
                    "class_labels (shape (batch,)) are required: "
                    f"num_class_embeds={self.num_class_embeds}"
                )
            class_emb = nn.Embed(
                self.num_class_embeds, temb_dim, dtype=dtype, name="class_embedding"
            )(jnp.broadcast_to(jnp.asarray(class_labels).reshape(-1), (batch,)).astype(jnp.int32))
            if self.class_embeddings_concat:
                emb = jnp.concatenate([emb, class_emb.astype(dtype)], axis=-1)
            else:
                emb = emb + class_emb.astype(dtype)
        elif class_labels is not None:
            raise ValueError("class_labels were given but the model has num_class_embeds=None")
        if self.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, batch, temb_dim, dtype)
        elif added_cond_kwargs:
            raise ValueError(
                "added_cond_kwargs were given but the model has addition_embed_type=None"
            )
        if self.time_embedding_act_fn is not None:
            emb = get_activation(self.time_embedding_act_fn)(emb)
        blocks_temb_dim = emb.shape[-1]

        # per-block settings, diffusers' num_attention_heads := attention_head_dim quirk
        heads = self._per_block("attention_head_dim")
        cross_dims = self._per_block("cross_attention_dim")
        layers = self._per_block("layers_per_block")
        only_cross = self._per_block("only_cross_attention")
        tlayers = self._per_block("transformer_layers_per_block")
        if self.reverse_transformer_layers_per_block is not None:
            rev_tlayers = _as_tuple(
                self.reverse_transformer_layers_per_block,
                n_blocks,
                "reverse_transformer_layers_per_block",
            )
        else:
            rev_tlayers = tlayers[::-1]
        common = dict(
            temb_channels=blocks_temb_dim,
            dropout=self.dropout,
            resnet_eps=self.norm_eps,
            resnet_act_fn=self.act_fn,
            resnet_groups=self.norm_num_groups,
            resnet_time_scale_shift=self.resnet_time_scale_shift,
            attention_chunk_size=self.attention_chunk_size,
            dtype=dtype,
        )

        def attn_kwargs(i: int, reverse: bool) -> dict:
            j = n_blocks - 1 - i if reverse else i
            return dict(
                num_attention_heads=int(heads[j]),
                cross_attention_dim=int(cross_dims[j]),
                use_linear_projection=self.use_linear_projection,
                only_cross_attention=bool(only_cross[j]),
                upcast_attention=self.upcast_attention,
            )

        # 2. down path
        h = conv(
            boc[0],
            self.conv_in_kernel,
            padding=(self.conv_in_kernel - 1) // 2,
            dtype=dtype,
            name="conv_in",
        )(sample.astype(dtype))
        skips: tuple[Array, ...] = (h,)
        output_channel = boc[0]
        for i, block_type in enumerate(self.down_block_types):
            input_channel, output_channel = output_channel, boc[i]
            kw = dict(
                in_channels=input_channel,
                out_channels=output_channel,
                num_layers=int(layers[i]),
                add_downsample=i < n_blocks - 1,
                downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
                **common,
            )
            if block_type == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(
                    transformer_layers_per_block=tlayers[i], **attn_kwargs(i, False), **kw
                )
                h, res = block(h, emb, context, mask, train=train)
            else:
                h, res = DownBlock2D(**kw)(h, emb, train)
            skips += res

        # 3. mid
        if self.mid_block_type == "UNetMidBlock2DCrossAttn":
            mid_kw = attn_kwargs(n_blocks - 1, False)
            mid_kw["only_cross_attention"] = False  # diffusers does not pass it to this block
            h = UNetMidBlock2DCrossAttn(
                in_channels=boc[-1],
                transformer_layers_per_block=tlayers[-1],
                output_scale_factor=self.mid_block_scale_factor,
                name="mid_block",
                **mid_kw,
                **common,
            )(h, emb, context, mask, train=train)
        elif self.mid_block_type == "UNetMidBlock2D":
            h = UNetMidBlock2D(
                in_channels=boc[-1],
                temb_channels=blocks_temb_dim,
                dropout=self.dropout,
                num_layers=0,
                resnet_eps=self.norm_eps,
                resnet_act_fn=self.act_fn,
                output_scale_factor=self.mid_block_scale_factor,
                resnet_groups=self.norm_num_groups,
                resnet_time_scale_shift=self.resnet_time_scale_shift,
                add_attention=False,
                dtype=dtype,
                name="mid_block",
            )(h, emb, train)

        # 4. up path (skips consumed last-first). When H or W is not a multiple of the overall
        # factor 2 ** (n - 1), the stride-2 convs rounded up on the way down: as in diffusers
        # (forward_upsample_size), each upsampler then resizes to its next skip's size.
        factor = 2 ** (n_blocks - 1)
        forward_upsample_size = sample.shape[1] % factor != 0 or sample.shape[2] % factor != 0
        reversed_boc = boc[::-1]
        output_channel = reversed_boc[0]
        for i, block_type in enumerate(self.up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_boc[i]
            input_channel = reversed_boc[min(i + 1, n_blocks - 1)]
            num_layers = int(layers[n_blocks - 1 - i]) + 1
            res, skips = skips[-num_layers:], skips[:-num_layers]
            upsample_size = None
            if i < n_blocks - 1 and forward_upsample_size:
                upsample_size = tuple(skips[-1].shape[1:3])
            kw = dict(
                in_channels=input_channel,
                out_channels=output_channel,
                prev_output_channel=prev_output_channel,
                num_layers=num_layers,
                add_upsample=i < n_blocks - 1,
                name=f"up_blocks_{i}",
                **common,
            )
            if block_type == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(
                    transformer_layers_per_block=rev_tlayers[i], **attn_kwargs(i, True), **kw
                )
                h = block(h, res, emb, context, mask, upsample_size, train=train)
            else:
                h = UpBlock2D(**kw)(h, res, emb, upsample_size, train=train)

        # 5. out
        h = apply_norm(group_norm(self.norm_num_groups, self.norm_eps, "conv_norm_out"), h, dtype)
        h = get_activation(self.act_fn)(h)
        h = conv(
            self.out_channels,
            self.conv_out_kernel,
            padding=(self.conv_out_kernel - 1) // 2,
            dtype=dtype,
            name="conv_out",
        )(h)
        return UNet2DConditionOutput(sample=h)


def sd15_config(**overrides) -> dict:
    """The UNet config of Stable Diffusion v1.5 (``cross_attention_dim=768``, 8 heads)."""
    cfg = dict(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
    )
    cfg.update(overrides)
    return cfg


def sd21_config(**overrides) -> dict:
    """The UNet config of Stable Diffusion v2.1 (768-v): heads (5, 10, 20, 20) (head width
    64), ``cross_attention_dim=1024``, linear projections, upcast attention."""
    cfg = dict(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
    )
    cfg.update(overrides)
    return cfg
