"""Decouplers: one-step teacher features -> foreseen semantic (DINOv2) and geometric (DA3) tokens."""

from distill.configuration_decoupler import (
    BRANCHES,
    DecouplerConfig,
    DecouplersConfig,
    full_scale_decouplers,
    published_decouplers,
)
from distill.modeling_decoupler import (
    Decoupler,
    DecouplerLoadError,
    build_decouplers,
    decoupler_flops,
    decoupler_parameters,
    example_inputs,
    flop_counter,
    read_decoupler_config,
)

__all__ = [
    "BRANCHES",
    "Decoupler",
    "DecouplerConfig",
    "DecouplerLoadError",
    "DecouplersConfig",
    "build_decouplers",
    "decoupler_flops",
    "decoupler_parameters",
    "example_inputs",
    "flop_counter",
    "full_scale_decouplers",
    "published_decouplers",
    "read_decoupler_config",
]
