r"""Building blocks shared by the UNets and the VAE, named after diffusers' modules.

Every submodule carries the name of the PyTorch attribute it replaces (``norm1``, ``conv1``,
``time_emb_proj``, ``to_q``, ``to_out_0`` ...), so the strict key table of
:mod:`jaxdiff.loaders.state_dict` maps Flax params to diffusers' state-dict keys one to one.
Arrays are NHWC. ``dtype`` is the compute dtype of convolutions and linear layers (float32 by
default; bfloat16/float16 supported); group norms and the attention softmax always run in
float32.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import conv_grads, onednn_conv
from jaxdiff.models.group_norm import GroupNorm

Array = jax.Array

# --------------------------------------------------------------------------------------------
# Activations


def mish(x: Array) -> Array:
    r"""Mish, :math:`x \tanh(\mathrm{softplus}(x))` (*Misra (2019)*)."""
    return x * jnp.tanh(jax.nn.softplus(x))


def _gelu_exact(x: Array) -> Array:
    # torch.nn.GELU() defaults to the exact erf form, not the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": mish,
    "gelu": _gelu_exact,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation named ``name`` (diffusers' ``get_activation``): silu/swish, mish, gelu,
    relu."""
    try:
        return ACTIVATIONS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown activation function {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Norms and convolutions


def group_norm(num_groups: int, eps: float, name: str) -> GroupNorm:
    """A float32 :class:`GroupNorm` whose params sit directly under ``name`` (PyTorch layout)."""
    return GroupNorm(num_groups=num_groups, epsilon=eps, name=name)


def apply_norm(norm: nn.Module, x: Array, dtype) -> Array:
    """Runs ``norm`` in float32 and casts the result to ``dtype``."""
    return norm(x.astype(jnp.float32)).astype(dtype)


# Below this many output pixels (H_out * W_out) a k x k convolution runs as one matmul over
# im2col patches. XLA:CPU's convolution falls off a cliff at tiny spatial sizes with many
# channels (measured on 2 x86 cores: 135 ms for a 3x3, 512->512 conv on a 16x2x2 batch, against
# 2.2 ms as a matmul), and the deepest UNet levels live exactly there.
IM2COL_MAX_PIXELS = 16


def _im2col(x: Array, kernel_size: int, stride: int) -> Array:
    """The ``kernel_size**2`` shifted (and strided) views of padded NHWC ``x``, concatenated
    on the channel axis in the (row, column, channel) order of an HWIO kernel."""
    n, h, w, c = x.shape
    oh = (h - kernel_size) // stride + 1
    ow = (w - kernel_size) // stride + 1
    views = [
        jax.lax.slice(
            x,
            (0, i, j, 0),
            (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]
    return jnp.concatenate(views, axis=-1)


class Conv2d(nn.Module):
    """PyTorch's ``Conv2d`` on NHWC arrays: square kernel, symmetric zero padding.

    Params ``kernel`` (HWIO) and ``bias`` as in ``flax.linen.Conv``. A 1x1 kernel is a matmul;
    a k x k kernel whose output has at most ``IM2COL_MAX_PIXELS`` pixels is a matmul over im2col
    patches (same result, far faster on XLA:CPU); anything larger is
    ``lax.conv_general_dilated``, or oneDNN's convolution in float32 on the CPU after
    :func:`jaxdiff.use_onednn_convolutions` when the batch has at least
    ``onednn_conv.MIN_OUTPUT_PIXELS`` output pixels (:mod:`jaxdiff.models.onednn_conv`). Traced
    inside a train step on the CPU, XLA's convolution takes its gradients from
    :mod:`jaxdiff.models.conv_grads` (the same values, in the layout that stays fast in loops).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        out_h, out_w = ((size + 2 * p - k) // s + 1 for size in x.shape[1:3])
        if k == 1 and s == 1 and p == 0:
            y = x @ kernel[0, 0]
        elif out_h * out_w <= IM2COL_MAX_PIXELS:
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
            y = _im2col(x, k, s) @ kernel.reshape(k * k * x.shape[-1], self.features)
        elif (
            x.dtype == jnp.float32
            and x.shape[0] * out_h * out_w >= onednn_conv.MIN_OUTPUT_PIXELS
            and onednn_conv.enabled()
        ):
            y = onednn_conv.conv2d(x, kernel, (s, s), ((p, p), (p, p)))
        elif conv_grads.active():  # inside a train step: gradients that stay fast in loops
            y = conv_grads.conv2d(x, kernel, (s, s), ((p, p), (p, p)))
        else:
            # Padding inside the conv, not a jnp.pad before it: XLA:CPU's weight gradient of
            # pad + VALID conv is 2.5x slower than that of the padded conv.
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def conv(
    features: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int = 1,
    use_bias: bool = True,
    dtype=jnp.float32,
    name: str | None = None,
) -> Conv2d:
    """A PyTorch-style ``Conv2d`` on NHWC arrays (symmetric zero padding)."""
    return Conv2d(features, kernel_size, stride, padding, use_bias, dtype, name=name)


def upsample_nearest(x: Array, output_size: tuple[int, int] | None = None) -> Array:
    """Nearest-neighbour upsampling of NHWC ``x``: x2, or to ``output_size`` as
    ``torch.nn.functional.interpolate(mode="nearest")`` does (source ``floor(i * in / out)``)."""
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    h, w = x.shape[1:3]
    oh, ow = (int(s) for s in output_size)
    rows = np.floor(np.arange(oh) * (h / oh)).astype(np.int32).clip(0, h - 1)
    cols = np.floor(np.arange(ow) * (w / ow)).astype(np.int32).clip(0, w - 1)
    return x[:, rows][:, :, cols]


def avg_pool_2x2(x: Array) -> Array:
    """``torch.nn.AvgPool2d(kernel_size=2, stride=2)`` on NHWC ``x``."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def upfirdn2d(x: Array, kernel: np.ndarray, up: int = 1, down: int = 1, pad=(0, 0)) -> Array:
    """diffusers' ``upfirdn2d_native`` on NHWC ``x``: zero-insertion upsampling by ``up``, zero
    padding ``pad = (before, after)`` on both spatial axes, a depthwise correlation with the
    flipped 2-D FIR ``kernel`` (i.e. a true convolution), then keeping every ``down``-th pixel."""
    b, h, w, c = x.shape
    if up > 1:
        x = x.reshape(b, h, 1, w, 1, c)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, up - 1), (0, 0), (0, up - 1), (0, 0)))
        x = x.reshape(b, h * up, w * up, c)
    p0, p1 = pad
    x = jnp.pad(x, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
    x = x[:, max(-p0, 0) : x.shape[1] - max(-p1, 0), max(-p0, 0) : x.shape[2] - max(-p1, 0)]
    k = np.flip(np.asarray(kernel, np.float32), (0, 1))
    w_ = jnp.asarray(np.broadcast_to(k[:, :, None, None], k.shape + (1, c)), x.dtype)
    y = jax.lax.conv_general_dilated(
        x,
        w_,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )
    return y[:, ::down, ::down, :]


def _fir_kernel(kernel, scale: float) -> np.ndarray:
    k = np.asarray(kernel, np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    return k / k.sum() * scale


def fir_upsample_2d(x: Array, kernel=(1, 3, 3, 1), factor: int = 2, gain: float = 1) -> Array:
    """diffusers' ``upsample_2d`` (FIR upsampling of *Karras et al. (2020)*; NHWC, no conv)."""
    k = _fir_kernel(kernel, gain * factor**2)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample_2d(x: Array, kernel=(1, 3, 3, 1), factor: int = 2, gain: float = 1) -> Array:
    """diffusers' ``downsample_2d`` (FIR low-pass, then stride ``factor``; NHWC, no conv)."""
    k = _fir_kernel(kernel, gain)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


class Downsample2D(nn.Module):
    r"""Halves H and W: a stride-2 3x3 conv (``use_conv``) or a 2x2 average pool.

    ``padding=0`` pads one row/column at the bottom/right first, as diffusers (and the original
    DDPM code of *Ho et al. (2020)*) do. Param name ``conv`` as in diffusers.
    """

    channels: int
    use_conv: bool = False
    out_channels: int | None = None
    padding: int = 1
    kernel_size: int = 3
    bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: Array) -> Array:
        if hidden_states.shape[-1] != self.channels:
            raise ValueError(
                f"Downsample2D expects {self.channels} channels, got shape {hidden_states.shape}"
            )
        out_channels = self.out_channels or self.channels
        if not self.use_conv:
            if out_channels != self.channels:
                raise ValueError("Downsample2D without conv cannot change the channel count")
            return avg_pool_2x2(hidden_states)
        if self.padding == 0:
            hidden_states = jnp.pad(hidden_states, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            out_channels,
            self.kernel_size,
            stride=2,
            padding=self.padding,
            use_bias=self.bias,
            dtype=self.dtype,
            name="conv",
        )(hidden_states.astype(self.dtype))


class Upsample2D(nn.Module):
    r"""Doubles H and W: nearest-neighbour interpolation, then an optional 3x3 conv (``conv``).

    ``output_size`` (static ``(H, W)``) replaces the factor 2, as in diffusers when the input
    size is not a multiple of the UNet's overall downsampling factor.
    """

    channels: int
    use_conv: bool = False
    use_conv_transpose: bool = False
    out_channels: int | None = None
    kernel_size: int | None = None
    padding: int = 1
    bias: bool = True
    interpolate: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: Array, output_size: tuple[int, int] | None = None) -> Array:
        if hidden_states.shape[-1] != self.channels:
            raise ValueError(
                f"Upsample2D expects {self.channels} channels, got shape {hidden_states.shape}"
            )
        if self.use_conv_transpose:
            raise NotImplementedError("Upsample2D(use_conv_transpose=True) is not supported yet")
        if self.interpolate:
            hidden_states = upsample_nearest(hidden_states, output_size)
        if self.use_conv:
            hidden_states = conv(
                self.out_channels or self.channels,
                self.kernel_size or 3,
                padding=self.padding,
                use_bias=self.bias,
                dtype=self.dtype,
                name="conv",
            )(hidden_states.astype(self.dtype))
        return hidden_states


