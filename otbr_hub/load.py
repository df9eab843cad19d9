"""Load image classifiers from timm or transformers folders and describe their input.

Everything downstream works on a plain ``nn.Module`` plus an :class:`InputSpec`; this
module is the only place that knows how the two supported libraries lay out a folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from .errors import OtbrError, UnsupportedModelError, UsageError

log = logging.getLogger("otbr_hub")

Library = Literal["timm", "transformers", "torch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


@dataclass(frozen=True)
class InputSpec:
    """What the model eats: channels, spatial size, normalisation and number of classes."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map pixel-space images in [0, 1] to what the model expects."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
        }


@dataclass
class LoadedModel:
    """A model together with where it came from, so it can be saved back the same way."""

    model: nn.Module
    library: Library
    spec: InputSpec
    source: str
    dtype: torch.dtype = torch.float32
    folder: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    # each floating-point tensor's own stored dtype, where they differ from ``dtype`` (an fp16
    # checkpoint that keeps BatchNorm in fp32): saving casts every tensor back to its own.
    # Filled for timm folders and in-memory models; a transformers folder is saved in ``dtype``.
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)


def library_of(model: nn.Module) -> Library:
    """Tell a transformers model from a timm or plain torch one."""
    try:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            return "transformers"
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if hasattr(model, "pretrained_cfg") or type(model).__module__.startswith("timm."):
        return "timm"
    return "torch"


def _fit(values: Any, channels: int, default: tuple[float, ...]) -> tuple[float, ...]:
    if values is None:
        values = default
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = [float(values)]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise UsageError(f"mean and std take a number or one number per input channel, got {values!r}")
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UsageError(f"mean and std take a number or one number per input channel, got {values!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"mean and std must be finite numbers, got {values!r}")
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise UnsupportedModelError(f"normalisation has {len(values)} values but the model has {channels} input channels")


def _positive(std: tuple[float, ...]) -> tuple[float, ...]:
    if not all(v > 0 for v in std):
        raise UsageError(f"std must be positive (inputs are divided by it), got {std!r}")
    return std


def _size_pair(size: Any) -> tuple[int, int]:
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    if isinstance(size, (list, tuple)):
        return int(size[-2]), int(size[-1])
    return int(size), int(size)


def check_input_size(input_size: Any) -> tuple[int, int, int]:
    """``(C, H, W)`` as three positive ints, or a one-line UsageError: a 2-tuple would otherwise
    fail to unpack and a zero side would only fail in the forward pass, with a message about the model."""
    import numbers

    values = tuple(input_size) if isinstance(input_size, (tuple, list, torch.Size)) else None
    if values is None or len(values) != 3 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in values):
        raise UsageError(f"input_size must be (C, H, W) with positive integers, got {input_size!r}")
    c, h, w = (int(v) for v in values)
    return c, h, w


