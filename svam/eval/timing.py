"""Real-time closed loop: the world does not wait while the policy thinks.

A control step's inference takes `delay` simulator steps (its latency divided by the control period,
rounded up, so outcomes are deterministic for a given latency profile). `eval.timing` says what
the robot does meanwhile:

- `wait`: the world stops while the policy thinks (the classic benchmark protocol): observe, predict,
  execute `execute_actions` actions of the chunk, repeat; `delay` is ignored.
- `sync`: the world keeps moving: after each observation the robot holds its last command (the
  last executed action; nothing before the first chunk) for `delay` steps, then executes
  `execute_actions` actions of the new chunk from its start, then observes again.
- `async`: pipelined, as LingBot-VA (and pi0's real-time chunking) run: the next chunk is requested
  while the current one executes, from the observation at request time, timed to arrive when the
  current one has executed `execute_actions` actions (or at once, if the policy is slower than
  that). A chunk requested at step r arrives at r + delay; its action i is meant for step r + i,
  so its first `delay` actions, whose time has passed, are skipped, never replayed. A chunk that
  runs out before the next arrives leaves the robot holding its last command. With delay 0 the
  schedule is exactly `wait`'s.

Meta-World's control period is 12.5 ms (80 Hz): MuJoCo's 2.5 ms timestep times the environments'
frame_skip of 5 (Yu et al. 2019, Meta-World; `env.dt`). A 90 ms control step is 8 simulator steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TIMINGS = ("wait", "sync", "async")
CONTROL_PERIOD_S = 0.0125
"""Meta-World's simulator step: MuJoCo timestep 0.0025 s x frame_skip 5."""


def delay_steps(latency_ms: float, control_period_s: float = CONTROL_PERIOD_S) -> int:
    """Simulator steps a control step's inference spans: latency / control period, rounded up."""
    if not latency_ms >= 0:
        raise ValueError(f"latency must be a non-negative number of ms, got {latency_ms}")
    return math.ceil(round(latency_ms / 1000 / control_period_s, 9))


class TimedControl:
    """Drives a policy (its `predict_action_chunk`, as `ShortcutPolicy`'s) under a timing, one
    simulator step per `select_action`, for a lockstep batch (every row shares the schedule, so
    the policy still makes one batched call). `observation` is read only when
    `needs_observation`. Counts the actions skipped as stale and the steps spent holding."""

    def __init__(self, policy: Any, timing: str, delay: int, execute_actions: int):
        if timing not in TIMINGS:
            raise ValueError(f"eval.timing='{timing}': one of {', '.join(TIMINGS)}")
        if delay < 0 or execute_actions < 1:
            raise ValueError(
                f"need delay >= 0 and execute_actions >= 1, got {delay}, {execute_actions}"
            )
        self.policy, self.timing, self.execute_actions = policy, timing, execute_actions
        self.delay = 0 if timing == "wait" else delay
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.next_request: int | None = 0
        self.pending: tuple[torch.Tensor, int] | None = None  # (chunk, arrival step)
        self.chunk: torch.Tensor | None = None  # the chunk being executed, and its next action
        self.index = self.stop = 0
        self.last: torch.Tensor | None = None  # the last executed action per row
        self.skipped = self.held = 0

    def _after_arrival(self, horizon: int) -> int:
        """When the next chunk is requested, for a chunk arriving now."""
        executed = min(self.execute_actions, horizon)
        if self.timing == "async":  # timed to arrive as this one has executed `executed`
            return self.step + max(0, executed - self.delay)
        return self.step + executed  # observe again once they are executed

    @property
    def needs_observation(self) -> bool:
        """Whether this step requests a chunk (so reads its observation)."""
        if self.next_request == self.step:
            return True
        arriving = self.pending is not None and self.pending[1] == self.step
        return arriving and self._after_arrival(self.pending[0].shape[1]) == self.step

    def select_action(self, observation: Mapping[str, Any] | None) -> torch.Tensor:
        """The rows' action (B, A) for this simulator step."""
        self._arrive_if_due()
        if self.next_request == self.step:
            if observation is None:
                raise ValueError("this step requests a chunk: select_action needs an observation")
            chunk = self.policy.predict_action_chunk(observation)
            self.pending, self.next_request = (chunk, self.step + self.delay), None
            self._arrive_if_due()
        if self.chunk is not None and self.index < self.stop:
            action = self.chunk[:, self.index]
            self.index += 1
        else:  # hold the last command (nothing before the first chunk)
            self.held += 1
            action = self.last if self.last is not None else self._zeros()
        self.last = action
        self.step += 1
        return action

    def _arrive_if_due(self) -> None:
        if self.pending is None or self.pending[1] != self.step:
            return
        chunk, horizon = self.pending[0], self.pending[0].shape[1]
        self.pending, self.chunk = None, chunk
        if self.timing == "async":  # actions meant for steps already past are dropped
            self.index, self.stop = min(self.delay, horizon), horizon
            self.skipped += self.index
        else:
            self.index, self.stop = 0, min(self.execute_actions, horizon)
        self.next_request = self._after_arrival(horizon)

    def _zeros(self) -> torch.Tensor:
        """No command, (B, A): before the first chunk arrives."""
        like = (self.pending[0] if self.pending is not None else self.chunk)[:, 0]
        return like.new_zeros(like.shape)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep these rows only, in this order (the others' episodes ended)."""
        rows = list(rows)
        if self.pending is not None:
            self.pending = (self.pending[0][rows], self.pending[1])
        if self.chunk is not None:
            self.chunk = self.chunk[rows]
        if self.last is not None:
            self.last = self.last[rows]


def latency_profile(
    modes: Sequence[str],
    measured_ms: Mapping[str, float] | None,
    config_ms: Mapping[str, float] | None = None,
    device_tflops: float | None = None,
    published_flops: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each mode's control-step latency, {mode: {"ms", "source"}}: `eval.latency_ms` when given
    (what a user's GPU measures), else the published-size FLOPs over `eval.device_tflops` when
    given, else the latency measured in this run. A mode the chosen source lacks is refused in one
    line naming it."""
    if config_ms is not None:
        source, values = "eval.latency_ms", dict(config_ms)
    elif device_tflops is not None:
        source = f"published-size FLOPs at {device_tflops:g} TFLOP/s"
        values = {
            mode: flops / (device_tflops * 1e12) * 1000
            for mode, flops in (published_flops or {}).items()
            if flops is not None
        }
    else:
        source, values = "measured here", dict(measured_ms or {})
    missing = [mode for mode in modes if mode not in values]
    if missing:
        listed = ", ".join(sorted(values)) or "none"
        raise ValueError(
            f"latency profile ({source}) has no entry for mode '{missing[0]}' (it has {listed})"
        )
    return {mode: {"ms": float(values[mode]), "source": source} for mode in modes}
