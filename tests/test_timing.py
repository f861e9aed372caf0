"""Real-time closed loop: wait, sync and async schedules, delays from latency, the profile."""

import json
import shutil

import pytest
import torch

from svam.config import load_config
from svam.eval.evaluate import EvalError, evaluate, is_evaluated, settings_of
from svam.eval.metaworld import Episode, run_batch
from svam.eval.timing import CONTROL_PERIOD_S, TimedControl, delay_steps, latency_profile
from svam.policy.modeling_policy import ShortcutPolicy


class CountingPolicy:
    """Chunk number c (0, 1, ...) holds actions 100 * (c + 1) + i at index i, one row per batch
    row; it records the step of every request (the observation's time)."""

    def __init__(self, horizon: int, rows: int = 2):
        self.horizon, self.rows, self.requests = horizon, rows, []
        self.clock = None

    def predict_action_chunk(self, observation):
        self.requests.append(self.clock())
        c = len(self.requests)
        chunk = 100 * c + torch.arange(self.horizon, dtype=torch.float32)
        return chunk[None, :, None].expand(self.rows, self.horizon, 1).clone()


def run(timing, delay, horizon=8, execute=4, steps=24):
    policy = CountingPolicy(horizon)
    control = TimedControl(policy, timing, delay, execute)
    policy.clock = lambda: control.step
    actions, observed = [], []
    for step in range(steps):
        needs = control.needs_observation
        observed.append(needs)
        action = control.select_action({"step": step} if needs else None)
        actions.append(action[0, 0].item())
    assert observed == [s in policy.requests for s in range(steps)]  # read exactly when used
    return actions, policy.requests, control


def test_wait_executes_each_chunk_from_its_start():
    actions, requests, control = run("wait", delay=5)  # wait ignores the delay
    assert requests == [0, 4, 8, 12, 16, 20]
    assert actions[:8] == [100, 101, 102, 103, 200, 201, 202, 203]
    assert control.skipped == control.held == 0


def test_async_with_an_infinitely_fast_policy_is_wait():
    assert run("async", delay=0)[:2] == run("wait", delay=0)[:2]
    assert run("sync", delay=0)[:2] == run("wait", delay=0)[:2]


def test_sync_holds_the_last_command_while_the_policy_thinks():
    actions, requests, control = run("sync", delay=3)
    # request at 0, arrives at 3: hold (nothing yet: zeros) 3 steps, execute 4, observe again
    assert actions[:14] == [0, 0, 0, 100, 101, 102, 103, 103, 103, 103, 200, 201, 202, 203]
    assert requests[:3] == [0, 7, 14] and control.skipped == 0


def test_async_overlaps_inference_with_execution_and_skips_stale_actions():
    actions, requests, control = run("async", delay=3)
    # chunk 1 asked at 0 arrives at 3: its actions 0-2 are stale; chunk 2 is asked at 4 (the
    # observation then) to arrive at 7, as chunk 1 has executed 4 actions; and so on
    assert requests[:4] == [0, 4, 8, 12]
    assert actions[:15] == [0, 0, 0, 103, 104, 105, 106, 203, 204, 205, 206, 303, 304, 305, 306]
    assert control.skipped == 3 * len([r for r in requests if r + 3 < 24])


def test_a_policy_slower_than_a_chunk_still_acts_and_never_replays():
    actions, requests, control = run("async", delay=6, steps=30)
    # slower than 4 executed actions: each chunk is asked as the previous arrives
    assert requests == [0, 6, 12, 18, 24]
    assert actions[6:18] == [106, 107, 107, 107, 107, 107, 206, 207, 207, 207, 207, 207]
    executed = [a for a in actions if a % 100 >= 6]
    fresh = [a for i, a in enumerate(actions) if a != (actions[i - 1] if i else None)]
    assert sorted(set(executed)) == sorted(fresh[1:])  # every action used once, then held
    assert all(a % 100 >= 6 for a in fresh[1:])  # the stale ones (index < 6) never run


def test_a_policy_slower_than_the_whole_chunk_holds_its_last_action():
    actions, _, control = run("async", delay=10, steps=30)
    assert set(actions) == {0.0}  # every action of every chunk is stale on arrival
    assert control.skipped == 8 * 2  # two chunks arrived (at 10 and 20), 8 stale actions each


