"""Segmentation pipeline parts without Ray: decoding, listing, stats files and resume bookkeeping, CLI errors."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from segment_cases import awkward_images, displayed, good_images, tiny_checkpoint, upload

from fcn.image import to_rgb_array
from pipelines.common.decode import DecodeError, decode_image
from pipelines.segment import main, resume
from pipelines.segment.listing import InputError, list_images
from pipelines.segment.masks import encode_mask, encode_overlay
from pipelines.segment.schema import SOURCE_SCHEMA, stats_schema
from pipelines.segment.write import write_part

REPO = Path(__file__).resolve().parents[1]


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(awkward_images()[0]))
def test_decode_gives_displayed_pixels_or_a_reason(key: str) -> None:
    files, expected = awkward_images()
    data = files[key]
    if expected[key] == "ok":
        rgb = decode_image(data, max_pixels=10**8)
        np.testing.assert_array_equal(rgb, to_rgb_array(displayed(data)))
        assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    else:
        with pytest.raises(DecodeError, match=re.escape(expected[key])):
            decode_image(data, max_pixels=10**8)


def test_exif_rotation_swaps_width_and_height() -> None:
    files, _ = awkward_images()
    stored = Image.open(io.BytesIO(files["odd/exif_rotated.jpg"]))
    rgb = decode_image(files["odd/exif_rotated.jpg"], max_pixels=10**8)
    assert stored.size == (60, 40) and rgb.shape[:2] == (60, 40)  # (W, H) stored -> (H, W) displayed


def test_pixel_limit_is_checked_from_the_header_and_names_the_flag() -> None:
    data = next(iter(good_images(count=1).values()))  # 64 x 48
    with pytest.raises(DecodeError, match=r"64x48 = 3,072 pixels.*--max-image-pixels"):
        decode_image(data, max_pixels=3000)
    assert decode_image(data, max_pixels=3072).shape == (48, 64, 3)


# --- masks -----------------------------------------------------------------------------------


def test_mask_is_an_indexed_png_with_the_palette() -> None:
    labels = np.array([[0, 1, 2], [3, 3, 0]], np.uint8)
    palette = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]
    mask = Image.open(io.BytesIO(encode_mask(labels, palette)))
    assert mask.mode == "P" and mask.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(mask), labels)
    assert mask.getpalette()[:12] == palette


def test_mask_with_more_than_256_classes_is_16_bit() -> None:
    labels = np.array([[0, 300], [65535, 7]], np.int32)
    mask = Image.open(io.BytesIO(encode_mask(labels, [])))
    np.testing.assert_array_equal(np.asarray(mask).astype(np.int64), labels)


# --- listing ---------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    upload(str(root), good_images(count=4))
    upload(str(root), {"notes.txt": b"not an image", ".hidden/x.jpg": b"", "photos/.cache.png": b""})
    return root


def test_prefix_lists_images_with_keys_relative_to_the_prefix(folder: Path) -> None:
    listing = list_images(str(folder), {}, exclude=str(folder / "photos" / "night"))
    keys = listing.images["key"].to_pylist()
    assert keys == sorted(keys) and keys == ["photos/day/img0_1.png", "photos/day/img0_2.jpg"]
    assert listing.kind == "prefix" and listing.ignored == 1  # notes.txt
    first = listing.images.slice(0, 1).to_pylist()[0]
    assert first["image_uri"] == f"file://{folder}/photos/day/img0_1.png"
    assert first["source_size"] == (folder / "photos/day/img0_1.png").stat().st_size
    assert first["source_mtime"].tzinfo is not None and first["source_etag"] is None


def test_glob_keys_are_relative_to_the_folder_before_the_wildcard(folder: Path) -> None:
    listing = list_images(f"{folder}/photos/*/*.png", {})
    assert listing.images["key"].to_pylist() == ["day/img0_1.png", "night/img0_3.png"]
    assert listing.kind == "glob"


def test_manifest_with_relative_absolute_missing_and_duplicate_entries(folder: Path, tmp_path: Path) -> None:
    manifest = folder / "list.txt"
    manifest.write_text(
        "# images to segment\n"
        "photos/day/img0_1.png\n"
        f"file://{folder}/photos/night/img0_0.jpg\n"
        "\n"
        "photos/day/img0_1.png\n"
        "photos/day/missing.jpg\n"
    )
    listing = list_images(str(manifest), {})
    assert listing.kind == "manifest"
    assert [(i["key"], i["source_size"] is None) for i in listing.images.to_pylist()] == [
        ("day/img0_1.png", False),
        ("day/missing.jpg", True),
        ("night/img0_0.jpg", False),
    ]


def test_an_inventory_lists_its_image_objects_with_arrow(tmp_path: Path) -> None:
    """A Parquet inventory (S3 Inventory's column names) without a bucket column: keys below its
    folder; non-images counted as ignored, hidden objects and the output prefix left out; sizes,
    etags (quotes trimmed) and mtimes carried. A CSV inventory with a header reads the same."""
    rows = {
        "key": ["a/x.jpg", "a/y.PNG", "notes.txt", "a/.cache/z.jpg", ".hidden.png", "out/masks/x.png", "b/../w.jpg"],
        "size": [10, 20, 30, 40, 50, 60, 70],
        "e_tag": ['"e1"', '"e2"', '"e3"', '"e4"', '"e5"', '"e6"', '"e7"'],
        "last_modified_date": [T0] * 7,
    }
    pq.write_table(pa.table(rows), tmp_path / "inventory.parquet")
    listing = list_images(str(tmp_path / "inventory.parquet"), {}, exclude=f"file://{tmp_path}/out")
    assert listing.kind == "inventory" and listing.prefix == f"file://{tmp_path}" and listing.ignored == 1
    assert listing.images.schema == SOURCE_SCHEMA
    assert listing.images.to_pylist() == [
        {
            "image_uri": f"file://{tmp_path}/{key}",
            "key": key,
            "source_size": size,
            "source_etag": etag,
            "source_mtime": T0,
        }
        for key, size, etag in (("a/x.jpg", 10, "e1"), ("a/y.PNG", 20, "e2"), ("b/../w.jpg", 70, "e7"))
    ]  # ".." is no hidden name: listed, then refused as a key when written (an error row)
    csv = tmp_path / "inventory.csv"
    csv.write_text("key,size\na/x.jpg,10\nb.txt,1\n")
    assert list_images(str(csv), {}).images.select(["key", "source_size"]).to_pylist() == [
        {"key": "a/x.jpg", "source_size": 10}
    ]
    pq.write_table(pa.table({"Key": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="has no 'key' column"):
        list_images(str(tmp_path / "bad.parquet"), {})
    pq.write_table(pa.table({"bucket": ["b1", "b2"], "key": ["a.jpg", "b.jpg"]}), tmp_path / "two.parquet")
    with pytest.raises(InputError, match="lists 2 buckets"):
        list_images(str(tmp_path / "two.parquet"), {})
    pq.write_table(pa.table({"bucket": ["photos"] * 2, "key": ["a.jpg", "b.jpg"]}), tmp_path / "s3.parquet")
    listing = list_images(str(tmp_path / "s3.parquet"), {})
    assert listing.prefix == "s3://photos" and listing.images["image_uri"].to_pylist() == [
        "s3://photos/a.jpg",
        "s3://photos/b.jpg",
    ]


def test_missing_or_empty_input_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        list_images(str(tmp_path / "nope"), {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        list_images(str(tmp_path / "empty"), {})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_prefix_is_listed_page_by_page_as_the_listing_goes(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Pages come while the prefix is being listed (a LIST page of S3, a directory elsewhere), not
    cut from one listing of the whole prefix: a key added after the first page shows up in a later one."""
    from pipelines.segment.listing import list_pages

    if where == "s3":
        root = request.getfixturevalue("s3_bucket") + "/in"
        first_keys, later_key = [f"k{i}.png" for i in range(5)], "z.png"
    else:
        root = str(tmp_path / "in")
        first_keys, later_key = ["a.png", "b.png", "sub/c.png"], "sub/z.png"
    upload(root, dict.fromkeys(first_keys, b"x"))
    fs, path = fsspec.core.url_to_fs(root)
    pages = list_pages(fs, path, page_rows=2)
    first = next(pages)
    upload(root, {later_key: b"x"})
    later = [info["name"] for page in pages for info in page]
    assert len(first) == 2 and len(later) >= 2
    assert [info["name"] for info in first] + later == [f"{path}/{key}" for key in [*first_keys, later_key]]


def test_s3_listing_keeps_every_awkward_key_and_matches_glob(s3_bucket: str) -> None:
    """Object names with '.', '..', empty segments, control characters, '?', '#' and '%' are listed as
    they are stored, page after page; hidden names, non-images and the excluded output are left out;
    sizes and etags are the store's; a glob lists what fsspec's glob matches."""
    keys = [
        "ok.png",
        "/x.png",
        "./dot.png",
        "../../escape.png",
        "a/../../b.png",
        "back\\slash.png",
        "tab\there.png",
        "nel\x85.png",
        "q?x=1.png",
        "h#f.png",
        "q%3Fx=1.png",
        "ünï/ç.JPG",
    ]
    left_out = ["notes.txt", ".hidden/x.png", "a/.cache.png", "out/masks/ok.png.png"]
    upload(f"{s3_bucket}/in", {key: key.encode() for key in [*keys, *left_out]})
    listing = list_images(f"{s3_bucket}/in", {}, exclude=f"{s3_bucket}/in/out", page_rows=2)
    assert listing.kind == "prefix" and listing.ignored == 1 and listing.prefix == f"{s3_bucket}/in"
    assert listing.images["key"].to_pylist() == sorted(keys)
    assert listing.images["image_uri"].to_pylist() == [f"{s3_bucket}/in/{key}" for key in sorted(keys)]
    fs, root = fsspec.core.url_to_fs(s3_bucket)
    stored = fs.find(f"{root}/in", detail=True)
    assert [(row["source_size"], row["source_etag"]) for row in listing.images.to_pylist()] == [
        (stored[f"{root}/in/{key}"]["size"], stored[f"{root}/in/{key}"]["ETag"].strip('"')) for key in sorted(keys)
    ]
    pattern = f"{s3_bucket}/in/*/*.png"
    globbed = list_images(pattern, {}, page_rows=2).images["image_uri"].to_pylist()
    hidden = {f"{root}/in/.hidden/x.png", f"{root}/in/a/.cache.png"}
    assert globbed == [fs.unstrip_protocol(p) for p in sorted(fs.glob(pattern)) if p not in hidden]
    assert f"{s3_bucket}/in/./dot.png" in globbed


# --- stats files and resume bookkeeping ------------------------------------------------------

SCHEMA = stats_schema(["bg", "fg"], [0, 0, 0, 255, 255, 255], {"uri": "m.pt", "version": "v0001"})
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _rows(keys: list[str], status: str, at: datetime, run_id: str, size: int = 10) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "key": k,
                "image_uri": f"s3://b/{k}",
                "source_size": size,
                "source_etag": f"e-{k}",
                "status": status,
                "model_id": "m.pt",
                "model_version": "v0001",
                "run_id": run_id,
                "processed_at": at,
                "pixel_counts": [1, 2] if status == "ok" else None,
            }
            for k in keys
        ],
        schema=SCHEMA,
    )


