"""Where raydc reads shards and writes runs: local paths and object-store URIs (s3://, gs://, file://).

Every helper takes a location string, because that is what config fields hold and what crosses to Ray workers.
Local paths keep POSIX guarantees (temporary file, fsync, rename); object stores get the nearest equivalent, an
object that appears whole or not at all. Failures become `DataError`s that name the location and say what to
set, since pyarrow's own messages ("AWS Error ACCESS_DENIED during HeadObject operation: No response body")
name neither.

raydc takes S3 settings from the standard AWS environment variables and from nowhere else: no config field
holds an endpoint or a key, so credentials stay out of configs and run directories, and Ray workers get them
through `runtime_env={"env_vars": ...}`.

* `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`: a non-AWS server (MinIO, Ceph, moto). With either set the
  filesystem is built here, its region `AWS_REGION`, else `AWS_DEFAULT_REGION`, else us-east-1: pyarrow 26's
  `FileSystem.from_uri` reads both variables, but `S3FileSystem()` reads neither (apache/arrow#49643), and
  releases before apache/arrow#39160 (January 2024; pyarrow>=15 still admits them) ignore `AWS_ENDPOINT_URL_S3`.
* Without an endpoint, `from_uri` asks AWS where the bucket lives (a HeadBucket, cached below), so a
  bucket outside `AWS_REGION` still works.
* Credentials are left to the AWS SDK's chain, which starts with `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
  `AWS_SESSION_TOKEN` and goes on to `AWS_PROFILE` and an instance role.
* `RAYDC_STORAGE_RETRY_S` (default 60): how long an S3 request is retried, with exponential backoff, while
  the store is unreachable (connection refused or reset, a stalled response, 5xx). Retries happen inside the
  S3 client, so every request of every process is covered: raydc's own reads and writes, Ray Data's shard
  reads and Ray Train's checkpoint uploads (the filesystem handed to them keeps its retries when pickled to a
  worker, which pyarrow's own does not). An outage shorter than this costs a wait; a longer one fails the
  request with a `DataError` that names the store, and the run stops at its last checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from raydc.errors import DataError

__all__ = ["NotFound", "is_uri", "resolve", "join", "exists", "is_file", "read_bytes", "read_text",
           "write_bytes_atomic", "write_text_atomic", "open_input_file", "open_output_stream", "list_files",
           "list_dirs", "list_entries", "delete_dir", "makedirs"]

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
# Any of these lets the AWS SDK find credentials without AWS_ACCESS_KEY_ID.
_AWS_CREDENTIAL_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                           "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
RETRY_ENV = "RAYDC_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 60.0
_FIRST_BACKOFF_S = 0.05  # the AWS SDK's default strategy waits 25 ms * 2^n before retry n (n >= 1)
_OBJECT_STORES = ("s3", "gcs")  # pyarrow type_name of filesystems whose first path segment is a bucket
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "HTTP status 403",
           "EXPIRED_TOKEN", "PERMISSION_DENIED", "UNAUTHENTICATED")


class NotFound(DataError):
    """The file, directory or bucket is not there: a separate class so callers can treat "nothing yet"
    (no checkpoint to resume) differently from a store they cannot use."""


def is_uri(s: str) -> bool:
    """`scheme://...`. Stricter than "contains ://", so a local file named `a://b` stays a path."""
    return _URI.match(s) is not None


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `location` and the path to hand it.

    Local paths come back absolute (relative to the current directory, `~` expanded): pyarrow's
    LocalFileSystem wants absolute paths, and raydc.engine.paths has already applied RAYDC_BASE_DIR to config
    fields, so a relative path here means the caller's own working directory. An s3:// key is taken as
    written (a space or "%" is part of the key); other URIs are parsed, and percent-decoded, by pyarrow."""
    m = _URI.match(location)
    if m is None:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    if m.group(1).lower() == "s3":
        bucket = location[m.end():].split("/", 1)[0]
        if not bucket:
            raise DataError(f"{location}: an S3 URI needs a bucket, as in s3://BUCKET/prefix")
        with _translated(location):
            fs = _s3_filesystem(bucket, tuple(os.environ.get(k) for k in _S3_ENV), retry_budget_s())
        return fs, location[m.end():].rstrip("/")
    with _translated(location):
        return pafs.FileSystem.from_uri(location)


def join(location: str, *parts: str) -> str:
    """`location` extended by `parts`, kept in its own form: a URI stays a URI (`Path("s3://b/x")` would give
    `s3:/b/x`). Parts are always relative; their outer slashes are dropped."""
    rel = [p.strip("/") for p in parts if p.strip("/")]
    m = _URI.match(location)
    if m is None:
        return os.path.join(location, *rel)
    rest = location[m.end():].rstrip("/")
    return f"{location[:m.end()]}{'/'.join([rest, *rel])}"


