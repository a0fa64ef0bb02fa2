r"""``AutoencoderKL``: the KL-regularised VAE of latent diffusion, diffusers' ``AutoencoderKL``
in Flax Linen (NHWC).

The first stage of *Rombach et al. (2022), Sec. 3*: an encoder maps an image
:math:`x \in [-1, 1]^{H \times W \times 3}` to a diagonal Gaussian posterior
:math:`q(z \mid x) = \mathcal{N}(\mu, \sigma^2)` over latents of ``H / f x W / f x
latent_channels`` (:math:`f = 2^{\#\text{blocks} - 1}`), and a decoder maps latents back to
images. Stable Diffusion's UNet works on ``scaling_factor * z``; that scaling is the pipeline's
job, as in diffusers: :meth:`AutoencoderKL.encode` and :meth:`AutoencoderKL.decode` never scale.

    vae, params = AutoencoderKL.from_pretrained("runwayml/stable-diffusion-v1-5", subfolder="vae")
    posterior = vae.apply({"params": params}, images, method="encode").latent_dist
    latents = posterior.sample(key) * vae.scaling_factor
    images = vae.apply({"params": params}, latents / vae.scaling_factor, method="decode").sample

Memory savers, as diffusers' ``enable_slicing()`` / ``enable_tiling()``: build the module with
``use_slicing=True`` (the batch goes through one image at a time under ``lax.map``) and/or
``use_tiling=True`` (overlapping tiles of ``sample_size`` pixels, blended linearly), e.g.
``vae.clone(use_tiling=True)`` or ``AutoencoderKL.from_pretrained(..., use_tiling=True)``;
``encode``/``decode`` also take ``slice=`` / ``tile=`` per call.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.configuration import NONNEG_INT, POS_INT, SIZE
from jaxdiff.models.layers import conv
from jaxdiff.models.modeling_utils import FlaxModelMixin
from jaxdiff.models.vae_blocks import Decoder, Encoder
from jaxdiff.utils.checks import check_key

Array = jax.Array

# Mid-block attention of checkpoints saved before diffusers 0.14 used these names.
_LEGACY_ATTENTION = re.compile(
    r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$"
)
_LEGACY_TARGET = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(r"^.*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


# --------------------------------------------------------------------------------------------
# Outputs


@flax.struct.dataclass
class DiagonalGaussianDistribution:
    r"""The VAE posterior :math:`q(z \mid x) = \mathcal{N}(\mu, \mathrm{diag}(\sigma^2))`
    (*Kingma & Welling (2014), Sec. 2.4*), diffusers' ``DiagonalGaussianDistribution``.

    Built from the encoder's moments ``[mean, logvar]`` (split on the channel axis, NHWC) with
    ``logvar`` clipped to ``[-30, 20]`` as diffusers does. A pytree: it crosses ``jit``.

    Attributes:
        mean: :math:`\mu`, ``(B, h, w, latent_channels)``.
        logvar: :math:`\log\sigma^2`, same shape, clipped.
        deterministic: if True, ``std`` and ``var`` are zero and ``sample`` returns the mean.
    """

    mean: Array
    logvar: Array
    deterministic: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def from_moments(
        cls, moments: Array, deterministic: bool = False
    ) -> DiagonalGaussianDistribution:
        """Splits ``(..., 2 * C)`` moments into mean and (clipped) log-variance."""
        if moments.shape[-1] % 2:
            raise ValueError(
                f"moments must have an even channel count (mean, logvar), got {moments.shape}"
            )
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0), deterministic=deterministic)

    @property
    def std(self) -> Array:
        r""":math:`\sigma = \exp(\tfrac12 \log\sigma^2)` (zero if deterministic)."""
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        r""":math:`\sigma^2` (zero if deterministic)."""
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(self.logvar)

    def sample(self, key: Array) -> Array:
        r"""A reparameterised draw :math:`z = \mu + \sigma \odot \epsilon`,
        :math:`\epsilon \sim \mathcal{N}(0, I)` (*Kingma & Welling (2014), Eq. 10*).

        Args:
            key: a PRNG key (required);
                ``epsilon = jax.random.normal(key, mean.shape, mean.dtype)``.
        """
        if key is None:
            raise ValueError(
                "DiagonalGaussianDistribution.sample(key) needs a PRNG key, e.g. jax.random.key(0)"
            )
        check_key(key, "DiagonalGaussianDistribution.sample")
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Array:
        r"""The posterior mode :math:`\mu`."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Array:
        r"""Per-example :math:`\mathrm{KL}(q \,\|\, p)`, summed over (h, w, c)
        (*Kingma & Welling (2014), App. B*); ``p`` is :math:`\mathcal{N}(0, I)` when ``other``
        is None.

        .. math::
            \tfrac12 \sum \left[\frac{(\mu - \mu_p)^2 + \sigma^2}{\sigma_p^2}
            - 1 - \log\sigma^2 + \log\sigma_p^2\right]
        """
        if self.deterministic:
            return jnp.zeros((1,), self.mean.dtype)
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(
            (self.mean - other.mean) ** 2 / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            axis=axes,
        )

    def nll(self, sample: Array, axes: tuple[int, ...] = (1, 2, 3)) -> Array:
        r"""Negative log-likelihood
        :math:`\tfrac12 \sum [\log 2\pi + \log\sigma^2 + (z - \mu)^2 / \sigma^2]`."""
        if self.deterministic:
            return jnp.zeros((1,), self.mean.dtype)
        return 0.5 * jnp.sum(
            np.log(2.0 * np.pi) + self.logvar + (sample - self.mean) ** 2 / self.var, axis=axes
        )


