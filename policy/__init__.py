"""Policy models: the Uni-Perceiver aggregator, the diffusion action head, normalisation and the
ShortcutPolicy.

Exports load lazily, so that reading a config (`svam.config` imports the configuration modules)
does not import torch.
"""

import importlib

_EXPORTS = {
    "STREAMS": "policy.configuration_policy",
    "ActionHeadConfig": "policy.configuration_policy",
    "AggregatorConfig": "policy.configuration_policy",
    "NormalizationConfig": "policy.configuration_policy",
    "PolicyModelsConfig": "policy.configuration_policy",
    "StreamConfig": "policy.configuration_policy",
    "foresight_streams": "policy.configuration_policy",
    "published_policy_models": "policy.configuration_policy",
    "ActionCondition": "policy.modeling_action_head",
    "ActionHeadFlops": "policy.modeling_action_head",
    "DiffusionActionHead": "policy.modeling_action_head",
    "EncodedCondition": "policy.modeling_action_head",
    "action_head_flops": "policy.modeling_action_head",
    "action_head_parameters": "policy.modeling_action_head",
    "build_action_head": "policy.modeling_action_head",
    "example_condition": "policy.modeling_action_head",
    "UniPerceiver": "policy.modeling_aggregator",
    "aggregator_flops": "policy.modeling_aggregator",
    "aggregator_parameters": "policy.modeling_aggregator",
    "build_aggregator": "policy.modeling_aggregator",
    "example_streams": "policy.modeling_aggregator",
    "Normalizer": "policy.normalization",
    "NormalizerConfig": "policy.normalization",
    "PolicyLoadError": "policy.modeling_policy",
    "ShortcutPolicy": "policy.modeling_policy",
    "ShortcutPolicyConfig": "policy.modeling_policy",
    "PolicyTrainConfig": "policy.configuration_train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'policy' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
