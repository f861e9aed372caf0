"""Closed-loop episodes in lockstep batches (`svam.eval.metaworld`): an episode's outcome does not
depend on the batch it runs in, on the worker that runs it, nor on whether its environment is new or
one of an earlier episode reseeded; one generator per batch row."""

from __future__ import annotations

import numpy as np
import pytest
import test_policy
import torch
from test_policy import SIZE, frames_state

from svam.envs.metaworld import MetaWorldEnv
from svam.eval.configuration_eval import EvalConfig
from svam.eval.metaworld import EnvPool, Episode, batches, rollouts, run_batch
from svam.policy.modeling_policy import ShortcutPolicy
from svam.seeding import keyed_generator

# The micro policies of tests/test_policy.py (and the teacher, encoders and decouplers they read).
world, trained = test_policy.world, test_policy.trained

TASKS = ("reach-v3", "button-press-topdown-v3")
SEEDS = (6, 7)
OPTIONS = dict(teacher=None, decouplers=None, device="cpu", threads=1, run_seed=0)


def settings(max_steps: int) -> dict:
    return {
        "tasks": list(TASKS),
        "seeds": list(SEEDS),
        "max_steps": max_steps,
        "execute_actions": 3,
        "camera": "corner",
        "image_size": SIZE,
    }


def episodes_of(policies: dict, modes: dict[str, str]) -> list[Episode]:
    """Every (task, seed) for each mode (its policy kind); the first seed of a task recorded."""
    return [
        Episode(mode, str(policies[kind]), task, seed, record=seed == SEEDS[0])
        for mode, kind in modes.items()
        for task in TASKS
        for seed in SEEDS
    ]


def run(episodes: list[Episode], settings: dict, workers: int, batch_size: int) -> dict:
    outcomes = rollouts(episodes, settings, workers, batch_size=batch_size, **OPTIONS)
    return {(o.episode.mode, o.episode.task, o.episode.seed): o for o in outcomes}


def assert_same_outcomes(expected: dict, got: dict) -> None:
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        have = got[key]
        assert (have.success, have.steps) == (want.success, want.steps), key
        assert have.actions.shape == (want.steps, 4), key
        np.testing.assert_allclose(have.actions, want.actions, rtol=0, atol=1e-4, err_msg=str(key))
        assert (have.frames is None) == (want.frames is None), key
        if want.frames is not None:
            assert len(have.frames) == len(want.frames), key
            np.testing.assert_array_equal(have.frames[0], want.frames[0])


def test_envs_in_lockstep_render_what_they_render_alone():
    """Renderers share one GL context per thread: each must draw into its own framebuffer."""
    action = np.array([0.5, 0.2, -0.3, 0.1])

    def lockstep(envs):
        frames = [[] for _ in envs]
        for env in envs:
            env.reset()
        for _ in range(3):
            for env, own in zip(envs, frames, strict=True):
                own.append(env.render()[0])
                env.step(action)
        for env in envs:
            env.close()
        return frames

    pairs = list(zip(TASKS, SEEDS, strict=True))
    alone = [lockstep([MetaWorldEnv(task, seed, "corner", SIZE)])[0] for task, seed in pairs]
    together = lockstep([MetaWorldEnv(task, seed, "corner", SIZE) for task, seed in pairs])
    for want, got in zip(alone, together, strict=True):
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)


def test_generator_per_row_gives_each_row_its_own_chunk(trained):
    frames, state = frames_state(3)
    instructions = ["do reach-v3", "do button-press-topdown-v3", "do reach-v3"]
    for mode, kind in (("shortcut", "shortcut"), ("partial:0.5", "multistep")):
        policy = ShortcutPolicy.from_pretrained(trained[kind], mode=mode)

        def generators():
            return [torch.Generator().manual_seed(seed) for seed in (3, 4, 5)]

        batched = policy.predict(frames, instructions, state, generator=generators())
        for row, generator in enumerate(generators()):
            alone = policy.predict(
                frames[row : row + 1], instructions[row], state[row : row + 1], generator=generator
            )
            torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-5)
        # a one-generator list is the single generator
        single = policy.predict(frames[:1], instructions[0], state[:1], generator=generators()[0])
        listed = policy.predict(frames[:1], instructions[0], state[:1], generator=generators()[:1])
        assert torch.equal(single, listed)
    with pytest.raises(ValueError, match="2 generators for a batch of 3: pass one per row"):
        policy.predict(frames, instructions, state, generator=generators()[:2])
    with pytest.raises(ValueError, match="4 generators for a batch of 3"):
        policy.net.head.sample(
            policy.net.condition(
                policy.streams(frames, instructions), policy.text(instructions), state
            ),
            generator=[*generators(), torch.Generator()],
        )


