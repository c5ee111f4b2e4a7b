"""The obstore ``S3Store`` of an ``s3://`` URI configured as s3fs would be by the same ``storage_options``
(s3fs's names, fsspec's ``FSSPEC_S3*`` defaults), or None where obstore cannot honour them the same way
(``store_for``); stores are cached per bucket, options and ``AWS_*`` environment."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import fsspec
import fsspec.config
from obstore.store import S3Store

S3_SCHEMES = ("s3://", "s3a://")
BOTOCORE_DEFAULT_ATTEMPTS = 5
"""Attempts per request when ``config_kwargs`` sets none: botocore's default (legacy mode), as with s3fs."""
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
_ENV = ("AWS_", "FSSPEC_S3")
_stores: dict[tuple[str, str, tuple[tuple[str, str], ...]], S3Store | None] = {}
_UNSET = object()
_stores_lock = threading.Lock()


def store_for(uri: str, storage_options: Mapping[str, Any]) -> tuple[S3Store, str] | None:
    """(obstore store of ``uri``'s bucket, object key) for an ``s3://`` or ``s3a://`` URI whose
    ``storage_options`` (s3fs's, with fsspec's ``FSSPEC_S3*`` defaults) map onto obstore; None for other
    schemes and for options that only s3fs honours (fsspec then does the I/O). Stores are cached per
    bucket, options and ``AWS_*`` environment, per process."""
    return store_resolver(storage_options)(uri)


def store_resolver(storage_options: Mapping[str, Any]) -> Callable[[str], tuple[S3Store, str] | None]:
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
