"""Stage 3: zero the neurons with the largest scores in a copy of the original model."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .layers import Layer
from .score import Scores


@dataclass
class PruneResult:
    """The pruned copy and which neurons were zeroed (layer name -> channel indices)."""

    model: nn.Module
    ratio: float
    k: int
    total: int
    pruned: dict[str, list[int]]

    def per_layer_counts(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.pruned.items() if idx}


def top_neurons(scores: Scores, ratio: float, layer_cap: float = 0.0) -> dict[str, list[int]]:
    """The ``floor(ratio * total)`` (at least one) highest-ranked neurons across all layers.

    ``layer_cap`` > 0: no layer gives up more than ``max(1, floor(layer_cap * ratio * n))`` of
    its ``n`` neurons; the budget then goes to the next-ranked neurons of other layers (if
    every layer is full, fewer are chosen). Ties are broken by layer order then channel
    index, so the choice is deterministic.
    """
    names = list(scores.rank)
    values = torch.cat([scores.rank[n].double() for n in names])
    owner = torch.cat([torch.full((scores.rank[n].numel(),), i) for i, n in enumerate(names)])
    local = torch.cat([torch.arange(scores.rank[n].numel()) for n in names])
    k = max(1, int(ratio * values.numel()))
    order = torch.sort(-values, stable=True).indices
    chosen: dict[str, list[int]] = {n: [] for n in names}
    if layer_cap <= 0:  # no cap: any layer may take the whole budget
        room = [k] * len(names)
    else:
        room = [max(1, int(layer_cap * ratio * scores.rank[n].numel() + 1e-9)) for n in names]  # 0.29 * 100 is 28.999...
    taken = 0
    for j in order.tolist():
        i = int(owner[j])
        if room[i] > 0:
            chosen[names[i]].append(int(local[j]))
            room[i] -= 1
            taken += 1
            if taken == k:
                break
    return {n: sorted(v) for n, v in chosen.items()}


def prune(model: nn.Module, layers: list[Layer], scores: Scores, ratio: float, *, silence_norm: bool = True,
          layer_cap: float = 0.0) -> PruneResult:
    """Copy ``model`` and zero the chosen neurons' weights (and biases).

    With ``silence_norm`` the BatchNorm attached to a pruned conv also gets a zero scale
    and shift for that channel (a BatchNorm without them a zero running mean): otherwise the
    channel still emits the BatchNorm's constant ``beta - gamma * mean / std`` and the neuron
    is not really removed.
    ``layer_cap``: see :func:`top_neurons`.
    """
    chosen = top_neurons(scores, ratio, layer_cap)
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for layer in layers:
            idx = chosen.get(layer.name) or []
            if not idx:
                continue
            mod = modules[layer.name]
            mod.weight[idx] = 0
            if getattr(mod, "bias", None) is not None:
                mod.bias[idx] = 0
            if silence_norm and layer.norm_name:
                norm = modules[layer.norm_name]
                if norm.weight is not None:
                    norm.weight[idx] = 0
                    norm.bias[idx] = 0
                elif getattr(norm, "running_mean", None) is not None:  # no affine part: centre the zeroed input on 0
                    norm.running_mean[idx] = 0
    k = sum(len(v) for v in chosen.values())
    return PruneResult(model=pruned, ratio=ratio, k=k, total=scores.total, pruned=chosen)
