"""Stage 5: data-free activation bounds from BatchNorm statistics, stored in the weights.

A BatchNorm's affine parameters say where each channel's output sat during training: mean
``beta``, spread ``|gamma|``. A patch trigger drives the few channels that carry it far
above that range, so bounding every BatchNorm -> ReLU channel at ``beta + k * |gamma|``
cuts the trigger's path while clean inputs, which stay inside ``k`` spreads, pass almost
untouched. After the OTBR fusion this removed most of the patch backdoors the fusion alone
left on the benchmark ResNets, for under a point of accuracy (``benchmarks/NOTES.md``
section 11); it does nothing for whole-image triggers, whose channels stay in range.

The bound has to survive saving in the source's own format, so it is written into the
weights rather than added as a hook: ``min(relu(z), c) = (c / 6) * relu6((6 / c) * z)``.
The BatchNorm is scaled by ``6 / c``, the ReLUs become ReLU6 (one config entry: timm's
``act_layer``, transformers' ``hidden_act``), and the ``c / 6`` goes into the input columns of the convolution that reads
the channel. Residual streams and the stem (when an identity shortcut reads it) are scaled
down so far that their ReLU6 does not bind, and their readers scaled back. Loaded with plain
ReLUs the same weights compute the unbounded model (positive scaling commutes with ReLU;
only the silenced channels stay at 0), so a user who drops the config entry gets the fused
model, not a broken one.

Residual features (``forward_features``, ``pre_logits``) come out rescaled per channel; the
logits are those of the bounded model.

Implemented for timm ``ResNet`` models with basic or bottleneck blocks, no squeeze-excite
or attention, and ReLU activations (ResNet-18/34/50/101/152, ResNeXt, wide ResNets and the
``d`` variants). transformers' ``ResNetForImageClassification`` carries only the stem's
bound (its blocks build their inner activations as plain ReLU whatever ``hidden_act`` says),
which on the benchmark ResNets is where the whole effect was (``benchmarks/NOTES.md`` 11.6),
and only when its first block projects the stem. Anything
else is left unchanged with the reason in the result. Every rewrite is checked against
hooks that apply the same bounds to the unrewritten model.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .load import InputSpec, eval_mode, forward_logits, model_device

RELU6_TOP = 6.0
_STREAM_HEADROOM = 1000.0
"""A residual stream's ReLU6 binds at this many times its writers' largest ``|beta| + |gamma|``.
On a trained zoo ResNet-18 the last stream reached about 40x (a review measurement), so 100x
was too close; deeper ResNets sum more blocks into one stream. The check in
:func:`clip_activations` runs on the repair's synthesised probes too, and refuses the rewrite
if a stream's ReLU6 binds there. Not larger, so that float16 weights keep their precision."""
_DEAD = 1e-3
"""A bound below this share of ``|beta| + |gamma|`` means the channel was (almost) never
positive in training: it is silenced instead of scaled by an enormous factor."""


@dataclass
class ClipResult:
    """The bounded model (a copy; the input is untouched) and what was done."""

    model: nn.Module
    applied: bool
    reason: str
    sigma: float
    channels: int = 0
    norms: list[str] = field(default_factory=list)
    """The BatchNorms whose ReLU channels were bounded."""
    silenced: int = 0
    """Channels whose bound was <= 0 (never positive in training) and now output 0."""
    max_error: float | None = None
    """Largest relative logit difference between the rewrite and the hooked reference."""
    config: dict[str, str] = field(default_factory=dict)
    """The config entry that makes the saved model rebuild its ReLU6s."""

    def to_dict(self) -> dict:
        return {"applied": self.applied, "reason": self.reason, "sigma": self.sigma, "channels": self.channels,
                "norms": len(self.norms), "bounded": list(self.norms), "silenced": self.silenced,
                "max_error": self.max_error, "config": dict(self.config)}


def bounds(norm: nn.BatchNorm2d, sigma: float) -> torch.Tensor:
    """Per-channel upper bound ``beta + sigma * |gamma|``; 0 for channels that were never positive."""
    g, b = norm.weight.detach().double(), norm.bias.detach().double()
    c = b + sigma * g.abs()
    return torch.where(c > _DEAD * (b.abs() + g.abs()), c, torch.zeros_like(c))


