"""Training checkpoints, shared by every training stage.

A checkpoint is accelerate's saved state plus a `train_state.json` record (step, data position and
the settings that must match to resume). It is written under `<name>.tmp` and renamed when
complete, so an interruption leaves the previous checkpoints and never a partial one; only the
newest `keep` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from svam.atomic import removing_on_failure, replace_dir

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAIN_STATE_NAME = "train_state.json"


class CheckpointDir:
    def __init__(self, root: Path, keep: int):
        self.root = Path(root)
        self.keep = keep

    def remove_partial(self) -> None:
        """Delete checkpoints an interrupted run left half-written (call on the main process)."""
        for stale in self.root.glob("*.tmp"):
            shutil.rmtree(stale)

    def save(self, accelerator: Accelerator, step: int, record: dict[str, Any]) -> Path:
        """Save every process's state as `checkpoint-<step>`; all processes must call it."""
        final = self.root / f"checkpoint-{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        with removing_on_failure(final, tmp):
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (tmp / TRAIN_STATE_NAME).write_text(json.dumps(record, indent=2) + "\n")
                replace_dir(tmp, final)
        if accelerator.is_main_process:
            done = sorted(self.complete())
            for _, old in done[: max(len(done) - self.keep, 0)]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and (path / TRAIN_STATE_NAME).is_file():
                found.append((int(match.group(1)), path))
        return found

    def to_resume(self, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint a `resume` key names (None: start over; 'latest': the newest, if any;
        else a path) and its record. A path without a record raises FileNotFoundError."""
        if resume is None:
            return None
        if resume == "latest":
            found = self.complete()
            if not found:
                return None
            path = max(found)[1]
        else:
            path = Path(resume)
        state_path = path / TRAIN_STATE_NAME
        if not state_path.is_file():
            raise FileNotFoundError(
                f"{path}: not a complete checkpoint ({TRAIN_STATE_NAME} missing)"
            )
        return path, json.loads(state_path.read_text())
