"""Cross-fitting: decouplers whose foresight is out-of-sample for every train clip.

The published decouplers fit every train clip, so the foresight they give those clips is better
than what they give a clip they never saw, which is all the policy gets at evaluation. With
`distill.cross_fit_folds` = K >= 2, `svam distill` also fits K decoupler pairs, fold k on the
train episodes outside fold k, and `svam train-policy` gives each train clip the foresight of the
pair that held its episode out. Folds split episodes, never clips: clips of one episode overlap.

Layout: `<decouplers>-folds/fold-<k>/` (decoupler directories, each with its distill record
naming the episodes it held out) and `<decouplers>-folds/folds.json` (the assignment), written
last, when every fold is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FOLDS_NAME = "folds.json"


def folds_dir(decouplers: Path) -> Path:
    return decouplers.with_name(decouplers.name + "-folds")


def fold_dir(decouplers: Path, fold: int) -> Path:
    return folds_dir(decouplers) / f"fold-{fold}"


def assign_folds(episodes: list[str], folds: int) -> dict[str, int]:
    """Each episode's fold: dealt round-robin in key order, so every task (keys are task-seed)
    spreads over the folds."""
    return {episode: index % folds for index, episode in enumerate(sorted(set(episodes)))}


def held_out(fold_of: dict[str, int], fold: int) -> frozenset[str]:
    return frozenset(episode for episode, f in fold_of.items() if f == fold)


def read_folds(decouplers: Path) -> dict[str, Any] | None:
    """The completed cross-fitting beside `decouplers` ({"key", "folds", "fold_of"}), or None."""
    path = folds_dir(decouplers) / FOLDS_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())