@dataclass
class _Block:
    """One residual block, in the terms the rewrite needs."""

    readers: list[nn.Module]
    """Convolutions that read the block's input (its first conv, its projection's conv)."""
    inner: list[tuple[nn.BatchNorm2d, nn.Module]]
    """BatchNorm -> ReLU -> conv inside the block: the bounded channels and their reader."""
    last: nn.BatchNorm2d
    """The BatchNorm that writes into the residual sum."""
    projection: nn.BatchNorm2d | None
    """The shortcut's BatchNorm, or None for an identity shortcut."""


@dataclass
class _Net:
    """A ReLU ResNet, whichever library built it."""

    stem_pairs: list[tuple[nn.BatchNorm2d, nn.Module]]
    stem_norm: nn.BatchNorm2d
    blocks: list[_Block]
    head: nn.Linear
    acts: list[nn.Module]
    """The ReLUs that become ReLU6 (every one that reads a bounded BatchNorm or a residual sum)."""
    config: dict[str, str]
    """The config entry that rebuilds them as ReLU6 when the model is loaded."""


_OTHER_ACTS = (nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.PReLU, nn.Sigmoid, nn.Tanh)


def _bn(m: Any) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.affine


def _plan(model: nn.Module) -> _Net | str:
    """The model as a :class:`_Net`, or the reason it cannot be bounded."""
    for name, m in model.named_modules():
        if isinstance(m, _OTHER_ACTS):
            return f"{name} is a {type(m).__name__}, not a ReLU"
    try:
        from timm.models.resnet import ResNet
    except ImportError:  # pragma: no cover - timm is a dependency
        ResNet = ()
    if isinstance(model, ResNet):
        net = _timm_plan(model)
    elif type(model).__name__ == "ResNetForImageClassification" and hasattr(model, "resnet"):
        net = _transformers_plan(model)
    else:
        return f"activation bounds are implemented for timm and transformers ResNets only, not {type(model).__name__}"
    if isinstance(net, str):
        return net
    if isinstance(model, ResNet) and sum(type(m) is nn.ReLU for m in model.modules()) != len(net.acts):
        return "the model has ReLUs outside the BatchNorm -> ReLU pattern the rewrite knows"
    return net


def _timm_plan(model: nn.Module) -> _Net | str:
    from timm.models.resnet import BasicBlock, Bottleneck

    if not isinstance(model.maxpool, (nn.MaxPool2d, nn.Identity)):
        return "the stem pool is not a plain max-pool"
    if getattr(model.global_pool, "pool_type", "avg") not in ("avg", "max", "avgmax", "fast"):
        return f"global pool '{model.global_pool.pool_type}' concatenates features"
    if not isinstance(model.fc, nn.Linear):
        return "the model has no linear classifier"
    if not _bn(model.bn1) or type(model.act1) is not nn.ReLU:
        return "the stem does not end in BatchNorm -> ReLU"
    stem_pairs: list[tuple[nn.BatchNorm2d, nn.Module]] = []
    if isinstance(model.conv1, nn.Sequential):
        mods = list(model.conv1)
        if not isinstance(mods[-1], nn.Conv2d) or (len(mods) - 1) % 3 or not all(
                isinstance(mods[i], nn.Conv2d) and _bn(mods[i + 1]) and type(mods[i + 2]) is nn.ReLU
                for i in range(0, len(mods) - 1, 3)):
            return "the deep stem is not conv/BatchNorm/ReLU triples"
        stem_pairs = [(mods[i + 1], mods[i + 3]) for i in range(0, len(mods) - 1, 3)]
    acts: list[nn.Module] = [model.act1]
    if isinstance(model.conv1, nn.Sequential):
        acts += [m for m in model.conv1.children() if type(m) is nn.ReLU]
    blocks: list[_Block] = []
    linear_pools = (nn.Identity, nn.AvgPool2d, nn.MaxPool2d, _blur_pool())
    for i, block in enumerate(b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage):
        if not isinstance(block, (BasicBlock, Bottleneck)):
            return f"block {i} is a {type(block).__name__}"
        if block.se is not None:
            return "blocks with squeeze-excite or attention are not supported"
        if getattr(block, "aa", None) is not None and not isinstance(block.aa, linear_pools):
            return f"block {i}'s anti-aliasing layer is not a linear pool"
        deep = isinstance(block, Bottleneck)
        norms = [block.bn1, block.bn2] + ([block.bn3] if deep else [])
        block_acts = [block.act1, block.act2] + ([block.act3] if deep else [])
        if not all(_bn(n) for n in norms) or not all(type(a) is nn.ReLU for a in block_acts):
            return f"block {i} is not BatchNorm -> ReLU throughout"
        readers: list[nn.Module] = [block.conv1]
        projection = None
        if block.downsample is not None:
            parts = [m for m in block.downsample.children() if not isinstance(m, (nn.AvgPool2d, nn.Identity))] \
                if isinstance(block.downsample, nn.Sequential) else []
            if len(parts) != 2 or not isinstance(parts[0], nn.Conv2d) or not _bn(parts[1]):
                return f"block {i}'s shortcut is not (pool,) conv, BatchNorm"
            readers.append(parts[0])
            projection = parts[1]
        inner = [(block.bn1, block.conv2)] + ([(block.bn2, block.conv3)] if deep else [])
        blocks.append(_Block(readers, inner, norms[-1], projection))
        acts.extend(block_acts)
    return _Net(stem_pairs, model.bn1, blocks, model.fc, acts, {"act_layer": "relu6"})


