"""The run report (markdown artifact and self-contained HTML) and the flows' parameter validation."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from prefect.exceptions import ParameterTypeError
from pydantic import ValidationError

from fcn.classes import voc_palette
from fcn.heads import PRIMARY_HEAD
from flows.digest import digest_stats
from flows.gallery import gallery
from flows.report import RunReport, html_report, markdown_summary
from pipelines.segment.schema import STATS_COLUMNS, stats_schema

CLASSES = ["background", "disc", "box", "ring"]


def _write_pair(folder: Path, name: str, labels: np.ndarray) -> tuple[str, str]:
    """An RGB image and its indexed mask with the VOC palette; returns their URIs."""
    rng = np.random.default_rng(labels.size)
    image = folder / f"{name}.jpg"
    Image.fromarray(rng.integers(0, 255, (*labels.shape, 3), dtype=np.uint8)).save(image)
    mask = Image.fromarray(labels.astype(np.uint8), mode="P")
    mask.putpalette(voc_palette())
    mask_path = folder / f"{name}.png"
    mask.save(mask_path)
    return image.as_uri(), mask_path.as_uri()


def _stats(tmp_path: Path, ok: int, errors: int) -> pa.Table:
    rows = []
    for i in range(ok):
        labels = np.zeros((40 + i, 50), np.uint8)
        labels[: 10 + i, :] = 1 + i % 3  # class 1..3 on top, background below
        image_uri, mask_uri = _write_pair(tmp_path, f"img{i:02d}", labels)
        counts = np.bincount(labels.ravel(), minlength=len(CLASSES)).tolist()
        rows.append(
            {
                "image_uri": image_uri,
                "key": f"img{i:02d}.jpg",
                "width": 50,
                "height": 40 + i,
                "pixel_counts": counts,
                "class_fractions": [c / labels.size for c in counts],
                "dominant_class": int(np.argmax(counts)),
                "mask_uri": mask_uri,
                "status": "ok",
            }
        )
    for i in range(errors):
        rows.append(
            {
                "image_uri": f"file:///bucket/bad{i}.jpg",
                "key": f"bad{i}.jpg",
                "status": "error",
                "error": f"decode: not an image | row {i}",
            }
        )
    schema = stats_schema(CLASSES, voc_palette(), {"id": "file:///m.pt"})
    return pa.Table.from_pylist([{c: r.get(c) for c in STATS_COLUMNS} for r in rows], schema=schema)


def _report(stats: pa.Table, ok: int, errors: int) -> RunReport:
    return RunReport(
        title="segment-bucket: file:///bucket",
        model="file:///m.pt (v0001)",
        ok=ok,
        error=errors,
        skipped=1,
        images_per_second=3.5,
        startup_s=6.25,
        distribution=digest_stats(stats).heads[PRIMARY_HEAD][0],
        palette=voc_palette(),
        links={"masks": "file:///out/masks", "HTML report": "file:///out/report.html"},
        errors=digest_stats(stats).errors,
    )


def test_class_distribution_sums_pixel_counts_of_ok_rows(tmp_path: Path) -> None:
    stats = _stats(tmp_path, ok=5, errors=2)
    dist = digest_stats(stats).heads[PRIMARY_HEAD][0]
    ok_pixels = sum((40 + i) * 50 for i in range(5))
    assert dist.total_pixels == ok_pixels
    expected_disc = sum((10 + i) * 50 for i in range(5) if 1 + i % 3 == 1)
    assert dist.pixels[1] == expected_disc
    assert dist.dominant_images == [5, 0, 0, 0]  # background dominates every image
    assert sum(dist.dominant_images) == 5


def test_markdown_summary_has_counts_table_and_links(tmp_path: Path) -> None:
    stats = _stats(tmp_path, ok=5, errors=2)
    text = markdown_summary(_report(stats, ok=5, errors=2))
    assert "| ok | 5 |" in text and "| error | 2 |" in text and "| skipped (already done) | 1 |" in text
    assert "3.50 images/s steady state, after 6.2 s of start-up" in text
    dist = digest_stats(stats).heads[PRIMARY_HEAD][0]
    table_rows = re.findall(r"^\| (\w+) \| (\d+) \| ([\d.]+)% \| (\d+) \|$", text, flags=re.M)
    assert {name: int(px) for name, px, _, _ in table_rows} == {
        name: px for name, px in zip(CLASSES, dist.pixels, strict=True) if px
    }
    assert sum(float(share) for _, _, share, _ in table_rows) == pytest.approx(100, abs=0.3)
    assert "[file:///out/report.html](file:///out/report.html)" in text
    assert text.count("`file:///bucket/bad") == 2
    assert "not an image / row 0" in text  # a '|' in a reason must not break the table


def test_html_report_is_self_contained_with_chart_and_gallery(tmp_path: Path) -> None:
    stats = _stats(tmp_path, ok=7, errors=1)
    items = gallery(digest_stats(stats, sample_size=4).sample, CLASSES, voc_palette())
    page = html_report(_report(stats, ok=7, errors=1), items)
    assert "<svg" in page and page.count('class="bar"') == 4  # every class has pixels here
    assert page.count('<img src="data:image/png;base64,') == 4
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "no external assets"
    assert "<script" not in page
    # thumbnails decode: image and overlay side by side, scaled to fit
    first = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    thumb = Image.open(io.BytesIO(base64.b64decode(first)))
    assert max(thumb.height, (thumb.width - 4) // 2) == 160 and thumb.width > thumb.height  # small images scaled up
    # the sample is spread over the run, not the first N
    captions = re.findall(r"<figcaption>(img\d+)\.jpg", page)
    assert captions[0] == "img00" and captions[-1] == "img06"
    assert "bad0.jpg" in page  # error rows are listed
    assert 'href="masks"' in page  # outputs below the report's folder are linked relatively


def test_a_row_whose_files_are_gone_or_corrupt_gets_a_caption_and_the_report_is_still_written(
    tmp_path: Path,
) -> None:
    stats = _stats(tmp_path, ok=3, errors=0)
    sample = digest_stats(stats, sample_size=3).sample
    Path(sample[0]["image_uri"].removeprefix("file://")).unlink()  # the source deleted since the run
    Path(sample[1]["mask_uri"].removeprefix("file://")).write_bytes(b"not a png")
    items = gallery(sample, CLASSES, voc_palette())
    assert [bool(item.data_uri) for item in items] == [False, False, True]
    assert "no thumbnail (FileNotFoundError" in items[0].caption
    assert "no thumbnail (UnidentifiedImageError" in items[1].caption
    page = html_report(_report(stats, ok=3, errors=0), items)
    assert page.count("<figure>") == 3 and page.count('<img src="data:image/png;base64,') == 1
    assert "img00.jpg (50x40, mostly" in page


def test_gallery_is_capped_by_available_rows(tmp_path: Path) -> None:
    stats = _stats(tmp_path, ok=2, errors=3)
    assert len(gallery(digest_stats(stats, sample_size=10).sample, CLASSES, voc_palette())) == 2
    assert digest_stats(stats, sample_size=0).sample == []


# -------------------------------------------------------------------------------- parameters


def test_segment_bucket_rejects_bad_parameters_naming_them() -> None:
    from flows.params import SegmentBucketParams
    from flows.segment_bucket import segment_bucket

    good = {"input": "s3://b/in/", "output": "s3://b/out/", "model": "s3://b/registry"}
    assert segment_bucket.validate_parameters(good)["device"] == "auto"
    for bad, name in [
        ({"actors": 0}, "actors"),
        ({"device": "gpu"}, "device"),
        ({"input": ""}, "input"),
        ({"gallery_size": -1}, "gallery_size"),
        ({"storage_options": "endpoint"}, "storage_options"),
    ]:
        with pytest.raises(ParameterTypeError, match=rf"- {name}[:.]"):  # (actors.constrained-int: a union)
            segment_bucket.validate_parameters(good | bad)
        with pytest.raises(ValidationError, match=name):
            SegmentBucketParams(
                **(
                    good
                    | {
                        "ray_address": None,
                        "actors": None,
                        "device": "auto",
                        "gallery_size": 1,
                        "storage_options": None,
                    }
                    | bad
                )
            )
    with pytest.raises(ParameterTypeError, match="model"):
        segment_bucket.validate_parameters({"input": "a", "output": "b"})


def test_nightly_retrain_rejects_bad_parameters_naming_them() -> None:
    from flows.nightly_retrain import nightly_retrain

    good = {"data": "s3://b/voc", "registry": "s3://b/registry"}
    assert nightly_retrain.validate_parameters(good)["epochs"] == 10
    for bad, name in [
        ({"epochs": 0}, "epochs"),
        ({"width": 0}, "width"),
        ({"recipe": "new"}, "recipe"),
        ({"promote_margin": -0.1}, "promote_margin"),
        ({"workers": 0}, "workers"),
    ]:
        with pytest.raises(ParameterTypeError, match=rf"- {name}[:.]"):  # (actors.constrained-int: a union)
            nightly_retrain.validate_parameters(good | bad)


def test_nightly_retrain_class_weights_reach_the_training_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.nightly_retrain as nightly
    from flows.params import NightlyRetrainParams
    from pipelines.train import TrainConfig

    good = {"data": "s3://b/voc", "registry": "s3://b/registry"}
    assert nightly.nightly_retrain.validate_parameters(good)["class_weights"] == TrainConfig.class_weights == "none"
    with pytest.raises(ParameterTypeError, match=r"- class_weights:"):
        nightly.nightly_retrain.validate_parameters(good | {"class_weights": ""})
    configs: list[TrainConfig] = []

    def fake_training(config: TrainConfig) -> None:
        configs.append(config)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(nightly, "run_training", fake_training)
    params = nightly.nightly_retrain.validate_parameters(good | {"class_weights": "median-frequency"})
    with pytest.raises(RuntimeError, match="stop after the config"):
        nightly.train.fn(NightlyRetrainParams(**params), None)
    assert configs[0].class_weights == "median-frequency"


def test_nightly_retrain_cross_field_check_and_summary() -> None:
    from flows.nightly_retrain import Decision, summary_markdown
    from flows.params import NightlyRetrainParams
    from pipelines.train import TrainSummary

    fields = {
        "data": "s3://b/voc",
        "registry": "s3://b/registry",
        "model": "fcn8s_vgg16",
        "width": 1.0,
        "epochs": 2,
        "workers": 1,
        "gpus_per_worker": 0,
        "recipe": "modern",
        "class_weights": "none",
        "warm_start": True,
        "promote_margin": 0.0,
        "resegment_input": None,
        "resegment_output": None,
        "ray_address": None,
        "actors": None,
        "device": "auto",
    }
    with pytest.raises(ValidationError, match="resegment_input and resegment_output"):
        NightlyRetrainParams(**(fields | {"resegment_input": "s3://b/photos"}))
    candidate = TrainSummary(
        run_name="r1",
        checkpoint_uri="s3://b/registry/runs/r1/epoch-0002/checkpoint.pt",
        metrics={"pixel_accuracy": 0.9, "mean_accuracy": 0.5, "mean_iu": 0.4, "fw_iu": 0.8},
        version="v0002",
        promoted=False,
        epochs=2,
    )
    rescored = {"pixel_accuracy": 0.8, "mean_accuracy": 0.4, "mean_iu": 0.3, "fw_iu": 0.7}
    text = summary_markdown(NightlyRetrainParams(**fields), candidate, Decision(True, "better", rescored), True, None)
    assert text.startswith("# nightly-retrain: promoted v0002")
    assert "| mean_iu | 0.4000 | 0.3000 |" in text
    kept = summary_markdown(NightlyRetrainParams(**fields), candidate, Decision(False, "first", None), False, None)
    assert "champion kept" in kept and "| mean_iu | 0.4000 | - |" in kept


def test_failure_artifacts_show_storage_options_by_name_only() -> None:
    from flows.common import shown_parameters

    shown = shown_parameters(
        {"input": "s3://b/in", "storage_options": {"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://x"}}
    )
    assert shown == {"input": "s3://b/in", "storage_options": ["endpoint_url", "key", "secret"]}
    assert "s3cr3t" not in repr(shown)


def test_a_two_head_run_reports_each_heads_distribution() -> None:
    from flows.digest import schema_heads

    geometric = ["sky", "horizontal", "vertical"]
    heads = {
        "semantic": {"class_names": CLASSES, "palette": voc_palette()},
        "geometric": {"class_names": geometric, "palette": voc_palette()},
    }
    schema = stats_schema(CLASSES, voc_palette(), {}, heads)
    rows = [
        {
            "image_uri": f"file:///b/{i}.jpg",
            "key": f"{i}.jpg",
            "status": "ok",
            "pixel_counts": [4, 0, 0, 0],
            "dominant_class": 0,
            "geometric_pixel_counts": [1, 3 + i, 0],
            "geometric_dominant_class": 1,
        }
        for i in range(2)
    ]
    stats = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    assert {head: names for head, (names, _) in schema_heads(schema).items()} == {
        "semantic": CLASSES,
        "geometric": geometric,
    }
    report = _report(stats, ok=2, errors=0)
    report = dataclasses.replace(
        report,
        further_heads={"geometric": digest_stats(stats).heads["geometric"]},
    )
    assert report.further_heads["geometric"][0].pixels == [2, 7, 0]
    assert report.further_heads["geometric"][0].dominant_images == [0, 2, 0]
    markdown = markdown_summary(report)
    assert "## Class distribution: geometric head" in markdown and "| horizontal | 7 | 77.8% | 2 |" in markdown
    page = html_report(report, [])
    assert (
        "Class distribution: geometric head" in page and "<td>horizontal</td><td>7</td><td>77.8%</td><td>2</td>" in page
    )


def test_output_check_finds_a_missing_a_duplicated_and_an_unlisted_key(tmp_path: Path) -> None:
    """The flow's check compares the statistics' Parquet files with the job's listing by key: a run
    with one row per listed image passes; a lost image, a row written twice and a row for an image
    never listed are each counted, the lost one named."""
    import pyarrow.parquet as pq

    from flows.segment_bucket import OutputCheckError, check_outputs
    from pipelines.segment import SegmentSummary

    keys = [f"photos/k{i}.png" for i in range(6)]
    listing_uri = str(tmp_path / "listing.parquet")
    pq.write_table(pa.table({"key": keys, "image_uri": [f"s3://b/{k}" for k in keys]}), listing_uri)
    schema = stats_schema(CLASSES, voc_palette(), {})
    stats = tmp_path / "stats"
    stats.mkdir()

    def write_part(name: str, part_keys: list[str]) -> None:
        rows = [{"key": k, "image_uri": f"s3://b/{k}", "status": "ok"} for k in part_keys]
        table = pa.Table.from_pylist([{c: r.get(c) for c in STATS_COLUMNS} for r in rows], schema=schema)
        pq.write_table(table, stats / f"part-{name}.parquet")

    (tmp_path / "_SUCCESS").write_text("{}")
    summary = SegmentSummary(
        **dict.fromkeys(["run_id", "input", "output", "model", "model_id", "model_version", "masks_uri"], "x"),
        **dict.fromkeys(["ok", "error", "skipped"], 0),
        **dict.fromkeys(["duration_s", "startup_s", "images_per_second", "end_to_end_images_per_second"], 0.0),
        listed=6,
        stats_uri=str(stats),
        manifest_uri=str(tmp_path / "manifest.json"),
        success_uri=str(tmp_path / "_SUCCESS"),
        listing_uri=listing_uri,
    )
    write_part("a", keys[:4])
    write_part("b", keys[4:])
    good, digest = check_outputs(summary, {})
    assert good.one_row_per_input and (good.rows, good.keys, good.listed, good.missing) == (6, 6, 6, 0)
    assert digest.rows == 6 and sum(digest.heads[PRIMARY_HEAD][0].pixels) == 0  # no pixel counts in these rows

    write_part("b", ["photos/k3.png", "photos/k5.png", "elsewhere.png"])
    expected = (
        r"7 rows \(6 distinct keys\) for 6 listed images \(6 in .*\): 1 missing \(e.g. \['photos/k4.png'\]\), "
        r"1 duplicated, 1 not listed"
    )
    with pytest.raises(OutputCheckError, match=expected):
        check_outputs(summary, {})


def test_even_sample_spreads_a_few_rows_over_a_stream_of_any_length() -> None:
    """One pass over 10,000 rows offered in uneven batches keeps at most twice the sample size at any
    time and ends with rows spread from the first row to near the last, evenly spaced."""
    from flows.digest import EvenSample

    sample, offered = EvenSample(5), 0
    for size in [1, 7, 300, 2, 4000, 13, 5677]:
        batch = pa.record_batch({"i": pa.array(range(offered, offered + size))})
        sample.add(batch, np.arange(0, size))
        offered += size
        assert len(sample.kept) <= 10
    positions = [row["i"] for row in sample.rows()]
    assert offered == 10_000 and len(positions) == 5 and positions[0] == 0 and positions[-1] > 10_000 - 10_000 / 5
    gaps = np.diff(positions)
    assert gaps.max() <= 1.5 * gaps.min(), positions
    few = EvenSample(5)
    few.add(pa.record_batch({"i": pa.array(range(3))}), np.array([0, 2]))
    assert [row["i"] for row in few.rows()] == [0, 2]
