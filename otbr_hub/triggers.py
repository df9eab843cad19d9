"""Backdoor triggers used to build test models and to measure attack success.

Every trigger works on pixel-space batches ``x`` of shape ``[N, C, H, W]`` with values in
``[0, 1]`` (before the model's mean/std normalisation), so the same trigger applies to any
architecture and input size. Triggers are deterministic: any randomness (a blend pattern,
a warping field) comes from a generator seeded with the trigger's ``seed`` parameter, so
the trigger that poisoned a model can be rebuilt exactly from its spec string or dict.

Spec strings look like ``"badnets:target=3,size=4,pos=tl"``; see :func:`parse_trigger`.

Known triggers (parameter defaults in brackets):

``badnets``  A solid or checkerboard square stamped in a corner (Gu et al., 2017).
             size [3] side in pixels; pos [br] one of tl/tr/bl/br/center; margin [1] pixels
             from the edge; value [1.0] pixel value of the patch; pattern [solid] or checker.
``blended``  A fixed uniform-noise image mixed in: ``(1 - alpha) x + alpha p`` (Chen et al.,
             2017). alpha [0.2]; seed [0].
``wanet``    A smooth, nearly invisible warp of the image (Nguyen & Tran, 2021). k [4] size of
             the random control grid; s [1.0] warp strength (the paper uses 0.5 with long
             training; 1.0 is learnt within a few epochs); seed [0]. Its "noise mode"
             (:meth:`Trigger.apply_noise`) adds per-image random jitter to the warp; training
             on such images with their true labels forces the model to learn the exact warp.
``sig``      A horizontal sinusoid added to every row (Barni et al., 2019). delta [0.16]
             amplitude (in [0, 1] pixel units, about 40/255 as in BackdoorBench; 20/255 gave
             only ~55 % ASR in few-epoch training); f [6] periods across the width.
             A clean-label attack: training only stamps images that already belong to the
             target class and keeps their labels.
``lowfreq``  A smooth additive colour/brightness field built from a seeded k x k grid
             upsampled bicubically, i.e. a trigger living only in low spatial frequencies.
             eps [0.1] peak amplitude; k [3]; seed [0].
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .errors import UsageError

if TYPE_CHECKING:  # torch is imported where a trigger is applied, so the CLI's help and argument checks start fast
    import torch

Params = dict[str, Any]


@dataclass(frozen=True)
class TriggerKind:
    """The definition of one trigger family: defaults, checks and the pixel operation."""

    name: str
    summary: str
    defaults: Params
    apply: Callable[[torch.Tensor, Params], torch.Tensor]
    clean_label: bool = False
    check: Callable[[Params], None] | None = None


# --------------------------------------------------------------------------- helpers


def _generator(seed: int) -> torch.Generator:
    import torch
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


# --------------------------------------------------------------------------- badnets

_CORNERS = ("tl", "tr", "bl", "br", "center")


def _badnets_box(h: int, w: int, p: Params) -> tuple[int, int, int]:
    size, margin = int(p["size"]), int(p["margin"])
    size = min(size, h, w)
    pos = p["pos"]
    top = margin if pos in ("tl", "tr") else h - margin - size
    left = margin if pos in ("tl", "bl") else w - margin - size
    if pos == "center":
        top, left = (h - size) // 2, (w - size) // 2
    top = max(0, min(top, h - size))
    left = max(0, min(left, w - size))
    return top, left, size


def _badnets(x: torch.Tensor, p: Params) -> torch.Tensor:
    import torch
    out = x.clone()
    top, left, size = _badnets_box(x.shape[-2], x.shape[-1], p)
    patch = torch.full((size, size), float(p["value"]), dtype=x.dtype, device=x.device)
    if p["pattern"] == "checker":
        ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        on = ((ii + jj) % 2 == 0).to(x.device)
        patch = torch.where(on, patch, torch.zeros_like(patch))
    out[..., top : top + size, left : left + size] = patch
    return out


def _badnets_check(p: Params) -> None:
    _require(int(p["size"]) >= 1, "badnets: size must be >= 1")
    _require(int(p["margin"]) >= 0, "badnets: margin must be >= 0")
    _require(p["pos"] in _CORNERS, f"badnets: pos must be one of {', '.join(_CORNERS)}")
    _require(p["pattern"] in ("solid", "checker"), "badnets: pattern must be solid or checker")
    _require(0.0 <= float(p["value"]) <= 1.0, "badnets: value must be in [0, 1]")


# --------------------------------------------------------------------------- blended


def _blend_pattern(c: int, h: int, w: int, seed: int) -> torch.Tensor:
    import torch
    return torch.rand((c, h, w), generator=_generator(seed))


def _blended(x: torch.Tensor, p: Params) -> torch.Tensor:
    pattern = _blend_pattern(x.shape[-3], x.shape[-2], x.shape[-1], p["seed"]).to(x)
    alpha = float(p["alpha"])
    return (1.0 - alpha) * x + alpha * pattern


def _blended_check(p: Params) -> None:
    _require(0.0 < float(p["alpha"]) <= 1.0, "blended: alpha must be in (0, 1]")


# --------------------------------------------------------------------------- wanet


def _wanet_grid(h: int, w: int, p: Params) -> torch.Tensor:
    """The fixed sampling grid [1, H, W, 2] in grid_sample coordinates."""
    import torch
    import torch.nn.functional as F
    k = int(p["k"])
    ins = torch.rand((1, 2, k, k), generator=_generator(p["seed"])) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys = torch.linspace(-1, 1, h)
    xs = torch.linspace(-1, 1, w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((gx, gy), dim=-1)[None]
    # Offsets are in units of the image size, as in the WaNet reference (s / H).
    grid = identity + float(p["s"]) * noise / torch.tensor([w, h], dtype=noise.dtype)
    return grid.clamp(-1, 1)


def _warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F
    grid = grid.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)


def _wanet(x: torch.Tensor, p: Params) -> torch.Tensor:
    return _warp(x, _wanet_grid(x.shape[-2], x.shape[-1], p))


def _wanet_check(p: Params) -> None:
    _require(int(p["k"]) >= 2, "wanet: k must be >= 2")
    _require(float(p["s"]) > 0, "wanet: s must be > 0")


# --------------------------------------------------------------------------- sig


def _sig(x: torch.Tensor, p: Params) -> torch.Tensor:
    import torch
    w = x.shape[-1]
    cols = torch.arange(w, dtype=x.dtype, device=x.device)
    signal = float(p["delta"]) * torch.sin(2 * math.pi * cols * float(p["f"]) / w)
    return (x + signal).clamp(0, 1)


def _sig_check(p: Params) -> None:
    _require(0.0 < float(p["delta"]) <= 1.0, "sig: delta must be in (0, 1]")
    _require(float(p["f"]) > 0, "sig: f must be > 0")


# --------------------------------------------------------------------------- lowfreq


def _lowfreq_field(c: int, h: int, w: int, p: Params) -> torch.Tensor:
    import torch
    import torch.nn.functional as F
    k = int(p["k"])
    coarse = torch.rand((1, c, k, k), generator=_generator(p["seed"])) * 2 - 1
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]
    return float(p["eps"]) * smooth / smooth.abs().max().clamp_min(1e-8)


def _lowfreq(x: torch.Tensor, p: Params) -> torch.Tensor:
    offset = _lowfreq_field(x.shape[-3], x.shape[-2], x.shape[-1], p).to(x)
    return (x + offset).clamp(0, 1)


def _lowfreq_check(p: Params) -> None:
    _require(0.0 < float(p["eps"]) <= 1.0, "lowfreq: eps must be in (0, 1]")
    _require(int(p["k"]) >= 2, "lowfreq: k must be >= 2")


TRIGGERS: dict[str, TriggerKind] = {
    k.name: k
    for k in (
        TriggerKind(
            "badnets",
            "square patch in a corner",
            {"size": 3, "pos": "br", "margin": 1, "value": 1.0, "pattern": "solid"},
            _badnets,
            check=_badnets_check,
        ),
        TriggerKind("blended", "seeded noise image blended in", {"alpha": 0.2, "seed": 0}, _blended, check=_blended_check),
        TriggerKind("wanet", "smooth image warp", {"k": 4, "s": 1.0, "seed": 0}, _wanet, check=_wanet_check),
        TriggerKind(
            "sig", "horizontal sinusoid (clean-label)", {"delta": 0.16, "f": 6.0}, _sig, clean_label=True, check=_sig_check
        ),
        TriggerKind(
            "lowfreq", "smooth low-frequency colour field", {"eps": 0.1, "k": 3, "seed": 0}, _lowfreq, check=_lowfreq_check
        ),
    )
}


def _known_params(kind: TriggerKind) -> str:
    return ", ".join(["target", *kind.defaults])


def _coerce(kind: TriggerKind, key: str, value: Any) -> Any:
    """Convert a (possibly string) value to the type of the parameter's default."""
    default = kind.defaults[key]
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            as_int = int(value) if isinstance(value, numbers.Integral) or (isinstance(value, str) and value.strip().lstrip("+-").isdigit()) else None
            if as_int is None:
                as_float = float(value)
                if as_float != int(as_float):
                    raise ValueError
                as_int = int(as_float)
            if key == "seed" and not 0 <= as_int < 2**63:  # what torch's generators take
                raise UsageError(f"{kind.name}: seed must be in [0, 2**63), got {as_int}")
            return as_int
        if isinstance(default, float):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
    except UsageError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{kind.name}: {key} must be a finite {type(default).__name__}, got '{value}'") from None
    return str(value)


