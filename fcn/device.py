"""The device and the numeric precision a network runs with: ``resolve_device`` (``"auto"``: CUDA if
available) and ``resolve_precision`` (``"auto"``: bf16 on Ampere or newer GPUs, else fp32)."""

from __future__ import annotations

import torch


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


BF16_MIN_CAPABILITY = (8, 0)
"""CUDA compute capability from which ``precision="auto"`` picks bf16: Ampere and later have bf16 tensor
cores; older GPUs emulate bf16 slowly (fp16 is not offered: FCN activations can overflow its range)."""


def resolve_precision(precision: str, device: str | torch.device, capability: tuple[int, int] | None = None) -> str:
    """``"fp32"`` or ``"bf16"`` for a ``precision`` of ``"auto"``, ``"fp32"`` or ``"bf16"`` on ``device``.

    ``"auto"`` is bf16 on a CUDA GPU of compute ``capability`` >= 8.0 (default: the device's) that
    supports bf16, else fp32 (CPUs, pre-Ampere GPUs); ``"fp32"`` and ``"bf16"`` are taken as given.
    """
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; use 'auto', 'fp32' or 'bf16'")
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return "fp32"
    return "bf16" if tuple(capability) >= BF16_MIN_CAPABILITY else "fp32"
