"""One writer per run directory: a lock file that names its holder and is taken over when the
holder is gone."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

from attack.errors import UserError
from attack.files import read_json, write_atomic


class RunDirInUse(UserError):
    """Another live process holds the run directory."""


class RunLock:
    """One writer per run directory. The lock file names its holder (host, pid) and is touched
    every minute while held. A second process refuses to start; a holder that died (its pid is
    gone on this host, or, from another host, no touch for LEASE_S) is taken over, said in one
    line. Works on shared file systems: it needs only atomic create and rename."""

    LEASE_S = 600

    held: set[Path] = set()  # the locks this process holds now

    def __init__(self, path: Path):
        self.path = path
        self._stop = None

    def acquire(self) -> None:
        me = {"host": platform.node(), "pid": os.getpid(), "since": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except FileExistsError:
            holder = read_json(self.path) or {}
            mine = holder.get("pid") == os.getpid() and holder.get("host") == platform.node()
            if mine and self.path.resolve() not in RunLock.held:
                holder = {}  # left by an earlier run in this process that ended without release
            elif self._alive(holder):
                raise RunDirInUse(
                    f"run directory {self.path.parent} is in use by pid {holder.get('pid')} on "
                    f"{holder.get('host')}; wait for it, or stop it first (two writers would corrupt the run)"
                ) from None
            else:
                print(f"taking over {self.path.parent}: its previous process (pid {holder.get('pid')} on "
                      f"{holder.get('host')}) is gone", file=sys.stderr)
            write_atomic(self.path, json.dumps(me))
        RunLock.held.add(self.path.resolve())
        self._heartbeat()

    def _alive(self, holder: dict) -> bool:
        if holder.get("host") == platform.node():
            return _pid_alive(holder.get("pid"))
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False
        # An unreadable lock is one whose holder died between creating and writing it.
        return age < (self.LEASE_S if holder else 10)

    def _heartbeat(self) -> None:
        self._stop = threading.Event()

        def touch(stop=self._stop):
            while not stop.wait(60):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        threading.Thread(target=touch, daemon=True, name="run-dir-lock").start()

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        RunLock.held.discard(self.path.resolve())
        holder = read_json(self.path) or {}
        if holder.get("pid") == os.getpid() and holder.get("host") == platform.node():
            with contextlib.suppress(OSError):
                self.path.unlink()


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

