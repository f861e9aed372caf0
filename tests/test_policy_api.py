"""lerobot's acting API on `ShortcutPolicy`: `predict_action_chunk`, `select_action` with its queue
of a chunk's first `execute_actions` actions, `reset` and `keep_rows`, on the micro policies of
tests/test_policy.py."""

from __future__ import annotations

import pytest
import test_policy
import torch
from test_policy import frames_state

from svam.policy.modeling_policy import GENERATOR, OBS_IMAGE, OBS_STATE, TASK, ShortcutPolicy

world, trained = test_policy.world, test_policy.trained

KINDS = ("shortcut", "onestep", "multistep", "blind")
HORIZON = 4  # the micro policies' chunk length
INSTRUCTIONS = ["do reach-v3", "do button-press-topdown-v3", "do reach-v3"]


def observation(frames: torch.Tensor, state: torch.Tensor, seeds=(3, 4, 5)) -> dict:
    batch = len(frames)
    return {
        OBS_IMAGE: frames,
        OBS_STATE: state,
        TASK: INSTRUCTIONS[:batch],
        GENERATOR: [torch.Generator().manual_seed(seed) for seed in seeds[:batch]],
    }


def counting_chunks(policy: ShortcutPolicy) -> list[torch.Tensor]:
    """The chunks the policy's `predict_action_chunk` gives from now on, in order."""
    chunks = []
    predict = policy.predict_action_chunk

    def counted(observation):
        chunks.append(predict(observation))
        return chunks[-1]

    policy.predict_action_chunk = counted
    return chunks


@pytest.mark.parametrize("kind", KINDS)
def test_predict_action_chunk_is_predict_of_the_observation(trained, kind):
    policy = ShortcutPolicy.from_pretrained(trained[kind])
    frames, state = frames_state(3)
    chunk = policy.predict_action_chunk(observation(frames, state))
    rows = observation(frames, state)[GENERATOR]
    assert chunk.shape == (3, HORIZON, 4)
    assert torch.equal(chunk, policy.predict(frames, INSTRUCTIONS, state, generator=rows))
    # one row's chunk is the one it gets alone (per-row generators)
    alone = observation(frames[1:2], state[1:2], seeds=(4,))
    alone[TASK] = INSTRUCTIONS[1]  # one string for the batch
    torch.testing.assert_close(policy.predict_action_chunk(alone), chunk[1:2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_select_action_replays_each_chunk_then_predicts_the_next(trained, kind):
    policy = ShortcutPolicy.from_pretrained(trained[kind])
    chunks = counting_chunks(policy)
    frames, state = frames_state(2)
    # (execute_actions, actions of each chunk given): None and more than the chunk: all of it
    for execute, per_chunk in ((None, HORIZON), (3, 3), (1, 1), (10, HORIZON)):
        policy.execute_actions = execute
        policy.reset()
        chunks.clear()
        seen = observation(frames, state)  # its generators go on: each chunk draws new noise
        for step in range(2 * per_chunk + 1):
            assert policy.needs_observation == (step % per_chunk == 0)
            action = policy.select_action(seen)
            assert len(chunks) == step // per_chunk + 1, (execute, step)
            assert torch.equal(action, chunks[-1][:, step % per_chunk]), (execute, step)
        assert not torch.equal(chunks[0], chunks[1])


@pytest.mark.parametrize("kind", KINDS)
def test_reset_empties_the_queue(trained, kind):
    policy = ShortcutPolicy.from_pretrained(trained[kind])
    chunks = counting_chunks(policy)
    frames, state = frames_state(2)
    assert policy.needs_observation
    first = policy.select_action(observation(frames, state))
    assert not policy.needs_observation and len(chunks) == 1
    policy.reset()
    assert policy.needs_observation
    again = policy.select_action(observation(frames, state))
    assert len(chunks) == 2 and torch.equal(first, again)  # the same noise: the same chunk


def test_keep_rows_narrows_the_queue_and_mismatches_are_refused(trained):
    policy = ShortcutPolicy.from_pretrained(trained["onestep"])
    chunks = counting_chunks(policy)
    frames, state = frames_state(3)
    policy.execute_actions = 3
    policy.select_action(observation(frames, state))
    policy.keep_rows([2, 0])  # row 1's episode ended; the others go on, in this order
    assert torch.equal(policy.select_action(None), chunks[0][[2, 0], 1])
    with pytest.raises(ValueError, match="an observation of 3 rows, but the action queue holds 2"):
        policy.select_action(observation(frames, state))
    # an observation of the rows that go on is accepted, and not read while the queue holds some
    narrowed = observation(frames[[2, 0]], state[[2, 0]])
    assert torch.equal(policy.select_action(narrowed), chunks[0][[2, 0], 2])
    with pytest.raises(ValueError, match="the action queue is empty: select_action needs an"):
        policy.select_action(None)
    policy.execute_actions = 0
    with pytest.raises(ValueError, match="execute_actions=0 must be at least 1"):
        policy.select_action(observation(frames, state))
    assert len(chunks) == 1
