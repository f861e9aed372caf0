"""The run directory: every stage of one run reads and writes under `<run.root>/<run.name>/`.

A later stage finds an earlier stage's output here without extra flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from svam.config import Config, to_yaml


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def from_config(cls, config: Config) -> RunDir:
        return cls(Path(config.run.root) / config.run.name)

    @property
    def episodes(self) -> Path:
        return self.root / "episodes"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def decouplers(self) -> Path:
        return self.root / "decouplers"

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    def save_config(self, config: Config, stage: str) -> Path:
        """Write the resolved config a stage ran with to `configs/<stage>.yaml` in the run directory."""
        path = self.root / "configs" / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_yaml(config))
        return path
