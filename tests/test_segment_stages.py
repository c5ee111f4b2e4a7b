"""The segmentation job's stages without Ray: the CPU decoding path against the device (nvJPEG) path
run on the CPU, statistics computed with the network, input blocks, and one source for every default."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from segment_cases import EXIF_ORIENTATION, awkward_images, displayed, good_images, tiny_checkpoint, upload

import fcn
from pipelines.common.decode import device_jpeg_orientation, orient
from pipelines.segment import SegmentConfig
from pipelines.segment.cli import build_parser
from pipelines.segment.infer import Segmenter
from pipelines.segment.listing import list_images
from pipelines.segment.load import load_images
from pipelines.segment.model import describe_model
from pipelines.segment.pipeline import plan_blocks
from pipelines.segment.write import store_results

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, pa.Table]:
    """Ordinary and awkward images in a folder, a small model, and the listing as the job's input table."""
    root = tmp_path_factory.mktemp("stages")
    files = {**good_images(seed=21, count=4), **awkward_images()[0]}
    upload(str(root / "in"), files)
    model = tiny_checkpoint(str(root / "model.pt"), num_classes=NUM_CLASSES)
    sources = list_images(str(root / "in"), {}).images
    return root, model, sources


def _cpu_segmenter(model: str, keep_pixels: bool = False) -> Segmenter:
    """The segmentation stage on the CPU, one thread, in fp32, with ``model`` (a checkpoint URI)."""
    return Segmenter(
        model_uri=model,
        storage_options={},
        device="cpu",
        precision="fp32",
        cpu_threads=1,
        max_image_pixels=10**8,
        keep_pixels=keep_pixels,
    )


def _segment(model: str, loaded: pa.Table) -> pa.Table:
    return _cpu_segmenter(model, keep_pixels=True)(loaded)


