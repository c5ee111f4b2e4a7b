"""Prediction of any size: same-size labels for every mode, tiled == whole, bounded memory, checkpoints."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import fcn
from fcn.device import resolve_device, resolve_precision
from fcn.predictor import Predictor


def _random_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh builders zero their score layers (every pixel would be class 0); give every tensor values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _random_weights(fcn.get_model("fcn8s_vgg16", num_classes=4, width=1 / 16))


def _blocky_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random 16x16-pixel blocks: structure at the network's scale, so labels vary across the image."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(blocks, np.ones((16, 16, 1), np.uint8))[:height, :width])


def _forward_sizes(model: torch.nn.Module) -> tuple[list[tuple[int, ...]], torch.utils.hooks.RemovableHandle]:
    sizes: list[tuple[int, ...]] = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(tuple(args[0].shape)))
    return sizes, handle


def test_any_size_and_mode_gives_same_size_labels(model: torch.nn.Module) -> None:
    predictor = Predictor(model, device="cpu")
    rgb = _blocky_image(37, 53)
    images = [
        Image.fromarray(rgb),
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
        rgb[:1, :1],
        rgb[:, :, 0].astype(np.uint16) * 257,
    ]
    for image in images:
        out = predictor(image, confidence=True)
        h, w = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
        assert out.labels.shape == (h, w) and out.labels.dtype == np.uint8
        assert out.confidence.shape == (h, w) and out.confidence.dtype == np.float32
        assert np.all(out.confidence >= 1 / 4 - 1e-6) and np.all(out.confidence <= 1 + 1e-6)
    assert predictor(rgb).confidence is None


@pytest.mark.parametrize("convention", ["caffe", "torchvision"])
def test_labels_and_confidence_match_a_direct_forward(model: torch.nn.Module, convention: str) -> None:
    rgb = _blocky_image(61, 45, seed=1)
    out = Predictor(model, input_convention=convention, device="cpu")(rgb, confidence=True)
    x = fcn.get_convention(convention).to_tensor(rgb)[None]
    with torch.no_grad():
        probs = model(x)["semantic"].softmax(1)[0]
    np.testing.assert_array_equal(out.labels, probs.argmax(0).numpy())
    np.testing.assert_allclose(out.confidence, probs.max(0).values.numpy(), rtol=1e-5, atol=1e-6)
    assert len(np.unique(out.labels)) >= 3


@pytest.mark.parametrize("geometry", ["reference", "aligned"])
def test_tiled_inference_matches_whole_image(geometry: str) -> None:
    net = _random_weights(fcn.get_model("fcn8s_vgg16", num_classes=4, width=1 / 16, geometry=geometry))
    rgb = _blocky_image(700, 690, seed=2)
    whole = Predictor(net, device="cpu")(rgb, confidence=True)
    sizes, handle = _forward_sizes(net)
    tiled_predictor = Predictor(net, device="cpu", max_pixels=100_000, tile_size=640)
    tiled = tiled_predictor(rgb, confidence=True)
    handle.remove()
    # 2 x 2 tiles, overlapping by at least the receptive field, none larger than the tile size.
    assert len(sizes) == 4 and all(h <= 640 and w <= 640 for _, _, h, w in sizes)
    assert 2 * tiled_predictor.margin >= net.receptive_field
    counts = np.bincount(whole.labels.ravel(), minlength=4) / whole.labels.size
    assert counts.min() > 0.1  # every class present: agreement is not that of a constant map
    assert (tiled.labels == whole.labels).mean() >= 0.999
    np.testing.assert_allclose(tiled.confidence, whole.confidence, atol=1e-4)


def test_large_image_runs_tile_by_tile(model: torch.nn.Module) -> None:
    rgb = _blocky_image(1200, 1000, seed=3)
    predictor = Predictor(model, device="cpu", max_pixels=100_000, tile_size=896)
    sizes, handle = _forward_sizes(model)
    tracemalloc.start()
    try:
        out = predictor(rgb, confidence=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        handle.remove()
    assert out.labels.shape == (1200, 1000)
    assert len(sizes) == 4 and max(h * w for _, _, h, w in sizes) <= 896 * 896
    # numpy allocations: the uint8 labels + float32 confidence outputs and one tile's pieces; full-image
    # float logits alone would be 4 classes x 4 bytes per pixel on top.
    outputs = rgb.shape[0] * rgb.shape[1] * (1 + 4)
    assert peak < outputs + 896 * 896 * 6


def test_ten_thousand_square_image_has_bounded_peak_memory() -> None:
    """A 10000x10000 image in a fresh process, through a cheap stride-8 FCN (8x8 average pooling, a
    1x1 classifier, nearest upsampling) with the default tile size: peak resident memory grows by the
    uint8 label map plus at most 512 MiB for tiles (whole-image inference grows by ~3 GB: the float32
    input alone is 1.2 GB)."""
    script = textwrap.dedent(
        """
        import resource
        import numpy as np
        import torch
        import torch.nn.functional as F
        from fcn.predictor import Predictor

        class PooledClassifier(torch.nn.Module):
            num_classes, receptive_field, output_stride = 2, 8, 8
            head_classes = {"semantic": 2}

            def __init__(self):
                super().__init__()
                self.score = torch.nn.Conv2d(3, 2, 1)

            def forward(self, x):
                coarse = self.score(F.avg_pool2d(x, 8, ceil_mode=True))
                scores = F.interpolate(coarse, scale_factor=8.0, mode="nearest")[..., : x.shape[2], : x.shape[3]]
                return {"semantic": scores}

        torch.manual_seed(0)
        torch.set_num_threads(1)  # memory-bound work; spare the shared test machine
        model = PooledClassifier()
        image = np.zeros((10000, 10000, 3), np.uint8)
        image[:, 5000:] = 255
        predictor = Predictor(model, device="cpu")
        predictor(image[:64, :64])  # warm up allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        labels = predictor(image).labels
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert labels.shape == (10000, 10000) and labels.dtype == np.uint8
        assert labels[0, 0] != labels[0, -1]
        assert (labels[:, :5000] == labels[0, 0]).all() and (labels[:, 5000:] == labels[0, -1]).all()
        print((after - before) * 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1])
    assert growth < 10000 * 10000 + 512 * 2**20, f"peak memory grew by {growth / 2**20:.0f} MiB"


