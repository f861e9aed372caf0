"""Check svam's LeRobot support against lerobot itself (run with a Python that has lerobot).

lerobot needs numpy 2 and svam's environment pins numpy 1 (depth-anything-3), so this runs in a
separate environment, e.g. `uv venv /tmp/lr && uv pip install --python /tmp/lr/bin/python
"lerobot[dataset]"`, and talks to svam through files only:

    /tmp/lr/bin/python scripts/check_lerobot_interop.py read EXPORTED_DIR
        load a dataset `svam export lerobot` wrote with lerobot's LeRobotDataset (pyav backend),
        index every frame, and print a digest of its frames, actions and tasks
    /tmp/lr/bin/python scripts/check_lerobot_interop.py write OUT_DIR
        record a small v3.0 dataset with lerobot's own writer (LeRobotDataset.create, add_frame,
        save_episode) for `svam import lerobot OUT_DIR` to read; prints what it holds
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local dataset: never the hub


def read(root: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset("svam/export", root=root, video_backend="pyav")
    camera = dataset.meta.video_keys[0]
    frames = actions = 0.0
    episodes = set()
    for index in range(len(dataset)):
        item = dataset[index]
        frames += float(item[camera].mean())
        actions += float(item["action"].sum())
        episodes.add(int(item["episode_index"]))
    print(
        json.dumps(
            {
                "codebase_version": dataset.meta.info["codebase_version"],
                "frames": len(dataset),
                "episodes": len(episodes),
                "fps": dataset.fps,
                "camera": camera,
                "mean_pixel": frames / len(dataset),
                "action_sum": actions,
                "tasks": list(dataset.meta.tasks.index),
            },
            indent=2,
        )
    )


def write(root: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {
        "observation.images.front": {
            "dtype": "video",
            "shape": (96, 128, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
        "action": {"dtype": "float32", "shape": (7,), "names": None},
    }
    dataset = LeRobotDataset.create(
        "svam/lerobot-written", fps=30, root=root, features=features, robot_type="so101"
    )
    rng = np.random.default_rng(0)
    tasks = ["stack the blocks", "wipe the table"]
    summary = []
    for episode, length in enumerate((25, 31, 28, 22)):
        action_sum = 0.0
        for step in range(length):
            image = np.full((96, 128, 3), 0, np.uint8)
            image[..., 0] = 30 + 4 * step
            image[..., 1] = 40 + 40 * episode
            image[..., 2] = np.linspace(0, 255, 128, dtype=np.uint8)[None, :]
            action = rng.normal(size=7).astype(np.float32)
            action_sum += float(action.sum())
            dataset.add_frame(
                {
                    "observation.images.front": image,
                    "observation.state": rng.normal(size=6).astype(np.float32),
                    "action": action,
                    "task": tasks[episode % 2],
                }
            )
        dataset.save_episode()
        summary.append({"episode": episode, "length": length, "action_sum": action_sum})
    dataset.finalize()
    print(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("read", "write"))
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    (read if args.action == "read" else write)(args.path)


if __name__ == "__main__":
    main()
