"""Prediction of any size: image in (any PIL mode or array), label map of the same size out.

Images up to ``max_pixels`` go through the network whole. Larger ones are cut into tiles of at most
``tile_size`` x ``tile_size`` input pixels whose starts lie on the network's output-stride grid, so
each tile sees the same pooling grid, pad-100 crop and upsampling phase as the whole image. Each
tile keeps only its core: a margin of half the receptive field plus the decoder's reach is dropped
on every side that borders another tile, so the stitched labels equal whole-image inference up to
floating-point ties. Labels (uint8, or int32 above 256 classes) and the optional confidence (float32
softmax maximum) are written tile by tile into preallocated arrays: peak memory is the input image,
the outputs and one tile's activations, never full-image float logits.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from fcn.checkpoint import Checkpoint, load_checkpoint
from fcn.conventions import InputConvention, get_convention
from fcn.image import to_rgb_array

DEFAULT_TILE_SIZE = 2048
DEFAULT_MAX_PIXELS = DEFAULT_TILE_SIZE**2
DECODER_REACH = 64
"""Pixels an output depends on beyond half the trunk's receptive field: the skip/upsampling layers
(FCN-8s: k4/s2 at stride 32, k4/s2 at stride 16, k16/s8 at stride 8) reach up to 56 px further."""

ImageLike = Image.Image | np.ndarray


@dataclass
class Prediction:
    """Per-pixel class labels (HxW) and, if requested, the softmax probability of that label."""

    labels: np.ndarray
    confidence: np.ndarray | None = None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else is parsed by ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
    return resolved


class Predictor:
    """Runs an FCN on images of any size and mode. The model is moved to ``device`` and put in eval mode.

    ``bf16`` runs the network under bfloat16 autocast (CUDA or CPU), ``channels_last`` uses the NHWC
    memory format (useful on CUDA tensor cores). ``max_pixels`` is the largest image run whole;
    ``tile_size`` (rounded down to the output stride) bounds the input tile of tiled inference.
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
    ) -> None:
        missing = [a for a in ("num_classes", "receptive_field", "output_stride") if not hasattr(model, a)]
        if missing:
            raise ValueError(f"model lacks {missing}; build it with fcn.get_model")
        self.device = resolve_device(device)
        self.convention = get_convention(input_convention)
        self.bf16 = bool(bf16)
        self.channels_last = bool(channels_last)
        self.stride = int(model.output_stride)
        self.margin = _round_up(math.ceil(model.receptive_field / 2) + DECODER_REACH, self.stride)
        self.tile_size = int(tile_size) // self.stride * self.stride
        if self.tile_size <= 2 * self.margin:
            raise ValueError(
                f"tile_size must exceed twice the tile margin ({2 * self.margin} px for this network), got {tile_size}"
            )
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.max_pixels = int(max_pixels)
        self.num_classes = int(model.num_classes)
        self.label_dtype = np.uint8 if self.num_classes <= 256 else np.int32
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = model.eval().to(self.device, memory_format=memory_format)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint | str, **kwargs: object) -> Predictor:
        """A predictor for a ``Checkpoint`` or checkpoint/registry URI, with its input convention."""
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = load_checkpoint(checkpoint)
        return cls(checkpoint.model, input_convention=checkpoint.input_convention, **kwargs)

    def __call__(self, image: ImageLike, *, confidence: bool = False) -> Prediction:
        """Predict one image; tiled if it has more than ``max_pixels`` pixels."""
        return self.predict_batch([image], confidence=confidence)[0]

    def predict_batch(self, images: list[ImageLike], *, confidence: bool = False) -> list[Prediction]:
        """Predict several images; small images of equal size share forward passes of <= max_pixels."""
        arrays = [to_rgb_array(image) for image in images]
        results: list[Prediction | None] = [None] * len(arrays)
        same_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, rgb in enumerate(arrays):
            height, width = rgb.shape[:2]
            if height * width > self.max_pixels:
                results[index] = self._predict_tiled(rgb, confidence)
            else:
                same_size[(height, width)].append(index)
        for (height, width), indices in same_size.items():
            per_pass = max(1, self.max_pixels // (height * width))
            for chunk in (indices[k : k + per_pass] for k in range(0, len(indices), per_pass)):
                batch = torch.stack([self.convention.to_tensor(arrays[i], self.device) for i in chunk])
                labels, confidences = self._decode(self._logits(batch), confidence)
                for j, i in enumerate(chunk):
                    results[i] = Prediction(labels[j], None if confidences is None else confidences[j])
        return results  # type: ignore[return-value]

    def _predict_tiled(self, rgb: np.ndarray, confidence: bool) -> Prediction:
        height, width = rgb.shape[:2]
        labels = np.empty((height, width), dtype=self.label_dtype)
        confidences = np.empty((height, width), dtype=np.float32) if confidence else None
        for y0, y1, cy0, cy1 in _spans(height, self.tile_size, self.margin):
            for x0, x1, cx0, cx1 in _spans(width, self.tile_size, self.margin):
                tile = self.convention.to_tensor(rgb[y0:y1, x0:x1], self.device)[None]
                core = self._logits(tile)[..., cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
                tile_labels, tile_confidences = self._decode(core, confidence)
                labels[cy0:cy1, cx0:cx1] = tile_labels[0]
                if confidences is not None:
                    confidences[cy0:cy1, cx0:cx1] = tile_confidences[0]
        return Prediction(labels, confidences)

    def _logits(self, batch: Tensor) -> Tensor:
        """The network's float32 logits for a normalised batch [N, 3, H, W] on the device."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(batch).float()

    def _decode(self, logits: Tensor, confidence: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Arg-max labels and (optionally) the softmax probability of the arg-max, as numpy arrays."""
        top, labels = logits.max(1)  # (much faster than argmax on CPU; same first-maximum ties)
        labels = labels.to(torch.uint8 if self.label_dtype == np.uint8 else torch.int32).cpu().numpy()
        if not confidence:
            return labels, None
        return labels, torch.exp(top - logits.logsumexp(1)).cpu().numpy()


def predict(
    model: nn.Module | Checkpoint | str, image: ImageLike, *, confidence: bool = False, **kwargs: object
) -> Prediction:
    """One-shot prediction: ``Predictor`` (from a module, a ``Checkpoint`` or a URI) applied to ``image``."""
    if isinstance(model, nn.Module):
        predictor = Predictor(model, **kwargs)
    else:
        predictor = Predictor.from_checkpoint(model, **kwargs)
    return predictor(image, confidence=confidence)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _spans(length: int, tile: int, margin: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (input start, input end, core start, core end).

    Inputs are at most ``tile`` long and start on multiples of the stride (``tile`` and ``margin``
    are multiples of it); cores partition ``[0, length)`` and stay ``margin`` away from every
    input end that is not an image border.
    """
    if length <= tile:
        return [(0, length, 0, length)]
    spans = []
    core_start = 0
    while core_start < length:
        start = max(0, core_start - margin)
        end = min(length, start + tile)
        core_end = length if end == length else end - margin
        spans.append((start, end, core_start, core_end))
        core_start = core_end
    return spans
