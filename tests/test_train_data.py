"""Dataset readers (VOC and pairs layouts, local and S3), class names from the data, label-id checks,
class weights, bad-sample detection, the workers' samples (every modality and head), batching and
augmentation."""

from __future__ import annotations

import logging
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fcn.classes import VOC_CLASSES, voc_palette
from fcn.conventions import get_convention
from fcn.losses import cross_entropy
from pipelines.synthetic import SYNTHETIC_CLASSES, write_synthetic_nyud, write_synthetic_siftflow, write_synthetic_voc
from pipelines.train import RECIPES, copy_matching_weights
from pipelines.train.class_weights import median_frequency_weights, resolve_class_weights
from pipelines.train.data import TrainImages, augment, pad_collate
from pipelines.train.datasets import BadSample, load_example, load_sample, open_dataset, read_class_names
from pipelines.train.epoch import train_epoch
from pipelines.train.prepare import check_all_samples

BAD = {
    "scene_00001": "differs from mask size",
    "scene_00002": "missing mask",
    "scene_00003": "unreadable image",
    "scene_00004": "mask mode 'RGBA' is not a label image",
}


def corrupt(root: Path) -> None:
    """Make scenes 1-4 bad in the four ways the training job must survive (a label id beyond the
    classes is not one of them: it stops the run, see test_label_id_beyond_the_class_names_names_the_mask)."""
    seg = root / "SegmentationClass"
    mask = Image.open(seg / "scene_00001.png")
    mask.resize((mask.width + 3, mask.height)).save(seg / "scene_00001.png")
    (seg / "scene_00002.png").unlink()
    (root / "JPEGImages/scene_00003.jpg").write_bytes(b"not a jpeg at all")
    Image.open(seg / "scene_00004.png").convert("RGBA").save(seg / "scene_00004.png")


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
        check_all_samples(data.train + data.val, ("rgb",), {"semantic": data.num_classes})
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
    assert data.layout == "images-masks" and data.class_names == ("bg", "roof", "road")
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
    assert read_class_names(str(tmp_path)) is None  # no class_names.txt: named from the data


