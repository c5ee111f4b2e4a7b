"""Model registry: versions, champion pointer, promote-if-better with a margin, atomic pointer, on local disk and S3."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import fsspec
import pytest

from fcn import registry


def _checkpoint(fs_uri: str, payload: bytes) -> str:
    with fsspec.open(fs_uri, "wb") as f:
        f.write(payload)
    return fs_uri


@pytest.fixture(params=["local", "s3"])
def registry_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_bucket") + "/registry"


def test_register_and_promote_with_margin(registry_uri: str) -> None:
    assert registry.get_champion(registry_uri) is None
    assert registry.resolve_checkpoint_uri(registry_uri) == registry_uri  # no champion -> unchanged
    run = _checkpoint(f"{registry_uri}/runs/r1/epoch-0001/checkpoint.pt", b"weights-1")

    v1 = registry.register_model(registry_uri, run, {"mean_iu": 0.50, "run_name": "r1"})
    assert v1 == "v0001" and registry.list_versions(registry_uri) == ["v0001"]
    assert registry.promote_if_better(registry_uri, v1, margin=0.01).promote  # no champion yet
    champion = registry.get_champion(registry_uri)
    assert champion["version"] == "v0001" and champion["metrics"]["mean_iu"] == 0.50
    assert champion["checkpoint"].endswith("models/v0001/checkpoint.pt")
    assert registry.resolve_checkpoint_uri(registry_uri) == champion["checkpoint"]
    with fsspec.open(champion["checkpoint"], "rb") as f:
        assert f.read() == b"weights-1"

    v2 = registry.register_model(registry_uri, _checkpoint(f"{registry_uri}/x.pt", b"weights-2"), {"mean_iu": 0.505})
    assert v2 == "v0002"
    assert not registry.promote_if_better(registry_uri, v2, margin=0.01).promote  # better, but not by the margin
    assert registry.get_champion(registry_uri)["version"] == "v0001"
    v3 = registry.register_model(registry_uri, _checkpoint(f"{registry_uri}/y.pt", b"weights-3"), {"mean_iu": 0.52})
    assert registry.promote_if_better(registry_uri, v3, margin=0.01).promote
    assert registry.get_champion(registry_uri)["version"] == "v0003"
    assert not registry.promote_if_better(registry_uri, v1).promote  # worse never replaces the champion
    assert registry.list_versions(registry_uri) == ["v0001", "v0002", "v0003"]
    assert registry.read_version(registry_uri, "v0002")["metrics"]["mean_iu"] == 0.505
    v4 = registry.register_model(registry_uri, run, {"mean_iu": float("nan")})
    assert not registry.promote_if_better(registry_uri, v4).promote  # an undefined score never wins


def test_promotion_rule_margin_ties_nan_and_no_champion() -> None:
    """One rule for the CLI (stored champion score) and the nightly flow (champion re-scored)."""
    nan = float("nan")
    assert registry.decide_promotion(0.3, None, 0.1) == registry.PromotionDecision(True, "no champion yet")
    assert registry.decide_promotion(0.52, 0.5, 0.01).promote
    assert not registry.decide_promotion(0.51, 0.5, 0.01).promote  # a tie with champion + margin does not win
    assert not registry.decide_promotion(0.5, 0.5).promote  # nor an equal score
    assert not registry.decide_promotion(0.505, 0.5, 0.01).promote  # better, but not by the margin
    for candidate, champion in [(nan, None), (nan, 0.1), (0.9, nan)]:  # an undefined score never wins
        assert not registry.decide_promotion(candidate, champion).promote
    assert "undefined" in registry.decide_promotion(nan, 0.1).reason
    reason = registry.decide_promotion(0.4, 0.3, 0.05, champion_name="champion v0001").reason
    assert reason == "candidate mean IU 0.4000 > champion v0001 0.3000 + margin 0.05"
    assert "<= champion" in registry.decide_promotion(0.3, 0.4).reason
    with pytest.raises(ValueError, match="margin"):
        registry.decide_promotion(0.5, 0.4, -0.1)


def test_concurrent_registrations_get_distinct_versions(registry_uri: str) -> None:
    """Writers racing for the next version number: each ends with its own version and its own bytes."""
    writers = 6
    sources = [_checkpoint(f"{registry_uri}/src/{i}.pt", f"weights-{i}".encode()) for i in range(writers)]
    registry.register_model(registry_uri, sources[0], {"mean_iu": 0.1})
    start = threading.Barrier(writers)
    versions: dict[int, str] = {}

    def register(i: int) -> None:
        start.wait()
        versions[i] = registry.register_model(registry_uri, sources[i], {"mean_iu": 0.2, "writer": i})

    threads = [threading.Thread(target=register, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions.values()) == [f"v{n:04d}" for n in range(2, writers + 2)]
    for i, version in versions.items():
        entry = registry.read_version(registry_uri, version)
        assert entry["metrics"]["writer"] == i
        with fsspec.open(entry["checkpoint"], "rb") as f:
            assert f.read() == f"weights-{i}".encode()


def test_bad_inputs(tmp_path: Path) -> None:
    uri = str(tmp_path)
    with pytest.raises(ValueError, match="no model version 'v0009'"):
        registry.promote(uri, "v0009")
    with pytest.raises(ValueError, match="mean_iu"):
        registry.register_model(uri, _checkpoint(f"{uri}/c.pt", b"x"), {"loss": 1.0})
    with pytest.raises(ValueError, match="margin"):
        registry.promote_if_better(uri, "v0001", margin=-1)


def test_local_promotion_is_atomic_for_readers(tmp_path: Path) -> None:
    """Readers polling champion.json while versions are promoted back and forth always parse a whole file."""
    uri = str(tmp_path)
    for i in range(2):
        registry.register_model(uri, _checkpoint(f"{uri}/c{i}.pt", b"w"), {"mean_iu": 0.1 * i, "pad": "x" * 200_000})
    registry.promote(uri, "v0001")
    stop = threading.Event()
    seen: list[str] = []
    errors: list[Exception] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads((tmp_path / "champion.json").read_bytes())["version"])
            except Exception as exc:  # a torn read would show up here
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(20):
        registry.promote(uri, f"v000{1 + i % 2}")
    stop.set()
    thread.join()
    assert not errors and seen and set(seen) <= {"v0001", "v0002"}
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind


def test_a_write_cut_off_before_its_rename_leaves_no_file_that_a_folder_reader_reads(tmp_path: Path) -> None:
    """A writer killed between writing and renaming (as a Ray actor ended with its interrupted driver)
    leaves its temporary file; it is hidden, so reading the folder (pyarrow, as a user does) sees only
    whole files. A write that fails instead (here the rename: the target is a folder) removes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = tmp_path / "stats"
    stats.mkdir()
    pq.write_table(pa.table({"key": ["a"]}), stats / "part-a.parquet")
    killed = textwrap.dedent(
        f"""
        import io, os, signal
        import fsspec, pyarrow as pa, pyarrow.parquet as pq
        from fcn import registry

        row = io.BytesIO()
        pq.write_table(pa.table({{"key": ["b"]}}), row)
        fs = fsspec.filesystem("file")

        def write_then_die(target):
            fs.pipe_file(target, row.getvalue())
            os.kill(os.getpid(), signal.SIGKILL)

        registry.replace_atomically(fs, {str(stats / "part-b.parquet")!r}, write_then_die)
        """
    )
    result = subprocess.run([sys.executable, "-c", killed], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert [p.name.startswith(".part-b.parquet.") for p in stats.glob("*.tmp")] == [True]
    assert pq.read_table(stats)["key"].to_pylist() == ["a"]

    (stats / "part-c.parquet").mkdir()
    (stats / "part-c.parquet" / ".keep").touch()  # a folder that os.replace cannot overwrite
    with pytest.raises(OSError):
        registry.write_atomic(fsspec.filesystem("file"), str(stats / "part-c.parquet"), b"c")
    assert not list(stats.glob(".part-c.parquet.*"))


def test_copied_registry_resolves_to_its_own_champion(tmp_path: Path) -> None:
    """champion.json points inside the registry, so a copied registry does not point back to the original."""
    original = str(tmp_path / "original")
    version = registry.register_model(original, _checkpoint(f"{original}/a.pt", b"weights-a"), {"mean_iu": 0.4})
    registry.promote(original, version)
    copy = f"memory://{tmp_path.name}/copy"
    fsspec.filesystem("memory").put(original, copy.removeprefix("memory://"), recursive=True)
    resolved = registry.resolve_checkpoint_uri(copy)
    assert resolved.startswith("memory://") and resolved.endswith("models/v0001/checkpoint.pt")
    with fsspec.open(resolved, "rb") as f:
        assert f.read() == b"weights-a"
