"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from saecache.core.errors import SaecacheError


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """``device`` (default: :func:`default_device`) if torch can run on it; else one line."""
    device = device or default_device()
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SaecacheError(f"--device {device!r} is not a torch device") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SaecacheError(f"--device {device!r} asked for but CUDA is not available here; "
                            "use --device cpu")
    return device
