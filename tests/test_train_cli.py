"""`python -m pipelines.train`: --help, and bad arguments or data rejected with exit 2 and the option named
(all before any Ray cluster is touched); flags and flow parameters made from TrainConfig. Recipe settings
from the paper."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import fcn
from fcn.models import NETWORKS, register_model
from fcn.models.fcn import FCN, build_fcn
from fcn.models.vgg import VGG16Trunk
from pipelines.common.options import flag
from pipelines.synthetic import write_synthetic_voc
from pipelines.train import RECIPES, ConfigError, TrainConfig, main, run_training
from pipelines.train.cli import build_parser


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("cli-data")
    write_synthetic_voc(str(root), num_images=4, seed=0)
    return str(root)


def test_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0
    for option in (
        "--data",
        "--registry",
        "--model",
        "--init",
        "--workers",
        "--gpus-per-worker",
        "--epochs",
        "--recipe",
        "--width",
        "--run-name",
        "--promote-margin",
        "--strict",
        "--max-failures",
        "--class-weights",
    ):
        assert option in done.stdout


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--workers", "0"], "--workers"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "many"], "--epochs"),
        (["--model", "fcn99s_vgg16"], "--model"),
        (["--recipe", "sgd"], "--recipe"),
        (["--lr", "-1"], "--lr"),
        (["--width", "0"], "--width"),
        (["--geometry", "round"], "--geometry"),
        (["--batch-size", "0"], "--batch-size"),
        (["--loss-sample-rate", "1.5"], "--loss-sample-rate"),
        (["--promote-margin", "-0.1"], "--promote-margin"),
        (["--run-name", "a/b"], "--run-name"),
        (["--input-convention", "bgr"], "--input-convention"),
        (["--init", "/nonexistent/checkpoint.pt"], "--init"),
        (["--classes", "/nonexistent/classes.txt"], "classes file"),
        (["--backbone-weights", "/nonexistent/vgg16.pth"], "--backbone-weights"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(
    data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], named: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", data, "--registry", str(tmp_path / "reg"), "--width", "0.0625", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("value", "text", "problem"),
    [
        ("median", None, "must be 'none', 'median-frequency' or an existing file"),
        ("{tmp}/missing.txt", None, "must be 'none', 'median-frequency' or an existing file"),
        ("{tmp}/w.txt", "1\n1\n1\n", "holds 3 weights; the data has 6 classes"),
        ("{tmp}/w.json", '[1, 1, 1, 1, 1, "many"]', "one number per line or a JSON list"),
        ("{tmp}/w.txt", "1\n1\n1\n1\n1\ninf\n", "finite and >= 0"),
    ],
)
def test_bad_class_weights_exit_2_naming_the_option(
    data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, text: str | None, problem: str
) -> None:
    """A bad --class-weights value, or a weights file that is malformed or does not give the 6 classes' weights."""
    value = value.format(tmp=tmp_path)
    if text is not None:
        Path(value).write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", data, "--registry", str(tmp_path / "reg"), "--class-weights", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--class-weights: " in err and problem in err, err


def test_bad_data_and_missing_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path), "--registry", str(tmp_path / "reg")])
    assert exit_info.value.code == 2 and "neither the VOC layout" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--registry", str(tmp_path)])
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err


def test_paper_recipe() -> None:
    paper = RECIPES["paper"]
    assert [paper.learning_rate(m, None) for m in ("fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16")] == [
        1e-10,
        1e-12,
        1e-14,
    ]
    assert paper.loss_reduction == "sum" and paper.poly_power is None and not paper.hflip
    optimizer = paper.make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-10)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.99 and optimizer.defaults["weight_decay"] == 5e-4
    assert paper.lr_factor(100)(99) == 1.0  # fixed learning rate
    modern = RECIPES["modern"]
    assert modern.loss_reduction == "mean" and modern.lr_factor(100)(50) == pytest.approx(0.5**0.9)
    with pytest.raises(ValueError, match="lr: .*pass --lr"):
        paper.learning_rate("fcn32s_alexnet", None)
    TrainConfig(data="d", registry="r", recipe="paper", model="fcn16s_vgg16", width=0.0625).validate()


@pytest.fixture
def registered_network() -> Iterator[str]:
    """A network registered here with one decorator, unregistered afterwards."""

    @register_model(paper_lr=1e-11, modalities=("rgb",))
    def fcn32s_registered_vgg16(
        *,
        num_classes: int = 21,
        geometry: str = "reference",
        width: float = 1.0,
        backbone_weights: str | None = None,
        output_stride: int = 32,
        learnable_upsampling: bool = True,
    ) -> FCN:
        return build_fcn(
            "fcn32s_registered_vgg16",
            VGG16Trunk,
            num_classes=num_classes,
            geometry=geometry,
            width=width,
            backbone_weights=backbone_weights,
            output_stride=output_stride,
            learnable_upsampling=learnable_upsampling,
        )

    yield "fcn32s_registered_vgg16"
    del NETWORKS["fcn32s_registered_vgg16"]


