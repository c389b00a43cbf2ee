"""raydc.storage against a local directory and a real S3 server (moto over HTTP, see tests/s3server.py)."""
from __future__ import annotations

import os
import socket
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raydc import storage
from raydc.errors import DataError, UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """An empty directory: under tmp_path, or a fresh prefix in the test bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_server").uri(f"t-{uuid.uuid4().hex[:8]}")


def _closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # free once the socket closes: nothing listens


def _no_temporaries(location: str) -> bool:
    fs, path = storage.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return not [i.path for i in infos if ".tmp-" in i.base_name]


# --- locations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s, expected", [("s3://b/k", True), ("gs://b", True), ("file:///x", True),
                                         ("/data/x", False), ("rel/x", False), ("./a://b", False), ("", False)])
def test_is_uri(s, expected):
    assert storage.is_uri(s) is expected


@pytest.mark.parametrize("base, parts, expected", [
    ("s3://b", ("x", "y.parquet"), "s3://b/x/y.parquet"),
    ("s3://b/run/", ("/ckpt/", "m.pt"), "s3://b/run/ckpt/m.pt"),  # Path() would collapse s3:// to s3:/
    ("file:///", ("tmp",), "file:///tmp"),
    ("/data/run", ("a", "", "b"), "/data/run/a/b"),
    ("rel", ("/a",), "rel/a"),  # parts are relative: never a jump to /a
])
def test_join(base, parts, expected):
    assert storage.join(base, *parts) == expected


def test_resolve_local_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for location, expected in [("rel/x", tmp_path / "rel" / "x"), ("~/y", tmp_path / "home" / "y"),
                               (f"file://{tmp_path}/z", tmp_path / "z")]:
        fs, path = storage.resolve(location)
        assert fs.type_name == "local" and path == str(expected)


def test_s3_keys_are_literal(s3_server):
    fs, path = storage.resolve(s3_server.uri("a b/c%20d"))
    assert path == f"{s3_server.bucket}/a b/c%20d"
    storage.write_text_atomic(s3_server.uri("a b/c%20d"), "ok")
    assert s3_server.client().get_object(Bucket=s3_server.bucket, Key="a b/c%20d")["Body"].read() == b"ok"


def test_s3_region_from_env(s3_server, monkeypatch):
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert storage.resolve(s3_server.uri("x"))[0].region == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")  # AWS_REGION wins, as in the AWS SDKs
    assert storage.resolve(s3_server.uri("x"))[0].region == "ap-south-1"


def test_s3_specific_endpoint_wins(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", _closed_port_endpoint())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    storage.write_bytes_atomic(s3_server.uri("ep/x"), b"1")
    assert storage.read_bytes(s3_server.uri("ep/x")) == b"1"


# --- round trips -------------------------------------------------------------------------------------------


def test_bytes_and_text_round_trip(root):
    storage.write_bytes_atomic(storage.join(root, "a", "b.bin"), b"\x00\xffdata")
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\xffdata"
    storage.write_text_atomic(storage.join(root, "t.json"), "{\"k\": \"ü\"}")
    storage.write_text_atomic(storage.join(root, "t.json"), "{\"k\": \"é\"}")  # replaces
    assert storage.read_text(storage.join(root, "t.json")) == "{\"k\": \"é\"}"
    assert _no_temporaries(root)


def test_exists_and_is_file(root):
    storage.write_bytes_atomic(storage.join(root, "d", "f"), b"x")
    assert storage.exists(storage.join(root, "d")) and not storage.is_file(storage.join(root, "d"))
    assert storage.exists(storage.join(root, "d", "f")) and storage.is_file(storage.join(root, "d", "f"))
    assert not storage.exists(storage.join(root, "nope")) and not storage.is_file(storage.join(root, "nope"))


def test_list_files(root):
    for name in ["b.parquet", "a.parquet", "manifest.json", ".c.parquet.tmp-1", "sub/d.parquet"]:
        storage.write_bytes_atomic(storage.join(root, name), b"x")
    assert storage.list_files(root, suffix=".parquet") == [storage.join(root, "a.parquet"),
                                                           storage.join(root, "b.parquet")]
    assert storage.list_files(root + "/") == [storage.join(root, n) for n in ["a.parquet", "b.parquet",
                                                                              "manifest.json"]]
    with pytest.raises(storage.NotFound, match="no such file or directory"):
        storage.list_files(storage.join(root, "missing"))


def test_makedirs_and_delete_dir(root):
    storage.makedirs(storage.join(root, "run", "ckpt"))
    assert storage.exists(storage.join(root, "run", "ckpt"))
    storage.write_bytes_atomic(storage.join(root, "run", "ckpt", "m.pt"), b"x")
    storage.write_bytes_atomic(storage.join(root, "keep"), b"x")
    storage.delete_dir(storage.join(root, "run"))
    assert not storage.exists(storage.join(root, "run")) and storage.exists(storage.join(root, "keep"))
    storage.delete_dir(storage.join(root, "run"))  # already gone: no error


def test_delete_dir_refuses_a_bucket_or_root(s3_server):
    storage.write_bytes_atomic(s3_server.uri("guard/x"), b"x")
    for location in [f"s3://{s3_server.bucket}", f"s3://{s3_server.bucket}/", "/"]:
        with pytest.raises(DataError, match="refusing"):
            storage.delete_dir(location)
    assert storage.exists(s3_server.uri("guard/x"))


def test_parquet_through_streams(root):
    location = storage.join(root, "shards", "shard-00000.parquet")
    table = pa.table({"id": pa.array(range(30), pa.int64()), "image": pa.array([bytes([i]) * 8 for i in range(30)])})
    with storage.open_output_stream(location) as out, pq.ParquetWriter(out, table.schema) as writer:
        for start in (0, 10, 20):
            writer.write_table(table.slice(start, 10))
    with storage.open_input_file(location) as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == 3
        assert pf.read_row_group(1).column("id").to_pylist() == list(range(10, 20))
        assert pf.read().equals(table)
    assert _no_temporaries(root)


def test_failed_stream_keeps_the_previous_file(root):
    """A bare pyarrow stream would commit the half-written bytes on S3 when the `with` block unwinds."""
    location = storage.join(root, "out.bin")
    storage.write_bytes_atomic(location, b"previous")
    with pytest.raises(RuntimeError, match="writer failed"):
        with storage.open_output_stream(location) as out:
            out.write(b"half")
            raise RuntimeError("writer failed")
    assert storage.read_bytes(location) == b"previous"
    assert storage.list_files(root) == [location] and _no_temporaries(root)


def test_local_atomic_write_survives_a_failed_rename(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    storage.write_text_atomic(str(target), "old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(DataError, match="manifest.json"):
        storage.write_text_atomic(str(target), "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["manifest.json"]


def test_local_atomic_write_keeps_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_bytes_atomic(str(tmp_path / "f"), b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


# --- errors: each names the location and what to do ----------------------------------------------------------


def _error(call, location: str) -> DataError:
    with pytest.raises(DataError) as info:
        call(location)
    assert isinstance(info.value, UserError)  # so the CLI prints it and exits 2
    assert location in str(info.value)
    return info.value


def test_unknown_scheme():
    e = _error(storage.read_bytes, "foo://bucket/x")
    assert "no filesystem for foo://" in str(e)


def test_hdfs_without_java_or_libhdfs(tmp_path, monkeypatch):
    for var in ("JAVA_HOME", "HADOOP_HOME", "ARROW_LIBHDFS_DIR"):  # empty: neither libjvm nor libhdfs loads
        monkeypatch.setenv(var, str(tmp_path))
    assert "JAVA_HOME" in str(_error(storage.exists, "hdfs://namenode:8020/data"))


def test_malformed_file_uri():
    assert "file:///absolute/path" in str(_error(storage.exists, "file://relative/x"))


def test_missing_file(root):
    storage.makedirs(root)
    for call in (storage.read_bytes, storage.open_input_file):
        e = _error(call, storage.join(root, "missing.json"))
        assert isinstance(e, storage.NotFound) and "no such file" in str(e)


@pytest.mark.parametrize("call", [storage.read_bytes, lambda loc: storage.write_bytes_atomic(loc, b"x"),
                                  storage.list_files, storage.makedirs],
                         ids=["read", "write", "list", "makedirs"])
def test_missing_bucket(s3_server, call):
    """Each operation meets a different pyarrow message: a plain missing path, NO_SUCH_BUCKET, a create_dir
    refusal."""
    e = _error(call, "s3://no-such-bucket-raydc/run/x")
    assert isinstance(e, storage.NotFound)
    assert "bucket 'no-such-bucket-raydc' does not exist" in str(e) and s3_server.endpoint in str(e)


def test_missing_credentials(s3_server, monkeypatch):
    # A private object: moto 5.2 lets anyone read objects made by multipart upload (pyarrow's writes).
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="secret", Body=b"x")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    # Unsigned, as the AWS SDK sends when it finds no credentials, and refused. (Not under auth_enforced:
    # there moto 5.2 answers unsigned requests with a 500, a KeyError on the missing Authorization header.)
    e = _error(storage.read_bytes, s3_server.uri("secret"))
    assert "no AWS credentials are set: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in str(e)
    assert "AWS_ENDPOINT_URL" in str(e)


@pytest.mark.parametrize("key", ["unknown", "no-policy"])
def test_access_denied(s3_server, monkeypatch, key):
    storage.write_bytes_atomic(s3_server.uri("secret"), b"x")
    with s3_server.auth_enforced() as (key_id, secret):
        if key == "unknown":
            key_id, secret = "AKIAUNKNOWNKEY000000", "wrong"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        for call in (storage.read_bytes, storage.list_files):
            e = _error(call, s3_server.uri("secret") if call is storage.read_bytes else s3_server.uri())
            assert f"access denied for access key {key_id}" in str(e) and s3_server.endpoint in str(e)


def test_unreachable_endpoint(s3_server, monkeypatch):
    endpoint = _closed_port_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("RAYDC_STORAGE_RETRY_S", "2")  # the default waits a minute before saying so
    e = _error(storage.exists, s3_server.uri("x"))
    assert f"cannot reach {endpoint}" in str(e)