def exists(location: str) -> bool:
    """True for a file or a directory (on object stores: a prefix with objects under it). A bucket that does not
    exist is False here; reads and writes say so by name."""
    fs, path = resolve(location)
    with _translated(location, fs, path):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = resolve(location)
    with _translated(location, fs, path):
        return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with _translated(location, fs, path), fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Readers see the old content or the new, never part of it, even if this process dies midway.

    Local: a temporary file beside the target, fsync, `os.replace`, fsync of the directory (else the rename
    may not survive a power cut). Object stores: an upload with the whole payload already in hand becomes
    visible only when it completes, so it is written in place."""
    fs, path = resolve(location)
    if fs.type_name == "local":
        with _translated(location, needed=len(data)):
            _write_local_atomic(path, data)
        return
    with _translated(location, fs, path), fs.open_output_stream(path) as f:
        f.write(data)


def write_text_atomic(location: str, text: str) -> None:
    write_bytes_atomic(location, text.encode("utf-8"))


def open_input_file(location: str) -> pa.NativeFile:
    """A random-access file, what `pyarrow.parquet.ParquetFile` needs to read the footer and then only the row
    groups asked for (ranged GETs on object stores). The caller closes it. Errors while reading it later are
    pyarrow's own."""
    fs, path = resolve(location)
    with _translated(location, fs, path):
        return fs.open_input_file(path)


@contextlib.contextmanager
def open_output_stream(location: str) -> Iterator[pa.NativeFile]:
    """A stream to write `location`, published only when the `with` block ends without an exception.

    Closing a pyarrow output stream always commits, and a `with` block closes it on an exception too: on S3 a
    ParquetWriter that fails halfway would leave a truncated object in place of the previous one. So the
    stream goes to a hidden temporary sibling (`.NAME.tmp-...`, skipped by `list_files`) that replaces the
    target on success (local: fsync and rename; object stores: a server-side copy, itself atomic) and is
    deleted either way. Errors raised while writing are the writer's own."""
    fs, path = resolve(location)
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    local = fs.type_name == "local"
    with _translated(location, fs, path):
        if local:
            fs.create_dir(parent, recursive=True)
        stream = fs.open_output_stream(tmp)
    try:
        try:
            yield stream
        except OSError as e:  # the writer's own errors stay its own, but for a full disk, said in one line
            if e.errno in _FULL:
                raise no_space_error(location) from e
            raise
        with _translated(location, fs, path):
            stream.close()
            if local:
                _fsync(tmp)
                os.replace(tmp, path)
                _fsync(parent, strict=False)
            else:
                fs.copy_file(tmp, path)
    finally:
        with contextlib.suppress(OSError, pa.ArrowException):
            stream.close()
        with contextlib.suppress(OSError, pa.ArrowException):
            fs.delete_file(tmp)


def list_files(location: str, suffix: str | None = None) -> list[str]:
    """The files directly in directory `location` (not below it), sorted by name, as locations in the same form.

    Names starting with "." are left out: they are temporaries of an unfinished write (see
    `open_output_stream`). A missing directory raises `NotFound`: on an object store an empty prefix and a
    mistyped one look alike, so silence would hide the typo."""
    fs, path = resolve(location)
    with _translated(location, fs, path):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.File and not i.base_name.startswith(".")
                   and (suffix is None or i.base_name.endswith(suffix)))
    return [join(location, n) for n in names]


def list_dirs(location: str, prefix: str = "") -> list[str]:
    """The directories directly in `location` whose names start with `prefix`, sorted by name, as locations in
    the same form (on object stores: the common prefixes one level down). A missing directory gives []."""
    fs, path = resolve(location)
    with _translated(location, fs, path):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))
    return [join(location, n) for n in names]


def list_entries(location: str) -> list[str]:
    """The names directly in directory `location`, files and directories alike ([] when it is missing): what
    tells an empty directory, which a run may start in, from a used one."""
    fs, path = resolve(location)
    with _translated(location, fs, path):
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def delete_dir(location: str) -> None:
    """Delete a directory and everything below it; nothing to delete is not an error (`--overwrite` of a run
    that was never started). A filesystem root or a whole bucket is refused: no run directory is one."""
    fs, path = resolve(location)
    top = path.strip("/")
    if not top or (fs.type_name in _OBJECT_STORES and "/" not in top):
        raise DataError(f"{location}: refusing to delete a whole filesystem or bucket; give a directory in it")
    with _translated(location, fs, path):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def makedirs(location: str) -> None:
    """Create a directory and its parents. On object stores this writes marker objects, so an empty run
    directory already `exists`, and fails by name when the bucket does not."""
    fs, path = resolve(location)
    with _translated(location, fs, path):
        fs.create_dir(path, recursive=True)


