"""moto's S3 server, answering a ranged GET by reading only the range, as S3 does.

moto 5.2 answers ``GET`` with ``Range: bytes=first-last`` by reading the object's whole value
(``S3Response.get_object`` returns ``FakeKey.value``) and slicing it afterwards (``_handle_range_header``).
A gigapixel TIFF is read as thousands of ranged GETs of a few tiles each, so with moto every one of them copied
the whole file (hundreds of MB) in the server. This runs moto's own server with one change: while a GET with a
single ``bytes=first-last`` range is answered, ``FakeKey.value`` is a view whose length is the object's size
and whose slice reads only those bytes from the stored file. Every other request is moto's, unchanged.

    .venv/bin/python -m bench.ranged_moto -H 127.0.0.1 -p 5000
"""

from __future__ import annotations

import re
import threading
from typing import Any

from moto.s3.models import FakeKey
from moto.s3.responses import S3Response
from moto.server import main

SINGLE_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_answering = threading.local()


class StoredBytes:
    """An object's bytes as moto's range handling uses them: their length, and a slice read from the store."""

    def __init__(self, key: FakeKey) -> None:
        self._key = key

    def __len__(self) -> int:
        return self._key.size

    def __getitem__(self, part: slice) -> bytes:
        with self._key.lock:
            self._key._value_buffer.seek(part.start)
            return self._key._value_buffer.read(part.stop - part.start)


_whole_value = FakeKey.value


def _value(key: FakeKey) -> bytes | StoredBytes:
    return StoredBytes(key) if getattr(_answering, "range", False) else _whole_value.fget(key)


_key_response = S3Response.key_response


def _ranged_key_response(self: S3Response, request: Any, full_url: str, headers: Any) -> Any:
    match = SINGLE_RANGE.fullmatch(request.headers.get("range", "")) if request.method == "GET" else None
    _answering.range = match is not None and int(match[1]) <= int(match[2])
    try:
        return _key_response(self, request, full_url, headers)
    finally:
        _answering.range = False


FakeKey.value = property(_value, _whole_value.fset)
S3Response.key_response = _ranged_key_response

if __name__ == "__main__":
    main()
