"""Prediction of any size: image in (any PIL mode or array), label map of the same size out.

Images up to ``max_pixels`` go through the network whole. Larger ones are cut into tiles of at most
``tile_size`` x ``tile_size`` input pixels whose starts lie on the network's output-stride grid, so
each tile sees the same pooling grid, pad-100 crop and upsampling phase as the whole image. Each
tile keeps only its core: a margin of half the receptive field plus the decoder's reach is dropped
on every side that borders another tile (``fcn.tiling``), so the stitched labels equal whole-image
inference up to floating-point ties. Labels (uint8, or int32 above 256 classes) and the optional confidence (float32
softmax maximum) are written tile by tile into preallocated arrays: peak memory is the input image,
the outputs and one tile's activations, never full-image float logits. Scores become labels, confidence and
statistics in ``fcn.scores``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from fcn.checkpoint import Checkpoint, load_checkpoint
from fcn.conventions import InputConvention, get_convention
from fcn.device import resolve_device
from fcn.heads import split_heads
from fcn.image import to_rgb_array
from fcn.scores import HeadPrediction, decode_scores, label_dtype
from fcn.tiling import tile_margin, tile_windows

DEFAULT_TILE_SIZE = 2048
DEFAULT_MAX_PIXELS = DEFAULT_TILE_SIZE**2
ImageLike = Image.Image | np.ndarray | Tensor | Mapping[str, np.ndarray | Tensor]
"""A PIL image, a numpy array (see ``fcn.image.to_rgb_array``), or a ``3xHxW`` uint8 tensor on any
device (what ``torchvision.io.decode_jpeg`` returns, e.g. decoded on the GPU); for a network that
reads more than RGB, a dict of its inputs by modality (see ``InputConvention.encode``)."""


@dataclass
class Prediction:
    """One image's prediction: every head's, by head name in the network's order. ``labels``, ``confidence``,
    ``pixel_counts`` and ``mean_confidence`` read the primary head's (``fcn.heads``), the only head of a
    single-head network."""

    heads: dict[str, HeadPrediction]

    @property
    def primary(self) -> HeadPrediction:
        """The primary head's prediction."""
        primary, _ = split_heads(self.heads)
        return self.heads[primary]

    @property
    def labels(self) -> np.ndarray:
        return self.primary.labels

    @property
    def confidence(self) -> np.ndarray | None:
        return self.primary.confidence

    @property
    def pixel_counts(self) -> np.ndarray | None:
        return self.primary.pixel_counts

    @property
    def mean_confidence(self) -> float | None:
        return self.primary.mean_confidence


