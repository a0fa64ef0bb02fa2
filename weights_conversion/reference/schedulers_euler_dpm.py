"""Golden trajectories of diffusers' EulerDiscrete, EulerAncestralDiscrete and DPMSolverMultistep
schedulers -> tests/reference/schedulers_euler_dpm/.

Every case runs a whole sampling trajectory from a fixed random sample with a deterministic fake
model, computed identically by jaxdiff's tests:

    model_output_i = residual_i,  model_output_i[..., :C] += 0.5 * scale_model_input(x_i)

(``residual_i`` a fixed random array per step, saved; 2C channels when the model also predicts
its variance). Stochastic steps get predetermined noise per step (saved): DPM-Solver through
``variance_noise=``, the Euler schedulers by replacing ``randn_tensor`` in their module.
Arrays are NHWC on the jaxdiff side and transposed to NCHW for diffusers.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np

from weights_conversion.reference._io import save_case

SHAPE = (2, 4, 4, 3)  # NHWC, (2, 3, 4, 4) in diffusers

MODULES = {
    "EulerDiscreteScheduler": "scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
}

_TRAINED = np.linspace(1e-4, 0.03, 100) ** 1.1  # an explicit, non-standard schedule (T = 100)
TRAINED = {"num_train_timesteps": 100, "trained_betas": [float(b) for b in _TRAINED]}
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

E, A, D = MODULES  # class names

# (case name, class, config, num_inference_steps, step kwargs)
CASES = [
    # --- Euler ---------------------------------------------------------------------------
    ("euler_default", E, {}, 10, {}),
    ("euler_sd_leading", E, {**SD, "timestep_spacing": "leading", "steps_offset": 1}, 10, {}),
    (
        "euler_trailing_v",
        E,
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        8,
        {},
    ),
    (
        "euler_cosine_sample",
        E,
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"},
        10,
        {},
    ),
    ("euler_karras", E, {**SD, "use_karras_sigmas": True}, 10, {}),
    (
        "euler_karras_minmax_sigmamin",
        E,
        {
            "use_karras_sigmas": True,
            "sigma_min": 0.05,
            "sigma_max": 20.0,
            "final_sigmas_type": "sigma_min",
        },
        7,
        {},
    ),
    ("euler_log_linear", E, {"interpolation_type": "log_linear"}, 10, {}),
    ("euler_exponential", E, {**SD, "use_exponential_sigmas": True}, 10, {}),
    ("euler_beta", E, {"use_beta_sigmas": True, "timestep_spacing": "trailing"}, 10, {}),
    (
        "euler_churn",
        E,
        {**SD},
        10,
        {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 5.0, "s_noise": 1.003},
    ),
    ("euler_churn_all", E, {"timestep_spacing": "leading"}, 6, {"s_churn": 20.0}),
    (
        "euler_continuous_v",
        E,
        {"timestep_type": "continuous", "prediction_type": "v_prediction"},
        10,
        {},
    ),
    (
        "euler_zero_snr_v",
        E,
        {
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        10,
        {},
    ),
    ("euler_trained", E, {**TRAINED, "timestep_spacing": "leading", "steps_offset": 1}, 9, {}),
    # --- Euler ancestral -----------------------------------------------------------------
    ("ancestral_default", A, {}, 10, {}),
    ("ancestral_sd_leading", A, {**SD, "timestep_spacing": "leading", "steps_offset": 1}, 10, {}),
    (
        "ancestral_trailing_v",
        A,
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        8,
        {},
    ),
    ("ancestral_cosine", A, {"beta_schedule": "squaredcos_cap_v2"}, 10, {}),
    ("ancestral_trained", A, {**TRAINED}, 7, {}),
    (
        "ancestral_zero_snr_v",
        A,
        {
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        10,
        {},
    ),
    # --- DPM-Solver ----------------------------------------------------------------------
    ("dpm_default", D, {}, 10, {}),
    ("dpm_order1", D, {"solver_order": 1}, 10, {}),
    ("dpm_order3", D, {"solver_order": 3}, 10, {}),
    ("dpm_order2_heun", D, {"solver_type": "heun"}, 10, {}),
    (
        "dpm_order3_long_sigmamin",
        D,
        {"solver_order": 3, "final_sigmas_type": "sigma_min", "lower_order_final": False},
        16,
        {},
    ),
    (
        "dpm_euler_at_final_long",
        D,
        {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
        16,
        {},
    ),
    ("dpm_lower_final_long", D, {"solver_order": 3, "final_sigmas_type": "sigma_min"}, 16, {}),
    (
        "dpm_noise_pred_o2",
        D,
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        10,
        {},
    ),
    (
        "dpm_noise_pred_o3_heun_sample",
        D,
        {
            "algorithm_type": "dpmsolver",
            "solver_order": 3,
            "solver_type": "heun",
            "final_sigmas_type": "sigma_min",
            "prediction_type": "sample",
        },
        10,
        {},
    ),
    (
        "dpm_karras_sd_leading",
        D,
        {**SD, "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1},
        10,
        {},
    ),
    (
        "dpm_trailing_v_o3",
        D,
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "solver_order": 3},
        10,
        {},
    ),
    (
        "dpm_sample_thresholding",
        D,
        {
            "prediction_type": "sample",
            "thresholding": True,
            "dynamic_thresholding_ratio": 0.9,
            "sample_max_value": 1.5,
        },
        10,
        {},
    ),
    (
        "dpm_noise_pred_v_thresholding",
        D,
        {
            "algorithm_type": "dpmsolver",
            "final_sigmas_type": "sigma_min",
            "prediction_type": "v_prediction",
            "thresholding": True,
            "dynamic_thresholding_ratio": 0.8,
            "sample_max_value": 2.0,
        },
        10,
        {},
    ),
    ("dpm_learned_range", D, {"variance_type": "learned_range"}, 10, {}),
    (
        "dpm_cosine_lambda_clip",
        D,
        {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "solver_order": 3},
        10,
        {},
    ),
    ("dpm_sde_pp_o2", D, {"algorithm_type": "sde-dpmsolver++"}, 10, {}),
    (
        "dpm_sde_pp_o3_heun",
        D,
        {
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 3,
            "solver_type": "heun",
            "use_karras_sigmas": True,
        },
        10,
        {},
    ),
    (
        "dpm_sde_noise_pred_heun",
        D,
        {
            "algorithm_type": "sde-dpmsolver",
            "solver_type": "heun",
            "final_sigmas_type": "sigma_min",
        },
        10,
        {},
    ),
    ("dpm_lu_lambdas", D, {"use_lu_lambdas": True, "solver_order": 3}, 10, {}),
    ("dpm_exponential", D, {**SD, "use_exponential_sigmas": True}, 10, {}),
    (
        "dpm_trained_leading",
        D,
        {**TRAINED, "timestep_spacing": "leading", "steps_offset": 1},
        9,
        {},
    ),
    (
        "dpm_zero_snr_v",
        D,
        {
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        10,
        {},
    ),
    (
        "dpm_flow",
        D,
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
        10,
        {},
    ),
]


def learned(config: dict) -> bool:
    return config.get("variance_type") in ("learned", "learned_range")


def make_inputs(name: str, config: dict, n: int) -> dict[str, np.ndarray]:
    """Fixed random sample, per-step residuals and per-step noise (NHWC float32)."""
    seed = sum(map(ord, name))
    rng = np.random.default_rng(seed)
    channels = SHAPE[-1] * (2 if learned(config) else 1)
    return {
        "sample": rng.standard_normal(SHAPE).astype(np.float32),
        "residuals": (0.5 * rng.standard_normal((n, *SHAPE[:-1], channels))).astype(np.float32),
        "noises": rng.standard_normal((n, *SHAPE)).astype(np.float32),
    }


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _nhwc(t) -> np.ndarray:
    return np.moveaxis(t.detach().cpu().numpy(), 1, -1).astype(np.float32)


def build(cls_name: str, config: dict):
    import diffusers

    return getattr(diffusers, cls_name)(**config)


def run_diffusers(cls_name: str, config: dict, n: int, inputs: dict, step_kwargs: dict) -> dict:
    """Runs the diffusers trajectory; returns NHWC arrays (timesteps, sigmas, init_noise_sigma,
    prev_samples, and pred_original_samples where the scheduler's output has them)."""
    import torch
    from diffusers import schedulers

    sched = build(cls_name, config)
    sched.set_timesteps(n)
    module = getattr(schedulers, MODULES[cls_name])
    noises = inputs["noises"]
    current = {"i": 0}

    def fake_randn(shape, *args, **kwargs):
        out = _nchw(noises[current["i"]])
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out.to(kwargs.get("dtype") or torch.float32)

    x = _nchw(inputs["sample"]) * sched.init_noise_sigma
    channels = SHAPE[-1]
    prev, preds = [], []
    patch = (
        _patched(module, "randn_tensor", fake_randn)
        if hasattr(module, "randn_tensor")
        else contextlib.nullcontext()
    )
    with patch:
        for i, t in enumerate(sched.timesteps):
            current["i"] = i
            x_in = sched.scale_model_input(x, t)
            mo = _nchw(inputs["residuals"][i]).clone()
            mo[:, :channels] += 0.5 * x_in
            kwargs = dict(step_kwargs)
            if cls_name == "DPMSolverMultistepScheduler" and "sde" in config.get(
                "algorithm_type", ""
            ):
                kwargs["variance_noise"] = _nchw(noises[i])
            out = sched.step(mo, t, x, **kwargs)
            x = out.prev_sample
            prev.append(_nhwc(x))
            if getattr(out, "pred_original_sample", None) is not None:
                preds.append(_nhwc(out.pred_original_sample))
    result = {
        "timesteps": sched.timesteps.numpy(),
        "sigmas": sched.sigmas.numpy().astype(np.float32),
        "init_noise_sigma": np.asarray(float(sched.init_noise_sigma), np.float32),
        "prev_samples": np.stack(prev),
    }
    if preds:
        result["pred_original_samples"] = np.stack(preds)
    return result


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _jsonable_config(sched) -> dict:
    out = {}
    for k, v in dict(sched.config).items():
        if k.startswith("_"):
            continue
        if isinstance(v, float) and math.isinf(v):
            v = str(v)  # JSON has no infinity: "-inf" / "inf", parsed back by float()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


def generate(out_dir: Path) -> None:
    for name, cls_name, config, n, step_kwargs in CASES:
        inputs = make_inputs(name, config, n)
        result = run_diffusers(cls_name, config, n, inputs, step_kwargs)
        sched = build(cls_name, config)
        arrays = {**inputs, **result}
        meta = {
            "class_name": cls_name,
            "config": _jsonable_config(sched),
            "num_inference_steps": n,
            "step_kwargs": step_kwargs,
        }
        save_case(out_dir, name, arrays, meta)