def test_compaction_keeps_the_newest_row_per_key_and_touches_only_superseded_files(tmp_path: Path) -> None:
    """A run that redoes b and adds d, after an interrupted run that left b twice: the files holding an
    older row of b are rewritten (or deleted when nothing is left), the file of a and c only if it held
    one, and an untouched file keeps its name and bytes."""
    stats_uri = str(tmp_path / "stats")
    write_part(stats_uri, _rows(["a", "c"], "error", T0, "run0"), "run0", {})
    untouched = next(Path(stats_uri).iterdir())
    before = untouched.read_bytes()
    write_part(stats_uri, _rows(["b", "e"], "error", T0, "run1"), "run1", {})
    write_part(stats_uri, _rows(["b"], "ok", T0 + timedelta(hours=1), "run1"), "run1", {})  # left twice
    previous = resume.read_state(stats_uri, {})
    write_part(stats_uri, _rows(["b", "d"], "ok", T0 + timedelta(hours=2), "run2"), "run2", {})
    written = resume.compact(stats_uri, {}, "run2", previous)
    assert sorted(written.to_pylist()) == ["b", "d"]
    table = duckdb.sql(
        f"select key, status, run_id, processed_at from read_parquet('{stats_uri}/**/*.parquet') order by key"
    ).fetchall()
    assert [(k, s, r) for k, s, r, _ in table] == [
        ("a", "error", "run0"),
        ("b", "ok", "run2"),
        ("c", "error", "run0"),
        ("d", "ok", "run2"),
        ("e", "error", "run1"),
    ]
    assert table[1][3] == T0 + timedelta(hours=2)
    assert untouched.exists() and untouched.read_bytes() == before  # it held no superseded row
    names = sorted(p.name for p in Path(stats_uri).iterdir())
    assert len(names) == 3 and sum(n.startswith("part-compacted-") for n in names) == 1  # e kept; the b-only file gone
    assert not [p for p in Path(stats_uri).iterdir() if not p.name.endswith(".parquet")]  # no temp files left
    assert json.loads(pq.read_schema(next(Path(stats_uri).glob("*.parquet"))).metadata[b"class_names"]) == ["bg", "fg"]