@flax.struct.dataclass
class AutoencoderKLOutput:
    """Output of :meth:`AutoencoderKL.encode`.

    Attributes:
        latent_dist: the posterior :class:`DiagonalGaussianDistribution`.
    """

    latent_dist: DiagonalGaussianDistribution


@flax.struct.dataclass
class DecoderOutput:
    """Output of :meth:`AutoencoderKL.decode` and of the model's call.

    Attributes:
        sample: ``(B, H, W, out_channels)`` decoded images (roughly in ``[-1, 1]``).
    """

    sample: Array


# --------------------------------------------------------------------------------------------
# Tiling


def blend_v(a: Array, b: Array, blend_extent: int) -> Array:
    r"""Cross-fades the bottom rows of tile ``a`` into the top rows of the tile ``b`` below it
    (diffusers' ``blend_v``, NHWC): for :math:`y < e`,
    :math:`b_y \leftarrow a_{-e + y} (1 - y/e) + b_y\, y/e`."""
    e = min(a.shape[1], b.shape[1], blend_extent)
    if e <= 0:
        return b
    w = (jnp.arange(e, dtype=jnp.float32) / e).astype(b.dtype)[None, :, None, None]
    top = a[:, -e:] * (1 - w) + b[:, :e] * w
    return jnp.concatenate([top, b[:, e:]], axis=1)


def blend_h(a: Array, b: Array, blend_extent: int) -> Array:
    r"""Cross-fades the right columns of tile ``a`` into the left columns of the tile ``b`` to
    its right (diffusers' ``blend_h``, NHWC)."""
    e = min(a.shape[2], b.shape[2], blend_extent)
    if e <= 0:
        return b
    w = (jnp.arange(e, dtype=jnp.float32) / e).astype(b.dtype)[None, None, :, None]
    left = a[:, :, -e:] * (1 - w) + b[:, :, :e] * w
    return jnp.concatenate([left, b[:, :, e:]], axis=2)


