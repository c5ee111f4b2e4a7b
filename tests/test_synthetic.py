"""Synthetic VOC-layout scenes: layout, determinism, classes, varied sizes, ignore band, CLI (all layouts).

The NYUDv2 and SIFT Flow writers are tested with their readers in test_datasets_layouts.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn.classes import voc_palette
from pipelines.synthetic import SYNTHETIC_CLASSES, render_scene, write_synthetic_voc
from pipelines.train.datasets import load_sample, open_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_determinism(tmp_path: Path) -> None:
    ids = write_synthetic_voc(str(tmp_path / "a"), num_images=12, seed=3)
    write_synthetic_voc(str(tmp_path / "b"), num_images=12, seed=3)
    write_synthetic_voc(str(tmp_path / "c"), num_images=12, seed=4)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b  # same seed -> identical bytes
    assert a != c
    assert len([k for k in a if k.startswith("JPEGImages/")]) == 12
    assert len([k for k in a if k.startswith("SegmentationClass/")]) == 12
    train = (tmp_path / "a/ImageSets/Segmentation/train.txt").read_text().split()
    val = (tmp_path / "a/ImageSets/Segmentation/val.txt").read_text().split()
    assert len(val) == 3 and sorted(train + val) == ids
    assert (tmp_path / "a/class_names.txt").read_text().split() == list(SYNTHETIC_CLASSES)

    mask = Image.open(tmp_path / "a/SegmentationClass" / f"{ids[0]}.png")
    assert mask.mode == "P" and mask.getpalette()[: 3 * 6] == voc_palette()[: 3 * 6]
    data = open_dataset(str(tmp_path / "a"))
    assert data.layout == "voc" and data.class_names == SYNTHETIC_CLASSES
    seen: set[int] = set()
    sizes = set()
    for sample in data.train + data.val:
        rgb, labels = load_sample(sample, data.num_classes)
        assert rgb.shape[:2] == labels.shape and min(labels.shape) >= 64 and max(labels.shape) <= 96
        seen |= set(np.unique(labels).tolist())
        sizes.add(labels.shape)
    assert seen == set(range(len(SYNTHETIC_CLASSES)))  # every class occurs, no ignore band by default
    assert len(sizes) > 6


def test_thin_structures_and_ignore_band() -> None:
    widths = []
    for index in range(40):
        _, labels = render_scene(np.random.default_rng([0, index]), 64, 96, 4, ignore_band=0)
        for cls in (4, 5):  # ring, wire: a few pixels wide -> most of their pixels touch the background
            region = labels == cls
            if region.sum() > 20:
                interior = (
                    region[1:-1, 1:-1] & region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
                )
                widths.append(interior.sum() / region.sum())
    assert widths and np.median(widths) < 0.5

    rng_a, rng_b = np.random.default_rng([1, 2]), np.random.default_rng([1, 2])
    _, plain = render_scene(rng_a, 64, 96, 4, ignore_band=0)
    _, banded = render_scene(rng_b, 64, 96, 4, ignore_band=2)
    changed = plain != banded
    assert changed.any()
    assert (banded[changed] == 255).all() and (plain[changed] == 0).all()  # only background near objects
    np.testing.assert_array_equal(plain[plain > 0], banded[plain > 0])  # objects, thin ones too, kept


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.synthetic", str(out), "--num-images", "3", "--seed", "1"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 3
    nyud = subprocess.run(
        [sys.executable, "-m", "pipelines.synthetic", str(tmp_path / "nyud"), "--num-images", "3", "--layout", "nyud"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert nyud.returncode == 0 and "wrote 3 nyud scenes" in nyud.stdout, nyud.stderr
    assert open_dataset(str(tmp_path / "nyud")).layout == "nyud"
    bad = subprocess.run(
        [sys.executable, "-m", "pipelines.synthetic", str(out), "--num-images", "0"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert bad.returncode == 2 and "num_images" in bad.stderr


@pytest.mark.parametrize("kwargs", [{"min_size": 8}, {"min_size": 90, "max_size": 80}, {"val_fraction": 1.0}])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        write_synthetic_voc(str(tmp_path), num_images=2, **kwargs)
