"""Object GETs and PUTs at a low client CPU cost: ``s3://`` objects go through obstore (Rust's
``object_store``), every other scheme, and S3 options that obstore cannot honour the same way, through
fsspec (``pipelines.common.s3store`` decides which). Callers keep fsspec URIs and ``storage_options``
(s3fs's names); errors are the ones the retry policy of ``pipelines.common.storage`` classifies:
``FileNotFoundError`` and ``PermissionError`` are final, anything else is an ``OSError`` worth another
attempt."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec
import obstore
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from fcn.registry import write_atomic
from pipelines.common.s3store import store_for, store_resolver
from pipelines.common.storage import PERMANENT_IO_ERRORS

CONCURRENT_REQUESTS = 64
"""Most requests one ``get_all``/``put_all`` call keeps in flight."""
S3FS_ATTEMPTS = 5
"""Attempts over those, when S3 throttles or a connection fails: s3fs's own retries, kept so that retries
count as they did with s3fs."""
_S3FS_RETRIED = ("SlowDown", "reduce your request rate", " - HTTP error: ")
"""Signs in obstore's messages of the errors s3fs retries: throttling, and a failed connection (no status)."""

_S3_ERROR_BODY = re.compile(r"(<\?xml[^>]*\?>\s*)?<Error>.*?</Error>", re.S)
"""An S3 error document in obstore's messages: shown as its code and message only."""

T = TypeVar("T")


def get_bytes(uri: str, storage_options: Mapping[str, Any]) -> bytes:
    """The content of the object or file at ``uri``."""
    target = store_for(uri, storage_options)
    if target is None:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        return fs.cat_file(path)
    store, key = target
    return _obstore_call(lambda: bytes(obstore.get(store, key).bytes()))


def put_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any], *, atomic: bool = False) -> None:
    """Write ``data`` as the object or file at ``uri`` (its folders made where the filesystem has them): on S3
    one obstore PUT, elsewhere fsspec. ``atomic``: readers see the old or the new content, never a part (a PUT
    is; on other filesystems ``fcn.registry.write_atomic``, the fsspec-only writer of the model library,
    which does not depend on obstore)."""
    target = store_for(uri, storage_options)
    if target is None:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        fs.makedirs(fs._parent(path), exist_ok=True)
        if atomic:
            write_atomic(fs, path, data)
        else:
            fs.pipe_file(path, data)
        return
    store, key = target
    _obstore_call(lambda: obstore.put(store, key, data))


def get_all(uris: Sequence[str], storage_options: Mapping[str, Any]) -> list[bytes | Exception]:
    """The content of each of ``uris``, or the error that reading it raised, in order; concurrent
    requests (obstore's, or fsspec's ``cat`` per filesystem)."""
    results: list[bytes | Exception] = [FileNotFoundError(uri) for uri in uris]
    s3_reads: list[tuple[int, S3Store, str]] = []
    others: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    resolve = store_resolver(storage_options)
    for i, uri in enumerate(uris):
        target = resolve(uri)
        if target is not None:
            s3_reads.append((i, *target))
            continue
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        others.setdefault(id(fs), (fs, []))[1].append((i, path))
    if s3_reads:
        fetched = _run(_gather([_get_async(store, key) for _, store, key in s3_reads]))
        for (i, _, _), result in zip(s3_reads, fetched):
            results[i] = result
    for fs, reads in others.values():
        try:
            contents = fs.cat([path for _, path in reads], on_error="return")
        except Exception as error:  # the whole request failed (e.g. connection refused)
            contents = {path: error for _, path in reads}
        for i, path in reads:
            results[i] = contents.get(path, FileNotFoundError(uris[i]))
    return results


