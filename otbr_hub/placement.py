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


PIXELS_PER_PASS = 32 * 224 * 224
"""Most input pixels (images x height x width) sent through a model in one pass.

Activation memory grows with pixels, not with images: resnet50 in train mode needs about
120 MB per 224 px image, so the paper's 256-image unlearning batch would need about 30 GB.
32 images at 224 px keep a pass near 4 GB; at Fashion-MNIST's 32 px the whole batch of 256
fits, so small models run exactly as before."""


def images_per_pass(height: int, width: int, max_pixels: int = PIXELS_PER_PASS) -> int:
    """How many images of this size fit in one pass under ``max_pixels``."""
    return max(1, max_pixels // max(1, height * width))