# --- internals ---------------------------------------------------------------------------------------------


def retry_budget_s() -> float:
    """`RAYDC_STORAGE_RETRY_S`, checked: how long an unreachable object store is waited for."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise DataError(f"{RETRY_ENV}={raw!r}: give the seconds to retry an unreachable object store, >= 0")
    return value


def retry_attempts(budget_s: float) -> int:
    """Attempts of the AWS SDK's default strategy (exponential backoff from 50 ms, no cap) whose waits add up
    to at least `budget_s`: a retry budget of B seconds retries for between B and about 2B."""
    if budget_s <= 0:
        return 1
    return max(2, math.ceil(math.log2(budget_s / (_FIRST_BACKOFF_S / 2) + 2)))


class _RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, built with a retry strategy that survives pickling: pyarrow's own `__reduce__`
    drops `retry_strategy`, so a filesystem handed to Ray Data or Ray Train would reach the workers with the
    SDK's default of three quick attempts."""

    def __init__(self, retry_s: float, **kwargs):
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=retry_attempts(retry_s)),
                         **kwargs)
        self._raydc_args = (retry_s, kwargs)

    def __reduce__(self):
        return _rebuild_s3, self._raydc_args


def _rebuild_s3(retry_s: float, kwargs: dict) -> _RetryingS3FileSystem:
    return _RetryingS3FileSystem(retry_s, **kwargs)


@functools.lru_cache(maxsize=32)
def _s3_filesystem(bucket: str, env: tuple[str | None, ...], retry_s: float = DEFAULT_RETRY_S
                   ) -> pafs.S3FileSystem:
    """Cached by bucket, the AWS variables (`env`, in `_S3_ENV` order) and the retry budget, so a change to the
    environment gets a fresh client and an unchanged one reuses its region lookup."""
    settings = dict(zip(_S3_ENV, env))
    endpoint = settings["AWS_ENDPOINT_URL_S3"] or settings["AWS_ENDPOINT_URL"]
    if not endpoint:
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
        return _RetryingS3FileSystem(retry_s, region=fs.region)
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    region = settings["AWS_REGION"] or settings["AWS_DEFAULT_REGION"] or "us-east-1"
    return _RetryingS3FileSystem(retry_s, endpoint_override=parts.netloc + parts.path.rstrip("/"),
                                 scheme=parts.scheme, region=region)


def _write_local_atomic(path: str, data: bytes) -> None:
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    # Not mkstemp: its 0600 would outlive the rename and hide the file from other users of shared storage.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync(parent, strict=False)


