"""The XLA compiler options jaxdiff compiles its programs with.

On the CPU, XLA (jaxlib 0.10) hands dots, reductions and convolutions to YNNPACK by default
(the ``xla_cpu_experimental_ynn_fusion_type`` list ``INDIVIDUAL_DOT, REDUCE,
INDIVIDUAL_CONVOLUTION``). Its NHWC 3x3 convolutions measured 0.4-0.95x the speed of XLA's
Eigen convolution at every shape of the cats UNet and of Stable Diffusion 1.5 on the 2-core
x86 CPU of ``benchmarks/results`` (fp32, bf16 and fp16): the cats train step ran 25% faster
and the SD 1.5 UNet 15-20% faster without them. :func:`compiler_options` keeps YNNPACK for
dots and reductions and gives convolutions back to Eigen.

Every program jaxdiff jits (pipelines, the train step, the benchmarks) passes these options.
To get the same for your own jitted code::

    jax.jit(fn, compiler_options=jaxdiff.compiler_options())

Your own choice wins: if ``XLA_FLAGS`` sets ``--xla_cpu_experimental_ynn_fusion_type``,
:func:`compiler_options` returns ``{}``. Off the CPU it returns ``{}`` too. ``jax.pmap`` takes
no compiler options: the ``pmap`` paths lower their program and pass the options to
``compile`` (:func:`jaxdiff.sampling.pmap_program`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
# XLA's default YNNPACK list in jaxlib 0.10, less INDIVIDUAL_CONVOLUTION.
YNN_WITHOUT_CONVOLUTION = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options() -> dict[str, str]:
    """Options for ``jax.jit(..., compiler_options=...)``: on the CPU, Eigen convolutions.

    Returns ``{}`` off the CPU, when ``XLA_FLAGS`` already sets the YNNPACK list, or when this
    jaxlib does not know the option (checked once per process by compiling a tiny program).
    """
    if jax.default_backend() != "cpu" or YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
        return {}
    return dict(_cpu_options())


@functools.cache
def _cpu_options() -> tuple[tuple[str, str], ...]:
    options = ((YNN_FUSION_TYPE, YNN_WITHOUT_CONVOLUTION),)
    try:
        jax.jit(jnp.sum, compiler_options=dict(options)).lower(jnp.zeros(2)).compile()
    except jax.errors.JaxRuntimeError:  # a jaxlib without these enum names: keep its defaults
        return ()
    return options


__all__ = ["YNN_FUSION_TYPE", "YNN_WITHOUT_CONVOLUTION", "compiler_options"]
