"""The driver's console: every line a worker puts reaches `log`, in order, and nothing else does."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_every_line_arrives_in_order_and_close_adds_nothing(ray_local):
    from raydc.engine.console import Console

    @ray_local.remote(num_cpus=0)
    def say(sink, n: int) -> None:
        for i in range(n):
            sink(f"line {i}")

    got: list[str] = []
    console = Console(got.append)
    ray_local.get(say.remote(console.sink.with_prefix("[w] "), 50))
    console.close()
    assert got == [f"[w] line {i}" for i in range(50)]
    console.close()  # a second close (a finally after an error) is harmless
    assert len(got) == 50