def test_exif_orientation_on_tensors_matches_pillow() -> None:
    """``orient`` (applied to nvJPEG's output, which ignores EXIF) gives Pillow's displayed pixels for
    all eight orientations; torchvision's CPU decoder stands in for nvJPEG."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    stored = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
        data = buffer.getvalue()
        assert device_jpeg_orientation(data, max_pixels=10**8) == orientation
        tensor = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        got = orient(tensor, orientation).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(
            got, np.asarray(displayed(data).convert("RGB")), err_msg=f"orientation {orientation}"
        )


def test_device_decoding_path_gives_the_cpu_path_results(bucket: tuple[Path, str, pa.Table]) -> None:
    """With ``device_jpegs`` the colour and grey JPEGs stay encoded until the FCN actor decodes them
    (here on the CPU, as it would with nvJPEG on a GPU); every row ends exactly as on the CPU path."""
    _, model, sources = bucket
    cpu_loaded = load_images(sources, storage_options={}, retries=0, max_image_pixels=10**8, device_jpegs=False)
    device_loaded = load_images(sources, storage_options={}, retries=0, max_image_pixels=10**8, device_jpegs=True)
    keys = sources["key"].to_pylist()
    encoded = {key for key, jpeg in zip(keys, device_loaded["jpeg"].to_pylist()) if jpeg is not None}
    assert encoded == {
        k for k in keys if k.endswith(".jpg") and k not in {"odd/cmyk.jpg", "odd/zero.jpg", "odd/text.jpg"}
    }
    assert "odd/exif_rotated.jpg" in encoded and "odd/gray.jpg" in encoded
    assert cpu_loaded["jpeg"].null_count == len(keys)

    on_cpu, on_device = _segment(model, cpu_loaded), _segment(model, device_loaded)

    for name in ("key", "height", "width", "error", "labels", "pixel_counts", "pixels"):
        assert on_device[name].to_pylist() == on_cpu[name].to_pylist(), name
    rows = {r["key"]: r for r in on_device.to_pylist()}
    assert (rows["odd/exif_rotated.jpg"]["height"], rows["odd/exif_rotated.jpg"]["width"]) == (60, 40)
    assert rows["odd/truncated.jpg"]["error"].startswith("decode: ") and rows["odd/truncated.jpg"]["labels"] is None
    assert all(rows[k]["decode_ms"] >= 0 for k in encoded if rows[k]["error"] is None)


def test_store_writes_masks_and_one_parquet_part_with_the_statistics(
    bucket: tuple[Path, str, pa.Table], tmp_path: Path
) -> None:
    """The writer stage encodes what the Segmenter computed: the mask is the label map, the counts
    are its histogram, and failed rows stay error rows without a mask."""
    import pyarrow.parquet as pq

    from pipelines.segment.schema import stats_schema

    _, model_uri, sources = bucket
    loaded = load_images(sources, storage_options={}, retries=0, max_image_pixels=10**8, device_jpegs=False)
    segmented = _segment(model_uri, loaded)
    model = describe_model(model_uri, {})
    schema = stats_schema(model.class_names, model.palette, {})
    out = store_results(
        segmented,
        output=f"file://{tmp_path}/out",
        storage_options={},
        run_id="r1",
        model=model,
        schema=schema,
        retries=0,
    )

    table = pq.read_table(tmp_path / "out" / "stats")
    assert table.schema.names == schema.names and table.num_rows == sources.num_rows == out.num_rows
    labels = dict(zip(segmented["key"].to_pylist(), segmented["labels"].to_pylist()))
    for row in table.to_pylist():
        if row["status"] != "ok":
            assert row["mask_uri"] is None and row["error"]
            continue
        mask = np.asarray(Image.open(row["mask_uri"].removeprefix("file://")))
        assert mask.shape == (row["height"], row["width"])
        assert mask.tobytes() == labels[row["key"]]
        assert row["pixel_counts"] == np.bincount(mask.ravel(), minlength=NUM_CLASSES).tolist()
        assert row["dominant_class"] == int(np.argmax(row["pixel_counts"])) and np.isclose(
            sum(row["class_fractions"]), 1
        )
        assert row["run_id"] == "r1" and row["model_id"] == model.uri


@pytest.mark.parametrize("max_pixels", [10**8, 40 * 40])
def test_statistics_are_computed_with_the_network(max_pixels: int) -> None:
    """``statistics=True``: per-class pixel counts and the mean confidence, reduced where the logits
    are (whole images, stacked batches and tiles alike), equal those of the returned maps; a CHW uint8
    tensor gives the same prediction as the HWC array."""
    import torch

    checkpoint = fcn.load_checkpoint(tiny_checkpoint_in_memory())
    predictor = fcn.Predictor.from_checkpoint(checkpoint, device="cpu", max_pixels=max_pixels)  # 40*40: the tiled path
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) for _ in range(3)]
    with_maps = predictor.predict_batch(images, confidence=True)
    with_stats = predictor.predict_batch(images, statistics=True)
    for full, summary in zip(with_maps, with_stats):
        np.testing.assert_array_equal(summary.labels, full.labels)
        assert summary.pixel_counts.tolist() == np.bincount(full.labels.ravel(), minlength=NUM_CLASSES).tolist()
        assert summary.mean_confidence == pytest.approx(float(full.confidence.mean(dtype=np.float64)), rel=1e-5)
    from_tensor = predictor(torch.from_numpy(images[0]).permute(2, 0, 1), statistics=True)
    np.testing.assert_array_equal(from_tensor.labels, with_stats[0].labels)


def test_overlays_carry_the_pixels_of_whole_images_only(bucket: tuple[Path, str, pa.Table]) -> None:
    """With overlays on, the FCN actor passes a whole image's RGB on to the writer, never a window's (a tiled
    image's overlay is drawn from its mask's overview); both rows get their labels."""
    _, model, sources = bucket
    loaded = load_images(sources, storage_options={}, retries=0, max_image_pixels=10**8, device_jpegs=False)
    loaded = loaded.filter(loaded["error"].is_null()).slice(0, 2)
    whole = [0, loaded["height"][0].as_py(), 0, loaded["width"][0].as_py()]  # the first row: a window of its image
    loaded = (
        loaded.append_column("window", pa.array([whole, None], pa.list_(pa.int32())))
        .append_column("core", pa.array([whole, None], pa.list_(pa.int32())))
        .append_column("tile_part", pa.array(["parts/first", None]))
    )
    out = _segment(model, loaded)
    assert out["error"].null_count == 2 and out["labels"].null_count == 0
    assert out["pixels"].to_pylist()[0] is None
    assert len(out["pixels"][1].as_py()) == loaded["height"][1].as_py() * loaded["width"][1].as_py() * 3


def tiny_checkpoint_in_memory() -> str:
    return tiny_checkpoint("memory://stages/model.pt", num_classes=NUM_CLASSES)


def test_blocks_are_sized_by_rows_bytes_and_parallelism() -> None:
    sizes = [1_000_000] * 10 + [30_000_000] * 3 + [10] * 87
    table = pa.table({"source_size": sizes, "key": [str(i) for i in range(100)]})
    blocks = plan_blocks(table, rows=40, megabytes=32, min_blocks=1)
    assert sum(b.num_rows for b in blocks) == 100
    assert [b["key"][0].as_py() for b in blocks][0] == "0"
    assert all(b.num_rows <= 40 for b in blocks)
    assert all(sum(b["source_size"].to_pylist()) <= 32e6 or b.num_rows == 1 for b in blocks)
    assert [b.num_rows for b in blocks][:4] == [10, 1, 1, 40]  # 10 x 1 MB; 30 MB alone twice; 30 MB + 39 small
    assert len(plan_blocks(table, rows=256, megabytes=1e6, min_blocks=8)) == 8  # ceil(100 / 8) = 13 rows each


def test_config_is_the_single_source_of_cli_flags_and_flow_parameters() -> None:
    """Every SegmentConfig field is a CLI flag with the config's default, and every job parameter of
    the segment-bucket flow has the config's default."""
    from flows.segment_bucket import segment_bucket

    parser = build_parser()
    actions = {action.dest: action for action in parser._actions}
    config_fields = [name for name in inspect.signature(SegmentConfig).parameters]
    for name in config_fields:
        action = actions[name]
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        if not action.required:
            assert action.default == SegmentConfig.default(name), name
    flow_parameters = inspect.signature(segment_bucket.fn).parameters
    shared = [name for name in flow_parameters if name in config_fields]
    assert {"batch_size", "precision", "overlays", "device", "actors"} <= set(shared)
    for name in shared:
        if name != "storage_options" and flow_parameters[name].default is not inspect.Parameter.empty:  # None = {}
            assert flow_parameters[name].default == SegmentConfig.default(name), name
    args = parser.parse_args(["--input", "i", "--output", "o", "--model", "m", "--batch-size", "3", "--no-gpu-decode"])
    config = SegmentConfig(**vars(args))
    assert (config.batch_size, config.gpu_decode, config.overlays) == (3, False, False)


