"""One writer per output: a second writer is refused naming the holder, a dead holder's lock is
taken over, the ranks of one job share their job's lock, and the stages take it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import tiny_collect_overrides

from svam.cli import main
from svam.locking import OutputLockedError, holder_path, output_lock

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from svam.locking import output_lock
    out = Path(sys.argv[1])
    with output_lock(out):
        print("locked", flush=True)
        out.mkdir(exist_ok=True)
        while not (out / "go").exists():
            time.sleep(0.05)
        (out / "result").write_text("written by the holder")
    """
)


def hold(output) -> subprocess.Popen:
    """A process that holds the lock on `output` until `output/go` appears."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_is_refused_naming_the_holder_and_the_first_finishes(tmp_path):
    out = tmp_path / "decouplers"
    holder = hold(out)
    try:
        with pytest.raises(OutputLockedError) as refused:
            with output_lock(out):
                raise AssertionError("the second writer must not get the lock")
        message = str(refused.value)
        assert f"{out} is being written by pid {holder.pid} on {socket.gethostname()}" in message
        assert "\n" not in message
    finally:
        (out / "go").touch()
        assert holder.wait(timeout=30) == 0
    assert (out / "result").read_text() == "written by the holder"
    assert not holder_path(out).exists()
    with output_lock(out):  # free again
        assert json.loads(holder_path(out).read_text())["pid"] == os.getpid()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "cache"
    holder = hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads(holder_path(out).read_text())["pid"] == holder.pid  # left behind
    with output_lock(out):
        assert json.loads(holder_path(out).read_text())["pid"] == os.getpid()


def test_a_stage_refuses_a_held_output_in_one_line(tmp_path, capsys):
    out = tmp_path / "test" / "episodes"
    holder = hold(out)
    try:
        assert main(["collect", *tiny_collect_overrides(tmp_path)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("svam collect: error: ") and "\n" not in err
        assert f"{out} is being written by pid {holder.pid}" in err
    finally:
        (out / "go").touch()
        holder.wait(timeout=30)
    assert sorted(p.name for p in out.iterdir()) == ["go", "result"]  # nothing of collect's


RANKS = textwrap.dedent(
    """
    import sys
    import torch.distributed
    from svam.locking import OutputLockedError, output_lock
    from accelerate import PartialState
    rank = PartialState(cpu=True).process_index

    def say(word):  # one write per line: the ranks share torchrun's stdout pipe
        sys.stdout.write(f"rank {rank} {word}\\n")
        sys.stdout.flush()

    try:
        with output_lock(sys.argv[1]):
            say("writes")
    except OutputLockedError:
        say("refused")
    torch.distributed.destroy_process_group()  # as svam.cli does: gloo's threads end cleanly
    """
)


def test_the_ranks_of_one_job_share_its_lock(tmp_path):
    """Both ranks of a 2-process job go on together; with the output held elsewhere, both stop."""
    out = tmp_path / "policy"
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)

    def job() -> list[str]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            str(os.path.join(os.path.dirname(sys.executable), "torchrun")),
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(script),
            str(out),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))

    assert job() == ["rank 0 writes", "rank 1 writes"]
    holder = hold(out)
    try:
        start = time.monotonic()
        assert job() == ["rank 0 refused", "rank 1 refused"]
        assert time.monotonic() - start < 60  # at once, not after a wait
    finally:
        (out / "go").touch()
        holder.wait(timeout=30)
