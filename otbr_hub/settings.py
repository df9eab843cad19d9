"""One options model for repair, shared by the Python API and the CLI flags.

Each field carries its help text in ``metadata``; :mod:`otbr_hub.cli` turns the fields
into ``--flags`` so the two interfaces cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UsageError

Preset = Literal["default", "paper"]


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


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
        """Raise a one-line UsageError for any value the engine cannot honour."""
        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        if isinstance(self.prune_ratio, str):
            if self.prune_ratio != "auto":
                try:
                    self.prune_ratio = float(self.prune_ratio)
                except ValueError:
                    raise UsageError(f"--prune-ratio must be a number in (0, 1) or 'auto', got '{self.prune_ratio}'") from None
        if not isinstance(self.prune_ratio, str) and not (0.0 < float(self.prune_ratio) < 1.0):
            raise UsageError(f"--prune-ratio must be in (0, 1), got {self.prune_ratio}")
        if not (0.0 <= self.lam <= 1.0):
            raise UsageError(f"--lambda must be in [0, 1], got {self.lam}")
        if not (0.0 <= self.clean_lambda <= 1.0):
            raise UsageError(f"--clean-lambda must be in [0, 1], got {self.clean_lambda}")
        if self.unlearn_steps < 0 or self.unlearn_batch < 1:
            raise UsageError("--unlearn-steps must be >= 0 and --unlearn-batch >= 1")
        if self.unlearn_chunk is not None and self.unlearn_chunk < 1:
            raise UsageError(f"--unlearn-chunk must be >= 1, got {self.unlearn_chunk}")
        if not (math.isfinite(self.unlearn_lr) and self.unlearn_lr > 0):
            raise UsageError(f"--unlearn-lr must be a positive number, got {self.unlearn_lr}")
        if not (0.0 <= self.unlearn_momentum < 1.0):
            raise UsageError(f"--unlearn-momentum must be in [0, 1), got {self.unlearn_momentum}")
        if self.noise_size is not None and self.noise_size < 1:
            raise UsageError(f"--noise-size must be a positive number of pixels, got {self.noise_size}")
        if not (0.0 <= self.min_agreement <= 1.0):
            raise UsageError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise UsageError(f"{flag} is not a valid regular expression: {err}") from None
        if self.verify_samples < 1:
            raise UsageError(f"--verify-samples must be >= 1, got {self.verify_samples}")
        kinds = {k.strip() for k in self.layer_types.split(",") if k.strip()}
        if not kinds or not kinds <= {"conv", "linear"}:
            raise UsageError(f"--layer-types takes conv and/or linear, got '{self.layer_types}'")
        if not math.isfinite(self.clip_sigma) or self.clip_sigma < 0:
            raise UsageError(f"--clip-sigma must be a finite number >= 0, got {self.clip_sigma}")
        if self.layer_cap < 0:
            raise UsageError(f"--layer-cap must be >= 0, got {self.layer_cap}")
        if self.fuse_chain not in ("dataflow", "order"):
            raise UsageError(f"--fuse-chain must be 'dataflow' or 'order', got '{self.fuse_chain}'")
        if self.ranking not in ("global", "layer-normalized"):
            raise UsageError(f"--ranking must be 'global' or 'layer-normalized', got '{self.ranking}'")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"--device must be auto, cpu or cuda, got '{self.device}'")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise UsageError(f"--precision must be fp32, bf16 or auto, got '{self.precision}'")
        if not 0 < self.fallback_ratio < 1:
            raise UsageError(f"--fallback-ratio must be in (0, 1), got {self.fallback_ratio}")
        for r in self.grid():
            if not 0 < r < 1:
                raise UsageError(f"--ratio-grid values must be in (0, 1), got {r}")
        return self

    def grid(self) -> list[float]:
        try:
            return sorted(float(v) for v in self.ratio_grid.split(",") if v.strip())
        except ValueError:
            raise UsageError(f"--ratio-grid must be a comma list of numbers, got '{self.ratio_grid}'") from None

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
    """Settings of a named preset with explicit overrides applied on top."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    values["preset"] = name
    known = {f.name for f in dataclasses.fields(RepairSettings)}
    unknown = set(values) - known
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return RepairSettings(**values).validate()
