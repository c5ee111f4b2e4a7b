"""The NYUDv2 and SIFT Flow layouts of the FCN reference code: detection and the layout flag, the
reference's label shifts on hand-written .mat files, depth and HHA, bad samples naming their file, and
synthetic data in both layouts read back through fsspec URIs."""

from __future__ import annotations

import pickle
from pathlib import Path

import fsspec
import numpy as np
import pytest
import scipy.io
from PIL import Image

from fcn.classes import NYUD40_CLASSES, SIFTFLOW_CLASSES, SIFTFLOW_GEOMETRIC_CLASSES
from fcn.depth import hha
from pipelines.synthetic import (
    NYUD_SCENE_CLASSES,
    SIFTFLOW_SCENE_CLASSES,
    SYNTHETIC_CLASSES,
    write_synthetic_nyud,
    write_synthetic_siftflow,
    write_synthetic_voc,
)
from pipelines.train.datasets import (
    LAYOUTS,
    SIFTFLOW_SET,
    BadSample,
    load_example,
    load_sample,
    open_dataset,
)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mat(path: Path, **variables: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables)


def write_nyud(root: Path, segmentations: dict[str, np.ndarray], val: tuple[str, ...]) -> None:
    """A NYUDv2-layout dataset by hand: grey images, a depth of 1.5 m, the given ``segmentation`` maps."""
    for i, seg in segmentations.items():
        _png(root / f"data/images/img_{i}.png", np.full((*seg.shape, 3), 90, np.uint8))
        _png(root / f"data/depth/img_{i}.png", np.full(seg.shape, 1500, np.uint16))
        _mat(root / f"segmentation/img_{i}.mat", segmentation=seg)
    (root / "train.txt").write_text("".join(f"{i}\n" for i in segmentations if i not in val))
    (root / "val.txt").write_text("".join(f"{i}\n" for i in val))


def write_siftflow(root: Path, labels: dict[str, tuple[np.ndarray, np.ndarray]], test: tuple[str, ...]) -> None:
    """A SIFT Flow-layout dataset by hand from (semantic S, geometric S) pairs."""
    for i, (semantic, geometric) in labels.items():
        _png(root / f"Images/{SIFTFLOW_SET}/{i}.jpg", np.full((*semantic.shape, 3), 120, np.uint8))
        _mat(root / f"SemanticLabels/{SIFTFLOW_SET}/{i}.mat", S=semantic)
        _mat(root / f"GeoLabels/{SIFTFLOW_SET}/{i}.mat", S=geometric)
    (root / "trainval.txt").write_text("".join(f"{i}\n" for i in labels if i not in test))
    (root / "test.txt").write_text("".join(f"{i}\n" for i in test))


def write_images_masks(root: Path) -> None:
    for key in ("a", "b", "c"):
        _png(root / f"images/{key}.png", np.zeros((6, 5, 3), np.uint8))
        _png(root / f"masks/{key}.png", np.eye(6, 5, dtype=np.uint8))
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("c\n")


SEG = np.array([[0, 1, 2], [40, 7, 0]], np.uint8)  # NYUDv2 segmentation: 1-40 classes, 0 void
SIFT_SEMANTIC = np.array([[0, 1, 33], [28, 0, 6]], np.float64)  # S: 1-33 classes, 0 void
SIFT_GEOMETRIC = np.array([[-1, 0, 1], [2, 3, -1]], np.float64)  # S: 1-3 classes, 0 and -1 void


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """One small dataset per layout."""
    write_synthetic_voc(str(tmp_path / "voc"), num_images=4, seed=0)
    write_nyud(tmp_path / "nyud", {"1": SEG, "2": SEG}, val=("2",))
    write_siftflow(tmp_path / "siftflow", {i: (SIFT_SEMANTIC, SIFT_GEOMETRIC) for i in "ab"}, test=("a",))
    write_images_masks(tmp_path / "images-masks")
    return {name: tmp_path / name for name in LAYOUTS}


