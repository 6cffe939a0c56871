"""One writer per cache URL across hosts: a lease object in the bucket, taken with a conditional write.

    with url_lease("s3://bucket/caches/c1", "cache build"):   # a second writer anywhere gets LockedError
        ...
        check_held()     # before each commit: raises LockedError once the lease was lost

A local lock cannot see a writer on another host (or in another temp folder). So a
writer to an object store creates `URL/.deltakd.lease.json` with S3's conditional
PutObject (`If-None-Match: *`): of two writers exactly one succeeds. The object names
the holder (host, pid, command, start time) and is rewritten every `ttl/4` seconds (at
most 30 s) by a background thread with `If-Match: <its ETag>`, so that a writer that
lost the lease learns it at its next renewal. A lease not renewed for DELTAKD_LEASE_TTL_S
seconds (default 300; the age is the server's `Date` minus the object's `LastModified`,
so host clocks do not matter), or left on this host by a process that no longer runs,
is taken over with `If-Match` on the ETag that was judged stale (two writers taking
over at once: one wins) and a message naming the old holder. The holder stops before
its next commit once the lease was taken over, or once it could not renew it for the
TTL (another writer may then hold it). The writer deletes the object when it ends.

Only S3 and S3-compatible stores (s3fs) are supported here; for other fsspec URLs the
writers of one host are serialised by a local lock named after the URL (lock.py). Under
torchrun rank 0 holds the lease for the job; the other ranks' commits are not checked
against it (a lost lease stops rank 0 at its next commit, and the job with it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from email.utils import parsedate_to_datetime

from deltakd.runtime import remote
from deltakd.runtime.lock import LockedError, describe_holder, pid_alive

LEASE_FILE = ".deltakd.lease.json"
TTL_ENV = "DELTAKD_LEASE_TTL_S"
DEFAULT_TTL_S = 300.0

_current: list[Lease] = []  # the lease this process holds (the builders hold one at a time)


def ttl_seconds() -> float:
    text = os.environ.get(TTL_ENV, "").strip()
    if not text:
        return DEFAULT_TTL_S
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{TTL_ENV}={text!r}: give a number of seconds") from None
    if not v > 0:
        raise ValueError(f"{TTL_ENV}={text!r}: give a number of seconds > 0")
    return v


def supported(url: str) -> bool:
    return remote.protocol(url) in ("s3", "s3a")


def _client_error(e: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of the ClientError behind `e` (s3fs translates them to OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        r = getattr(e, "response", None)
        if isinstance(r, dict) and "Error" in r:
            return str(r["Error"].get("Code", "")), int((r.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        e = e.__cause__ or e.__context__
    return "", 0


def _conflict(e: BaseException) -> bool:
    """The conditional write lost: the object exists (If-None-Match), changed (If-Match), or a racing write."""
    code, status = _client_error(e)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class Lease:
    def __init__(self, url: str, command: str):
        from fsspec.core import url_to_fs

        self.url = str(url).rstrip("/")
        self.fs, path = url_to_fs(self.url, **remote.storage_options(self.url))
        remote.configure(self.fs)
        self.bucket, _, prefix = path.partition("/")
        self.key = f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE
        self.where = f"{self.url}/{LEASE_FILE}"
        self.command, self.ttl = command, ttl_seconds()
        self.interval = max(0.2, min(30.0, self.ttl / 4))
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.etag: str | None = None
        self.renewed = 0.0  # time.monotonic() of the last successful write
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the object
    def _body(self) -> bytes:
        rec = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": self.command,
            "argv": sys.argv[1:],
            "since": self.since,
            "renewed": time.time(),
            "ttl": self.ttl,
            "token": self.token,
        }
        return json.dumps(rec).encode()

    def _put(self, **cond) -> str:
        from botocore.exceptions import ParamValidationError

        try:
            with remote.doing("writing the lease", self.where):
                r = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), **cond)
        except ParamValidationError as e:  # a botocore from before S3's conditional writes (2024)
            raise ValueError(
                f"{self.url}: this botocore cannot make conditional writes ({e}); upgrade it "
                "(pip install -U s3fs aiobotocore botocore) to write caches in S3"
            ) from None
        return r["ETag"]

    def _read(self) -> tuple[dict, str, float] | None:
        """(holder record, ETag, seconds since it was written by the server's clock), or None when absent."""
        with remote.doing("reading the lease", self.where):
            try:
                head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
                body = self.fs.cat_file(f"{self.bucket}/{self.key}")
            except FileNotFoundError:
                return None
        try:
            rec = json.loads(body)
        except ValueError:
            rec = {}
        date = (head.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return rec, head["ETag"], max(0.0, now - head["LastModified"].timestamp())

    # ------------------------------------------------------------ taking, renewing, giving back
    def acquire(self) -> None:
        for _ in range(10):
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except FileNotFoundError:
                raise ValueError(
                    f"{self.url}: the bucket {self.bucket!r} does not exist; create it, or check the URL "
                    "(and AWS_ENDPOINT_URL)"
                ) from None
            except Exception as e:
                if not _conflict(e) and not isinstance(e, FileExistsError):
                    raise
            cur = self._read()
            if cur is None:
                continue  # given back meanwhile: try again
            rec, etag, age = cur
            if rec.get("token") == self.token:  # our own first write, answered with an error after it landed
                self.etag = etag
                break
            why = self._stale(rec, age)
            if why is None:
                raise LockedError(
                    f"{self.url} is being written by {describe_holder(rec)}; its lease {self.where} was renewed "
                    f"{age:.0f} s ago: wait for it to finish or stop it; one writer per cache. A lease not renewed "
                    f"for {self.ttl:g} s ({TTL_ENV}) is taken over"
                )
            try:
                self.etag = self._put(IfMatch=etag)
            except Exception as e:
                if _conflict(e) or isinstance(e, FileNotFoundError):
                    continue  # another writer renewed it or took it over first
                raise
            print(f"deltakd: taking over the lease of {self.url} from {describe_holder(rec)}, {why}", file=sys.stderr)
            break
        else:
            raise LockedError(f"{self.url}: the lease {self.where} keeps changing hands; try again")
        self.renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="deltakd-lease", daemon=True)
        self._thread.start()

    def _stale(self, rec: dict, age: float) -> str | None:
        if rec.get("host") == socket.gethostname() and "pid" in rec and not pid_alive(int(rec["pid"])):
            return "which is no longer running"
        if age > self.ttl:
            return f"which has not renewed it for {age:.0f} s (more than {self.ttl:g} s, {TTL_ENV})"
        return None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.etag = self._put(IfMatch=self.etag)
                self.renewed = time.monotonic()
            except Exception as e:
                if _conflict(e) or isinstance(e, FileNotFoundError):
                    cur = self._read_quietly()
                    self.lost = f"was taken over by {describe_holder(cur[0]) if cur else 'another writer'}"
                    return
                # A network fault: try again at the next interval; check_held() stops the
                # writer once the lease may have expired.

    def _read_quietly(self):
        try:
            return self._read()
        except Exception:
            return None

    def check(self) -> None:
        unrenewed = time.monotonic() - self.renewed
        if self.lost is None and unrenewed > self.ttl - self.interval:
            self.lost = f"could not be renewed for {unrenewed:.0f} s, so another writer may hold it now"
        if self.lost:
            raise LockedError(
                f"{self.url}: this writer's lease {self.lost}; nothing more is committed. What was committed "
                "is kept: run the same command again to resume (it says who writes, if anyone does)"
            )

    def release(self, quick: bool = False) -> None:
        """Delete the lease if it is still ours. `quick`: one attempt, silently (the store is not answering:
        the command's own error says so, and the lease left behind is taken over as stale)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        if self.lost:
            return
        retries = self.fs.retries
        if quick:
            self.fs.retries = 1
        try:
            cur = self._read()
            if cur is not None and cur[0].get("token") == self.token:
                with remote.doing("removing the lease", self.where):
                    self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if not quick:  # the work itself is done; a lease left behind is taken over once stale
                print(f"deltakd: could not remove the lease {self.where} ({type(e).__name__}: {e})", file=sys.stderr)
        finally:
            self.fs.retries = retries


@contextmanager
def url_lease(url: str, command: str):
    """Hold the lease of a cache URL for the body; LockedError when another writer holds it."""
    lease = Lease(url, command)
    lease.acquire()
    _current.append(lease)
    failed_on_network = False
    try:
        yield lease
    except BaseException as e:
        failed_on_network = remote.network_failure(e) is not None
        raise
    finally:
        _current.remove(lease)
        lease.release(quick=failed_on_network)


def check_held() -> None:
    """Raise LockedError when this process writes under a lease it no longer holds (no lease: nothing to check)."""
    for lease in _current:
        lease.check()
