"""Stage 1: random unlearning. Gradient ascent on cross-entropy with uniform-noise images
and random labels; only the *change* it causes in each neuron's weights is used later."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .load import InputSpec, forward_logits
from .settings import RepairSettings


@dataclass
class UnlearnResult:
    """The unlearned copy (thrown away after scoring) and what the ascent did."""

    model: nn.Module
    steps: int
    first_loss: float
    last_loss: float


def noise_batch(spec: InputSpec, n: int, generator: torch.Generator, size: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Uniform [0,1) noise at the model's channel count and size, normalised like real inputs."""
    h, w = (size, size) if size else (spec.height, spec.width)
    x = torch.rand(n, spec.channels, h, w, generator=generator)
    return spec.normalize(x) if normalize else x


def unlearn(
    model: nn.Module,
    spec: InputSpec,
    settings: RepairSettings,
    device: torch.device | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> UnlearnResult:
    """Run random unlearning on a float32 deep copy; the input model is never touched.
    ``progress("unlearn", step, steps)`` is called after every step when given."""
    device = device or torch.device("cpu")
    work = copy.deepcopy(model).float().to(device)
    work.train(settings.unlearn_train_mode)
    params = [p for p in work.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.unlearn_lr, momentum=settings.unlearn_momentum, weight_decay=0.0)
    gen = torch.Generator().manual_seed(settings.seed)
    n_labels = spec.num_classes - 1 if settings.label_off_by_one and spec.num_classes > 1 else spec.num_classes
    first = last = float("nan")
    for step in range(settings.unlearn_steps):
        x = noise_batch(spec, settings.unlearn_batch, gen, settings.noise_size, settings.normalize_noise).to(device)
        y = torch.randint(0, n_labels, (settings.unlearn_batch,), generator=gen).to(device)
        loss = F.cross_entropy(forward_logits(work, x).float(), y)
        opt.zero_grad(set_to_none=True)
        (-loss).backward()
        opt.step()
        last = float(loss.detach())
        if step == 0:
            first = last
        if progress is not None:
            progress("unlearn", step + 1, settings.unlearn_steps)
    work.eval()
    return UnlearnResult(model=work, steps=settings.unlearn_steps, first_loss=first, last_loss=last)