def write_pairs(root: Path, masks: dict[str, list[list[int]]], val: tuple[str, ...]) -> None:
    """A pairs-layout dataset of grey label masks (and black images), split by train.txt / val.txt."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for key, rows in masks.items():
        labels = np.array(rows, np.uint8)
        Image.fromarray(np.zeros((*labels.shape, 3), np.uint8)).save(root / "images" / f"{key}.png")
        Image.fromarray(labels).save(root / "masks" / f"{key}.png")
    (root / "train.txt").write_text("".join(f"{k}\n" for k in masks if k not in val))
    (root / "val.txt").write_text("".join(f"{k}\n" for k in val))


def test_unnamed_pairs_classes_come_from_the_train_label_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    masks = {"a": [[0, 1], [1, 255]], "b": [[0, 3], [3, 3]], "c": [[0, 2], [2, 2]]}
    write_pairs(tmp_path, masks, val=("c",))
    with caplog.at_level(logging.WARNING, logger="pipelines.train.datasets"):
        data = open_dataset(str(tmp_path))
    assert data.class_names == ("class_0", "class_1", "class_2", "class_3")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "class_0 ... class_3" in warning and "class_names.txt" in warning and "--classes" in warning
    # The train split sizes the network: a val mask with a larger id is an error naming it.
    write_pairs(tmp_path, masks | {"c": [[0, 7], [2, 2]]}, val=("c",))
    with pytest.raises(ValueError, match=r"masks/c\.png has label id 7, beyond the 4 classes found in the train"):
        open_dataset(str(tmp_path))


def write_voc_layout(root: Path, ids: Sequence[str], seed: int = 0) -> None:
    """A VOC-layout dataset made here, unlike pipelines.synthetic's: grey-level masks (not palette PNGs)
    of label ids 0-3 (three coloured squares on ground, a top row of 255), every 4th id in val, and no
    class_names.txt."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    colours = np.zeros((256, 3), np.uint8)
    colours[:4] = [(90, 90, 90), (200, 40, 40), (40, 200, 40), (40, 40, 200)]
    rng = np.random.default_rng(seed)
    for sample_id in ids:
        labels = np.zeros((40, 48), np.uint8)
        for label in (1, 2, 3):
            y, x = (int(v) for v in rng.integers(1, 28, size=2))
            labels[y : y + 12, x : x + 12] = label
        labels[0] = 255
        image = np.clip(colours[labels] + rng.normal(0, 8, (*labels.shape, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{sample_id}.jpg", quality=95)
        Image.fromarray(labels).save(root / "SegmentationClass" / f"{sample_id}.png")
    lists = {"train": [i for n, i in enumerate(ids) if n % 4 != 3], "val": [i for n, i in enumerate(ids) if n % 4 == 3]}
    for name, members in lists.items():
        (root / "ImageSets/Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))


PLOT_IDS = tuple(f"plot-{i:02d}a" for i in range(8))  # a custom dataset's ids
FOUR_CLASSES = ("class_0", "class_1", "class_2", "class_3")


def test_custom_data_in_the_voc_layout_gets_numbered_classes_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_voc_layout(tmp_path / "plots", PLOT_IDS)
    with caplog.at_level(logging.WARNING, logger="pipelines.train.datasets"):
        data = open_dataset(str(tmp_path / "plots"))
    assert (data.layout, data.class_names) == ("voc", FOUR_CLASSES)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "not PASCAL VOC's" in warning and "class_0 ... class_3" in warning
    assert "class_names.txt" in warning and "--classes" in warning
    # PASCAL VOC's release folders do not make it VOC: tools ask for custom data there too.
    write_voc_layout(tmp_path / "VOCdevkit/VOC2012", PLOT_IDS)
    assert open_dataset(str(tmp_path / "VOCdevkit/VOC2012")).class_names == FOUR_CLASSES
    # Nor do VOC2007's plain 6-digit ids outside its release folder, or some ids of VOC's form among others.
    write_voc_layout(tmp_path / "frames", ["000032", "000033", "000042", "000061"])
    assert open_dataset(str(tmp_path / "frames")).class_names == FOUR_CLASSES
    write_voc_layout(tmp_path / "mixed", ["2007_000032", "2007_000039", "2008_000002", "plot-01"])
    assert open_dataset(str(tmp_path / "mixed")).class_names == FOUR_CLASSES


def test_pascal_voc_itself_gets_the_voc_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    voc2012, voc2007 = tmp_path / "VOCdevkit/VOC2012", tmp_path / "VOCdevkit/VOC2007"
    write_voc_layout(voc2012, ["2007_000032", "2007_000039", "2008_000002", "2011_003276", "2012_000003"])
    write_voc_layout(voc2007, ["000032", "000033", "000042", "000061"])
    shutil.copytree(voc2012, tmp_path / "voc")  # VOC2012's ids are enough, wherever it is
    with caplog.at_level(logging.WARNING, logger="pipelines.train.datasets"):
        for root in (voc2012, voc2007, tmp_path / "voc"):
            assert open_dataset(str(root)).class_names == VOC_CLASSES, root
    assert not caplog.records
    # A label id beyond VOC's 20: not VOC's classes after all.
    mask = voc2012 / "SegmentationClass/2007_000032.png"
    labels = np.array(Image.open(mask))
    labels[5, 5] = 25
    Image.fromarray(labels).save(mask)
    with caplog.at_level(logging.WARNING, logger="pipelines.train.datasets"):
        data = open_dataset(str(voc2012))
    assert data.class_names == tuple(f"class_{i}" for i in range(26))
    assert "class_0 ... class_25" in caplog.records[-1].getMessage()


def test_label_id_beyond_the_class_names_names_the_mask(tmp_path: Path) -> None:
    masks = {"a": [[0, 1], [2, 2]], "b": [[0, 5], [1, 1]], "c": [[0, 1], [1, 2]]}
    write_pairs(tmp_path, masks, val=("c",))
    (tmp_path / "class_names.txt").write_text("bg\nroof\nroad\n")
    with pytest.raises(ValueError, match=r"masks/b\.png has label id 5, beyond the 3 classes named in class_names"):
        open_dataset(str(tmp_path))
    write_pairs(tmp_path, masks | {"b": [[0, 1], [1, 1]], "c": [[0, 3], [1, 2]]}, val=("c",))  # the val split too
    with pytest.raises(ValueError, match=r"masks/c\.png has label id 3"):
        open_dataset(str(tmp_path))


def test_median_frequency_weights_by_hand(tmp_path: Path) -> None:
    # train a: 6 x 0, 2 x 1 | b: 4 x 0, 3 x 2, one ignored | c: 6 x 1, 2 x 2 ; val d: only class 3
    masks = {
        "a": [[0, 0, 0, 0], [0, 0, 1, 1]],
        "b": [[0, 0, 0, 0], [2, 2, 2, 255]],
        "c": [[1, 1, 1, 1], [1, 1, 2, 2]],
        "d": [[3, 3, 3, 3], [3, 3, 3, 3]],
    }
    write_pairs(tmp_path, masks, val=("d",))
    (tmp_path / "class_names.txt").write_text("bg\nroof\nroad\ntree\n")
    data = open_dataset(str(tmp_path))
    # freq = class pixels / labelled pixels of the masks holding the class: 10/15, 8/16, 5/15; median 1/2.
    # tree never appears in the train split (only in val): weight 0.
    expected = [0.5 / (10 / 15), 0.5 / (8 / 16), 0.5 / (5 / 15), 0.0]
    assert median_frequency_weights(data.train_labels, 4) == pytest.approx(expected)
    assert resolve_class_weights("median-frequency", data) == pytest.approx(expected)
    assert resolve_class_weights("none", data) is None
    weights = tmp_path / "weights.json"
    weights.write_text("[1, 2, 0.5, 0]")
    assert resolve_class_weights(str(weights), data) == [1.0, 2.0, 0.5, 0.0]
    for text, problem in [
        ("1\n2\n3\n", "holds 3 weights; the data has 4 classes"),
        ("1\nx\n3\n4\n", "one number"),
        ("[1, 2, -1, 0]", "finite and >= 0"),
        ("0\n0\n0\n0\n", "at least one > 0"),
    ]:
        weights.write_text(text)
        with pytest.raises(ValueError, match=problem):
            resolve_class_weights(str(weights), data)


class _OneHead(torch.nn.Module):
    """A stand-in for a single-head net: its scores are a dict too, {"semantic": 3 classes}."""

    def __init__(self) -> None:
        super().__init__()
        self.semantic = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"semantic": self.semantic(x)}


def test_train_epoch_weighs_the_loss_by_class() -> None:
    model = _OneHead()
    images, targets = torch.randn(1, 3, 4, 5), torch.tensor([[[0, 1, 2, 2, 255]] * 4])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays as it is
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    weight = torch.tensor([0.2, 1.0, 5.0])
    with torch.no_grad():
        logits = model(images)["semantic"]
    for w in (weight, None):
        loss_sum, steps, _, _ = train_epoch(
            model,
            [(images, {"semantic": targets}, [])],
            optimizer,
            schedule,
            "mean",
            1.0,
            torch.Generator(),
            w,
            torch.device("cpu"),
        )
        assert (loss_sum, steps) == (pytest.approx(float(cross_entropy(logits, targets, weight=w))), 1)


class _TwoHeads(torch.nn.Module):
    """A stand-in for a SIFT Flow net: {"semantic": 3 classes, "geometric": 2 classes}."""

    def __init__(self) -> None:
        super().__init__()
        self.semantic, self.geometric = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"semantic": self.semantic(x), "geometric": self.geometric(x)}


def test_train_epoch_sums_the_heads_losses_and_weighs_the_semantic_head_only() -> None:
    model = _TwoHeads()
    images = torch.randn(1, 3, 4, 5)
    targets = {
        "semantic": torch.tensor([[[0, 1, 2, 2, 255]] * 4]),
        "geometric": torch.tensor([[[0, 1, 1, 255, 0]] * 4]),
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    weight = torch.tensor([0.2, 1.0, 5.0])
    with torch.no_grad():
        scores = model(images)
    loss_sum, steps, _, _ = train_epoch(
        model, [(images, targets, [])], optimizer, schedule, "mean", 1.0, torch.Generator(), weight, torch.device("cpu")
    )
    expected = cross_entropy(scores["semantic"], targets["semantic"], weight=weight) + cross_entropy(
        scores["geometric"], targets["geometric"]
    )
    assert (loss_sum, steps) == (pytest.approx(float(expected)), 1)


def test_bad_dataset_roots(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither the VOC layout"):
        open_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="classes file"):
        read_class_names(str(tmp_path), str(tmp_path / "missing.txt"))


def test_pad_collate_marks_padding_ignored() -> None:
    """Inputs of any channel count (RGB-D: 4) are padded with 0, every head's labels with 255."""
    long = torch.int64
    a = (torch.ones(4, 4, 5), {"semantic": torch.zeros(4, 5, dtype=long), "geometric": torch.ones(4, 5, dtype=long)})
    b = (torch.ones(4, 6, 3), {"semantic": torch.ones(6, 3, dtype=long), "geometric": torch.zeros(6, 3, dtype=long)})
    images, targets, bad = pad_collate([a, BadSample("z", "broken"), b])
    assert images.shape == (2, 4, 6, 5) and list(targets) == ["semantic", "geometric"]
    assert [x.sample_id for x in bad] == ["z"]
    for head, target in targets.items():
        assert target.shape == (2, 6, 5), head
        assert (target[0, 4:, :] == 255).all() and (target[1, :, 3:] == 255).all()
    assert (targets["semantic"][0, :4, :] == 0).all() and (targets["geometric"][0, :4, :] == 1).all()
    assert (images[0, :, 4:, :] == 0).all() and (images[1, :, :, :3] == 1).all()
    assert pad_collate([BadSample("y", "r")])[0] is None


def test_augment_keeps_image_and_labels_aligned() -> None:
    image = torch.zeros(3, 40, 50)
    target = torch.zeros(40, 50, dtype=torch.int64)
    image[:, 10:20, 5:15] = 1.0
    target[10:20, 5:15] = 3
    sizes = set()
    for seed in range(8):
        x, labels = augment(image, {"semantic": target}, RECIPES["modern"], np.random.default_rng(seed))
        y = labels["semantic"]
        assert x.shape[-2:] == y.shape
        sizes.add(tuple(y.shape))
        assert set(y.unique().tolist()) <= {0, 3}
        assert ((x[0] > 0.5) == (y == 3)).float().mean() > 0.97
    assert len(sizes) > 1


def test_augment_keeps_every_modality_and_head_aligned() -> None:
    """RGB-D input whose depth is a function of the semantic labels, and a second head that is one too:
    after random flips and rescales, the depth channel and the geometric labels still agree with the
    semantic labels pixel by pixel."""
    semantic = np.zeros((40, 50), np.uint8)
    semantic[5:20, 3:14], semantic[22:35, 30:47] = 1, 2  # off-centre, so that a flip moves them
    depth_of_class, geometric_of_class = np.array([4.0, 2.0, 1.0], np.float32), np.array([0, 2, 1])
    rgb = np.repeat((semantic * 100)[..., None], 3, axis=2).astype(np.uint8)
    image = get_convention("torchvision").encode({"rgb": rgb, "depth": depth_of_class[semantic]}, ("rgb", "depth"))
    depth_codes = torch.stack([image[3][torch.from_numpy(semantic == k)][0] for k in range(3)])  # per class
    labels = {
        "semantic": torch.from_numpy(semantic.astype(np.int64)),
        "geometric": torch.from_numpy(geometric_of_class[semantic]),
    }
    sides, sizes = set(), set()
    for seed in range(12):
        x, y = augment(image, labels, RECIPES["modern"], np.random.default_rng(seed))
        assert x.shape == (4, *y["semantic"].shape) and y["geometric"].shape == y["semantic"].shape
        nearest_class = (x[3][None] - depth_codes[:, None, None]).abs().argmin(0)
        classes = y["semantic"][None].float()
        interior = (F.max_pool2d(classes, 3, 1, 1) == -F.max_pool2d(-classes, 3, 1, 1))[0]  # away from label edges
        assert (nearest_class == y["semantic"])[interior].float().mean() > 0.99, seed
        assert torch.equal(y["geometric"], torch.from_numpy(geometric_of_class)[y["semantic"]]), seed
        columns = torch.nonzero(y["semantic"] == 1)[:, 1].float()
        sides.add(bool(columns.mean() > y["semantic"].shape[1] / 2))
        sizes.add(tuple(y["semantic"].shape))
    assert sides == {False, True} and len(sizes) > 1  # flipped and not, rescaled to several sizes


def test_train_images_read_the_networks_modalities_and_heads(tmp_path: Path) -> None:
    """A worker's samples: the network's inputs encoded and concatenated in its order, one label map per head."""
    convention = get_convention("torchvision")
    write_synthetic_nyud(str(tmp_path / "nyud"), num_images=4, seed=0)
    nyud = open_dataset(str(tmp_path / "nyud"))
    image, labels = TrainImages(nyud.train, ("rgb", "hha"), {"semantic": 40}, convention, RECIPES["paper"], 0)[0, 0]
    example = load_example(nyud.train[0], nyud)
    assert torch.allclose(image, convention.encode(example.modalities, ("rgb", "hha"))) and image.shape[0] == 6
    assert list(labels) == ["semantic"] and np.array_equal(labels["semantic"].numpy(), example.labels["semantic"])
    write_synthetic_siftflow(str(tmp_path / "siftflow"), num_images=4, seed=0)
    siftflow = open_dataset(str(tmp_path / "siftflow"))
    heads = {"semantic": 33, "geometric": 3}
    image, labels = TrainImages(siftflow.train, ("rgb",), heads, convention, RECIPES["paper"], 0)[0, 0]
    example = load_example(siftflow.train[0], siftflow)
    assert image.shape[0] == 3 and list(labels) == list(heads)
    assert all(np.array_equal(labels[head].numpy(), example.labels[head]) for head in heads)


def test_copy_matching_weights_from_coarser_net() -> None:
    from fcn.models import get_model

    kwargs = {"num_classes": 4, "width": 1 / 16, "geometry": "aligned"}
    coarse, fine = get_model("fcn32s_vgg16", **kwargs), get_model("fcn8s_vgg16", **kwargs)
    with torch.no_grad():
        coarse.head.score_fr.weight.normal_()
    copied, left = copy_matching_weights(fine, coarse.state_dict())
    head = "heads.semantic.rgb."
    assert "streams.rgb.conv1_1.weight" in copied and f"{head}score_fr.weight" in copied
    assert f"{head}score_pool4.weight" in left and f"{head}score_pool3.weight" in left
    assert torch.equal(fine.head.score_fr.weight, coarse.head.score_fr.weight)
