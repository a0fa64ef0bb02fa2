"""Swapping schedulers with ``from_config``, as diffusers users do, against diffusers itself."""

import json

import numpy as np
import pytest

from jaxdiff import schedulers
from jaxdiff.schedulers.common import KARRAS_DIFFUSION_SCHEDULERS
from tests.reference_io import requires_reference

NAMES = list(KARRAS_DIFFUSION_SCHEDULERS)
# A Stable Diffusion v1.5 scheduler_config.json (PNDM), every field explicit.
SD15 = {
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


def _configs():
    yield "ddpm_in_memory", schedulers.DDPMScheduler().config
    yield "ddpm_all_fields", json.loads(schedulers.DDPMScheduler().config.to_json_string())
    yield "sd15", SD15
    # Euler's sigma_min / sigma_max are not DPM-Solver fields, yet diffusers keeps them in the
    # swapped config and its Karras sigmas use them.
    bounded = schedulers.EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10)
    yield "euler_sigma_bounds", json.loads(bounded.config.to_json_string())


@pytest.mark.parametrize("target", NAMES)
def test_every_swap_builds_and_steps(target):
    cls = getattr(schedulers, target)
    for _, config in _configs():
        sched = cls.from_config(config)
        assert type(sched).__name__ in [c.__name__ for c in sched.compatibles]
        state = sched.set_timesteps(5, shape=(1, 2, 2, 1))
        x = np.ones((1, 2, 2, 1), np.float32)
        t = state.timesteps[0]
        out = sched.step(state, 0.1 * x, t, sched.scale_model_input(state, x, t), noise=x)
        assert np.all(np.isfinite(np.asarray(out.prev_sample)))


@requires_reference
@pytest.mark.parametrize("target", NAMES)
def test_swapped_timesteps_and_sigmas_match_diffusers(target, tmp_path):
    import diffusers

    for name, config in _configs():
        ref_src = (
            diffusers.DDPMScheduler()
            if name == "ddpm_in_memory"
            else getattr(diffusers, config["_class_name"]).from_config(dict(config))
        )
        ref = getattr(diffusers, target).from_config(ref_src.config)
        ours = getattr(schedulers, target).from_config(config)
        ref.set_timesteps(7)
        state = ours.set_timesteps(7)
        np.testing.assert_allclose(
            np.asarray(state.timesteps, np.float64), ref.timesteps.numpy(), rtol=1e-6, err_msg=name
        )
        np.testing.assert_allclose(
            float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6, err_msg=name
        )
        public = sorted(k for k in ref.config if not k.startswith("_"))
        assert sorted(k for k in ours.config if not k.startswith("_")) == public, name
        for key, value in ref.config.items():
            if not key.startswith("_") and key in ours.config:
                mine = ours.config[key]
                if isinstance(value, (list, tuple)) or isinstance(mine, (list, tuple)):
                    value, mine = list(value or []), list(mine or [])
                assert mine == value, (name, target, key)
