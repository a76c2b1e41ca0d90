"""Atomic file writes: a reader sees either the old complete file or the new one, never half."""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from lora_nb import LoraNbError

# Test hook (used by tests/test_faults.py to kill a process while a file is being replaced): when this
# environment variable holds a file name, writing that file over an existing version pauses after the
# new content is complete and before the rename, and says so on stderr (with <VAR>_SKIP=N, from the
# (N+1)-th replacement on).
PAUSE_ENV = "LORA_NB_TEST_PAUSE_BEFORE_REPLACE"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    On any error the temporary file is removed and ``path`` is left as it was.
    A full disk gives a clear :class:`LoraNbError` naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp (and some writers, safetensors among them) make 0600: results are as readable as any new file
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _test_pause(path)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if is_disk_full(exc):
            raise DiskFullError(path) from None
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left on device", whether raised by Python (OSError) or reported by a
    native writer (safetensors) in its message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return isinstance(exc, Exception) and "No space left on device" in str(exc)


FREE_SPACE = "Free some space (delete old runs or LoRA files)"


class DiskFullError(LoraNbError):
    """No space left while writing ``path``; ``then`` says what to do, and the trainer adds what a rerun does."""

    def __init__(self, path: str | Path, then: str = f"{FREE_SPACE} and run it again."):
        self.path = path
        super().__init__(f"The disk is full while writing {path}: the previous version of the file is intact. {then}")


_replaced: dict[str, int] = {}  # test hook: replacements of the watched file so far, per file name


def _test_pause(path: Path) -> None:
    if os.environ.get(PAUSE_ENV) == path.name and path.exists():
        _replaced[path.name] = _replaced.get(path.name, 0) + 1
        if _replaced[path.name] <= int(os.environ.get(PAUSE_ENV + "_SKIP", "0")):  # pause at a later replacement
            return
        print(f"lora-nb test hook: paused before replacing {path}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get(PAUSE_ENV + "_SECONDS", "120")))


def _remove_quietly(tmp) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``, ``.lora-save-*/``) a killed process left in ``folder``.

    Only call this where no other process writes at the same time (the start of a training run).
    """
    import shutil

    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and _TEMP_RE.match(p.name):
                _remove_quietly(p)
                removed.append(p)
            elif p.is_dir() and not p.is_symlink() and p.name.startswith(".lora-save-"):  # lora_io's temp folders
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))