def test_each_layout_is_detected_and_can_be_forced(roots: dict[str, Path]) -> None:
    assert LAYOUTS == ("voc", "nyud", "siftflow", "images-masks")
    expected = {
        "voc": ({"semantic": SYNTHETIC_CLASSES}, ("rgb",)),
        "nyud": ({"semantic": NYUD40_CLASSES}, ("rgb", "depth", "hha")),
        "siftflow": ({"semantic": SIFTFLOW_CLASSES, "geometric": SIFTFLOW_GEOMETRIC_CLASSES}, ("rgb",)),
        "images-masks": ({"semantic": ("class_0", "class_1")}, ("rgb",)),
    }
    for layout, root in roots.items():
        for data in (open_dataset(str(root)), open_dataset(str(root), layout=layout)):
            heads, modalities = expected[layout]
            assert (data.layout, data.heads, data.modalities) == (layout, heads, modalities)
            assert list(data.heads) == list(heads)  # the primary head first
            assert data.class_names == heads["semantic"] and data.num_classes == len(heads["semantic"])
            assert all(s.layout == layout for s in data.train + data.val)
    assert len(open_dataset(str(roots["siftflow"])).train) == 1  # trainval.txt is train, test.txt is val
    assert [s.id for s in open_dataset(str(roots["siftflow"])).val] == ["a"]


def test_wrong_or_unknown_layout_says_what_is_missing(roots: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"not in the siftflow layout: missing Images/{SIFTFLOW_SET}/, Sema"):
        open_dataset(str(roots["nyud"]), layout="siftflow")
    with pytest.raises(ValueError, match=r"not in the nyud layout: missing data/images/, data/depth/, segm"):
        open_dataset(str(roots["voc"]), layout="nyud")
    with pytest.raises(ValueError, match=r"layout must be one of voc, nyud, siftflow, images-masks, got 'pairs'"):
        open_dataset(str(roots["images-masks"]), layout="pairs")
    with pytest.raises(ValueError, match=r"neither the VOC layout \(JPEGImages/, .*\(nyud: data/images/, data/depth/"):
        open_dataset(str(tmp_path / "nothing"))
    (roots["nyud"] / "val.txt").unlink()
    with pytest.raises(ValueError, match=r"nyud data .*: missing val\.txt"):
        open_dataset(str(roots["nyud"]))


def test_nyud_labels_shift_as_the_reference(tmp_path: Path) -> None:
    """segmentation 1-40 -> 0-39, 0 (void) -> 255; depth PNG millimetres -> float32 metres."""
    write_nyud(tmp_path, {"1": SEG, "2": SEG.astype(np.float64)}, val=("2",))  # MATLAB often stores doubles
    data = open_dataset(str(tmp_path))
    expected = np.array([[255, 0, 1], [39, 6, 255]], np.uint8)
    for sample in data.train + data.val:
        example = load_example(sample, data)
        np.testing.assert_array_equal(example.labels["semantic"], expected)
        assert example.labels["semantic"].dtype == np.uint8
        assert example.modalities["depth"].dtype == np.float32
        np.testing.assert_allclose(example.modalities["depth"], 1.5)
        rgb, labels = load_sample(sample, data.num_classes)  # the rgb/semantic reader of the training loop
        np.testing.assert_array_equal(labels, expected)
        assert rgb.shape == (2, 3, 3)
    assert data.train_labels.max_label == 39  # the mask scan reads .mat labels too
    write_nyud(tmp_path, {"1": SEG, "2": np.where(SEG == 7, 41, SEG)}, val=("2",))
    with pytest.raises(ValueError, match=r"img_2\.mat has label id 40, beyond the 40 classes of nyud"):
        open_dataset(str(tmp_path))


