"""Flax Linen models (NHWC) that load and save diffusers' weights."""

from jaxdiff.models.autoencoder_kl import (
    AutoencoderKL,
    AutoencoderKLOutput,
    DecoderOutput,
    DiagonalGaussianDistribution,
)
from jaxdiff.models.clip_text import (
    CLIPTextModel,
    CLIPTextModelOutput,
    CLIPTextModelWithProjection,
    CLIPTextModelWithProjectionOutput,
)
from jaxdiff.models.embeddings import (
    GaussianFourierProjection,
    TimestepEmbedding,
    Timesteps,
    get_timestep_embedding,
)
from jaxdiff.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    dot_product_attention,
    get_activation,
)
from jaxdiff.models.modeling_utils import FlaxModelMixin
from jaxdiff.models.transformer_2d import BasicTransformerBlock, Transformer2DModel
from jaxdiff.models.unet_2d import UNet2DModel, UNet2DOutput
from jaxdiff.models.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
)
from jaxdiff.models.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput

__all__ = [
    "Attention",
    "AutoencoderKL",
    "AutoencoderKLOutput",
    "BasicTransformerBlock",
    "CLIPTextModel",
    "CLIPTextModelOutput",
    "CLIPTextModelWithProjection",
    "CLIPTextModelWithProjectionOutput",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "DownBlock2D",
    "Downsample2D",
    "FlaxModelMixin",
    "GaussianFourierProjection",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Timesteps",
    "Transformer2DModel",
    "UNet2DConditionModel",
    "UNet2DConditionOutput",
    "UNet2DModel",
    "UNet2DOutput",
    "UNetMidBlock2D",
    "UpBlock2D",
    "Upsample2D",
    "dot_product_attention",
    "get_activation",
    "get_timestep_embedding",
]
