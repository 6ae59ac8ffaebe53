"""A long-lived helper process that runs checks on model output with a time and memory limit.

Reward sources that hand model-written text to third-party code (sympy through math-verify,
IFEval's regular expressions and language detection) must not let a hostile completion stall
or crash training. :class:`CheckWorker` runs that code in a separate process:

- ``setup(*args)`` runs once in the new process, after its address space is limited to
  ``memory_mb``, and returns the function that answers one request (do the heavy imports
  there: the training process never imports them);
- :meth:`CheckWorker.call` sends one request and waits ``timeout`` seconds for the answer. A
  request that overruns, or that kills the process (out of memory, a crash), gets the
  ``failed`` value back; the process is killed and a new one is started at once, so that its
  imports overlap with the caller's next work. An exception raised by the handler also gives
  ``failed``, and the process keeps serving.
- A process that cannot start (``setup`` raises, for example because a package or a data file
  is missing, or it is not ready within ``startup_seconds``) makes :meth:`call` raise
  ``RuntimeError``: a broken installation must not quietly score every completion 0.

Processes are started with ``spawn`` (no fork of a process holding torch threads) and need no
signals, so calls work from any thread; a lock serialises them. ``setup`` must be a module-level
function (it is pickled by name).
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any, Callable


def _serve(conn, memory_mb: int, setup: Callable, args: tuple, failed: Any) -> None:  # the worker process
    import resource

    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        handle = setup(*args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = handle(request)
        except Exception:  # noqa: BLE001 - MemoryError included: a check that fails scores `failed`
            reply = failed
        conn.send(reply)


class CheckWorker:
    """One checking process, started on first use and replaced whenever a check overruns."""

    def __init__(self, setup: Callable, args: tuple = (), *, memory_mb: int = 2048, failed: Any = None,
                 startup_seconds: float = 120.0, name: str = "checking"):
        self.setup = setup
        self.args = tuple(args)
        self.memory_mb = memory_mb
        self.failed = failed
        self.startup_seconds = startup_seconds
        self.name = name
        self.process = None
        self.conn = None
        self.ready = False
        self.lock = threading.Lock()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, self.memory_mb, self.setup, self.args, self.failed),
                                   daemon=True, name=f"posttrain-{self.name}")
        self.process.start()
        child.close()
        self.conn = parent
        self.ready = False

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join(timeout=5)
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None
        self.ready = False

    def _wait_until_ready(self) -> None:
        problem = None
        try:
            if self.conn.poll(self.startup_seconds):
                status, detail = self.conn.recv()
                if status == "ready":
                    self.ready = True
                    return
                problem = f"failed to start: {detail}"
            else:
                problem = f"was not ready within {self.startup_seconds:g} s"
        except (EOFError, OSError):
            problem = f"died while starting (exit code {self.process.exitcode})"
        self._kill()
        raise RuntimeError(f"the {self.name} process {problem}")

    def call(self, request: Any, timeout: float) -> Any:
        """The handler's answer to ``request``, or ``failed`` when it takes over ``timeout`` seconds or dies."""
        with self.lock:
            if self.process is None or not self.process.is_alive():
                self._kill()
                self._start()
            if not self.ready:
                self._wait_until_ready()
            try:
                self.conn.send(request)
                if self.conn.poll(timeout):
                    return self.conn.recv()
            except (EOFError, BrokenPipeError, OSError):  # the process died (e.g. out of memory)
                pass
            self._kill()
            self._start()  # the replacement gets ready while the caller carries on
            return self.failed

    def close(self) -> None:
        with self.lock:
            self._kill()