def test_siftflow_labels_shift_as_the_reference(tmp_path: Path) -> None:
    """Geometric -1 -> 0; then both shift down by one, void 0 -> 255."""
    write_siftflow(tmp_path, {i: (SIFT_SEMANTIC, SIFT_GEOMETRIC) for i in ("coast_a", "coast_b")}, test=("coast_b",))
    data = open_dataset(str(tmp_path))
    example = load_example(data.train[0], data)
    np.testing.assert_array_equal(example.labels["semantic"], [[255, 0, 32], [27, 255, 5]])
    np.testing.assert_array_equal(example.labels["geometric"], [[255, 255, 0], [1, 2, 255]])
    assert set(example.modalities) == {"rgb"} and example.modalities["rgb"].shape == (2, 3, 3)
    sample = data.train[0]
    assert pickle.loads(pickle.dumps(sample)) == sample and hash(sample) == hash(pickle.loads(pickle.dumps(sample)))


def test_hha_is_read_when_present_and_computed_from_depth_when_missing(tmp_path: Path) -> None:
    seg = np.ones((24, 32), np.uint8)
    write_nyud(tmp_path, {"1": seg, "2": seg}, val=("2",))
    depth_mm = (1000 + 40 * np.arange(24)[:, None] + np.zeros((1, 32))).astype(np.uint16)  # a tilted plane
    _png(tmp_path / "data/depth/img_1.png", depth_mm)
    _png(tmp_path / "data/hha/img_2.png", np.full((24, 32, 3), (7, 8, 9), np.uint8))
    data = open_dataset(str(tmp_path))
    (computed,), (stored,) = data.train, data.val
    assert computed.hha is None and stored.hha.endswith("data/hha/img_2.png")
    example = load_example(computed, data)
    np.testing.assert_array_equal(example.modalities["hha"], hha(depth_mm.astype(np.float32) / 1000))
    assert example.modalities["hha"].shape == (24, 32, 3) and example.modalities["hha"].std() > 0
    assert (load_example(stored, data).modalities["hha"] == (7, 8, 9)).all()


