"""Kill each trainer with SIGKILL at random moments, re-run it, and compare its final weights with
an uninterrupted run's, byte for byte.

    .venv/bin/python scripts/kill_survival.py [--kills 10] [--seed 0] [--root /tmp/kill-survival]
    .venv/bin/python scripts/kill_survival.py --stages distill --kills 3

On the micro config with longer training (`--steps`, a checkpoint every `--checkpoint-every`
steps): builds a reference run (collect, train-teacher, cache-teachers, distill, train-policy),
then for each trainer copies the reference's inputs into a fresh run, starts the stage, kills it
after a random time drawn uniformly up to the stage's uninterrupted wall time (so kills land in
start-up, between checkpoints, during checkpoint writes and during the export), `--kills` times,
then lets it finish and compares every `*.safetensors` file of its output with the reference's.
Prints one line per stage and exits non-zero if any differ.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TRAINERS = {
    # stage: (config section, output directory in the run, what its run needs from the reference)
    "train-teacher": ("train_teacher", "teacher", ["episodes"]),
    "distill": ("distill", "decouplers", ["episodes", "teacher", "cache"]),
    "train-policy": (
        "train_policy",
        "policy/shortcut",
        ["episodes", "teacher", "cache", "decouplers"],
    ),
}


def svam(verb: str, run: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "svam.cli",
        verb,
        "--config",
        "micro",
        f"run.root={run.parent}",
        f"run.name={run.name}",
        *overrides,
    ]


def weights(output: Path) -> dict[str, str]:
    return {
        str(path.relative_to(output)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(output.rglob("*.safetensors"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--stages", default=",".join(TRAINERS))
    parser.add_argument("--root", type=Path, default=Path("/tmp/kill-survival"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    overrides = [
        f"{section}.{key}={value}"
        for section, _, _ in TRAINERS.values()
        for key, value in (("steps", args.steps), ("checkpoint_every", args.checkpoint_every))
    ] + ["train_policy.mode=shortcut"]
    shutil.rmtree(args.root, ignore_errors=True)
    reference = args.root / "reference"
    seconds: dict[str, float] = {}
    for verb in ("collect", "train-teacher", "cache-teachers", "distill", "train-policy"):
        start = time.perf_counter()
        subprocess.run(svam(verb, reference, overrides), check=True, capture_output=True)
        seconds[verb] = time.perf_counter() - start
    failed = False
    for verb in args.stages.split(","):
        _, output, inputs = TRAINERS[verb]
        run = args.root / verb
        for name in inputs:
            shutil.copytree(reference / name, run / name)
        moments = []
        for _ in range(args.kills):
            moment = rng.uniform(0, seconds[verb])
            process = subprocess.Popen(
                svam(verb, run, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                process.wait(timeout=moment)
                moments.append(f"{moment:.1f}s (finished first)")
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                moments.append(f"{moment:.1f}s")
        final = subprocess.run(svam(verb, run, overrides), capture_output=True, text=True)
        same = final.returncode == 0 and weights(run / output) == weights(reference / output)
        failed |= not same
        files = len(weights(reference / output))
        killed = sum(not moment.endswith("(finished first)") for moment in moments)
        print(
            f"{verb}: {killed} SIGKILLs at {', '.join(moments)} of a {seconds[verb]:.1f} s run; "
            f"re-run exit {final.returncode}; {files} weight files "
            + ("byte-identical to the uninterrupted run" if same else "DIFFER")
        )
        if final.returncode:
            print(final.stderr[-2000:])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
