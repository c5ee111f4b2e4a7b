"""pipelines.common.objectstore and s3store: which URIs and options go through obstore, round trips on
moto's S3 server (awkward keys included, read back by s3fs), and the errors the retry policy sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pytest
from conftest import free_port
from obstore.store import S3Store

from pipelines.common import objectstore, s3store
from pipelines.common.storage import PERMANENT_IO_ERRORS, with_retries

AWKWARD_KEYS = [
    "a b/c?d#e%f.png",
    "pct/%41%2F%25.png",
    "ünïcødé/çà 日本.png",
    "plus/a+b=c&d;e,f@g$h!.png",
    "brackets/{x}[y]~^|`<>'\".png",
    "back\\slash.png",
]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s", "token": "t"},
        {"client_kwargs": {"endpoint_url": "https://minio:9000", "region_name": "eu-west-3", "verify": False}},
        {"anon": True, "requester_pays": True, "use_listings_cache": False, "default_block_size": 2**20},
        {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": 5}},
    ],
)
def test_s3_uris_with_options_obstore_can_honour_get_an_s3_store(s3_endpoint: str, options: dict[str, Any]) -> None:
    target = s3store.store_for("s3://bucket/folder/a b?.png", options)
    assert target is not None
    store, key = target
    assert isinstance(store, S3Store) and key == "folder/a b?.png"
    assert s3store.store_for("s3a://bucket/folder/a b?.png", options)[0] is store  # cached per bucket+options


def test_options_map_onto_the_store_config(s3_endpoint: str) -> None:
    options = {
        "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "eu-west-3"},
        "anon": True,
        "config_kwargs": {"retries": {"max_attempts": 2}},
    }
    store, _ = s3store.store_for("s3://bucket/k", options)
    assert store.config["endpoint"] == "http://minio:9000"
    assert store.config["region"] == "eu-west-3"
    assert store.config["skip_signature"] == "true"
    assert store.client_options["allow_http"] == "true"
    assert store.retry_config["max_retries"] == 2  # botocore's max_attempts counts retries
    assert s3store.store_for("s3://bucket/k", {})[0].retry_config["max_retries"] == 4  # botocore's default


@pytest.mark.parametrize(
    ("uri", "options"),
    [
        ("file:///tmp/x.png", {}),
        ("memory://bucket/x.png", {}),
        ("gs://bucket/x.png", {}),
        ("simplecache::s3://bucket/x.png", {}),
        ("s3://bucket", {}),
        ("s3://bucket/a//b.png", {}),  # keys obstore would normalise or refuse
        ("s3://bucket/a/../b.png", {}),
        ("s3://bucket/a/", {}),
        ("s3://bucket/x.png", {"version_aware": True}),
        ("s3://bucket/x.png", {"s3_additional_kwargs": {"ACL": "public-read"}}),
        ("s3://bucket/x.png", {"client_kwargs": {"verify": "/etc/ca.pem"}}),
        ("s3://bucket/x.png", {"some_future_option": 1}),
        ("s3://bucket/x.png", {"key": "only-a-key"}),
    ],
)
def test_other_schemes_keys_and_options_stay_with_fsspec(s3_endpoint: str, uri: str, options: dict) -> None:
    assert s3store.store_for(uri, options) is None


def test_awkward_keys_round_trip_and_match_s3fs(s3_bucket: str) -> None:
    """Written by obstore, read by s3fs (and the other way round) under the very same key."""
    fs, bucket = fsspec.core.url_to_fs(s3_bucket)
    written = {f"{s3_bucket}/obstore/{key}": key.encode() for key in AWKWARD_KEYS}
    assert all(s3store.store_for(uri, {}) is not None for uri in written)
    assert objectstore.put_all(written, {}) == {}
    objectstore.put_bytes(f"{s3_bucket}/single/{AWKWARD_KEYS[0]}", b"one", {}, atomic=True)
    assert sorted(fs.find(f"{bucket}/obstore")) == sorted(f"{bucket}/obstore/{key}" for key in AWKWARD_KEYS)
    assert fs.cat_file(f"{bucket}/single/{AWKWARD_KEYS[0]}") == b"one"
    for uri, data in written.items():
        assert fs.cat_file(fs._strip_protocol(uri)) == data
    fs.pipe({f"{bucket}/s3fs/{key}": key.encode()[::-1] for key in AWKWARD_KEYS})
    uris = [f"{s3_bucket}/s3fs/{key}" for key in AWKWARD_KEYS]
    assert objectstore.get_all(uris, {}) == [key.encode()[::-1] for key in AWKWARD_KEYS]
    assert objectstore.get_bytes(uris[0], {}) == AWKWARD_KEYS[0].encode()[::-1]


def test_other_schemes_round_trip_through_fsspec(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/new/folder/x.bin"
    objectstore.put_bytes(uri, b"atomic", {}, atomic=True)
    assert objectstore.put_all({f"file://{tmp_path}/other/y.bin": b"y", "memory://objectstore-test/z": b"z"}, {}) == {}
    assert objectstore.get_all([uri, f"file://{tmp_path}/other/y.bin", "memory://objectstore-test/z"], {}) == [
        b"atomic",
        b"y",
        b"z",
    ]
    assert not [p for p in (tmp_path / "new/folder").iterdir() if p.name != "x.bin"]  # no temporary file left


def test_a_missing_object_or_bucket_is_a_final_error(s3_bucket: str) -> None:
    attempts = []

    def read_missing() -> bytes:
        attempts.append(1)
        return objectstore.get_bytes(f"{s3_bucket}/missing.png", {})

    with pytest.raises(FileNotFoundError, match="missing.png"):
        with_retries(read_missing, retries=3)
    assert len(attempts) == 1  # not retried
    missing, no_bucket = objectstore.get_all([f"{s3_bucket}/missing.png", "s3://no-such-bucket-19/x.png"], {})
    assert isinstance(missing, FileNotFoundError) and isinstance(no_bucket, FileNotFoundError)
    assert str(missing).endswith("NoSuchKey: The specified key does not exist.")  # S3's error, without its XML
    assert "Debug source" not in str(missing)


def test_a_refused_connection_is_a_transient_error(s3_endpoint: str) -> None:
    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "config_kwargs": {"retries": {"max_attempts": 0}}}
    attempts = []

    def write() -> None:
        attempts.append(1)
        objectstore.put_bytes("s3://bucket/x.png", b"x", options)

    with pytest.raises(OSError) as raised:
        with_retries(write, retries=1)
    assert not isinstance(raised.value, PERMANENT_IO_ERRORS) and len(attempts) == 2
    (error,) = objectstore.get_all(["s3://bucket/x.png"], options)
    assert isinstance(error, OSError) and not isinstance(error, PERMANENT_IO_ERRORS)


def test_a_throttled_or_failing_store_is_retried_as_s3fs_retries(s3_endpoint: str, s3_bucket: str) -> None:
    """botocore's retries off: a 500 reaches the caller at once, while SlowDown and a reset connection are
    retried inside, as s3fs does."""
    from faulty_proxy import FaultyProxy

    proxy = FaultyProxy(s3_endpoint, failures=3, methods=("PUT", "GET"))
    options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    try:
        uri = f"{s3_bucket}/flaky.bin"
        with pytest.raises(OSError, match="500 Internal Server Error: InternalError: injected$") as raised:
            objectstore.put_bytes(uri, b"data", options)
        assert not isinstance(raised.value, PERMANENT_IO_ERRORS)
        objectstore.put_bytes(uri, b"data", options)  # 503 SlowDown, then a reset, then through
        assert proxy.faults == {"500": 1, "503": 1, "reset": 1}
        (first,) = objectstore.get_all([uri], options)
        assert isinstance(first, OSError) and "injected" in str(first)
        assert objectstore.get_all([uri], options) == [b"data"]
    finally:
        proxy.close()


def test_explicit_credentials_do_not_mix_with_the_environment(private_s3_options: dict[str, Any]) -> None:
    """The options' key and secret reach a second server, and the store signs with them alone: not with the
    environment's session token (moto accepts any, so the provider's credential is checked)."""
    fs = fsspec.filesystem("s3", **private_s3_options)
    fs.mkdir("private-objectstore")
    uri = "s3://private-objectstore/x.bin"
    objectstore.put_bytes(uri, b"private", private_s3_options)
    assert fs.cat_file("private-objectstore/x.bin") == b"private"
    store, _ = s3store.store_for(uri, private_s3_options)
    credential = store.credential_provider()
    assert (credential["access_key_id"], credential["token"]) == ("private", None)