# --------------------------------------------------------------------------------------------
# ResNet block


class ResnetBlock2D(nn.Module):
    r"""Pre-activation residual block with a time embedding (*Ho et al. (2020)*, App. B; the
    wide-ResNet block of *Zagoruyko & Komodakis (2016)*).

    .. math::
        h = \mathrm{conv}_1(\phi(\mathrm{GN}_1(x))),\quad
        h \leftarrow \begin{cases} \mathrm{GN}_2(h + W_t\,\phi(t)) & \text{default} \\
            \mathrm{GN}_2(h)\,(1 + s) + b,\ [s, b] = W_t\,\phi(t) & \text{scale\_shift}
            \end{cases}

    .. math::
        y = \bigl(\mathrm{shortcut}(x) + \mathrm{conv}_2(\mathrm{dropout}(\phi(h)))\bigr)
            / \text{output\_scale\_factor}

    ``scale_shift`` is the adaptive group norm of *Dhariwal & Nichol (2021), Sec. 3*.
    ``temb_channels=None`` drops the time embedding (the VAE). ``up``/``down`` resample both
    branches by nearest x2 / 2x2 average pool after the first activation (BigGAN-style
    resampling blocks, ``downsample_type="resnet"``); ``kernel="fir"`` resamples with the
    (1, 3, 3, 1) FIR filter instead (the skip blocks of score-SDE UNets, *Song et al. (2021)*).
    """

    in_channels: int
    out_channels: int | None = None
    temb_channels: int | None = 512
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    non_linearity: str = "swish"
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    dropout: float = 0.0
    skip_time_act: bool = False
    up: bool = False
    down: bool = False
    conv_shortcut_bias: bool = True
    conv_2d_out_channels: int | None = None
    kernel: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, hidden_states: Array, temb: Array | None = None, train: bool = False
    ) -> Array:
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"ResnetBlock2D: time_embedding_norm must be 'default' or 'scale_shift', "
                f"got {self.time_embedding_norm!r}"
            )
        if self.kernel not in (None, "fir", "sde_vp"):
            raise ValueError(
                f"ResnetBlock2D: kernel must be None, 'fir' or 'sde_vp', got {self.kernel!r}"
            )
        if hidden_states.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResnetBlock2D expects {self.in_channels} input channels (NHWC), got shape "
                f"{hidden_states.shape}"
            )
        out_channels = self.out_channels or self.in_channels
        conv_out_channels = self.conv_2d_out_channels or out_channels
        act = get_activation(self.non_linearity)
        dtype = self.dtype

        x = hidden_states
        h = apply_norm(group_norm(self.groups, self.eps, "norm1"), x, dtype)
        h = act(h)
        if self.up:
            up = fir_upsample_2d if self.kernel == "fir" else upsample_nearest
            x, h = up(x), up(h)
        elif self.down:
            down = fir_downsample_2d if self.kernel == "fir" else avg_pool_2x2
            x, h = down(x), down(h)
        h = conv(out_channels, dtype=dtype, name="conv1")(h)

        t = None
        if self.temb_channels is not None:
            if temb is None:
                raise ValueError(
                    f"ResnetBlock2D(temb_channels={self.temb_channels}) needs temb; build it "
                    "with temb_channels=None for a block without time embedding"
                )
            t = temb.astype(dtype)
            if not self.skip_time_act:
                t = act(t)
            width = out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
            t = nn.Dense(width, dtype=dtype, name="time_emb_proj")(t)[:, None, None, :]

        norm2 = group_norm(self.groups_out or self.groups, self.eps, "norm2")
        if self.time_embedding_norm == "scale_shift":
            if t is None:
                raise ValueError(
                    "ResnetBlock2D: temb is required when time_embedding_norm='scale_shift'"
                )
            scale, shift = jnp.split(t, 2, axis=-1)
            h = apply_norm(norm2, h, dtype)
            h = h * (1 + scale) + shift
        else:
            if t is not None:
                h = h + t
            h = apply_norm(norm2, h, dtype)
        h = act(h)
        h = nn.Dropout(self.dropout, name="dropout")(h, deterministic=not train)
        h = conv(conv_out_channels, dtype=dtype, name="conv2")(h)

        use_in_shortcut = (
            self.in_channels != conv_out_channels
            if self.use_in_shortcut is None
            else self.use_in_shortcut
        )
        if use_in_shortcut:
            x = conv(
                conv_out_channels,
                kernel_size=1,
                padding=0,
                use_bias=self.conv_shortcut_bias,
                dtype=dtype,
                name="conv_shortcut",
            )(x.astype(dtype))
        return ((x.astype(dtype) + h) / self.output_scale_factor).astype(dtype)


