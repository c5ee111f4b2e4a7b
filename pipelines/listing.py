"""Resolve a segmentation input (prefix, glob or manifest file on any fsspec filesystem) to images.

Each image gets a *key*: its path relative to the input prefix. Keys name the outputs
(``masks/<key>.png``) and identify an image across runs, together with its size and etag/mtime.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
GLOB_CHARS = "*?["
MAX_KEY_SEGMENT_BYTES = 250  # file systems allow 255 per name; outputs add ".png" / ".jpg"
_STAT_THREADS = 32


class InputError(ValueError):
    """The input URI does not name any readable images."""


@dataclass(frozen=True)
class Listing:
    """The images of one input: ``prefix`` (URI all keys are relative to), ``kind`` and the images.

    Every image is a dict with ``image_uri``, ``key``, ``source_size``, ``source_etag`` (str | None)
    and ``source_mtime`` (aware datetime | None); size is None for a manifest entry that is missing.
    """

    prefix: str
    kind: str  # "prefix" | "glob" | "manifest" | "file"
    images: list[dict[str, Any]]
    ignored: int  # files under a prefix that are not images by extension


def list_images(uri: str, storage_options: dict[str, Any], *, exclude: str | None = None) -> Listing:
    """List the images named by ``uri``; ``exclude`` is a URI prefix to leave out (e.g. the output).

    - a glob (``*``, ``?``, ``[``): every match, keys relative to the directory before the first wildcard;
    - a directory/prefix: every file below it with an image extension;
    - a file with an image extension: that one image;
    - any other file: a manifest, one URI (or path relative to the manifest) per line, ``#`` comments.
    Raises InputError naming the problem if nothing is found.
    """
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    path = path.rstrip("/")
    fs.invalidate_cache()  # listings may be cached from an earlier run in this process
    if any(c in path for c in GLOB_CHARS):
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
        prefix, kind = _glob_root(path), "glob"
    elif fs.isdir(path):
        found, prefix, kind = fs.find(path, detail=True), path, "prefix"
    elif fs.isfile(path):
        if not _is_image(path):
            return _list_manifest(fs, path, storage_options)
        found, prefix, kind = {path: fs.info(path)}, posixpath.dirname(path), "file"
    else:
        raise InputError(f"{uri} does not exist (not a file, folder/prefix or glob with matches)")
    excluded = fs._strip_protocol(exclude).rstrip("/") if exclude else None
    images, ignored = [], 0
    for p, info in sorted(found.items()):
        if excluded and (p == excluded or p.startswith(excluded + "/")):
            continue
        record = _record(fs, p, info, prefix)
        if _hidden(record["key"]):
            continue
        if kind == "prefix" and not _is_image(p):
            ignored += 1
            continue
        images.append(record)
    if not images:
        raise InputError(f"no images found at {uri} (image extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return Listing(prefix=fs.unstrip_protocol(prefix), kind=kind, images=images, ignored=ignored)


def _list_manifest(fs: fsspec.AbstractFileSystem, path: str, storage_options: dict[str, Any]) -> Listing:
    """A text file of image URIs; relative entries are relative to the manifest's folder."""
    text = fs.cat_file(path)
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{fs.unstrip_protocol(path)} is neither an image nor a UTF-8 manifest of image URIs") from None
    base = posixpath.dirname(path)
    entries: dict[str, tuple[fsspec.AbstractFileSystem, str]] = {}
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" in entry:
            entry_fs, entry_path = fsspec.core.url_to_fs(entry, **storage_options)
        else:
            entry_fs, entry_path = fs, posixpath.normpath(posixpath.join(base, entry))
        entries.setdefault(entry_fs.unstrip_protocol(entry_path), (entry_fs, entry_path))
    if not entries:
        raise InputError(f"manifest {fs.unstrip_protocol(path)} lists no images")
    paths = [p for _, p in entries.values()]
    prefix = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if len({f.protocol for f, _ in entries.values()}) == 1 else ""

    def stat(item: tuple[fsspec.AbstractFileSystem, str]) -> dict[str, Any]:
        entry_fs, entry_path = item
        try:
            info = entry_fs.info(entry_path)
        except FileNotFoundError:
            info = {"size": None}
        return _record(entry_fs, entry_path, info, prefix)

    with ThreadPoolExecutor(_STAT_THREADS) as pool:
        images = sorted(pool.map(stat, entries.values()), key=lambda r: r["key"])
    return Listing(prefix=fs.unstrip_protocol(prefix) if prefix else "", kind="manifest", images=images, ignored=0)


def unsafe_key_reason(key: str) -> str | None:
    """Why an image key cannot name an output file under the output prefix, or None if it can.

    Keys are object names relative to the input prefix, kept as they are (``in/x.png`` and
    ``in//x.png`` are two objects); a key is written as ``masks/<key>.png`` only if each of its
    segments is a plain name: not empty, not ``.`` or ``..``, no backslash or control character, at
    most ``MAX_KEY_SEGMENT_BYTES`` bytes.
    """
    for segment in key.split("/"):
        if not segment:
            return f"key {key!r} has an empty path segment"
        if segment in (".", ".."):
            return f"key {key!r} has a {segment!r} path segment"
        if "\\" in segment:
            return f"key {key!r} contains a backslash"
        if any(ord(c) < 32 or ord(c) == 127 for c in segment):
            return f"key {key!r} contains a control character"
        if len(segment.encode()) > MAX_KEY_SEGMENT_BYTES:
            return f"key {key[:60]!r}... has a path segment of {len(segment.encode())} bytes (at most {MAX_KEY_SEGMENT_BYTES})"
    return None


def _relative_key(path: str, prefix: str) -> str:
    """``path`` relative to ``prefix`` exactly as named (no normalisation: ``./`` or ``//`` inside an
    object name stay, so distinct objects keep distinct keys)."""
    if path.startswith(prefix + "/"):
        return path[len(prefix) + 1 :]
    return posixpath.relpath(path, prefix)


def _record(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any], prefix: str) -> dict[str, Any]:
    key = _relative_key(path, prefix.rstrip("/")) if prefix else fs.unstrip_protocol(path).replace("://", "/", 1)
    etag = info.get("ETag") or info.get("etag")
    return {
        "image_uri": fs.unstrip_protocol(path),
        "key": key,
        "source_size": info.get("size"),
        "source_etag": str(etag).strip('"') if etag else None,
        "source_mtime": _mtime(info),
    }


def _mtime(info: dict[str, Any]) -> datetime | None:
    """The modification time from an fsspec info dict (local, S3, GCS, Azure, memory spellings)."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, timezone.utc)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def _glob_root(pattern: str) -> str:
    first = min(pattern.index(c) for c in GLOB_CHARS if c in pattern)
    return posixpath.dirname(pattern[:first])


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _hidden(key: str) -> bool:
    """True for hidden files and folders below the prefix (``.name``): tools' side files, temp files.
    ``.`` and ``..`` segments are not hidden names: such keys are listed (and refused when written)."""
    return any(part.startswith(".") and part not in (".", "..") for part in key.split("/"))
