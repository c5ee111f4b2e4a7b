"""Training data on the training workers: samples read as the network's input tensor and one label map
per head, augmented by the recipe (one random transform for all of them), batched with padding."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from fcn.conventions import InputConvention
from pipelines.train.datasets import IGNORE_LABEL, BadSample, Sample, read_example
from pipelines.train.recipes import Recipe

Labels = dict[str, Tensor]
"""Label maps by head name, int64, 255 = ignored."""


class TrainImages(Dataset):
    """Samples as (network input ``[C, H, W]``, labels by head ``[H, W]``), augmented, or the BadSample they raise;
    indexed by ``(epoch, index)`` (see ``EpochIndices``).

    The input is the ``modalities`` encoded by ``convention`` and concatenated, as the network reads them;
    ``head_classes`` (head -> classes) names the heads whose labels are read.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        modalities: Sequence[str],
        head_classes: Mapping[str, int],
        convention: InputConvention,
        recipe: Recipe,
        seed: int,
    ) -> None:
        self.samples, self.modalities, self.head_classes = list(samples), tuple(modalities), dict(head_classes)
        self.convention, self.recipe, self.seed = convention, recipe, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Labels] | BadSample:
        """Sample ``index`` of ``item = (epoch, index)``, augmented as drawn from (seed, epoch, index)."""
        epoch, index = item
        try:
            example = read_example(self.samples[index], self.modalities, self.head_classes)
        except BadSample as bad:
            return bad
        image = self.convention.encode(example.modalities, self.modalities)
        labels = {head: torch.from_numpy(label.astype(np.int64)) for head, label in example.labels.items()}
        return augment(image, labels, self.recipe, np.random.default_rng([self.seed, epoch, index]))


class EpochIndices(Sampler[tuple[int, int]]):
    """``(epoch, index)`` in the order of ``sampler``, at its current epoch (``set_epoch``): the epoch
    travels with each index, so that a data loader's persistent processes, which hold copies of the
    dataset made when they started, augment every epoch differently."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.sampler.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def augment(image: Tensor, labels: Labels, recipe: Recipe, rng: np.random.Generator) -> tuple[Tensor, Labels]:
    """The recipe's random horizontal flip and random rescale, drawn once and applied alike to every
    input channel (bilinear) and every head's labels (nearest), so that they stay aligned."""
    stacked = torch.stack(list(labels.values()))
    if recipe.hflip and rng.random() < 0.5:
        image, stacked = image.flip(-1), stacked.flip(-1)
    if recipe.scale_range is not None:
        scale = rng.uniform(*recipe.scale_range)
        size = [max(1, round(s * scale)) for s in image.shape[-2:]]
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        stacked = F.interpolate(stacked[None].float(), size=size, mode="nearest")[0].long()
    return image, dict(zip(labels, stacked))


def pad_collate(items: list[tuple[Tensor, Labels] | BadSample]) -> tuple[Tensor | None, Labels | None, list[BadSample]]:
    """Batch whole images of different sizes: pad to the largest, inputs with 0, labels with 255 (ignored)."""
    bad = [x for x in items if isinstance(x, BadSample)]
    good = [x for x in items if not isinstance(x, BadSample)]
    if not good:
        return None, None, bad
    height = max(x.shape[-2] for x, _ in good)
    width = max(x.shape[-1] for x, _ in good)
    images = torch.zeros(len(good), good[0][0].shape[0], height, width)
    targets = {head: torch.full((len(good), height, width), IGNORE_LABEL, dtype=torch.int64) for head in good[0][1]}
    for i, (x, labels) in enumerate(good):
        images[i, :, : x.shape[-2], : x.shape[-1]] = x
        for head, y in labels.items():
            targets[head][i, : y.shape[-2], : y.shape[-1]] = y
    return images, targets, bad
