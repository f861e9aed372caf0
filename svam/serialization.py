"""Model directories (decouplers, the policy's aggregator, head, normalisers and the policy) in
diffusers' layout, written and read by `ModelMixin.save_pretrained` / `from_pretrained`:
`config.json` (the model's config dataclass, its fields flat as in any diffusers config, with
`_class_name` and `_diffusers_version`) and `diffusion_pytorch_model.safetensors`.

`SvamModel` puts a model whose constructor takes a config dataclass on diffusers' mixins. Every
load error is one ModelLoadError line naming the file (and the key, for a config)."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

from svam.hashing import SHORT, file_digest

WEIGHTS_NAME = SAFETENSORS_WEIGHTS_NAME
LEGACY_FORMAT_KEY = "_format_version"
"""The tag of the format svam wrote before its models moved onto diffusers' mixins (config.json
beside `model.safetensors`); such directories are refused with how to rebuild them."""


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message names the file and key."""


class SvamModel(ModelMixin, ConfigMixin):
    """A diffusers model built from one config dataclass (`config_class`).

    The dataclass' fields are registered with `register_to_config`, so `config.json` is a plain
    diffusers config, and `config` is the dataclass itself (its derived properties included) rather
    than diffusers' FrozenDict of the fields, which reads the same by attribute. `from_pretrained`
    adds svam's checks to diffusers' loader; `rebuild` says how to remake a directory that cannot
    be read (e.g. "re-run `svam distill`")."""

    config_class: ClassVar[type]
    rebuild: ClassVar[str]

    def __init__(self, config: Any):
        super().__init__()
        config.validate()
        self.register_to_config(**dataclasses.asdict(config))
        self._config = config

    @property
    def config(self) -> Any:
        return self._config

    def __getattr__(self, name: str) -> Any:
        """Submodules, parameters and buffers only: diffusers' deprecated fallback to config
        fields would shadow a submodule named like one (the action head's `context_layers`)."""
        return nn.Module.__getattr__(self, name)

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """diffusers' `save_pretrained`, returning the directory."""
        super().save_pretrained(path, **kwargs)
        return Path(path)

    @classmethod
    def init_kwargs(cls, config: Any) -> dict[str, Any]:
        """The constructor's arguments for a config dataclass."""
        return {"config": config}

    @classmethod
    def extract_init_dict(cls, config_dict: Mapping[str, Any], **kwargs: Any):
        """diffusers' hook from a config dict to the constructor's arguments: the dataclass."""
        record = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        config = config_from_record(cls.config_class, record, f"{cls.__name__} config")
        return cls.init_kwargs(config), kwargs, {}

    @classmethod
    def read_config(cls, path: str | os.PathLike) -> Any:
        """The config dataclass of a saved directory (checked with its `validate()`), without
        loading weights."""
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise ModelLoadError(
                f"{file}: missing (a {cls.__name__} directory holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME})"
            )
        try:
            record = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{file}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise ModelLoadError(f"{file}: not a {cls.__name__} config (not an object)")
        if LEGACY_FORMAT_KEY in record:
            raise ModelLoadError(
                f"{file}: written by an older svam (model.safetensors, {LEGACY_FORMAT_KEY}="
                f"{record[LEGACY_FORMAT_KEY]}): {cls.rebuild}"
            )
        if record.get("_class_name") != cls.__name__:
            raise ModelLoadError(
                f"{file}: not a {cls.__name__} config (_class_name {record.get('_class_name')!r})"
            )
        record = {k: v for k, v in record.items() if not k.startswith("_")}
        config = config_from_record(cls.config_class, record, str(file))
        try:
            config.validate()
        except ValueError as exc:
            raise ModelLoadError(f"{file}: {exc}") from exc
        return config

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        expect: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Load a saved directory with diffusers' loader (`torch_dtype`, `device_map`, ... pass
        through); `expect` maps config keys to required values (e.g. the dims of a teacher cache).
        A missing or corrupt directory, a config that differs from `expect` and weights that are
        not exactly the model's tensors (checked first, from the file's header, against the
        model built on `meta`) raise ModelLoadError, one line naming the file."""
        path = Path(path)
        config = cls.read_config(path)
        check_expected(path, config, expect)
        weights = path / WEIGHTS_NAME
        with torch.device("meta"):
            expected = cls(**cls.init_kwargs(config)).state_dict()
        _check_weights(weights, {key: tuple(tensor.shape) for key, tensor in expected.items()})
        try:
            return super().from_pretrained(path, local_files_only=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any library failure becomes one readable line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{weights}: {first}") from exc


def _check_weights(weights: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a weights file that is missing or unreadable, or whose tensors are not exactly
    `expected` (name -> shape), reading only its header."""
    if not weights.is_file():
        raise ModelLoadError(
            f"{weights}: missing (a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        with safe_open(weights, framework="pt") as file:
            found = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{weights}: not a readable safetensors file ({exc})") from exc
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing:
        raise ModelLoadError(f"{weights}: no tensor '{missing[0]}', which {CONFIG_NAME} implies")
    if unexpected:
        raise ModelLoadError(
            f"{weights}: tensor '{unexpected[0]}' is not in a model of {CONFIG_NAME}"
        )
    for key, shape in found.items():
        if shape != expected[key]:
            raise ModelLoadError(
                f"{weights}: '{key}' has shape {shape}, {CONFIG_NAME} implies {expected[key]}"
            )


def config_from_record(cls: type, record: Any, source: str, where: str = "") -> Any:
    """Build dataclass `cls` from a JSON record, recursing into dataclass and list-of-dataclass
    fields; a missing or unknown key is named with its path (e.g. 'streams[1].dim')."""
    if not isinstance(record, dict):
        raise ModelLoadError(f"{source}: '{where or '.'}' is not an object")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in record:
        if key not in names:
            raise ModelLoadError(f"{source}: unknown key '{where}{key}'")
    values = {}
    for name in names:
        if name not in record:
            raise ModelLoadError(f"{source}: missing key '{where}{name}'")
        value, hint = record[name], hints[name]
        if dataclasses.is_dataclass(hint):
            value = config_from_record(hint, value, source, f"{where}{name}.")
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, list):
                raise ModelLoadError(f"{source}: '{where}{name}' is not a list")
            item = typing.get_args(hint)[0]
            value = [
                config_from_record(item, v, source, f"{where}{name}[{i}].")
                for i, v in enumerate(value)
            ]
        values[name] = value
    return cls(**values)


def check_expected(path: str | os.PathLike, config: Any, expect: Mapping[str, Any] | None) -> None:
    """Refuse a config whose keys differ from `expect` (e.g. dims a policy was built for)."""
    for key, value in (expect or {}).items():
        if getattr(config, key) != value:
            raise ModelLoadError(
                f"{Path(path) / CONFIG_NAME}: {key}={getattr(config, key)!r}, expected {value!r}"
            )


def weights_fingerprint(path: str | os.PathLike) -> str:
    """Short sha256 of a model directory's weights file: what a policy records of the
    decouplers it was trained with."""
    return file_digest(Path(path) / WEIGHTS_NAME)[:SHORT]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
