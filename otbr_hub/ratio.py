"""Choosing the pruning ratio without data.

The paper picks the ratio with test and poisoned data. Here every candidate ratio is
tried (NWC is computed once, so each try is only a prune and a fusion) and judged on
inputs synthesised from the original model itself:

* **agreement**: how often the repaired model still predicts what the original predicts
  on class-representative synthetic inputs. It must stay at or above ``min_agreement``;
  this is the data-free stand-in for "clean accuracy is kept".
* **backdoor statistic** (when a detector is given): the max-margin statistic of the
  original's most anomalous class. A candidate that no longer shows the anomaly is
  enough; otherwise the largest ratio that keeps agreement is used, because pruning more
  of the highest-NWC neurons is what removes a backdoor the detector cannot see.
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
    detector: Callable[[nn.Module], tuple[bool, float]] | None = None,
    original_flagged: bool = False,
) -> tuple[RatioChoice, nn.Module | None]:
    """Walk ``grid`` from small to large and return the chosen ratio and its model.

    ``build(r)`` returns the repaired model at ratio ``r``; ``agree(m)`` its agreement with
    the original; ``detector(m)`` (optional) whether it is still flagged and its p-value.
    """
    candidates: list[Candidate] = []
    best: tuple[float, nn.Module] | None = None
    for r in sorted(grid):
        model = build(r)
        a = agree(model)
        cand = Candidate(ratio=r, agreement=a)
        candidates.append(cand)
        if a < min_agreement:
            break
        best = (r, model)
        if detector is not None and original_flagged:
            flagged, p = detector(model)
            cand.flagged, cand.backdoor_p = flagged, p
            if not flagged:
                return (
                    RatioChoice(r, f"smallest ratio at which the backdoor statistic is no longer significant (p={p:.3g}) with agreement {a:.3f} >= {min_agreement}", candidates),
                    model,
                )
    if best is None:
        r0 = min(grid)
        return (
            RatioChoice(r0, f"even the smallest ratio changed predictions on synthetic inputs (agreement {candidates[0].agreement:.3f} < {min_agreement}); used it anyway", candidates),
            build(r0),
        )
    r, model = best
    why = f"largest ratio whose agreement with the original on synthetic inputs stays >= {min_agreement}"
    if detector is not None and original_flagged:
        why += "; the backdoor statistic stayed significant at every such ratio"
    return RatioChoice(r, why, candidates), model
