"""Which layers hold the "neurons" that OTBR scores, prunes and fuses.

The rule, in order:

1. Only ``nn.Conv2d`` (a neuron is an output channel, grouped and depthwise included)
   and ``nn.Linear`` (a neuron is an output row) are candidates, filtered by
   ``settings.layer_types``.
2. The final classifier is left out unless ``include_classifier``: its rows are the
   classes themselves, and pruning one removes a class rather than a feature.
3. Shortcut/downsample projections are left out when ``skip_shortcuts`` (as in the
   reference), recognised by name (``downsample``, ``shortcut``, ``skip``, ``proj`` of a
   residual) since they are parallel to the main path and break layer chaining.
4. The stem (the first Conv2d/Linear in registration order: a CNN's input conv or a
   ViT's patch embedding) is left out when ``skip_stem``: it has few filters that every
   later feature depends on, so pruning one costs accuracy across all classes.
5. ``include`` / ``exclude`` regexes filter by module name last.

Each selected layer may have *attached* per-channel tensors: its bias, and the
BatchNorm that comes right after it in registration order, in the same parent
module, with a matching width (a norm in the next block normalises a residual sum,
not this layer alone, so it is not attached). They
travel with the neuron when pruning and fusing (post-activation ResNets otherwise keep
a pruned channel alive through the BatchNorm shift).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .errors import UnsupportedModelError
from .settings import RepairSettings

_SHORTCUT = re.compile(r"(^|\.)(downsample|shortcut|skip|residual_proj|shortcut_conv)(\.|$)")


@dataclass
class Layer:
    """A scored layer: its name, module, neuron count and attached per-channel norm."""

    name: str
    module: nn.Module
    kind: str  # "conv" | "linear"
    norm_name: str | None = None
    norm: nn.Module | None = field(default=None, repr=False)

    @property
    def n_out(self) -> int:
        return self.module.weight.shape[0]

    @property
    def n_in(self) -> int:
        return self.module.weight.shape[1]

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1)


def classifier_name(model: nn.Module) -> str | None:
    """Name of the final classification layer (timm ``get_classifier``, transformers ``classifier``)."""
    named = dict(model.named_modules())
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, mod in named.items():
            if mod is head and isinstance(mod, (nn.Linear, nn.Conv2d)):
                return name
    for cand in ("classifier", "head", "fc", "head.fc", "classifier.1", "linear"):
        mod = named.get(cand)
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            return cand
    last = None
    for name, mod in named.items():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            last = name
    return last


_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def select_layers(model: nn.Module, settings: RepairSettings) -> list[Layer]:
    """Apply the documented rule; raise if nothing is left to score."""
    kinds = {k.strip() for k in settings.layer_types.split(",")}
    head = None if settings.include_classifier else classifier_name(model)
    inc = re.compile(settings.include) if settings.include else None
    exc = re.compile(settings.exclude) if settings.exclude else None
    modules = list(model.named_modules())
    layers: list[Layer] = []
    stem = next((n for n, m in modules if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    for idx, (name, mod) in enumerate(modules):
        if isinstance(mod, nn.Conv2d):
            kind = "conv"
        elif isinstance(mod, nn.Linear):
            kind = "linear"
        else:
            continue
        if kind not in kinds or name == head or mod.weight is None:
            continue
        if settings.skip_shortcuts and _SHORTCUT.search(name):
            continue
        if settings.skip_stem and name == stem:
            continue
        if inc and not inc.search(name):
            continue
        if exc and exc.search(name):
            continue
        layer = Layer(name=name, module=mod, kind=kind)
        if kind == "conv":
            for nname, nmod in modules[idx + 1 :]:
                if isinstance(nmod, (nn.Conv2d, nn.Linear)):
                    break
                if isinstance(nmod, _NORMS) and nmod.num_features == mod.out_channels and _parent(nname) == _parent(name):
                    layer.norm_name, layer.norm = nname, nmod
                    break
        layers.append(layer)
    if not layers:
        raise UnsupportedModelError("the model has no supported layer to repair (no Conv2d/Linear outside the classifier)")
    return layers
