"""The column declarations of the segmentation job (``pipelines.segment.schema``): the Parquet schema they
make is the one existing outputs have, and a column that is not declared is an error naming it."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pyarrow as pa
import pytest

from pipelines.segment import schema

# The stats schema of a two-head model (semantic, geometric) as outputs written before the columns were
# declared in one module have it: names, types (list items named "item") and order.
EXISTING_TWO_HEAD_SCHEMA = [
    ("image_uri", "string"),
    ("key", "string"),
    ("source_size", "int64"),
    ("source_etag", "string"),
    ("source_mtime", "timestamp[us, tz=UTC]"),
    ("width", "int32"),
    ("height", "int32"),
    ("model_id", "string"),
    ("model_version", "string"),
    ("pixel_counts", "list<item: int64>"),
    ("class_fractions", "list<item: double>"),
    ("dominant_class", "int32"),
    ("dominant_class_name", "string"),
    ("mean_confidence", "double"),
    ("mask_uri", "string"),
    ("overlay_uri", "string"),
    ("read_ms", "double"),
    ("decode_ms", "double"),
    ("inference_ms", "double"),
    ("write_ms", "double"),
    ("status", "string"),
    ("error", "string"),
    ("run_id", "string"),
    ("processed_at", "timestamp[us, tz=UTC]"),
    ("geometric_mask_uri", "string"),
    ("geometric_pixel_counts", "list<item: int64>"),
    ("geometric_class_fractions", "list<item: double>"),
    ("geometric_dominant_class", "int32"),
    ("geometric_dominant_class_name", "string"),
    ("geometric_mean_confidence", "double"),
]
HEADS = {
    "semantic": {"class_names": ["bg", "fg"], "palette": [0, 0, 0, 255, 255, 255]},
    "geometric": {"class_names": ["sky", "ground"], "palette": [0, 0, 255, 0, 255, 0]},
}


def test_the_parquet_schema_is_the_one_existing_outputs_have() -> None:
    two_heads = schema.stats_schema(["bg", "fg"], [0, 0, 0, 255, 255, 255], {}, HEADS)
    one_head = schema.stats_schema(["bg", "fg"], [0, 0, 0, 255, 255, 255], {})
    assert [(f.name, str(f.type)) for f in two_heads] == EXISTING_TWO_HEAD_SCHEMA
    assert [(f.name, str(f.type)) for f in one_head] == EXISTING_TWO_HEAD_SCHEMA[:24]
    assert all(f.nullable for f in two_heads)
    assert one_head.names == schema.STATS_COLUMNS
    assert schema.SOURCE_SCHEMA.names == one_head.names[:5]
    # each field carries its description; a further head's says whose it is
    assert one_head.field("key").metadata[b"description"].startswith(b"path of the image relative")
    geometric = two_heads.field("geometric_mean_confidence").metadata[b"description"]
    assert geometric == b"geometric head: " + one_head.field("mean_confidence").metadata[b"description"]


def test_an_undeclared_column_is_an_error_naming_it() -> None:
    table = pa.table({"key": ["a.jpg"]})
    with pytest.raises(ValueError, match=r"column 'sharpness' is not declared in pipelines/segment/schema.py"):
        schema.with_columns(table, {"sharpness": [0.5]}, schema.SEGMENT)
    with pytest.raises(ValueError, match=r"column 'geometric_sharpness' is not declared"):
        schema.with_columns(table, {"geometric_sharpness": [0.5]}, schema.SEGMENT)
    with pytest.raises(ValueError, match=r"column 'status' is written by store, not by the load stage"):
        schema.with_columns(table, {"status": ["ok"]}, schema.LOAD)


def test_stage_columns_take_their_declared_types() -> None:
    loaded = schema.with_columns(pa.table({"key": ["a.jpg"]}), {"orientation": [6], "depth": [b"\x00"]}, schema.LOAD)
    segmented = schema.with_columns(
        pa.table({"key": ["a.jpg"]}),
        {"geometric_pixel_counts": [[1, 2]], "geometric_labels": [b"\x00"], "inference_ms": [1.5]},
        schema.SEGMENT,
    )
    assert loaded.schema.types[1:] == [pa.int8(), pa.large_binary()]
    assert segmented.schema.types[1:] == [pa.list_(pa.int64()), pa.large_binary(), pa.float64()]


def test_the_segmenter_replaces_the_loaded_columns_it_reads_or_rewrites() -> None:
    loaded = {c.name for c in schema.COLUMNS if schema.LOAD in c.stages}
    assert schema.replaced_by(schema.SEGMENT) & loaded == {
        "pixels",
        "jpeg",
        "orientation",
        "error",
        "height",
        "width",
        "decode_ms",
        "depth",
        "hha",
    }


def test_binary_columns_hold_copies_and_release_the_arrays_they_came_from() -> None:
    """A decoded image given as a memoryview is copied into the column and its array freed once dropped
    (pyarrow 26's ``pa.array`` kept every such array alive: a loader grew by one image per image)."""
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    labels = np.arange(6, dtype=np.int32)
    alive = [weakref.ref(image), weakref.ref(labels)]
    loaded = schema.with_columns(
        pa.table({"key": ["a", "b", "c"]}),
        {"pixels": [memoryview(image).cast("B"), None, b"\x07\x08"]},
        schema.LOAD,
    )
    segmented = schema.typed_arrays({"labels": [memoryview(labels).cast("B")]}, schema.SEGMENT)["labels"]
    expected_image, expected_labels = image.tobytes(), labels.tobytes()
    del image, labels
    gc.collect()
    assert [ref() for ref in alive] == [None, None]
    assert loaded["pixels"].to_pylist() == [expected_image, None, b"\x07\x08"]
    assert loaded["pixels"].type == pa.large_binary() and loaded["pixels"].null_count == 1
    assert segmented.to_pylist() == [expected_labels]
