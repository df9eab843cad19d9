"""Choosing the pruning ratio without data.

The paper picks the ratio with test and poisoned data. Here NWC is computed once and
each candidate ratio costs only a prune and a fusion; candidates are judged on inputs
synthesised from the original model itself (no data):

* **backdoor statistic**: when the data-free detector flags the original, the smallest
  ratio at which it no longer does is chosen. This is the preferred route: it adapts the
  ratio to the model and leaves a clean-looking model at the fallback below.
* **fallback ratio**: when there is no walk (nothing flagged, or only evidence the walk
  cannot use), the ``fallback`` ratio is used. How strongly it is fused is the caller's
  part: :func:`otbr_hub.repair.repair` fuses lightly when its scan finds nothing, at full
  strength otherwise.
* **a walk that never gets the statistic below its threshold** ends at the candidate where
  the statistic was weakest (largest p; the smaller ratio on a tie), not at the largest
  ratio: when more pruning does not weaken the evidence, the evidence is not telling the
  walk to prune more. On a clean MobileNetV3 that the margins flagged falsely, the largest
  ratio the guard allowed (0.03) cost 32 points of accuracy and the weakest-statistic one
  (0.01) 13 (``benchmarks/NOTES.md``, section 14).
* **agreement guard**: a candidate whose top-1 agreement with the original on the
  synthetic inputs falls below ``min_agreement`` is never chosen; the walk stops there.
  It guards against a collapsed model, not a fine-grained accuracy estimate: agreement on
  synthetic inputs is much lower than on real images for the same model (measured in
  ``benchmarks/NOTES.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass
class Candidate:
    ratio: float
    agreement: float
    backdoor_p: float | None = None
    flagged: bool | None = None

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "agreement": self.agreement, "backdoor_p": self.backdoor_p, "flagged": self.flagged}


@dataclass
class RatioChoice:
    ratio: float
    reason: str
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "reason": self.reason, "candidates": [c.to_dict() for c in self.candidates]}


def choose_ratio(
    grid: list[float],
    build: Callable[[float], nn.Module],
    agree: Callable[[nn.Module], float],
    min_agreement: float,
    fallback: float,
    detector: Callable[[nn.Module], tuple[bool, float]] | None = None,
    original_flagged: bool = False,
    unflagged_reason: str | None = None,
) -> tuple[RatioChoice, nn.Module]:
    """Walk the candidate ratios from small to large and return the choice and its model.

    ``build(r)`` returns the repaired model at ratio ``r``; ``agree(m)`` its agreement
    with the original on synthetic inputs; ``detector(m)`` whether it is still flagged
    and the p-value. ``unflagged_reason`` explains the fallback ratio in the report when
    there is no walk (the caller knows why: nothing flagged, or evidence the walk cannot use).
    """
    candidates: list[Candidate] = []
    use_detector = detector is not None and original_flagged
    ratios = sorted(set(grid) | ({fallback} if not use_detector else set()))
    if not use_detector:
        ratios = [r for r in ratios if r <= fallback]
    accepted: tuple[float, nn.Module] | None = None
    for r in ratios:
        model = build(r)
        cand = Candidate(ratio=r, agreement=agree(model))
        candidates.append(cand)
        if cand.agreement < min_agreement:
            break
        accepted = (r, model)
        if use_detector:
            cand.flagged, cand.backdoor_p = detector(model)
            if not cand.flagged:
                why = (f"smallest ratio at which the backdoor statistic is no longer significant "
                       f"(p={cand.backdoor_p:.3g}); agreement on synthetic inputs {cand.agreement:.3f}")
                return RatioChoice(r, why, candidates), model
    if accepted is None:
        r = ratios[0]
        why = (f"even the smallest ratio fell below the agreement guard "
               f"({candidates[0].agreement:.3f} < {min_agreement}); used it anyway")
        return RatioChoice(r, why, candidates), build(r)
    r, model = accepted
    if use_detector:
        r, why = _weakest_statistic(candidates)
        if r != accepted[0]:
            model = build(r)
    elif r == fallback and unflagged_reason:
        why = unflagged_reason
    elif r == fallback:
        why = (f"the detector did not flag the model, which it often misses, so the default ratio {fallback:g} was used"
               if detector is not None else f"default ratio {fallback:g} (no detector)")
    else:
        why = f"largest ratio below the default {fallback:g} that kept agreement >= {min_agreement}"
    return RatioChoice(r, why, candidates), model


def _weakest_statistic(candidates: list[Candidate]) -> tuple[float, str]:
    """The walked candidate with the largest backdoor p-value (the smaller ratio on a tie)."""
    walked = [c for c in candidates if c.backdoor_p is not None]
    best = max(walked, key=lambda c: (c.backdoor_p, -c.ratio))
    largest = max(c.ratio for c in walked)
    if best.ratio == largest:
        return best.ratio, ("the backdoor statistic stayed significant at every ratio within the agreement guard; "
                            f"used the largest, where it was weakest (p={best.backdoor_p:.3g})")
    return best.ratio, ("the backdoor statistic stayed significant at every ratio within the agreement guard and "
                        f"pruning more did not weaken it; used the ratio where it was weakest (p={best.backdoor_p:.3g}), "
                        f"not the largest ({largest:g})")