def test_bad_files_raise_bad_sample_naming_the_file(tmp_path: Path) -> None:
    ids = ["ok", "no_depth", "corrupt_mat", "no_variable", "small_depth", "depth_8bit", "small_hha", "bad_id"]
    write_nyud(tmp_path, {i: SEG for i in ids}, val=("ok",))
    (tmp_path / "data/depth/img_no_depth.png").unlink()
    (tmp_path / "segmentation/img_corrupt_mat.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(150))
    _mat(tmp_path / "segmentation/img_no_variable.mat", S=SEG)
    _png(tmp_path / "data/depth/img_small_depth.png", np.full((2, 2), 1500, np.uint16))
    _png(tmp_path / "data/depth/img_depth_8bit.png", np.full(SEG.shape, 15, np.uint8))
    _png(tmp_path / "data/hha/img_small_hha.png", np.zeros((3, 3, 3), np.uint8))
    _mat(tmp_path / "segmentation/img_bad_id.mat", segmentation=np.full(SEG.shape, 300, np.int16))
    data = open_dataset(str(tmp_path))
    reasons = {}
    for sample in data.train + data.val:
        try:
            load_example(sample, data)
        except BadSample as bad:
            reasons[bad.sample_id] = bad.reason
    assert sorted(reasons) == sorted(set(ids) - {"ok"})
    assert reasons["no_depth"].startswith("missing depth ") and reasons["no_depth"].endswith("img_no_depth.png")
    assert reasons["corrupt_mat"].startswith("unreadable mask ") and "img_corrupt_mat.mat" in reasons["corrupt_mat"]
    assert "img_no_variable.mat has no variable 'segmentation'" in reasons["no_variable"]
    assert "image size (3, 2) differs from depth size (2, 2)" in reasons["small_depth"]
    assert "img_small_depth.png" in reasons["small_depth"]
    assert "depth has mode 'L', not a 16-bit PNG" in reasons["depth_8bit"] and reasons["depth_8bit"].endswith(
        "img_depth_8bit.png)"
    )
    assert "differs from hha size (3, 3)" in reasons["small_hha"] and "img_small_hha.png" in reasons["small_hha"]
    assert "img_bad_id.mat holds [300], neither void 0 nor a class" in reasons["bad_id"]


def test_siftflow_geometric_size_mismatch_is_a_bad_sample(tmp_path: Path) -> None:
    semantic = np.ones((4, 4))
    write_siftflow(tmp_path, {"a": (semantic, semantic), "b": (semantic, np.ones((4, 5)))}, test=("a",))
    data = open_dataset(str(tmp_path))
    with pytest.raises(BadSample, match=r"differs from geometric mask size \(5, 4\) \(.*GeoLabels/.*/b\.mat\)"):
        load_example(data.train[0], data)
    load_sample(data.train[0], data.num_classes)  # the semantic head alone is fine


@pytest.mark.parametrize("layout", ["nyud", "siftflow"])
def test_synthetic_data_reads_back_through_any_fsspec_uri(layout: str) -> None:
    uri = f"memory://synthetic-{layout}"
    writer = {"nyud": write_synthetic_nyud, "siftflow": write_synthetic_siftflow}[layout]
    try:
        ids = writer(uri, num_images=10, seed=5, min_size=48, max_size=64, ignore_band=1)
        data = open_dataset(uri)
        assert data.layout == layout and len(data.train) + len(data.val) == len(ids) == 10 and len(data.val) >= 2
        assert data.train[0].image.startswith("memory://")
        if layout == "nyud":
            assert data.heads == {"semantic": NYUD40_CLASSES} and data.modalities == ("rgb", "depth", "hha")
            scene_classes = {NYUD40_CLASSES.index(name) for name in NYUD_SCENE_CLASSES}
        else:
            assert data.heads == {"semantic": SIFTFLOW_CLASSES, "geometric": SIFTFLOW_GEOMETRIC_CLASSES}
            scene_classes = {SIFTFLOW_CLASSES.index(name) for name in SIFTFLOW_SCENE_CLASSES}
        seen = {head: set() for head in data.heads}
        for sample in data.train + data.val:
            example = load_example(sample, data)
            assert set(example.modalities) == set(data.modalities)
            height, width = example.modalities["rgb"].shape[:2]
            assert min(height, width) >= 48 and max(height, width) <= 64
            for head, labels in example.labels.items():
                assert labels.shape == (height, width) and labels.dtype == np.uint8
                seen[head] |= set(np.unique(labels).tolist())
            if layout == "nyud":
                depth, semantic = example.modalities["depth"], example.labels["semantic"]
                wall, floor = semantic == NYUD40_CLASSES.index("wall"), semantic == NYUD40_CLASSES.index("floor")
                assert depth.dtype == np.float32 and depth.min() > 0.3 and depth.max() <= 5.0
                assert depth[floor].min() < depth[wall].min()  # the floor comes nearer than the wall
                assert example.modalities["hha"].shape == (height, width, 3)
        assert seen["semantic"] == scene_classes | {255}  # every scene class, void from the ignore band
        if layout == "siftflow":
            assert seen["geometric"] == {0, 1, 2, 255}
    finally:
        fsspec.filesystem("memory").rm(uri.removeprefix("memory://"), recursive=True)


def test_synthetic_layouts_are_deterministic(tmp_path: Path) -> None:
    for writer in (write_synthetic_nyud, write_synthetic_siftflow):
        files = []
        for name in ("a", "b"):
            root = tmp_path / writer.__name__ / name
            writer(str(root), num_images=3, seed=1)
            files.append({str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
        assert files[0] == files[1] and len(files[0]) == 3 * 3 + (3 if writer is write_synthetic_nyud else 2)
    geometric = tmp_path / "write_synthetic_siftflow/a/GeoLabels" / SIFTFLOW_SET / "scene_00000.mat"
    assert set(np.unique(scipy.io.loadmat(geometric)["S"]).tolist()) <= {-1, 1, 2, 3}  # 1-based, as SIFT Flow's
