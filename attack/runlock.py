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
    """One writer per run directory. The lock file names its holder (host, pid and the pid's
    start time) and is touched every minute while held; it is taken by an exclusive create. A
    second process refuses to start. A holder that died (on this host: its pid is gone, or now
    belongs to a process started at another time; from another host: no touch for LEASE_S) is
    taken over, said in one line, by one process only: the taker must first create
    `.lock.takeover` exclusively, and judges the holder again once it has. Works on shared file
    systems: it needs only atomic create and rename."""

    LEASE_S = 600

    held: set[Path] = set()  # the locks this process holds now

    def __init__(self, path: Path):
        self.path = path
        self._stop = None

    def acquire(self) -> None:
        me = {"host": platform.node(), "pid": os.getpid(), "start": _start_time(os.getpid()), "since": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            self._take_over(me)
        else:
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except BaseException:  # a full disk: leave no empty lock behind
                with contextlib.suppress(OSError):
                    self.path.unlink()
                raise
        RunLock.held.add(self.path.resolve())
        self._heartbeat()

    def _take_over(self, me: dict) -> None:
        """Replace a dead holder's lock; one taker at a time (an exclusive `.lock.takeover`),
        which judges the holder again once it holds it, so two takers never both write."""
        gate = self.path.with_name(self.path.name + ".takeover")
        with contextlib.suppress(OSError):
            if time.time() - gate.stat().st_mtime > 60:  # left by a taker that died mid-takeover
                gate.unlink()
        try:
            os.close(os.open(gate, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise RunDirInUse(f"run directory {self.path.parent} is being taken over by another process; "
                              "leave it to that one") from None
        try:
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
        finally:
            with contextlib.suppress(OSError):
                gate.unlink()

    def holder_alive(self) -> bool:
        """Another live process holds this lock now (not this process)."""
        holder = read_json(self.path)
        if not isinstance(holder, dict) or not self.path.exists():
            return False
        if holder.get("pid") == os.getpid() and holder.get("host") == platform.node():
            return False
        return self._alive(holder)

    def _alive(self, holder: dict) -> bool:
        if holder.get("host") == platform.node():
            pid, start = holder.get("pid"), holder.get("start")
            # a pid reused by a process started later is not the holder
            return _pid_alive(pid) and (start is None or _start_time(pid) in (None, start))
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


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


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