def test_one_decorator_registers_a_network_for_get_model_the_cli_and_the_paper_recipe(
    registered_network: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = fcn.get_model(registered_network, width=0.0625, num_classes=3)
    assert model.arch["name"] == registered_network and model.num_classes == 3
    assert getattr(fcn, registered_network) is NETWORKS[registered_network].builder
    parser = build_parser()
    args = parser.parse_args(["--data", "d", "--registry", "r", "--model", registered_network])
    assert args.model == registered_network and registered_network in parser.format_help()
    config = TrainConfig(data="d", registry="r", model=registered_network, recipe="paper", width=0.0625)
    config.validate()
    assert RECIPES["paper"].learning_rate(registered_network, None) == 1e-11
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--data", "d", "--registry", "r", "--model", "fcn32s_unregistered_vgg16"])
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--model: must be one of"):
        TrainConfig(data="d", registry="r", model="fcn32s_unregistered_vgg16").validate()
    with pytest.raises(ValueError, match="already registered"):
        register_model(paper_lr=1e-10)(NETWORKS[registered_network].builder)


def test_config_is_the_single_source_of_cli_flags_and_flow_parameters() -> None:
    """Every TrainConfig field is a CLI flag with the config's default, help and choices, and every
    training parameter of the nightly-retrain flow has the config's default."""
    from flows.nightly_retrain import nightly_retrain

    parser = build_parser()
    actions = {action.dest: action for action in parser._actions}
    names = [spec.name for spec in fields(TrainConfig)]
    for name in names:
        action, meta = actions[name], TrainConfig.metadata(name)
        assert action.option_strings[0] == flag(name), name
        assert action.help.startswith(meta["help"]) and action.choices == meta.get("choices"), name
        if not action.required:
            assert action.default == TrainConfig.default(name), name
    flow_parameters = inspect.signature(nightly_retrain.fn).parameters
    shared = [name for name in flow_parameters if name in names]
    assert {
        "model",
        "width",
        "epochs",
        "workers",
        "gpus_per_worker",
        "recipe",
        "class_weights",
        "promote_margin",
        "ray_address",
    } <= set(shared)
    for name in shared:
        if flow_parameters[name].default is not inspect.Parameter.empty:  # data and registry are required
            assert flow_parameters[name].default == TrainConfig.default(name), name
    args = parser.parse_args(["--data", "d", "--registry", "r", "--layout", "nyud", "--no-promote", "--strict"])
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k != "verbose"})
    assert (config.layout, config.promote, config.strict, config.epochs) == ("nyud", False, True, 10)


@pytest.fixture(scope="module")
def voc_and_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in two layouts at once: VOC (detected first) and images/ + masks/."""
    root = tmp_path_factory.mktemp("two-layouts")
    write_synthetic_voc(str(root), num_images=4, seed=0)
    (root / "images").mkdir()
    for image in (root / "JPEGImages").glob("*.jpg"):
        (root / "images" / image.name).write_bytes(image.read_bytes())
    (root / "masks").symlink_to(root / "SegmentationClass")
    for split in ("train", "val"):
        (root / f"{split}.txt").write_bytes((root / f"ImageSets/Segmentation/{split}.txt").read_bytes())
    return root


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ([], r"--model: fcn32s_hha_vgg16 reads \['hha'\], but --data \S+ \(voc layout\) has no \['hha'\]"),
        (["--layout", "images-masks"], r"--data \S+ \(images-masks layout\) has no \['hha'\]"),
        (["--layout", "nyud"], r"--data: .* is not in the nyud layout: missing data/images/"),
    ],
)
def test_model_the_data_cannot_feed_and_layout_override_exit_2_before_ray(
    voc_and_pairs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    problem: str,
) -> None:
    """An HHA network on colour-only data is refused naming --model and --data, in the layout --layout
    forces, before the driver connects to Ray (the session's cluster may already run: Ray being
    initialised says nothing about this call)."""
    from pipelines.train import driver

    connections: list[object] = []
    monkeypatch.setattr(driver, "connect", connections.append)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(voc_and_pairs), "--registry", str(tmp_path / "reg"), "--model", "fcn32s_hha_vgg16", *extra])
    assert exit_info.value.code == 2
    assert re.search(problem, capsys.readouterr().err)
    assert connections == []


def test_two_head_model_on_one_head_data_is_refused(data: str, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"--model: fcn16s_siftflow_vgg16 has the heads \['semantic', 'geometric'\], "
        r"but --data .* \(voc layout\) has no \['geometric'\] labels",
    ):
        run_training(TrainConfig(data=data, registry=str(tmp_path), model="fcn16s_siftflow_vgg16", width=1 / 16))
