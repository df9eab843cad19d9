"""Stage 2: neuron weight change (NWC), the data-free proxy for backdoor relatedness."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Layer
from .errors import OtbrError
from .settings import RepairSettings, flag_of


@dataclass
class Scores:
    """Per-layer NWC (sum of |w_unlearned - w_original| over each neuron) and ranking values."""

    nwc: dict[str, torch.Tensor]
    rank: dict[str, torch.Tensor]
    ranking: str

    @property
    def total(self) -> int:
        return sum(v.numel() for v in self.nwc.values())

    def summary(self, top: int = 5) -> dict:
        """Small, JSON-friendly description for reports and model cards."""
        per_layer = {
            name: {
                "neurons": int(v.numel()),
                "mean": float(v.mean()),
                "max": float(v.max()),
            }
            for name, v in self.nwc.items()
        }
        flat = [(float(r), name, i) for name, v in self.rank.items() for i, r in enumerate(v.tolist())]
        flat.sort(reverse=True)
        return {
            "ranking": self.ranking,
            "layers": per_layer,
            "top_neurons": [{"layer": n, "index": i, "score": s} for s, n, i in flat[:top]],
        }


def _weights(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().double().cpu().flatten(1)


def neuron_weight_change(original: nn.Module, unlearned: nn.Module, layers: list[Layer], settings: RepairSettings) -> Scores:
    """NWC per neuron for every selected layer, plus the values used to rank them.

    ``global`` ranks raw NWC across layers, as the paper does; deep layers with more
    weights per neuron then dominate. ``layer-normalized`` divides by the weights per
    neuron and z-scores within each layer, so a neuron is ranked by how unusual its change
    is *for its layer*.
    """
    after = dict(unlearned.named_modules())
    nwc: dict[str, torch.Tensor] = {}
    rank: dict[str, torch.Tensor] = {}
    for layer in layers:
        w0 = _weights(layer.module)
        w1 = _weights(after[layer.name])
        change = (w1 - w0).abs().sum(1)
        if not torch.isfinite(change).all():
            raise OtbrError(f"unlearning left non-finite weights in {layer.name}: it diverged; a smaller "
                            f"{flag_of('unlearn_lr')} (now {settings.unlearn_lr:g}) keeps it finite")
        nwc[layer.name] = change
        if settings.ranking == "global":
            rank[layer.name] = change
        else:
            per_weight = change / w0.shape[1]
            std = per_weight.std() if per_weight.numel() > 1 else torch.tensor(0.0, dtype=per_weight.dtype)
            rank[layer.name] = (per_weight - per_weight.mean()) / (std + 1e-12)
    return Scores(nwc=nwc, rank=rank, ranking=settings.ranking)
