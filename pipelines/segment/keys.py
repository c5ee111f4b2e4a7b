"""Image keys: an image's path relative to the input prefix, kept exactly as named (``relative_key``). The
rules on them: which keys are hidden files and not listed (``is_hidden_key``), the name of a key's outputs
(``output_name``), and why a key cannot name an output file (``unsafe_key_reason``).
"""

from __future__ import annotations

import posixpath
import unicodedata

MAX_KEY_SEGMENT_BYTES = 250  # file systems allow 255 per name; outputs add ".png" / ".jpg"
_NAME_ESCAPES = str.maketrans({"%": "%25", "?": "%3F", "#": "%23"})
HIDDEN_SEGMENT = r"(^|/)\.([^./][^/]*|\.[^/]+)"
"""A path segment starting with ``.`` other than ``.`` and ``..`` (see ``is_hidden_key``), as an RE2 pattern."""


def output_name(key: str) -> str:
    """The name of ``key``'s outputs below their folder (``masks/<name>.png``): the key with ``%``, ``?``
    and ``#`` percent-encoded, reversibly (``urllib.parse.unquote`` gives the key back). fsspec
    filesystems may read what follows ``?`` or ``#`` as a query or a fragment (s3fs cuts
    ``x?versionId=1.png`` to ``x``, version-aware gcsfs any ``?`` or ``#``), which would give two images
    one mask."""
    return key.translate(_NAME_ESCAPES)


def unsafe_key_reason(key: str) -> str | None:
    """Why an image key cannot name an output file under the output prefix, or None if it can.

    Keys are object names relative to the input prefix, kept as they are (``in/x.png`` and
    ``in//x.png`` are two objects); a key is written as ``masks/<key>.png`` only if each of its
    segments is a plain name: not empty, not ``.`` or ``..``, no backslash or control character (C0,
    DEL or C1: Unicode category Cc), at most ``MAX_KEY_SEGMENT_BYTES`` bytes as an output name.
    """
    for segment in key.split("/"):
        if not segment:
            return f"key {key!r} has an empty path segment"
        if segment in (".", ".."):
            return f"key {key!r} has a {segment!r} path segment"
        if "\\" in segment:
            return f"key {key!r} contains a backslash"
        if any(unicodedata.category(c) == "Cc" for c in segment):
            return f"key {key!r} contains a control character"
        size = len(output_name(segment).encode())
        if size > MAX_KEY_SEGMENT_BYTES:
            limit = MAX_KEY_SEGMENT_BYTES
            return f"key {key[:60]!r}... has a path segment of {size} bytes as an output name (at most {limit})"
    return None


def relative_key(path: str, prefix: str) -> str:
    """``path`` relative to ``prefix`` exactly as named (no normalisation: ``./`` or ``//`` inside an
    object name stay, so distinct objects keep distinct keys)."""
    if path.startswith(prefix + "/"):
        return path[len(prefix) + 1 :]
    return posixpath.relpath(path, prefix)


def is_hidden_key(key: str) -> bool:
    """True for hidden files and folders below the prefix (``.name``): tools' side files, temp files.
    ``.`` and ``..`` segments are not hidden names: such keys are listed (and refused when written)."""
    return any(part.startswith(".") and part not in (".", "..") for part in key.split("/"))