def _fsync(path: str, strict: bool = True) -> None:
    """Flush a file, or a directory after a rename so the rename survives a power cut. Directories are
    best effort (`strict=False`): some filesystems cannot open or sync them."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _translated(location: str, fs: pafs.FileSystem | None = None, path: str | None = None,
                needed: int | None = None) -> Iterator[None]:
    """Turn pyarrow's and the OS's errors for `location` into `DataError`s that say what to do. `needed`: the
    bytes being written, for the message of a full disk."""
    try:
        yield
    except FileNotFoundError as e:
        raise _not_found(location, fs, path) from e
    except OSError as e:
        if e.errno in _FULL:
            raise no_space_error(location, needed) from e
        raise _explain(location, str(e)) from e
    except pa.ArrowException as e:
        raise _explain(location, str(e)) from e


_FULL = (errno.ENOSPC, errno.EDQUOT)


def as_data_error(location: str, exc: BaseException) -> DataError | None:
    """A storage failure that happened where raydc.storage did not see it (Ray Train's checkpoint uploads, its
    controller's state files under `location`) as the `DataError` raydc.storage would have raised: a full disk,
    an unreachable store. None for anything else."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return no_space_error(exc.filename if isinstance(exc.filename, str) else location)
    message = str(exc)
    if isinstance(exc, (OSError, pa.ArrowException)) and ("NETWORK_CONNECTION" in message or "curlCode" in message):
        return _explain(location, message)
    return None


def no_space_error(location: str, needed: int | None = None) -> DataError:
    """A full disk (or quota) under a local `location`, said in one line with what is free and what the write
    needed: nothing of the write is left under its real name (writes go to a temporary that is removed)."""
    if is_uri(location):
        return DataError(f"{location}: the store refused the write: no space left; free space, then --resume")
    probe = os.path.abspath(location)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    need = f"; this write needs {needed / 2**20:,.2f} MiB" if needed is not None else ""
    return DataError(f"{location}: no space left on the filesystem holding {probe} ({free}{need}): free space "
                     f"there or move run.dir, then continue with --resume")


def _not_found(location: str, fs: pafs.FileSystem | None, path: str | None) -> NotFound:
    # pyarrow reports a key in a missing bucket as a plain missing path; ask about the bucket to tell them apart.
    if fs is not None and path and fs.type_name in _OBJECT_STORES:
        bucket = path.split("/", 1)[0]
        with contextlib.suppress(OSError):
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                return NotFound(_bucket_missing(location, bucket))
    return NotFound(f"{location}: no such file or directory")


def _explain(location: str, message: str) -> DataError:
    scheme = (m.group(1).lower() if (m := _URI.match(location)) else "file")
    detail = message.strip().splitlines()[0][:300] if message.strip() else "unknown error"
    cause = f" [pyarrow {pa.__version__}: {detail}]"
    if "Unrecognized filesystem type" in message:
        return DataError(f"{location}: pyarrow has no filesystem for {scheme}://; use s3://, gs://, file:// "
                         f"or a local path, or install the package that registers {scheme}://{cause}")
    if "compiled without" in message:
        return DataError(f"{location}: this pyarrow was built without {scheme}:// support; install the PyPI "
                         f"wheel (pip install --force-reinstall 'pyarrow>=15'), which includes S3 and GCS{cause}")
    if "libjvm" in message or "libhdfs" in message:
        return DataError(f"{location}: hdfs:// needs a Java runtime and libhdfs: set JAVA_HOME, and HADOOP_HOME "
                         f"or ARROW_LIBHDFS_DIR{cause}")
    if "Cannot parse URI" in message or "non-Windows local URI" in message:
        return DataError(f"{location}: not a valid URI (a local file URI is file:///absolute/path; "
                         f"percent-encode spaces){cause}")
    if ("NO_SUCH_BUCKET" in message or ("Bucket '" in message and "not found" in message)
            or ("resolving region" in message and ("RESOURCE_NOT_FOUND" in message or "HTTP status 404" in message))):
        return NotFound(_bucket_missing(location, _bucket_of(location)) + cause)
    if any(code in message for code in _DENIED):
        return DataError(_denied(location, scheme) + cause)
    if "NETWORK_CONNECTION" in message or "curlCode" in message:
        if scheme == "s3":
            return DataError(f"{location}: cannot reach {_s3_endpoint() or 'AWS S3'} (retried for "
                             f"{RETRY_ENV}={retry_budget_s():g}s): check the network, and AWS_ENDPOINT_URL if the "
                             f"bucket is on a non-AWS server; a run stopped by this continues from its last "
                             f"checkpoint with --resume{cause}")
        return DataError(f"{location}: cannot reach the {scheme}:// service: check the network{cause}")
    return DataError(f"{location}: {detail}")


def _denied(location: str, scheme: str) -> str:
    if scheme == "gs":
        return (f"{location}: access denied: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file "
                f"that may use this bucket, or run where default Google credentials are available")
    if scheme != "s3":
        return f"{location}: access denied"
    if not any(os.environ.get(k) for k in _AWS_CREDENTIAL_SOURCES):
        return (f"{location}: access denied and no AWS credentials are set: set AWS_ACCESS_KEY_ID/"
                f"AWS_SECRET_ACCESS_KEY, or AWS_ENDPOINT_URL for a non-AWS server")
    who = (f"access key {os.environ['AWS_ACCESS_KEY_ID']} (AWS_ACCESS_KEY_ID)" if os.environ.get("AWS_ACCESS_KEY_ID")
           else "the credentials from AWS_PROFILE or the instance role")
    at = f" at {_s3_endpoint()}" if _s3_endpoint() else ""
    return (f"{location}: access denied for {who}{at}: check that AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            f"are valid there and allowed to read and write this bucket, or set AWS_ENDPOINT_URL for a "
            f"non-AWS server")


def _bucket_missing(location: str, bucket: str) -> str:
    message = f"{location}: bucket '{bucket}' does not exist"
    if not location.lower().startswith("s3://"):
        return message + ": create it or correct the name"
    if endpoint := _s3_endpoint():
        return message + f" at {endpoint}: create it there, or correct the name or AWS_ENDPOINT_URL"
    return message + " on AWS: create it or correct the name, or set AWS_ENDPOINT_URL for a non-AWS server"


def _bucket_of(location: str) -> str:
    m = _URI.match(location)
    return location[m.end():].split("/", 1)[0] if m else ""


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