def succeed_at_different_steps(monkeypatch) -> None:
    """Fake Meta-World's success per task and seed: after 2, 4 and 7 steps, or never."""
    succeed_after = {("reach-v3", 6): 2, ("reach-v3", 7): 4, ("button-press-topdown-v3", 7): 7}
    step = MetaWorldEnv.step

    def faked(env, action):
        obs, reward, done = step(env, action)
        taken = env.sim.curr_path_length  # steps since the reset (environments are reused)
        return obs, reward, done or taken == succeed_after.get((env.task, env.seed))

    monkeypatch.setattr(MetaWorldEnv, "step", faked)


def test_finished_episodes_leave_the_batch_and_outcomes_do_not_change(trained, monkeypatch):
    """Episodes that succeed at different steps (Meta-World's success faked per task and seed):
    lockstep batches of 3 give the outcomes and actions of one episode at a time."""
    succeed_at_different_steps(monkeypatch)
    episodes = episodes_of(trained, {"shortcut": "shortcut", "multistep:2": "multistep"})
    one_at_a_time = run(episodes, settings(max_steps=9), workers=1, batch_size=1)
    steps = {key[1:]: (o.success, o.steps) for key, o in one_at_a_time.items()}
    assert steps == {
        ("reach-v3", 6): (True, 2),
        ("reach-v3", 7): (True, 4),
        ("button-press-topdown-v3", 6): (False, 9),
        ("button-press-topdown-v3", 7): (True, 7),
    }
    assert_same_outcomes(one_at_a_time, run(episodes, settings(9), workers=1, batch_size=3))


def chunkwise_outcomes(policy, episodes: list[Episode], settings: dict, run_seed: int) -> dict:
    """(success, steps, actions, frames) of each episode by the loop `run_batch` ran before it
    used `select_action`: each control step, one batched `predict` for the live episodes, then
    each steps through the first `execute_actions` actions of its chunk."""
    running = []
    for episode in episodes:
        env = MetaWorldEnv(episode.task, episode.seed, settings["camera"], settings["image_size"])
        generator = keyed_generator(run_seed, "eval", episode.task, episode.seed)
        running.append(dict(episode=episode, env=env, obs=env.reset(), generator=generator))
        running[-1].update(success=False, actions=[], frames=[])
    outcomes = {}
    while running:
        for row in running:
            row["frames"].append(row["env"].render()[0])
        chunks = policy.predict(
            torch.from_numpy(np.stack([row["frames"][-1] for row in running])).permute(0, 3, 1, 2),
            [row["env"].instruction for row in running],
            torch.from_numpy(np.stack([row["env"].proprio(row["obs"]) for row in running])),
            generator=[row["generator"] for row in running],
        )
        still = []
        executed = chunks[:, : settings["execute_actions"]].numpy()
        for row, chunk in zip(running, executed, strict=True):
            over = False
            for action in chunk:
                row["obs"], _, done = row["env"].step(action)
                row["actions"].append(action)
                row["success"] = row["success"] or done
                over = row["success"] or len(row["actions"]) >= settings["max_steps"]
                if over:
                    break
            if not over:
                still.append(row)
                continue
            row["frames"].append(row["env"].render()[0])
            row["env"].close()
            steps, actions = len(row["actions"]), np.stack(row["actions"])
            outcomes[row["episode"]] = (row["success"], steps, actions, row["frames"])
        running = still
    return outcomes


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("shortcut", "shortcut"),
        ("onestep", "onestep"),
        ("multistep:2", "multistep"),
        ("blind", "blind"),
    ],
)
def test_rollouts_through_select_action_are_those_of_stepping_through_chunks(
    trained, monkeypatch, mode, kind
):
    """A lockstep batch whose episodes end mid-chunk at different steps, through the policy's
    `select_action` / `keep_rows`: the outcomes, actions and frames, bit for bit, of stepping
    through each chunk, for every number of actions executed."""
    succeed_at_different_steps(monkeypatch)
    policy = ShortcutPolicy.from_pretrained(trained[kind], mode=mode)
    episodes = [Episode(mode, str(trained[kind]), t, s, record=True) for t in TASKS for s in SEEDS]
    for execute in (3, 4, 10):  # 10: more than the chunk of 4, which is executed whole
        config = {**settings(max_steps=9), "execute_actions": execute}
        with torch.no_grad():
            expected = chunkwise_outcomes(policy, episodes, config, run_seed=0)
            got = run_batch(policy, episodes, config, run_seed=0)
        assert [o.steps for o in got] == sorted(o.steps for o in got)  # in finishing order
        assert {o.episode: o.steps for o in got} == {e: want[1] for e, want in expected.items()}
        for outcome in got:
            success, steps, actions, frames = expected[outcome.episode]
            assert (outcome.success, outcome.steps) == (success, steps)
            assert np.array_equal(outcome.actions, actions)
            assert len(outcome.frames) == len(frames)
            for have, want in zip(outcome.frames, frames, strict=True):
                np.testing.assert_array_equal(have, want)


