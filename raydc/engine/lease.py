"""One writer per run directory: a lease the writer takes before it touches the directory, renews while it runs
and gives back when it ends.

Two `raydc train` on one run directory (a `ray job submit` that looked stuck and was submitted again, a
`--resume` typed in a second terminal) would otherwise both write metrics, parts and checkpoints into it, and
leave a mix no single run produced. Readers (`evaluate`, `report`, `assign`, `export`) take no lease.

The lease is a small JSON object beside the run directory, `<parent>/.<name>.lease` (beside, not inside: an
`--overwrite` deletes the directory, and an empty directory must still look empty), holding who writes
(host, process, Ray job id, since when) and a random token. It is created so that two writers cannot both
succeed:

* local paths: a lock file that cannot be created twice (`link(2)` of a written temporary, else
  `open(O_CREAT | O_EXCL)`), atomic on local filesystems and on NFSv3+;
* s3://: a PutObject with `If-None-Match: *` (S3 answers 412 to the second writer); renewals and takeovers are
  PutObjects with `If-Match: <ETag>`, a compare-and-swap, so of two processes taking over the same stale lease
  one wins.

A heartbeat thread renews it every quarter of `run.lease_timeout_s`. A lease whose heartbeat is older than that
timeout belongs to a writer that died without giving it back (SIGKILL, a lost node): the next writer takes it
over and logs who held it. Age is measured on one clock where the store allows: the local file's mtime against
this host's clock, an object's Last-Modified against the S3 server's own Date header. A holder that ran on this
host and whose pid no longer exists (`kill -9`, then `--resume` at once) is taken over without that wait.

Other URI schemes (gs://, hdfs://) get no lease, and the run says so once: pyarrow exposes no conditional write
for them.
"""
from __future__ import annotations

import _thread
import contextlib
import dataclasses
import email.utils
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from raydc import storage
from raydc.errors import UserError

LEASE_SUFFIX = ".lease"


class LeaseHeld(UserError):
    """Another writer holds the run directory."""


class LeaseLost(UserError):
    """This writer's lease was taken over (its heartbeat had stopped for longer than the timeout)."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str | None          # the Ray job (submission) id, when the writer runs under `ray job submit`
    since: float             # unix time the lease was taken
    heartbeat: float         # unix time of the last renewal, by the writer's clock
    token: str               # random, tells this writer's lease from a later one of the same process

    @staticmethod
    def here(token: str) -> Holder:
        now = time.time()
        job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or None
        return Holder(socket.gethostname(), os.getpid(), job, now, now, token)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode()

    @staticmethod
    def from_json(data: bytes) -> Holder:
        d = json.loads(data)
        return Holder(str(d["host"]), int(d["pid"]), d.get("job"), float(d["since"]), float(d["heartbeat"]),
                      str(d["token"]))

    def dead_here(self) -> bool:
        """True only when the holder ran on this host and no process has its pid now (a run killed with -9, or
        a machine rebooted): its lease can be taken at once instead of after the heartbeat timeout. A pid in use
        may be another process that reused the number, so a live pid proves nothing and the timeout decides."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive under another user
            return False
        return False

    def describe(self) -> str:
        job = f", Ray job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {_iso(self.since)}"


@dataclasses.dataclass(frozen=True)
class _Seen:
    holder: Holder | None    # None: the object exists but is not a readable lease (a torn or foreign file)
    tag: str                 # what a compare-and-swap compares: an ETag, or the local file's token
    age_s: float             # seconds since the last renewal, on the store's clock where it has one


def lease_location(run_location: str) -> str:
    """`<parent>/.<name>.lease` for a run directory at a local path or a URI."""
    loc = run_location.rstrip("/")
    if storage.is_uri(loc):
        head, _, name = loc.rpartition("/")
        return f"{head}/.{name}{LEASE_SUFFIX}"
    parent, name = os.path.split(os.path.abspath(os.path.expanduser(loc)))
    return os.path.join(parent, f".{name}{LEASE_SUFFIX}")


