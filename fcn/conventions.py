"""Input conventions: how an RGB uint8 image becomes the tensor a set of weights was trained on.

- ``caffe``: the authors' Caffe weights (and pytorch-fcn's port of them): BGR channel order, values
  0-255, per-channel mean (104.00699, 116.66877, 122.67892) in BGR order subtracted, no std scaling.
- ``torchvision``: torchvision's ImageNet classifiers: RGB, values scaled to [0, 1], ImageNet mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


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

    def to_tensor(self, rgb: np.ndarray | Tensor, device: torch.device | str | None = None) -> Tensor:
        """Turn an ``HxWx3`` uint8 RGB array (or a ``3xHxW`` uint8 tensor, as ``torchvision.io`` decodes
        it, on any device) into a normalised float32 ``3xHxW`` tensor on ``device``.

        The uint8 data is moved to the device first, so on a GPU the arithmetic happens there.
        """
        if isinstance(rgb, Tensor):
            if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.dtype != torch.uint8:
                raise ValueError(f"to_tensor expects a 3xHxW uint8 tensor, got {rgb.dtype} of shape {tuple(rgb.shape)}")
            x = rgb.to(device)
        else:
            if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                described = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
                raise ValueError(f"to_tensor expects an HxWx3 uint8 RGB array, got a {described}")
            x = torch.tensor(rgb, device=device).permute(2, 0, 1)  # a uint8 copy: cheap, safe for read-only arrays
        if self.bgr:
            x = x.flip(0)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)  # one float32 allocation, then in place:
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        return x.mul_(self.scale / std).sub_(mean / std)  # (x * scale - mean) / std


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
