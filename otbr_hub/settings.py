"""One options model for repair, shared by the Python API and the CLI flags.

Each field carries its help text in ``metadata``; :mod:`otbr_hub.cli` turns the fields
into ``--flags`` so the two interfaces cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UsageError

Preset = Literal["default", "paper"]


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def flag_of(name: str) -> str:
    """The CLI flag of a RepairSettings field (``lam`` -> ``--lambda``), as :mod:`otbr_hub.cli` makes it."""
    meta = {f.name: f.metadata for f in dataclasses.fields(RepairSettings)}.get(name, {})
    return "--" + meta.get("flag", name).replace("_", "-")


def _bad(name: str, problem: str) -> UsageError:
    """One message for both audiences: the Python field and its CLI flag, e.g.
    ``lam (--lambda) must be in [0, 1], got 2``."""
    return UsageError(f"{name} ({flag_of(name)}) {problem}")


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(value: Any, label: str, *, auto: bool = True, none: str | None = None) -> None:
    """``auto`` (when allowed), ``cpu``, ``cuda`` or ``cuda:N`` (and None where ``none`` says
    what it means): checked up front, because ``torch.device("cuda:abc")`` would only fail
    once the work has started."""
    if value is None and none is not None:
        return
    if isinstance(value, str) and _DEVICE.fullmatch(value) and (auto or value != "auto"):
        return
    choices = (f"None ({none}), " if none else "") + ("auto, " if auto else "") + "cpu, cuda or cuda:N"
    shown = f"'{value}'" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
    raise UsageError(f"{label} must be {choices}, got {shown}")


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string", "None": "None"}
_KIND_ORDER = ["int", "float", "bool", "str", "None"]
_WANTED = {"prune_ratio": "a number in (0, 1) or 'auto'"}


@dataclass
class RepairSettings:
    """Everything that changes what ``repair`` does. Start from :func:`preset`."""

    preset: str = _opt("default", "named starting point: 'default' or 'paper' (the reference OTBR code)")
    prune_ratio: float | str = _opt(
        "auto", "fraction of scored neurons to prune, in (0, 1), or 'auto' to choose it without data"
    )
    lam: float = _opt(0.5, "fusion weight lambda of the OT-aligned pruned model, in [0, 1]", flag="lambda")
    seed: int = _opt(0, "random seed for noise, labels and detection")
    # random unlearning
    unlearn_steps: int = _opt(20, "gradient-ascent steps on random noise")
    unlearn_batch: int = _opt(128, "noise images per unlearning step (the paper, and --preset paper: 256; "
                                   "128 ranks neurons and repairs as well, at half the cost: benchmarks/SPEED_NOTES.md)")
    unlearn_lr: float = _opt(1e-4, "SGD learning rate for unlearning")
    unlearn_momentum: float = _opt(0.9, "SGD momentum for unlearning")
    normalize_noise: bool = _opt(True, "normalise the [0,1] noise with the model's mean/std before the forward pass")
    noise_size: int | None = _opt(None, "side of the noise images (default: the model's own input size)")
    label_off_by_one: bool = _opt(False, "draw random labels from 0..C-2 like the reference code")
    unlearn_train_mode: bool = _opt(True, "run unlearning with the model in train mode (BatchNorm uses batch statistics)")
    unlearn_chunk: int | None = _opt(
        None, "most noise images per forward/backward pass; a step's gradients are summed over its slices "
        "(default: as many as fit in the activation budget: the whole batch for small models, a few images for resnet50 at 224 px on a CPU)"
    )
    # which neurons count
    layer_types: str = _opt("conv,linear", "comma list of layer kinds to score: conv, linear")
    skip_shortcuts: bool = _opt(True, "leave shortcut/downsample projections alone")
    skip_stem: bool = _opt(True, "leave the first layer (stem conv or patch embedding) alone: its few filters feed every feature")
    include_classifier: bool = _opt(False, "also score the final classifier's output rows")
    include: str | None = _opt(None, "regex; only layers whose name matches are scored")
    exclude: str | None = _opt(None, "regex; layers whose name matches are never scored")
    ranking: str = _opt("global", "'global' (raw NWC, as in the paper) or 'layer-normalized' (NWC per weight, z-scored per layer)")
    # pruning and fusion
    prune_norm: bool = _opt(True, "also silence the BatchNorm channel that follows a pruned conv filter")
    layer_cap: float = _opt(
        2.0, "no layer loses more than this multiple of the pruning ratio of its neurons, and at least one may always go "
        "(0: no cap, as in the paper); "
        "the global NWC ranking otherwise took 12 of 16 neurons of one ResNet layer and 14 of 64 of a ViT's first value projection "
        "at ratio 0.05 (benchmarks/NOTES.md section 10)"
    )
    fuse_attached: bool = _opt(True, "carry biases and following BatchNorm parameters through the OT map with their neuron")
    fuse_chain: str = _opt(
        "dataflow", "which layers go through their OT plan: 'dataflow' (only where re-ordering a layer's neurons with "
        "the next layer's inputs leaves the model unchanged, tested on the model; residual writers, layers before a "
        "LayerNorm and attention keep their channel order) or 'order' (the reference: every layer, plans chained in "
        "parameter order across residual sums)"
    )
    clip_sigma: float = _opt(
        3.0, "after fusion, bound every BatchNorm -> ReLU channel at beta + this many |gamma| (its training-time mean "
        "plus that many spreads), stored in the weights as ReLU6 (timm ResNets; transformers' ResNet: the stem only; "
        "other models are left as they are); "
        "0: off, as in the paper. Cut most of the patch backdoors the fusion left on the benchmark ResNets for about a point "
        "of accuracy (benchmarks/NOTES.md section 11)"
    )
    # auto ratio
    ratio_grid: str = _opt(
        "0.01,0.02,0.03,0.05,0.08,0.1,0.15", "candidate ratios tried by --prune-ratio auto when the detector flags the model"
    )
    fallback_ratio: float = _opt(0.05, "auto: ratio used when the max-margin detector does not flag the model")
    clean_lambda: float = _opt(
        0.1, "auto: fusion weight used when the scan of the original finds no backdoor evidence, so that a clean "
        "model keeps its accuracy (lambda 0.5 costs clean models 1-16 points, 0.1 at most 0.8: benchmarks/NOTES.md); "
        "--lambda applies when the scan flags the model, and always with a fixed --prune-ratio")
    min_agreement: float = _opt(0.5, "auto: guard; least top-1 agreement with the original on synthesised inputs")
    verify_samples: int = _opt(256, "synthesised inputs used to measure agreement with the original")
    device: str = _opt("auto", "'auto' (GPU when Accelerate sees one), 'cpu' or 'cuda'")
    precision: str = _opt(
        "auto", "arithmetic of the gradient passes (unlearning, probes, margin search): 'fp32', 'bf16' "
        "(autocast; weights, fusion and measurements stay float32/float64) or 'auto' (bf16 where the device runs "
        "it natively and inputs are at least 96x96: 2-3x faster at 224 px, same rankings; the paper preset: fp32)"
    )

    def validate(self) -> "RepairSettings":
        """Raise a one-line UsageError for any value the engine cannot honour. Types are checked
        first, so that a wrong type (``unlearn_steps="3"``) is named instead of raising a
        TypeError from a comparison; numbers are stored as plain ``int``/``float``."""
        self._check_types()
        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        self._check_preset_applied()
        if isinstance(self.prune_ratio, str):
            if self.prune_ratio != "auto":
                try:
                    self.prune_ratio = float(self.prune_ratio)
                except ValueError:
                    raise _bad("prune_ratio", f"must be a number in (0, 1) or 'auto', got '{self.prune_ratio}'") from None
        if not isinstance(self.prune_ratio, str) and not (0.0 < self.prune_ratio < 1.0):
            raise _bad("prune_ratio", f"must be in (0, 1), got {self.prune_ratio}")
        for name in ("lam", "clean_lambda", "min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise _bad(name, f"must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:  # what torch's generators take
            raise _bad("seed", f"must be in [0, 2**63), got {self.seed}")
        if self.unlearn_steps < 1:  # with no step every neuron's weight change is 0: nothing to rank by
            raise _bad("unlearn_steps", f"must be >= 1, got {self.unlearn_steps}")
        for name in ("unlearn_batch", "unlearn_chunk", "verify_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise _bad(name, f"must be >= 1, got {getattr(self, name)}")
        if not self.unlearn_lr > 0:
            raise _bad("unlearn_lr", f"must be a positive number, got {self.unlearn_lr}")
        if not (0.0 <= self.unlearn_momentum < 1.0):
            raise _bad("unlearn_momentum", f"must be in [0, 1), got {self.unlearn_momentum}")
        if self.noise_size is not None and self.noise_size < 1:
            raise _bad("noise_size", f"must be a positive number of pixels, got {self.noise_size}")
        for name in ("include", "exclude"):
            if getattr(self, name) is not None:
                try:
                    re.compile(getattr(self, name))
                except re.error as err:
                    raise _bad(name, f"is not a valid regular expression: {err}") from None
        kinds = {k.strip() for k in self.layer_types.split(",") if k.strip()}
        if not kinds or not kinds <= {"conv", "linear"}:
            raise _bad("layer_types", f"takes conv and/or linear, got '{self.layer_types}'")
        if self.clip_sigma < 0:
            raise _bad("clip_sigma", f"must be a finite number >= 0, got {self.clip_sigma}")
        if self.layer_cap < 0:
            raise _bad("layer_cap", f"must be >= 0, got {self.layer_cap}")
        if self.fuse_chain not in ("dataflow", "order"):
            raise _bad("fuse_chain", f"must be 'dataflow' or 'order', got '{self.fuse_chain}'")
        if self.ranking not in ("global", "layer-normalized"):
            raise _bad("ranking", f"must be 'global' or 'layer-normalized', got '{self.ranking}'")
        check_device(self.device, f"device ({flag_of('device')})")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise _bad("precision", f"must be fp32, bf16 or auto, got '{self.precision}'")
        if not 0 < self.fallback_ratio < 1:
            raise _bad("fallback_ratio", f"must be in (0, 1), got {self.fallback_ratio}")
        grid = self.grid()
        if not grid:
            raise _bad("ratio_grid", "must list at least one ratio")
        for r in grid:
            if not 0 < r < 1:
                raise _bad("ratio_grid", f"values must be in (0, 1), got {r}")
        return self

    def _check_preset_applied(self) -> None:
        """``RepairSettings(preset="paper")`` only names the preset: the fields keep the class
        defaults. When none of the preset's own values is there, it was not applied, and the
        report would name settings that did not run; :func:`preset` applies it."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        own = {k: v for k, v in PRESETS[self.preset].items() if k != "preset" and v != defaults[k]}
        if own and all(getattr(self, k) == defaults[k] for k in own):
            raise UsageError(f"RepairSettings(preset='{self.preset}') names the preset without applying it; "
                             f"use otbr_hub.preset('{self.preset}', ...) or repair(model, preset='{self.preset}')")

    def _check_types(self) -> None:
        """Each field against its annotation: ``int`` (not bool), ``float`` (an int or float,
        finite), ``bool``, ``str``, each optionally ``| None``; ``prune_ratio`` is a number or a string."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = {k.strip() for k in str(f.type).split("|")}
            if value is None and "None" in kinds:
                continue
            if "str" in kinds and isinstance(value, str):
                continue
            if "float" in kinds and isinstance(value, numbers.Real) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise _bad(f.name, f"must be a finite number, got {value}")
                if type(value) not in (int, float):  # numpy/torch scalars: plain numbers for the JSON report
                    setattr(self, f.name, float(value))
                continue
            if "int" in kinds and isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr(self, f.name, int(value))
                continue
            if "bool" in kinds and isinstance(value, bool):
                continue
            wanted = _WANTED.get(f.name) or " or ".join(_KIND_WORDS[k] for k in sorted(kinds, key=_KIND_ORDER.index))
            raise _bad(f.name, f"must be {wanted}, got {value!r} ({type(value).__name__})")

    def grid(self) -> list[float]:
        try:
            return sorted(float(v) for v in self.ratio_grid.split(",") if v.strip())
        except ValueError:
            raise _bad("ratio_grid", f"must be a comma list of numbers, got '{self.ratio_grid}'") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PAPER = dict(
    preset="paper",
    prune_ratio=0.1,
    lam=0.5,
    unlearn_steps=20,
    unlearn_batch=256,
    unlearn_lr=1e-4,
    unlearn_momentum=0.9,
    normalize_noise=False,
    noise_size=None,  # the reference only knew 32x32 inputs; use the model's own size
    label_off_by_one=True,
    unlearn_train_mode=True,
    layer_types="conv",
    skip_shortcuts=True,
    skip_stem=False,
    include_classifier=False,
    ranking="global",
    prune_norm=False,
    fuse_attached=False,
    fuse_chain="order",  # plans chained in parameter order, residual topology ignored
    layer_cap=0.0,  # the global top fraction, however it falls across layers
    clip_sigma=0.0,  # no activation bounds: the reference is unlearn, prune, fuse
    precision="fp32",  # the reference code's arithmetic
)

PRESETS: dict[str, dict[str, Any]] = {"default": {}, "paper": PAPER}


def preset(name: str = "default", **overrides: Any) -> RepairSettings:
    """Settings of a named preset with explicit overrides applied on top (None: the preset's
    value); every value is validated, types first."""
    if not isinstance(name, str) or name not in PRESETS:
        raise UsageError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    values["preset"] = name
    known = {f.name for f in dataclasses.fields(RepairSettings)}
    unknown = set(values) - known
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return RepairSettings(**values).validate()
