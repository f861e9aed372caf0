"""Shared fixtures: tiny configs, synthetic episode shard sets and one real Meta-World collection."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

import torch  # noqa: E402

# The suite's models are tiny: a second thread buys little, and on a shared machine two threads per
# process spin against other processes and run many times slower.
torch.set_num_threads(1)

from svam.collect import episode_key  # noqa: E402
from svam.config import load_config  # noqa: E402
from svam.data.schema import EPISODES  # noqa: E402
from svam.data.shards import ShardSetWriter  # noqa: E402


def synthetic_episode(task: str, seed: int, length: int, size: int = 8):
    """An episode whose values encode (seed, step), so a clip can be traced back to its source."""
    steps = np.arange(length, dtype=np.float32)
    frames = np.broadcast_to((steps[:, None, None, None] + seed) % 256, (length, size, size, 3))
    arrays = {
        "frames": frames.astype(np.uint8),
        "depth": np.broadcast_to(steps[:, None, None] / 100 + 1, (length, size, size)).astype(
            np.float16
        ),
        "actions": np.stack([steps, steps + 0.5, np.full_like(steps, seed), -steps], axis=1),
        "state": np.stack([steps, steps, steps, np.full_like(steps, seed)], axis=1),
    }
    meta = {
        "task": task,
        "instruction": f"do {task}",
        "seed": seed,
        "success": True,
        "first_success_step": length - 1,
        "camera": "corner",
    }
    return arrays, meta


def write_synthetic_episodes(
    out_dir, tasks=("reach-v3", "push-v3"), seeds=range(4), length=20, per_shard=3, size=8
):
    episodes = {}
    with ShardSetWriter(out_dir, EPISODES, per_shard) as writer:
        for task in tasks:
            for seed in seeds:
                arrays, meta = synthetic_episode(task, seed, length, size)
                key = episode_key(task, seed)
                writer.write(key, arrays, meta)
                episodes[key] = {"task": task, "seed": seed, "length": length, "success": True}
        writer.close(episodes=episodes)
    return out_dir


@pytest.fixture
def synthetic_episodes(tmp_path):
    return write_synthetic_episodes(tmp_path / "episodes")


def tiny_collect_overrides(root) -> list[str]:
    """2 tasks x 2 episodes at 32x32: the smallest collection that exercises everything."""
    return [
        f"run.root={root}",
        "run.name=test",
        "collect.tasks=[reach-v3,button-press-topdown-v3]",
        "collect.episodes_per_task=2",
        "collect.image_size=32",
        "collect.max_steps=120",
        "collect.workers=1",
        "collect.episodes_per_shard=3",
    ]


@pytest.fixture(scope="session")
def collected(tmp_path_factory):
    """One real Meta-World collection shared by the tests that only read it."""
    from svam.collect import collect

    root = tmp_path_factory.mktemp("runs")
    config = load_config("tiny", tiny_collect_overrides(root))
    return config, collect(config)


def torchrun(processes: int, *cli_args: str) -> list[str]:
    """A `torchrun ... -m svam.cli` command on a free loopback port, so parallel runs never meet."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        str(Path(sys.executable).with_name("torchrun")),
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "svam.cli",
        *cli_args,
    ]


def file_size_limit(max_bytes: int):
    """A `preexec_fn` under which the child's writes past `max_bytes` in any file fail with a real
    OSError (EFBIG) from the kernel, as a filling disk would fail them: any write, anywhere."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a signal that kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


@pytest.fixture(scope="session")
def micro_demo(tmp_path_factory):
    """`svam demo` on the micro config, run once: (run directory, what it printed)."""
    import contextlib
    import io

    from svam.cli import main

    root = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--config", "micro", f"run.root={root}"]) == 0
    return root / "micro", printed.getvalue()