def put_all(files: Mapping[str, bytes], storage_options: Mapping[str, Any]) -> dict[str, Exception]:
    """Write every ``{uri: data}`` of ``files`` concurrently; return ``{uri: error}`` of those that failed
    (on fsspec filesystems, one failure leaves every file of its filesystem reported as failed)."""
    failures: dict[str, Exception] = {}
    s3_writes: list[tuple[str, S3Store, str]] = []
    others: dict[int, tuple[fsspec.AbstractFileSystem, dict[str, str]]] = {}
    resolve = store_resolver(storage_options)
    for uri in files:
        target = resolve(uri)
        if target is not None:
            s3_writes.append((uri, *target))
            continue
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        others.setdefault(id(fs), (fs, {}))[1][path] = uri
    if s3_writes:
        written = _run(_gather([_put_async(store, key, files[uri]) for uri, store, key in s3_writes]))
        failures.update({uri: error for (uri, _, _), error in zip(s3_writes, written) if error is not None})
    for fs, paths in others.values():
        try:
            for parent in {fs._parent(path) for path in paths}:
                fs.makedirs(parent, exist_ok=True)
            fs.pipe({path: files[uri] for path, uri in paths.items()})
        except Exception as error:
            failures.update(dict.fromkeys(paths.values(), error))
    return failures


def _as_io_error(error: Exception) -> Exception:
    """An obstore error as the built-in error that the retry policy (``PERMANENT_IO_ERRORS``) classifies,
    with the first paragraph of its message (obstore appends a multi-line debug dump)."""
    message = _S3_ERROR_BODY.sub(_error_body_text, str(error).split("\n\nDebug source:", 1)[0])
    if isinstance(error, (PermissionDeniedError, UnauthenticatedError)):
        return PermissionError(message)
    if isinstance(error, PERMANENT_IO_ERRORS):
        return type(error)(message)
    return OSError(message)


def _error_body_text(body: re.Match[str]) -> str:
    """``<Code>: <Message>`` of an S3 error document."""
    fields = dict(re.findall(r"<(Code|Message)>(.*?)</\1>", body.group(0), re.S))
    return html.unescape(": ".join(fields[name] for name in ("Code", "Message") if name in fields))


def _s3fs_would_retry(error: Exception) -> bool:
    """Whether s3fs retries ``error`` by itself, over botocore's retries: throttling and failed connections."""
    message = str(error)
    return any(sign in message for sign in _S3FS_RETRIED)


def _s3fs_wait_s(attempt: int) -> float:
    """s3fs's wait before its retry number ``attempt + 1``."""
    return min(1.7**attempt * 0.1, 15.0)


def _obstore_call(action: Callable[[], T]) -> T:
    """``action()`` with s3fs's own retries (``S3FS_ATTEMPTS``); its error as ``_as_io_error`` makes it."""
    for attempt in range(S3FS_ATTEMPTS):
        try:
            return action()
        except Exception as error:
            if attempt == S3FS_ATTEMPTS - 1 or not _s3fs_would_retry(error):
                raise _as_io_error(error) from error
        time.sleep(_s3fs_wait_s(attempt))
    raise AssertionError("unreachable")


async def _get_async(store: S3Store, key: str) -> bytes:
    for attempt in range(S3FS_ATTEMPTS):
        try:
            result = await obstore.get_async(store, key)
            return bytes(await result.bytes_async())
        except Exception as error:
            if attempt == S3FS_ATTEMPTS - 1 or not _s3fs_would_retry(error):
                raise
        await asyncio.sleep(_s3fs_wait_s(attempt))
    raise AssertionError("unreachable")


async def _put_async(store: S3Store, key: str, data: bytes) -> None:
    for attempt in range(S3FS_ATTEMPTS):
        try:
            await obstore.put_async(store, key, data)
            return
        except Exception as error:
            if attempt == S3FS_ATTEMPTS - 1 or not _s3fs_would_retry(error):
                raise
        await asyncio.sleep(_s3fs_wait_s(attempt))


async def _gather(calls: list[Coroutine[Any, Any, T]]) -> list[T | Exception]:
    """Await ``calls``, at most ``CONCURRENT_REQUESTS`` at a time; each one's result or I/O error."""
    limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def bounded(call: Coroutine[Any, Any, T]) -> T | Exception:
        async with limit:
            try:
                return await call
            except Exception as error:
                return _as_io_error(error)

    return await asyncio.gather(*(bounded(call) for call in calls))


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end from synchronous code, also when this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
