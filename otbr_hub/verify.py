"""Checks that a repaired model is still the same model: same tensors, finite, runs, and
mostly agrees with the original on inputs synthesised from the original itself."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .load import InputSpec, eval_mode, forward_logits, model_device
from .placement import gradient_precision, images_per_pass


LOW_AGREEMENT = 0.8
"""Below this top-1 agreement on the synthesised inputs the repair warns. The inputs sit near
the decision boundaries, so agreement is not an accuracy estimate: benchmark ResNets that
lost 0.5-4 points ended at 0.61-0.79, and MobileNetV3 repairs that lost 2.8-65 points at
0.35-0.80 (``benchmarks/NOTES.md``, section 14). No threshold separates the two, so the
warning asks for a measurement; it does not change what is chosen."""


def low_agreement_warning(agreement: float | None) -> str | None:
    """A one-line warning for the report, CLI and card, or None."""
    if agreement is None or agreement >= LOW_AGREEMENT:
        return None
    return (f"the repaired model disagrees with the original on {100 * (1 - agreement):.0f} % of the synthesised inputs "
            f"(agreement {agreement:.3f} < {LOW_AGREEMENT}); on some architectures (MobileNetV3 in the benchmark) "
            "this went with accuracy losses of 10 points and more: measure accuracy before using it (--eval-dataset), "
            "or repair more lightly (a smaller --prune-ratio or --lambda)")


@dataclass
class Verification:
    """Outcome of :func:`verify`. ``ok`` is what push and save rely on."""

    ok: bool
    agreement: float | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "agreement": self.agreement, "problems": self.problems}


@torch.enable_grad()  # gradients on the inputs, even for a caller inside torch.no_grad()
def synthesize_inputs(model: nn.Module, spec: InputSpec, n: int, seed: int = 0, steps: int = 10, lr: float = 0.1,
                      chunk: int | None = None, precision: str = "fp32") -> torch.Tensor:
    """Inputs the *original* model assigns to each class in turn, with no data needed.

    Starting from smooth random images (low-resolution noise upsampled), a few signed
    gradient steps push each image towards its assigned class. Agreement on such inputs
    says whether the repair kept the decision regions, which plain noise (usually one
    class for everything) cannot tell.

    Images are optimised in slices of ``chunk`` (default: what fits in
    :func:`~otbr_hub.placement.images_per_pass`). The model is in eval mode and each image
    only follows the sign of its own gradient, so slicing gives the same images.
    ``precision`` is :func:`~otbr_hub.placement.gradient_precision`'s.
    """
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, spec.channels, max(2, spec.height // 4), max(2, spec.width // 4), generator=gen)
    x = F.interpolate(low, size=(spec.height, spec.width), mode="bilinear", align_corners=False)
    x = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    y = torch.arange(n) % spec.num_classes
    chunk = chunk or images_per_pass(model, spec, precision=precision)
    out = []
    with eval_mode(model), _frozen(model):
        for i in range(0, n, chunk):
            xs, ys = x[i : i + chunk].to(device), y[i : i + chunk].to(device)
            for _ in range(steps):
                xs.requires_grad_(True)
                with gradient_precision(precision, device, spec):
                    loss = F.cross_entropy(forward_logits(model, spec.normalize(xs)).float(), ys)
                (grad,) = torch.autograd.grad(loss, xs)
                xs = (xs.detach() - lr * grad.sign()).clamp(0, 1)
            out.append(xs.detach())
    return torch.cat(out) if out else x.to(device)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients for the block (only the inputs are optimised)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@torch.no_grad()
def predictions(model: nn.Module, spec: InputSpec, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    batch = batch or _inference_batch(model, spec)
    device = model_device(model)
    with eval_mode(model):
        out = [forward_logits(model, spec.normalize(x[i : i + batch].to(device))).argmax(-1).cpu()
               for i in range(0, len(x), batch)]
    return torch.cat(out)


def _inference_batch(model: nn.Module, spec: InputSpec) -> int:
    """Images per no-grad pass: up to 128, and 4x a gradient pass's slice (no activations are
    kept for a backward pass)."""
    return min(128, 4 * images_per_pass(model, spec))


def agreement(original: nn.Module, repaired: nn.Module, spec: InputSpec, x: torch.Tensor,
              reference: torch.Tensor | None = None) -> float:
    """Share of inputs on which both models predict the same class (same architecture, so
    one measured batch size serves both). ``reference``: the original's predictions on ``x``,
    when already known (the ratio walk compares many candidates with the same original)."""
    batch = _inference_batch(original, spec)
    if reference is None:
        reference = predictions(original, spec, x, batch)
    return float((reference == predictions(repaired, spec, x, batch)).float().mean())


def compare_state_dicts(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], *, check_dtype: bool = True) -> list[str]:
    """Differences in keys, shapes and dtypes, and non-finite values, as readable strings."""
    problems: list[str] = []
    missing = sorted(set(reference) - set(candidate))
    extra = sorted(set(candidate) - set(reference))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    for key in sorted(set(reference) & set(candidate)):
        a, b = reference[key], candidate[key]
        if tuple(a.shape) != tuple(b.shape):
            problems.append(f"{key}: shape {tuple(b.shape)} != {tuple(a.shape)}")
        elif check_dtype and a.dtype != b.dtype:
            problems.append(f"{key}: dtype {b.dtype} != {a.dtype}")
        elif b.is_floating_point() and not torch.isfinite(b).all():
            problems.append(f"{key}: non-finite values")
    return problems


def verify(original: nn.Module, repaired: nn.Module, spec: InputSpec, *, inputs: torch.Tensor | None = None, samples: int = 256, seed: int = 0,
           reference: torch.Tensor | None = None) -> Verification:
    """Structure, finiteness, a forward pass, and agreement with the original (``reference``:
    the original's predictions on ``inputs``, if already computed)."""
    problems = compare_state_dicts(original.state_dict(), repaired.state_dict(), check_dtype=False)
    agree = None
    try:
        if inputs is None:
            inputs = synthesize_inputs(original, spec, samples, seed=seed)
        agree = agreement(original, repaired, spec, inputs, reference)
        with torch.no_grad():
            logits = forward_logits(repaired.eval(), spec.normalize(inputs[:2].to(model_device(repaired))))
        if logits.shape[-1] != spec.num_classes:
            problems.append(f"forward pass gives {logits.shape[-1]} classes, expected {spec.num_classes}")
        if not torch.isfinite(logits).all():
            problems.append("forward pass gives non-finite logits")
    except Exception as err:  # a model that cannot run must not be published
        problems.append(f"forward pass failed: {type(err).__name__}: {err}")
    return Verification(ok=not problems, agreement=agree, problems=problems)
