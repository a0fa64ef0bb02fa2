r"""The CLIP text encoder of Stable Diffusion, in Flax Linen, weight-compatible with transformers.

CLIP's text tower (*Radford et al. (2021), Sec. 2.4*) is a causal pre-LayerNorm Transformer
(*Vaswani et al. (2017)*; pre-LN as in GPT-2, *Radford et al. (2019)*): with token embeddings
:math:`E`, position embeddings :math:`P` and input ids :math:`w_{1..T}`,

.. math::

    h^{(0)}_t = E[w_t] + P[t], \qquad
    h' = h^{(l-1)} + \mathrm{Attn}_\text{causal}(\mathrm{LN}_1(h^{(l-1)})), \qquad
    h^{(l)} = h' + \mathrm{fc}_2(\phi(\mathrm{fc}_1(\mathrm{LN}_2(h')))),

and ``last_hidden_state`` is :math:`\mathrm{LN}_f(h^{(L)})`. :math:`\phi` is ``quick_gelu``
(:math:`x\,\sigma(1.702x)`, the openai ViT-L/14 text encoder of SD 1.x) or ``gelu`` (the OpenCLIP
ViT-H/14 text encoder of SD 2.x). ``pooler_output`` is the state of the end-of-text token,
chosen exactly as transformers chooses it (see :meth:`CLIPTextModel.__call__`).

The params tree mirrors the PyTorch module tree, so the strict key table is the generic one
(``text_model.encoder.layers.3.self_attn.q_proj.weight`` <-> ``params["text_model"]["encoder"]
["layers_3"]["self_attn"]["q_proj"]["kernel"]``)::

    model, params = CLIPTextModel.from_pretrained(repo, subfolder="text_encoder")
    ids = tokenize(load_tokenizer(repo), ["a photo of a cat"])
    out = model.apply({"params": params}, ids)
    out.last_hidden_state            # (batch, 77, hidden_size): the UNet's encoder_hidden_states
    out.hidden_states[-2]            # with output_hidden_states=True: "clip skip" 1 (pre final LN)

The config is transformers' ``config.json`` (``CLIPTextConfig`` fields and defaults); weights are
``model.safetensors``. :meth:`CLIPTextModel.save_pretrained` writes both so that
``transformers.CLIPTextModel.from_pretrained`` loads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.configuration import POS_INT, FrozenConfig, _accepted_keys
from jaxdiff.models.modeling_utils import FlaxModelMixin
from jaxdiff.utils.checks import host_value

__all__ = [
    "CLIPTextModel",
    "CLIPTextModelOutput",
    "CLIPTextModelWithProjection",
    "CLIPTextModelWithProjectionOutput",
]

_PREFIX = "text_model."
_PROJECTION = "text_projection."  # CLIPTextModelWithProjection's head, outside text_model

# Keys every transformers config.json may carry (PretrainedConfig's own attributes and
# bookkeeping): kept for the round trip, never warned about.
_TRANSFORMERS_KEYS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
        "dropout", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
        "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
        "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
        "cross_attention_hidden_size",
        "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id",
        "num_labels", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
        "task_specific_params", "problem_type", "max_length", "min_length", "do_sample",
        "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
        "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "gradient_checkpointing", "layerdrop",
    }
)  # fmt: skip


def quick_gelu(x: jax.Array) -> jax.Array:
    r"""QuickGELU, :math:`x\,\sigma(1.702\,x)` (*Hendrycks & Gimpel (2016), Sec. 2*), used by
    openai CLIP."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@flax.struct.dataclass