def input_spec(
    model: nn.Module,
    *,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    num_classes: int | None = None,
    processor_config: dict[str, Any] | None = None,
) -> InputSpec:
    """Read the input description from the model's own config; explicit arguments win.

    timm keeps it in ``pretrained_cfg``; transformers splits it between ``config`` (size,
    channels, labels) and the image processor (mean/std), which is passed as
    ``processor_config`` when loading from a folder.
    """
    lib = library_of(model)
    c = h = w = None
    m = s = None
    n = None
    if lib == "timm":
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        if cfg.get("input_size"):
            c, h, w = (int(v) for v in cfg["input_size"])
        try:  # models built with another img_size/in_chans than their pretrained_cfg says
            from timm.models._hub import get_model_input_config

            current = get_model_input_config(model)
            cc, ch, cw = (int(v) for v in current["input_size"])
            c = cc
            if current.get("fixed_input_size") or h is None:
                h, w = ch, cw
        except (ImportError, KeyError, TypeError, ValueError):
            pass
        m, s = cfg.get("mean"), cfg.get("std")
        n = getattr(model, "num_classes", None)
        head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
        if isinstance(head, nn.Linear) and n and head.out_features != n:
            n = head.out_features  # the head was swapped after create_model (model.fc = nn.Linear(...))
    elif lib == "transformers":
        cfg = model.config
        # CLIP/SigLIP-style classifiers keep the image settings in their vision tower's config
        tower = getattr(cfg, "vision_config", None)
        c = int(getattr(cfg, "num_channels", None) or getattr(tower, "num_channels", None) or 3)
        size = getattr(cfg, "image_size", None) or getattr(tower, "image_size", None)
        if size is None and processor_config:
            size = processor_config.get("crop_size") or processor_config.get("size")
        if size is None:
            size = 224
        h, w = _size_pair(size)
        if processor_config:
            m, s = processor_config.get("image_mean"), processor_config.get("image_std")
            if processor_config.get("do_normalize") is False:  # the processor hands the model [0, 1] pixels
                m, s = (0.0,), (1.0,)
        n = int(cfg.num_labels)
    else:
        n = getattr(model, "num_classes", None)
    if input_size is not None:
        c, h, w = check_input_size(input_size)
    if c is None or h is None or w is None:
        raise UnsupportedModelError("cannot tell the model's input size; pass input_size=(C, H, W)")
    default_m, default_s = (IMAGENET_MEAN, IMAGENET_STD) if lib != "torch" else ((0.0,), (1.0,))
    if num_classes is not None:
        n = num_classes
    if n is None:
        n = _infer_num_classes(model, c, h, w)
    return InputSpec(
        channels=c,
        height=h,
        width=w,
        mean=_fit(mean if mean is not None else m, c, default_m),
        std=_positive(_fit(std if std is not None else s, c, default_s)),
        num_classes=int(n),
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block; afterwards every submodule's own train/eval flag
    is back as it was (``model.train(was_training)`` would flatten a mixed state)."""
    flags = [m.training for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag


def _infer_num_classes(model: nn.Module, c: int, h: int, w: int) -> int:
    try:
        with eval_mode(model), torch.no_grad():
            out = forward_logits(model, torch.zeros(1, c, h, w, dtype=model_dtype(model),
                                                    device=model_device(model)))
    except UnsupportedModelError:
        raise
    except Exception as err:
        raise _forward_failure(err, c, h, w) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UnsupportedModelError("cannot tell the number of classes: the model does not return (batch, classes) logits")
    return int(out.shape[-1])


_CHANNELS_LAST: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def uses_channels_last(model: nn.Module) -> bool:
    """Whether to hand this model its images in channels-last layout: models with 2-D
    convolutions run them 1.2-1.4x faster that way on CPU (oneDNN) and GPU, with the same
    values up to float rounding (resnet50, 224 px, 2 cores: 15.5 -> 19.5 image
    forward/backward passes/s; ``benchmarks/SPEED_NOTES.md``). The model's own weights keep
    their layout. A model whose forward cannot take a non-contiguous input (a ``.view`` on
    it) is remembered and gets contiguous images instead."""
    flag = _CHANNELS_LAST.get(model)
    if flag is None:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        flag = bool(convs) and not any(_channels_last_bug(m) for m in convs)
        _CHANNELS_LAST[model] = flag
    return flag


def _channels_last_bug(conv: nn.Conv2d) -> bool:
    """A layer that torch 2.14's CPU kernels get wrong in channels-last: a 1x1 convolution
    with stride 2 and 2-7 input channels (the stem's ``conv_scale`` of timm RepVGG and
    MobileOne) returns a wrong weight gradient (relative error 0.01-2.9 on 2 threads) or
    corrupts the heap and aborts the process (1 thread). Stride 1 and 3, 3x3 kernels and 1 or
    8+ channels were exact when measured; such models keep contiguous images and weights."""
    return tuple(conv.kernel_size) == (1, 1) and 2 in tuple(conv.stride) and 2 <= conv.in_channels <= 7


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a classifier of any supported library and return its logits (an output object's
    ``logits``, or a mapping's ``"logits"`` entry, when the model returns more than a tensor)."""
    if x.dim() == 4 and uses_channels_last(model):
        try:
            return _logits(model, x.contiguous(memory_format=torch.channels_last))
        except RuntimeError as err:
            if "view" not in str(err) and "contiguous" not in str(err):
                raise
            _CHANNELS_LAST[model] = False
    return _logits(model, x)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if library_of(model) == "transformers":
        out = model(pixel_values=x)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise UnsupportedModelError(f"{type(model).__name__} returns a {type(out).__name__} without logits")
        return logits
    out = model(x)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    return out


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _forward_failure(err: BaseException, c: int, h: int, w: int) -> OtbrError:
    """One line for a forward pass that raised: out of memory is said as such (a smaller
    input size would be the wrong advice), anything else suggests the input size."""
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return OtbrError(f"out of memory running one {c}x{h}x{w} image through the model ({_first_line(err)})")
    return UnsupportedModelError(
        f"the model's forward pass fails on a {c}x{h}x{w} input ({type(err).__name__}: {_first_line(err)}); "
        "pass input_size=(C, H, W) if its input is another size"
    )


FEATURE_EXTRACTOR = "a timm feature extractor (num_classes is 0), not a classifier"
"""Why a timm model built with ``num_classes=0`` (it returns pooled features) is refused."""


_NON_IMAGE_INPUTS = ("input_ids", "spatial_shapes")
"""transformers forward arguments that mean a model is not a plain image classifier."""


def check_forward(model: nn.Module, spec: InputSpec) -> None:
    """One eval-mode forward pass of a single blank input, before any real work: a model that
    cannot run on the described input, or does not return ``(batch, num_classes)`` logits,
    raises a one-line :class:`UnsupportedModelError` instead of failing mid-repair."""
    if library_of(model) == "transformers":
        import inspect

        params = inspect.signature(model.forward).parameters
        if "pixel_values" not in params:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not take images as pixel_values (its forward reads other inputs), "
                "so it cannot be repaired or scanned"
            )
        extra = [p for p in _NON_IMAGE_INPUTS if p in params]
        if extra:  # a vision-language model (input_ids) or pre-patchified pixels (Siglip2's spatial_shapes)
            raise UnsupportedModelError(
                f"{type(model).__name__} needs more than a batch of images (its forward also reads {', '.join(extra)}), "
                "so it cannot be repaired or scanned"
            )
    if library_of(model) == "timm" and getattr(model, "num_classes", None) == 0:
        raise UnsupportedModelError(FEATURE_EXTRACTOR)
    dtype = model_dtype(model)
    x = spec.normalize(torch.zeros(1, spec.channels, spec.height, spec.width)).to(dtype=dtype, device=model_device(model))
    try:
        with eval_mode(model), torch.no_grad():
            out = forward_logits(model, x)
    except UnsupportedModelError:
        raise
    except Exception as err:
        raise _forward_failure(err, spec.channels, spec.height, spec.width) from None
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(
            f"the model returns a {type(out).__name__}, not a tensor of class logits (nor an output with .logits)"
        )
    if out.dim() != 2 or tuple(out.shape) != (1, spec.num_classes):
        raise UnsupportedModelError(
            f"the model returns logits of shape {tuple(out.shape)} for one image, expected (1, {spec.num_classes})"
            + (f"; if it has {out.shape[1]} classes, pass otbr_hub.from_model(model, num_classes={out.shape[1]})"
               if out.dim() == 2 and out.shape[0] == 1 else "")
        )
    if not torch.isfinite(out).all():
        raise UnsupportedModelError("the model returns non-finite logits (NaN or inf) for a blank image; its weights may be corrupt")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs should have: that of the first floating-point parameter (an integer
    parameter, such as a lookup table, says nothing about it); float32 when there is none."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


