"""Where a cache lives: a local folder, or a prefix in an object store (any fsspec URL).

    root = cache_root("cache/")                 # pathlib.Path
    root = cache_root("s3://bucket/caches/c1")  # upath.UPath over s3fs (pip install 'deltakd[s3]')

Both give the same path API (`/`, `read_text`, `exists`, `iterdir`, `rglob`, `open`),
so the builder, reader and validator use one code path. What differs is the commit
(FORMAT.md, "Commit"): a local group is written aside and renamed into place; an
object store has no rename, so a remote group is written at its final prefix and
counts as committed only once its `shard.json` exists, written last. Credentials and
endpoints come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)
or from fsspec's configuration; retries and timeouts from `deltakd.runtime.remote`
(DELTAKD_STORE_RETRY_S, DELTAKD_STORE_TIMEOUT_S), so a network fault ends in one line
that names the operation and URL, never in a traceback or a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from deltakd.runtime import remote


def is_url(path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def cache_root(path):
    """A local `Path`, or a `UPath` for a URL such as s3://bucket/prefix."""
    if isinstance(path, Path) or not is_url(path):
        return Path(path)
    try:
        from upath import UPath
    except ImportError as e:
        raise SystemExit(
            f"{path}: caches in object storage need `pip install 'deltakd[s3]'` "
            "(universal_pathlib and s3fs, or the fsspec backend of your store)"
        ) from e
    root = UPath(str(path), **remote.storage_options(str(path)))
    remote.configure(root.fs)
    # fsspec shares one filesystem object per process and caches its listings; another
    # process (a resumed build, add-student) may have rewritten objects since.
    root.fs.invalidate_cache()
    return root


def is_remote(p) -> bool:
    return not isinstance(p, Path)


def zarr_store(p, read_only: bool):
    """The zarr store of a group folder: LocalStore, or FsspecStore on the same filesystem."""
    import zarr

    if not is_remote(p):
        return zarr.storage.LocalStore(str(p), read_only=read_only)
    # zarr drives its own event loop: it needs an asynchronous filesystem of its own,
    # not the (synchronous) one behind the path.
    st = zarr.storage.FsspecStore.from_url(str(p), storage_options=dict(p.storage_options), read_only=read_only)
    remote.configure(st.fs)
    return st


def write_text_atomic(p, text: str) -> None:
    """Readers see the old text or the new, never a part: rename locally; one PUT (atomic per object) remotely."""
    if is_remote(p):
        with remote.doing("writing", p):
            p.write_text(text)
        return
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_json_atomic(p, obj) -> None:
    write_text_atomic(p, json.dumps(obj, indent=1, sort_keys=True))


def rmtree(p) -> None:
    """Delete a folder (or prefix) and everything under it; nothing there is fine."""
    if is_remote(p):
        try:
            p.fs.rm(p.path, recursive=True)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(p, ignore_errors=True)


def is_empty_or_missing(p) -> bool:
    try:
        return not any(True for _ in p.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return not p.exists()


def local_stage(root) -> Path:
    """Scratch space for a build's per-phase results: inside a local cache, in the temp folder for a remote one."""
    if not is_remote(root):
        return root / "stage"
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "deltakd-stage" / key
