"""Progress of a run: a live one-line bar with images/s and ETA on a terminal, periodic log lines otherwise; the
windows of tiled images are counted beside the images (their images' rows come after the pipeline)."""

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
    """Images out of ``total`` and windows of tiled images out of ``windows``: segmented by the FCN actors (bar,
    rate, ETA; an image and a window count alike) and written (images to Parquet, ok / error, behind by at most one
    part file; windows as tile parts). ``live`` draws a bar on ``stream`` (default: stderr if a TTY). Thread-safe: a
    poller may report what is segmented while the driver reports what is written."""

    def __init__(self, total: int, *, windows: int = 0, live: bool | None = None, stream: TextIO | None = None):
        self.total = total
        self.windows = windows
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.segmented = 0
        self.segmented_windows = 0
        self.ok = 0
        self.error = 0
        self.written_windows = 0
        self.start = time.monotonic()
        self._shown = self.start
        self._lock = threading.Lock()
        if self.live:
            self._show(final=False)

    @property
    def done(self) -> int:
        """Images written (ok + error)."""
        return self.ok + self.error

    def set_segmented(self, count: int, windows: int = 0) -> None:
        """Record that the actors have segmented ``count`` images and ``windows`` windows so far."""
        with self._lock:
            self.segmented = max(self.segmented, min(count, self.total))
            self.segmented_windows = max(self.segmented_windows, min(windows, self.windows))
            self._refresh()

    def update(self, ok: int, error: int, windows: int = 0) -> None:
        """Add ``ok`` and ``error`` written images and ``windows`` written windows, and refresh the display if it is
        due."""
        with self._lock:
            self.ok += ok
            self.error += error
            self.written_windows += windows
            self.segmented = max(self.segmented, self.done)
            self.segmented_windows = max(self.segmented_windows, min(self.written_windows, self.windows))
            self._refresh()

    def close(self) -> None:
        """Show the final line."""
        with self._lock:
            self._show(final=True)

    @property
    def fraction(self) -> float:
        """The share of the work segmented, an image and a window counting alike."""
        work = self.total + self.windows
        return (self.segmented + self.segmented_windows) / work if work else 1.0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.segmented + self.segmented_windows) / elapsed
        work = self.total + self.windows
        remaining = (work - self.segmented - self.segmented_windows) / rate if rate > 0 else float("inf")
        counts = [f"{self.segmented}/{self.total} images"] if self.total or not self.windows else []
        counts += [f"windows {self.segmented_windows}/{self.windows}"] if self.windows else []
        written = f"ok {self.ok} error {self.error}" + (f" windows {self.written_windows}" if self.windows else "")
        rates = [f"{self.segmented / elapsed:.2f} img/s"] if self.total or not self.windows else []
        rates += [f"{self.segmented_windows / elapsed:.2f} windows/s"] if self.windows else []
        return (
            f"{' '.join(counts)} ({100.0 * self.fraction:.1f}%) | written: {written} | {' '.join(rates)} | "
            f"elapsed {_duration(elapsed)} | ETA {_duration(remaining)}"
        )

    def _refresh(self) -> None:
        now = time.monotonic()
        unwritten = self.done < self.total or self.written_windows < self.windows
        if now - self._shown >= (LIVE_REFRESH_S if self.live else LOG_EVERY_S) and unwritten:
            self._shown = now
            self._show(final=False)

    def _show(self, *, final: bool) -> None:
        if self.live:
            filled = int(BAR_WIDTH * self.fraction)
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
    """A run's Ray actor for its workers' shared counts: the segmented images and windows that the FCN actors
    add to, and the rows in the loaders' and FCN actors' calls (``pipelines.segment.crashes``)."""

    def __init__(self) -> None:
        self.images = 0
        self.windows = 0
        self.calls: dict[str, int] = {}  # row key: calls that took the row and have not cleared it

    def add(self, images: int, windows: int = 0) -> None:
        self.images += images
        self.windows += windows

    def get(self) -> tuple[int, int]:
        return self.images, self.windows

    def in_flight(self, keys: list[str]) -> list[int]:
        """Record ``keys`` as in a call; returns, per key, the calls that took it before and never cleared it
        (their processes died)."""
        before = [self.calls.get(key, 0) for key in keys]
        for key in keys:
            self.calls[key] = self.calls.get(key, 0) + 1
        return before

    def done(self, keys: list[str]) -> None:
        """Clear one call's record of ``keys``."""
        for key in keys:
            if self.calls.get(key, 0) > 1:
                self.calls[key] -= 1
            else:
                self.calls.pop(key, None)
