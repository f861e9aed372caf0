"""Policy models: the Uni-Perceiver aggregator, the diffusion action head and normalisation."""

from policy.configuration_policy import (
    STREAMS,
    ActionHeadConfig,
    AggregatorConfig,
    NormalizationConfig,
    PolicyModelsConfig,
    StreamConfig,
    foresight_streams,
    published_policy_models,
)
from policy.modeling_action_head import (
    ActionCondition,
    ActionHeadFlops,
    DiffusionActionHead,
    EncodedCondition,
    action_head_flops,
    action_head_parameters,
    build_action_head,
    example_condition,
)
from policy.modeling_aggregator import (
    UniPerceiver,
    aggregator_flops,
    aggregator_parameters,
    build_aggregator,
    example_streams,
)
from policy.normalization import Normalizer, NormalizerConfig
from policy.serialization import PolicyLoadError

__all__ = [
    "STREAMS",
    "ActionCondition",
    "ActionHeadConfig",
    "ActionHeadFlops",
    "AggregatorConfig",
    "DiffusionActionHead",
    "EncodedCondition",
    "NormalizationConfig",
    "Normalizer",
    "NormalizerConfig",
    "PolicyLoadError",
    "PolicyModelsConfig",
    "StreamConfig",
    "UniPerceiver",
    "action_head_flops",
    "action_head_parameters",
    "aggregator_flops",
    "aggregator_parameters",
    "build_action_head",
    "build_aggregator",
    "example_condition",
    "example_streams",
    "foresight_streams",
    "published_policy_models",
]