# --------------------------------------------------------------------------------------------
# Attention


def _use_cudnn(q: Array, k: Array) -> bool:
    """cuDNN flash attention: GPU, half precision, head dim a multiple of 8 up to 128."""
    if jax.default_backend() != "gpu":
        return False
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    head_dim = q.shape[-1]
    return head_dim % 8 == 0 and head_dim <= 128


# Off the GPU, attention runs head by head, ``chunk_size`` queries at a time, and
# ``chunk_size=None`` picks the largest power of two whose float32 logits (one head, all keys)
# fit in this many bytes. On a 2-core x86 CPU this ran SD 1.5's 4096-token self-attention 5.6x
# faster than ``jax.nn.dot_product_attention`` on the whole (B, N, T, S) logits (1 GiB there),
# level with PyTorch's fused CPU kernel, and peak memory drops by as much.
ATTENTION_BLOCK_BYTES = 8 * 2**20


def _auto_chunk(query: Array, key: Array) -> int | None:
    """The query chunk for ``chunk_size=None`` off the GPU: None when the float32 logits of
    all heads fit in ``ATTENTION_BLOCK_BYTES`` (one batched pass), else the largest power of
    two (at least 16) whose logits of one head fit."""
    b, t, n, _ = query.shape
    row_bytes = 4 * key.shape[1]  # float32 logits of one query, one head, all keys
    if b * n * t * row_bytes <= ATTENTION_BLOCK_BYTES:
        return None
    fit = int(ATTENTION_BLOCK_BYTES // row_bytes)  # queries whose logits fit in the block
    return max(1 << max(fit.bit_length() - 1, 0), 16)


def _softmax_block(q: Array, k: Array, v: Array, mask: Array | None, scale: float) -> Array:
    r"""Attention of one block, softmax normalised after the value product,

    .. math:: O = \frac{\exp(L - m)\,V}{\exp(L - m)\,\mathbf{1}}, \qquad
              L = s\,Q K^\top,\ m = \max_j L_{\cdot j},

    which equals ``softmax(L) V`` and divides the ``(T, H)`` output instead of the ``(T, S)``
    probabilities, as flash attention does (*Dao et al. (2022)*). ``q`` is ``(..., T, H)``,
    ``k``/``v`` ``(..., S, H)``; logits, exponent and sum are float32, the probabilities meet
    ``v`` in its dtype.
    """
    logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    logits = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    probs = jnp.exp(logits)
    out = jnp.einsum(
        "...ts,...sh->...th", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out / probs.sum(axis=-1, keepdims=True)


def _map_in_chunks(fn, arrays: tuple[Array, ...], chunk: int, axis: int) -> Array:
    """``fn(*slices)`` over consecutive ``chunk``-long slices of ``arrays`` along ``axis``
    (``lax.map`` over the full chunks, one more call on the remainder), concatenated along
    ``axis``; ``fn`` keeps the sliced axis where it was."""
    t = arrays[0].shape[axis]
    n_full = t // chunk
    end = n_full * chunk

    def split(a: Array) -> Array:  # (..., end, ...) -> (n_full, ..., chunk, ...)
        a = jax.lax.slice_in_dim(a, 0, end, axis=axis)
        a = a.reshape(a.shape[:axis] + (n_full, chunk) + a.shape[axis + 1 :])
        return jnp.moveaxis(a, axis, 0)

    out = jnp.moveaxis(jax.lax.map(lambda xs: fn(*xs), tuple(map(split, arrays))), 0, axis)
    out = out.reshape(out.shape[:axis] + (end,) + out.shape[axis + 2 :])
    if end < t:
        rest = fn(*(jax.lax.slice_in_dim(a, end, t, axis=axis) for a in arrays))
        out = jnp.concatenate([out, rest], axis=axis)
    return out


def _blocked_attention(
    query: Array, key: Array, value: Array, mask: Array | None, scale: float, chunk: int | None
) -> Array:
    """The CPU/TPU path: heads-first ``_softmax_block`` in one batched pass (``chunk`` None),
    or head by head and ``chunk`` queries at a time under ``lax.map``, each block
    rematerialised in the backward pass (*Rabe & Staats (2021)*)."""
    b, t, n, h = query.shape
    s = key.shape[1]
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (query, key, value))  # (B, N, L, H)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (b, n, mask.shape[2], s))
    if chunk is None:
        out = _softmax_block(q, k, v, mask, scale)
        return out.transpose(0, 2, 1, 3)

    block = jax.checkpoint(lambda q, k, v, m: _softmax_block(q, k, v, m, scale))
    q, k, v = (a.reshape((b * n,) + a.shape[2:]) for a in (q, k, v))
    if mask is not None:
        mask = mask.reshape((b * n,) + mask.shape[2:])  # (B*N, T or 1, S)

    def head(args):
        qh, kh, vh, mh = args
        if mh is not None and mh.shape[0] == t:  # a mask row per query: chunk it with them
            return _map_in_chunks(lambda qc, mc: block(qc, kh, vh, mc), (qh, mh), chunk, axis=0)
        return _map_in_chunks(lambda qc: block(qc, kh, vh, mh), (qh,), chunk, axis=0)

    out = jax.lax.map(head, (q, k, v, mask))  # (B*N, T, H)
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    implementation: str | None = None,
) -> Array:
    r"""Scaled dot-product attention (*Vaswani et al. (2017), Eq. 1*) on ``(B, T, N, H)`` arrays.

    .. math:: \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}}\right) V

    On GPU (or with an explicit ``implementation``) it is :func:`jax.nn.dot_product_attention`:
    cuDNN flash attention for bf16/fp16 (``implementation=None`` picks it when the shapes
    allow), XLA otherwise, ``chunk_size`` queries at a time under ``lax.map`` when given.

    On CPU and TPU it is :func:`_blocked_attention`: heads first, softmax normalised after the
    value product, and, for long sequences, head by head and ``chunk_size`` queries at a time
    (the memory-efficient attention of *Rabe & Staats (2021)*), so peak memory is
    ``O(chunk_size * S)`` instead of ``O(B * N * T * S)``. ``chunk_size=None`` chooses (see
    ``ATTENTION_BLOCK_BYTES``); a ``chunk_size`` of at least ``T`` is one pass per head.
    Logits and softmax are float32 in every case.

    Args:
        query: ``(B, T, N, H)``.
        key, value: ``(B, S, N, H)``.
        mask: optional boolean, broadcastable to ``(B, N, T, S)``; True attends.
        scale: logit scale, default ``1 / sqrt(H)``.
        chunk_size: query chunk length, or None for automatic.
        implementation: ``"xla"``, ``"cudnn"`` or None (automatic).
    """
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"attention_chunk_size must be a positive int or None, got {chunk_size}")
    out_dtype = query.dtype
    gpu = jax.default_backend() == "gpu"
    if query.dtype == jnp.float16 and not gpu:
        # XLA's fp16 attention asks for F16_F16_F32 dots, which CPU and TPU reject: attend in
        # float32 there (the softmax is float32 in every case).
        query, key, value = (a.astype(jnp.float32) for a in (query, key, value))
    t = query.shape[1]
    if not gpu and implementation is None:
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        chunk = _auto_chunk(query, key) if chunk_size is None else chunk_size
        chunk = None if chunk is None else min(chunk, t)
        out = _blocked_attention(query, key, value, mask, scale, chunk)
        return out.astype(out_dtype)

    auto = implementation is None
    if auto:
        implementation = "cudnn" if (mask is None and _use_cudnn(query, key)) else "xla"

    def attend(q: Array) -> Array:
        if implementation == "cudnn" and auto:
            try:
                return jax.nn.dot_product_attention(
                    q, key, value, mask=mask, scale=scale, implementation="cudnn"
                )
            except (ValueError, NotImplementedError, RuntimeError, TypeError):
                pass  # shape, dtype or GPU generation cuDNN does not take: use XLA
        return jax.nn.dot_product_attention(
            q,
            key,
            value,
            mask=mask,
            scale=scale,
            implementation="xla" if auto else implementation,
        )

    if chunk_size is None or chunk_size >= t or (mask is not None and mask.shape[2] != 1):
        return attend(query).astype(out_dtype)
    return _map_in_chunks(attend, (query,), chunk_size, axis=1).astype(out_dtype)


