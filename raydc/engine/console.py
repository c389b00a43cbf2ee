"""The run's own lines, from the Train workers (or a sweep's trial actors) to the driver's console.

A run's output is one line per round, written on rank 0 of the Train workers. Ray's way to show a worker's
stdout on the driver (`log_to_driver`) shows everything else too: Ray Train's controller, Ray Data, faiss and
every actor's output, each line prefixed with `(RayTrainWorker pid=...)`. Ray has no public filter on what it
forwards, so a quiet run turns forwarding off (`ray.init(log_to_driver=False)`) and sends its own lines
through a `ray.util.queue.Queue` instead: the workers put, a thread in the driver takes and hands each line to
the caller's `log` (print for the CLI, a list or a logger for the Python API). `--verbose` keeps Ray's own
forwarding and needs no queue: the workers print and Ray shows it all, prefixed.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class LineSink:
    """What a worker writes its lines to: picklable, so it travels in `train_loop_config` or a Tune trial's
    parameters. Without a queue (verbose, or no driver listening) a line is printed, for Ray to forward."""

    queue: Any = None
    prefix: str = ""

    def __call__(self, msg: str) -> None:
        line = self.prefix + msg
        if self.queue is None:
            print(line, flush=True)
            return
        try:
            self.queue.put_nowait(line)
        except Exception:  # the driver is gone (a detached worker finishing): the line still lands in its log
            print(line, flush=True)

    def with_prefix(self, prefix: str) -> "LineSink":
        return LineSink(self.queue, self.prefix + prefix)


@dataclass(frozen=True)
class _EndOfLines:
    """Put by `Console.close` behind every line the workers put: the driver's thread stops when it takes it."""


class Console:
    """The driver's end: a queue actor (no CPU reserved) and a daemon thread that hands every line to `log`, in
    the order each worker put them. `close` hands over what is left, then removes the actor.

    The thread waits inside the queue actor's `get` (an asyncio wait there, no polling): a short timeout would
    be a remote call several times a second for the whole run, in the driver and in the queue actor, which on a
    loaded machine cost more CPU than the run's own output. `close` ends the wait with an end marker."""

    def __init__(self, log: Callable[[str], Any], poll_s: float = 30.0):
        from ray.util.queue import Queue

        self._log, self._poll_s = log, poll_s
        self._queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="raydc-console", daemon=True)
        self._thread.start()

    @property
    def sink(self) -> LineSink:
        return LineSink(self._queue)

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                line = self._queue.get(block=True, timeout=self._poll_s)
            except Empty:
                continue
            except Exception:  # Ray shut down under us: nothing more can arrive
                return
            if isinstance(line, _EndOfLines):
                return
            self._log(line)

    def close(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(_EndOfLines())  # FIFO: behind every line already put
        except Exception:  # Ray already shut down: the thread has returned or will on its next get
            pass
        self._thread.join(timeout=10)
        try:
            for line in self._queue.get_nowait_batch(self._queue.qsize()):
                if not isinstance(line, _EndOfLines):
                    self._log(line)
            self._queue.shutdown()
        except Exception:  # Ray already shut down: the actor went with it
            pass

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_console(log: Callable[[str], Any], quiet: bool) -> Console | None:
    """A console when Ray does not forward worker output (quiet); None when it does (verbose)."""
    return Console(log) if quiet else None
