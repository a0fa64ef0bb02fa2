"""Frozen configs that read and write diffusers' ``config.json``.

A config is the set of constructor arguments of a scheduler or a model, exactly as diffusers
names them, plus the bookkeeping keys ``_class_name`` and ``_diffusers_version``. jaxdiff keeps
configs immutable (:class:`FrozenConfig`): changing a scheduler means building a new one,
``DDIMScheduler.from_config(pipe.scheduler.config, eta=...)``, as in diffusers.

Two kinds of objects carry a config:

* schedulers subclass :class:`ConfigMixin` and decorate ``__init__`` with
  :func:`register_to_config`: the call's arguments (defaults filled in) become ``self.config``;
* Flax Linen models subclass :class:`ModelConfigMixin`: the dataclass fields *are* the config,
  so ``model.config`` is derived from the module itself.

Keys a class does not know are tolerated: they are reported once with a warning and kept in
``config`` so that ``save_config`` writes them back unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxdiff import __diffusers_version__ as _DIFFUSERS_VERSION
from jaxdiff import hub
from jaxdiff.utils.checks import is_real

CONFIG_NAME = "config.json"
# diffusers' in-memory record of the fields that took their default value (not given by the
# caller, nor present in the loaded file). ``from_config`` drops them, so a scheduler swapped
# from an in-memory default config gets the *new* class's defaults, exactly as in diffusers.
USE_DEFAULT_VALUES = "_use_default_values"
# Keys that describe a file, not the object: never passed to a constructor.
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _jsonable(value: Any) -> Any:
    """Turns tuples, numpy and jax values into plain JSON values (lists, floats, ints)."""
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return np.asarray(value).tolist()
    if hasattr(value, "dtype") and hasattr(value, "name") and not isinstance(value, str):
        return str(np.dtype(value))
    return value


class FrozenConfig(Mapping):
    """An immutable mapping with attribute access that prints as JSON, like diffusers' FrozenDict.

    >>> cfg = FrozenConfig({"num_train_timesteps": 1000}, class_name="DDPMScheduler")
    >>> cfg.num_train_timesteps
    1000
    >>> cfg.num_train_timesteps = 10
    Traceback (most recent call last):
    ...
    AttributeError: DDPMScheduler.config is frozen: ...
    """

    __slots__ = ("_data", "_class_name")

    def __init__(self, data: Mapping[str, Any], class_name: str | None = None):
        object.__setattr__(self, "_data", dict(data))
        object.__setattr__(self, "_class_name", class_name or data.get("_class_name", "Config"))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"{self._class_name}.config has no field {name!r}") from None

    def _frozen(self, *args, **kwargs):
        raise AttributeError(
            f"{self._class_name}.config is frozen: build a new object instead, e.g. "
            f"`{self._class_name}.from_config(obj.config, field=value)`."
        )

    __setattr__ = __setitem__ = __delattr__ = __delitem__ = _frozen

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready copy of the config."""
        return _jsonable(self._data)

    def to_json_string(self) -> str:
        """The config as diffusers writes it (without the in-memory ``_use_default_values``)."""
        data = {k: v for k, v in self.to_dict().items() if k != USE_DEFAULT_VALUES}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{self._class_name} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == _jsonable(dict(other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.to_json_string())


def _accepted_keys(cls: type) -> tuple[list[str], dict[str, Any], list[str]]:
    """(all config keys in order, defaults, required keys) of a config class."""
    if dataclasses.is_dataclass(cls):
        fields = [f for f in dataclasses.fields(cls) if f.name not in cls._non_config_fields]
        names = [f.name for f in fields]
        defaults = {}
        required = []
        for f in fields:
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
            else:
                required.append(f.name)
        return names, defaults, required
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    params = list(inspect.signature(init).parameters.values())[1:]
    names, defaults, required = [], {}, []
    for p in params:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in cls._non_config_fields:
            continue
        names.append(p.name)
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        else:
            defaults[p.name] = p.default
    return names, defaults, required


def split_config(cls: type, config: Mapping[str, Any], **overrides) -> tuple[dict, dict]:
    """Splits a config dict into (constructor kwargs, unknown keys kept for the round trip).

    Raises:
        ValueError: when a required field is missing, naming every missing field.
    """
    names, _, required = _accepted_keys(cls)
    used_defaults = set(config.get(USE_DEFAULT_VALUES, ()))
    merged = {
        k: v for k, v in dict(config).items() if k not in _BOOKKEEPING and k not in used_defaults
    }
    merged.update(overrides)
    kwargs = {k: v for k, v in merged.items() if k in names}
    unknown = {k: v for k, v in merged.items() if k not in names and not k.startswith("_")}
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise ValueError(
            f"{cls.__name__} config is missing required field(s) {missing}; "
            f"the config has {sorted(merged)}."
        )
    if unknown:
        warnings.warn(
            f"{cls.__name__} does not use the config field(s) {sorted(unknown)}: they are "
            "ignored, and kept in `.config` so that save_config writes them back.",
            stacklevel=3,
        )
    return kwargs, unknown


def load_config(
    pretrained_model_name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    config_name: str = CONFIG_NAME,
    **hub_kwargs,
) -> dict[str, Any]:
    """Reads a diffusers/transformers config file from a local folder or a Hub repo.

    ``pretrained_model_name_or_path`` may also name the JSON file itself.
    """
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isfile(path):
        config_file = path
    else:
        config_file = hub.resolve_file(path, config_name, subfolder=subfolder, **hub_kwargs)
    try:
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(data).__name__}")
    return data


