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
signals, so calls work from any thread; a lock serialises the calls to one process. ``setup``
must be a module-level function (it is pickled by name).

:class:`CheckPool` holds several such processes, so that one request that runs into its time
limit does not hold up the others: :meth:`CheckPool.map` answers a batch of requests in parallel
across the pool, in the batch's order, and :meth:`CheckPool.call` answers one request on a free
process.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
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

    def start(self) -> None:
        """Start the process if it is not running, and wait until it is ready (RuntimeError if it cannot)."""
        with self.lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        """(Under the lock.) A live, ready process: a dead one is replaced."""
        if self.process is None or not self.process.is_alive():
            self._kill()
            self._start()
        if not self.ready:
            self._wait_until_ready()

    def answers_now(self) -> bool:
        """Whether the process is ready, or has said how its start went (no waiting, nothing read)."""
        if self.ready:
            return True
        try:
            return self.conn is not None and self.conn.poll(0)
        except (EOFError, OSError):
            return True  # it died: the next call finds out at once and starts a new one

    def call(self, request: Any, timeout: float) -> Any:
        """The handler's answer to ``request``, or ``failed`` when it takes over ``timeout`` seconds or dies."""
        with self.lock:
            self._ensure_started()
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


class CheckPool:
    """``size`` checking processes (:class:`CheckWorker`), each started on first use.

    :meth:`call` answers one request on a free process (preferring one that is ready over one
    still starting), waiting for one to be free; :meth:`map` answers a batch, ``size`` requests at
    a time, in the batch's order. A request that overruns costs its own process ``timeout``
    seconds while the other processes carry on with the rest of the batch.
    """

    def __init__(self, setup: Callable, args: tuple = (), *, size: int = 1, memory_mb: int = 2048,
                 failed: Any = None, startup_seconds: float = 120.0, name: str = "checking"):
        if size < 1:
            raise ValueError("a pool needs at least one process")
        self.size = size
        self.failed = failed
        self.workers = [CheckWorker(setup, args, memory_mb=memory_mb, failed=failed, startup_seconds=startup_seconds,
                                    name=name if size == 1 else f"{name}-{i}") for i in range(size)]
        self._idle = list(self.workers)
        self._free = threading.Condition()

    def _acquire(self) -> CheckWorker:
        with self._free:
            while not self._idle:
                self._free.wait()
            worker = next((w for w in self._idle if w.answers_now()), self._idle[0])
            self._idle.remove(worker)
            return worker

    def _release(self, worker: CheckWorker) -> None:
        with self._free:
            self._idle.append(worker)
            self._free.notify()

    def call(self, request: Any, timeout: float) -> Any:
        """The answer to ``request`` from a free process, or ``failed`` (see :meth:`CheckWorker.call`)."""
        worker = self._acquire()
        try:
            return worker.call(request, timeout)
        finally:
            self._release(worker)

    def map(self, requests: list, timeout: float) -> list:
        """The answers to ``requests``, in their order, checked in parallel across the pool."""
        requests = list(requests)
        if self.size == 1 or len(requests) <= 1:
            return [self.call(request, timeout) for request in requests]
        with ThreadPoolExecutor(max_workers=min(self.size, len(requests)), thread_name_prefix="posttrain-check") as ex:
            return list(ex.map(lambda request: self.call(request, timeout), requests))

    def start(self) -> None:
        """Start every process at once and wait until all are ready (RuntimeError if one cannot start)."""
        for worker in self.workers:
            with worker.lock:
                if worker.process is None or not worker.process.is_alive():
                    worker._kill()
                    worker._start()
        for worker in self.workers:
            worker.start()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
