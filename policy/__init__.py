"""Policy models: the Uni-Perceiver aggregator, the diffusion action head, normalisation and the
ShortcutPolicy.

Exports load lazily, so that reading a config (`svam.config` imports the configuration modules)
does not import torch.
"""

import importlib

_EXPORTS = {
    "STREAMS": "svam.policy.configuration_policy",
    "ActionHeadConfig": "svam.policy.configuration_policy",
    "AggregatorConfig": "svam.policy.configuration_policy",
    "NormalizationConfig": "svam.policy.configuration_policy",
    "PolicyModelsConfig": "svam.policy.configuration_policy",
    "StreamConfig": "svam.policy.configuration_policy",
    "foresight_streams": "svam.policy.configuration_policy",
    "published_policy_models": "svam.policy.configuration_policy",
    "ActionCondition": "svam.policy.modeling_action_head",
    "ActionHeadFlops": "svam.policy.modeling_action_head",
    "DiffusionActionHead": "svam.policy.modeling_action_head",
    "EncodedCondition": "svam.policy.modeling_action_head",
    "action_head_flops": "svam.policy.modeling_action_head",
    "action_head_parameters": "svam.policy.modeling_action_head",
    "build_action_head": "svam.policy.modeling_action_head",
    "example_condition": "svam.policy.modeling_action_head",
    "UniPerceiver": "svam.policy.modeling_aggregator",
    "aggregator_flops": "svam.policy.modeling_aggregator",
    "aggregator_parameters": "svam.policy.modeling_aggregator",
    "build_aggregator": "svam.policy.modeling_aggregator",
    "example_streams": "svam.policy.modeling_aggregator",
    "Normalizer": "svam.policy.normalization",
    "NormalizerConfig": "svam.policy.normalization",
    "PolicyLoadError": "svam.policy.modeling_policy",
    "ShortcutPolicy": "svam.policy.modeling_policy",
    "ShortcutPolicyConfig": "svam.policy.modeling_policy",
    "PolicyTrainConfig": "svam.policy.configuration_train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
