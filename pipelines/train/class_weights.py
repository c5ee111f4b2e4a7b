"""Class weights for a class-balanced loss (``--class-weights``): none, median-frequency balancing from
the train split's label counts (Eigen & Fergus 2015), or one weight per class from a file."""

from __future__ import annotations

import json
import math

import fsspec
import numpy as np

from pipelines.train.datasets import LabelStats, SegmentationData

NO_WEIGHTS = "none"
MEDIAN_FREQUENCY = "median-frequency"
CLASS_WEIGHTS_HELP = (
    f"class weights of the loss: '{NO_WEIGHTS}', '{MEDIAN_FREQUENCY}' (w_c = median frequency / frequency of c, "
    "counted over the train split's masks; a class absent from them gets 0) or a file URI with one weight per "
    "class (one number per line, or a JSON list)"
)


def resolve_class_weights(spec: str, data: SegmentationData) -> list[float] | None:
    """The loss's class weights for ``spec`` (see ``CLASS_WEIGHTS_HELP``); None for no weights.

    Raises ValueError naming the problem (a missing or malformed file, a wrong number of weights).
    """
    if spec == NO_WEIGHTS:
        return None
    if spec == MEDIAN_FREQUENCY:
        return median_frequency_weights(data.train_labels, data.num_classes)
    return read_class_weights(spec, data.num_classes)


def median_frequency_weights(labels: LabelStats, num_classes: int) -> list[float]:
    """Median-frequency balancing: ``w_c = median(freq) / freq_c``, where ``freq_c`` is the pixels of
    class c over the labelled pixels (255 left out) of the masks where c is present, and the median is
    taken over the classes present. A class never present gets 0 (it has no pixels to weigh)."""
    pixels = np.asarray(labels.pixels[:num_classes], dtype=np.float64)
    image_pixels = np.asarray(labels.image_pixels[:num_classes], dtype=np.float64)
    present = pixels > 0
    if not present.any():
        raise ValueError(f"{MEDIAN_FREQUENCY}: the train split's masks hold no labelled pixels")
    freq = np.divide(pixels, image_pixels, out=np.zeros(num_classes), where=present)
    return np.divide(np.median(freq[present]), freq, out=np.zeros(num_classes), where=present).tolist()


def read_class_weights(uri: str, num_classes: int) -> list[float]:
    """``num_classes`` weights from the file at ``uri``: one number per line, or a JSON list; each
    finite and >= 0, at least one > 0. Raises ValueError naming the file and the problem."""
    try:
        with fsspec.open(uri, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"no file at {uri!r}") from None
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [v for v in text.splitlines() if v.strip()]
        weights = [float(v) for v in values]
    except (ValueError, TypeError):
        raise ValueError(f"{uri}: expected one number per line or a JSON list of numbers") from None
    if len(weights) != num_classes:
        raise ValueError(f"{uri} holds {len(weights)} weights; the data has {num_classes} classes, one weight each")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise ValueError(f"{uri}: weights must be finite and >= 0, at least one > 0; got {weights}")
    return weights