@dataclass(frozen=True)
class Trigger:
    """A concrete trigger: its family, the attacker's target class and all parameters."""

    name: str
    target: int = 0
    params: Params = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = TRIGGERS.get(self.name)
        if kind is None:
            raise UsageError(f"unknown trigger '{self.name}'; known: {', '.join(TRIGGERS)}")
        unknown = sorted(set(self.params) - set(kind.defaults))
        if unknown:
            raise UsageError(f"{self.name}: unknown parameter '{unknown[0]}'; known: {_known_params(kind)}")
        if int(self.target) < 0:
            raise UsageError("trigger target must be a class index >= 0")
        full = {key: _coerce(kind, key, self.params.get(key, default)) for key, default in kind.defaults.items()}
        if kind.check is not None:
            kind.check(full)
        object.__setattr__(self, "target", int(self.target))
        object.__setattr__(self, "params", full)

    @property
    def kind(self) -> TriggerKind:
        return TRIGGERS[self.name]

    @property
    def clean_label(self) -> bool:
        """True when training stamps only target-class images and keeps their labels."""
        return self.kind.clean_label

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on a pixel-space batch [N, C, H, W] in [0, 1]; returns a new tensor."""
        if x.dim() != 4:
            raise UsageError(f"triggers need a [N, C, H, W] batch, got shape {tuple(x.shape)}")
        return self.kind.apply(x, self.params)

    def apply_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """WaNet's noise mode: the trigger warp plus per-image random jitter.

        At training time these images keep their true labels, which teaches the model to
        react only to the exact warp rather than to any warp.
        """
        import torch
        if self.name != "wanet":
            raise UsageError("noise mode exists only for the wanet trigger")
        n, _, h, w = x.shape
        grid = _wanet_grid(h, w, self.params).expand(n, -1, -1, -1)
        jitter = torch.rand((n, h, w, 2), generator=generator) * 2 - 1
        grid = (grid + jitter / torch.tensor([w, h], dtype=grid.dtype)).clamp(-1, 1)
        return _warp(x, grid)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trigger:
        try:
            target = data.get("target", 0)
            if isinstance(target, bool) or not isinstance(target, int) and not (isinstance(target, str) and target.strip().lstrip("-").isdigit()):
                raise ValueError(f"target must be an integer class id, got {target!r}")
            return cls(str(data["name"]), int(target), dict(data.get("params") or {}))
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"not a trigger description: {err}") from None

    def spec(self) -> str:
        """The spec string that :func:`parse_trigger` turns back into this trigger."""
        parts = [f"target={self.target}"] + [f"{k}={v}" for k, v in self.params.items()]
        return f"{self.name}:{','.join(parts)}"

    def __str__(self) -> str:
        return self.spec()


def parse_trigger(spec: str | dict[str, Any] | Trigger) -> Trigger:
    """Parse ``"name"`` or ``"name:key=value,key=value"``; ``target`` defaults to 0.

    A dict as written by :meth:`Trigger.to_dict` (e.g. from a zoo ``trigger.json``) and a
    ready :class:`Trigger` are accepted too, so callers need not care where a spec came from.
    """
    if isinstance(spec, Trigger):
        return spec
    if isinstance(spec, dict):
        return Trigger.from_dict(spec)
    if not isinstance(spec, str):
        raise UsageError(f"a trigger is given as a string like 'badnets:target=3', not {type(spec).__name__}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in TRIGGERS:
        raise UsageError(f"unknown trigger '{name}'; known: {', '.join(TRIGGERS)}")
    kind = TRIGGERS[name]
    params: Params = {}
    target = 0
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key in seen:
            raise UsageError(f"{name}: {key} is given twice")
        seen.add(key)
        if not eq:
            raise UsageError(f"{name}: expected key=value, got '{item}'; known: {_known_params(kind)}")
        if key == "target":
            try:
                target = int(value)
            except ValueError:
                raise UsageError(f"{name}: target must be an integer, got '{value}'") from None
        elif key in kind.defaults:
            params[key] = value.strip()
        else:
            raise UsageError(f"{name}: unknown parameter '{key}'; known: {_known_params(kind)}")
    return Trigger(name, target, params)


def describe_triggers() -> str:
    """One line per trigger with its defaults, for --help texts and error messages."""
    lines = []
    for kind in TRIGGERS.values():
        defaults = ", ".join(f"{k}={v}" for k, v in kind.defaults.items())
        lines.append(f"{kind.name}: {kind.summary} ({defaults})")
    return "\n".join(lines)
