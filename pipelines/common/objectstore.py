"""Object GETs and PUTs at a low client CPU cost: ``s3://`` objects go through obstore (Rust's
``object_store``), every other scheme, and S3 options that obstore cannot honour the same way, through
fsspec. Callers keep fsspec URIs and ``storage_options`` (s3fs's names); errors are the ones the retry
policy of ``pipelines.common.storage`` classifies: ``FileNotFoundError`` and ``PermissionError`` are
final, anything else is an ``OSError`` worth another attempt."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

import fsspec
import fsspec.config
import obstore
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from fcn.registry import write_atomic
from pipelines.common.storage import PERMANENT_IO_ERRORS

S3_SCHEMES = ("s3://", "s3a://")
CONCURRENT_REQUESTS = 64
"""Most requests one ``get_all``/``put_all`` call keeps in flight."""
BOTOCORE_DEFAULT_ATTEMPTS = 5
"""Attempts per request when ``config_kwargs`` sets none: botocore's default (legacy mode), as with s3fs."""
S3FS_ATTEMPTS = 5
"""Attempts over those, when S3 throttles or a connection fails: s3fs's own retries, kept so that retries
count as they did with s3fs."""
_S3FS_RETRIED = ("SlowDown", "reduce your request rate", " - HTTP error: ")
"""Signs in obstore's messages of the errors s3fs retries: throttling, and a failed connection (no status)."""

_CACHE_ONLY_OPTIONS = frozenset(
    {
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "cache_regions",
        "max_concurrency",
        "fixed_upload_size",
        "asynchronous",
        "loop",
    }
)
"""s3fs options that tune only s3fs's own caches and buffers: they mean nothing to single-request I/O."""
_OBSTORE_KEY = re.compile(r"(?!\.\.?(/|$))[^/\x00-\x1f\x7f]+(/(?!\.\.?(/|$))[^/\x00-\x1f\x7f]+)*")
"""Keys that obstore's paths hold as they are: no empty, ``.`` or ``..`` segment, no control character."""
_S3_ERROR_BODY = re.compile(r"(<\?xml[^>]*\?>\s*)?<Error>.*?</Error>", re.S)
"""An S3 error document in obstore's messages: shown as its code and message only."""
_ENV = ("AWS_", "FSSPEC_S3")
_stores: dict[tuple[str, str, tuple[tuple[str, str], ...]], S3Store | None] = {}
_UNSET = object()
_stores_lock = threading.Lock()

T = TypeVar("T")


def store_for(uri: str, storage_options: Mapping[str, Any]) -> tuple[S3Store, str] | None:
    """(obstore store of ``uri``'s bucket, object key) for an ``s3://`` or ``s3a://`` URI whose
    ``storage_options`` (s3fs's, with fsspec's ``FSSPEC_S3*`` defaults) map onto obstore; None for other
    schemes and for options that only s3fs honours (fsspec then does the I/O). Stores are cached per
    bucket, options and ``AWS_*`` environment, per process."""
    return _resolver(storage_options)(uri)


def _resolver(storage_options: Mapping[str, Any]) -> Callable[[str], tuple[S3Store, str] | None]:
    """``store_for`` with ``storage_options`` bound, their cache key computed once for many URIs."""
    options_key = (
        json.dumps(storage_options, sort_keys=True, default=repr),
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV))),
    )

    def resolve(uri: str) -> tuple[S3Store, str] | None:
        scheme = next((s for s in S3_SCHEMES if uri.startswith(s)), None)
        if scheme is None:
            return None
        bucket, _, key = uri[len(scheme) :].partition("/")
        if not bucket or not _OBSTORE_KEY.fullmatch(key):
            return None
        cache_key = (bucket, *options_key)
        store = _stores.get(cache_key, _UNSET)
        if store is _UNSET:
            with _stores_lock:
                store = _stores.setdefault(cache_key, _s3_store(bucket, storage_options))
        return None if store is None else (store, key)

    return resolve


def get_bytes(uri: str, storage_options: Mapping[str, Any]) -> bytes:
    """The content of the object or file at ``uri``."""
    target = store_for(uri, storage_options)
    if target is None:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        return fs.cat_file(path)
    store, key = target
    return _obstore_call(lambda: bytes(obstore.get(store, key).bytes()))


