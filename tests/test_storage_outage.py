"""The object store going away and coming back: raydc's S3 filesystem, in front of the S3 server through a
fault-injecting proxy (tests/faultproxy.py), waits out an outage shorter than RAYDC_STORAGE_RETRY_S with
nothing lost and fails a longer one with a one-line `DataError` that names the store and the resume hint,
leaving the previous object whole. A whole run through an outage: tests/test_faults_run.py (slow)."""
from __future__ import annotations

import pickle
import time

import pytest

from raydc import storage
from raydc.errors import DataError
from tests.faultproxy import fault_proxy


@pytest.fixture
def proxied(s3_server, monkeypatch):
    """The AWS variables point at a proxy in front of the session's S3 server for this test."""
    with fault_proxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield proxy, s3_server


def test_retry_attempts_cover_the_budget_and_at_most_about_twice_it():
    for budget in (0.5, 1, 5, 60, 600):
        n = storage.retry_attempts(budget)
        waits = sum(0.025 * 2 ** i for i in range(1, n))  # the SDK's default strategy, retries 1..n-1
        assert budget <= waits <= 2 * budget + 0.1, (budget, n, waits)
    assert storage.retry_attempts(0) == 1


@pytest.mark.parametrize("mode", ["drop", "stall"])
def test_a_short_outage_costs_a_wait_and_nothing_else(proxied, monkeypatch, mode):
    proxy, server = proxied
    monkeypatch.setenv(storage.RETRY_ENV, "20")
    loc = server.uri(f"outage/short-{mode}/metrics.jsonl")
    storage.write_text_atomic(loc, "round 0\n")
    proxy.outage(2.0, mode)
    t0 = time.monotonic()
    storage.write_text_atomic(loc, "round 0\nround 1\n")  # a write, then a read, through the outage
    assert storage.read_text(loc) == "round 0\nround 1\n"
    if mode == "drop":
        assert proxy.refused > 0 and time.monotonic() - t0 >= 1.5  # it did wait the outage out


def test_a_filesystem_handed_to_ray_keeps_its_retries_when_pickled(proxied, monkeypatch):
    """Ray Data's read tasks and Ray Train's checkpoint uploads get the filesystem pickled; pyarrow's own
    pickling drops `retry_strategy`, and its default gives up within a second."""
    proxy, server = proxied
    monkeypatch.setenv(storage.RETRY_ENV, "20")
    fs, path = storage.resolve(server.uri("outage/pickled/state.pt"))
    fs = pickle.loads(pickle.dumps(fs))
    proxy.outage(2.0, "drop")
    with fs.open_output_stream(path) as f:
        f.write(b"checkpoint")
    assert proxy.refused > 0
    assert server.client().get_object(Bucket=server.bucket, Key="outage/pickled/state.pt")["Body"].read() == \
        b"checkpoint"


def test_a_long_outage_fails_with_one_line_naming_the_store_and_keeps_the_old_object(proxied, monkeypatch):
    proxy, server = proxied
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    loc = server.uri("outage/long/metrics.jsonl")
    storage.write_text_atomic(loc, "round 0\n")
    proxy.outage(60.0, "drop")
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        storage.write_text_atomic(loc, "round 0\nround 1\n")
    took = time.monotonic() - t0
    msg = str(e.value)
    assert 1.0 <= took < 20, took
    assert "\n" not in msg and loc in msg and proxy.endpoint in msg, msg
    assert f"{storage.RETRY_ENV}=1s" in msg and "--resume" in msg, msg
    proxy.outage(0, "drop")  # back
    assert storage.read_text(loc) == "round 0\n"  # the old content, whole


def test_a_bad_retry_budget_names_the_variable(monkeypatch):
    monkeypatch.setenv(storage.RETRY_ENV, "soon")
    with pytest.raises(DataError, match=storage.RETRY_ENV):
        storage.retry_budget_s()


def test_prepare_to_s3_waits_out_a_short_outage(proxied, monkeypatch, mnist_root):
    """`raydc prepare --out s3://...` while the store is away for a moment: the same shards as without."""
    from raydc.data.manifest import load_manifest, verify_shards
    from raydc.data.prepare import prepare

    proxy, server = proxied
    monkeypatch.setenv(storage.RETRY_ENV, "20")
    out = server.uri("outage/prepare")
    proxy.outage_at_next_connection(2.0, "drop")
    prepare("mnist", out, root=str(mnist_root), split="test", limit=200, rows_per_shard=100, progress=False)
    assert proxy.refused > 0
    manifest = load_manifest(out)
    assert manifest.count == 200 and len(manifest.shards) == 2
    verify_shards(manifest, out)  # every shard whole: its sha256 as the manifest recorded it


def test_ray_trains_own_upload_through_an_outage_becomes_the_same_one_line(monkeypatch):
    from ray.train import ControllerError

    from raydc.engine.trainer import _user_cause

    monkeypatch.setenv(storage.RETRY_ENV, "5")
    err = ControllerError(OSError("When uploading part for key 'runs/x/checkpoints/fit-000/x/state.pt': AWS Error "
                                  "NETWORK_CONNECTION during UploadPart operation: curlCode: 7, Could not connect"))
    cause = _user_cause(err, "s3://b/runs/x")
    assert isinstance(cause, DataError) and str(cause).startswith("s3://b/runs/x: cannot reach"), cause
    assert "RAYDC_STORAGE_RETRY_S=5s" in str(cause) and "--resume" in str(cause)
