"""Stage 1: random unlearning. Gradient ascent on cross-entropy with uniform-noise images
and random labels; only the *change* it causes in each neuron's weights is used later."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .load import InputSpec, _first_line, eval_mode, forward_logits, model_device, uses_channels_last
from .placement import gradient_precision, images_per_pass
from .errors import OtbrError, UsageError
from .settings import RepairSettings, flag_of


@dataclass
class UnlearnResult:
    """The unlearned copy (thrown away after scoring) and what the ascent did."""

    model: nn.Module
    steps: int
    first_loss: float
    last_loss: float
    images_per_pass: int = 0
    """Slice size actually used; in train mode BatchNorm saw batch statistics of this many images."""


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
    ``progress("unlearn", step, steps)`` is called after every step when given.

    A step's batch is drawn whole (so noise and labels do not depend on memory limits) and
    sent through the model in slices of ``settings.unlearn_chunk`` images (default: by
    :func:`~otbr_hub.placement.images_per_pass`); the slices' gradients add up to the
    batch's. In train mode only BatchNorm's batch statistics then come from the slice."""
    device = device or torch.device("cpu")
    work = copy.deepcopy(model).float().to(device)
    if uses_channels_last(work):
        # the copy is thrown away after scoring, so its weights may change layout too: with
        # channels-last weights and inputs a resnet50 training step at 224 px is 1.28x faster
        # on a 2-core CPU (9.2 -> 11.8 images/s); the update values are the same up to rounding
        # (4-D weights only: Module.to refuses channels-last for a model with a Conv3d, as in
        # timm's lambda_resnet)
        for t in [*work.parameters(), *work.buffers()]:
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    work.train(settings.unlearn_train_mode)
    # Every weight of the copy moves, frozen or not: a layer the caller froze for fine-tuning
    # can still carry the backdoor, and a weight that cannot change would score NWC 0.
    params = [p.requires_grad_(True) for p in work.parameters() if p.is_floating_point()]
    opt = torch.optim.SGD(params, lr=settings.unlearn_lr, momentum=settings.unlearn_momentum, weight_decay=0.0)
    gen = torch.Generator().manual_seed(settings.seed)
    n_labels = spec.num_classes - 1 if settings.label_off_by_one and spec.num_classes > 1 else spec.num_classes
    side = settings.noise_size
    if side is not None:
        _check_noise_size(work, spec, side)
    chunk = settings.unlearn_chunk or images_per_pass(work, spec, side, precision=settings.precision)
    n = settings.unlearn_batch
    first = last = float("nan")
    with torch.enable_grad():  # a caller inside torch.no_grad() still gets gradients here
        for step in range(settings.unlearn_steps):
            try:
                first, last = _step(work, opt, spec, settings, gen, n, n_labels, side, chunk, device, step, first)
            except ValueError as err:  # BatchNorm in train mode over a single value per channel
                if "more than 1 value per channel" not in str(err):
                    raise
                raise UsageError(f"unlearning sends {min(chunk, n)} image(s) a pass in train mode, and a BatchNorm "
                                 f"of this model then sees one value per channel: give {flag_of('unlearn_batch')} "
                                 f"and {flag_of('unlearn_chunk')} (if set) at least 2") from None
            if progress is not None:
                progress("unlearn", step + 1, settings.unlearn_steps)
    work.eval()
    return UnlearnResult(model=work, steps=settings.unlearn_steps, first_loss=first, last_loss=last,
                         images_per_pass=min(chunk, n))


def _step(work: nn.Module, opt: torch.optim.Optimizer, spec: InputSpec, settings: RepairSettings,
          gen: torch.Generator, n: int, n_labels: int, side: int | None, chunk: int, device: torch.device,
          step: int, first: float) -> tuple[float, float]:
    """One gradient-ascent step over a batch of ``n`` noise images, in slices of ``chunk``;
    returns (first step's loss, this step's loss)."""
    x = noise_batch(spec, n, gen, side, settings.normalize_noise)
    y = torch.randint(0, n_labels, (n,), generator=gen)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(0, n, chunk):
        xs, ys = x[i : i + chunk].to(device), y[i : i + chunk].to(device)
        with gradient_precision(settings.precision, device, spec):
            logits = forward_logits(work, xs).float()
        # one slice: the plain mean, bit-identical to an unsliced step
        loss = F.cross_entropy(logits, ys) if chunk >= n else F.cross_entropy(logits, ys, reduction="sum") / n
        (-loss).backward()
        total += float(loss.detach())
    if not math.isfinite(total):
        raise OtbrError(f"unlearning diverged at step {step + 1} (loss {total}); a smaller "
                        f"{flag_of('unlearn_lr')} (now {settings.unlearn_lr:g}) keeps it finite")
    opt.step()
    return (total if step == 0 else first), total


def _check_noise_size(work: nn.Module, spec: InputSpec, side: int) -> None:
    """One forward pass at ``side`` pixels: a ViT with a fixed patch grid refuses other sizes,
    and that should be a one-line settings error, not the model's own assertion."""
    x = noise_batch(spec, 2, torch.Generator().manual_seed(0), side).to(model_device(work))
    try:
        with eval_mode(work), torch.no_grad():
            forward_logits(work, x)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise UsageError(f"noise_size ({flag_of('noise_size')}) {side}: the model does not take {side}x{side} inputs "
                         f"({_first_line(err) or type(err).__name__}); leave it unset to use {spec.height}x{spec.width}") from None