def test_outcomes_do_not_depend_on_batch_size_or_workers(trained):
    episodes = episodes_of(trained, {"shortcut": "shortcut"})
    one_at_a_time = run(episodes, settings(max_steps=6), workers=1, batch_size=1)
    # 4 episodes in batches of 3: two batches, one per worker
    assert_same_outcomes(one_at_a_time, run(episodes, settings(6), workers=2, batch_size=3))


def test_batches_hold_one_mode_in_task_and_seed_order():
    episodes = [
        Episode(mode, "p", task, seed, False)
        for seed in (2, 1, 3)
        for task in ("b", "a")
        for mode in ("y", "x")
    ]
    grouped = [[(e.mode, e.task, e.seed) for e in batch] for batch in batches(episodes, 4)]
    assert grouped == [
        [("x", "a", 1), ("x", "a", 2), ("x", "a", 3), ("x", "b", 1)],
        [("x", "b", 2), ("x", "b", 3)],
        [("y", "a", 1), ("y", "a", 2), ("y", "a", 3), ("y", "b", 1)],
        [("y", "b", 2), ("y", "b", 3)],
    ]
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        next(rollouts(episodes, {}, 1, batch_size=0))
    with pytest.raises(ValueError, match=r"eval.batch_size=0 must be at least 1"):
        EvalConfig(batch_size=0).validate()


def test_reused_environments_give_exactly_the_outcomes_of_new_ones(trained, monkeypatch):
    """A worker keeps the environments of finished episodes and reseeds them for later episodes
    of their task, closing them at the end: outcomes, actions and frames are those of one new
    environment per episode."""
    made, closed = [], []
    init, close = MetaWorldEnv.__init__, MetaWorldEnv.close

    def counted_init(env, *args, **kwargs):
        init(env, *args, **kwargs)
        made.append(env)

    def counted_close(env):
        closed.append(env)
        close(env)

    monkeypatch.setattr(MetaWorldEnv, "__init__", counted_init)
    monkeypatch.setattr(MetaWorldEnv, "close", counted_close)
    modes = {"multistep:2": "multistep"}
    episodes = episodes_of(trained, modes)
    pooled = run(episodes, settings(max_steps=4), workers=1, batch_size=1)
    assert len(made) == len(TASKS)  # 4 episodes one at a time: one environment per task
    assert sorted(map(id, closed)) == sorted(map(id, made))

    made.clear()
    fresh = {}
    with torch.no_grad():
        for mode, kind in modes.items():
            policy = ShortcutPolicy.from_pretrained(trained[kind], mode=mode)
            for episode in (e for e in episodes if e.mode == mode):
                with EnvPool("corner", SIZE, max_envs=0) as envs:  # keeps none: all new
                    (outcome,) = run_batch(policy, [episode], settings(4), 0, envs)
                fresh[(mode, episode.task, episode.seed)] = outcome
    assert len(made) == len(episodes)
    assert fresh.keys() == pooled.keys()
    for key, want in fresh.items():
        have = pooled[key]
        assert (have.success, have.steps) == (want.success, want.steps), key
        np.testing.assert_array_equal(have.actions, want.actions, err_msg=str(key))
        assert (have.frames is None) == (want.frames is None), key
        for a, b in zip(want.frames or [], have.frames or [], strict=True):
            np.testing.assert_array_equal(a, b)
