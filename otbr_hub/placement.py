"""Where computation runs. Accelerate decides for ``auto`` so that ``accelerate launch``
gives each process its own GPU; OT solves always stay on the CPU in float64."""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(name: str = "auto") -> torch.device:
    """Map 'auto' | 'cpu' | 'cuda[:N]' to a torch device, with a clear error for missing CUDA."""
    if name == "auto":
        from accelerate import PartialState

        return PartialState().device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)
