"""Decouplers: one-step teacher features -> foreseen semantic (DINOv2) and geometric (DA3) tokens.

Exports load lazily, so that reading a config (`svam.config` imports the configuration modules)
does not import torch.
"""

import importlib

_CONFIGURATION = "svam.distill.configuration_decoupler"
_MODELING = "svam.distill.modeling_decoupler"
_EXPORTS = {
    "BRANCHES": _CONFIGURATION,
    "DecouplerConfig": _CONFIGURATION,
    "DecouplersConfig": _CONFIGURATION,
    "full_scale_decouplers": _CONFIGURATION,
    "published_decouplers": _CONFIGURATION,
    "Decoupler": _MODELING,
    "DecouplerLoadError": _MODELING,
    "build_decouplers": _MODELING,
    "decoupler_flops": _MODELING,
    "decoupler_parameters": _MODELING,
    "example_inputs": _MODELING,
    "read_decoupler_config": _MODELING,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