def test_scores_are_decoded_band_by_band_as_whole_without_a_copy_of_them(monkeypatch) -> None:
    """Labels, confidence and statistics decoded in bands of rows equal those of one pass over the whole score map,
    bit for bit; and 21 classes of a 2048 px window (336 MiB of scores) decode within 200 MiB more (in one pass the
    softmax held another copy of the scores: +426 MiB)."""
    import fcn.scores as scores_module

    logits = torch.randn((2, 21, 150, 170), generator=torch.Generator().manual_seed(0)) * 5
    monkeypatch.setattr(scores_module, "DECODE_BAND_PIXELS", 1 << 40)
    whole = scores_module.decode_scores(logits, True, True)
    monkeypatch.setattr(scores_module, "DECODE_BAND_PIXELS", 1)  # bands of 128 rows (2 x 170 x 128 px), then 22
    banded = scores_module.decode_scores(logits, True, True)
    for one, other in zip(whole, banded):
        np.testing.assert_array_equal(one.labels, other.labels)
        np.testing.assert_array_equal(one.confidence, other.confidence)
        np.testing.assert_array_equal(one.pixel_counts, other.pixel_counts)
        assert one.mean_confidence == other.mean_confidence

    script = textwrap.dedent(
        """
        import resource
        import torch
        from fcn.scores import decode_scores

        torch.set_num_threads(1)
        logits = torch.randn(1, 21, 2048, 2048)
        decode_scores(logits[..., :64, :64], True, True)  # warm up allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        decode_scores(logits, True, True)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1])
    assert growth < 200 * 2**20, f"decoding grew the peak by {growth / 2**20:.0f} MiB"


def test_batch_matches_single_images(model: torch.nn.Module) -> None:
    images = [_blocky_image(40, 48, seed=s) for s in range(3)] + [_blocky_image(33, 20, seed=9)]
    predictor = Predictor(model, device="cpu", max_pixels=2 * 40 * 48)  # equal sizes share passes of two
    sizes, handle = _forward_sizes(model)
    batch = predictor.predict_batch(images, confidence=True)
    handle.remove()
    assert sorted(s[0] for s in sizes) == [1, 1, 2]
    for image, got in zip(images, batch):
        single = predictor(image, confidence=True)
        np.testing.assert_array_equal(got.labels, single.labels)
        np.testing.assert_allclose(got.confidence, single.confidence, atol=1e-5)


def test_bf16_and_channels_last_on_cpu(model: torch.nn.Module) -> None:
    rgb = _blocky_image(64, 64, seed=4)
    fp32 = Predictor(model, device="cpu")(rgb)
    fast = Predictor(copy.deepcopy(model), device="cpu", bf16=True, channels_last=True)(rgb, confidence=True)
    assert fast.labels.shape == (64, 64) and fast.confidence.dtype == np.float32
    assert (fast.labels == fp32.labels).mean() > 0.9


def test_bf16_trunk_leaves_labels_and_confidence_to_a_float32_head(model: torch.nn.Module) -> None:
    """Logits near 300 (a common offset of the coarsest scores) with gaps near 1: rounded to bf16 (steps
    of 2 there) they would move labels and confidences; the head and decoding run in float32 instead."""
    rgb = _blocky_image(64, 64, seed=4)
    x = fcn.get_convention("torchvision").to_tensor(rgb)[None]
    net = copy.deepcopy(model)
    with torch.no_grad():
        spread = net(x)["semantic"].std()
        for name, parameter in net.head.named_parameters():
            if name.startswith("score"):
                parameter /= spread  # the head is linear: logits of unit spread
        net.head.score_fr.bias += 300
    fast = Predictor(copy.deepcopy(net), device="cpu", bf16=True)(rgb, confidence=True)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = net.features(x)["rgb"]
        logits = net.head({tap: f.float() for tap, f in features.items()}, x.shape[-2:])[0]
    probabilities = logits.softmax(0)
    np.testing.assert_array_equal(fast.labels, probabilities.argmax(0).numpy())
    np.testing.assert_allclose(fast.confidence, probabilities.max(0).values.numpy(), atol=1e-3)
    exact = Predictor(net, device="cpu")(rgb, confidence=True)
    assert (fast.labels == exact.labels).mean() >= 0.995
    assert np.abs(fast.confidence - exact.confidence).max() < 0.05


def test_predict_from_checkpoint_applies_its_convention(model: torch.nn.Module) -> None:
    uri = "memory://predict-test/caffe.pt"
    fcn.save_checkpoint(model, uri, class_names=["a", "b", "c", "d"], input_convention="caffe")
    rgb = _blocky_image(50, 50, seed=5)
    from_uri = fcn.predict(uri, rgb, device="cpu")
    caffe = fcn.predict(model, rgb, input_convention="caffe", device="cpu")
    torchvision = fcn.predict(model, rgb, input_convention="torchvision", device="cpu")
    np.testing.assert_array_equal(from_uri.labels, caffe.labels)
    assert (from_uri.labels != torchvision.labels).any()
    predictor = Predictor.from_checkpoint(fcn.load_checkpoint(uri), device="cpu")
    assert predictor.convention.name == "caffe"


def test_bad_parameters_name_the_problem(model: torch.nn.Module) -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device 'gpu0'"):
        Predictor(model, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Predictor(model, device="cuda")
    with pytest.raises(ValueError, match="receptive_field"):
        Predictor(torch.nn.Conv2d(3, 2, 1), device="cpu")
    with pytest.raises(ValueError, match="tile_size"):
        Predictor(model, device="cpu", tile_size=300)
    with pytest.raises(ValueError, match="max_pixels"):
        Predictor(model, device="cpu", max_pixels=0)
    with pytest.raises(ValueError, match="input convention"):
        Predictor(model, device="cpu", input_convention="rgb")
    with pytest.raises(ValueError, match="uint32"):
        Predictor(model, device="cpu")(np.zeros((4, 4), np.uint32))


@pytest.mark.parametrize(
    ("precision", "device", "capability", "expected"),
    [
        ("auto", "cpu", None, "fp32"),
        ("auto", "cuda", (7, 0), "fp32"),  # Volta: bf16 only emulated
        ("auto", "cuda", (7, 5), "fp32"),  # Turing
        ("auto", "cuda", (8, 0), "bf16"),  # Ampere
        ("auto", "cuda", (9, 0), "bf16"),  # Hopper
        ("fp32", "cuda", (9, 0), "fp32"),
        ("bf16", "cpu", None, "bf16"),
    ],
)
def test_auto_precision_is_bf16_only_on_gpus_with_bf16_tensor_cores(
    precision: str, device: str, capability: tuple[int, int] | None, expected: str
) -> None:
    assert resolve_precision(precision, device, capability) == expected


def test_an_unknown_precision_is_named() -> None:
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_a_two_head_net_is_predicted_per_head_whole_and_tiled_alike() -> None:
    torch.manual_seed(0)
    net = fcn.get_model("fcn16s_siftflow_vgg16", width=1 / 16)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    image = np.random.default_rng(0).integers(0, 255, (900, 700, 3), dtype=np.uint8)
    whole = Predictor(net, device="cpu")(image, statistics=True)
    tiled = Predictor(net, device="cpu", max_pixels=64 * 64, tile_size=640)(image, statistics=True)
    assert list(whole.heads) == list(tiled.heads) == ["semantic", "geometric"]  # every head, in order
    semantic, geometric = whole.heads["semantic"], whole.heads["geometric"]
    assert geometric.labels.shape == (900, 700) and geometric.labels.max() < 3 and len(geometric.pixel_counts) == 3
    assert len(semantic.pixel_counts) == 33 and len(np.unique(geometric.labels)) > 1
    np.testing.assert_array_equal(whole.labels, semantic.labels)  # the fields are the primary head's
    for head in ("semantic", "geometric"):
        np.testing.assert_array_equal(whole.heads[head].labels, tiled.heads[head].labels)
        np.testing.assert_array_equal(whole.heads[head].pixel_counts, tiled.heads[head].pixel_counts)


def test_an_rgbd_net_reads_a_dict_of_inputs_in_its_modality_order() -> None:
    from fcn.depth import log_depth

    torch.manual_seed(0)
    net = fcn.get_model("fcn32s_rgbd_vgg16", num_classes=4, width=1 / 16).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 5, (50, 60)).astype(np.float32)
    convention = fcn.get_convention("torchvision")
    x = convention.encode({"depth": depth, "rgb": rgb}, net.modalities)
    assert x.shape == (4, 50, 60)
    torch.testing.assert_close(x[:3], convention.to_tensor(rgb))
    torch.testing.assert_close(x[3], torch.from_numpy(log_depth(depth)))
    with torch.no_grad():
        expected = net(x[None])["semantic"].argmax(1)[0].numpy()
    predictor = Predictor(net, device="cpu")
    np.testing.assert_array_equal(predictor({"rgb": rgb, "depth": depth}).labels, expected)
    with pytest.raises(ValueError, match=r"reads \['rgb', 'depth'\]: pass a dict"):
        predictor(rgb)
    with pytest.raises(ValueError, match=r"missing \['depth'\]"):
        predictor({"rgb": rgb})
    with pytest.raises(ValueError, match=r"missing \['rgb'\]"):
        predictor({"depth": depth})
    with pytest.raises(ValueError, match="differ in size"):
        predictor({"rgb": rgb, "depth": depth[:40]})