class Predictor:
    """Runs an FCN on images of any size and mode. The model is moved to ``device`` and put in eval mode.

    ``bf16`` runs the network's trunk under bfloat16 autocast (CUDA or CPU; the heads, whose scores
    decide labels and confidences, compute in float32; see ``fcn.resolve_precision``), ``channels_last``
    uses the NHWC memory format (useful on CUDA tensor cores). ``max_pixels`` is the largest image run whole;
    ``tile_size`` (rounded down to the output stride) bounds the input tile of tiled inference.
    ``batch_pixels`` bounds the pixels of equal-size images stacked into one forward pass (default:
    ``max_pixels``; CPUs run best with small stacks that stay in cache, GPUs with large ones).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_convention: str | InputConvention = "torchvision",
        device: str | torch.device = "auto",
        bf16: bool = False,
        channels_last: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        tile_size: int = DEFAULT_TILE_SIZE,
        batch_pixels: int | None = None,
    ) -> None:
        missing = [
            a for a in ("num_classes", "head_classes", "receptive_field", "output_stride") if not hasattr(model, a)
        ]
        if missing:
            raise ValueError(f"model lacks {missing}; build it with fcn.get_model")
        self.device = resolve_device(device)
        self.convention = get_convention(input_convention)
        self.bf16 = bool(bf16)
        self.channels_last = bool(channels_last)
        self.stride = int(model.output_stride)
        self.margin = tile_margin(int(model.receptive_field), self.stride)
        self.tile_size = int(tile_size) // self.stride * self.stride
        if self.tile_size <= 2 * self.margin:
            raise ValueError(
                f"tile_size must exceed twice the tile margin ({2 * self.margin} px for this network), got {tile_size}"
            )
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.max_pixels = int(max_pixels)
        self.batch_pixels = int(batch_pixels or max_pixels)
        self.num_classes = int(model.num_classes)
        self.head_classes = dict(model.head_classes)
        self.modalities = tuple(getattr(model, "modalities", ("rgb",)))
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = model.eval().to(self.device, memory_format=memory_format)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint | str, **kwargs: object) -> Predictor:
        """A predictor for a ``Checkpoint`` or checkpoint/registry URI, with its input convention."""
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = load_checkpoint(checkpoint)
        return cls(checkpoint.model, input_convention=checkpoint.input_convention, **kwargs)

    def tiled(self, tile_size: int) -> Predictor:
        """This predictor (the same model, not a copy) running whole only images of at most ``tile_size``
        squared pixels and tiling larger ones in tiles of ``tile_size`` (raised to the smallest tile the
        network allows): less device memory per forward pass, the same labels."""
        smaller = copy.copy(self)
        smaller.tile_size = max(int(tile_size) // self.stride * self.stride, 2 * self.margin + self.stride)
        smaller.max_pixels = min(self.max_pixels, smaller.tile_size**2)
        smaller.batch_pixels = min(self.batch_pixels, smaller.max_pixels)
        return smaller

    def __call__(self, image: ImageLike, *, confidence: bool = False, statistics: bool = False) -> Prediction:
        """Predict one image; tiled if it has more than ``max_pixels`` pixels."""
        return self.predict_batch([image], confidence=confidence, statistics=statistics)[0]

    def predict_batch(
        self, images: list[ImageLike], *, confidence: bool = False, statistics: bool = False
    ) -> list[Prediction]:
        """Predict several images; small images of equal size share forward passes of <= max_pixels.

        ``confidence`` returns the per-pixel probability of each label; ``statistics`` fills
        ``pixel_counts`` and ``mean_confidence``, computed on the device (only they leave it).
        """
        pixels = [self._inputs(image) for image in images]
        results: list[Prediction | None] = [None] * len(pixels)
        same_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(pixels):
            height, width = _size(image)
            if height * width > self.max_pixels:
                results[index] = self._predict_tiled(image, confidence, statistics)
            else:
                same_size[(height, width)].append(index)
        for (height, width), indices in same_size.items():
            per_pass = max(1, self.batch_pixels // (height * width))
            for chunk in (indices[k : k + per_pass] for k in range(0, len(indices), per_pass)):
                if len(chunk) == 1:  # made in the model's memory format at once: no stack, no conversion copy
                    batch = self._encode(pixels[chunk[0]], channels_last=self.channels_last)[None]
                else:  # a stack of normalised NCHW images (faster to make than NHWC ones), converted once
                    batch = torch.stack([self._encode(pixels[i]) for i in chunk])
                outputs = self._decode(self._logits(batch), confidence, statistics)
                for j, i in enumerate(chunk):
                    results[i] = outputs[j]
        return results  # type: ignore[return-value]

    def _inputs(self, image: ImageLike) -> np.ndarray | Tensor | dict[str, np.ndarray | Tensor]:
        """``image`` as the predictor keeps it: an RGB array or tensor, or a dict of inputs by modality."""
        if isinstance(image, Mapping):
            inputs = dict(image)
            if "rgb" in inputs and not isinstance(inputs["rgb"], Tensor):
                inputs["rgb"] = to_rgb_array(inputs["rgb"])
            return inputs
        if self.modalities != ("rgb",):
            raise ValueError(f"this network reads {list(self.modalities)}: pass a dict of those inputs by modality")
        return image if isinstance(image, Tensor) else to_rgb_array(image)

    def _encode(
        self, inputs: np.ndarray | Tensor | dict[str, np.ndarray | Tensor], *, channels_last: bool = False
    ) -> Tensor:
        if isinstance(inputs, dict):
            return self.convention.encode(inputs, self.modalities, self.device)
        return self.convention.to_tensor(inputs, self.device, channels_last=channels_last)

    def _predict_tiled(
        self, image: np.ndarray | Tensor | dict[str, np.ndarray | Tensor], confidence: bool, statistics: bool
    ) -> Prediction:
        height, width = _size(image)
        tiled = {head: _TiledHead(height, width, classes, confidence) for head, classes in self.head_classes.items()}
        for y0, y1, x0, x1, cy0, cy1, cx0, cx1 in tile_windows(height, width, self.tile_size, self.margin):
            tile = self._encode(_crop(image, y0, y1, x0, x1), channels_last=self.channels_last)[None]
            logits = {head: t[..., cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] for head, t in self._logits(tile).items()}
            [part] = self._decode(logits, confidence, statistics)
            for head, outputs in tiled.items():
                outputs.add(part.heads[head], cy0, cy1, cx0, cx1, statistics)
        return Prediction({head: outputs.prediction(statistics) for head, outputs in tiled.items()})

    def _logits(self, batch: Tensor) -> dict[str, Tensor]:
        """The network's float32 logits by head for a normalised batch [N, C, H, W] on the device (the heads
        compute in float32 under autocast: only the trunk runs in bf16)."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return {head: scores.float() for head, scores in self.model(batch).items()}

    def _decode(self, logits: dict[str, Tensor], confidence: bool, statistics: bool) -> list[Prediction]:
        """One ``Prediction`` per image of ``logits`` (by head, [N, C, H, W] each)."""
        per_head = {head: decode_scores(scores, confidence, statistics) for head, scores in logits.items()}
        images = len(next(iter(logits.values())))
        return [Prediction({head: decoded[j] for head, decoded in per_head.items()}) for j in range(images)]