def test_a_runs_parts_are_merged_into_large_files_with_every_row(tmp_path: Path) -> None:
    """Seven one-row parts of a run, merged 3 rows at a time: three files (3 + 3 + 1 rows) hold the same
    rows; another run's part is not touched."""
    stats_uri = str(tmp_path / "stats")
    write_part(stats_uri, _rows(["z"], "ok", T0, "run0"), "run0", {})
    other = {p.name for p in Path(stats_uri).iterdir()}
    keys = list("abcdefg")
    for key in keys:
        write_part(stats_uri, _rows([key], "ok", T0, "run1"), "run1", {})
    before = resume.read_state(stats_uri, {}).drop_columns(["_file"]).sort_by("key")
    fs, root = fsspec.core.url_to_fs(stats_uri)
    resume.merge_run_parts(fs, root, "run1", rows=3)
    after = resume.read_state(stats_uri, {})
    assert after.drop_columns(["_file"]).sort_by("key").equals(before)
    sizes = sorted(pq.read_metadata(p).num_rows for p in Path(stats_uri).iterdir() if p.name not in other)
    assert sizes == [1, 3, 3] and other <= {p.name for p in Path(stats_uri).iterdir()}


def test_compaction_on_a_flaky_store_retries_its_writes_and_deletes(s3_endpoint: str, s3_bucket: str) -> None:
    """A rerun's compaction through a proxy whose first two PUTs and DELETEs of every stats object fail,
    the first after the store acted (a lost answer) and the second before: with retries it finishes
    with one newest row per key and no file twice; without, it fails and still loses no row."""
    from faulty_proxy import FaultyProxy

    proxy = FaultyProxy(s3_endpoint, failures=2, methods=("PUT", "DELETE"), faults=("lost", "500"))
    flaky = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    try:
        for stats_uri, retries in ((f"{s3_bucket}/retried/stats", 2), (f"{s3_bucket}/once/stats", 0)):
            write_part(stats_uri, _rows(["a", "c"], "ok", T0, "run1"), "run1", {})
            write_part(stats_uri, _rows(["b"], "error", T0, "run1"), "run1", {})
            previous = resume.read_state(stats_uri, {})
            write_part(stats_uri, _rows(["b", "c"], "ok", T0 + timedelta(hours=1), "run2"), "run2", {})
            if retries:
                written = resume.compact(stats_uri, flaky, "run2", previous, retries=retries)
                assert sorted(written.to_pylist()) == ["b", "c"]
            else:
                with pytest.raises(
                    OSError, match=r"^compaction: (writing|deleting) s3://.*/once/stats/part-.*: OSError: .*injected"
                ):
                    resume.compact(stats_uri, flaky, "run2", previous)
    finally:
        proxy.close()
    fs, bucket = fsspec.core.url_to_fs(s3_bucket)
    fs.invalidate_cache()
    faulted = {(method, path.rsplit("/", 1)[-1].split("-")[1]) for method, path in proxy.faulted if "/retried/" in path}
    assert faulted == {("PUT", "compacted"), ("DELETE", "run1")}  # the rewrite of a's file, both run1 files removed
    retried = pq.read_table(f"{bucket}/retried/stats", filesystem=fs)
    rows = sorted(zip(retried["key"].to_pylist(), retried["run_id"].to_pylist()))
    assert rows == [("a", "run1"), ("b", "run2"), ("c", "run2")]
    assert len(fs.find(f"{bucket}/retried/stats")) == 2  # run2's part and one compacted file
    once = pq.read_table(f"{bucket}/once/stats", filesystem=fs)
    assert {"a", "b", "c"} <= set(once["key"].to_pylist())  # a failed compaction loses nothing


