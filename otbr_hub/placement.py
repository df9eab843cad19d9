"""Where computation runs. Accelerate decides for ``auto`` so that ``accelerate launch``
gives each process its own GPU; OT solves always stay on the CPU in float64."""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(name: str = "auto") -> torch.device:
    """Map 'auto' | 'cpu' | 'cuda[:N]' to a torch device, with a clear error for missing CUDA.

    ``auto`` is Accelerate's choice (``PartialState().device``): this process's GPU when
    there is one, the CPU otherwise. A bare ``cuda`` in a launched multi-process run also
    means this process's own GPU, not GPU 0 for everyone.
    """
    from .distribute import launched_processes, state

    if name == "auto":
        device = state("auto").device
        return torch.device("cpu") if device.type == "cpu" else device  # Gloo reports 'cpu:0'
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    if name == "cuda" and launched_processes() > 1:
        return state("cuda").device
    return torch.device(name)
