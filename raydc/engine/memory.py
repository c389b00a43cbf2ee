"""Peak memory of this process, for the scaling benchmark: resident set (VmHWM) and private memory (RssAnon).

Why both: a process that reads blocks from Ray's object store maps the store's shared pages, and the kernel
counts every such page it touched in its resident set until the mapping goes. That is Ray's shared memory,
bounded by the object store's size and shared by every process of the node, not data the process holds; the
private (anonymous) memory is. The kernel keeps a peak of the resident set only, so a sampler thread records
the peak of RssAnon.
"""
from __future__ import annotations

import threading

_FIELDS = {"VmHWM:": "peak_rss", "VmRSS:": "rss", "RssAnon:": "anon"}
_lock = threading.Lock()
_peak_anon = 0
_thread: threading.Thread | None = None


def read_status(pid: int | str = "self") -> dict[str, int]:
    """{peak_rss, rss, anon} in bytes from /proc/<pid>/status (zeros where unavailable)."""
    out = {v: 0 for v in _FIELDS.values()}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0] + ":"
                if key in _FIELDS:
                    out[_FIELDS[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _sample(interval: float) -> None:
    global _peak_anon
    import time

    while True:
        anon = read_status()["anon"]
        with _lock:
            _peak_anon = max(_peak_anon, anon)
        time.sleep(interval)


def start_sampler(interval: float = 0.2) -> None:
    """Start the peak-private-memory sampler of this process once (a daemon thread)."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_sample, args=(interval,), name="raydc-memory", daemon=True)
            _thread.start()


def peak() -> dict[str, int]:
    """{peak_rss, rss, anon, peak_anon} of this process so far (peak_anon since the sampler started)."""
    start_sampler()
    now = read_status()
    with _lock:
        global _peak_anon
        _peak_anon = max(_peak_anon, now["anon"])
        return {**now, "peak_anon": _peak_anon}