@pytest.mark.parametrize("ms, steps", [(0, 0), (12.5, 1), (12.6, 2), (25, 2), (90, 8), (129, 11)])
def test_delay_is_latency_over_the_control_period_rounded_up(ms, steps):
    assert CONTROL_PERIOD_S == 0.0125
    assert delay_steps(ms) == steps
    actions, requests, control = run("async", delay=steps, horizon=16, execute=12, steps=60)
    arrived = len([r for r in requests if r + steps < 60])
    assert control.skipped == steps * arrived


def test_rows_that_end_leave_the_schedule():
    policy = CountingPolicy(8, rows=3)
    control = TimedControl(policy, "async", 2, 4)
    policy.clock = lambda: control.step
    for _ in range(3):
        control.select_action({} if control.needs_observation else None)
    control.keep_rows([0, 2])
    assert control.select_action(None).shape == (2, 1)


def test_profile_from_config_overrides_the_measured_one_and_names_a_missing_mode():
    measured = {"onestep": 80.0, "shortcut": 120.0}
    assert latency_profile(["onestep"], measured)["onestep"] == {
        "ms": 80.0,
        "source": "measured here",
    }
    given = latency_profile(["onestep", "shortcut"], measured, {"onestep": 20, "shortcut": 30})
    assert given["shortcut"] == {"ms": 30.0, "source": "eval.latency_ms"}
    with pytest.raises(ValueError, match=r"eval.latency_ms\) has no entry for mode 'shortcut'"):
        latency_profile(["onestep", "shortcut"], measured, {"onestep": 20})
    published = {"onestep": 2e12, "shortcut": 3e12}
    at = latency_profile(["shortcut"], measured, None, 100.0, published)
    assert at["shortcut"]["ms"] == pytest.approx(30.0)
    with pytest.raises(ValueError, match="no entry for mode 'blind'"):
        latency_profile(["blind"], measured, None, 100.0, published)


def test_bad_timing_is_refused():
    with pytest.raises(ValueError, match="eval.timing='later': one of wait, sync, async"):
        TimedControl(CountingPolicy(4), "later", 0, 4)


# ------------------------------------------------------------------ in closed loop, on a policy


def micro_config(run, *overrides):
    return load_config("micro", [f"run.root={run.parent}", f"run.name={run.name}", *overrides])


def test_async_rollouts_of_an_infinitely_fast_policy_reproduce_wait_exactly(micro_demo):
    run, _ = micro_demo
    policy = ShortcutPolicy.from_pretrained(run / "policy" / "shortcut")
    settings = {**settings_of(micro_config(run)), "max_steps": 12}
    episodes = [
        Episode("shortcut", str(run / "policy" / "shortcut"), task, seed, False)
        for task in settings["tasks"]
        for seed in settings["seeds"]
    ]

    def actions(timing, delay):
        timed = {**settings, "timing": timing, "delays": {"shortcut": delay}}
        outcomes = run_batch(policy, episodes, timed, run_seed=0)
        by_episode = {(o.episode.task, o.episode.seed): o for o in outcomes}
        return {key: (o.success, o.steps, o.actions.tolist()) for key, o in by_episode.items()}

    wait = actions("wait", 0)
    assert actions("async", 0) == wait
    slow = actions("async", 3)
    assert slow.keys() == wait.keys()
    for key, (_, _, executed) in slow.items():
        assert executed[:3] == [[0.0] * 4] * 3  # no command while the first chunk is computed
        assert executed != wait[key][2]


def test_eval_under_async_timing_reports_each_modes_delay(micro_demo, tmp_path):
    run, _ = micro_demo
    out = tmp_path / "eval"
    shutil.copytree(run / "eval", out)  # reuse its fidelity, FLOPs and latency records
    config = micro_config(run, f"eval.output_dir={out}", "eval.timing=async")
    modes = config.eval.modes
    config.eval.latency_ms = {mode: 20.0 * (i + 1) for i, mode in enumerate(modes)}
    evaluate(config)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["timing"] == "async"
    for i, mode in enumerate(modes):
        timing = report["modes"][mode]["timing"]
        assert timing == {
            "timing": "async",
            "ms": 20.0 * (i + 1),
            "source": "eval.latency_ms",
            "delay_steps": delay_steps(20.0 * (i + 1)),
        }
    text = (out / "report.md").read_text()
    assert "Success is under `async` timing" in text
    assert "Action head: ddpm head, 3 DDIM steps (DDPM-trained)." in text  # the report names it
    assert report["modes"][modes[0]]["action_head"] == {"type": "ddpm", "steps": 3}
    assert is_evaluated(config)
    config.eval.latency_ms = {mode: 1.0 for mode in modes[:-1]}
    with pytest.raises(EvalError, match=f"no entry for mode '{modes[-1]}'"):
        evaluate(config)