class Attention(nn.Module):
    r"""Multi-head attention, diffusers' ``Attention`` (*Vaswani et al. (2017), Sec. 3.2*).

    Self-attention over the pixels of an NHWC map (the UNet/VAE attention blocks of *Ho et al.
    (2020)*) or over a ``(B, L, C)`` sequence, or cross-attention to ``encoder_hidden_states``
    of width ``cross_attention_dim`` (*Rombach et al. (2022), Eq. 3*):

    .. math::
        y = \bigl(W_o\,\mathrm{Attn}(W_q\,\mathrm{GN}(x),\ W_k c,\ W_v c) + [x]\bigr)
            / \text{rescale\_output\_factor}

    with :math:`c = x` for self-attention, the optional group norm ``group_norm``
    (``norm_num_groups``) and the residual :math:`[x]` only with ``residual_connection``.
    Submodules: ``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out_0`` (PyTorch
    ``to_out.0``). The softmax runs in float32 (``upcast_softmax``/``upcast_attention`` are
    accepted for config parity and always hold).
    """

    query_dim: int
    cross_attention_dim: int | None = None
    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0
    bias: bool = False
    upcast_attention: bool = False
    upcast_softmax: bool = False
    out_bias: bool = True
    norm_num_groups: int | None = None
    eps: float = 1e-5
    rescale_output_factor: float = 1.0
    residual_connection: bool = False
    out_dim: int | None = None
    scale_qk: bool = True
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden_states: Array,
        encoder_hidden_states: Array | None = None,
        attention_mask: Array | None = None,
        train: bool = False,
    ) -> Array:
        """
        Args:
            hidden_states: ``(B, H, W, C)`` or ``(B, L, C)`` with ``C == query_dim``.
            encoder_hidden_states: ``(B, S, cross_attention_dim)`` context, or None (self).
            attention_mask: optional boolean ``(B, S)`` key mask (True attends).
            train: enables dropout on the output projection (rng ``"dropout"``).
        """
        dtype = self.dtype
        if hidden_states.ndim not in (3, 4) or hidden_states.shape[-1] != self.query_dim:
            raise ValueError(
                f"Attention expects hidden_states of shape (B, H, W, {self.query_dim}) or "
                f"(B, L, {self.query_dim}), got {hidden_states.shape}"
            )
        residual = hidden_states
        shape = hidden_states.shape
        x = (
            hidden_states.reshape(shape[0], -1, shape[-1])
            if hidden_states.ndim == 4
            else hidden_states
        )
        if self.norm_num_groups is not None:
            x = apply_norm(group_norm(self.norm_num_groups, self.eps, "group_norm"), x, dtype)
        x = x.astype(dtype)

        heads = self.out_dim // self.dim_head if self.out_dim is not None else self.heads
        inner_dim = self.out_dim if self.out_dim is not None else self.dim_head * self.heads
        out_dim = self.out_dim if self.out_dim is not None else self.query_dim
        context_dim = self.cross_attention_dim or self.query_dim
        if encoder_hidden_states is None:
            context = x
        else:
            if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != context_dim:
                raise ValueError(
                    f"Attention expects encoder_hidden_states of shape (B, S, {context_dim}), "
                    f"got {encoder_hidden_states.shape}"
                )
            context = encoder_hidden_states.astype(dtype)

        def dense(features: int, use_bias: bool, name: str) -> nn.Dense:
            return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)

        b = x.shape[0]
        q = dense(inner_dim, self.bias, "to_q")(x).reshape(b, -1, heads, inner_dim // heads)
        k = dense(inner_dim, self.bias, "to_k")(context).reshape(b, -1, heads, inner_dim // heads)
        v = dense(inner_dim, self.bias, "to_v")(context).reshape(b, -1, heads, inner_dim // heads)

        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask).astype(bool).reshape(b, 1, 1, -1)
        scale = None if self.scale_qk else 1.0
        o = dot_product_attention(
            q, k, v, mask=mask, scale=scale, chunk_size=self.attention_chunk_size
        )
        o = o.reshape(b, -1, inner_dim).astype(dtype)
        o = dense(out_dim, self.out_bias, "to_out_0")(o)
        o = nn.Dropout(self.dropout)(o, deterministic=not train)

        if hidden_states.ndim == 4:
            o = o.reshape(shape[:-1] + (out_dim,))
        if self.residual_connection:
            o = o + residual.astype(dtype)
        return (o / self.rescale_output_factor).astype(dtype)
