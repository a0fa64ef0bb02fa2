"""The DDPM objective and Min-SNR weighting against diffusers' training code (PyTorch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers import DDPMScheduler
from jaxdiff.training import TrainConfig, diffusion_loss, min_snr_weights, snr
from jaxdiff.training.losses import sample_noise_and_timesteps

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.training_utils import compute_snr  # noqa: E402

SCHEDULES = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
]


def _diffusers_weights(scheduler, timesteps, gamma: float, prediction_type: str):
    """The weights of diffusers' ``examples/text_to_image/train_text_to_image.py`` (--snr_gamma)."""
    snr_t = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr_t, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return weights / snr_t
    if prediction_type == "v_prediction":
        return weights / (snr_t + 1)
    return weights


@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: c["beta_schedule"])
def test_snr_matches_diffusers_compute_snr(config):
    t = np.array([0, 1, 10, 250, 500, 999])
    ours = snr(DDPMScheduler(**config), jnp.asarray(t))
    theirs = compute_snr(diffusers.DDPMScheduler(**config), torch.tensor(t))
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=2e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_diffusers_training_script(prediction_type, gamma):
    t = np.array([0, 3, 40, 120, 300, 600, 999])
    ours = min_snr_weights(snr(DDPMScheduler(), jnp.asarray(t)), gamma, prediction_type)
    theirs = _diffusers_weights(diffusers.DDPMScheduler(), torch.tensor(t), gamma, prediction_type)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=2e-5)
    # the x0-loss weight min(SNR, gamma) in each parametrisation (Hang et al. 2023)
    snr_t = np.asarray(snr(DDPMScheduler(), jnp.asarray(t)), np.float64)
    x0_weight = np.minimum(snr_t, gamma)
    scale = {"epsilon": snr_t, "v_prediction": snr_t + 1, "sample": 1.0}[prediction_type]
    np.testing.assert_allclose(np.asarray(ours) * scale, x0_weight, rtol=1e-5)


def test_epsilon_weight_at_zero_terminal_snr_is_its_limit():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    snr_t = snr(scheduler, jnp.asarray([0, 500, 999]))
    assert float(snr_t[-1]) == 0.0
    weights = np.asarray(min_snr_weights(snr_t, 5.0, "epsilon"))
    assert np.all(np.isfinite(weights)) and weights[-1] == 1.0  # min(SNR, 5)/SNR -> 1


def _apply(params, x_t, t, dropout_key):
    """A model whose output depends on x_t and t, so that every target has a nonzero error."""
    return params["w"] * x_t + params["b"] * (t[:, None, None, None] / 1000.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_diffusion_loss_matches_a_diffusers_training_step(prediction_type, snr_gamma):
    shape, key = (6, 4, 4, 3), jax.random.key(3)
    x0 = jax.random.uniform(jax.random.key(0), shape, minval=-1, maxval=1)
    params = {"w": jnp.float32(0.7), "b": jnp.float32(-0.4)}
    loss, aux = diffusion_loss(
        _apply, params, DDPMScheduler(), x0, key, prediction_type, snr_gamma=snr_gamma
    )
    # the same draw, then diffusers: add_noise, the target, mse (weighted per example)
    noise, t = sample_noise_and_timesteps(key, shape, 1000)
    np.testing.assert_array_equal(np.asarray(aux["timesteps"]), np.asarray(t))
    ref = diffusers.DDPMScheduler(prediction_type=prediction_type)
    x0_t, noise_t = torch.tensor(np.asarray(x0)), torch.tensor(np.asarray(noise))
    t_t = torch.tensor(np.asarray(t)).long()
    x_t = ref.add_noise(x0_t, noise_t, t_t)
    pred = 0.7 * x_t - 0.4 * (t_t[:, None, None, None] / 1000.0)
    target = {"epsilon": noise_t, "sample": x0_t}.get(prediction_type)
    if target is None:
        target = ref.get_velocity(x0_t, noise_t, t_t)
    errors = torch.nn.functional.mse_loss(pred, target, reduction="none")
    if snr_gamma is None:
        expected = errors.mean()
    else:
        per_example = errors.mean(dim=list(range(1, errors.ndim)))
        expected = (per_example * _diffusers_weights(ref, t_t, snr_gamma, prediction_type)).mean()
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


def test_weighting_changes_the_loss_and_its_gradient():
    # 32 examples: some have SNR > 1 (t below ~250), where the weight is below 1
    x0 = jax.random.uniform(jax.random.key(0), (32, 4, 4, 3), minval=-1, maxval=1)
    params = {"w": jnp.float32(0.7), "b": jnp.float32(-0.4)}

    def grad(gamma):
        return jax.grad(
            lambda p: diffusion_loss(
                _apply, p, DDPMScheduler(), x0, jax.random.key(1), snr_gamma=gamma
            )[0]
        )(params)

    plain, weighted = grad(None), grad(1.0)
    assert abs(float(plain["w"]) - float(weighted["w"])) > 1e-4


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "5"])
def test_snr_gamma_errors_name_the_argument(bad):
    x0 = jnp.zeros((2, 4, 4, 3))
    params = {"w": jnp.float32(1.0), "b": jnp.float32(0.0)}
    with pytest.raises(ValueError, match="snr_gamma must be a number > 0"):
        diffusion_loss(_apply, params, DDPMScheduler(), x0, jax.random.key(0), snr_gamma=bad)
    with pytest.raises(ValueError, match="snr_gamma must be a number > 0"):
        TrainConfig(data="cifar10-cats", out="x", snr_gamma=bad).validate()


@pytest.mark.parametrize(
    "field, bad, message",
    [
        ("lr", "a", "lr must be a number"),
        ("warmup", 1.5, "warmup must be an integer"),
        ("sample_every", 1.5, "sample_every must be an integer"),
        ("seed", "a", "seed must be an integer"),
        ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0"),
        ("grad_clip", float("nan"), "grad_clip must be a finite number > 0"),
        ("grad_clip", -1.0, "grad_clip must be a finite number > 0"),
    ],
)
def test_train_config_rejects_bad_numbers(field, bad, message):
    from jaxdiff.training.loop import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(data="cifar10-cats", out="x", **{field: bad}).validate()
