"""Ray Data's Parquet reader that plans once.

Ray 2.60's default Parquet reader (datasource V2) starts 32 footer-reading actors on every execution: every epoch,
every feature pass, every distributed prepare; seconds of process start-up each on a small node. The V1 reader
plans once, when the Dataset is built: it lists the files on the driver and reads a bounded sample of footers in
tasks to size its blocks. Ray reads the flag at that point, so it is set only around the `read_parquet` call and
the caller's DataContext is left as it was."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def planned_once() -> Iterator[None]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before
