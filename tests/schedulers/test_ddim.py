"""DDIMScheduler: golden trajectories against diffusers, the Eq. 12 step by hand, the contract."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers.ddim import DDIMScheduler, DDIMState
from tests.reference_io import load_case, requires_reference
from tests.schedulers._trajectory_discrete import (
    COMPONENT,
    assert_trajectory_close,
    jax_trajectory,
)
from weights_conversion.reference.schedulers_ddpm_ddim_pndm import (
    DDIM_CASES,
    initial_sample,
    step_noise,
)

# Every case through the jitted lax.scan driver; a few also through the (slower, op-by-op)
# eager Python loop with Python-int timesteps.
GOLDEN = [(name, "scan") for name in sorted(DDIM_CASES)] + [
    (name, "eager") for name in ("default", "eta1", "thresholding", "zero_snr_v_trailing")
]


@pytest.mark.parametrize(("name", "mode"), GOLDEN)
def test_golden_trajectory(name, mode):
    arrays, meta = load_case(COMPONENT, f"ddim_{name}")
    assert meta["class_name"] == "DDIMScheduler"
    sched = DDIMScheduler.from_config(meta["config"])
    actual = jax_trajectory(
        sched,
        meta["num_inference_steps"],
        arrays["sample"],
        arrays.get("noise"),
        meta["step_kwargs"],
        mode=mode,
    )
    # rtol 1e-5: both sides are float32 throughout; see assert_trajectory_close for atol.
    assert_trajectory_close(actual, arrays)


@requires_reference
@pytest.mark.parametrize(
    ("config", "n", "step_kwargs"),
    [
        (
            {"timestep_spacing": "trailing", "thresholding": True, "clip_sample": False},
            25,
            {"eta": 0.3},
        ),
        (
            {
                "beta_schedule": "scaled_linear",
                "prediction_type": "v_prediction",
                "clip_sample": False,
            },
            15,
            {},
        ),
        (
            {"num_train_timesteps": 500, "timestep_spacing": "linspace", "set_alpha_to_one": False},
            13,
            {"eta": 1.0, "use_clipped_model_output": True},
        ),
    ],
)
def test_live_parity(config, n, step_kwargs):
    from weights_conversion.reference.schedulers_ddpm_ddim_pndm import torch_trajectory

    sample, noise = initial_sample(3), step_noise(n, seed=4)
    expected = torch_trajectory("ddim", config, n, step_kwargs, sample, noise)
    for mode in ("scan",) if n > 15 else ("eager", "scan"):
        actual = jax_trajectory(DDIMScheduler(**config), n, sample, noise, step_kwargs, mode)
        # "trailing" starts at t = 999 where x̂₀ = (x - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ) with ᾱ = 4e-5
        # multiplies float32 rounding of x_t by 1/sqrt(ᾱ) ~ 160: absolute floor 2e-5.
        assert_trajectory_close(actual, expected, atol_scale=2e-5)


@requires_reference
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 333, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, n, offset):
    from diffusers import DDIMScheduler as TorchDDIM

    if spacing == "leading" and offset and n == 1000:  # t = 1000: diffusers fails at step time
        with pytest.raises(ValueError, match="pushes timestep 1000 past"):
            DDIMScheduler(timestep_spacing=spacing, steps_offset=offset).set_timesteps(n)
        return
    ref = TorchDDIM(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    state = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset).set_timesteps(n)
    assert state.timesteps.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())


def test_eta0_step_equals_eq12_by_hand():
    """One deterministic step is x_{t'} = sqrt(ᾱ_{t'}) x̂₀ + sqrt(1 - ᾱ_{t'}) ε̂ (Song et al. 2021,
    Eq. 12 with σ_t = 0), computed here in float64 from the β table."""
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    state = sched.set_timesteps(20)
    t = int(state.timesteps[3])  # 800 - 50 * 3 = 801 - ... (leading: 850)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    eps = rng.standard_normal(x.shape).astype(np.float32)
    out = sched.step(state, jnp.asarray(eps), t, jnp.asarray(x))

    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    a_t, a_prev = alpha_bar[t], alpha_bar[t - 1000 // 20]
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    np.testing.assert_allclose(np.asarray(out.pred_original_sample), x0, rtol=1e-5, atol=1e-5)
    # float32 schedule and arithmetic against float64: 1e-5 relative.
    np.testing.assert_allclose(np.asarray(out.prev_sample), expected, rtol=1e-5, atol=1e-5)
    assert int(out.state.step_index) == 1


def test_eta0_is_deterministic_and_needs_no_key():
    sched = DDIMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.asarray(initial_sample())
    a = sched.step(state, 0.5 * x, 901, x).prev_sample
    b = sched.step(state, 0.5 * x, 901, x, key=jax.random.key(1)).prev_sample
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_last_step_uses_final_alpha_bar():
    x = jnp.asarray(initial_sample())
    for one in (True, False):
        sched = DDIMScheduler(set_alpha_to_one=one, clip_sample=False)
        state = sched.set_timesteps(10)
        out = sched.step(state, 0.3 * x, 0, x)
        # t' < 0: x_{t'} = sqrt(ᾱ_final) x̂₀ + sqrt(1 - ᾱ_final) ε̂; with ᾱ_final = 1 it is x̂₀.
        if one:
            np.testing.assert_allclose(out.prev_sample, out.pred_original_sample, rtol=1e-6)
        else:
            assert not np.allclose(out.prev_sample, out.pred_original_sample, rtol=1e-6)


def test_stochastic_step_needs_a_key():
    sched = DDIMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match="DDIMScheduler.step is stochastic and needs a PRNG key"):
        sched.step(state, x, 901, x, eta=1.0)
    # a traced eta may be nonzero: it needs a key too
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jax.jit(lambda e: sched.step(state, x, 901, x, eta=e).prev_sample)(0.0)
    out = sched.step(state, x, 901, x, jax.random.key(0), eta=1.0)
    assert out.prev_sample.shape == x.shape


def test_key_changes_noise_and_step_traces_once():
    sched = DDIMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.asarray(initial_sample())
    traces = []

    @jax.jit
    def f(state, key, t):
        traces.append(1)
        return sched.step(state, 0.3 * x, t, x, key, eta=1.0).prev_sample

    a = f(state, jax.random.key(0), 901)
    b = f(state, jax.random.key(1), 801)
    c = f(state, jax.random.key(0), 901)
    assert len(traces) == 1
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_bf16_model_output_keeps_fp32_arithmetic():
    sched = DDIMScheduler(clip_sample=False)
    state = sched.set_timesteps(10)
    x = jnp.asarray(initial_sample())
    mo = (0.3 * x).astype(jnp.bfloat16)
    out = sched.step(state, mo, 901, x)
    ref = sched.step(state, mo.astype(jnp.float32), 901, x)
    assert out.prev_sample.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.prev_sample), np.asarray(ref.prev_sample))
    # a bf16 sample comes back as bf16, computed in fp32 and rounded once
    out16 = sched.step(state, mo, 901, x.astype(jnp.bfloat16))
    assert out16.prev_sample.dtype == jnp.bfloat16
    ref16 = sched.step(
        state, mo.astype(jnp.float32), 901, x.astype(jnp.bfloat16).astype(jnp.float32)
    )
    np.testing.assert_array_equal(
        np.asarray(out16.prev_sample), np.asarray(ref16.prev_sample.astype(jnp.bfloat16))
    )


def test_state_is_a_scan_carry():
    state = DDIMScheduler().set_timesteps(5)
    assert isinstance(state, DDIMState)
    leaves = jax.tree_util.tree_leaves(state)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert state.init_noise_sigma.dtype == jnp.float32 and float(state.init_noise_sigma) == 1.0
    assert state.step_index.dtype == jnp.int32


def test_timestep_none_uses_step_index():
    sched = DDIMScheduler()
    state = sched.set_timesteps(10)
    x = jnp.asarray(initial_sample())
    a = sched.step(state, 0.3 * x, None, x).prev_sample
    b = sched.step(state, 0.3 * x, int(state.timesteps[0]), x).prev_sample
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@requires_reference
def test_from_pretrained_reads_diffusers_config(tmp_path):
    from diffusers import DDIMScheduler as TorchDDIM

    ref = TorchDDIM(
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )
    ref.save_config(tmp_path)
    sched = DDIMScheduler.from_pretrained(tmp_path)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    for k, v in data.items():
        if not k.startswith("_"):
            assert sched.config[k] == v, k
    np.testing.assert_array_equal(sched.alphas_cumprod, ref.alphas_cumprod.numpy())
    # and jaxdiff's own file reads back the same
    sched.save_pretrained(tmp_path / "again")
    assert DDIMScheduler.from_pretrained(tmp_path / "again").config == sched.config


def test_from_config_swaps_schedulers():
    from jaxdiff.schedulers.ddpm import DDPMScheduler
    from jaxdiff.schedulers.pndm import PNDMScheduler

    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for cls in (DDPMScheduler, PNDMScheduler, DDIMScheduler):
        other = cls.from_config(ddim.config)
        assert other.config.beta_schedule == "scaled_linear"
        np.testing.assert_array_equal(other.alphas_cumprod, ddim.alphas_cumprod)
    back = DDIMScheduler.from_config(DDPMScheduler.from_config(ddim.config).config)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ddim.config)
    assert DDPMScheduler in ddim.compatibles and PNDMScheduler in ddim.compatibles


@pytest.mark.parametrize("n", [0, 1001])
def test_bad_num_inference_steps(n):
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 and"):
        DDIMScheduler().set_timesteps(n)


@pytest.mark.parametrize(
    ("field", "value"),
    [("beta_schedule", "cubic"), ("prediction_type", "score"), ("timestep_spacing", "uniform")],
)
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        DDIMScheduler(**{field: value})


def test_stable_diffusion_scheduler_config_swaps_to_ddim():
    """The scheduler_config.json shipped with Stable Diffusion v1.5 (a PNDM config that also
    carries DDIM's fields) builds every discrete scheduler."""
    from jaxdiff.schedulers.pndm import PNDMScheduler

    sd15 = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    with pytest.warns(UserWarning, match="clip_sample"):
        pndm = PNDMScheduler.from_config(sd15)
    assert pndm.config.skip_prk_steps is True
    ddim = DDIMScheduler.from_config(pndm.config)
    assert ddim.config.clip_sample is False and ddim.config.steps_offset == 1
    assert ddim.config.set_alpha_to_one is False
    np.testing.assert_array_equal(np.asarray(ddim.set_timesteps(50).timesteps)[:3], [981, 961, 941])


def test_steps_offset_past_the_table_is_an_error():
    from jaxdiff.schedulers.ddpm import DDPMScheduler
    from jaxdiff.schedulers.pndm import PNDMScheduler

    for sched in (
        DDIMScheduler(steps_offset=1),
        DDPMScheduler(steps_offset=1),
        PNDMScheduler(steps_offset=1, skip_prk_steps=True),
    ):
        with pytest.raises(ValueError, match="steps_offset=1 pushes timestep 1000 past"):
            sched.set_timesteps(1000)


@requires_reference
@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_zero_snr_eta1_first_step_is_finite_under_jit(prediction_type):
    """Regression: with rescale_betas_zero_snr ᾱ_t = 0 at the first ("trailing") timestep, so at
    η = 1 σ_t² = 1 - ᾱ_{t'} and sqrt(1 - ᾱ_{t'} - σ_t²) cancels to ~0. The jitted step (XLA
    fuses it into float32 FMAs) went a few ulp below 0 and returned NaN where diffusers is
    finite."""
    import torch
    from diffusers import DDIMScheduler as TorchDDIM

    config = {
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
        "prediction_type": prediction_type,
    }
    ref = TorchDDIM(**config)
    ref.set_timesteps(25)
    sched = DDIMScheduler(**config)
    state = sched.set_timesteps(25)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    mo = (0.6 * np.tanh(x) + 0.3 * np.sin(1.3 * x + 4.0) + 0.05).astype(np.float32)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    t = int(state.timesteps[0])
    expected = ref.step(nchw(mo), t, nchw(x), eta=1.0, variance_noise=nchw(noise)).prev_sample
    expected = expected.numpy().transpose(0, 2, 3, 1)
    assert np.isfinite(expected).all()
    step = jax.jit(lambda s, m, tt, xx, nz: sched.step(s, m, tt, xx, noise=nz, eta=1.0))
    out = step(state, jnp.asarray(mo), state.timesteps[0], jnp.asarray(x), noise)
    got = np.asarray(out.prev_sample)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
