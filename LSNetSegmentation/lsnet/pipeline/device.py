"""Compute-device selection with clear errors (no GPU, unknown device)."""

from __future__ import annotations

import torch

from lsnet.errors import DeviceError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU -> :class:`DeviceError`."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("gpu",):
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                "CUDA was requested but no CUDA GPU is usable here (torch.cuda.is_available() is False: no NVIDIA GPU, "
                "no driver, or a CPU-only PyTorch build). Use --device cpu (or auto), or install a CUDA build of PyTorch."
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"Unknown device {device!r}: use auto, cpu or cuda (cuda:N for a given GPU).")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return f"cpu ({torch.get_num_threads()} threads)"