class _ConfigBase:
    """What schedulers and models share: loading, saving, ``from_config``."""

    config_name: str = CONFIG_NAME
    _non_config_fields: tuple[str, ...] = ()

    @classmethod
    def _config_dict(cls, config: Mapping[str, Any] | Any) -> dict[str, Any]:
        if isinstance(config, _ConfigBase):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(
                f"{cls.__name__}.from_config expects a dict, a FrozenConfig or an object with "
                f"`.config`, got {type(config).__name__}"
            )
        return dict(config)

    def save_config(self, save_directory: str | os.PathLike) -> str:
        """Writes ``self.config`` as ``save_directory/<config_name>``; returns the file's path."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, expected a folder")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.config.to_json_string())
        return path


def _make_frozen(cls: type, values: Mapping[str, Any], extra: Mapping[str, Any]) -> FrozenConfig:
    data = {"_class_name": cls.__name__, "_diffusers_version": _DIFFUSERS_VERSION}
    data.update(values)
    data.update(extra)
    return FrozenConfig(data, class_name=cls.__name__)


class ConfigMixin(_ConfigBase):
    """Config handling for plain Python objects (schedulers). Decorate ``__init__`` with
    :func:`register_to_config`."""

    config_name = "scheduler_config.json"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any = None, **overrides):
        """Builds the object from a config dict, a ``FrozenConfig`` or another object's config.

        Keys of another class (``DDPMScheduler.from_config(ddim.config)``) that this class does
        not use are kept quietly in ``.config``, as diffusers: swapping schedulers is the
        documented use, and some are still read (an Euler config's ``sigma_min`` / ``sigma_max``
        bound DPM-Solver's Karras sigmas).
        """
        config = cls._config_dict(config if config is not None else {})
        other = {}
        if config.get("_class_name", cls.__name__) != cls.__name__:
            names, _, _ = _accepted_keys(cls)
            defaults = set(config.get(USE_DEFAULT_VALUES, ()))
            other = {
                k: v
                for k, v in config.items()
                if k not in names and not k.startswith("_") and k not in defaults
            }
            config = {k: v for k, v in config.items() if k not in other}
        kwargs, unknown = split_config(cls, config, **overrides)
        obj = cls(**kwargs)
        if unknown or other:  # diffusers keeps the other class's keys too (its hidden config)
            keep = {k: obj.config[k] for k in (USE_DEFAULT_VALUES,) if k in obj.config}
            obj._register_config(dict(obj.config), {**other, **unknown, **keep})
        return obj

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **kwargs,
    ):
        """Loads ``<repo or folder>/<subfolder>/<config_name>`` (e.g. ``subfolder="scheduler"``)."""
        hub_kwargs = hub.pop_hub_kwargs(kwargs)
        config = load_config(
            pretrained_model_name_or_path, subfolder, cls.config_name, **hub_kwargs
        )
        return cls.from_config(config, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        return self.save_config(save_directory)

    def _register_config(self, values: Mapping[str, Any], extra: Mapping[str, Any] = ()) -> None:
        values = {k: v for k, v in values.items() if k not in _BOOKKEEPING}
        object.__setattr__(self, "_config", _make_frozen(type(self), values, dict(extra)))

    @property
    def config(self) -> FrozenConfig:
        return self._config

    def __repr__(self) -> str:
        return repr(self.config)


def register_to_config(init):
    """Decorator for ``__init__``: stores every argument (defaults filled in) as ``self.config``."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        given = set(bound.arguments)
        bound.apply_defaults()
        values = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in list(bound.arguments.items())[1:]
            if k not in type(self)._non_config_fields
        }
        defaults = sorted(k for k in values if k not in given)
        self._register_config(values, {USE_DEFAULT_VALUES: defaults} if defaults else {})
        init(self, *args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------
# Model config fields: the values that can never work are rejected when the model is built
# (constructor, from_config, from_pretrained), not deep inside the first apply.


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return is_real(v) and math.isfinite(float(v))


def _is_seq(v: Any, item: Callable[[Any], bool], min_len: int = 1, max_len: int = 10**9) -> bool:
    return isinstance(v, (list, tuple)) and min_len <= len(v) <= max_len and all(map(item, v))


def _pos_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _nonneg_int(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _or_list(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A value for every block at once, or one per block."""
    return lambda v: check(v) or _is_seq(v, check)


# (check, what is expected). Each accepts what the diffusers / transformers constructors accept
# for the field (e.g. attention_head_dim an int, a per-block list or None; norm_num_groups None);
# a model narrows a rule with ``_config_rules`` where its code needs less.
POS_INT = (_pos_int, "a positive int")
NONNEG_INT = (_nonneg_int, "an int >= 0")
OPT_POS_INT = (_optional(_pos_int), "a positive int or None")
OPT_INT = (_optional(_is_int), "an int or None")
POS_INTS = (_or_list(_pos_int), "a positive int or a list of positive ints (one per block)")
OPT_POS_INTS = (
    _optional(_or_list(_pos_int)),
    "a positive int, a list of positive ints (one per block) or None",
)
NONNEG_INTS = (_or_list(_nonneg_int), "an int >= 0 or a list of them (one per block)")
CHANNELS = (lambda v: _is_seq(v, _pos_int), "a non-empty list of positive ints")
SIZE = (
    lambda v: _pos_int(v) or _is_seq(v, _pos_int, 2, 2),
    "a positive int or a [height, width] list of positive ints",
)
OPT_SIZE = (_optional(SIZE[0]), SIZE[1] + ", or None")
EPS = (lambda v: _is_real(v) and v >= 0, "a finite number >= 0")
REAL = (_is_real, "a finite number")
OPT_REAL = (_optional(_is_real), "a finite number or None")
OPT_REALS = (_optional(lambda v: _is_seq(v, _is_real)), "a list of finite numbers or None")
PROB = (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]")
STR = (lambda v: isinstance(v, str), "a string")
OPT_STR = (_optional(lambda v: isinstance(v, str)), "a string or None")
STRS = (lambda v: _is_seq(v, lambda t: isinstance(t, str)), "a non-empty list of strings")

MODEL_CONFIG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # shapes
    "in_channels": POS_INT,
    "out_channels": POS_INT,
    "latent_channels": POS_INT,
    "sample_size": OPT_SIZE,
    "block_out_channels": CHANNELS,
    "layers_per_block": NONNEG_INTS,
    "norm_num_groups": OPT_POS_INT,
    "attn_norm_num_groups": OPT_POS_INT,
    "attention_head_dim": OPT_POS_INTS,
    "num_attention_heads": OPT_POS_INTS,
    "cross_attention_dim": OPT_POS_INTS,
    "time_embedding_dim": OPT_POS_INT,
    "time_cond_proj_dim": OPT_POS_INT,
    "addition_time_embed_dim": OPT_POS_INT,
    "addition_embed_type_num_heads": POS_INT,
    "projection_class_embeddings_input_dim": OPT_POS_INT,
    "encoder_hid_dim": OPT_POS_INT,
    "num_class_embeds": OPT_POS_INT,
    "num_train_timesteps": OPT_POS_INT,
    "downsample_padding": NONNEG_INT,
    "conv_in_kernel": POS_INT,
    "conv_out_kernel": POS_INT,
    # numbers
    "norm_eps": EPS,
    "layer_norm_eps": EPS,
    "dropout": PROB,
    "attention_dropout": PROB,
    "freq_shift": REAL,
    "mid_block_scale_factor": REAL,
    "resnet_out_scale_factor": REAL,
    "scaling_factor": REAL,
    "shift_factor": OPT_REAL,
    "latents_mean": OPT_REALS,
    "latents_std": OPT_REALS,
    # names
    "down_block_types": STRS,
    "up_block_types": STRS,
    "mid_block_type": OPT_STR,
    "act_fn": STR,
    "hidden_act": STR,
    "time_embedding_type": STR,
    "resnet_time_scale_shift": STR,
    "downsample_type": STR,
    "upsample_type": STR,
    "class_embed_type": OPT_STR,
    "addition_embed_type": OPT_STR,
    # transformers' CLIPTextConfig
    "vocab_size": POS_INT,
    "hidden_size": POS_INT,
    "intermediate_size": POS_INT,
    "max_position_embeddings": POS_INT,
    "num_hidden_layers": NONNEG_INT,
    "projection_dim": OPT_POS_INT,
    "pad_token_id": OPT_INT,
    "bos_token_id": OPT_INT,
    "eos_token_id": (
        _optional(lambda v: _is_int(v) or _is_seq(v, _is_int)),
        "an int, a list of ints or None",
    ),
}


def check_config_values(
    cls_name: str,
    values: Mapping[str, Any],
    rules: Mapping[str, tuple[Callable[[Any], bool], str]] = MODEL_CONFIG_RULES,
) -> None:
    """Raises for the first config value that breaks its rule (fields without one pass).

    Raises:
        ValueError: ``"UNet2DModel config: in_channels must be a positive int, got '3'"``.
    """
    for name, value in values.items():
        rule = rules.get(name)
        if rule is not None and not rule[0](value):
            raise ValueError(f"{cls_name} config: {name} must be {rule[1]}, got {value!r}")


class ModelConfigMixin(_ConfigBase):
    """Config handling for Flax Linen modules: the dataclass fields are the config.

    ``dtype``, ``param_dtype``, ``parent`` and ``name`` are how a module runs, not what it is,
    and are not part of the config.
    """

    _non_config_fields = ("dtype", "param_dtype", "parent", "name", "attention_chunk_size")
    # Narrower rules than MODEL_CONFIG_RULES for this model's fields (e.g. no per-block lists).
    _config_rules: dict[str, tuple[Callable[[Any], bool], str]] = {}

    def __post_init__(self):
        """Checks the config values (see :func:`check_config_values`), then the model's own
        cross-field checks (:meth:`_validate_config`), whenever the module is built."""
        names, _, _ = _accepted_keys(type(self))
        check_config_values(
            type(self).__name__,
            {k: getattr(self, k) for k in names},
            {**MODEL_CONFIG_RULES, **type(self)._config_rules},
        )
        self._validate_config()
        super().__post_init__()

    def _validate_config(self) -> None:
        """Checks between config fields; runs after the per-field checks."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any = None, **kwargs):
        """Builds the module (no weights) from a config; ``dtype=`` etc. pass through."""
        config = cls._config_dict(config if config is not None else {})
        runtime = {k: kwargs.pop(k) for k in list(kwargs) if k in cls._non_config_fields}
        init_kwargs, unknown = split_config(cls, config, **kwargs)
        names, _, _ = _accepted_keys(cls)
        init_kwargs = {
            k: tuple(v) if isinstance(v, list) else v for k, v in init_kwargs.items() if k in names
        }
        module = cls(**init_kwargs, **runtime)
        object.__setattr__(module, "_extra_config", unknown)
        return module

    @property
    def config(self) -> FrozenConfig:
        names, _, _ = _accepted_keys(type(self))
        values = {k: getattr(self, k) for k in names}
        return _make_frozen(type(self), values, getattr(self, "_extra_config", {}))