IN_MEMORY = "<in-memory>"
"""``LoadedModel.source`` of a model given as an object, not read from a folder or the Hub."""


def class_names(model: nn.Module) -> list[str] | None:
    """The model's own class names in id order (transformers ``id2label``, timm
    ``pretrained_cfg['label_names']``), or None when it has none or only placeholders (``LABEL_3``)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    names: list[str] | None = None
    if isinstance(id2label, dict) and id2label:
        try:
            names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        except (TypeError, ValueError):
            names = None
    if names is None:
        raw = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        names = [str(n) for n in raw] if isinstance(raw, (list, tuple)) and raw else None
    if not names or all(n.upper().startswith("LABEL_") for n in names):
        return None
    return names


def has_inference_tensors(model: nn.Module) -> bool:
    """Weights made under ``torch.inference_mode()`` cannot take part in autograd; such a
    model is worked on through a deep copy (which gives normal tensors)."""
    return any(t.is_inference() for t in [*model.parameters(), *model.buffers()])


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- folders


def read_json_object(path: Path, name: str | None = None) -> dict[str, Any]:
    """A model's JSON file (config, index, preprocessing) as a dict. A broken file is an error
    of the model (scan: ``error``), not an unsupported kind of model (``skipped``): a CI gate
    must not read it as "nothing to scan". ``name`` replaces the path in messages (a Hub file
    is better named by its repo than by its cache path). Fetch, load and scan all read
    through here, so they fail alike."""
    label = name or str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OtbrError(f"{label} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise OtbrError(f"{label} holds a JSON {type(data).__name__}, not an object")
    return data


def weight_file(folder: Path) -> Path:
    """The weights to load from a folder, preferring safetensors (sharded or single)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            return folder / name
    raise UnsupportedModelError(f"{folder} has no model.safetensors or pytorch_model.bin")