def test_todo_images_need_ok_same_source_and_same_model(tmp_path: Path) -> None:
    stats_uri = str(tmp_path / "stats")
    write_part(stats_uri, _rows(["a", "b", "c", "d", "f"], "ok", T0, "run1"), "run1", {})
    write_part(stats_uri, _rows(["d"], "error", T0 + timedelta(hours=1), "run2"), "run2", {})
    state = resume.read_state(stats_uri, {})
    listing = pa.Table.from_pylist(
        [
            {"key": "a", "source_size": 10, "source_etag": "e-a"},  # unchanged -> done
            {"key": "b", "source_size": 11, "source_etag": "e-b"},  # size changed
            {"key": "c", "source_size": 10, "source_etag": "other"},  # etag changed
            {"key": "d", "source_size": 10, "source_etag": "e-d"},  # newest row is an error
            {"key": "e", "source_size": 10, "source_etag": "e-e"},  # new
            {"key": "f", "source_size": 10, "source_etag": None},  # etag gone: a changed source
        ],
        schema=SOURCE_SCHEMA,
    )
    todo = resume.todo_images(listing, state, "m.pt", "v0001")
    assert todo["key"].to_pylist() == ["b", "c", "d", "e", "f"]  # listing order kept
    assert resume.todo_images(listing, state, "m.pt", "v0002")["key"].to_pylist() == ["a", "b", "c", "d", "e", "f"]
    no_etags = pa.Table.from_pylist(
        [{"key": "m", "source_size": 10, "source_mtime": T0}, {"key": "n", "source_size": 10, "source_mtime": T0}],
        schema=SOURCE_SCHEMA,
    )
    rows = pa.Table.from_pylist(
        [
            {
                "key": k,
                "source_size": 10,
                "source_mtime": T0 + timedelta(seconds=i),
                "status": "ok",
                "model_id": "m.pt",
                "model_version": "v0001",
                "processed_at": T0,
            }
            for i, k in enumerate("mn")
        ],
        schema=SCHEMA,
    )
    write_part(str(tmp_path / "s2"), rows, "r", {})
    state = resume.read_state(str(tmp_path / "s2"), {})
    assert resume.todo_images(no_etags, state, "m.pt", "v0001")["key"].to_pylist() == ["n"]  # mtime differs by 1 s


