"""Measure a classifier's clean accuracy and how well a trigger still controls it.

Metrics follow OTBR.md: ACC on clean images; ASR over triggered images whose true class
is not the target (images of the target class would count as "successes" for free); RA,
the accuracy on those same triggered images against their true labels; all in percent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .errors import UsageError
from .load import InputSpec, _first_line, class_names, eval_mode, forward_logits, model_device, model_dtype
from .triggers import Trigger

Tensors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class EvalResult:
    """ACC, ASR and RA in percent; ASR and RA are None when no trigger was given."""

    acc: float
    asr: float | None
    ra: float | None
    n_clean: int
    n_triggered: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        return f"ACC {pct(self.acc)}  ASR {pct(self.asr)}  RA {pct(self.ra)}  (n={self.n_clean}, triggered={self.n_triggered})"


DECODE_CHUNK = 512
"""Dataset rows decoded at a time: an evaluation set is measured chunk by chunk, so 50,000
ImageNet images need 0.3 GB of pixels at a time instead of 30 GB at once."""


def _checked(x: torch.Tensor, y: torch.Tensor, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 4 or tuple(x.shape[1:]) != (spec.channels, spec.height, spec.width):
        raise UsageError(
            f"images have shape {tuple(x.shape[1:])}, the model expects {(spec.channels, spec.height, spec.width)}"
        )
    if x.shape[0] != y.shape[0]:
        raise UsageError(f"{x.shape[0]} images but {y.shape[0]} labels")
    return x.float(), y


def _chunks(data: Any, spec: InputSpec, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) pieces of (x, y) tensors or of a ``datasets.Dataset`` (whose labels
    :func:`check_evaluation` has checked before anything is decoded), checked against the
    model; a Dataset is decoded :data:`DECODE_CHUNK` rows at a time."""
    from .data import subset_indices, to_tensors

    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        x, y = torch.as_tensor(x), torch.as_tensor(y).long()
        if not x.is_floating_point():
            raise UsageError(f"images must be float pixels in [0, 1], got {str(x.dtype).replace('torch.', '')} "
                             "(divide 0..255 images by 255)")
        idx = subset_indices(len(y), limit)  # the same seeded subset as for a Dataset: sorted data stays fair
        if idx is not None:
            x, y = x[idx], y[idx]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise UsageError(
                f"dataset labels span {int(y.min())}..{int(y.max())} but the model has {spec.num_classes} classes"
            )
        yield _checked(x, y, spec)
        return
    idx = subset_indices(len(data), limit)
    rows = data.select(idx.tolist()) if idx is not None else data
    for start in range(0, len(rows), DECODE_CHUNK):
        yield _checked(*to_tensors(rows.select(range(start, min(start + DECODE_CHUNK, len(rows)))), spec), spec)


