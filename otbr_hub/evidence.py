"""Weight-level evidence of a dirty-label backdoor: which class collects the most positive
evidence from the features the training data made active. No data, no gradients.

A dirty-label backdoor relabels images of *every* class to the target, so the target's
classifier row must collect positive evidence from features that are active on all kinds of
inputs (the trigger's and the ordinary ones), and the target's share of the training labels
roughly doubles. Its positive evidence ``S_c = sum_j max(W_cj * E[f_j], 0)``, with ``E[f_j]``
the mean feature reaching the classifier, is then unusually large.

The mean feature without data:

* **BatchNorm networks**: a BatchNorm's running statistics summarise the training
  distribution, poisoned images included, and its affine parameters place each channel's
  output on it (mean ``beta``, spread ``|gamma|``). Every BatchNorm output is replaced by
  Gaussian noise with exactly those moments and the rest of the network (activations,
  residual sums, pooling) runs once on it (:func:`mean_features`).
* **A LayerNorm right before the classifier** (ConvNeXt ``head.norm``, ViT ``norm``): it
  makes each input's features zero-mean across channels before its affine map, so its bias
  is the guess of the mean feature (:func:`head_norm_bias`); nothing runs forward.

The test is on ``log S_c``: how many standard deviations of the other classes the top class
lies above their mean, with a p-value from the exact distribution of that maximum for K
i.i.d. Gaussian classes (Monte Carlo, seeded, :func:`max_outlier_p_value`). The median/MAD
rule with a Student-t tail then used for the margins was tried first and dropped here: with ten
classes the MAD of nine values is so noisy that, by simulation, a Gaussian null crosses its
p < 0.01 line 6.8 % of the time (15.6 % for 0.05). The margin test now uses the same mean/sd
statistic and Monte Carlo null (the trigger test keeps a median/MAD form,
``max_outlier_p_value(..., robust=True)``).

Measured on the Fashion-MNIST zoo (``benchmarks/DETECT_NOTES.md``): the top class is the
target in every dirty-label model (ResNet, ConvNeXt, ViT) and no clean model reaches
p < 0.01, but only about half of the backdoored models are that far out, fully trained
models less often than the short "quick" ones. What it sees is a label shift towards one
class, not a working trigger: a clean-label attack (SIG) leaves no trace, a model trained on
naturally imbalanced labels would look the same, and pruning or fine-tuning the body does
not remove it (so it says nothing about whether a repair worked; ``repair`` does not use it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import special
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import classifier_name
from .load import InputSpec, eval_mode, forward_logits, model_device, model_dtype
from .placement import images_per_pass

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
    """Chance that the largest of the classes lies this far above the others when all are
    i.i.d. Gaussian in log evidence (:func:`max_outlier_p_value`)."""
    z: float | None = None
    """Standard deviations of the other classes' log evidence (floored) between their mean and
    the top class."""
    per_class: list[float] = field(default_factory=list)
    """Positive evidence S_c per class."""
    batchnorms: int = 0
    """BatchNorm layers whose moments were used."""
    source: str | None = None
    """Where the mean feature came from: 'batchnorm-moments' or 'head-norm-bias'."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NULL_DRAWS = 20000
"""Monte Carlo draws of the null distribution (p-values resolve down to 1 / 20001)."""


