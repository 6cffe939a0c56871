"""One writer per folder: an exclusive lock on a cache or run folder, with who holds it.

    with folder_lock("cache/", "cache build"):   # a second writer gets LockedError
        ...

`cache build`, `cache add-student` and `train` each hold the lock of the folder they
write for as long as they run. The lock is an OS `flock` on `FOLDER/.deltakd.lock`: the
kernel drops it when the holder dies, even on `kill -9`, so a lock can never outlive its
process on the same host. Next to it, `FOLDER/.deltakd.lock.json` names the holder (host,
pid, command, start time) so that a refused writer can say who is in the way, and so
that a lock left by a dead process is reported when it is taken over. The holder deletes
both files when it ends (the lock file while still holding the lock; a writer that opened
the file just before checks, once it holds the lock, that the file is still the one on
disk), so a finished folder holds neither. Under torchrun only rank 0 takes the lock: the
ranks of one job are one writer. A cache at an S3 URL is guarded by a lease object in
the bucket instead (lease.py), which writers on every host see; for other URLs the
writers of this host are serialised by a local lock named after the URL.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".deltakd.lock"
HOLDER_FILE = ".deltakd.lock.json"
LOCK_FILES = (LOCK_FILE, HOLDER_FILE)


class LockedError(RuntimeError):
    """Another process writes into the folder; the message names it."""


class FolderError(ValueError):
    """The folder cannot be created or written; the message says what to do."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_holder(folder: Path) -> dict:
    try:
        return json.loads((folder / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def describe_holder(h: dict) -> str:
    if not h:
        return "another process (no holder record)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("since", 0)))
    return f"pid {h.get('pid')} on host {h.get('host')} ({h.get('command', '?')}, since {since})"


def prepare_folder(folder: Path, option: str, create: bool = True) -> None:
    """Create the folder (and parents), or explain in one line why it cannot be used."""
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{option} {folder} is a file, not a folder: choose a folder path")
    if not create and not folder.is_dir():
        raise FolderError(f"{option} {folder}: no such folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FolderError(f"{option} {folder}: a parent of it is a file: choose a folder path") from None
    except PermissionError:
        raise FolderError(
            f"{option} {folder} cannot be created (permission denied): choose a folder you can write to"
        ) from None
    except OSError as e:
        raise FolderError(f"{option} {folder} cannot be created ({e.strerror})") from None


def open_lock_file(path: Path) -> int:
    """The lock file's descriptor, created if needed (the OS refusal, e.g. a read-only folder, goes up)."""
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _try_lock(path: Path) -> int | None:
    """A descriptor holding the exclusive lock of `path`, or None when another process holds it."""
    while True:
        fd = open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The previous holder deletes the file as it ends: a file opened just before that is
        # no longer the one on disk, and its lock guards nothing. Then take the current one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def folder_lock(folder: str | Path, command: str, option: str = "--out", create: bool = True, label: str | None = None):
    """Hold the folder's exclusive lock; refuse at once (LockedError) when another process holds it.

    `label` names what is locked in messages when the lock folder stands for something else (a URL).
    """
    folder = Path(folder)
    what = label or folder
    created = not folder.exists()
    prepare_folder(folder, option, create)
    try:
        fd = _try_lock(folder / LOCK_FILE)
    except PermissionError:
        raise FolderError(
            f"{option} {folder} is not writable (permission denied): choose a folder you can write to"
        ) from None
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES):
            raise FolderError(
                f"{option} {folder} is not writable ({e.strerror}): choose a folder you can write to"
            ) from None
        raise
    if fd is None:
        raise LockedError(
            f"{what} is being written by {describe_holder(_read_holder(folder))}: "
            "wait for it to finish or stop it; one writer per folder"
        )
    try:
        old, host = _read_holder(folder), socket.gethostname()
        if old and (old.get("pid"), old.get("host")) != (os.getpid(), host):
            # The OS lock was free, so its holder is gone; say so when its record survived it.
            who = describe_holder(old)
            if old.get("host") == host and not pid_alive(int(old.get("pid", -1))):
                print(
                    f"deltakd: taking over the lock of {what} left by {who}, which is no longer running",
                    file=sys.stderr,
                )
            else:
                print(
                    f"deltakd: taking over the lock of {what} recorded for {who}, which no longer holds it",
                    file=sys.stderr,
                )
        me = {"host": host, "pid": os.getpid(), "command": command, "since": time.time(), "argv": sys.argv[1:]}
        tmp = folder / (HOLDER_FILE + ".tmp")
        tmp.write_text(json.dumps(me))
        os.replace(tmp, folder / HOLDER_FILE)
        yield
    finally:
        # The record goes first: a holder record without the OS lock reads as "left behind".
        if _read_holder(folder).get("pid") == os.getpid():
            (folder / HOLDER_FILE).unlink(missing_ok=True)
        (folder / LOCK_FILE).unlink(missing_ok=True)  # still held: no other process holds this file
        os.close(fd)
        if created and folder.is_dir() and not any(folder.iterdir()):
            # Refused before writing anything: leave no trace of the attempt.
            folder.rmdir()


def locked(folder_of, command: str, option: str = "--out", create: bool = True):
    """Decorator: run `fn(cfg, ...)` holding the lock of `folder_of(cfg)` (rank 0 only under torchrun)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg, *a, **kw):
            if int(os.environ.get("RANK", "0")) != 0:
                return fn(cfg, *a, **kw)
            target = str(folder_of(cfg))
            if "://" in target and not target.startswith("file://"):
                from deltakd.runtime import lease

                if lease.supported(target):  # S3: a lease object in the bucket, seen from every host
                    with lease.url_lease(target, command):
                        return fn(cfg, *a, **kw)
                # Other object stores: serialise at least the writers of this host with a
                # local lock named after the URL.
                with folder_lock(_url_lock_dir(target), command, option, label=target):
                    return fn(cfg, *a, **kw)
            with folder_lock(target, command, option, create):
                return fn(cfg, *a, **kw)

        return inner

    return wrap


def _url_lock_dir(url: str) -> Path:
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / "deltakd-locks" / hashlib.sha256(url.encode()).hexdigest()[:16]


def is_lock_file(p: Path) -> bool:
    """The lock's own files, and the lease object of a cache in an object store (lease.py)."""
    return p.name in LOCK_FILES or p.name in (HOLDER_FILE + ".tmp", ".deltakd.lease.json")