class _TiledHead:
    """One head's outputs of tiled inference, written tile by tile into preallocated arrays."""

    def __init__(self, height: int, width: int, classes: int, confidence: bool) -> None:
        self.labels = np.empty((height, width), dtype=label_dtype(classes))
        self.confidence = np.empty((height, width), dtype=np.float32) if confidence else None
        self.counts, self.confidence_sum = np.zeros(classes, np.int64), 0.0

    def add(self, part: HeadPrediction, cy0: int, cy1: int, cx0: int, cx1: int, statistics: bool) -> None:
        self.labels[cy0:cy1, cx0:cx1] = part.labels
        if self.confidence is not None:
            self.confidence[cy0:cy1, cx0:cx1] = part.confidence
        if statistics:
            self.counts += part.pixel_counts
            self.confidence_sum += part.mean_confidence * part.labels.size

    def prediction(self, statistics: bool) -> HeadPrediction:
        if not statistics:
            return HeadPrediction(self.labels, self.confidence)
        return HeadPrediction(self.labels, self.confidence, self.counts, self.confidence_sum / self.labels.size)


def predict(
    model: nn.Module | Checkpoint | str, image: ImageLike, *, confidence: bool = False, **kwargs: object
) -> Prediction:
    """One-shot prediction: ``Predictor`` (from a module, a ``Checkpoint`` or a URI) applied to ``image``."""
    if isinstance(model, nn.Module):
        predictor = Predictor(model, **kwargs)
    else:
        predictor = Predictor.from_checkpoint(model, **kwargs)
    return predictor(image, confidence=confidence)


def _size(image: np.ndarray | Tensor | dict[str, np.ndarray | Tensor]) -> tuple[int, int]:
    """(height, width) of an ``HxWx3`` array or a ``3xHxW`` tensor (of a dict of inputs: the first's)."""
    if isinstance(image, dict):
        first = next(iter(image.values()))
        return (
            (int(first.shape[1]), int(first.shape[2]))
            if isinstance(first, Tensor)
            else (int(first.shape[0]), int(first.shape[1]))
        )
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be 3xHxW uint8 RGB, got shape {tuple(image.shape)}")
        return int(image.shape[1]), int(image.shape[2])
    return int(image.shape[0]), int(image.shape[1])


def _crop(image: np.ndarray | Tensor | dict[str, np.ndarray | Tensor], y0: int, y1: int, x0: int, x1: int) -> Any:
    """Rows ``y0:y1`` and columns ``x0:x1`` of an image (of each input of a dict)."""
    if isinstance(image, dict):
        return {m: _crop(v, y0, y1, x0, x1) for m, v in image.items()}
    return image[:, y0:y1, x0:x1] if isinstance(image, Tensor) else image[y0:y1, x0:x1]
