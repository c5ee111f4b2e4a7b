"""Checkpoint round trips on local, memory:// and S3 URIs, and a named error for every bad file."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import fsspec
import pytest
import torch

import fcn
from fcn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

NAMES = ["background", "road", "tree"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = fcn.get_model("fcn8s_vgg16", num_classes=3, width=1 / 16, geometry="aligned")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)  # the score layers start at zero; make every tensor distinctive
    return net


def _assert_same_network(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    assert type(loaded) is type(original) and not loaded.training
    ours, theirs = loaded.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].device.type == "cpu"
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    x = torch.randn(1, 3, 37, 41)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original.eval()(x))


def test_local_round_trip_keeps_everything(model: torch.nn.Module, tmp_path: Path) -> None:
    uri = str(tmp_path / "runs" / "a" / "checkpoint.pt")  # parent folders are created
    palette = [0, 0, 0, 128, 64, 128, 0, 128, 0]
    assert (
        save_checkpoint(
            model, uri, class_names=NAMES, palette=palette, input_convention="caffe", epoch=3, metrics={"mean_iu": 0.5}
        )
        == uri
    )
    ckpt = load_checkpoint(uri)
    _assert_same_network(ckpt.model, model)
    assert ckpt.arch == model.arch and ckpt.arch["kwargs"]["geometry"] == "aligned"
    assert ckpt.class_names == NAMES and ckpt.palette == palette and ckpt.input_convention == "caffe"
    assert ckpt.meta == {"epoch": 3, "metrics": {"mean_iu": 0.5}} and ckpt.uri == uri
    assert [p for p in os.listdir(tmp_path / "runs" / "a")] == ["checkpoint.pt"]  # no temp file left


def test_defaults_and_numpy_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    net = fcn.get_model("fcn32s_vgg16", width=1 / 16)
    save_checkpoint(net, "memory://root.pt")
    monkeypatch.chdir(tmp_path)
    save_checkpoint(net, "voc.pt", score=np.float32(0.25), steps=np.int64(7), shape=(1, 2))  # relative path
    ckpt = load_checkpoint(f"file://{tmp_path}/voc.pt")
    assert ckpt.class_names == list(fcn.VOC_CLASSES) and ckpt.palette == fcn.voc_palette()
    assert ckpt.input_convention == "torchvision"
    assert ckpt.meta == {"score": 0.25, "steps": 7, "shape": (1, 2)}
    assert type(ckpt.meta["score"]) is float and type(ckpt.meta["steps"]) is int


def test_memory_and_s3_round_trip(model: torch.nn.Module, s3_bucket: str) -> None:
    for uri in ("memory://ckpts/model.pt", f"{s3_bucket}/models/v0001/checkpoint.pt"):
        save_checkpoint(model, uri, class_names=NAMES, note="remote")
        ckpt = load_checkpoint(uri)
        _assert_same_network(ckpt.model, model)
        assert ckpt.meta == {"note": "remote"} and ckpt.class_names == NAMES


def test_registry_root_resolves_to_its_champion(model: torch.nn.Module) -> None:
    from fcn import registry

    root = "memory://registry-ckpt-test"
    save_checkpoint(model, f"{root}/runs/r/epoch-0001/checkpoint.pt", class_names=NAMES)
    version = registry.register_model(root, f"{root}/runs/r/epoch-0001/checkpoint.pt", {"mean_iu": 0.4})
    registry.promote(root, version)
    ckpt = load_checkpoint(root)
    assert ckpt.uri.endswith(f"models/{version}/checkpoint.pt") and ckpt.class_names == NAMES


def test_readers_never_see_half_a_file(model: torch.nn.Module, tmp_path: Path) -> None:
    uri = str(tmp_path / "live.pt")
    save_checkpoint(model, uri, class_names=NAMES, generation=0)
    errors: list[Exception] = []
    reads = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                reads.append(load_checkpoint(uri).meta["generation"])
            except Exception as error:
                errors.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for generation in range(1, 6):
            save_checkpoint(model, uri, class_names=NAMES, generation=generation)
    finally:
        done.set()
        thread.join()
    assert errors == [] and reads  # the reader loaded while the file was being replaced
    assert load_checkpoint(uri).meta == {"generation": 5}


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    uri = str(tmp_path / "evil.pt")
    torch.save({"format": "fcn-checkpoint", "version": 1, "payload": Exploit()}, uri)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(uri)
    assert not marker.exists()


def test_bad_files_name_the_problem(model: torch.nn.Module, tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint(model, str(good), class_names=NAMES)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(truncated))

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(str(text))

    bare = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match="not an fcn checkpoint"):
        load_checkpoint(str(bare))

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))

    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(str(tmp_path))

    payload = torch.load(good, weights_only=True)
    for change, message in [
        (lambda p: p["arch"].update(name="fcn64s_vgg16"), "fcn64s_vgg16"),
        (lambda p: p["arch"].update(name="fcn32s_vgg16"), "do not fit network 'fcn32s_vgg16'"),
        (lambda p: p.update(class_names=NAMES[:2]), "2 class names but network 'fcn8s_vgg16' has 3 classes"),
        (lambda p: p.update(input_convention="bgr"), "input convention 'bgr'"),
        (lambda p: p.update(version=99), "format version 99"),
        (lambda p: p.pop("state_dict"), r"missing \['state_dict'\]"),
        (lambda p: p.update(arch="fcn8s_vgg16"), "malformed network description"),
    ]:
        edited = {**payload, "arch": {**payload["arch"]}}
        change(edited)
        buffer = io.BytesIO()
        torch.save(edited, buffer)
        with fsspec.open("memory://edited.pt", "wb") as f:
            f.write(buffer.getvalue())
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint("memory://edited.pt")


def test_save_rejects_bad_arguments(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="2 class names given for a network with 3 classes"):
        save_checkpoint(model, "memory://x.pt", class_names=NAMES[:2])
    with pytest.raises(ValueError, match="input convention"):
        save_checkpoint(model, "memory://x.pt", class_names=NAMES, input_convention="rgb")
    with pytest.raises(ValueError, match=r"meta\['when'\] holds a object"):
        save_checkpoint(model, "memory://x.pt", class_names=NAMES, when=object())
    with pytest.raises(ValueError, match="arch"):
        save_checkpoint(torch.nn.Conv2d(3, 3, 1), "memory://x.pt")


def test_a_two_head_rgbd_checkpoint_records_its_heads_and_modalities(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = fcn.get_model("fcn16s_siftflow_vgg16", num_classes=4, geometric_classes=3, width=1 / 16)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    uri = str(tmp_path / "siftflow.pt")
    save_checkpoint(
        net,
        uri,
        class_names=["sky", "tree", "road", "car"],
        head_class_names={"geometric": ["sky", "horizontal", "vertical"]},
    )
    ckpt = load_checkpoint(uri)
    assert list(ckpt.heads) == ["semantic", "geometric"]
    assert ckpt.heads["semantic"]["class_names"] == ["sky", "tree", "road", "car"] == ckpt.class_names
    assert ckpt.heads["geometric"]["class_names"] == ["sky", "horizontal", "vertical"]
    assert len(ckpt.heads["geometric"]["palette"]) == 768 and ckpt.modalities == ["rgb"]
    x = torch.randn(1, 3, 33, 35)
    with torch.no_grad():
        out, expected = ckpt.model(x), net.eval()(x)
    torch.testing.assert_close(out["geometric"], expected["geometric"])
    with pytest.raises(ValueError, match="2 class names given for head 'geometric' with 3 classes"):
        save_checkpoint(net, uri, class_names=["a", "b", "c", "d"], head_class_names={"geometric": ["a", "b"]})
    rgbd = fcn.get_model("fcn32s_rgbd_vgg16", num_classes=3, width=1 / 16)
    save_checkpoint(rgbd, uri, class_names=NAMES)
    assert load_checkpoint(uri).modalities == ["rgb", "depth"]


def test_a_version_1_checkpoint_with_flat_pytorch_fcn_names_still_loads(model: torch.nn.Module, tmp_path: Path) -> None:
    from fcn.checkpoint import FORMAT
    from fcn.classes import voc_palette
    from fcn.weights import pytorch_fcn_names

    flat = {name: model.state_dict()[key] for name, key in pytorch_fcn_names(model).items()}
    assert "conv1_1.weight" in flat and "score_pool3.weight" in flat
    payload = {
        "format": FORMAT,
        "version": 1,
        "arch": model.arch,
        "state_dict": flat,
        "class_names": NAMES,
        "palette": voc_palette(),
        "input_convention": "torchvision",
        "meta": {},
    }
    uri = tmp_path / "v1.pt"
    torch.save(payload, uri)
    ckpt = load_checkpoint(str(uri))
    _assert_same_network(ckpt.model, model)
    assert ckpt.heads == {"semantic": {"class_names": NAMES, "palette": voc_palette()}} and ckpt.modalities == ["rgb"]
