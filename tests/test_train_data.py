"""Dataset readers (VOC and pairs layouts, local and S3), bad-sample detection, batching and augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn.classes import VOC_CLASSES, voc_palette
from pipelines.datasets import BadSample, load_sample, open_dataset, read_class_names
from pipelines.synthetic import SYNTHETIC_CLASSES, write_synthetic_voc
from pipelines.train import RECIPES, _check_all_samples, augment, copy_matching_weights, pad_collate

BAD = {
    "scene_00001": "differs from mask size",
    "scene_00002": "missing mask",
    "scene_00003": "unreadable image",
    "scene_00004": "labels [9] outside the 6 classes",
}


def corrupt(root: Path) -> None:
    """Make scenes 1-4 bad in the four ways the training job must survive."""
    seg = root / "SegmentationClass"
    mask = Image.open(seg / "scene_00001.png")
    mask.resize((mask.width + 3, mask.height)).save(seg / "scene_00001.png")
    (seg / "scene_00002.png").unlink()
    (root / "JPEGImages/scene_00003.jpg").write_bytes(b"not a jpeg at all")
    labels = np.array(Image.open(seg / "scene_00004.png"))
    labels[:2, :2] = 9
    out = Image.fromarray(labels).convert("L")
    out.save(seg / "scene_00004.png")


def test_voc_layout_with_bad_samples(tmp_path: Path) -> None:
    write_synthetic_voc(str(tmp_path), num_images=10, seed=0, val_fraction=0.2)
    corrupt(tmp_path)
    data = open_dataset(str(tmp_path))
    assert data.layout == "voc" and data.class_names == SYNTHETIC_CLASSES
    assert len(data.train) == 8 and len(data.val) == 2
    problems = {}
    for sample in data.train + data.val:
        try:
            rgb, labels = load_sample(sample, data.num_classes)
            assert rgb.dtype == np.uint8 and rgb.shape == (*labels.shape, 3)
        except BadSample as bad:
            problems[bad.sample_id] = bad.reason
    assert sorted(problems) == sorted(BAD)
    for sample_id, expected in BAD.items():
        assert expected in problems[sample_id]
    with pytest.raises(ValueError, match=r"strict: 4 bad samples: .*scene_0000"):
        _check_all_samples(data.train + data.val, data.num_classes)
    bad = pickle.loads(pickle.dumps(BadSample("x", "why")))  # crosses process boundaries (loader workers)
    assert (bad.sample_id, bad.reason) == ("x", "why")


def test_pairs_layout_nested_keys_rgb_masks_and_class_file(tmp_path: Path) -> None:
    palette = voc_palette()
    for i in range(20):
        key = f"site{i % 2}/img{i:02d}"
        (tmp_path / "images" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "masks" / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 10, 3), i * 10, np.uint8)).save(tmp_path / "images" / f"{key}.png")
        labels = np.zeros((12, 10), np.uint8)
        labels[3:6, 2:4] = 1 + i % 2
        labels[0, :] = 255
        colours = np.array(palette, np.uint8).reshape(256, 3)[labels]  # an RGB colour-coded mask
        Image.fromarray(colours).save(tmp_path / "masks" / f"{key}.png")
    (tmp_path / "images/orphan.jpg").write_bytes((tmp_path / "images/site0/img00.png").read_bytes())
    classes = tmp_path / "names.txt"
    classes.write_text("bg\nroof\nroad\n")

    data = open_dataset(str(tmp_path), classes=str(classes))
    assert data.layout == "pairs" and data.class_names == ("bg", "roof", "road")
    samples = {s.id: s for s in data.train + data.val}
    assert len(samples) == 21 and data.val and data.train
    assert samples["orphan"].mask is None
    with pytest.raises(BadSample, match="missing mask"):
        load_sample(samples["orphan"], 3)
    _, labels = load_sample(samples["site1/img03"], 3)
    assert labels[4, 2] == 2 and labels[0, 0] == 255 and labels[10, 9] == 0
    assert open_dataset(str(tmp_path), classes=str(classes)).val == data.val  # split is stable


def test_dataset_on_s3_and_class_defaults(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/voc"
    write_synthetic_voc(uri, num_images=4, seed=1)
    data = open_dataset(uri)
    assert data.class_names == SYNTHETIC_CLASSES and data.train[0].image.startswith("s3://")
    rgb, labels = load_sample(data.train[0], data.num_classes)
    assert rgb.shape[:2] == labels.shape
    assert read_class_names(str(tmp_path)) == VOC_CLASSES  # no class_names.txt -> VOC


def test_bad_dataset_roots(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither the VOC layout"):
        open_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="classes file"):
        read_class_names(str(tmp_path), str(tmp_path / "missing.txt"))


def test_pad_collate_marks_padding_ignored() -> None:
    a = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64))
    b = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.int64))
    images, targets, bad = pad_collate([a, BadSample("z", "broken"), b])
    assert images.shape == (2, 3, 6, 5) and targets.shape == (2, 6, 5)
    assert [x.sample_id for x in bad] == ["z"]
    assert (targets[0, 4:, :] == 255).all() and (targets[1, :, 3:] == 255).all()
    assert (targets[0, :4, :] == 0).all() and (images[0, :, 4:, :] == 0).all()
    assert pad_collate([BadSample("y", "r")])[0] is None


def test_augment_keeps_image_and_labels_aligned() -> None:
    image = torch.zeros(3, 40, 50)
    target = torch.zeros(40, 50, dtype=torch.int64)
    image[:, 10:20, 5:15] = 1.0
    target[10:20, 5:15] = 3
    sizes = set()
    for seed in range(8):
        x, y = augment(image, target, RECIPES["modern"], np.random.default_rng(seed))
        assert x.shape[-2:] == y.shape
        sizes.add(tuple(y.shape))
        assert set(y.unique().tolist()) <= {0, 3}
        assert ((x[0] > 0.5) == (y == 3)).float().mean() > 0.97
    assert len(sizes) > 1


def test_copy_matching_weights_from_coarser_net() -> None:
    from fcn.models import get_model

    kwargs = {"num_classes": 4, "width": 1 / 16, "geometry": "aligned"}
    coarse, fine = get_model("fcn32s_vgg16", **kwargs), get_model("fcn8s_vgg16", **kwargs)
    with torch.no_grad():
        coarse.score_fr.weight.normal_()
    copied, left = copy_matching_weights(fine, coarse.state_dict())
    assert "conv1_1.weight" in copied and "score_fr.weight" in copied
    assert "score_pool4.weight" in left and "score_pool3.weight" in left
    assert torch.equal(fine.score_fr.weight, coarse.score_fr.weight)
