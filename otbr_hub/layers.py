"""Which layers hold the "neurons" that OTBR scores, prunes and fuses.

The rule, in order:

1. Only ``nn.Conv2d`` (a neuron is an output channel, grouped and depthwise included)
   and ``nn.Linear`` (a neuron is an output row) are candidates, filtered by
   ``settings.layer_types``.
2. The class heads are left out unless ``include_classifier``: their rows are the
   classes themselves, and pruning one removes a class rather than a feature. The heads
   are the final classifier (:func:`classifier_name`) plus the Conv2d/Linear layers
   registered right next to it with the same weight shape (a distillation head such as
   DeiT's ``head_dist`` or LeViT's ``classifier_distill``), and every layer timm's
   ``get_classifier()`` returns (see :func:`classifier_names`).
3. Shortcut/downsample projections are left out when ``skip_shortcuts`` (as in the
   reference), recognised by name (:data:`_SHORTCUT`: a module path part ``downsample``,
   ``shortcut``, ``skip``, ``residual_proj`` or ``shortcut_conv``) since they are parallel
   to the main path and break layer chaining. The name rule also leaves out layers called
   ``downsample`` that sit *on* the main path (timm ConvNeXt's stage ``downsample`` conv,
   Swin's patch-merging ``downsample.reduction``).
4. The stem (the first Conv2d/Linear in registration order: a CNN's input conv or a
   ViT's patch embedding) is left out when ``skip_stem``: it has few filters that every
   later feature depends on, so pruning one costs accuracy across all classes.
5. ``include`` / ``exclude`` regexes filter by module name last.

A layer whose ``weight`` is not its own registered parameter (weight normalisation or
another parametrisation computes it in every forward pass) is never a candidate: zeroing
or replacing the computed tensor would not change the model. Neither is a layer whose bias
is kept by its parent module (BEiT / EVA ``qkv`` with ``q_bias`` / ``v_bias``). Convolutions
that standardise their filters (:func:`weight_standardised`) are scored and pruned, and the
repair warns where the fusion cannot weaken their pruned neurons.

Each selected layer may have *attached* per-channel tensors: its bias, and the
BatchNorm that reads its output, with a matching width (BatchNorm2d after a conv,
BatchNorm1d after a Linear, as in LeViT). The repair finds it in one forward pass (a norm
that reads a residual sum normalises more than this layer, so it is not attached); without
an input description the BatchNorm registered right after the layer in the same parent
module is taken. They
travel with the neuron when pruning and fusing (post-activation ResNets otherwise keep
a pruned channel alive through the BatchNorm shift).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .errors import UnsupportedModelError, UsageError
from .settings import RepairSettings

if TYPE_CHECKING:
    from .load import InputSpec

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


_HEADS = (nn.Linear, nn.Conv2d)


def _last_layer(mod: nn.Module, named: dict[str, nn.Module]) -> str | None:
    """Name of ``mod`` if it is a Conv2d/Linear, else of its last Conv2d/Linear submodule
    (a head wrapped with a norm, like LeViT's ``NormLinear``), else None."""
    found = None
    for name, m in named.items():
        if m is mod and isinstance(m, _HEADS):
            return name
    prefix = next((name for name, m in named.items() if m is mod), None)
    if prefix is None:
        return None
    for name, m in mod.named_modules(prefix=prefix):
        if isinstance(m, _HEADS):
            found = name
    return found


def classifier_name(model: nn.Module) -> str | None:
    """Name of the final classification layer (timm ``get_classifier``, transformers ``classifier``)."""
    named = dict(model.named_modules())
    declared = _declared_heads(model, named)
    if declared:
        return declared[0]
    last = None
    for name, mod in named.items():
        if isinstance(mod, _HEADS):
            last = name
    last_shape = _weight_shape(named[last]) if last is not None else None
    for cand in ("classifier", "head", "fc", "head.fc", "classifier.1", "linear"):
        mod = named.get(cand)
        shape = _weight_shape(mod) if isinstance(mod, _HEADS) else None
        # a hidden layer may be called ``fc`` too: a head gives as many outputs as the last layer
        if shape and (not last_shape or shape[0] == last_shape[0]):
            return cand
    for cand in ("classifier", "head"):  # a head wrapped with a norm or dropout
        mod = named.get(cand)
        if mod is not None and any(isinstance(m, _HEADS) for m in mod.modules()):
            return _last_layer(mod, named)
    return last


def _declared_heads(model: nn.Module, named: dict[str, nn.Module]) -> list[str]:
    """Names of the layers the model's own ``get_classifier()`` returns (timm), in its order."""
    if not hasattr(model, "get_classifier"):
        return []
    try:
        got = model.get_classifier()
    except Exception:  # a model's own helper failing must not stop the rules that follow
        return []
    names = []
    for h in got if isinstance(got, (tuple, list)) else (got,):
        if isinstance(h, nn.Module):
            name = _last_layer(h, named)
            if name is not None:
                names.append(name)
    return names


_HEAD_HINTS = ("dist", "teacher", "head", "classifier")
"""Name parts of a second class head next to the classifier; a hidden layer that merely has
the classifier's shape (hidden width = number of classes) has none of them."""


def _weight_shape(mod: nn.Module) -> tuple[int, ...] | None:
    weight = getattr(mod, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None


def classifier_names(model: nn.Module) -> list[str]:
    """Every class head: the final classifier, the layers ``get_classifier()`` returns, and
    the unbroken run of Conv2d/Linear layers registered right before and after the final
    classifier with the same weight shape as the final classifier and a head-like name
    (:data:`_HEAD_HINTS`), i.e. as many classes read from the same features (distillation
    heads: timm DeiT ``head_dist``, transformers ``distillation_classifier``, SwiftFormer
    ``dist_head``). Empty when there is no Conv2d/Linear at all."""
    named = dict(model.named_modules())
    main = classifier_name(model)
    if main is None:
        return []
    heads = {main, *_declared_heads(model, named)}
    shape = _weight_shape(named[main])
    order = [n for n, m in named.items() if isinstance(m, _HEADS)]
    at = order.index(main)
    for run in (reversed(order[:at]), order[at + 1 :]):
        for name in run:
            if _weight_shape(named[name]) != shape or not any(h in name.lower() for h in _HEAD_HINTS):
                break
            heads.add(name)
    return [n for n in order if n in heads]


_NORMS = {"conv": (nn.BatchNorm2d, nn.BatchNorm1d), "linear": (nn.BatchNorm1d,)}

_STANDARDISED = re.compile(r"(Std|Standardi[sz]ed)Conv", re.IGNORECASE)


def weight_standardised(mod: nn.Module) -> bool:
    """A convolution that standardises each filter in its forward pass (timm ``StdConv2d`` and
    ``ScaledStdConv2d`` in BiT and NFNet, transformers' ``WeightStandardizedConv2d``). Its
    output does not depend on a filter's scale: zeroing a filter removes the neuron, but the
    fusion's ``(1 - lambda) * w`` for a neuron it keeps in place restores it in full."""
    return any(_STANDARDISED.search(cls.__name__) for cls in type(mod).__mro__)


def _outside_bias(name: str, mod: nn.Module, named: dict[str, nn.Module]) -> bool:
    """A Linear whose per-row bias lives in its parent, not in the layer (timm BEiT and EVA
    keep an attention's ``q_bias`` / ``v_bias`` next to a bias-free ``qkv``): zeroing the
    layer's row would leave the bias, so the neuron would not be removed."""
    if getattr(mod, "bias", None) is not None or ("." not in name and name):
        return False
    parent = named.get(_parent(name))
    return parent is not None and any(isinstance(getattr(parent, b, None), torch.Tensor) for b in ("q_bias", "v_bias"))


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _norms_by_dataflow(model: nn.Module, spec: InputSpec, layers: list[Layer]) -> dict[str, str]:
    """Layer name -> the BatchNorm that reads that layer's output (or a view of it), from one
    eval-mode pass of a blank image. A model may register ``conv1, conv2, bn1, bn2`` and
    compute ``bn1(conv1(x))``: the registration order would give conv2 bn1. A norm that
    reads a sum (a residual) or another layer's output is not the layer's."""
    from .load import eval_mode, forward_logits, model_device, model_dtype

    names = {id(layer.module): layer.name for layer in layers}
    # (storage, size) of each layer's output -> (layer, its version then, the output): a view of
    # it (LeViT flattens before its BatchNorm1d) is the same data; outputs are kept alive so
    # storages stay unique
    produced: dict[tuple[int, int], tuple[str, int, torch.Tensor]] = {}
    fed: dict[str, str] = {}
    hooks = []

    def key(t: torch.Tensor) -> tuple[int, int]:
        return t.untyped_storage().data_ptr(), t.numel()

    def on_layer(mod: nn.Module, _inputs: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.numel():
            produced[key(out)] = (names[id(mod)], out._version, out)

    def on_norm(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_mod: nn.Module, inputs: tuple) -> None:
            x = inputs[0] if inputs else None
            entry = produced.get(key(x)) if isinstance(x, torch.Tensor) and x.numel() else None
            # the same data, not changed since the layer wrote it: ``out += shortcut`` keeps the
            # storage but bumps its version (views share it), and a sum is not this layer's alone
            if entry is not None and x._version == entry[1]:
                fed.setdefault(entry[0], name)
        return hook

    for layer in layers:
        hooks.append(layer.module.register_forward_hook(on_layer))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            hooks.append(mod.register_forward_pre_hook(on_norm(name)))
    x = spec.normalize(torch.zeros(1, spec.channels, spec.height, spec.width))
    try:
        with eval_mode(model), torch.no_grad():
            forward_logits(model, x.to(device=model_device(model), dtype=model_dtype(model)))
    finally:
        for h in hooks:
            h.remove()
    return fed


def select_layers(model: nn.Module, settings: RepairSettings, spec: InputSpec | None = None) -> list[Layer]:
    """Apply the documented rule; raise if nothing is left to score. With ``spec``, which
    BatchNorm belongs to which layer is read off one forward pass (:func:`_norms_by_dataflow`)
    instead of the registration order."""
    kinds = {k.strip() for k in settings.layer_types.split(",")}
    heads = set() if settings.include_classifier else set(classifier_names(model))
    inc = re.compile(settings.include) if settings.include else None
    exc = re.compile(settings.exclude) if settings.exclude else None
    modules = list(model.named_modules())
    modules_by_name = dict(modules)
    layers: list[Layer] = []
    filtered = 0  # layers the include/exclude patterns left out, for the error below
    stem = next((n for n, m in modules if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    for idx, (name, mod) in enumerate(modules):
        if isinstance(mod, nn.Conv2d):
            kind = "conv"
        elif isinstance(mod, nn.Linear):
            kind = "linear"
        else:
            continue
        if kind not in kinds or name in heads or not isinstance(mod._parameters.get("weight"), nn.Parameter):
            continue
        if _outside_bias(name, mod, modules_by_name):
            continue
        if settings.skip_shortcuts and _SHORTCUT.search(name):
            continue
        if settings.skip_stem and name == stem:
            continue
        if (inc and not inc.search(name)) or (exc and exc.search(name)):
            filtered += 1
            continue
        layer = Layer(name=name, module=mod, kind=kind)
        for nname, nmod in modules[idx + 1 :] if spec is None else ():
            if isinstance(nmod, (nn.Conv2d, nn.Linear)):
                break
            if isinstance(nmod, _NORMS[kind]) and nmod.num_features == layer.n_out and _parent(nname) == _parent(name):
                layer.norm_name, layer.norm = nname, nmod
                break
        layers.append(layer)
    if spec is not None and layers:
        fed = _norms_by_dataflow(model, spec, layers)
        for layer in layers:
            nname = fed.get(layer.name)
            nmod = modules_by_name.get(nname) if nname else None
            if isinstance(nmod, _NORMS[layer.kind]) and nmod.num_features == layer.n_out:
                layer.norm_name, layer.norm = nname, nmod
    if not layers and filtered:
        patterns = " and ".join(f"{flag} '{p}'" for flag, p in (("--include", settings.include),
                                                                ("--exclude", settings.exclude)) if p)
        raise UsageError(f"{patterns} left none of the model's {filtered} scorable layers to score")
    if not layers:
        raise UnsupportedModelError(
            "the model has no supported layer to repair (no Conv2d/Linear with its own weight parameter outside the "
            "class heads; weights computed by weight norm or a parametrization cannot be pruned)"
        )
    return layers
