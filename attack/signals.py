"""SIGTERM and SIGINT that always stop the work. A signal handler raises wherever the main
thread happens to be; inside a finalizer (a `__del__`, a weak-reference callback) Python only
prints "Exception ignored" and carries on, so a sweep would run to its end and exit 0. The
handler therefore also records the signal, and the places that always come round (every
optimizer step, every evaluation point, every sweep cell, the command's exit) raise it again."""

from __future__ import annotations

import contextlib
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


_forked = False  # this process's pools fork their workers from a server that imported their modules


def preload_workers(modules: list[str]) -> None:
    """Start now, beside this process, the server the workers of its pools are forked from, and
    import `modules` there: a spawned worker imports torch, transformers and lm-eval itself (about
    12 s each on a 2-core machine) when its pool starts; a forked one has them already, and the
    server imports them while this process does other work. For a command's own process: the
    workers get the environment and working directory it has now. Where processes cannot be
    forked (Windows), the pools spawn as before."""
    global _forked
    import multiprocessing
    import multiprocessing.forkserver

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    multiprocessing.get_context("forkserver").set_forkserver_preload(modules)
    multiprocessing.forkserver.ensure_running()
    _forked = True


@contextlib.contextmanager
def worker_pool(workers: int):
    """`run(function, jobs)`: the jobs' results in order, `workers` at a time, each in a spawned
    process of its own (forked from the server `preload_workers` started, when it was), one pool
    for every call in the block (a process costs seconds to start).
    The workers stop when this process is told to: on SIGTERM or Ctrl-C here, the jobs not begun
    are dropped and each worker gets one SIGTERM, which ends its job as interrupted (a run marked
    so, resumable) and begins no other. Without that, a SIGTERM sent to this process alone left
    the pool to run every job to its end. The terminal's Ctrl-C, which reaches every process of
    the group, is left to this process: a second signal in a worker would cut short its marking
    of the run."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver" if _forked else "spawn"),
                             initializer=_worker_started) as pool:
        def run(function, jobs):
            try:
                return list(pool.map(_worker_job, [(function, job) for job in jobs]))
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                for process in multiprocessing.active_children():
                    process.terminate()
                raise

        yield run


_busy = False  # (in a worker) a job is running: a SIGTERM raises in it; between jobs it is only recorded


def _worker_started() -> None:
    signal.signal(signal.SIGTERM, _worker_handler)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.unraisablehook = _unraisable


def _worker_handler(signum, frame):
    global _pending
    _pending = Terminated()
    if _busy:
        raise Terminated()


def _worker_job(call):
    """A job in a worker; none begins once the worker was told to stop (the pool hands a worker
    its next job before the last one ends, so one may be waiting)."""
    global _busy
    function, job = call
    raise_pending()
    _busy = True
    try:
        return function(job)
    finally:
        _busy = False