class CLIPTextModelOutput:
    """What :class:`CLIPTextModel` returns (transformers' ``BaseModelOutputWithPooling``).

    Attributes:
        last_hidden_state: ``(batch, seq, hidden_size)``, after the final layer norm.
        pooler_output: ``(batch, hidden_size)``, ``last_hidden_state`` at the end-of-text token.
        hidden_states: with ``output_hidden_states=True``, ``num_hidden_layers + 1`` arrays of
            ``(batch, seq, hidden_size)``: the embeddings, then each layer's output (before
            the final layer norm); ``None`` otherwise.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@flax.struct.dataclass
class CLIPTextModelWithProjectionOutput:
    """What :class:`CLIPTextModelWithProjection` returns (transformers' ``CLIPTextModelOutput``).

    Attributes:
        text_embeds: ``(batch, projection_dim)``, the pooled end-of-text state times
            ``text_projection`` (no bias, no normalization): SDXL's pooled prompt embedding.
        last_hidden_state, hidden_states: as :class:`CLIPTextModelOutput`.
    """

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _TextConfig:
    """The config fields the submodules read (a plain value, not a Linen module)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    initializer_factor: float


def _layer_norm(name: str, eps: float) -> nn.LayerNorm:
    # Statistics and affine in fp32 whatever the compute dtype.
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


def _dense(features: int, std: float, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


class CLIPAttention(nn.Module):
    r"""Multi-head causal self-attention, :math:`\mathrm{softmax}(QK^\top/\sqrt{d_h} + M)V`
    (*Vaswani et al. (2017), Eq. 1*), through ``jax.nn.dot_product_attention``."""

    hidden_size: int
    num_heads: int
    in_std: float
    out_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        batch, seq, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        x = x.astype(self.dtype)

        def heads(name: str) -> jax.Array:
            y = _dense(self.hidden_size, self.in_std, self.dtype, name)(x)
            return y.reshape(batch, seq, self.num_heads, head_dim)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        # key_mask: (batch, 1, 1, seq) booleans, True where a key may be attended to; combined
        # with the causal mask. Softmax is fp32 inside dot_product_attention for any dtype.
        out = jax.nn.dot_product_attention(
            q, k, v, mask=key_mask, scale=head_dim**-0.5, is_causal=True
        )
        if key_mask is not None:
            # A query whose keys j <= i are all padding (left padding) gets a zero output, as
            # in transformers' default sdpa attention; a softmax over all-masked logits would
            # average every value (transformers' eager attention does that instead).
            has_key = jnp.cumsum(key_mask[:, 0, 0, :], axis=-1) > 0  # (batch, seq)
            out = jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype))
        out = out.reshape(batch, seq, self.hidden_size)
        return _dense(self.hidden_size, self.out_std, self.dtype, "out_proj")(out)


class CLIPMLP(nn.Module):
    """The feed-forward block ``fc2(act(fc1(x)))``; the activation is evaluated in fp32."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    fc1_std: float
    fc2_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.intermediate_size, self.fc1_std, self.dtype, "fc1")(x.astype(self.dtype))
        h = _ACTIVATIONS[self.hidden_act](h.astype(jnp.float32)).astype(self.dtype)
        return _dense(self.hidden_size, self.fc2_std, self.dtype, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """One pre-LN Transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    The residual stream is kept in fp32; the projections run in ``dtype``.
    """

    config: _TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        c = self.config
        factor = c.initializer_factor
        in_std = c.hidden_size**-0.5 * (2 * c.num_hidden_layers) ** -0.5 * factor
        h = _layer_norm("layer_norm1", c.layer_norm_eps)(x)
        h = CLIPAttention(
            c.hidden_size,
            c.num_attention_heads,
            in_std=in_std,
            out_std=c.hidden_size**-0.5 * factor,
            dtype=self.dtype,
            name="self_attn",
        )(h, key_mask)
        x = x + h.astype(jnp.float32)
        h = _layer_norm("layer_norm2", c.layer_norm_eps)(x)
        h = CLIPMLP(
            c.hidden_size,
            c.intermediate_size,
            c.hidden_act,
            fc1_std=(2 * c.hidden_size) ** -0.5 * factor,
            fc2_std=in_std,
            dtype=self.dtype,
            name="mlp",
        )(h)
        return x + h.astype(jnp.float32)


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` encoder layers (``encoder.layers.<i>`` in PyTorch)."""

    config: _TextConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.layers = [
            CLIPEncoderLayer(self.config, dtype=self.dtype)
            for _ in range(self.config.num_hidden_layers)
        ]

    def __call__(self, x, key_mask, output_hidden_states: bool = False):
        all_states = (x,) if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, key_mask)
            if output_hidden_states:
                all_states = all_states + (x,)
        return x, all_states


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings (fp32)."""

    config: _TextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        std = 0.02 * c.initializer_factor
        tok = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.initializers.normal(std),
            dtype=jnp.float32,
            name="token_embedding",
        )
        pos = nn.Embed(
            c.max_position_embeddings,
            c.hidden_size,
            embedding_init=nn.initializers.normal(std),
            dtype=jnp.float32,
            name="position_embedding",
        )
        seq = input_ids.shape[-1]
        return tok(input_ids) + pos(jnp.arange(seq))[None]


class CLIPTextTransformer(nn.Module):
    """transformers' ``text_model``: embeddings, encoder, final layer norm."""

    config: _TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, key_mask, output_hidden_states: bool):
        h = CLIPTextEmbeddings(self.config, name="embeddings")(input_ids)
        h, all_states = CLIPEncoder(self.config, dtype=self.dtype, name="encoder")(
            h, key_mask, output_hidden_states
        )
        h = _layer_norm("final_layer_norm", self.config.layer_norm_eps)(h)
        return h, all_states