def test_steady_state_rate_leaves_start_up_out() -> None:
    """The steady rate counts the images segmented after the first batch over the time between the
    first and the last batch; start-up (before the first batch) is reported apart."""
    from pipelines.segment.driver import _steady_rate
    from pipelines.segment.pipeline import RayRun

    run = RayRun(first_segmented=100.0, last_segmented=110.0, first_count=16, segmented=1016)
    assert _steady_rate(run) == pytest.approx(100.0)
    assert _steady_rate(RayRun(first_segmented=5.0, last_segmented=5.0, first_count=9, segmented=9)) == 0.0
    assert _steady_rate(RayRun()) == 0.0


def test_batch_pixels_bounds_the_images_stacked_per_forward_pass() -> None:
    checkpoint = fcn.load_checkpoint(tiny_checkpoint_in_memory())
    images = [np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8) for i in range(5)]
    for batch_pixels, passes in ((None, [5]), (2 * 40 * 50, [2, 2, 1]), (40 * 50 - 1, [1] * 5)):
        predictor = fcn.Predictor.from_checkpoint(checkpoint, device="cpu", batch_pixels=batch_pixels)
        seen: list[int] = []
        hook = predictor.model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
        predictor.predict_batch(images, statistics=True)
        hook.remove()
        assert seen == passes


def _loaded_batch(root: Path, files: dict[str, bytes]) -> pa.Table:
    upload(str(root / "in"), files)
    sources = list_images(str(root / "in"), {}).images
    return load_images(sources, storage_options={}, retries=0, max_image_pixels=10**8, device_jpegs=False)


def test_device_errors_are_told_apart() -> None:
    """Out of memory: retried smaller; a CUDA error that poisons the context: fatal; anything else: a row's error."""
    import torch

    from pipelines.segment.infer import fatal_device_error

    assert fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert fatal_device_error(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    if hasattr(torch, "AcceleratorError"):  # torch >= 2.8 raises CUDA errors as this type
        assert fatal_device_error(torch.AcceleratorError("an illegal instruction was encountered"))
    assert not fatal_device_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not fatal_device_error(RuntimeError("CUDA error: out of memory"))
    assert not fatal_device_error(RuntimeError("Invalid JPEG data"))
    assert not fatal_device_error(ValueError("CUDA error"))


def test_a_poisoned_device_raises_instead_of_making_error_rows(tmp_path: Path) -> None:
    """After an illegal memory access every later kernel fails: the actor must end (Ray restarts it),
    not turn the rest of its images into error rows."""
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    loaded = _loaded_batch(tmp_path, good_images(seed=5, count=3))
    segmenter = _cpu_segmenter(model)

    def poison(module: object, inputs: object, output: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    segmenter.predictor.model.register_forward_hook(poison)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        segmenter(loaded)


def test_out_of_memory_is_retried_image_by_image_then_tiled(tmp_path: Path) -> None:
    """A batch that runs out of memory is retried image by image, and an image too large to run whole
    in smaller tiles: every row ends ok, with the labels of a run that had the memory."""
    import torch

    from pipelines.segment.infer import OUT_OF_MEMORY_TILE_SIZE

    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    big = OUT_OF_MEMORY_TILE_SIZE + 100
    rng = np.random.default_rng(6)
    blocks = rng.integers(0, 256, (big // 16 + 1, big // 16 + 1, 3), dtype=np.uint8)
    large = np.kron(blocks, np.ones((16, 16, 1), np.uint8))[:big, :big]
    buffer = io.BytesIO()
    Image.fromarray(large).save(buffer, "PNG")
    loaded = _loaded_batch(tmp_path, {**good_images(seed=6, count=3), "large.png": buffer.getvalue()})
    expected = _cpu_segmenter(model)(loaded)
    segmenter = _cpu_segmenter(model)
    calls: list[tuple[int, ...]] = []

    def short_of_memory(module: object, inputs: tuple[torch.Tensor], output: object) -> None:
        calls.append(tuple(inputs[0].shape))
        if len(calls) == 1 or inputs[0].shape[-2] * inputs[0].shape[-1] > OUT_OF_MEMORY_TILE_SIZE**2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    segmenter.predictor.model.register_forward_hook(short_of_memory)
    got = segmenter(loaded)
    assert got["error"].to_pylist() == [None] * 4
    assert got["labels"].to_pylist() == expected["labels"].to_pylist()
    assert any(h * w > OUT_OF_MEMORY_TILE_SIZE**2 for _, _, h, w in calls)  # the whole large image was tried