def tiled_apply(
    fn: Callable[[Array], Array],
    x: Array,
    tile_in: int,
    tile_out: int,
    overlap_factor: float,
) -> Array:
    r"""Runs ``fn`` on overlapping square tiles of NHWC ``x`` and blends the results, exactly as
    diffusers' ``tiled_decode`` / ``_tiled_encode``.

    Tiles of ``tile_in`` start every ``int(tile_in * (1 - overlap_factor))`` pixels; each output
    tile is blended with its (already blended) upper and left neighbours over
    ``int(tile_out * overlap_factor)`` rows/columns, then cropped to
    ``tile_out - int(tile_out * overlap_factor)`` and the crops are concatenated. Tiles of the
    same shape go through ``fn`` together under ``lax.map`` (one trace per tile shape, one tile
    in memory at a time).
    """
    stride = int(tile_in * (1 - overlap_factor))
    blend_extent = int(tile_out * overlap_factor)
    row_limit = tile_out - blend_extent
    if stride <= 0:
        raise ValueError(
            f"tile size {tile_in} with overlap {overlap_factor} gives a non-positive tile stride"
        )
    rows = range(0, x.shape[1], stride)
    cols = range(0, x.shape[2], stride)
    tiles = {
        (a, b): x[:, i : i + tile_in, j : j + tile_in]
        for a, i in enumerate(rows)
        for b, j in enumerate(cols)
    }

    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for pos, t in tiles.items():
        groups.setdefault(t.shape, []).append(pos)
    outs: dict[tuple[int, int], Array] = {}
    for positions in groups.values():
        if len(positions) == 1:
            outs[positions[0]] = fn(tiles[positions[0]])
            continue
        res = jax.lax.map(fn, jnp.stack([tiles[p] for p in positions]))
        for n, p in enumerate(positions):
            outs[p] = res[n]

    blended: dict[tuple[int, int], Array] = {}
    result_rows = []
    for a in range(len(rows)):
        row = []
        for b in range(len(cols)):
            t = outs[(a, b)]
            if a > 0:
                t = blend_v(blended[(a - 1, b)], t, blend_extent)
            if b > 0:
                t = blend_h(blended[(a, b - 1)], t, blend_extent)
            blended[(a, b)] = t
            row.append(t[:, :row_limit, :row_limit])
        result_rows.append(jnp.concatenate(row, axis=2))
    return jnp.concatenate(result_rows, axis=1)


def _map_batch(fn: Callable[[Array], Array], x: Array) -> Array:
    """``fn`` on one example at a time (``lax.map`` over the batch), batch axis kept."""
    if x.shape[0] <= 1:
        return fn(x)
    return jax.lax.map(lambda xi: fn(xi[None])[0], x)


