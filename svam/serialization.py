"""Model directories (decouplers, the policy's aggregator, head, normalisers and the policy):
`config.json` (a config dataclass, tagged with the class name and a format version) and
`model.safetensors`. Every load error is one ModelLoadError line naming the file and the key."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

Config = TypeVar("Config")


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message names the file and key."""


def save_model(path: str | os.PathLike, class_name: str, config: Any, module: nn.Module) -> Path:
    """Write `config.json` (the config dataclass) and `model.safetensors` (the state dict)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    record = {"_class_name": class_name, "_format_version": FORMAT_VERSION}
    record.update(dataclasses.asdict(config))
    (root / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, root / WEIGHTS_NAME, metadata={"format": "pt"})
    return root


def read_config(
    path: str | os.PathLike,
    class_name: str,
    config_class: type[Config],
    added_keys: Mapping[str, Any] | None = None,
) -> Config:
    """The config dataclass of a saved model directory, checked with its `validate()`.

    `added_keys`: top-level keys added to the config after files were written without them, each
    with the (JSON) value such a file was made with."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ModelLoadError(
            f"{file}: missing (a {class_name} directory holds {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or record.pop("_class_name", None) != class_name:
        raise ModelLoadError(f"{file}: not a {class_name} config (no _class_name '{class_name}')")
    version = record.pop("_format_version", None)
    if version != FORMAT_VERSION:
        raise ModelLoadError(f"{file}: _format_version={version}, this svam reads {FORMAT_VERSION}")
    config = _from_record(config_class, {**(added_keys or {}), **record}, file, "")
    try:
        config.validate()
    except ValueError as exc:
        raise ModelLoadError(f"{file}: {exc}") from exc
    return config


def _from_record(cls: type, record: Any, file: Path, where: str) -> Any:
    """Build dataclass `cls` from a JSON record, recursing into dataclass and list-of-dataclass
    fields; a missing or unknown key is named with its path (e.g. 'streams[1].dim')."""
    if not isinstance(record, dict):
        raise ModelLoadError(f"{file}: '{where or '.'}' is not an object")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in record:
        if key not in names:
            raise ModelLoadError(f"{file}: unknown key '{where}{key}'")
    values = {}
    for name in names:
        if name not in record:
            raise ModelLoadError(f"{file}: missing key '{where}{name}'")
        value, hint = record[name], hints[name]
        if dataclasses.is_dataclass(hint):
            value = _from_record(hint, value, file, f"{where}{name}.")
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, list):
                raise ModelLoadError(f"{file}: '{where}{name}' is not a list")
            item = typing.get_args(hint)[0]
            value = [
                _from_record(item, v, file, f"{where}{name}[{i}].") for i, v in enumerate(value)
            ]
        values[name] = value
    return cls(**values)


def load_weights(path: str | os.PathLike, module: nn.Module) -> None:
    """Load `model.safetensors` into `module`, refusing missing, unexpected or reshaped tensors."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelLoadError(
            f"{weights}: missing (a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{weights}: not a readable safetensors file ({exc})") from exc
    wanted = module.state_dict()
    missing = sorted(wanted.keys() - state.keys())
    unexpected = sorted(state.keys() - wanted.keys())
    if missing:
        raise ModelLoadError(f"{weights}: no tensor '{missing[0]}', which {CONFIG_NAME} implies")
    if unexpected:
        raise ModelLoadError(
            f"{weights}: tensor '{unexpected[0]}' is not in a model of {CONFIG_NAME}"
        )
    for key, tensor in state.items():
        if tensor.shape != wanted[key].shape:
            raise ModelLoadError(
                f"{weights}: '{key}' has shape {tuple(tensor.shape)}, {CONFIG_NAME} implies "
                f"{tuple(wanted[key].shape)}"
            )
    module.load_state_dict(state)


def check_expected(path: str | os.PathLike, config: Any, expect: Mapping[str, Any] | None) -> None:
    """Refuse a config whose keys differ from `expect` (e.g. dims a policy was built for)."""
    for key, value in (expect or {}).items():
        if getattr(config, key) != value:
            raise ModelLoadError(
                f"{Path(path) / CONFIG_NAME}: {key}={getattr(config, key)!r}, expected {value!r}"
            )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