# --- CLI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_checkpoint(str(tmp_path_factory.mktemp("model") / "model.pt"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--actors", "0"], "--actors: must be >= 1"),
        (["--actors", "8-2"], "--actors: must be >= 1, and MIN <= MAX"),
        (["--actors", "two"], "--actors: must be N or MIN-MAX"),
        (["--actors", "1-"], "--actors: must be N or MIN-MAX"),
        (["--gpu-wait-s", "-1"], "--gpu-wait-s: must be >= 0"),
        (["--batch-size", "x"], "argument --batch-size: invalid int value"),
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--storage-options", "{nope"], "--storage-options: not valid JSON"),
        (["--storage-options", "[1]"], "--storage-options: must be a JSON object"),
        (
            ["--storage-options", "@/nonexistent/options.json"],
            "--storage-options: cannot read /nonexistent/options.json",
        ),
        (["--model", "/nonexistent/model.pt"], "--model: no checkpoint at /nonexistent/model.pt"),
        (["--input", "/nonexistent/images"], "--input: /nonexistent/images does not exist"),
    ],
)
def test_bad_parameters_exit_2_naming_the_parameter(
    extra: list[str], message: str, folder: Path, tmp_path: Path, checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--input", str(folder), "--output", str(tmp_path / "out"), "--model", checkpoint, *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_actors_take_a_size_or_a_range_that_becomes_an_autoscaling_pool() -> None:
    """``--actors 4`` is a fixed pool, ``--actors 1-8`` one that Ray Data grows to 8 (each pending GPU
    actor asks the autoscaler for a node); by default a GPU pool may grow to what the node types hold, and
    CPU FCN actors share light workers."""
    from pipelines.segment import SegmentConfig
    from pipelines.segment.actors import actor_pool, default_actors, light_workers
    from pipelines.segment.cli import build_parser

    args = build_parser().parse_args(["--input", "i", "--output", "o", "--model", "m", "--actors", "1-8"])
    assert SegmentConfig(**vars(args)).actor_range() == (1, 8)
    assert SegmentConfig(input="i", output="o", model="m", actors=4).actor_range() == (4, 4)
    assert SegmentConfig(input="i", output="o", model="m", actors=" 2 - 3 ").actor_range() == (2, 3)
    assert SegmentConfig(input="i", output="o", model="m").actor_range() is None
    growing, fixed = actor_pool(1, 8), actor_pool(3, 3)
    assert (growing.min_size, growing.max_size) == (1, 8) and (fixed.min_size, fixed.max_size) == (3, 3)
    assert actor_pool(2, None).max_size == float("inf")
    cluster = {"CPU": 8.0, "GPU": 0.0}
    assert default_actors(True, cluster, 4, 2.0) == (1, 4)  # an idle cluster whose node types hold 4 GPUs
    assert default_actors(True, cluster | {"GPU": 2.0}, sys.maxsize, 2.0) == (2, None)
    assert default_actors(True, cluster | {"GPU": 2.0}, None, 2.0) == (2, 2)  # no autoscaler
    assert default_actors(False, cluster, None, 2.0) == (4, 4)
    # beside CPU FCN actors, a loader and a writer per 4 of them (at least one)
    assert [light_workers(n) for n in (1, 2, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]


def test_storage_options_from_a_file_or_inline_with_a_warning_for_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``@FILE`` reads the options from a file, silently; inline options with secret-looking names
    (nested ones too) warn, naming the option and the safe ways, never its value."""
    from conftest import OPTION_SECRET

    from pipelines.segment.cli import build_parser

    options = {"endpoint_url": "http://minio:9000", "client_kwargs": {"aws_session_token": OPTION_SECRET}}
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    required = ["--input", "i", "--output", "o", "--model", "m"]
    assert build_parser().parse_args([*required, "--storage-options", f"@{path}"]).storage_options == options
    assert capsys.readouterr().err == ""
    assert build_parser().parse_args([*required, "--storage-options", json.dumps(options)]).storage_options == options
    warning = capsys.readouterr().err
    assert "warning: aws_session_token given on the command line" in warning and "@FILE" in warning
    assert "AWS_SECRET_ACCESS_KEY" in warning and OPTION_SECRET not in warning
    build_parser().parse_args([*required, "--storage-options", '{"endpoint_url": "http://minio:9000"}'])
    assert capsys.readouterr().err == ""


def test_cli_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--input",
        "--output",
        "--model",
        "--ray-address",
        "--actors",
        "--device",
        "--storage-options",
        "--overlays",
    ):
        assert flag in help_text


def test_cli_bad_parameter_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.segment",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
            "--model",
            "m.pt",
            "--read-retries",
            "-1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--read-retries: must be >= 0" in bad.stderr and "Traceback" not in bad.stderr


# --- reading ---------------------------------------------------------------------------------


def test_read_sources_fetches_bytes_and_turns_missing_files_into_error_rows(folder: Path) -> None:
    from pipelines.segment.load import read_sources

    present = f"file://{folder}/photos/day/img0_1.png"
    batch = pa.table({"image_uri": [present, f"file://{folder}/gone.jpg"], "key": ["a", "b"]})
    out = read_sources(batch, storage_options={}, retries=2)
    assert out["data"].to_pylist() == [(folder / "photos/day/img0_1.png").read_bytes(), None]
    assert out["read_error"].to_pylist() == [None, "read: file not found"]
    assert out["key"].to_pylist() == ["a", "b"] and all(ms >= 0 for ms in out["read_ms"].to_pylist())


def test_read_sources_retries_transient_server_errors() -> None:
    """A real HTTP server on loopback answers 503 to the first request for each object."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipelines.segment.load import read_sources

    seen: set[str] = set()

    class FlakyStore(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            first = self.path not in seen
            seen.add(self.path)
            body = b"busy" if first else self.path.encode()
            self.send_response(503 if first else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyStore)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        batch = pa.table({"image_uri": [f"{base}/a.jpg", f"{base}/b.jpg"]})
        out = read_sources(batch, storage_options={}, retries=2)
        assert out["data"].to_pylist() == [b"/a.jpg", b"/b.jpg"] and out["read_error"].to_pylist() == [None, None]
        failing = read_sources(pa.table({"image_uri": [f"{base}/c.jpg"]}), storage_options={}, retries=0)
        assert failing["data"].to_pylist() == [None] and "503" in failing["read_error"][0].as_py()
    finally:
        server.shutdown()


def test_progress_bar_shows_rate_and_eta() -> None:
    from pipelines.segment.progress import Progress

    stream = io.StringIO()
    progress = Progress(10, live=True, stream=stream)
    progress.update(3, 1)
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith("[#########-") and "4/10 images (40.0%) | written: ok 3 error 1" in last
    assert "img/s" in last and "ETA" in last and last.endswith("\n")


def test_progress_counts_segmented_images_ahead_of_written_ones() -> None:
    from pipelines.segment.progress import Progress

    stream = io.StringIO()
    progress = Progress(10, live=True, stream=stream)
    progress.set_segmented(6)
    progress.set_segmented(5)  # a late poll never moves the bar back
    progress.close()
    assert "6/10 images (60.0%) | written: ok 0 error 0" in stream.getvalue().split("\r")[-1]
    progress.set_segmented(99)  # a batch retried after an actor died is counted twice: clamped
    progress.update(2, 0)
    assert (progress.segmented, progress.done) == (10, 2)


def test_overlay_tints_objects_and_leaves_background_untouched() -> None:
    rgb = np.full((8, 8, 3), 200, np.uint8)
    labels = np.zeros((8, 8), np.uint8)
    labels[:, 4:] = 1
    palette = [0, 0, 0, 255, 0, 0] + [0] * 762
    overlay = np.asarray(Image.open(io.BytesIO(encode_overlay(rgb, labels, palette))).convert("RGB")).astype(int)
    assert np.abs(overlay[:, :2] - 200).max() <= 3  # background keeps the photo (JPEG tolerance)
    assert overlay[:, 6:, 0].mean() > overlay[:, 6:, 1].mean() + 60  # class 1 is tinted red


# --- hostile keys and unusable outputs ----------------------------------------------------------


HOSTILE_KEYS = {
    "./dot.png": "'.' path segment",
    "/double.png": "empty path segment",
    "../../../escape.png": "'..' path segment",
    "a/../../../../escape2.png": "'..' path segment",
    "back\\slash.png": "backslash",
    "tab\there.png": "control character",
    "nel\x85.png": "control character",  # C1 controls, U+0080-U+009F
    "c1/\x80first.png": "control character",
    "c1/last\x9f.png": "control character",
    "x" * 251 + ".png": "path segment of 255 bytes",
    "y" * 248 + "?.png": "path segment of 255 bytes as an output name",  # '?' is written as '%3F'
}


@pytest.mark.parametrize("key", sorted(HOSTILE_KEYS))
def test_keys_that_would_leave_the_output_folder_are_named_and_never_become_paths(key: str) -> None:
    from pipelines.segment.keys import unsafe_key_reason
    from pipelines.segment.write import output_path

    assert HOSTILE_KEYS[key] in unsafe_key_reason(key)
    with pytest.raises(ValueError, match="key"):
        output_path("/out", "masks", key, ".png")
    assert unsafe_key_reason("photos/2026/a b.png") is None
    assert unsafe_key_reason("nbsp\xa0and\u00e9.png") is None  # the first characters past C1 are names
    assert output_path("/out", "masks", "photos/a.jpg", ".png") == "/out/masks/photos/a.jpg.png"


def test_output_names_escape_what_fsspec_would_read_as_a_query_and_give_the_key_back() -> None:
    """s3fs cuts a path at '?versionId=', gcsfs (version-aware) at '?' or '#': those characters, and '%'
    so that the escaping stays one-to-one, are percent-encoded in output names; unquote reverses it."""
    from urllib.parse import unquote

    from pipelines.segment.write import output_path

    keys = ["a.png", "a?versionId=1.png", "a?versionId=2.png", "a%3FversionId=1.png", "a#b.png", "a%23b.png", "%.png"]
    paths = [output_path("s3://b/out", "masks", key, ".png") for key in keys]
    assert paths[1] == "s3://b/out/masks/a%3FversionId=1.png.png"
    assert paths[3] == "s3://b/out/masks/a%253FversionId=1.png.png"
    assert len(set(paths)) == len(keys) and not any(c in path for path in paths for c in "?#")
    assert [unquote(path.removeprefix("s3://b/out/masks/").removesuffix(".png")) for path in paths] == keys


def test_local_and_manifest_inputs_list_every_file_and_refuse_unsafe_keys_unread(tmp_path: Path) -> None:
    """Local files may carry backslashes, control characters and long names: each is listed with
    its own key and becomes a 'key:' error row without being read."""
    from pipelines.segment.load import load_images

    good = next(iter(good_images(count=1).values()))
    names = ["ok.png", "back\\slash.png", "tab\there.png", "x" * 251 + ".png"]
    for name in names:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(good)
    (tmp_path / "in" / "todo.txt").write_text("".join(f"{name}\n" for name in names if "\n" not in name))
    for uri in (str(tmp_path / "in"), str(tmp_path / "in" / "todo.txt")):
        listing = list_images(uri, {})
        assert sorted(listing.images["key"].to_pylist()) == sorted(names)
        sources = listing.images
        loaded = load_images(sources, storage_options={}, retries=0, max_image_pixels=10**8, device_jpegs=False)
        rows = {row["key"]: row for row in loaded.select(["key", "error", "read_ms", "width"]).to_pylist()}
        assert rows["ok.png"]["error"] is None and rows["ok.png"]["width"] == 64
        for name in names[1:]:
            assert rows[name]["error"].startswith("key: ") and rows[name]["read_ms"] is None  # never read


def test_an_output_that_cannot_be_written_is_refused_before_any_image(
    folder: Path, tmp_path: Path, checkpoint: str, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import fsspec as fsspec_

    (tmp_path / "a-file").write_text("not a folder")
    for output, reason in (
        (str(tmp_path / "a-file" / "out"), "NotADirectoryError"),
        ("s3://no-such-bucket-here/out", "FileNotFoundError"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--input", str(folder), "--output", output, "--model", checkpoint])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--output: cannot write to" in err and reason in err, err
    assert not fsspec_.filesystem("s3", skip_instance_cache=True).exists("no-such-bucket-here")  # not created


def test_the_rows_that_ended_processes_are_counted_per_row_and_window() -> None:
    """The tally's record of rows in calls: a key is charged once per call that never cleared it (its process
    died); a window of a tiled image is a row of its own, apart from its image's other windows."""
    from pipelines.segment.crashes import row_keys
    from pipelines.segment.progress import Tally

    batch = pa.table(
        {
            "image_uri": ["s3://b/a.jpg", "s3://b/big.tif", "s3://b/big.tif"],
            "window": pa.array([None, [0, 2048, 0, 2048], [0, 2048, 1472, 3520]], pa.list_(pa.int64())),
        }
    )
    keys = row_keys(batch)
    assert len(set(keys)) == 3 and keys[0] == "s3://b/a.jpg"
    tally = Tally()
    assert tally.in_flight(keys) == [0, 0, 0]  # a call that dies with them
    assert tally.in_flight(keys) == [1, 1, 1]  # its retry
    tally.done(keys)
    assert tally.in_flight(keys[2:]) == [1]  # the windows alone: the second one dies too
    assert tally.in_flight(keys) == [1, 1, 2]
    tally.done(keys)
    assert tally.in_flight(keys[:1]) == [1]
    tally.done(keys[:1])
    tally.done(keys[:1])
    assert tally.in_flight(keys[:1]) == [0]  # cleared by the calls that finished