def _transformers_plan(model: nn.Module) -> _Net | str:
    """transformers' ResNet: only the stem can be bounded. Its blocks build their inner
    activations as plain ReLU whatever ``config.hidden_act`` says; the stem's and the residual
    sums' follow ``hidden_act``, so those become ReLU6 and the inner ones stay unbounded."""
    body = model.resnet
    if getattr(model.config, "hidden_act", None) != "relu":
        return f"hidden_act is '{getattr(model.config, 'hidden_act', None)}', not 'relu'"
    head = [m for m in model.classifier.children() if not isinstance(m, nn.Flatten)]
    if len(head) != 1 or not isinstance(head[0], nn.Linear):
        return "the model has no linear classifier"
    stem = body.embedder.embedder
    if not _bn(stem.normalization) or type(stem.activation) is not nn.ReLU or not isinstance(body.embedder.pooler, nn.MaxPool2d):
        return "the stem is not conv, BatchNorm, ReLU, max-pool"
    if not isinstance(body.pooler, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return "the final pool is not a global average or max"
    blocks: list[_Block] = []
    acts: list[nn.Module] = [stem.activation]
    for i, block in enumerate(b for stage in body.encoder.stages for b in stage.layers):
        convs = list(block.layer)
        if type(block.activation) is not nn.ReLU or not convs or not all(_bn(c.normalization) for c in convs):
            return f"block {i} is not BatchNorm -> ReLU throughout"
        readers: list[nn.Module] = [convs[0].convolution]
        projection = None
        if not isinstance(block.shortcut, nn.Identity):
            if not _bn(getattr(block.shortcut, "normalization", None)):
                return f"block {i}'s shortcut is not conv, BatchNorm"
            readers.append(block.shortcut.convolution)
            projection = block.shortcut.normalization
        blocks.append(_Block(readers, [], convs[-1].normalization, projection))
        acts.append(block.activation)
    if blocks and blocks[0].projection is None:
        return ("the first block reads the stem through an identity shortcut, and transformers' format can bound "
                "only the stem (its inner activations are always ReLU), so it is left unbounded")
    return _Net([], stem.normalization, blocks, head[0], acts, {"hidden_act": "relu6"})


def _blur_pool() -> type:
    try:
        from timm.layers import BlurPool2d

        return BlurPool2d
    except ImportError:  # pragma: no cover
        return nn.Identity


def _scale_norm(norm: nn.BatchNorm2d, s: torch.Tensor) -> None:
    """Multiply the BatchNorm's output by ``s`` (per channel, s >= 0)."""
    with torch.no_grad():
        norm.weight.mul_(s.to(norm.weight))
        norm.bias.mul_(s.to(norm.bias))


def _scale_inputs(layer: nn.Module, s: torch.Tensor) -> None:
    """Multiply the layer's input channel ``j`` by ``s[j]`` (conv groups and linear columns)."""
    with torch.no_grad():
        w = layer.weight
        if isinstance(layer, nn.Linear):
            w.mul_(s.to(w).view(1, -1))
            return
        groups = layer.groups
        per = w.shape[1]
        sg = s.to(w).view(groups, per)  # input channels of group g: g*per .. (g+1)*per
        out_per = w.shape[0] // groups
        w.view(groups, out_per, per, *w.shape[2:]).mul_(sg.view(groups, 1, per, *([1] * (w.dim() - 2))))


def _pairs_and_streams(net: _Net) -> tuple[list[tuple[nn.BatchNorm2d, list[nn.Module]]], list[dict]]:
    """The bounded BatchNorms with their readers, and each residual stream's writers and readers.

    The stem output is bounded when the first block projects it; behind an identity shortcut
    it is the start of the first stream. A projection starts a new stream."""
    bounded = [(n, [r]) for n, r in net.stem_pairs]
    first = net.blocks[0]
    segments: list[dict] = []
    current: dict | None = None
    if first.projection is not None:
        bounded.append((net.stem_norm, list(first.readers)))
    else:
        current = {"writers": [net.stem_norm], "readers": []}
        segments.append(current)
    for i, block in enumerate(net.blocks):
        bounded.extend((n, [r]) for n, r in block.inner)
        if block.projection is not None:
            current = {"writers": [block.projection], "readers": []}
            segments.append(current)
        assert current is not None
        current["writers"].append(block.last)
        if i == 0 and block.projection is None:
            current["readers"].extend(block.readers)
        nxt = net.blocks[i + 1] if i + 1 < len(net.blocks) else None
        current["readers"].extend(nxt.readers if nxt is not None else [net.head])
    return bounded, segments


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """No TF32 in convolutions and matmuls (CUDA's default for convs): the rewritten weights
    round differently from the reference's, and TF32's 10-bit mantissa would turn that into
    relative logit differences of ~5e-4, above the check's tolerance."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cudnn.allow_tf32, matmul.allow_tf32 = saved


@torch.no_grad()
def _hooked_logits(model: nn.Module, spec: InputSpec, x: torch.Tensor, limits: dict[int, torch.Tensor]) -> torch.Tensor:
    """The reference: the unrewritten model with each bounded BatchNorm's output clamped."""
    hooks = []
    for m in model.modules():
        if id(m) in limits:
            c = limits[id(m)].to(x.device, torch.float32).view(1, -1, 1, 1)
            dead = (c == 0)

            def hook(mod, inp, out, c=c, dead=dead):
                return torch.where(dead, torch.zeros_like(out), torch.minimum(out, c))

            hooks.append(m.register_forward_hook(hook))
    try:
        with eval_mode(model):
            return forward_logits(model, spec.normalize(x)).float()
    finally:
        for h in hooks:
            h.remove()


def clip_activations(model: nn.Module, spec: InputSpec, sigma: float, *, inputs: torch.Tensor | None = None,
                     check_images: int = 2, seed: int = 0, tolerance: float = 1e-4) -> ClipResult:
    """Bound every BatchNorm -> ReLU channel of ``model`` at ``beta + sigma * |gamma|``.

    Returns a rewritten copy (ReLU6 activations, rescaled weights) or, when the model is not
    a supported ResNet or the rewrite does not match its hooked reference, the input
    unchanged with the reason. The check runs on ``check_images`` random images plus
    ``inputs`` (images in [0, 1], e.g. the repair's synthesised probes), so a residual
    stream's ReLU6 that binds on them is caught. ``sigma <= 0`` turns the stage off.
    """
    if sigma <= 0:
        return ClipResult(model, False, "--clip-sigma 0", sigma)
    net = _plan(model)
    if isinstance(net, str):
        return ClipResult(model, False, net, sigma)
    out = copy.deepcopy(model)
    net = _plan(out)
    assert not isinstance(net, str)
    bounded, segments = _pairs_and_streams(net)
    limits = {id(norm): bounds(norm, sigma) for norm, _ in bounded}
    # the reference is computed on the copy before it is rewritten
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(check_images, spec.channels, spec.height, spec.width, generator=gen).to(model_device(out))
    if inputs is not None and len(inputs):
        x = torch.cat([x, inputs.to(x)])
    with _exact_float32():
        reference = _hooked_logits(out, spec, x, limits)

    silenced = 0
    for norm, readers in bounded:
        c = limits[id(norm)]
        live = c > 0
        silenced += int((~live).sum())
        _scale_norm(norm, torch.where(live, RELU6_TOP / c.clamp_min(1e-30), torch.zeros_like(c)))
        for r in readers:
            _scale_inputs(r, torch.where(live, c / RELU6_TOP, torch.ones_like(c)))
    for seg in segments:
        top = torch.stack([w.bias.detach().double().abs() + w.weight.detach().double().abs() for w in seg["writers"]]).amax(0)
        limit = _STREAM_HEADROOM * top.clamp_min(1e-6)
        for w in seg["writers"]:
            _scale_norm(w, RELU6_TOP / limit)
        for r in seg["readers"]:
            _scale_inputs(r, limit / RELU6_TOP)
    to_swap = {id(a) for a in net.acts}
    for m in list(out.modules()):
        for child_name, child in list(m.named_children()):
            if id(child) in to_swap:
                setattr(m, child_name, _relu6_like(child))
    if "hidden_act" in net.config:
        out.config.hidden_act = net.config["hidden_act"]  # transformers rebuilds the ReLU6s from it
    setattr(out, CONFIG_ATTR, dict(net.config))
    with torch.no_grad(), eval_mode(out), _exact_float32():
        got = forward_logits(out, spec.normalize(x)).float()
    err = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
    if not torch.isfinite(got).all() or err > tolerance:
        return ClipResult(model, False, f"the rewrite did not match its reference (relative error {err:.2g}); left unbounded",
                          sigma, max_error=err)
    index = {id(m): n for n, m in out.named_modules()}
    names = [index[id(norm)] for norm, _ in bounded]
    channels = sum(len(limits[id(norm)]) for norm, _ in bounded)
    return ClipResult(out, True, f"{len(names)} BatchNorm -> ReLU groups bounded at beta + {sigma:g} |gamma|", sigma,
                      channels=channels, norms=names, silenced=silenced, max_error=err, config=dict(net.config))


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _relu6_like(relu: nn.Module) -> nn.ReLU6:
    """A ReLU6 in the place of ``relu``, with its hooks: a user's feature capture on an
    activation must keep working on the repaired model."""
    new = nn.ReLU6(inplace=getattr(relu, "inplace", False))
    new.train(relu.training)  # the model's train/eval flags stay as they were, module by module
    for attr in _HOOK_DICTS:
        if hasattr(relu, attr) and hasattr(new, attr):
            getattr(new, attr).update(getattr(relu, attr))
    return new


CONFIG_ATTR = "_otbr_bounds_config"
"""Set by :func:`clip_activations` on the models it rewrites: the config entry to save."""


def bounds_config(model: nn.Module) -> dict[str, str]:
    """The config entry a rewritten model needs when saved (``{}`` for any other model)."""
    return dict(getattr(model, CONFIG_ATTR, None) or {})


def copy_activations(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (same architecture) the activation modules of ``src``, in place: weights are
    copied with ``load_state_dict``, which does not carry module types."""
    src_mods = dict(src.named_modules())
    for name, m in list(dst.named_modules()):
        for child_name, child in list(m.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            other = src_mods.get(full)
            if type(child) is nn.ReLU and type(other) is nn.ReLU6:
                setattr(m, child_name, _relu6_like(child))
    entry = bounds_config(src)
    if entry:
        setattr(dst, CONFIG_ATTR, entry)
        if "hidden_act" in entry and hasattr(getattr(dst, "config", None), "hidden_act"):
            dst.config.hidden_act = entry["hidden_act"]