@functools.lru_cache(maxsize=64)
def _null_max_z(n: int, draws: int = NULL_DRAWS, seed: int = 0, robust: bool = False, of: int | None = None) -> np.ndarray:
    """Sorted null sample of the studentized maximum for i.i.d. standard normals.

    Default: (max - mean(rest)) / sd(rest) over n values. ``robust``: (max - median(rest)) /
    (1.4826 MAD(rest)). ``of`` (>= n): the maximum is taken over ``of`` values and rest is
    n - 1 of the others, drawn uniformly (the margin test's null after screening: the top of
    all K classes against a random sample of them). Drawn exactly: the maximum of ``of``
    normals from its distribution Phi^of, the rest i.i.d. below it.
    """
    rng = np.random.default_rng(seed)
    m = int(of or n)
    if robust or m > n:
        top = -special.ndtri(-np.expm1(np.log(rng.random(draws)) / m))  # Phi^-1(U^(1/m)), accurate near 1
        rest = special.ndtri(rng.random((draws, n - 1)) * special.ndtr(top)[:, None])
        if robust:
            centre = np.median(rest, axis=1)
            scale = 1.4826 * np.median(np.abs(rest - centre[:, None]), axis=1)
        else:
            centre, scale = rest.mean(1), rest.std(1, ddof=1)
        return np.sort((top - centre) / scale)
    out = []
    rows = max(1, 2_000_000 // n)
    for start in range(0, draws, rows):
        x = np.sort(rng.standard_normal((min(rows, draws - start), n)), axis=1)
        rest = x[:, :-1]
        out.append((x[:, -1] - rest.mean(1)) / rest.std(1, ddof=1))
    return np.sort(np.concatenate(out))


def max_outlier_p_value(z: float, n: int, robust: bool = False, of: int | None = None) -> float:
    """P(Z >= z) for Z = (max - mean(rest)) / sd(rest) over n i.i.d. Gaussian values.

    The statistic is location- and scale-free, so its null distribution depends only on n; it
    already accounts for the top class being the largest of n. A floor on the spread only
    lowers the observed z, which keeps the test conservative. ``robust`` uses median and
    1.4826 MAD of the rest instead, and ``of`` (>= n) is the number of classes the maximum
    was taken over when the rest is only a sample of them (see :func:`_null_max_z`); the
    tests of :mod:`otbr_hub.detect` use both forms.
    """
    if n < 3 or math.isnan(z):
        return 1.0
    of = None if of is None or int(of) <= int(n) else int(of)
    null = _null_max_z(int(n), robust=robust, of=of)
    above = len(null) - int(np.searchsorted(null, z, side="left"))
    return (1 + above) / (len(null) + 1)


def _classifier(model: nn.Module) -> nn.Linear | None:
    name = classifier_name(model)
    mod = dict(model.named_modules()).get(name) if name else None
    return mod if isinstance(mod, nn.Linear) else None


def mean_features(model: nn.Module, spec: InputSpec, seed: int = 0, pixels: int = PIXELS) -> tuple[torch.Tensor, int] | None:
    """Mean classifier input when every BatchNorm emits noise with its stored moments.

    Returns (mean feature vector, number of BatchNorms) or None when the model has no
    BatchNorm with running statistics or no linear classifier. The model's modes are kept.
    """
    head = _classifier(model)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.affine and m.track_running_stats]
    if head is None or not norms:
        return None
    device = model_device(model)
    dtype = model_dtype(model)
    layer = {id(m): i for i, m in enumerate(norms)}
    at = {"start": 0}  # index of the chunk's first image

    def replace(mod: _BatchNorm, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        # noise drawn per (seed, layer, image): the result does not depend on how many images
        # go through at once, which follows the device's memory
        shape = [1, -1] + [1] * (out.dim() - 2)
        base = (seed * 1_000_003 + layer[id(mod)]) * 1_000_003 + at["start"]
        noise = torch.stack([torch.randn(out.shape[1:], generator=torch.Generator().manual_seed((base + i) % 2**63))
                             for i in range(out.shape[0])]).to(device, out.dtype)
        return mod.bias.detach().view(shape) + mod.weight.detach().view(shape) * noise

    feats: list[torch.Tensor] = []

    def grab(_m: nn.Module, inp: Any) -> None:
        feats.append(inp[0].detach().double().flatten(1).sum(0).cpu())

    n = max(2, math.ceil(pixels / (spec.height * spec.width)))
    per = max(1, min(n, images_per_pass(model, spec)))
    handles = [m.register_forward_hook(replace) for m in norms] + [head.register_forward_pre_hook(grab)]
    try:
        with eval_mode(model), torch.no_grad():
            for start in range(0, n, per):
                m_ = min(per, n - start)
                at["start"] = start
                forward_logits(model, torch.zeros(m_, spec.channels, spec.height, spec.width, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    if not feats:
        return None
    return torch.stack(feats).sum(0) / n, len(norms)


def positive_evidence(weight: torch.Tensor, mean_feature: torch.Tensor) -> np.ndarray:
    """S_c = sum_j max(W_cj * E[f_j], 0) for every class row c."""
    w = weight.detach().double().cpu().reshape(weight.shape[0], -1)
    return torch.clamp(w * mean_feature.double()[None], min=0).sum(1).numpy()


def head_norm_bias(model: nn.Module) -> torch.Tensor | None:
    """Bias of an affine LayerNorm-type layer that feeds the classifier directly, else None.

    Such a norm makes each input's features zero-mean, unit-spread across channels before
    its affine map, so its bias is the data-free guess of the mean feature. It is the module
    with parameters registered last before the classifier (ConvNeXt ``head.norm``, ViT
    ``norm``/``fc_norm``), not a BatchNorm, and as wide as the classifier's input.
    """
    head = _classifier(model)
    if head is None:
        return None
    mods = list(model.named_modules())
    idx = next(i for i, (_, m) in enumerate(mods) if m is head)
    for _, mod in reversed(mods[:idx]):
        if not any(True for _ in mod.parameters(recurse=False)):
            continue  # pooling, dropout, identity, containers
        weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
        if (
            isinstance(mod, _BatchNorm)
            or "norm" not in type(mod).__name__.lower()
            or not isinstance(weight, torch.Tensor)
            or not isinstance(bias, torch.Tensor)
            or weight.dim() != 1
            or bias.numel() != head.in_features
        ):
            return None
        return bias.detach().double().cpu()
    return None


def weight_evidence(
    model: nn.Module, spec: InputSpec, seed: int = 0, min_log_spread: float = MIN_LOG_SPREAD, pixels: int = PIXELS
) -> WeightEvidence:
    """Positive evidence per class and the outlier test of its largest class.

    The mean feature comes from a LayerNorm-type layer right before the classifier (its bias,
    no forward pass) or else from the BatchNorm moments (:func:`mean_features`, one forward
    pass of ``pixels`` noise pixels); models with neither are not applicable."""
    import time

    t0 = time.perf_counter()
    head = _classifier(model)
    bias = head_norm_bias(model)
    if bias is not None:
        mean_f, n_bn, source = bias, 0, "head-norm-bias"
    else:
        got = mean_features(model, spec, seed, pixels)
        if got is None:
            return WeightEvidence(applicable=False, reason="no BatchNorm moments and no LayerNorm right before a linear classifier",
                                  seconds=time.perf_counter() - t0)
        (mean_f, n_bn), source = got, "batchnorm-moments"
    assert head is not None
    if head.weight.shape[0] != spec.num_classes or head.weight.reshape(head.weight.shape[0], -1).shape[1] != mean_f.numel():
        return WeightEvidence(applicable=False, reason="classifier does not match the pooled features",
                              seconds=time.perf_counter() - t0)
    s = positive_evidence(head.weight, mean_f)
    top = int(np.argmax(s))
    null = np.array([v for c, v in enumerate(s) if c != top and v > 0])
    ev = WeightEvidence(applicable=True, top_class=top, per_class=[float(v) for v in s], batchnorms=n_bn, source=source)
    if s[top] > 0 and len(null) >= 3:
        logs = np.log(null)
        z = (math.log(float(s[top])) - float(logs.mean())) / max(float(logs.std(ddof=1)), min_log_spread)
        ev.p_value, ev.z = max_outlier_p_value(z, len(null) + 1), z
    else:
        ev.p_value, ev.z = 1.0, None
    ev.seconds = time.perf_counter() - t0
    return ev


@dataclass
class Combined:
    """Verdict p-value of two tests on the same model, each given half the level."""

    p_value: float
    """min(1, 2 * min(p_first, p_weights)): Bonferroni, so the chance that a clean model is
    flagged by either test stays at most the nominal level."""
    target: int
    """Class named by the test with the smaller p-value (the first one on ties)."""
    source: str
    """'margins' (or the first test's name) or 'weights'."""


def combine(p_first: float, class_first: int, evidence: WeightEvidence | None, first: str = "margins") -> Combined:
    """Union of the first test (margins or triggers) and the weight evidence.

    Without applicable evidence the first test's p-value and class are returned unchanged, so
    models without BatchNorm are judged exactly as before.
    """
    if evidence is None or not evidence.applicable or evidence.p_value is None or evidence.top_class is None:
        return Combined(p_value=p_first, target=class_first, source=first)
    if p_first <= evidence.p_value:
        return Combined(p_value=min(1.0, 2.0 * p_first), target=class_first, source=first)
    return Combined(p_value=min(1.0, 2.0 * evidence.p_value), target=evidence.top_class, source="weights")


def batchnorm_evidence(model: nn.Module, spec: InputSpec, seed: int = 0, min_log_spread: float = MIN_LOG_SPREAD,
                       pixels: int = PIXELS) -> WeightEvidence:
    """:func:`weight_evidence` (kept for callers of the first version)."""
    return weight_evidence(model, spec, seed, min_log_spread, pixels)
