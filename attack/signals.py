"""SIGTERM and SIGINT that always stop the work. A signal handler raises wherever the main
thread happens to be; inside a finalizer (a `__del__`, a weak-reference callback) Python only
prints "Exception ignored" and carries on, so a sweep would run to its end and exit 0. The
handler therefore also records the signal, and the places that always come round (every
optimizer step, every evaluation point, every sweep cell, the command's exit) raise it again."""

from __future__ import annotations

import signal
import sys

_pending: KeyboardInterrupt | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a scheduler sends before preempting a job: handled like Ctrl-C, so the run is
    marked interrupted and resumes from its last checkpoint."""


def _handler(signum, frame):
    global _pending
    _pending = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    raise type(_pending)()


def _unraisable(info) -> None:
    """Python's report of an exception a finalizer could not raise: for our signal's, nothing (it
    is recorded and raised again at the next point that always comes round, which then says it in
    one line); anything else as Python reports it."""
    if isinstance(info.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(info)


def install() -> None:
    """The process's handlers for SIGTERM and SIGINT (the command line's entry point calls this),
    and the report of a signal that lands inside a finalizer."""
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    sys.unraisablehook = _unraisable


def pending() -> KeyboardInterrupt | None:
    """The signal received, if one was (even one whose exception a finalizer swallowed)."""
    return _pending


def raise_pending() -> None:
    """Raise the signal received again, at a point where nothing can swallow it."""
    if _pending is not None:
        raise type(_pending)()
