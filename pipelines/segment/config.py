"""The segmentation job's configuration: one dataclass holds every default, its validation and the
help text that the CLI flags (``cli.py``) and the ``segment-bucket`` flow's parameters are made from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcn.depth import NYUD_KINECT, Camera
from pipelines.common.options import SAFE_SECRETS_HELP, ConfigError, Options, flag, option

DEVICES = ("auto", "cpu", "cuda")
NYUD_CAMERA = ",".join(str(getattr(NYUD_KINECT, name)) for name in ("fx", "fy", "cx", "cy"))
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class SegmentConfig(Options):
    """Parameters of one segmentation run; each field is a CLI flag (``--batch-size`` for ``batch_size``)."""

    input: str = option(
        "",
        "prefix/folder, glob, manifest file (one image URI per line) or inventory (.parquet/.csv of object keys); "
        "any fsspec URI",
        required=True,
    )
    output: str = option("", "output URI (masks/, stats/, manifest.json, _SUCCESS)", required=True)
    model: str = option("", "checkpoint URI, or a model registry root (its champion is used)", required=True)
    ray_address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    actors: str | int | None = option(
        None,
        "FCN actors: N (a pool of N) or MIN-MAX (a pool that grows from MIN to MAX while images queue; its pending "
        "GPU actors ask the cluster's autoscaler for GPU nodes) (default: on GPUs from the GPUs present, at least 1, "
        "to the most the autoscaler's node types hold; on CPUs one per --cpus-per-actor CPUs)",
        metavar="N|MIN-MAX",
    )
    cpus_per_actor: float = option(2.0, "CPUs (= torch threads) per CPU actor", gt=0)
    device: str = option(
        "auto",
        "auto: CUDA if the cluster has GPUs or its autoscaler's node types have some, else CPU; cuda (or auto) with "
        "no GPU in the cluster yet waits up to --gpu-wait-s for the autoscaler to add one",
        choices=DEVICES,
    )
    gpu_wait_s: float = option(
        600.0, "on GPUs: the longest wait for a first GPU to join the cluster before failing", ge=0
    )
    precision: str = option(
        "auto",
        "auto: bf16 autocast (the network's trunk; its heads, arg-max and confidence stay fp32) + channels_last on "
        "CUDA GPUs of compute capability >= 8.0 (Ampere and later), fp32 on older GPUs (bf16 emulated, slow) and CPUs",
        choices=PRECISIONS,
    )
    batch_size: int = option(
        16, "images per FCN actor call; equal sizes share forward passes (on CPUs of at most 128 Kpx)", ge=1
    )
    block_rows: int = option(256, "most images per Ray Data block, i.e. per loader call", ge=1)
    block_megabytes: float = option(32.0, "most encoded source megabytes per block", gt=0)
    gpu_decode: bool = option(
        True, "CUDA actors decode baseline JPEGs on the GPU (nvJPEG); others decode on CPU workers"
    )
    overlays: bool = option(
        False,
        "also write colour overlays to <output>/overlays/<key>.jpg (a tiled image's at its mask overview's scale)",
    )
    depth: str | None = option(
        None,
        "RGB-D and HHA models: prefix of the depth maps; image <key>'s is <prefix>/<key without extension>.png "
        "(16-bit, millimetres)",
    )
    camera: str = option(
        NYUD_CAMERA, "intrinsics fx,fy,cx,cy (pixels) of the depth camera, for HHA (default: NYUDv2's Kinect)"
    )
    storage_options: dict[str, Any] = option(
        dict,
        'fsspec options for --input, --output and --model, as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\', '
        "or @FILE holding that JSON. Secrets: not here, where process lists and Ray's job table show them; as "
        f"{SAFE_SECRETS_HELP}",
        metavar="JSON|@FILE",
    )
    max_image_pixels: int = option(
        100_000_000,
        "refuse images whose header declares more pixels (tiled TIFFs, read by window, have no such limit)",
        ge=1,
    )
    tile_pixels: int = option(
        16_777_216,
        "tiled TIFFs (BigTIFF, COG, pyramidal) of more pixels are segmented as windows of --tile-size, each read by "
        "window and taken by any FCN actor, into a tiled TIFF mask",
        ge=1,
    )
    tile_size: int = option(
        2048,
        "side of the input windows of a tiled image, margins included (rounded down to the network's stride)",
        ge=1,
    )
    rows_per_file: int = option(256, "stats rows per Parquet part file", ge=1)
    read_retries: int = option(3, "retries of a failed read", ge=0)
    write_retries: int = option(
        3, "retries of a failed write (masks, Parquet parts, compaction, manifest, _SUCCESS)", ge=0
    )
    progress: bool | None = option(None, "live progress bar (default: when stderr is a terminal)")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad parameter."""
        for name in ("input", "output", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(flag(name), "must be a non-empty URI or path")
        for name in ("device", "precision"):
            choices = self.metadata(name)["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(flag(name), f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        self.actor_range()
        self.check_bounds()
        if not isinstance(self.storage_options, dict):
            raise ConfigError(flag("storage_options"), "must be a JSON object")
        if self.depth is not None and (not isinstance(self.depth, str) or not self.depth.strip()):
            raise ConfigError(flag("depth"), "must be a non-empty URI or path")
        try:
            Camera.parse(self.camera)
        except (ValueError, AttributeError) as error:
            raise ConfigError(flag("camera"), str(error)) from None

    def actor_range(self) -> tuple[int, int] | None:
        """``--actors`` as (fewest, most) FCN actors, or None for the default; ConfigError if malformed."""
        if self.actors is None:
            return None
        text = str(self.actors).strip()
        low, dash, high = text.partition("-")
        bounds = (low, high) if dash else (low, low)
        if isinstance(self.actors, bool) or not all(b.strip().isdigit() for b in bounds):
            raise ConfigError(flag("actors"), f"must be N or MIN-MAX (whole numbers), got {self.actors!r}")
        fewest, most = (int(b) for b in bounds)
        if not 1 <= fewest <= most:
            raise ConfigError(flag("actors"), f"must be >= 1, and MIN <= MAX in MIN-MAX, got {self.actors!r}")
        return fewest, most
