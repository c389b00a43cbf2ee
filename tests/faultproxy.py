"""A TCP proxy on 127.0.0.1 that can make the service behind it go away for a while: what a test puts between
raydc and the S3 server (tests/s3server.py) to play an object-store outage, with no new service.

Modes while an outage lasts:
* "drop": open connections are reset and new ones are accepted and reset at once (a load balancer that lost
  its backends, a restarting server);
* "stall": new connections are accepted and then nothing comes back until the outage ends (a network
  partition, a hung server): only the client's own timeouts end the wait.
"""
from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._mode = "ok"
        self._until = 0.0
        self._open: set[socket.socket] = set()
        self._stalled: list[socket.socket] = []
        self.refused = 0                  # connections turned away during outages
        self._armed: tuple[float, str] | None = None
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="faultproxy").start()

    # ---- control ----------------------------------------------------------------------------------
    def outage(self, seconds: float, mode: str = "drop") -> None:
        """From now for `seconds`: the service is gone (`mode`, see the module docstring). Returns at once."""
        assert mode in ("drop", "stall")
        with self._lock:
            self._mode, self._until = mode, time.monotonic() + seconds
            victims = list(self._open) if mode == "drop" else []
        for s in victims:
            _reset(s)

    def outage_at_next_connection(self, seconds: float, mode: str = "drop") -> None:
        """The same, starting when the next connection arrives: an outage that surely meets the client, however
        long it takes to get there."""
        self._armed = (seconds, mode)

    @property
    def down(self) -> bool:
        with self._lock:
            if self._mode != "ok" and time.monotonic() >= self._until:
                self._mode = "ok"
                for s in self._stalled:
                    _reset(s)
                self._stalled.clear()
            return self._mode != "ok"

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in list(self._open) + self._stalled:
            _reset(s)

    # ---- plumbing ---------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._armed is not None:
                self.outage(*self._armed)
                self._armed = None
            if self.down:
                self.refused += 1
                with self._lock:
                    stall = self._mode == "stall"
                    if stall:
                        self._stalled.append(client)
                if not stall:
                    _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()


def _reset(s: socket.socket) -> None:
    """Close with RST rather than FIN: the peer sees "connection reset", as when a server dies."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()


@contextlib.contextmanager
def fault_proxy(endpoint: str) -> Iterator[FaultProxy]:
    host, port = endpoint.split("://", 1)[-1].rsplit(":", 1)
    proxy = FaultProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.close()
