"""A saved teacher's foresight against copying the current frame, on a run's test clips.

    .venv/bin/python scripts/teacher_skill.py --run bench [--teacher DIR] [--clips 64]

`svam train-teacher` scores every teacher it trains the same way (teachers/skill.py) and records
it; this scores a teacher trained before it did, or any teacher directory, on the episodes of
`--run` (its data split), and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch

from svam.config import load_config
from svam.data.episodes import clip_loader
from svam.rundir import RunDir
from svam.teachers.configuration_teacher import TeacherRuntime
from svam.teachers.pipeline_teacher import TeacherPipeline
from svam.teachers.skill import skill_table, teacher_skill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="bench")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--clips", type=int, default=64)
    args = parser.parse_args()
    config = load_config(args.config, [f"run.name={args.run}"])
    run = RunDir.from_config(config)
    torch.set_num_threads(2)
    pipeline = TeacherPipeline.from_pretrained(
        args.teacher or run.teacher,
        TeacherRuntime.from_config(config.teacher),
        config=config.teacher,
    )
    loader = clip_loader(run.episodes, config.data, "test", seed=config.run.seed, shuffle=True)
    batches = list(itertools.islice(loader, math.ceil(args.clips / config.data.batch_size)))
    print(skill_table(teacher_skill(pipeline, batches, config.run.seed)))


if __name__ == "__main__":
    main()
