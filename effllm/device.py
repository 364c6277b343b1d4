"""Devices: pick one, wait for it, and recognise running out of its memory."""

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device; "auto" is CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a clock read after it is honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    """Whether an exception means the device (or the host) ran out of memory."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()