@torch.no_grad()
def predict(model: nn.Module, spec: InputSpec, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes for pixel-space images in [0, 1] (normalised here, as the model expects)."""
    device = model_device(model)
    dtype = model_dtype(model)
    preds = []
    for start in range(0, x.shape[0], batch_size):
        batch = spec.normalize(x[start : start + batch_size].to(device=device, dtype=torch.float32))
        logits = forward_logits(model, batch.to(dtype))
        preds.append(logits.float().argmax(dim=-1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def check_evaluation(spec: InputSpec, dataset_or_tensors: Any, trigger: Trigger | None, limit: int | None = None,
                     class_names: list[str] | None = None) -> None:
    """The checks of :func:`evaluate` that cost almost nothing: trigger target, declared
    classes (and their names, against ``class_names``, the model's own labels when it has
    real ones), the labels of the rows ``limit`` selects, that there is something to measure,
    and that the first of those images decodes. ``evaluate`` runs them first, and the CLI
    runs them before a repair, so that a dataset or trigger the model cannot take is refused
    in seconds instead of after it."""
    if trigger is not None and trigger.target >= spec.num_classes:
        raise UsageError(f"trigger target {trigger.target} is not a class of this {spec.num_classes}-class model")
    if isinstance(dataset_or_tensors, (tuple, list)):
        if len(dataset_or_tensors) == 2:
            from .data import subset_indices

            y = torch.as_tensor(dataset_or_tensors[1]).long()
            idx = subset_indices(len(y), limit)
            _check_measurable((y[idx] if idx is not None else y).tolist(), trigger)
        return
    from .data import class_ids, dataset_num_classes, find_columns, subset_indices, to_tensors

    ds = dataset_or_tensors
    declared = dataset_num_classes(ds)
    if declared is not None and declared != spec.num_classes:
        raise UsageError(f"the dataset has {declared} classes but the model has {spec.num_classes}")
    image_col, label_col = find_columns(ds)
    names = getattr(ds.features[label_col], "names", None)
    clash = _order_clash(names, class_names) if names and class_names else None
    if clash:
        name, in_data, in_model = clash
        raise UsageError(f"the dataset's classes are in another order than the model's ('{name}' is class {in_data} "
                         f"in the dataset, {in_model} in the model): class ids would be compared across labels; "
                         "map the labels to the model's ids first (ds.align_labels_with_mapping)")
    idx = subset_indices(len(ds), limit)  # the rows evaluate() will read
    rows = ds.select(idx.tolist()) if idx is not None else ds
    values = class_ids(rows[label_col], label_col)
    try:  # counted in Arrow, without decoding: a missing image must not wait until after the repair
        missing = int(rows.with_format("arrow")[image_col].null_count)
    except Exception:
        missing = 0
    if missing:
        raise UsageError(f"{missing} of the {len(rows)} evaluation images are missing (None in '{image_col}')")
    if values and (min(values) < 0 or max(values) >= spec.num_classes):
        raise UsageError(f"dataset labels span {min(values)}..{max(values)} but the model has {spec.num_classes} classes")
    _check_measurable(values, trigger)
    try:
        to_tensors(rows.select([0]), spec)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"cannot turn the dataset's '{image_col}' into images for this model "
                         f"({type(err).__name__}: {_first_line(err)})") from None


def _normal(names: list[str]) -> list[str]:
    """Names compared without case, spaces or punctuation: the Hub's Fashion-MNIST says
    'T - shirt / top' where the torchvision labels say 'T-shirt/top'."""
    return ["".join(ch for ch in str(n).lower() if ch.isalnum()) for n in names]


def _order_clash(dataset_names: list[str], model_names: list[str]) -> tuple[str, int, int] | None:
    """A class both sides name but number differently: (its model name, dataset id, model id)."""
    in_data: dict[str, int] = {}
    for i, n in enumerate(_normal(dataset_names)):
        in_data.setdefault(n, i)
    for j, n in enumerate(_normal(model_names)):
        i = in_data.get(n)
        if n and i is not None and i != j:
            return str(model_names[j]), i, j
    return None


def _check_measurable(labels: list[int], trigger: Trigger | None) -> None:
    """Some images, and some triggered ones: a rate over no images is not 0 %."""
    if not labels:
        raise UsageError("the evaluation set is empty")
    if trigger is not None and all(v == trigger.target for v in labels):
        raise UsageError(f"every evaluation image is of the trigger's target class {trigger.target}: "
                         "there is no image to measure the attack success rate on")


def evaluate(
    model: nn.Module,
    spec: InputSpec,
    dataset_or_tensors: Any,
    trigger: Trigger | None,
    batch_size: int = 256,
    limit: int | None = None,
) -> EvalResult:
    """ACC on clean images and ASR/RA on triggered non-target images.

    The model is put in eval mode for the measurement and its previous mode restored.
    """
    check_evaluation(spec, dataset_or_tensors, trigger, limit, class_names=class_names(model))
    n = correct = n_bd = hits = robust = 0
    with eval_mode(model):
        for x, y in _chunks(dataset_or_tensors, spec, limit):
            n += int(y.numel())
            correct += int((predict(model, spec, x, batch_size) == y).sum())
            if trigger is None:
                continue
            keep = y != trigger.target
            x_bd, y_bd = x[keep], y[keep]
            for start in range(0, x_bd.shape[0], batch_size):
                pred = predict(model, spec, trigger.apply(x_bd[start : start + batch_size]), batch_size)
                hits += int((pred == trigger.target).sum())
                robust += int((pred == y_bd[start : start + batch_size]).sum())
            n_bd += int(y_bd.numel())
    acc = 100.0 * correct / n if n else 0.0
    if trigger is None:
        return EvalResult(acc=acc, asr=None, ra=None, n_clean=n, n_triggered=0)
    asr = 100.0 * hits / n_bd if n_bd else 0.0
    ra = 100.0 * robust / n_bd if n_bd else 0.0
    return EvalResult(acc=acc, asr=asr, ra=ra, n_clean=n, n_triggered=n_bd)


def der(before: EvalResult, after: EvalResult) -> float:
    """Defense effectiveness rating in percent (50 = no change, 100 = ASR gone at no ACC cost).

    DER = (max(0, dASR) - max(0, dACC) + 100) / 2 with dASR = ASR_before - ASR_after and
    dACC = ACC_before - ACC_after, i.e. OTBR.md's formula on the percent scale.
    """
    if before.asr is None or after.asr is None:
        raise UsageError("DER needs ASR before and after, i.e. an evaluation with a trigger")
    drop_asr = max(0.0, before.asr - after.asr)
    drop_acc = max(0.0, before.acc - after.acc)
    return (drop_asr - drop_acc + 100.0) / 2.0
