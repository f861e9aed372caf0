"""One writer per output: a stage holds an exclusive lock on what it writes.

The lock is `.<output>.lock` beside the output, held through filelock (an OS-level `flock`), so the
kernel releases it when its holder dies however it dies: a lock left by a killed process is simply
taken by the next one. Who holds it (pid, host, command, since when) is written beside it, in
`.<output>.lock.holder.json`, for the one-line refusal a second writer gets. The ranks of one
distributed job share their job's lock: the main process takes it and tells the others whether it
got it, so all of them go on or all of them stop.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from svam.atomic import write_text_atomic


class OutputLockedError(OSError):
    """Another process is writing the output (the message names it and its holder)."""


def lock_path(output: Path) -> Path:
    """A hidden file beside the output (kept after release: removing it would race)."""
    return output.with_name(f".{output.name}.lock")


def holder_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock.holder.json")


def _holder(output: Path) -> str:
    try:
        record = json.loads(holder_path(output).read_text())
    except (OSError, ValueError):
        return "another process"
    return f"pid {record['pid']} on {record['host']} since {record['since']} ({record['command']})"


def _take(output: Path) -> tuple[FileLock | None, str | None]:
    """(the held lock, None), or (None, why not)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(output), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None, (
            f"{output} is being written by {_holder(output)}: wait for it to finish or stop it "
            f"(lock {lock_path(output)})"
        )
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["svam", *sys.argv[1:]]) if sys.argv else "svam",
    }
    try:
        write_text_atomic(holder_path(output), json.dumps(record) + "\n")
    except OSError:
        lock.release()
        raise
    return lock, None


@contextmanager
def output_lock(output: str | Path) -> Iterator[None]:
    """Hold the lock on `output` for the block; refuse at once (`OutputLockedError`, one line
    naming the holder) if another process holds it. Call it on every rank of a job."""
    output = Path(output)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun / accelerate launch
        import torch
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        # As the stages make it: accelerate forms a multi-process CPU group only when told the
        # run is on the CPU (an already made state is returned as it is).
        state = PartialState(cpu=not torch.cuda.is_available())
        lock, refusal = _take(output) if state.is_main_process else (None, None)
        refusal = broadcast_object_list([refusal])[0]
    else:  # one process: no torch to import (collect and import never need it)
        lock, refusal = _take(output)
    if refusal:
        raise OutputLockedError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            holder_path(output).unlink(missing_ok=True)
            lock.release()
