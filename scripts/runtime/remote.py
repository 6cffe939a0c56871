"""Object stores on a network that fails: client retries and timeouts, and what a failure says.

    opts = storage_options("s3://bucket/cache")   # fsspec options for the URL: timeouts, no hidden retries
    configure(fs)                                 # the filesystem retries transient faults for the time budget
    with doing("writing", "s3://bucket/cache/shards/shard-00001"):
        ...                                       # a failure inside names that operation and URL
    reason = network_failure(exc)                 # why the store did not answer, or None for other errors

Transient faults (refused or reset connections, timeouts, 5xx answers, throttling) are
retried by the storage client itself: every S3 request of s3fs, listings and response
bodies included, goes through its retry loop (`s3fs.core._error_wrapper`, backoff
0.1·1.7^i s capped at 15 s), and the number of attempts is set so that the backoff adds
up to DELTAKD_STORE_RETRY_S seconds (default 120: 17 attempts). botocore makes one
attempt per s3fs attempt (its own retries would multiply the budget), with a connect
timeout of at most 5 s and a read timeout of DELTAKD_STORE_TIMEOUT_S seconds (default
30), so that no call waits forever. A request gives up after the budget plus the time its
failed attempts took: about the budget when connections are refused or reset (the usual
drop), up to attempts × connect timeout more (17 × 5 s) when a network swallows packets
without an answer. Other fsspec backends keep their own retry settings; their failures
are reported the same way. Runs no model; imports no other room.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from contextlib import contextmanager

RETRY_ENV = "DELTAKD_STORE_RETRY_S"
TIMEOUT_ENV = "DELTAKD_STORE_TIMEOUT_S"
DEFAULT_RETRY_S = 120.0
DEFAULT_TIMEOUT_S = 30.0
# S3 error codes that mean "busy or broken for now" (botocore's throttling list, the 5xx codes).
TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "BadGateway",
    "GatewayTimeout",
}


def _seconds(env: str, default: float) -> float:
    text = os.environ.get(env)
    if text is None or not text.strip():
        return default
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{env}={text!r}: give a number of seconds") from None
    if not v >= 0:
        raise ValueError(f"{env}={text!r}: give a number of seconds >= 0")
    return v


def retry_seconds() -> float:
    """How long transient faults are retried before a command gives up (DELTAKD_STORE_RETRY_S)."""
    return _seconds(RETRY_ENV, DEFAULT_RETRY_S)


def timeout_seconds() -> float:
    """The read timeout of one request (DELTAKD_STORE_TIMEOUT_S); the connect timeout is at most 5 s."""
    return max(_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S), 0.1)


def s3fs_attempts(budget_s: float) -> int:
    """Attempts whose backoff (s3fs: min(0.1·1.7^i, 15) s after attempt i) adds up to `budget_s`."""
    n, waited = 0, 0.0
    while waited < budget_s:
        waited += min(0.1 * 1.7**n, 15.0)
        n += 1
    return max(n, 1)


def protocol(url: str) -> str:
    return str(url).split("://", 1)[0].lower() if "://" in str(url) else "file"


def storage_options(url: str) -> dict:
    """fsspec options for a cache URL: timeouts and a single botocore attempt per s3fs attempt."""
    if protocol(url) not in ("s3", "s3a"):
        return {}
    t = timeout_seconds()
    return {
        "config_kwargs": {
            "connect_timeout": min(5.0, t),
            "read_timeout": t,
            "retries": {"mode": "standard", "total_max_attempts": 1},
        }
    }


def configure(fs) -> None:
    """Give an s3fs filesystem the retry budget; every other filesystem keeps its own settings."""
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return
    if not isinstance(fs, S3FileSystem):
        return
    _register_s3fs_errors()
    fs.retries = s3fs_attempts(retry_seconds())
    quiet_dropped_requests()


class _DroppedRequests(logging.Filter):
    """When a connection drops mid-request, aiohttp leaves the request's body-writing task behind with the
    network fault as its exception, and nobody retrieves it: asyncio's handler (on whichever loop ran it,
    fsspec's or zarr's) would log "Task exception was never retrieved" with a traceback, although the
    request's own retry loop has already met that fault (retried it, or raised it as the one-line error the
    CLI prints). Those records, and only those, are dropped from the "asyncio" logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and "never retrieved" in record.getMessage() and network_failure(exc))