def check_weight_files(folder: Path) -> None:
    """Inspect the files a load of ``folder`` opens (the weight file, or every shard its index
    names) and refuse them when inspection finds anything unsafe: ``torch.load(weights_only=True)``
    is the second line of defence, not the only one. Shards must stay inside the folder."""
    from .inspect import UNSAFE_SEVERITIES, SEVERITY_RANK, _escapes_folder, inspect_file

    path = weight_file(folder)
    files = [(path, False)]
    if path.name.endswith(".index.json"):
        weight_map = read_json_object(path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UnsupportedModelError(f"{path.name} has no weight_map of tensor name to file name")
        for shard in sorted(set(weight_map.values())):
            if _escapes_folder(shard) or not shard.strip():
                raise UnsupportedModelError(f"refusing to load {path.name}: shard {shard!r} lies outside the model folder")
            files.append((folder / shard, not shard.endswith(".safetensors")))
    for file, as_pickle in files:
        if not file.is_file():
            raise UnsupportedModelError(f"{file.name} is missing from {folder}")
        report = inspect_file(file, compute_sha256=False, display_path=file.name, torch_loaded=as_pickle)
        bad = [f for f in report.findings if f.severity in UNSAFE_SEVERITIES]
        if bad:
            worst = max(bad, key=lambda f: SEVERITY_RANK[f.severity])
            raise UnsupportedModelError(f"refusing to load {report.path}: {worst.message} (otbr-hub scan shows every finding)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load weights without executing code: safetensors, or ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    if path.name.endswith(".index.json"):
        index = read_json_object(path)
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            out.update(read_state_dict(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise UnsupportedModelError(f"cannot read {path.name}: {err}") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise UnsupportedModelError(
            f"refusing to load {path.name}: it needs more than plain tensors to unpickle ({type(err).__name__}); "
            "convert it to safetensors"
        ) from None
    if not isinstance(sd, dict):
        raise UnsupportedModelError(f"{path.name} does not hold a state dict")
    return sd


def other_dtypes(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The floating-point tensors stored in another dtype than ``dtype`` (see ``LoadedModel.dtypes``)."""
    return {k: v.dtype for k, v in state_dict.items() if v.is_floating_point() and v.dtype != dtype}


def timm_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A timm checkpoint's weights the way timm reads them: a training checkpoint's
    ``state_dict`` (or EMA / ``model``) entry unwrapped and DDP / ``torch.compile`` prefixes
    (``module.``, ``_orig_mod.``) dropped, plain tensors only (``weights_only``)."""
    from timm.models import clean_state_dict

    sd: dict[str, Any] = read_state_dict(path)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm.models.load_state_dict's order
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = clean_state_dict(sd)
    odd = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise UnsupportedModelError(f"{path.name} holds more than weights ({odd[0]!r} is a {type(sd[odd[0]]).__name__}); "
                                    "save the model's state_dict() alone")
    return sd


def source_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most floating-point weights are stored in."""
    counts: dict[torch.dtype, int] = {}
    for t in state_dict.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def check_finite(model: nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise UnsupportedModelError(f"weights contain NaN or Inf values ({name})")


def _state_dict_mismatch(err: Exception) -> str:
    """torch's load_state_dict message on one line: its first line is only a heading ("Error(s)
    in loading state_dict for X:"), the detail (missing keys, shape mismatches) follows."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith("Error(s) in loading state_dict")]
    text = "; ".join(detail) or (lines[0] if lines else type(err).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def config_library(cfg: dict[str, Any]) -> Library | None:
    """Which library a ``config.json`` is for: transformers configs name a ``model_type`` (or
    ``architectures``), timm ones an ``architecture``. ``model_type`` wins: transformers'
    ``TimmWrapperForImageClassification`` wraps a timm model and its config has both (its
    weights carry transformers' names, ``timm_model.*``)."""
    if "model_type" in cfg:
        return "transformers"
    if "architecture" in cfg:
        return "timm"
    if "architectures" in cfg:
        return "transformers"
    if cfg.get("library_name") == "timm":
        return "timm"
    return None


def detect_library(folder: Path) -> Library:
    """The library of a model folder, from its config.json (:func:`config_library`)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UnsupportedModelError(f"{folder} is not a model folder (no config.json)")
    library = config_library(read_json_object(cfg_path))
    if library is None:
        raise UnsupportedModelError(f"{cfg_path} is neither a timm nor a transformers config")
    return library


def load_folder(path: str | Path, *, source: str | None = None, revision: str | None = None,
                inspected: bool = False) -> LoadedModel:
    """Load a timm or transformers image classifier saved in ``path``, in fp32 for computing.
    The weight files are inspected first (:func:`check_weight_files`) unless ``inspected``:
    the caller (a scan) has inspected every file a load opens and refused unsafe ones."""
    folder = Path(path)
    if not folder.exists():
        if "@" in str(path):  # ``user/model@`` or ``user/model@a@b``: a repo id gone wrong, not a path
            raise UnsupportedModelError(f"{path} is neither a folder nor a Hub repo id like 'user/model[@revision]'")
        raise UnsupportedModelError(f"{path} does not exist")
    if not folder.is_dir():
        raise UnsupportedModelError(f"{path} is not a folder")
    lib = detect_library(folder)
    if not inspected:
        check_weight_files(folder)
    loaded = _load_timm(folder) if lib == "timm" else _load_transformers(folder)
    loaded.source = source or str(path)
    loaded.revision = revision
    check_finite(loaded.model)
    return loaded


def folder_spec(loaded: LoadedModel, **overrides: Any) -> InputSpec:
    """``loaded``'s input description with ``overrides`` (input_size, mean, std) applied, the
    rest read again from its config and, for transformers, its image processor file."""
    proc = None
    if loaded.library == "transformers" and loaded.folder is not None and (loaded.folder / "preprocessor_config.json").is_file():
        proc = read_json_object(loaded.folder / "preprocessor_config.json")
    return input_spec(loaded.model, processor_config=proc, **overrides)


def _load_timm(folder: Path) -> LoadedModel:
    import timm

    cfg = read_json_object(folder / "config.json")
    arch = cfg.get("architecture")
    for key, kind in (("model_args", dict), ("pretrained_cfg", dict)):
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise UnsupportedModelError(f"config.json: '{key}' must be an object, got {type(cfg[key]).__name__}")
    if not isinstance(arch, str) or not arch:
        raise UnsupportedModelError(f"config.json: 'architecture' must be a timm model name, got {arch!r}")
    kwargs = dict(cfg.get("model_args") or {})
    if "num_classes" in cfg:
        kwargs.setdefault("num_classes", cfg["num_classes"])
    pcfg = dict(cfg.get("pretrained_cfg") or {})
    for key in ("label_names", "label_descriptions"):  # timm's Hub loader moves these into pretrained_cfg too
        if key in cfg:
            pcfg.setdefault(key, cfg[key])
    if "input_size" in pcfg:
        try:
            pcfg["input_size"] = list(check_input_size(pcfg["input_size"]))
        except UsageError as err:
            raise UnsupportedModelError(f"config.json: pretrained_cfg.{err}") from None
        kwargs.setdefault("in_chans", pcfg["input_size"][0])
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as err:
        raise UnsupportedModelError(f"timm cannot build '{arch}': {err}") from None
    sd = timm_state_dict(weight_file(folder))
    dtype = source_dtype(sd)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    except RuntimeError as err:
        raise UnsupportedModelError(f"weights do not match '{arch}': {_state_dict_mismatch(err)}") from None
    merged = dict(model.pretrained_cfg or {})
    merged.update(pcfg)
    model.pretrained_cfg = merged
    model.eval()
    return LoadedModel(model=model, library="timm", spec=input_spec(model), source=str(folder), dtype=dtype, folder=folder,
                       config=cfg, dtypes=other_dtypes(sd, dtype))


def _load_transformers(folder: Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else type(err).__name__)
        raise UnsupportedModelError(f"transformers cannot read the config: {why}") from None
    try:
        model, info = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise UnsupportedModelError(
                f"{folder} holds a '{config.model_type}' model, which is not an image classifier"
            ) from None
        raise UnsupportedModelError(f"transformers cannot load the model: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise UnsupportedModelError(f"transformers cannot load the model: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:  # transformers logs the mismatch report and raises a generic message
        if "ignore_mismatched_sizes" in str(err):
            raise UnsupportedModelError(
                f"the weights do not match config.json (a tensor's shape differs: check num_labels/id2label, "
                f"image_size, patch_size and the hidden sizes against {weight_file(folder).name})"
            ) from None
        raise
    # transformers fills a missing weight with a fresh random one and only logs it: a model
    # that is not the one in the files must not be repaired or scanned as if it were
    # (BatchNorm's step counter does nothing in eval mode; tensors the model does not use only get a note)
    missing = sorted(k for k in info.get("missing_keys") or [] if not str(k).endswith("num_batches_tracked"))
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("wrong shape", mismatched)) if keys]
        raise UnsupportedModelError(f"the weights do not match the config: {'; '.join(parts)}")
    if unexpected:
        log.warning("%s: %d tensors in the weights are not used by the model (%s%s)", folder.name, len(unexpected),
                    ", ".join(unexpected[:3]), " ..." if len(unexpected) > 3 else "")
    sd_path = weight_file(folder)
    dtype = _header_dtype(sd_path) if sd_path.suffix == ".safetensors" else source_dtype(read_state_dict(sd_path))
    proc_path = folder / "preprocessor_config.json"
    proc = read_json_object(proc_path) if proc_path.is_file() else None
    model.eval()
    return LoadedModel(
        model=model,
        library="transformers",
        spec=input_spec(model, processor_config=proc),
        source=str(folder),
        dtype=dtype,
        folder=folder,
        config=config.to_dict(),
    )


def _header_dtype(path: Path) -> torch.dtype:
    """Source dtype from the safetensors header alone (no tensor is read)."""
    from safetensors import safe_open

    counts: dict[torch.dtype, int] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            dt = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dt is not None:
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                counts[dt] = counts.get(dt, 0) + numel
    return max(counts, key=counts.get) if counts else torch.float32


def from_model(
    model: nn.Module,
    *,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Wrap an in-memory model (timm, transformers or plain torch) for the engine. A
    ``torch.compile``d model is worked on (and given back) as the module it compiled: the
    compiled wrapper prefixes every weight name and hides the library's own class."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        model = model._orig_mod
    params = list(model.parameters())
    if not params:
        raise UnsupportedModelError("the model has no parameters")
    if any(t.is_meta for t in [*params, *model.buffers()]):
        raise UnsupportedModelError(
            "the model's weights are on the 'meta' device (not loaded): load real weights first "
            "(e.g. load_state_dict(..., assign=True) or to_empty() and then load them)"
        )
    dtype = source_dtype({str(i): p for i, p in enumerate(params)})
    spec = input_spec(model, input_size=input_size, mean=mean, std=std, num_classes=num_classes)
    return LoadedModel(model=model, library=library_of(model), spec=spec, source=IN_MEMORY, dtype=dtype,
                       dtypes=other_dtypes(model.state_dict(), dtype))
