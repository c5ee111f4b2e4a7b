"""Progress of a run: a live one-line bar with images/s and ETA on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

logger = logging.getLogger("pipelines.segment")

LIVE_REFRESH_S = 0.25
LOG_EVERY_S = 15.0
BAR_WIDTH = 24


class Progress:
    """Images out of ``total``: segmented by the FCN actors (bar, rate, ETA) and written to Parquet
    (ok / error; behind by at most one part file). ``live`` draws a bar on ``stream`` (default: stderr
    if a TTY). Thread-safe: a poller may report ``segmented`` while the driver reports written rows."""

    def __init__(self, total: int, *, live: bool | None = None, stream: TextIO | None = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.segmented = 0
        self.ok = 0
        self.error = 0
        self.start = time.monotonic()
        self._shown = self.start
        self._lock = threading.Lock()
        if self.live:
            self._show(final=False)

    @property
    def done(self) -> int:
        """Images written (ok + error)."""
        return self.ok + self.error

    def set_segmented(self, count: int) -> None:
        """Record that the actors have segmented ``count`` images so far."""
        with self._lock:
            self.segmented = max(self.segmented, min(count, self.total))
            self._refresh()

    def update(self, ok: int, error: int) -> None:
        """Add ``ok`` and ``error`` written images and refresh the display if it is due."""
        with self._lock:
            self.ok += ok
            self.error += error
            self.segmented = max(self.segmented, self.done)
            self._refresh()

    def close(self) -> None:
        """Show the final line."""
        with self._lock:
            self._show(final=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.segmented / elapsed
        remaining = (self.total - self.segmented) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.segmented / self.total if self.total else 100.0
        return (
            f"{self.segmented}/{self.total} images ({pct:.1f}%) | written: ok {self.ok} error {self.error} | "
            f"{rate:.2f} img/s | elapsed {_duration(elapsed)} | ETA {_duration(remaining)}"
        )

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._shown >= (LIVE_REFRESH_S if self.live else LOG_EVERY_S) and self.done < self.total:
            self._shown = now
            self._show(final=False)

    def _show(self, *, final: bool) -> None:
        if self.live:
            filled = int(BAR_WIDTH * self.segmented / self.total) if self.total else BAR_WIDTH
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self.line()}\033[K" + ("\n" if final else ""))
            self.stream.flush()
        else:
            logger.info("progress: %s", self.line())


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Tally:
    """A running count of segmented images, run as a Ray actor that the FCN actors add to."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, images: int) -> None:
        self.count += images

    def get(self) -> int:
        return self.count
