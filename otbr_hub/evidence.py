"""Weight-level evidence of a dirty-label backdoor: which class collects the most positive
evidence from the features the training data made active. No data, no gradients.

Why this can work without data: a BatchNorm layer's running mean and variance are a
summary of the training distribution, poisoned images included, and its affine
parameters say where each channel's output sits on that distribution (mean ``beta``,
spread ``|gamma|``). Replacing every BatchNorm output by Gaussian noise with exactly those
moments and running the rest of the network (activations, residual sums, pooling) gives a
data-free estimate of the mean feature ``E[f_j]`` that reaches the classifier.

A dirty-label backdoor relabels images of *every* class to the target, so the target's
classifier row must collect positive evidence from features that are active on all kinds
of inputs (the trigger's and the ordinary ones): its positive evidence
``S_c = sum_j max(W_cj * E[f_j], 0)`` is unusually large. On the Fashion-MNIST zoo
(``benchmarks/DETECT_NOTES.md``) the target is the top class of every dirty-label ResNet
backdoor, as a large outlier, while clean ResNets' top classes stay much closer to the
others. The test is the robust rule of :mod:`otbr_hub.detect` on ``log S_c``: median and
MAD of the other classes, Student-t tail with the K-class correction.

Limits (measured): only networks with BatchNorm carry the training moments (ConvNeXt and
ViT use LayerNorm, which normalises each input by its own statistics, so the evidence is
reported as not applicable there); a clean-label attack (SIG) does not change the labels
and leaves no such trace.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import classifier_name
from .load import InputSpec, forward_logits, model_device

PIXELS = 1024 * 32 * 32
"""Pixels of noise pushed through the network (64 images at 32 x 32, 1.3 at 224 x 224): the
BatchNorm outputs are i.i.d. noise, so only the number of positions that reach the pooled
features matters, and the estimate of the mean feature is averaged over them. At this size
three noise seeds moved a class's log evidence by a standard deviation of at most 0.01 on
the zoo's ResNets (0.04 with 64 x 32 x 32)."""

MIN_LOG_SPREAD = 0.02
"""Floor on the robust spread of the classes' log evidence: twice the largest seed-to-seed
standard deviation measured at :data:`PIXELS`, so that noise of the estimate is not read as
classes agreeing unusually well."""


@dataclass
class WeightEvidence:
    """Positive evidence per class from BatchNorm moments, and its outlier test."""

    applicable: bool
    """False when the model has no BatchNorm with running statistics or no linear classifier."""
    reason: str | None = None
    """Why it is not applicable."""
    top_class: int | None = None
    """Class with the largest positive evidence."""
    p_value: float | None = None
    """Chance that the largest of K clean classes is this far above the others (robust rule)."""
    z: float | None = None
    """Robust spreads between the top class's log evidence and the others' median."""
    per_class: list[float] = field(default_factory=list)
    """Positive evidence S_c per class."""
    batchnorms: int = 0
    """BatchNorm layers whose moments were used."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _classifier(model: nn.Module) -> nn.Linear | None:
    name = classifier_name(model)
    mod = dict(model.named_modules()).get(name) if name else None
    return mod if isinstance(mod, nn.Linear) else None


def mean_features(model: nn.Module, spec: InputSpec, seed: int = 0) -> tuple[torch.Tensor, int] | None:
    """Mean classifier input when every BatchNorm emits noise with its stored moments.

    Returns (mean feature vector, number of BatchNorms) or None when the model has no
    BatchNorm with running statistics or no linear classifier. The model's modes are kept.
    """
    head = _classifier(model)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.affine and m.track_running_stats]
    if head is None or not norms:
        return None
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    dtype = next(model.parameters()).dtype

    def replace(mod: _BatchNorm, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (out.dim() - 2)
        noise = torch.randn(out.shape, generator=gen).to(device, out.dtype)
        return mod.bias.detach().view(shape) + mod.weight.detach().view(shape) * noise

    feats: list[torch.Tensor] = []

    def grab(_m: nn.Module, inp: Any) -> None:
        feats.append(inp[0].detach().double().flatten(1).cpu())

    n = max(2, math.ceil(PIXELS / (spec.height * spec.width)))
    handles = [m.register_forward_hook(replace) for m in norms] + [head.register_forward_pre_hook(grab)]
    flags = [m.training for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            forward_logits(model, torch.zeros(n, spec.channels, spec.height, spec.width, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(model.modules(), flags):
            m.training = flag
    if not feats:
        return None
    return feats[-1].mean(0), len(norms)


def positive_evidence(weight: torch.Tensor, mean_feature: torch.Tensor) -> np.ndarray:
    """S_c = sum_j max(W_cj * E[f_j], 0) for every class row c."""
    w = weight.detach().double().cpu().reshape(weight.shape[0], -1)
    return torch.clamp(w * mean_feature.double()[None], min=0).sum(1).numpy()


def batchnorm_evidence(model: nn.Module, spec: InputSpec, seed: int = 0, min_log_spread: float = MIN_LOG_SPREAD) -> WeightEvidence:
    """Positive evidence per class and the robust outlier test of its largest class."""
    import time

    from .detect import robust_p_value

    t0 = time.perf_counter()
    got = mean_features(model, spec, seed)
    if got is None:
        return WeightEvidence(applicable=False, reason="no BatchNorm with running statistics before a linear classifier",
                              seconds=time.perf_counter() - t0)
    mean_f, n_bn = got
    head = _classifier(model)
    assert head is not None
    if head.weight.shape[0] != spec.num_classes or head.weight.reshape(head.weight.shape[0], -1).shape[1] != mean_f.numel():
        return WeightEvidence(applicable=False, reason="classifier does not match the pooled features",
                              seconds=time.perf_counter() - t0)
    s = positive_evidence(head.weight, mean_f)
    top = int(np.argmax(s))
    null = np.array([v for c, v in enumerate(s) if c != top and v > 0])
    ev = WeightEvidence(applicable=True, top_class=top, per_class=[float(v) for v in s], batchnorms=n_bn)
    if s[top] > 0 and len(null) >= 3:
        ev.p_value, ev.z = robust_p_value(float(s[top]), null, spec.num_classes, min_log_spread)
    else:
        ev.p_value, ev.z = 1.0, None
    ev.seconds = time.perf_counter() - t0
    return ev
