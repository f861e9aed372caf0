"""Writes that leave the old file or the new one, never a partial one, and fail in one line.

Every stage writes under a temporary name (`<name>.tmp`, `<dir>.partial`) and renames when complete,
so a kill leaves nothing a later stage could take for finished. A write that fails (a full disk,
any OSError, or the serialisers' own spelling of one) goes through `removing_on_failure`: what it
had written is deleted and the stage ends with one `WriteFailedError` line naming the path; the
complete shards and checkpoints before it stand, so the next run resumes from them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

TORCH_WRITER_FAILURES = ("PytorchStreamWriter", "inline_container")
"""What torch.save's zip writer says when a write fails (it raises RuntimeError, not OSError)."""


class WriteFailedError(OSError):
    """A write failed; what it had written is gone. The message names the path."""

    def __init__(self, target: Path, cause: BaseException):
        reason = getattr(cause, "strerror", None)
        if not reason:  # torch's and safetensors' messages: name the writer, keep their text
            writer = "safetensors" if isinstance(cause, SafetensorError) else "torch.save"
            reason = f"{writer} failed ({str(cause).strip().splitlines()[0]})"
        super().__init__(
            f"could not write {target}: {reason}{_free_space(Path(target))}; nothing partial was "
            "left behind: free space (or fix the cause) and re-run, it resumes from what was "
            "complete"
        )
        self.target = Path(target)


def _free_space(path: Path) -> str:
    """', N MiB free on its filesystem', for the nearest existing parent of `path`."""
    for parent in [path, *path.parents]:
        if parent.exists():
            try:
                return f", {shutil.disk_usage(parent).free / 2**20:.1f} MiB free there"
            except OSError:
                return ""
    return ""


def is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError | SafetensorError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in TORCH_WRITER_FAILURES)


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def removing_on_failure(target: str | Path, partial: str | Path | None = None) -> Iterator[None]:
    """Run a block that writes `partial` (a file or directory; default `target`) for `target`: if it
    raises, `partial` is deleted, and a failed write becomes one `WriteFailedError` naming `target`."""
    target = Path(target)
    partial = target if partial is None else Path(partial)
    try:
        yield
    except BaseException as exc:
        remove(partial)
        if is_write_failure(exc) and not isinstance(exc, WriteFailedError):
            raise WriteFailedError(target, exc) from exc
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield `<path>.tmp` to write: when the block ends it replaces `path`; if it raises, it is
    removed (a failed write becomes a `WriteFailedError` naming `path`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with removing_on_failure(path, tmp):
        yield tmp
        tmp.replace(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """`atomic_file` for a directory: yield an empty `<path>.tmp/`, put in place of `path` by
    `replace_dir` when the block ends, removed if it raises (single process)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with removing_on_failure(path, tmp):
        yield tmp
        replace_dir(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory `tmp` in place of `final` by renames only: a kill at any moment
    leaves the old directory or none, never a partial one (the old one is deleted only once the
    new one is in place; `*.tmp` and `*.old` leftovers go on the next call)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
