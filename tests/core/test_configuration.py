"""jaxdiff.configuration: diffusers config.json round trips, frozen configs, unknown keys."""

import json

import pytest

from jaxdiff.configuration import ConfigMixin, FrozenConfig, load_config, register_to_config


class ToyScheduler(ConfigMixin):
    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        trained_betas=None,
        required_thing=None,
    ):
        self.ready = True


class NeedsField(ConfigMixin):
    @register_to_config
    def __init__(self, width: int, depth: int = 2):
        pass


def test_config_holds_every_argument_with_defaults():
    s = ToyScheduler(beta_schedule="scaled_linear")
    assert s.config.num_train_timesteps == 1000
    assert s.config["beta_schedule"] == "scaled_linear"
    assert s.config._class_name == "ToyScheduler"
    assert s.config._diffusers_version


def test_config_is_frozen():
    s = ToyScheduler()
    with pytest.raises(AttributeError, match="frozen"):
        s.config.num_train_timesteps = 10
    with pytest.raises(AttributeError, match="frozen"):
        s.config["num_train_timesteps"] = 10


def test_config_prints_as_json():
    text = repr(ToyScheduler().config)
    assert text.startswith("ToyScheduler {")
    assert json.loads(text[len("ToyScheduler ") :])["beta_schedule"] == "linear"


def test_save_and_load_round_trip(tmp_path):
    s = ToyScheduler(num_train_timesteps=10, trained_betas=[0.1] * 10)
    path = s.save_config(tmp_path)
    data = json.loads(open(path).read())
    assert data["_class_name"] == "ToyScheduler"
    assert data["trained_betas"] == [0.1] * 10
    again = ToyScheduler.from_pretrained(tmp_path)
    assert again.config.to_json_string() == s.config.to_json_string()


def test_from_config_accepts_dict_config_and_object():
    s = ToyScheduler(num_train_timesteps=7)
    for source in (dict(s.config), s.config, s):
        assert ToyScheduler.from_config(source).config.num_train_timesteps == 7
    assert ToyScheduler.from_config(s.config, num_train_timesteps=3).config.num_train_timesteps == 3


def test_unknown_keys_warn_and_round_trip(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(
        json.dumps(
            {"_class_name": "ToyScheduler", "num_train_timesteps": 5, "future_field": [1, 2]}
        )
    )
    with pytest.warns(UserWarning, match="future_field"):
        s = ToyScheduler.from_pretrained(tmp_path)
    assert s.config.future_field == [1, 2]
    out = tmp_path / "out"
    s.save_config(out)
    assert json.loads((out / "scheduler_config.json").read_text())["future_field"] == [1, 2]


def test_missing_required_field_is_named():
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['width'\]"):
        NeedsField.from_config({"depth": 3})


def test_subfolder_and_missing_config(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 9}')
    assert (
        ToyScheduler.from_pretrained(tmp_path, subfolder="scheduler").config.num_train_timesteps
        == 9
    )
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        ToyScheduler.from_pretrained(tmp_path)


def test_invalid_json_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path)


def test_frozen_config_equality_and_attribute_errors():
    a = FrozenConfig({"x": (1, 2)}, class_name="A")
    assert a == {"x": [1, 2]}
    with pytest.raises(AttributeError, match="has no field 'y'"):
        _ = a.y


def test_defaults_are_not_carried_across_classes_as_in_diffusers():
    """diffusers' `_use_default_values`: fields that took their default are dropped by
    `from_config`, so the new class uses its own default (e.g. Euler's "linspace" spacing)."""
    from jaxdiff.schedulers import DDPMScheduler, EulerDiscreteScheduler

    in_memory = DDPMScheduler(beta_schedule="linear")
    assert "timestep_spacing" in in_memory.config._use_default_values
    assert (
        EulerDiscreteScheduler.from_config(in_memory.config).config.timestep_spacing == "linspace"
    )
    explicit = DDPMScheduler(timestep_spacing="leading")
    assert EulerDiscreteScheduler.from_config(explicit.config).config.timestep_spacing == "leading"
    assert "_use_default_values" not in in_memory.config.to_json_string()


def test_loaded_configs_carry_every_saved_field(tmp_path):
    from jaxdiff.schedulers import DDPMScheduler, EulerDiscreteScheduler

    DDPMScheduler().save_config(tmp_path)
    loaded = DDPMScheduler.from_pretrained(tmp_path)
    assert "_use_default_values" not in loaded.config
    assert EulerDiscreteScheduler.from_config(loaded.config).config.timestep_spacing == "leading"
