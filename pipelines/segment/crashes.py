"""Rows that end a worker's process: found and turned into error rows instead of being retried forever.

Ray Data restarts a loader or FCN actor whose process died and retries its batch without limit (which a lost
node needs). An image that kills the process every time (a decoder's crash, a fatal device error, the
out-of-memory killer) would keep the run from finishing. Each call records its rows in the run's ``Tally``
before it works on them (``in_flight``) and clears them after (``done``), so a retried batch knows a process
died with it: its rows are then taken one at a time, and a row that was in flight at ``CRASH_LIMIT`` deaths,
the last of them alone, becomes an error row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

CRASH_LIMIT = 2
"""Deaths of a worker's process with a row in its call after which the row is given up (the last one alone)."""


def row_keys(batch: pa.Table) -> list[str]:
    """One key per row of the job's tables: the image's URI, and the window's bounds for a window of a tiled image."""
    uris = batch["image_uri"].to_pylist()
    if "window" not in batch.column_names:
        return uris
    return [uri if window is None else f"{uri}#{window}" for uri, window in zip(uris, batch["window"].to_pylist())]


def isolate_crashes(
    process: Callable[[pa.Table], pa.Table],
    batch: pa.Table,
    tally: Any | None,
    give_up: Callable[[pa.Table, int], pa.Table],
    stage: str,
) -> pa.Table:
    """``process(batch)``, with ``batch``'s rows recorded in flight in ``tally`` (a ``Tally`` actor) meanwhile,
    under ``stage``'s name. A batch that was in flight when a process died is processed row by row; a row that was
    in flight at ``CRASH_LIMIT`` deaths becomes ``give_up(row, deaths)``. Without a tally (no Ray) it is
    ``process(batch)``."""
    if tally is None:
        return process(batch)
    import ray

    keys = [f"{stage}:{key}" for key in row_keys(batch)]
    deaths = ray.get(tally.in_flight.remote(keys))
    if batch.num_rows > 1 and any(deaths):  # a process died with this batch: take its rows one at a time
        tally.done.remote(keys)  # (ordered before the rows' own calls: one caller's calls to an actor keep order)
        return pa.concat_tables(
            [isolate_crashes(process, batch.slice(i, 1), tally, give_up, stage) for i in range(batch.num_rows)]
        )
    result = give_up(batch, deaths[0]) if deaths and deaths[0] >= CRASH_LIMIT else process(batch)
    tally.done.remote(keys)
    return result