class RunLease:
    """The lease of one run directory. Use as a context manager: `with RunLease(dir, timeout).held(): ...`."""

    def __init__(self, run_location: str, timeout_s: float, *, log: Callable[[str], None] = print,
                 on_lost: Callable[[], None] | None = None):
        self.run_location = run_location
        self.location = lease_location(run_location)
        self.timeout_s = float(timeout_s)
        self.log = log
        self.on_lost = on_lost if on_lost is not None else _thread.interrupt_main
        self.token = uuid.uuid4().hex
        self.lost: Holder | None = None
        self._store = _store_for(self.location)
        self._tag: str | None = None
        self._since = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the three operations ---------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease, or take over a stale one; raise `LeaseHeld` naming the live holder."""
        if self._store is None:
            self.log(f"no lease on {self.run_location}: only local paths and s3:// support the conditional "
                     f"write a lease needs; make sure no other run writes there")
            return
        mine = self._body()
        for _ in range(3):  # a holder can vanish or a taker win between our read and our write: look again
            tag = self._store.create(mine)
            if tag is not None:
                self._tag = tag
                return
            seen = self._store.read()
            if seen is None:
                continue
            dead = seen.holder is not None and seen.holder.dead_here()
            if seen.age_s <= self.timeout_s and not dead:  # an unreadable one too: its writer may be mid-write
                raise LeaseHeld(self._held_message(seen))
            tag = self._store.swap(seen.tag, mine)
            if tag is not None:
                self._tag = tag
                who = seen.holder.describe() if seen.holder else "an unreadable lease"
                why = ("its process is gone from this host" if dead else
                       f"no heartbeat for {seen.age_s:.0f}s (run.lease_timeout_s={self.timeout_s:g})")
                self.log(f"took over the lease on {self.run_location} from {who}: {why}")
                return
        raise LeaseHeld(self._held_message(self._store.read()))

    def renew(self) -> None:
        """Write a fresh heartbeat if the lease is still ours; `LeaseLost` if another writer took it."""
        if self._store is None or self._tag is None:
            return
        tag = self._store.swap(self._tag, self._body())
        if tag is None:
            seen = self._store.read()
            if seen is not None and seen.holder is not None and seen.holder.token == self.token:
                self._tag = seen.tag  # our own earlier renewal, whose reply a dropped connection lost
                return
            self.lost = seen.holder if seen and seen.holder else Holder("?", 0, None, 0.0, 0.0, "")
            self._tag = None
            raise LeaseLost(self._lost_message())
        self._tag = tag

    def release(self) -> None:
        """Give the lease back (only if still ours): the next writer need not wait for the timeout."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self._store is not None and self._tag is not None:
            with contextlib.suppress(Exception):  # a lease we fail to delete goes stale and is taken over
                self._store.delete(self._tag)
            self._tag = None

    # ---- the heartbeat ---------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        if self._store is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, name="raydc-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        period = max(0.05, self.timeout_s / 4)
        failing_since, warned = None, False
        while not self._stop.wait(period):
            try:
                self.renew()
                failing_since, warned = None, False
            except LeaseLost as e:
                self.log(f"raydc: error: {e}")
                self.on_lost()
                return
            except Exception as e:  # noqa: BLE001  (botocore and pyarrow errors alike: the store is unreachable)
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.timeout_s and not warned:
                    warned = True
                    self.log(f"warning: the lease on {self.run_location} was not renewed for "
                             f"{time.monotonic() - failing_since:.0f}s ({e}); another writer may take it over")

    @contextlib.contextmanager
    def held(self) -> Iterator[RunLease]:
        """Acquire, heartbeat, and release on any exit (an error, Ctrl-C, SIGTERM turned into an exception).
        An interrupt raised because the lease was lost comes out as `LeaseLost`, which says what happened."""
        self.acquire()
        self.start_heartbeat()
        try:
            yield self
        except KeyboardInterrupt:
            if self.lost is not None:
                raise LeaseLost(self._lost_message()) from None
            raise
        finally:
            self.release()

    # ---- messages --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        h = Holder.here(self.token)
        return dataclasses.replace(h, since=self._since).to_json()

    def _held_message(self, seen: _Seen | None) -> str:
        h = seen.holder if seen else None
        if h is None:
            return (f"run directory {self.run_location} is being taken by another writer at this moment "
                    f"({self.location}); try again in a few seconds")
        stop = f"`ray job stop {h.job}`" if h.job else f"kill {h.pid} on {h.host}"
        return (f"run directory {self.run_location} is being written by another run ({h.describe()}, last "
                f"heartbeat {seen.age_s:.0f}s ago): wait for it to end, stop it ({stop}), or choose another "
                f"run.dir; a lease with no heartbeat for run.lease_timeout_s={self.timeout_s:g}s, or whose process "
                f"is gone from this host, is taken over ({self.location})")

    def _lost_message(self) -> str:
        who = self.lost.describe() if self.lost else "another writer"
        return (f"the lease on {self.run_location} was taken over by {who} after this run's heartbeat stopped "
                f"for more than run.lease_timeout_s={self.timeout_s:g}s; this run stopped writing. Let that run "
                f"finish, or stop it and --resume")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---- stores ------------------------------------------------------------------------------------------


def _store_for(location: str):
    if not storage.is_uri(location):
        return _LocalStore(location)
    if location.lower().startswith("s3://"):
        return _S3Store(location)
    return None


