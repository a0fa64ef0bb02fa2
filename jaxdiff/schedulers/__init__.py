"""Pure-function schedulers: ``state = set_timesteps(...)``, ``out = step(state, ...)``."""

import importlib

from jaxdiff.schedulers.common import SchedulerMixin, SchedulerOutput

_MODULES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpm_solver",
}


def __getattr__(name: str):
    # Transitional lazy loading while the scheduler modules land one by one.
    if name in _MODULES:
        try:
            module = importlib.import_module(f"jaxdiff.schedulers.{_MODULES[name]}")
        except ModuleNotFoundError as err:
            raise AttributeError(name) from err
        return getattr(module, name)
    raise AttributeError(f"module 'jaxdiff.schedulers' has no attribute {name!r}")


__all__ = ["SchedulerMixin", "SchedulerOutput", *_MODULES]
