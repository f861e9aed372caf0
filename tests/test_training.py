"""The one training loop on a minimal stage: non-finite steps are skipped and counted, a run of
them stops the stage in one line naming the last good checkpoint."""

from __future__ import annotations

import errno
import itertools
import math
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from svam.atomic import WriteFailedError
from svam.training import LoopSettings, TrainingLoop, TrainingStage


class StageError(ValueError):
    pass


class LineFit(TrainingStage):
    """Fit y = 2x with a linear layer; the loss of the micro steps in `poisoned` is NaN."""

    name, section, error = "line-fit", "fit", StageError

    def __init__(self, poisoned=()):
        self.poisoned = set(poisoned)
        self.exported = None

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(1, 1)

    def stream(self, consumed):
        for index in itertools.count(consumed):
            x = torch.linspace(-1, 1, 8).reshape(8, 1) + 1
            yield {"x": x, "key": [str(index)] * 8}

    def loss(self, model, batch, micro_step):
        loss = ((model(batch["x"]) - 2 * batch["x"]) ** 2).mean()
        if micro_step in self.poisoned:
            loss = loss * float("nan")
        return loss, {}

    def export(self, model, step, into):
        self.exported = {name: value.clone() for name, value in model.state_dict().items()}


def run(tmp_path, stage, steps=12, **settings):
    loop = TrainingLoop(
        stage,
        LoopSettings(steps=steps, learning_rate=0.05, checkpoint_every=4, **settings),
        work_dir=tmp_path / "work",
        output_dir=tmp_path / "out",
    )
    loop.run()
    return loop


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    clean = run(tmp_path / "clean", LineFit())
    poisoned_stage = LineFit(poisoned={5})
    poisoned = run(tmp_path / "poisoned", poisoned_stage)
    assert poisoned.skipped_steps == 1 and clean.skipped_steps == 0
    assert math.isnan(poisoned.history[5]) and all(
        math.isfinite(loss) for i, loss in enumerate(poisoned.history) if i != 5
    )
    assert all(torch.isfinite(value).all() for value in poisoned_stage.exported.values())
    assert poisoned.history[-1] < poisoned.history[0]  # it went on learning


def test_a_poisoned_micro_batch_skips_its_whole_accumulated_step(tmp_path):
    loop = run(tmp_path, LineFit(poisoned={3}), steps=6, gradient_accumulation_steps=2)
    assert loop.skipped_steps == 1  # micro steps 2 and 3 made optimizer step 2


def test_non_finite_steps_in_a_row_stop_the_stage_naming_the_last_good_checkpoint(tmp_path):
    with pytest.raises(StageError) as stopped:
        run(tmp_path, LineFit(poisoned=range(6, 100)), max_nonfinite_steps=3)
    message = str(stopped.value)
    assert message.startswith("line-fit: 3 steps in a row with a non-finite loss or gradient")
    assert "the last at step 9" in message and "checkpoint-000004" in message
    assert "\n" not in message


def disk_full_on_call(monkeypatch, target, name, calls: set[int], writes=None):
    """Make `target.name` raise ENOSPC on the given calls (1-based), after `writes(args)` wrote a
    partial file, as a filling disk would."""
    original = getattr(target, name)
    count = itertools.count(1)

    def failing(*args, **kwargs):
        if next(count) in calls:
            if writes is not None:
                writes(*args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def exported_weights(stage):
    return {name: value.tolist() for name, value in stage.exported.items()}


def test_a_full_disk_during_a_checkpoint_leaves_nothing_partial_and_the_rerun_resumes(
    tmp_path, monkeypatch
):
    clean = LineFit()
    run(tmp_path / "clean", clean)
    disk_full_on_call(
        monkeypatch,
        Accelerator,
        "save_state",
        {2},
        writes=lambda self, path: (
            Path(path).mkdir(parents=True),
            (Path(path) / "x").write_text("x"),
        ),
    )
    with pytest.raises(WriteFailedError) as failed:
        run(tmp_path / "full", LineFit())
    checkpoints = tmp_path / "full" / "work" / "checkpoints"
    message = str(failed.value)
    assert message.startswith(f"could not write {checkpoints / 'checkpoint-000008'}: No space")
    assert "\n" not in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-000004"]
    assert not (tmp_path / "full" / "out").exists()
    monkeypatch.undo()
    resumed = LineFit()
    loop = run(tmp_path / "full", resumed)
    assert len(loop.history) == 12
    assert exported_weights(resumed) == exported_weights(clean)


def test_a_full_disk_during_the_export_leaves_no_output_and_the_rerun_exports(
    tmp_path, monkeypatch, capsys
):
    def export_then_fill(self, model, step, into):
        (into / "weights.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LineFit, "export", export_then_fill)
    with pytest.raises(WriteFailedError, match=r"could not write .*out: No space left"):
        run(tmp_path, LineFit())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no out, no out.tmp
    monkeypatch.undo()
    capsys.readouterr()
    again = LineFit()
    run(tmp_path, again)
    assert "resumed from" in capsys.readouterr().out  # from the final checkpoint: no retraining
    clean = LineFit()
    run(tmp_path / "clean", clean)
    assert exported_weights(again) == exported_weights(clean) and (tmp_path / "out").is_dir()
