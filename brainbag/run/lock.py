"""One writer per output folder: an exclusive lock held for the whole run.

The lock is ``.brainbag.lock`` in the output folder, locked with ``flock`` and holding who took it
(pid, host, start time, command). The kernel drops a ``flock`` lock when its process dies, however
it dies (kill -9 included), so a lock left by a killed run is simply free: the next run takes it
over. The file records the holder only to name it in the refusal. On a file system where ``flock``
is not supported (some network or FUSE mounts) the recorded pid is checked instead: a live process
on this host keeps the folder; a process on another host cannot be checked, so the run is refused
and says how to go on (README, "One writer per output folder").

The lock file is removed when the run ends (the folder too, when this run created it and left it
empty), so a run that writes nothing leaves nothing behind.

Shards (``predict --shard K/N``, :mod:`brainbag.run.shards`) share one output folder: each takes the
folder's lock *shared* (so an ordinary run is refused while any shard runs, and a shard while an
ordinary run does) and its own exclusive lock ``shards/.K-of-N.lock`` (so the same shard cannot
run twice). A shared lock file is left in place when a shard ends, since other shards may hold it.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from brainbag.errors import FolderInUse, OutputError, UsageError

LOCK_NAME = ".brainbag.lock"


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "another process (its details are not readable)"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
            f"{info.get('started', '?')}")


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_info(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class OutputLock:
    """Context manager: hold ``out``'s lock for a run, or raise :class:`FolderInUse` at once."""

    def __init__(self, out: Path, command: str = "predict", name: str = LOCK_NAME,
                 shared: bool = False, what: str = "output folder") -> None:
        self.out = Path(out)
        self.path = self.out / name
        self.command = command
        self.shared = shared
        self.what = what
        self._fd: int | None = None
        self._created_folder = False
        self.took_over: dict[str, Any] | None = None  # the dead holder whose lock was taken

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file, not a folder")
        try:
            if not self.out.exists():
                self.out.mkdir(parents=True)
                self._created_folder = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {self.out}: {exc.strerror}; "
                              "choose a writable --out") from exc
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._remove_folder()
                raise OutputError(f"cannot write in the output folder {self.out}: {exc.strerror}; "
                                  "choose a writable --out (or fix its permissions)") from exc
            try:
                self._lock(fd)
                # the file may have been removed by its previous holder between our open and our
                # lock: then we hold a lock on a file nobody else sees; open the new one again
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                self._remove_folder()
                raise
            break
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        except OSError as exc:
            self.release()
            raise OutputError(f"cannot write in the output folder {self.out}: {exc.strerror}; "
                              "free some space or choose another --out") from exc

    def _lock(self, fd: int) -> None:
        """flock the file; refuse when a live run holds it."""
        previous = _read_info(fd)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(
                f"{self.what} {self.out} is in use by another brainbag run "
                f"({_holder_text(_read_info(fd))}); wait for it to finish, or choose another "
                "--out") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if not self.shared:  # shards cannot judge each other by pid: their own lock does
                self._check_pid_only(previous)
            return
        if not self.shared and previous.get("pid") and previous.get("pid") != os.getpid():
            # the kernel released the holder's lock: it died (or it ran on another host)
            self.took_over = previous

    def _check_pid_only(self, previous: dict[str, Any]) -> None:
        """No flock on this file system: judge the recorded holder by its pid and host."""
        if not previous:
            return
        same_host = previous.get("host") == socket.gethostname()
        pid = int(previous.get("pid") or 0)
        if same_host and not pid_alive(pid):
            self.took_over = previous
            return
        where = "is still running" if same_host else "runs on another host and cannot be checked"
        raise FolderInUse(
            f"output folder {self.out} is locked by {_holder_text(previous)}, which {where} "
            f"(this file system does not support flock); wait for it, or if it is gone delete "
            f"{self.path}")

    def release(self) -> None:
        """Drop the lock and remove the lock file (and the folder, if this run made it and
        left it empty)."""
        if self._fd is None:
            return
        try:
            if not self.shared:  # other shards may still hold a shared lock on this file
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_folder()

    def _remove_folder(self) -> None:
        if self._created_folder:
            try:
                self.out.rmdir()
            except OSError:  # not empty: results were written
                pass
