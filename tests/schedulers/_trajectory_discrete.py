"""Runs a jaxdiff DDPM / DDIM / PNDM trajectory the way the golden reference ran diffusers'.

Two drivers that must agree: an eager Python loop (as in the diffusers quicktour; PNDM
without a ``shape``, so its history is made at the first step) and one jitted ``lax.scan``
over the steps (the state is the carry, the timestep and the noise are scanned inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from weights_conversion.reference.schedulers_ddpm_ddim_pndm import fake_model_output

COMPONENT = "schedulers_ddpm_ddim_pndm"


def jax_trajectory(
    scheduler, n: int, sample, noise=None, step_kwargs=None, mode: str = "eager"
) -> dict[str, np.ndarray]:
    """``timesteps``, ``prev_samples`` and (where the step returns it) ``pred_original_samples``
    of a whole trajectory from ``sample`` (NHWC), with ``noise[i]`` injected at step i."""
    step_kwargs = dict(step_kwargs or {})
    variance_type = scheduler.config.get("variance_type")
    x = jnp.asarray(sample)

    if mode == "eager":
        state = scheduler.set_timesteps(n)
        prevs, x0s = [], []
        for i, t in enumerate(np.asarray(state.timesteps)):
            mo = fake_model_output(jnp, x, int(t), variance_type)
            kw = dict(step_kwargs)
            if noise is not None:
                kw["noise"] = jnp.asarray(noise[i])
            out = scheduler.step(state, mo, int(t), x, **kw)
            state, x = out.state, out.prev_sample
            prevs.append(np.asarray(x))
            if out.pred_original_sample is not None:
                x0s.append(np.asarray(out.pred_original_sample))
        result = {"timesteps": np.asarray(state.timesteps), "prev_samples": np.stack(prevs)}
        if x0s:
            result["pred_original_samples"] = np.stack(x0s)
        return result

    state = scheduler.set_timesteps(n, shape=x.shape)
    num = state.timesteps.shape[0]
    noises = jnp.zeros((num, *x.shape)) if noise is None else jnp.asarray(noise[:num])

    @jax.jit
    def run(state, x, noises):
        def body(carry, inputs):
            state, x = carry
            t, eps = inputs
            mo = fake_model_output(jnp, x, t, variance_type)
            kw = dict(step_kwargs)
            if noise is not None:
                kw["noise"] = eps
            out = scheduler.step(state, mo, t, x, **kw)
            x0 = out.pred_original_sample
            return (out.state, out.prev_sample), (out.prev_sample, x if x0 is None else x0)

        _, (prevs, x0s) = jax.lax.scan(body, (state, x), (state.timesteps, noises))
        return prevs, x0s

    prevs, x0s = run(state, x, noises)
    result = {"timesteps": np.asarray(state.timesteps), "prev_samples": np.asarray(prevs)}
    if scheduler.config["_class_name"] != "PNDMScheduler":
        result["pred_original_samples"] = np.asarray(x0s)
    return result


def assert_trajectory_close(
    actual: dict, expected: dict, rtol: float = 1e-5, atol_scale: float = 2e-6
) -> None:
    """Every step within ``rtol``; the absolute floor is ``atol_scale`` x the step's largest
    magnitude, since float32 rounding of the step's largest terms (~1e-7 relative, accumulated
    over a few operations and steps) lands on elements that happen to be near 0."""
    np.testing.assert_array_equal(actual["timesteps"], expected["timesteps"])
    for name in ("prev_samples", "pred_original_samples"):
        if name not in expected:
            assert name not in actual, f"{name} returned but the reference step has none"
            continue
        assert actual[name].shape == expected[name].shape, name
        for i, (a, e) in enumerate(zip(actual[name], expected[name], strict=True)):
            atol = atol_scale * max(1.0, float(np.abs(e).max()))
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{name}[{i}]")