class CLIPTextModel(FlaxModelMixin, nn.Module):
    r"""The CLIP text transformer (*Radford et al. (2021)*), as transformers' ``CLIPTextModel``.

    Fields are transformers' ``CLIPTextConfig`` fields with its defaults, plus ``dtype`` (the
    compute dtype of the projections; layer norms, softmax, activations and the residual stream
    stay fp32, and the outputs are returned in ``dtype``). The SD 1.x encoder is the default
    width-512 config changed to ``hidden_size=768, intermediate_size=3072,
    num_attention_heads=12, projection_dim=768``; SD 2.x uses ``hidden_size=1024,
    intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"``.

    ``attention_dropout`` and the initializer fields are kept for the config round trip; the
    module runs deterministically (``attention_dropout`` is 0 in every Stable Diffusion config),
    and ``init`` follows transformers' ``_init_weights`` scales.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | tuple[int, ...] | None = 49407
    dtype: Any = jnp.float32

    weights_name = "model"
    _list_names = ("layers",)
    _architecture = "CLIPTextModel"

    _config_rules = {"num_attention_heads": POS_INT}

    def _validate_config(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )

    # ------------------------------------------------------------------ forward

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextModelOutput:
        r"""Encodes token ids (see :meth:`_encode`)."""
        return self._encode(input_ids, attention_mask, output_hidden_states)

    def _encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        output_hidden_states: bool,
    ) -> CLIPTextModelOutput:
        r"""Encodes token ids (called from the compact ``__call__``).

        Args:
            input_ids: integer ``(batch, seq)`` with ``seq <= max_position_embeddings``
                (77 for Stable Diffusion prompts, see ``jaxdiff.utils.tokenizer.tokenize``).
            attention_mask: optional ``(batch, seq)``, 1 for tokens to attend to and 0 for
                padding; combined with the causal mask. Stable Diffusion pipelines pass none.
            output_hidden_states: also return every layer's output (for "clip skip").

        Returns:
            :class:`CLIPTextModelOutput`. ``pooler_output`` is taken, per row, at
            ``argmax(input_ids)`` when ``eos_token_id == 2`` (the legacy openai configs, whose
            end-of-text token 49407 is the largest id; also when it is None), otherwise at the
            first position whose id equals ``eos_token_id`` (position 0 if there is none), as
            in transformers. Query rows that may attend to no key at all (left padding with an
            ``attention_mask``) get a zero attention output, as with transformers' default
            ``sdpa`` attention (its ``eager`` attention averages every value there instead);
            they are padding positions.
        """
        host_ids = host_value(input_ids)  # None inside jit: traced ids are not checked
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must have shape (batch, seq), got shape {tuple(input_ids.shape)}"
                + (" (use input_ids[None] for one prompt)" if input_ids.ndim == 1 else "")
            )
        if 0 in input_ids.shape:
            raise ValueError(
                "input_ids must hold at least one prompt of at least one token, got shape "
                f"{tuple(input_ids.shape)}"
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if host_ids is not None:
            lo, hi = int(host_ids.min()), int(host_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                # jnp.take would clamp or NaN-fill them: a silent wrong embedding
                raise ValueError(
                    f"input_ids must be token ids in [0, vocab_size={self.vocab_size}), got ids "
                    f"from {lo} to {hi}: was the prompt tokenized for another model?"
                )
        seq = input_ids.shape[1]
        if seq > self.max_position_embeddings:
            raise ValueError(
                f"input_ids has {seq} tokens, more than max_position_embeddings="
                f"{self.max_position_embeddings}: truncate the prompt (tokenize(..., "
                f"max_length={self.max_position_embeddings}))"
            )
        key_mask = None
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            key_mask = attention_mask.astype(bool)[:, None, None, :]

        cfg = _TextConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(_TextConfig)}
        )
        h, all_states = CLIPTextTransformer(cfg, dtype=self.dtype, name="text_model")(
            input_ids, key_mask, output_hidden_states
        )
        rows = jnp.arange(h.shape[0])
        eos = self.eos_token_id
        if eos == 2 or eos is None:
            # Legacy configs (eos_token_id 2 before transformers PR #24773): the end-of-text
            # token has the largest id, so it is the argmax (first occurrence). openai CLIP's
            # own rule, also used here when no eos_token_id is set.
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_ids = jnp.asarray(eos if isinstance(eos, tuple) else (eos,), input_ids.dtype)
            is_eos = jnp.any(input_ids[..., None] == eos_ids, axis=-1)
            pos = jnp.argmax(is_eos.astype(jnp.int32), axis=-1)
        pooled = h[rows, pos]
        out_dtype = self.dtype
        return CLIPTextModelOutput(
            last_hidden_state=h.astype(out_dtype),
            pooler_output=pooled.astype(out_dtype),
            hidden_states=(
                tuple(s.astype(out_dtype) for s in all_states) if output_hidden_states else None
            ),
        )

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, 1), jnp.int32),)

    # ------------------------------------------------------------------ weights

    @staticmethod
    def _ignore_unexpected(key: str) -> bool:
        """The non-persistent ``position_ids`` buffer that some checkpoints carry."""
        return key.endswith("embeddings.position_ids")

    @classmethod
    def _normalize_state_dict(cls, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """transformers >= 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix that
        older transformers and Stable Diffusion checkpoints use: add it where missing."""
        return {
            k if k.startswith(_PREFIX) or k.startswith(_PROJECTION) else _PREFIX + k: v
            for k, v in state_dict.items()
        }

    # ------------------------------------------------------------------ config (transformers)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any = None, **kwargs):
        """Builds the module from a transformers ``CLIPTextConfig`` dict (``config.json``).

        transformers' own bookkeeping keys (``architectures``, ``model_type``, ``dtype``,
        ``transformers_version``, ...) are kept quietly for the round trip; other unknown keys
        are kept with a warning.
        """
        config = cls._config_dict(config if config is not None else {})
        if config.get("model_type") == "clip" and isinstance(config.get("text_config"), Mapping):
            config = dict(config["text_config"])  # a full CLIPConfig: use its text part
        standard = {k: v for k, v in config.items() if k in _TRANSFORMERS_KEYS}
        rest = {k: v for k, v in config.items() if k not in _TRANSFORMERS_KEYS}
        if isinstance(rest.get("eos_token_id"), list):
            rest["eos_token_id"] = tuple(rest["eos_token_id"])
        module = super().from_config(rest, **kwargs)
        extra = dict(standard)
        extra.update(getattr(module, "_extra_config", {}))
        object.__setattr__(module, "_extra_config", extra)
        return module

    @property
    def config(self) -> FrozenConfig:
        """The transformers config: the fields, ``architectures``/``model_type`` and the kept
        extra keys (no diffusers ``_class_name``/``_diffusers_version``)."""
        names, _, _ = _accepted_keys(type(self))
        data: dict[str, Any] = dict(getattr(self, "_extra_config", {}))
        data.update({k: getattr(self, k) for k in names})
        data["architectures"] = [self._architecture]
        data["model_type"] = "clip_text_model"
        return FrozenConfig(data, class_name=type(self).__name__)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        params: dict,
        variant: str | None = None,
        dtype: Any = None,
    ) -> None:
        """Writes transformers' layout: ``config.json`` and ``model[.variant].safetensors``
        (keys ``text_model.…``), loadable by ``transformers.CLIPTextModel.from_pretrained``.

        Args:
            params: the params tree.
            variant: e.g. ``"fp16"`` for ``model.fp16.safetensors``.
            dtype: storage dtype (default: the params' own); recorded as the config's
                ``dtype``/``torch_dtype``.
        """
        super().save_pretrained(save_directory, params, variant=variant, dtype=dtype)
        if isinstance(params.get("params"), dict) and len(params) == 1:
            params = params["params"]
        stored = np.dtype(dtype) if dtype is not None else None
        if stored is None:
            leaf = jax.tree_util.tree_leaves(params)[0]
            stored = np.dtype(leaf.dtype)
        data = self.config.to_dict()
        for key in [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]:
            data[key] = stored.name  # "float32", "float16", "bfloat16"
        path = os.path.join(os.fspath(save_directory), self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


class CLIPTextModelWithProjection(CLIPTextModel):
    r""":class:`CLIPTextModel` plus transformers' ``text_projection`` head (a linear map without
    bias to ``projection_dim``): :math:`\text{text\_embeds} = W_p\,h_{\text{eos}}`
    (*Radford et al. (2021)*, Fig. 3, before the L2 normalization of the contrastive loss).
    SDXL's second text encoder (OpenCLIP bigG/14), whose ``text_embeds`` are the pooled
    prompt embedding of the UNet's ``added_cond_kwargs``. Loads and saves transformers'
    ``CLIPTextModelWithProjection`` layout (``text_model.…`` and ``text_projection.weight``).
    """

    _architecture = "CLIPTextModelWithProjection"

    _config_rules = {**CLIPTextModel._config_rules, "projection_dim": POS_INT}

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextModelWithProjectionOutput:
        """Encodes token ids as :class:`CLIPTextModel` and projects the pooled state."""
        out = self._encode(input_ids, attention_mask, output_hidden_states)
        text_embeds = nn.Dense(
            int(self.projection_dim), use_bias=False, dtype=self.dtype, name="text_projection"
        )(out.pooler_output)
        return CLIPTextModelWithProjectionOutput(
            text_embeds=text_embeds.astype(self.dtype),
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
        )
