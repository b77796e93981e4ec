"""An exclusive lock on an output folder, naming its holder.

    with FolderLock(out_dir, purpose="tools/make_tfrecords.py"):
        ...  # only this process writes under out_dir

The lock is ``fcntl.flock`` on ``<folder>/.lock``: the kernel releases it when the holding
process ends, however it ends (kill -9 included), so a lock file left behind by a dead run
is simply taken over and never needs cleaning by hand. The file holds the holder's pid,
host, start time and command line, which a second run reports instead of deleting the
first run's files under its feet.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""

    def __init__(self, folder: Path, holder: dict[str, Any]):
        self.folder = folder
        self.holder = holder
        who = ", ".join(
            f"{key} {holder[key]}" for key in ("pid", "host", "started") if holder.get(key) not in (None, "")
        ) or "an unknown process"
        command = f" ({holder['command']})" if holder.get("command") else ""
        super().__init__(
            f"{folder} is in use by another run: {who}{command}; wait for it to finish or use another folder"
        )


def read_holder(lock_path: str | os.PathLike) -> dict[str, Any]:
    """What a lock file says about its holder ({} when it cannot be read)."""
    try:
        holder = json.loads(Path(lock_path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class FolderLock:
    """Exclusive, non-blocking lock on ``folder`` (created if needed); a context manager."""

    def __init__(self, folder: str | os.PathLike, purpose: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose or " ".join(sys.argv)
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderLockedError(self.folder, read_holder(self.path)) from None
            except BaseException:
                os.close(fd)
                raise
            # The file may have been unlinked by its previous holder between our open and
            # flock: then we hold a lock nobody else sees, so start again on the new file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": self.purpose,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiting opener retries on a new file
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
