"""One writer per run directory (raydc.engine.lease): a second writer is refused and told who holds the
directory, a holder that stopped heartbeating is taken over, and of two processes taking over the same stale
lease only one wins; on local disk and on the S3 server (tests/s3server.py), whose conditional PutObject
(If-None-Match / If-Match) moto 5.2.5 honours as AWS does."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from raydc.engine.lease import LeaseHeld, LeaseLost, RunLease, lease_location
from tests.conftest import REPO


@pytest.fixture(params=["local", "s3"])
def run_location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "a")
    server = request.getfixturevalue("s3_server")
    return server.uri(f"leases/{request.node.name.replace('[', '-').rstrip(']')}-{time.monotonic_ns()}/a")


def _lease(loc: str, timeout: float = 30.0, log=None, **kw) -> RunLease:
    return RunLease(loc, timeout, log=(log if log is not None else (lambda m: None)), **kw)


def test_lease_sits_beside_the_run_directory():
    assert lease_location("s3://b/runs/dc/") == "s3://b/runs/.dc.lease"
    assert lease_location("/x/runs/dc") == "/x/runs/.dc.lease"


def test_a_second_writer_is_refused_naming_the_holder_until_the_first_releases(run_location):
    a, b = _lease(run_location), _lease(run_location)
    a.acquire()
    try:
        with pytest.raises(LeaseHeld) as e:
            b.acquire()
        msg = str(e.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in msg and "since " in msg, msg
        assert "run.lease_timeout_s=30s" in msg and "\n" not in msg, msg
    finally:
        a.release()
    b.acquire()  # given back: no wait for the timeout
    b.release()


def test_the_heartbeat_keeps_a_lease_alive_past_its_timeout(run_location):
    # A 2 s timeout: a heartbeat every 0.5 s, so only a stall of the heartbeat thread over 2 s (the suite's heaviest
    # load once stalled it past a 1 s timeout) lets the lease look stale.
    with _lease(run_location, timeout=2.0).held():
        time.sleep(4.0)  # eight heartbeats; without them the lease would be 4 s old, twice the timeout
        with pytest.raises(LeaseHeld):
            _lease(run_location, timeout=2.0).acquire()


def test_a_stale_lease_is_taken_over_and_logged_and_its_old_holder_learns_it(run_location):
    a = _lease(run_location, timeout=1.0)
    a.acquire()  # no heartbeat thread: a writer killed with SIGKILL
    time.sleep(2.2)  # S3's Last-Modified has 1 s resolution
    logged: list[str] = []
    b = _lease(run_location, timeout=1.0, log=logged.append)
    b.acquire()
    assert len(logged) == 1 and "took over the lease" in logged[0] and f"pid {os.getpid()}" in logged[0], logged
    with pytest.raises(LeaseLost, match="taken over"):
        a.renew()  # the old writer, back from a pause, stops instead of writing beside the new one
    a.release()  # not its lease any more: deletes nothing
    with pytest.raises(LeaseHeld):
        _lease(run_location, timeout=1.0).acquire()
    b.release()


def test_a_lease_whose_process_is_gone_from_this_host_is_taken_at_once(run_location, tmp_path):
    """`kill -9` of a run, then `--resume` right away: the holder's pid no longer exists on this host, so the
    lease is taken without waiting out the heartbeat timeout. A holder on another host still needs it."""
    holder = subprocess.run([sys.executable, "-c", (
        "import os, sys; from raydc.engine.lease import RunLease; "
        "RunLease(sys.argv[1], 600.0, log=lambda m: None).acquire(); os._exit(0)"), run_location],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert holder.returncode == 0
    logged: list[str] = []
    b = _lease(run_location, timeout=600.0, log=logged.append)
    b.acquire()  # the lease is seconds old, its timeout 10 minutes
    assert len(logged) == 1 and "its process is gone from this host" in logged[0], logged
    b.release()
    from raydc.engine.lease import Holder

    gone = Holder(socket.gethostname(), 2**22 + 7, None, 0.0, 0.0, "t")  # above the kernel's pid_max default
    assert gone.dead_here() and not Holder("another-host", gone.pid, None, 0.0, 0.0, "t").dead_here()


def test_the_heartbeat_thread_reports_a_lost_lease(run_location):
    lost = threading.Event()
    a = _lease(run_location, timeout=0.8, on_lost=lost.set)
    a.acquire()
    time.sleep(1.8)
    b = _lease(run_location, timeout=0.8)
    b.acquire()
    a.start_heartbeat()  # its next renewal finds b's lease
    assert lost.wait(10) and a.lost is not None and a.lost.token == b.token
    b.release()


def test_of_two_writers_taking_over_one_stale_lease_exactly_one_wins(run_location):
    """Four takers at once on one stale lease. Locally this once let two win (a takeover renamed the lock
    aside, and a taker's create slipped into the gap); on S3 the conditional write decides."""
    stale = _lease(run_location, timeout=1.0)
    stale.acquire()
    time.sleep(6.5)  # older than the takers' 4 s by more than S3's whole-second Last-Modified and Date
    # Staleness is judged by each taker's own timeout: 4 s, so the winner's fresh lease cannot itself go stale
    # while the others (threads on a loaded machine) are still looking at it.
    takers = [_lease(run_location, timeout=4.0) for _ in range(4)]
    results: list[str] = []
    go = threading.Barrier(len(takers))

    def take(lease: RunLease) -> None:
        go.wait()
        try:
            lease.acquire()
            results.append("won")
        except LeaseHeld:
            results.append("refused")

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["refused"] * 3 + ["won"], results
    for t in takers:
        t.release()


def test_a_second_train_overwrite_on_a_held_directory_exits_2_and_deletes_nothing(tmp_path, mnist_root):
    """The CLI, as a user hits it: the lease is taken before Ray starts (and before --overwrite deletes), so the
    refusal needs no Ray. A plain second `train --resume` beside a live run: tests/test_cli_run.py."""
    from raydc.data.prepare import prepare

    shards = tmp_path / "shards"
    prepare("mnist", shards, root=str(mnist_root), split="test", limit=100, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0}\n')
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS="127.0.0.1:1")  # no Ray needed, none reached
    with _lease(str(run), timeout=30).held():
        p = subprocess.run([sys.executable, "-m", "raydc.cli", "train", f"--set=data.shards={shards}",
                            f"--set=run.dir={run}", "--set=cluster.k=4", "--set=train.batch_size=50", "--overwrite"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("raydc: error: run directory"), p.stderr
        assert f"pid {os.getpid()}" in err[0] and "wait for it to end" in err[0], err[0]
        assert (run / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert not os.path.exists(lease_location(str(run)))


def test_a_renewal_whose_reply_was_lost_is_still_ours(run_location):
    """A renewal that reached the store but whose answer a dropped connection lost leaves this writer with an
    old tag; the next renewal's compare-and-swap fails, and the lease must not be mistaken for lost."""
    a = _lease(run_location)
    a.acquire()
    stale_tag = a._tag
    a.renew()
    a._tag = stale_tag  # as if the reply of the renewal above had never come
    a.renew()
    assert a.lost is None
    with pytest.raises(LeaseHeld):
        _lease(run_location).acquire()
    a.release()


def test_a_local_swap_never_leaves_the_lock_name_free_for_a_taker(tmp_path, monkeypatch):
    """The interleaving behind two winners, forced: after every rename a swap makes, a taker tries `create`.
    A swap that moved the lock aside (and put it back when it was not the lease it judged) let that taker in."""
    import raydc.engine.lease as lease_mod

    def body(token: str) -> bytes:
        return lease_mod.Holder.here(token).to_json()

    store = lease_mod._LocalStore(str(tmp_path / ".a.lease"))
    assert store.create(body("first")) == "first"
    slipped_in: list[str] = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def renamed_then_a_taker_tries(src, dst, _real=real, _name=name):
            _real(src, dst)
            if lease_mod._LocalStore(store.path).create(body("taker")) is not None:
                slipped_in.append(_name)

        monkeypatch.setattr(lease_mod.os, name, renamed_then_a_taker_tries)
    assert store.swap("not-the-lock's-tag", body("second")) is None
    assert store.swap("first", body("second")) == "second"
    assert not slipped_in and store.read().tag == "second"
