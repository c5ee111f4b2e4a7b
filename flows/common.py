"""What the flows share: the retry policy of their I/O tasks and the artifact a failed run leaves."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common.storage import PERMANENT_IO_ERRORS

TRANSIENT_RETRIES = 3
RETRY_DELAYS = [2, 10, 30]


def is_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: I/O and network errors, but not missing files or permissions."""
    try:
        state.result()
    except PERMANENT_IO_ERRORS:
        return False
    except OSError:  # includes ConnectionError and TimeoutError
        return True
    except Exception:
        return False
    return False


def io_task(name: str) -> Any:
    """A task decorator that retries transient I/O errors (:func:`is_transient`) with backoff."""
    return task(
        name=name,
        retries=TRANSIENT_RETRIES,
        retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=is_transient,
        cache_policy=NO_CACHE,
    )


def shown_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as artifacts show them: storage options by their names only, since their values may
    hold credentials."""
    return {k: sorted(v) if k == "storage_options" and isinstance(v, dict) else v for k, v in params.items()}


def failure_artifact(flow_name: str, params: dict[str, Any], error: BaseException) -> None:
    """Record a failed run as a markdown artifact, so every run leaves one."""
    rows = "".join(f"| {k} | `{v}` |\n" for k, v in shown_parameters(params).items())
    create_markdown_artifact(
        f"# {flow_name}: failed\n\n**Error:** {type(error).__name__}: {error}\n\n"
        f"| parameter | value |\n|---|---|\n{rows}",
        key=flow_name,
        description=f"{flow_name} failed",
    )