_DROPPED = _DroppedRequests()


def quiet_dropped_requests() -> None:
    logger = logging.getLogger("asyncio")
    if _DROPPED not in logger.filters:
        logger.addFilter(_DROPPED)


_registered = [False]


def _register_s3fs_errors() -> None:
    """Refused connections and 5xx answers are transient too (s3fs retries only timeouts and resets by itself)."""
    if _registered[0]:
        return
    import s3fs.core
    from botocore.exceptions import ConnectionError as BotoConnectionError

    _registered[0] = True
    # Both hooks are s3fs's public API (older versions lack them: botocore's own errors then stay final).
    if hasattr(s3fs.core, "add_retryable_error"):
        s3fs.core.add_retryable_error(BotoConnectionError)  # refused, unreachable, connect timeout
    if hasattr(s3fs.core, "set_custom_error_handler"):
        previous = getattr(s3fs.core, "CUSTOM_ERROR_HANDLER", lambda e: False)

        def transient(e: BaseException) -> bool:
            return _transient_client_error(e) is not None or bool(previous(e))

        s3fs.core.set_custom_error_handler(transient)


def _transient_client_error(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
    if code in TRANSIENT_CODES or int(status) >= 500:
        return f"{code or 'HTTP'} {status}".strip()
    return None


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def network_failure(exc: BaseException) -> str | None:
    """Why the store could not be reached (short text), or None when `exc` is not a network fault."""
    try:
        import botocore.exceptions as be
    except ImportError:
        be = None
    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    for e in _chain(exc):
        if be is not None and isinstance(e, be.EndpointConnectionError):
            return "connection refused or endpoint unreachable"
        if be is not None and isinstance(e, (be.ConnectTimeoutError, be.ReadTimeoutError)):
            return "timed out"
        if be is not None and isinstance(e, (be.ConnectionError, be.HTTPClientError)):
            return f"connection failed ({type(e).__name__})"
        if be is not None and isinstance(e, be.ClientError):
            reason = _transient_client_error(e)
            if reason:
                return f"the server answered {reason}"
            continue
        if aiohttp is not None and isinstance(e, aiohttp.ClientError):
            return f"connection failed ({type(e).__name__})"
        if isinstance(e, (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return f"connection failed ({type(e).__name__})"
        if isinstance(e, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(e, (TimeoutError, asyncio.TimeoutError)) or type(e).__name__ == "FSTimeoutError":
            return "timed out"
    return None


@contextmanager
def doing(what: str, where):
    """Name the operation and URL in any failure raised inside (the innermost name wins)."""
    try:
        yield
    except BaseException as e:
        doing_note(e, what, where)
        raise


def doing_note(e: BaseException, what: str, where) -> None:
    """Record on `e` what was being done where, unless an inner operation did already."""
    if getattr(e, "deltakd_doing", None) is None:
        try:
            e.deltakd_doing = f"{what} {where}"
        except AttributeError:  # an exception type without a __dict__
            pass


def failure_message(
    exc: BaseException,
    verb: str,
    target: str | None,
    advice: str = "what was committed is kept: run the same command again to resume",
) -> str | None:
    """The one line for a network fault (None for other errors): operation, URL, reason, and how to resume."""
    reason = network_failure(exc)
    if reason is None:
        return None
    what = getattr(exc, "deltakd_doing", None) or (f"working on {target}" if target else "working")
    request = _last_request(exc)
    return (
        f"{verb}: the object store did not answer while {what}{f' ({request})' if request else ''}: {reason}, "
        f"still after retrying for {retry_seconds():g} s ({RETRY_ENV}); {advice}"
    )


def _last_request(exc: BaseException) -> str | None:
    """The request that failed last, as botocore names it: its URL, or its S3 operation."""
    for e in _chain(exc):
        url = (getattr(e, "kwargs", None) or {}).get("endpoint_url")
        if url:
            return f"request {url}"
        op = getattr(e, "operation_name", None)
        if op:
            return f"request {op}"
    return None
