"""Simulated environments that svam collects episodes from and evaluates policies in."""

from svam.envs.metaworld import (
    CAMERAS,
    TASK_INSTRUCTIONS,
    ExpertEpisode,
    MetaWorldEnv,
    check_camera,
    check_tasks,
    rollout_expert,
)

__all__ = [
    "CAMERAS",
    "TASK_INSTRUCTIONS",
    "ExpertEpisode",
    "MetaWorldEnv",
    "check_camera",
    "check_tasks",
    "rollout_expert",
]
