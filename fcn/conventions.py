"""Input conventions: how an RGB uint8 image becomes the tensor a set of weights was trained on.

- ``caffe``: the authors' Caffe weights (and pytorch-fcn's port of them): BGR channel order, values
  0-255, per-channel mean (104.00699, 116.66877, 122.67892) in BGR order subtracted, no std scaling.
- ``torchvision``: torchvision's ImageNet classifiers: RGB, values scaled to [0, 1], ImageNet mean/std.

The NYUDv2 nets also read depth: as centred log depth (one channel, ``fcn.depth.log_depth``) or as an
HHA image, whose mean is the reference's (``nyud_layers.py``) and whose scale follows the convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

HHA_MEAN = (132.431, 94.076, 118.477)
"""Mean of the NYUDv2 HHA images in 0-255 units (the reference ``nyud_layers.py``), subtracted first."""


@dataclass(frozen=True)
class InputConvention:
    """Channel order, scale, mean and std expected by a network's weights.

    ``mean`` and ``std`` are given in the network's channel order and in scaled units.
    """

    name: str
    bgr: bool
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_tensor(
        self, rgb: np.ndarray | Tensor, device: torch.device | str | None = None, *, channels_last: bool = False
    ) -> Tensor:
        """Turn an ``HxWx3`` uint8 RGB array (or a ``3xHxW`` uint8 tensor, as ``torchvision.io`` decodes
        it, on any device) into a normalised float32 ``3xHxW`` tensor on ``device``.

        The uint8 data is moved to the device first, so on a GPU the arithmetic happens there. With
        ``channels_last``, an array's tensor keeps its ``HxWx3`` memory order: ``x[None]`` is then a channels_last
        batch without another copy of the image.
        """
        if isinstance(rgb, Tensor):
            if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.dtype != torch.uint8:
                raise ValueError(f"to_tensor expects a 3xHxW uint8 tensor, got {rgb.dtype} of shape {tuple(rgb.shape)}")
            x = rgb.to(device)
        else:
            if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                described = (
                    f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
                )
                raise ValueError(f"to_tensor expects an HxWx3 uint8 RGB array, got a {described}")
            x = torch.tensor(rgb, device=device).permute(2, 0, 1)  # a uint8 copy: cheap, safe for read-only arrays
        if self.bgr:
            x = x.flip(0)
        layout = torch.preserve_format if channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=layout)  # one float32 allocation, then in place:
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        return x.mul_(self.scale / std).sub_(mean / std)  # (x * scale - mean) / std

    def encode(
        self,
        inputs: Mapping[str, np.ndarray | Tensor],
        modalities: Sequence[str],
        device: torch.device | str | None = None,
    ) -> Tensor:
        """A network's ``[C, H, W]`` input from ``inputs`` by modality: ``rgb`` (``HxWx3`` uint8 or
        ``3xHxW`` tensor), ``depth`` (``HxW`` metres, 0 = missing), ``hha`` (``HxWx3`` uint8),
        concatenated in ``modalities`` order. ValueError names a missing modality or a size mismatch."""
        missing = [m for m in modalities if m not in inputs]
        if missing:
            raise ValueError(f"the network reads {list(modalities)}; missing {missing}")
        parts = [self._encode_one(m, inputs[m], device) for m in modalities]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"the inputs {list(modalities)} differ in size: {sorted(sizes)}")
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _encode_one(self, modality: str, value: np.ndarray | Tensor, device: torch.device | str | None) -> Tensor:
        if modality == "rgb":
            return self.to_tensor(value, device)
        if modality == "depth":
            from fcn.depth import log_depth

            return torch.from_numpy(log_depth(np.asarray(value)))[None].to(device)
        if modality == "hha":
            if not isinstance(value, np.ndarray) or value.ndim != 3 or value.shape[2] != 3 or value.dtype != np.uint8:
                raise ValueError("an HHA input must be an HxWx3 uint8 array")
            x = torch.tensor(value, device=device).permute(2, 0, 1).to(torch.float32)
            spread = float(np.mean(self.std))
            mean = torch.tensor(HHA_MEAN, device=x.device).view(3, 1, 1)
            return x.sub_(mean).mul_(self.scale / spread)
        raise ValueError(f"unknown input modality {modality!r}; expected rgb, depth or hha")


CONVENTIONS: dict[str, InputConvention] = {
    "caffe": InputConvention(
        name="caffe", bgr=True, scale=1.0, mean=(104.00699, 116.66877, 122.67892), std=(1.0, 1.0, 1.0)
    ),
    "torchvision": InputConvention(
        name="torchvision", bgr=False, scale=1.0 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    ),
}


def get_convention(name: str | InputConvention) -> InputConvention:
    """Return the convention called ``name`` ("caffe" or "torchvision"); conventions pass through."""
    if isinstance(name, InputConvention):
        return name
    try:
        return CONVENTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown input convention {name!r}; expected one of {sorted(CONVENTIONS)}") from None
