"""Writes that fail leave nothing partial and name the path."""

import errno
import os
from pathlib import Path

import pytest
import torch

from svam.atomic import WriteFailedError, removing_on_failure, write_json_atomic


@pytest.mark.parametrize(
    "failure, reason",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"),
            "torch.save failed ([enforce fail",
        ),
    ],
)
def test_a_failed_write_removes_its_partial_and_names_the_target(tmp_path, failure, reason):
    target, partial = tmp_path / "weights", tmp_path / "weights.tmp"
    with pytest.raises(WriteFailedError) as failed:
        with removing_on_failure(target, partial):
            partial.mkdir()
            (partial / "half.bin").write_bytes(b"x")
            raise failure
    assert str(failed.value).startswith(f"could not write {target}: {reason}")
    assert " MiB free there; nothing partial was left behind" in str(failed.value)
    assert failed.value.__cause__ is failure and list(tmp_path.iterdir()) == []


def test_other_errors_pass_unchanged_but_still_leave_nothing(tmp_path):
    partial = tmp_path / "out.tmp"
    with pytest.raises(ValueError, match="a bug"):
        with removing_on_failure(tmp_path / "out", partial):
            partial.write_text("half")
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_torch_saves_failing_on_a_full_device_are_write_failures(tmp_path):
    """torch.save's zip writer reports a failed write as RuntimeError: it is recognised."""
    with pytest.raises(WriteFailedError, match="could not write /dev/full"):
        with removing_on_failure("/dev/full", tmp_path / "none"):
            torch.save(torch.zeros(1 << 16), "/dev/full")


def test_json_written_atomically_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_json_atomic(path, {"step": 1})

    def full(self, text):
        Path.write_bytes(self, text[:3].encode())
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteFailedError, match=f"could not write {path}: No space"):
        write_json_atomic(path, {"step": 2})
    monkeypatch.undo()
    assert path.read_text() == '{\n  "step": 1\n}\n' and sorted(tmp_path.iterdir()) == [path]