class _LocalStore:
    """A lock file that appears whole or not at all: its content is written to a temporary first, which is then
    hard-linked to the lock's name (`link` fails if the name exists: the O_EXCL of a file with content). Its
    tag is the token inside it. A swap (a renewal, a takeover) and a delete hold a second, short-lived lock
    file (`_exclusive`), check under it that the lock is still the one they judged, and replace it with a
    rename over it: the lock's name is never missing, so a taker's `create` cannot win beside a swap (renaming
    the lock aside, as this once did, left a window where two takers both won). Writing the temporary is the
    only step that needs space: on a full disk a renewal fails before it touches the lock."""

    def __init__(self, path: str):
        self.path = path

    def create(self, body: bytes) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self._write_temporary(body)
        try:
            return self._publish(tmp, body)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def read(self) -> _Seen | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        holder = _parse(data)
        # A torn file (only where hard links are missing, see _publish) has no token: its mtime still ages it.
        return _Seen(holder, holder.token if holder else f"torn:{mtime}", max(0.0, time.time() - mtime))

    def swap(self, tag: str, body: bytes) -> str | None:
        tmp = self._write_temporary(body)
        try:
            with self._exclusive() as mine:
                seen = self.read() if mine else None
                if seen is None or seen.tag != tag:  # gone, or not the lease we judged
                    return None
                os.replace(tmp, self.path)  # the name never goes missing, so no `create` can slip in
                return _token(body)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def delete(self, tag: str) -> None:
        with self._exclusive() as mine:
            seen = self.read() if mine else None
            if seen is not None and seen.tag == tag:
                os.unlink(self.path)

    @contextlib.contextmanager
    def _exclusive(self, wait_s: float = 2.0, stale_s: float = 10.0):
        """Who may replace or delete the lock: a second lock file, held for the few system calls a swap takes.
        Readers and `create` ignore it (`create` cannot succeed while the lock exists, and a swap never removes
        it). One left by a process killed inside a swap is broken once older than `stale_s`. Yields False when
        another swap held it for all of `wait_s`: the caller treats that as a lost race."""
        path = f"{self.path}.swap"
        deadline = time.monotonic() + wait_s
        fd = None
        while fd is None:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - os.stat(path).st_mtime > stale_s:
                        os.unlink(path)
                        continue
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.005)
        try:
            yield True
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _write_temporary(self, body: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.new"
        try:
            with open(tmp, "xb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def _publish(self, tmp: str, body: bytes) -> str | None:
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        except OSError:  # a filesystem without hard links (some FUSE mounts): O_EXCL, then the content
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
        return _token(body)


class _S3Store:
    """A lease object written with S3's conditional PutObject (If-None-Match / If-Match, honoured by AWS since
    2024 and by MinIO and moto). pyarrow's S3 filesystem cannot send those headers, so this one object goes
    through boto3, configured from the same AWS variables as `raydc.storage`."""

    def __init__(self, location: str):
        rest = location.split("://", 1)[1]
        self.bucket, _, self.key = rest.partition("/")
        self.location = location
        self._client = None

    @property
    def client(self):
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise UserError(f"a run directory on s3:// takes a lease ({self.location}) with a conditional "
                                f"write that needs boto3: pip install boto3") from None
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            self._client = boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None,
                                        config=Config(retries={"mode": "standard", "max_attempts": 3},
                                                      connect_timeout=5, read_timeout=10))
        return self._client

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> _Seen | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise _storage_error(self.location, e) from None
        data = r["Body"].read()
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        holder = _parse(data)
        return _Seen(holder, r["ETag"], max(0.0, now - r["LastModified"].timestamp()))

    def swap(self, tag: str, body: bytes) -> str | None:
        return self._put(body, IfMatch=tag)

    def delete(self, tag: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=tag)
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return
            # A server without conditional deletes: compare, then delete (a small window, only at the end).
            seen = self.read()
            if seen is not None and seen.tag == tag:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)

    def _put(self, body: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          ContentType="application/json", **condition)["ETag"]
        except ClientError as e:
            # 412: the condition failed; 409: a concurrent conditional write to the same key is in flight;
            # 404 on If-Match: the object is gone.
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                return None
            raise _storage_error(self.location, e) from None


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder.from_json(data)
    except (ValueError, KeyError, TypeError):
        return None


def _token(body: bytes) -> str:
    return json.loads(body)["token"]


def _code(e) -> str:
    err = getattr(e, "response", {}).get("Error", {})
    return str(err.get("Code") or getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _storage_error(location: str, e: Exception) -> UserError:
    from raydc.errors import DataError

    return DataError(f"{location}: cannot read or write the run directory's lease ({e})")
