"""Golden trajectories of diffusers' DDPMScheduler, DDIMScheduler and PNDMScheduler.

For each case: the diffusers scheduler is built from ``config``, ``set_timesteps(n)`` is
called, and a whole trajectory is run from a fixed random sample with a deterministic fake
model (:func:`fake_model_output`, computed identically by the jaxdiff tests) and, for the
stochastic steps, predetermined Gaussian noise (saved in the case and injected: DDIM through
``variance_noise=``, DDPM by patching ``randn_tensor`` in its module). Samples are NHWC on the
jaxdiff side, NCHW in torch; they are transposed at the boundary.

Saved per case (``<kind>_<name>.safetensors``): ``sample`` (the start, NHWC), ``timesteps``,
``prev_samples`` (steps, *shape), ``pred_original_samples`` (DDPM, DDIM) and ``noise``
(stochastic cases); the JSON meta holds the config, N and the step kwargs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weights_conversion.reference._io import save_case

SHAPE = (2, 4, 4, 3)  # NHWC sample shape
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def trained_betas(num_train_timesteps: int = 100) -> list[float]:
    """A short explicit β table (for the ``trained_betas`` cases)."""
    return [float(b) for b in np.linspace(0.0005, 0.05, num_train_timesteps, dtype=np.float64)]


# name -> (config, num_inference_steps, step kwargs)
DDIM_CASES: dict[str, tuple[dict, int, dict]] = {
    "default": ({}, 10, {}),
    "sd": ({**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, 10, {}),
    "cosine_v_trailing": (
        {
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        },
        8,
        {},
    ),
    "trained_sample_linspace": (
        {
            "num_train_timesteps": 100,
            "trained_betas": trained_betas(),
            "prediction_type": "sample",
            "timestep_spacing": "linspace",
        },
        7,
        {},
    ),
    "eta1": ({}, 10, {"eta": 1.0}),
    "eta05_clipped_range": (
        {"clip_sample_range": 0.5},
        6,
        {"eta": 0.5, "use_clipped_model_output": True},
    ),
    "thresholding": (
        {
            "thresholding": True,
            "clip_sample": False,
            "dynamic_thresholding_ratio": 0.9,
            "sample_max_value": 1.5,
        },
        10,
        {},
    ),
    "zero_snr_v_trailing": (
        {
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "clip_sample": False,
        },
        5,
        {},
    ),
    "offset_sample_leading": ({"steps_offset": 1, "prediction_type": "sample"}, 20, {}),
    "one_step_linspace": ({"timestep_spacing": "linspace"}, 1, {}),
    "leading_uneven": ({"set_alpha_to_one": False}, 3, {}),
    "sd_50": ({**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, 50, {}),
}

DDPM_CASES: dict[str, tuple[dict, int, dict]] = {
    "default": ({}, 10, {}),
    "small_log_v_trailing": (
        {
            "variance_type": "fixed_small_log",
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        },
        10,
        {},
    ),
    "large_sample_linspace": (
        {
            "variance_type": "fixed_large",
            "prediction_type": "sample",
            "timestep_spacing": "linspace",
            "clip_sample": False,
        },
        8,
        {},
    ),
    "learned_cosine": ({"variance_type": "learned", "beta_schedule": "squaredcos_cap_v2"}, 10, {}),
    "learned_range_sd": ({**SD, "variance_type": "learned_range", "clip_sample": False}, 10, {}),
    "thresholding": (
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        10,
        {},
    ),
    "clip_range_offset": ({"clip_sample_range": 0.5, "steps_offset": 1}, 12, {}),
    "trained": ({"num_train_timesteps": 100, "trained_betas": trained_betas()}, 9, {}),
    "zero_snr_v_trailing": (
        {
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        },
        6,
        {},
    ),
    "all_steps": ({"num_train_timesteps": 40}, 40, {}),
    "sigmoid": ({"beta_schedule": "sigmoid"}, 10, {}),
}

PNDM_CASES: dict[str, tuple[dict, int, dict]] = {
    "default_prk": ({}, 10, {}),
    "skip_prk": ({"skip_prk_steps": True}, 10, {}),
    "sd_plms": ({**SD, "skip_prk_steps": True, "steps_offset": 1}, 20, {}),
    "prk_v_trailing": ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 6, {}),
    "plms_v_trailing_alpha_one": (
        {
            "skip_prk_steps": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "set_alpha_to_one": True,
        },
        7,
        {},
    ),
    # (cosine with t = 999 first is ill-conditioned for this fake model: ᾱ_999 ~ 1e-9)
    "prk_cosine": ({"beta_schedule": "squaredcos_cap_v2"}, 5, {}),
    "prk_sd_linspace": ({**SD, "timestep_spacing": "linspace"}, 8, {}),
    "plms_trained_linspace": (
        {
            "num_train_timesteps": 100,
            "trained_betas": trained_betas(),
            "skip_prk_steps": True,
            "timestep_spacing": "linspace",
        },
        8,
        {},
    ),
    "plms_one_step": ({"skip_prk_steps": True}, 1, {}),
    "plms_two_steps": ({"skip_prk_steps": True}, 2, {}),
    "prk_minimal": ({}, 4, {}),
    "prk_offset": ({"steps_offset": 1, "set_alpha_to_one": True}, 12, {}),
}

CASES = {"ddim": DDIM_CASES, "ddpm": DDPM_CASES, "pndm": PNDM_CASES}
CLASS_NAMES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler"}


def fake_model_output(xp, x, t, variance_type: str | None = None):
    """A deterministic stand-in for the network, on NHWC ``x`` (numpy or jax.numpy ``xp``; ``t``
    may be traced): ``0.9 tanh(x) + 0.1 sin(0.01 t)`` in float32; with a learned variance, a
    second block of channels (σ² > 0 for ``"learned"``, v ∈ (-1, 1) for ``"learned_range"``)
    on the last axis."""
    shift = xp.float32(0.1) * xp.sin(xp.float32(0.01) * xp.asarray(t, dtype=xp.float32))
    out = xp.float32(0.9) * xp.tanh(x) + shift
    if variance_type == "learned":
        out = xp.concatenate([out, 0.01 * (1.0 + xp.tanh(x)) + 1e-4], axis=-1)
    elif variance_type == "learned_range":
        out = xp.concatenate([out, 0.8 * xp.tanh(2.0 * x)], axis=-1)
    return out.astype(xp.float32)


def initial_sample(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def step_noise(num_steps: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_steps, *SHAPE)).astype(np.float32)


def torch_trajectory(kind: str, config: dict, n: int, step_kwargs: dict, sample: np.ndarray, noise):
    """Runs diffusers' scheduler ``kind`` for a whole trajectory; returns numpy (NHWC) arrays
    ``timesteps``, ``prev_samples`` and, where the step has it, ``pred_original_samples``."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
    from diffusers.schedulers import scheduling_ddpm

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler}[kind]
    sched = cls(**config)
    sched.set_timesteps(n)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))  # noqa: E731
    to_np = lambda a: a.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    x = to_t(sample)
    prevs, x0s = [], []
    original_randn = scheduling_ddpm.randn_tensor
    try:
        for i, t in enumerate(sched.timesteps):
            mo = to_t(fake_model_output(np, to_np(x), int(t), config.get("variance_type")))
            if kind == "ddim":
                kw = dict(step_kwargs)
                if kw.get("eta", 0) > 0:
                    kw["variance_noise"] = to_t(noise[i])
                out = sched.step(mo, t, x, **kw)
            elif kind == "ddpm":
                scheduling_ddpm.randn_tensor = lambda *a, _n=noise[i], **k: to_t(_n)
                out = sched.step(mo, t, x)
            else:
                out = sched.step(mo, t, x)
            x = out.prev_sample
            prevs.append(to_np(x))
            if getattr(out, "pred_original_sample", None) is not None:
                x0s.append(to_np(out.pred_original_sample))
    finally:
        scheduling_ddpm.randn_tensor = original_randn
    result = {
        "timesteps": sched.timesteps.numpy().astype(np.int64),
        "prev_samples": np.stack(prevs).astype(np.float32),
    }
    if x0s:
        result["pred_original_samples"] = np.stack(x0s).astype(np.float32)
    return result


def is_stochastic(kind: str, step_kwargs: dict) -> bool:
    return kind == "ddpm" or (kind == "ddim" and step_kwargs.get("eta", 0) > 0)


def generate(out_dir: Path) -> None:
    sample = initial_sample()
    for kind, cases in CASES.items():
        for name, (config, n, step_kwargs) in cases.items():
            noise = step_noise(n + 10) if is_stochastic(kind, step_kwargs) else None
            result = torch_trajectory(kind, config, n, step_kwargs, sample, noise)
            arrays = {"sample": sample, **result}
            if noise is not None:
                arrays["noise"] = noise[: len(result["timesteps"])]
            meta = {
                "class_name": CLASS_NAMES[kind],
                "config": config,
                "num_inference_steps": n,
                "step_kwargs": step_kwargs,
            }
            save_case(out_dir, f"{kind}_{name}", arrays, meta)
