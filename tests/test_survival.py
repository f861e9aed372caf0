"""Each trainer, killed by SIGKILL in a real process between checkpoints and re-run, ends with
weights byte-identical to the uninterrupted run (the micro demo's, which checkpointed less often)."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

TRAINERS = [
    # verb, its output in the run, its work directory, what it reads from the demo's run
    ("train-teacher", "teacher", "teacher-train", ["episodes"]),
    ("distill", "decouplers", "decouplers-train", ["episodes", "teacher", "cache"]),
    (
        "train-policy",
        "policy/shortcut",
        "policy/shortcut-train",
        ["episodes", "teacher", "cache", "decouplers"],
    ),
]
CHECKPOINT_EVERY_2 = [
    f"{section}.checkpoint_every=2" for section in ("train_teacher", "distill", "train_policy")
]


def weights(output):
    return {
        str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(output.rglob("*.safetensors"))
    }


@pytest.mark.parametrize("verb, output, work, inputs", TRAINERS, ids=[t[0] for t in TRAINERS])
def test_a_trainer_killed_between_checkpoints_resumes_to_the_same_weights(
    micro_demo, tmp_path, verb, output, work, inputs
):
    reference, _ = micro_demo
    run = tmp_path / "run"
    for name in inputs:
        shutil.copytree(reference / name, run / name)
    command = [
        *(sys.executable, "-m", "svam.cli", verb, "--config", "micro"),
        *(f"run.root={tmp_path}", "run.name=run", "train_policy.mode=shortcut"),
        *CHECKPOINT_EVERY_2,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the demo ran in this one-thread process
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = run / work / "checkpoints" / "checkpoint-000002" / "train_state.json"
    deadline = time.monotonic() + 300
    while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (run / output).exists()  # killed before the end: nothing exported
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout + result.stderr
    assert weights(run / output) == weights(reference / output) != {}