def put_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any], *, atomic: bool = False) -> None:
    """Write ``data`` as the object or file at ``uri`` (its folders made where the filesystem has them).
    ``atomic``: readers see the old or the new content, never a part (one PUT is; on other filesystems
    ``fcn.registry.write_atomic``)."""
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
    resolve = _resolver(storage_options)
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
    resolve = _resolver(storage_options)
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


def _s3_store(bucket: str, storage_options: Mapping[str, Any]) -> S3Store | None:
    """An S3Store of ``bucket`` configured as s3fs would be by ``storage_options``, or None."""
    options = fsspec.config.apply_config(fsspec.get_filesystem_class("s3"), dict(storage_options))
    for name in _CACHE_ONLY_OPTIONS:
        options.pop(name, None)
    client_kwargs = dict(options.pop("client_kwargs", None) or {})
    config_kwargs = dict(options.pop("config_kwargs", None) or {})
    endpoint = (
        options.pop("endpoint_url", None)
        or client_kwargs.pop("endpoint_url", None)
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = client_kwargs.pop("region_name", None) or config_kwargs.pop("region_name", None)
    key = options.pop("key", None) or options.pop("username", None)
    secret = options.pop("secret", None) or options.pop("password", None)
    token = options.pop("token", None)
    anon = options.pop("anon", False)
    profile = options.pop("profile", None)
    requester_pays = options.pop("requester_pays", False)
    attempts = _attempts(config_kwargs.pop("retries", None))
    client: dict[str, Any] = {}
    for name in ("connect_timeout", "read_timeout"):
        if name in config_kwargs:
            client[name] = timedelta(seconds=float(config_kwargs.pop(name)))
    config_kwargs.pop("max_pool_connections", None)
    verify = client_kwargs.pop("verify", True)
    unchanged = (
        not options.pop("version_aware", False)
        and options.pop("use_ssl", True) is True
        and not options.pop("s3_additional_kwargs", None)
        and config_kwargs.pop("signature_version", "s3v4") == "s3v4"
        and isinstance(verify, bool)
        and attempts is not None
    )
    if not unchanged or options or client_kwargs or config_kwargs:
        return None  # an option that s3fs honours in ways obstore has no equivalent for
    config: dict[str, Any] = {"request_payer": bool(requester_pays), "skip_signature": bool(anon)}
    if endpoint:
        config["endpoint"] = endpoint
        client["allow_http"] = endpoint.startswith("http://")
    client["allow_invalid_certificates"] = not verify
    credential_provider = None
    if (key or secret or token) and not (key and secret):
        return None
    if key and secret and not anon:
        credential_provider = _StaticCredentials(key, secret, token)
    elif not anon and (profile or "AWS_PROFILE" in os.environ or "AWS_ACCESS_KEY_ID" not in os.environ):
        # botocore's chain (profiles, SSO, containers, instance metadata), as s3fs uses it
        import botocore.session
        from obstore.auth.boto3 import Boto3CredentialProvider

        session = botocore.session.Session(profile=profile)
        region = region or session.get_config_variable("region")
        try:
            credential_provider = Boto3CredentialProvider(session)
        except ValueError:  # no credentials: let fsspec fail as it does today
            return None
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        config["region"] = region
    elif not endpoint:
        return None  # s3fs finds the bucket's region by itself
    return S3Store(
        bucket,
        config=config,
        client_options=client,
        retry_config={"max_retries": attempts - 1},
        credential_provider=credential_provider,
    )


def _attempts(retries: Mapping[str, Any] | None) -> int | None:
    """Attempts per request from botocore's ``retries`` config; None for settings obstore cannot follow."""
    retries = dict(retries or {})
    attempts = retries.pop("total_max_attempts", None)
    if attempts is None and "max_attempts" in retries:
        attempts = retries.pop("max_attempts") + 1  # botocore: retries after the first attempt
    retries.pop("max_attempts", None)
    retries.pop("mode", None)
    if retries or (attempts is not None and (not isinstance(attempts, int) or attempts < 1)):
        return None
    return BOTOCORE_DEFAULT_ATTEMPTS if attempts is None else attempts


class _StaticCredentials:
    """Credentials given in the options; unlike obstore's own ones they never mix with ``AWS_*`` ones."""

    def __init__(self, key: str, secret: str, token: str | None):
        self._credential = {"access_key_id": key, "secret_access_key": secret, "token": token, "expires_at": None}

    def __call__(self) -> dict[str, Any]:
        return self._credential


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