# --------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(FlaxModelMixin, nn.Module):
    r"""The KL autoencoder of *Rombach et al. (2022), Sec. 3 and App. G*, diffusers'
    ``AutoencoderKL``.

    .. math::
        [\mu, \log\sigma^2] = \mathrm{quant\_conv}(\mathcal{E}(x)),\qquad
        \hat x = \mathcal{D}(\mathrm{post\_quant\_conv}(z)),\quad z \sim \mathcal{N}(\mu, \sigma^2)

    ``quant_conv`` / ``post_quant_conv`` are 1x1 convolutions (absent when
    ``use_quant_conv`` / ``use_post_quant_conv`` is False). Every field up to
    ``mid_block_add_attention`` is a diffusers config field with diffusers' default (lists as
    tuples). ``scaling_factor``, ``shift_factor``, ``latents_mean`` and ``latents_std`` are
    metadata for the pipelines; the model itself never applies them.

    Runtime fields (not config): ``use_slicing`` (encode/decode one image at a time),
    ``use_tiling`` (tiled encode/decode beyond ``sample_size``), ``tile_overlap_factor``,
    ``attention_chunk_size`` (query-chunked mid-block attention), ``dtype`` (compute dtype; the
    posterior's moments are returned in float32).

    Methods (``model.apply({"params": params}, ..., method=...)``): ``encode(x)`` ->
    :class:`AutoencoderKLOutput`, ``decode(z)`` -> :class:`DecoderOutput`, and the call
    ``(sample, sample_posterior=False, key=None)`` -> :class:`DecoderOutput`.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    use_slicing: bool = False
    use_tiling: bool = False
    tile_overlap_factor: float = 0.25
    attention_chunk_size: int | None = None
    dtype: jnp.dtype = jnp.float32

    _non_config_fields = FlaxModelMixin._non_config_fields + (
        "use_slicing",
        "use_tiling",
        "tile_overlap_factor",
    )
    _config_rules = {
        "layers_per_block": NONNEG_INT,
        "norm_num_groups": POS_INT,
        "sample_size": SIZE,
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
        """Maps legacy mid-block attention names ``query/key/value/proj_attn`` to
        ``to_q/to_k/to_v/to_out.0`` (diffusers' ``_fix_state_dict_keys_on_load``); attention
        projection weights stored as 1x1 convs ``(C, C, 1, 1)`` become ``(C, C)``."""
        out = {}
        for key, value in state_dict.items():
            m = _LEGACY_ATTENTION.match(key)
            if m:
                key = f"{m.group(1)}.{_LEGACY_TARGET[m.group(2)]}.{m.group(3)}"
            if (
                _ATTENTION_WEIGHT.match(key)
                and np.ndim(value) == 4
                and tuple(np.shape(value)[2:]) == (1, 1)
            ):
                value = np.asarray(value)[:, :, 0, 0]
            if key in out:
                raise ValueError(
                    f"the state dict holds {key!r} under both its legacy and its current name"
                )
            out[key] = value
        return out

    def dummy_inputs(self) -> tuple:
        size = self.downsample_factor
        return (jnp.zeros((1, size, size, self.in_channels), jnp.float32),)

    # ---------------------------------------------------------------------------------------
    # Derived sizes

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_sample_min_size(self) -> int:
        """Image tile size of tiled encode/decode (diffusers: ``config.sample_size``)."""
        s = self.sample_size
        return int(s[0] if isinstance(s, (tuple, list)) else s)

    @property
    def tile_latent_min_size(self) -> int:
        """Latent tile size: ``int(sample_size / 2 ** (len(block_out_channels) - 1))``."""
        return int(self.tile_sample_min_size / self.downsample_factor)

    # ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        self._check_config()
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            act_fn=self.act_fn,
            mid_block_add_attention=self.mid_block_add_attention,
            attention_chunk_size=self.attention_chunk_size,
            dtype=self.dtype,
        )
        self.encoder = Encoder(
            in_channels=self.in_channels,
            out_channels=self.latent_channels,
            down_block_types=tuple(self.down_block_types),
            double_z=True,
            **common,
        )
        self.decoder = Decoder(
            in_channels=self.latent_channels,
            out_channels=self.out_channels,
            up_block_types=tuple(self.up_block_types),
            **common,
        )
        c = self.latent_channels
        self.quant_conv = (
            conv(2 * c, 1, padding=0, dtype=self.dtype) if self.use_quant_conv else None
        )
        self.post_quant_conv = (
            conv(c, 1, padding=0, dtype=self.dtype) if self.use_post_quant_conv else None
        )

    def _check_config(self) -> None:
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries but block_out_channels "
                    f"has {n}; they must match"
                )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                f"block_out_channels={tuple(self.block_out_channels)}"
            )

    def _check_image(self, x: Array) -> Array:
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(
                f"encode expects x as a 4-D NHWC array (batch, height, width, {self.in_channels}), "
                f"got shape {x.shape}"
            )
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[-1]} channels (last axis, NHWC) but the VAE expects "
                f"in_channels={self.in_channels}; got shape {x.shape}"
            )
        if 0 in x.shape[:3]:
            raise ValueError(
                f"encode expects x with a non-empty batch, height and width, got shape {x.shape}"
            )
        return x  # any size from 2 ** (len(block_out_channels) - 1) up: the Encoder checks

    def _check_latent(self, z: Array) -> Array:
        z = jnp.asarray(z)
        if z.ndim != 4:
            raise ValueError(
                "decode expects z as a 4-D NHWC array "
                f"(batch, height, width, {self.latent_channels}), got shape {z.shape}"
            )
        if z.shape[-1] != self.latent_channels:
            raise ValueError(
                f"z has {z.shape[-1]} channels (last axis, NHWC) but the VAE expects "
                f"latent_channels={self.latent_channels}; got shape {z.shape}"
            )
        if 0 in z.shape[:3]:
            raise ValueError(
                f"decode expects z with a non-empty batch, height and width, got shape {z.shape}"
            )
        return z

    # ---------------------------------------------------------------------------------------
    # Pure functions of the params (for lax.map under slicing and tiling)

    def _moments_fn(self) -> Callable[[Array], Array]:
        """image -> moments ``[mean, logvar]``, as a pure function closed over the params."""
        if self.is_initializing():
            return self._moments_bound
        params = self.variables["params"]
        encoder = self.encoder.clone(parent=None)
        quant = self.quant_conv.clone(parent=None) if self.quant_conv is not None else None

        def fn(x: Array) -> Array:
            h = encoder.apply({"params": params["encoder"]}, x)
            if quant is not None:
                h = quant.apply({"params": params["quant_conv"]}, h)
            return h

        return fn

    def _moments_bound(self, x: Array) -> Array:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode_fn(self) -> Callable[[Array], Array]:
        """latent -> image, as a pure function closed over the params."""
        if self.is_initializing():
            return self._decode_bound
        params = self.variables["params"]
        decoder = self.decoder.clone(parent=None)
        post = self.post_quant_conv.clone(parent=None) if self.post_quant_conv is not None else None

        def fn(z: Array) -> Array:
            if post is not None:
                z = post.apply({"params": params["post_quant_conv"]}, z.astype(self.dtype))
            return decoder.apply({"params": params["decoder"]}, z)

        return fn

    def _decode_bound(self, z: Array) -> Array:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z)

    # ---------------------------------------------------------------------------------------

    def encode(
        self, x: Array, slice: bool | None = None, tile: bool | None = None
    ) -> AutoencoderKLOutput:
        r"""Image -> posterior :math:`q(z \mid x)`.

        Args:
            x: ``(B, H, W, in_channels)`` images in ``[-1, 1]``; ``H`` and ``W`` at least
                ``f = 2 ** (len(block_out_channels) - 1)``. Sizes that are not multiples of
                ``f`` give ``floor(H / f)`` latent rows, as diffusers (each downsampling pads
                one row and column at the bottom/right).
            slice: one image at a time (``lax.map``); default ``use_slicing``.
            tile: tiled encoding when ``H`` or ``W`` exceeds ``sample_size``; default
                ``use_tiling``.

        Returns:
            :class:`AutoencoderKLOutput` whose ``latent_dist`` holds float32 ``mean``/``logvar``.
        """
        x = self._check_image(x)
        slice = self.use_slicing if slice is None else slice
        tile = self.use_tiling if tile is None else tile
        if not (slice or tile):
            moments = self._moments_bound(x)
        else:
            fn = self._moments_fn()
            size = self.tile_sample_min_size
            if tile and (x.shape[1] > size or x.shape[2] > size):
                base = fn
                fn = lambda xi: tiled_apply(  # noqa: E731
                    base, xi, size, self.tile_latent_min_size, self.tile_overlap_factor
                )
            moments = _map_batch(fn, x) if slice else fn(x)
        return AutoencoderKLOutput(
            latent_dist=DiagonalGaussianDistribution.from_moments(moments.astype(jnp.float32))
        )

    def decode(
        self, z: Array, slice: bool | None = None, tile: bool | None = None
    ) -> DecoderOutput:
        r"""Latents -> images :math:`\hat x = \mathcal{D}(z)` (no ``scaling_factor`` applied).

        Args:
            z: ``(B, h, w, latent_channels)`` latents (divide by ``scaling_factor`` first if
                they come from the diffusion model).
            slice: one latent at a time (``lax.map``); default ``use_slicing``.
            tile: tiled decoding when ``h`` or ``w`` exceeds ``sample_size / 2 ** (n - 1)``;
                default ``use_tiling``.
        """
        z = self._check_latent(z)
        slice = self.use_slicing if slice is None else slice
        tile = self.use_tiling if tile is None else tile
        if not (slice or tile):
            return DecoderOutput(sample=self._decode_bound(z))
        fn = self._decode_fn()
        size = self.tile_latent_min_size
        if tile and (z.shape[1] > size or z.shape[2] > size):
            base = fn
            fn = lambda zi: tiled_apply(  # noqa: E731
                base, zi, size, self.tile_sample_min_size, self.tile_overlap_factor
            )
        return DecoderOutput(sample=_map_batch(fn, z) if slice else fn(z))

    def __call__(
        self, sample: Array, sample_posterior: bool = False, key: Array | None = None
    ) -> DecoderOutput:
        r"""Encode, take the posterior mode (or a sample with ``key``), decode.

        Args:
            sample: ``(B, H, W, in_channels)`` images.
            sample_posterior: draw :math:`z = \mu + \sigma\epsilon` instead of :math:`z = \mu`.
            key: PRNG key, required when ``sample_posterior`` is True.
        """
        posterior = self.encode(sample).latent_dist
        if sample_posterior:
            if key is None:
                raise ValueError(
                    "sample_posterior=True needs key=, a PRNG key for the posterior sample"
                )
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z)
