"""Scan models for backdoors and unsafe weight files: the engine behind ``otbr-hub scan``.

A target is a local model folder, a lone weight file, a Hub repository (``user/model`` or
``user/model@revision``) or an in-memory model. Every target goes through the same stages,
each timed in the report:

1. **inspect** - weight files are checked byte by byte (:mod:`otbr_hub.inspect`). Nothing is
   unpickled, so a hostile checkpoint cannot run code here. A target with an unsafe file
   gets the verdict ``unsafe-file`` and is never loaded.
2. **load** - only files that passed are loaded, and only through loaders that cannot run
   code (safetensors, ``torch.load(weights_only=True)``).
3. **detect** - the data-free max-margin detector (:mod:`otbr_hub.detect`).

Hub targets are checked from their metadata and ``config.json`` before any weight is
downloaded, so a text model or an oversized repo costs one small request, not gigabytes.
Targets the tool cannot handle (text models, folders without weights) are reported as
``skipped`` with the reason; failures of the scan itself (network, unreadable input) are
``error``. One bad target never stops the others.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .detect import DetectSettings, Detection, detect
from .errors import OtbrError, UnsupportedModelError, UsageError, error_text
from .fetch import HubContext, _shards, cached_snapshot, call_hub, hub_context, is_repo_id, parse_source, preflight
from .inspect import inspect_file, inspect_folder, is_weight_file
from .load import IN_MEMORY, LoadedModel, check_forward, config_library, from_model, has_inference_tensors, load_folder, read_json_object
from .report import WEIGHT_FILE_ONLY_NOTE, BackdoorEvidence, ScanReport, SourceKind, TargetReport

log = logging.getLogger("otbr_hub")

Target = str | os.PathLike[str] | nn.Module | LoadedModel
Progress = Callable[[str], None]


@dataclass
class ScanSettings:
    """How targets are scanned. Credentials are not settings: they are passed separately
    so a settings object can be printed or stored in a report without leaking them."""

    detector: DetectSettings = field(default_factory=DetectSettings)
    """Budget and thresholds of the backdoor detector."""
    max_download_bytes: int | None = 2_000_000_000
    """Hub repos whose weight files add up to more are skipped before downloading; None for no cap."""
    cache_dir: str | None = None
    """Hugging Face cache for Hub downloads; None uses the usual cache (shared with ``repair``)."""
    compute_sha256: bool = True
    """Record each weight file's SHA-256 in the report (costs one extra read of the file)."""


# --------------------------------------------------------------------------- target lists


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() or any(is_weight_file(p) for p in folder.iterdir() if p.is_file())


def _model_folders(root: Path) -> list[Path]:
    """The folder itself if it holds a model, else every model folder below it.

    This lets ``otbr-hub scan models/`` cover a repository of models. A folder with no
    model anywhere below it is returned as is, so the report says why it was skipped.
    """
    if _is_model_folder(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "config.json" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []  # a model's own subfolders belong to it
    return found or [root]


def _context(token: str | bool | None, endpoint: str | None, cache_dir: str | None = None) -> HubContext:
    """Endpoint, token and cache as :mod:`otbr_hub.fetch` resolves them; ``token=False``
    forces anonymous requests (otherwise a saved login would be used)."""
    ctx = hub_context(token or None, endpoint, cache_dir)
    return dataclasses.replace(ctx, token=False) if token is False else ctx  # type: ignore[arg-type]


def list_hub_models(
    *,
    author: str | None = None,
    search: str | None = None,
    filters: Iterable[str] = (),
    limit: int | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> list[str]:
    """Repo ids matching a Hub query (``HfApi.list_models``), private ones included when the
    token can see them. Warns when ``limit`` cut the list short."""
    tags = list(filters)
    if not (author or search or tags):
        raise UsageError("a Hub query needs --author, --search or --filter")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    ctx = _context(token, endpoint)
    api = ctx.api()
    what = " ".join(f"{k}={v}" for k, v in (("author", author), ("search", search), ("filter", ",".join(tags))) if v)
    models = call_hub(
        lambda: list(api.list_models(author=author, search=search, filter=tags or None, limit=limit)),
        ctx,
        repo_id=f"the model list ({what})",
    )
    ids = [m.id for m in models]
    if limit is not None and len(ids) == limit:
        log.warning("the Hub query returned %d models, the --limit; there may be more", limit)
    return ids


def expand_targets(
    targets: Iterable[str | os.PathLike[str]] = (),
    *,
    author: str | None = None,
    search: str | None = None,
    filters: Iterable[str] = (),
    limit: int | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> list[str]:
    """Concrete targets, in order and without duplicates: local folders holding several
    models become one target per model folder, and a Hub query becomes its repo ids."""
    out: list[str] = []
    for raw in targets:
        text = os.fspath(raw)
        if not text.strip():  # Path("") is the working directory
            raise UsageError("an empty target was given; name a folder, file or repo id")
        path = Path(text)
        out += [str(p) for p in _model_folders(path)] if path.is_dir() else [text]
    tags = list(filters)
    if author or search or tags:
        out += list_hub_models(author=author, search=search, filters=tags, limit=limit, token=token, endpoint=endpoint)
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- stages


StageHook = Callable[[str, int, int | None], None]


class _Stages:
    """Accumulates wall-clock seconds per stage for one target, and tells ``hook`` (if any)
    when a stage starts, as ``hook(stage, 0, None)``."""

    def __init__(self, hook: StageHook | None = None) -> None:
        self.times: dict[str, float] = {}
        self.hook = hook

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.hook is not None:
            self.hook(name, 0, None)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 4)


def _classifier_problem(config: dict[str, Any]) -> str | None:
    """Why a ``config.json`` does not describe an image classifier, or None if it may.

    Checked before weights are downloaded or loaded. A transformers base model
    (``ViTModel``) would load into an image-classification class with a random head, so
    the architecture must name an image-classification class, not just a vision backbone.
    """
    if config_library(config) == "timm" and "architecture" in config:
        if config.get("num_classes") == 0:
            return "a timm feature extractor (num_classes is 0), not a classifier"
        return None
    archs = config.get("architectures") or []
    if archs:
        if any("ImageClassification" in a for a in archs):
            return None
        return f"holds {', '.join(archs)}, which is not an image classifier"
    model_type = config.get("model_type")
    if model_type:
        try:
            from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        except ImportError:  # pragma: no cover - transformers is a dependency
            return None
        if model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
            return f"holds a '{model_type}' model, which is not an image classifier"
    return None


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    return read_json_object(path, "config.json") if path.is_file() else None


def _label(loaded: LoadedModel, index: int | None) -> str | None:
    """Human name of a class from the model's config, ignoring transformers' LABEL_<n> placeholders."""
    if index is None:
        return None
    cfg = loaded.config or {}
    id2label = cfg.get("id2label") or {}
    name = id2label.get(index, id2label.get(str(index))) if isinstance(id2label, dict) else None
    if name is None:
        names = cfg.get("label_names") or (cfg.get("pretrained_cfg") or {}).get("label_names")
        if isinstance(names, list) and 0 <= index < len(names):
            name = names[index]
    if name is None or str(name) == f"LABEL_{index}":
        return None
    return str(name)


def _evidence(det: Detection, loaded: LoadedModel) -> BackdoorEvidence:
    per_class = [det.statistics.get(c) for c in range(det.num_classes)]
    weights = det.weight_evidence
    statistic = "universal-trigger" if det.method == "trigger" else "max-margin"
    if weights and weights.get("applicable"):
        statistic += " + weight-evidence"
    return BackdoorEvidence(
        statistic=statistic,
        p_value=det.p_value,
        suspected_target=det.suspected_target,
        suspected_label=_label(loaded, det.suspected_target),
        per_class=per_class,  # type: ignore[arg-type]  # None for classes only screened
        thresholds=dict(det.thresholds),
        note=det.note,
        weight_evidence={
            "detector": {
                "method": det.method,
                "p_gamma": det.p_gamma,
                "p_robust": det.p_robust,
                "robust_z": det.robust_z,
                "top_class": det.top_class,
                "num_classes": det.num_classes,
                "screened": det.screened,
                "p_first": det.p_first,
                "decided_by": det.decided_by,
            },
            "weights": weights,
        },
    )


MIN_CLASSES = 4
"""Fewest classes the backdoor tests can judge: the top class against at least three others
(below that neither the margins nor the weight evidence can ever flag, so 'clean' would be
a non-answer)."""


def _detect_into(report: TargetReport, loaded: LoadedModel, settings: ScanSettings, stages: _Stages,
                 repaired: bool | None = None) -> None:
    """Backdoor tests of a loaded model into ``report``. ``repaired``: whether the source carries
    an otbr-hub repair report (default: look for ``otbr_report.json`` in the model's folder)."""
    check_forward(loaded.model, loaded.spec)  # a model that cannot run is skipped with the reason
    if loaded.spec.num_classes < MIN_CLASSES:
        raise UnsupportedModelError(
            f"only {loaded.spec.num_classes} classes: the data-free backdoor tests compare the top class with at "
            f"least 3 others, so they need at least {MIN_CLASSES} classes"
        )
    model = loaded.model
    with stages("detect"), torch.inference_mode(False):  # the margin search needs gradients on its inputs
        if has_inference_tensors(model):
            model = copy.deepcopy(model)
        det = detect(model, loaded.spec, settings.detector, progress=stages.hook)
    report.backdoor = _evidence(det, loaded)
    report.verdict = det.verdict
    if repaired is None:
        repaired = loaded.folder is not None and (loaded.folder / "otbr_report.json").is_file()
    if det.note and det.decided_by == "weights" and repaired:
        report.backdoor.note = (
            f"{det.note}. This model comes with an otbr-hub repair report (otbr_report.json): repair leaves the "
            "classifier as it was, so this evidence stays after a repair and says nothing about whether the repair worked"
        )


def _scan_folder(folder: Path, report: TargetReport, settings: ScanSettings, stages: _Stages) -> TargetReport:
    with stages("inspect"):
        report.files = inspect_folder(folder, compute_sha256=settings.compute_sha256)
    if report.unsafe_files:
        report.verdict = "unsafe-file"
        return report
    config = _read_config(folder)
    problem = _classifier_problem(config) if config is not None else None
    if problem:
        raise UnsupportedModelError(problem)
    with stages("load"):
        loaded = load_folder(folder, source=report.target, revision=report.revision, inspected=True)
    _detect_into(report, loaded, settings, stages)
    return report


def _scan_file(path: Path, report: TargetReport, settings: ScanSettings, stages: _Stages) -> TargetReport:
    """A lone weight file has no architecture to build, so only its safety is checked; a
    safe file is reported ``clean`` with no backdoor evidence, and a note says so (a bare
    'clean' would read as a passed backdoor test)."""
    with stages("inspect"):
        file_report = inspect_file(path, compute_sha256=settings.compute_sha256, display_path=path.name)
    report.files = [file_report]
    if file_report.format == "unknown":
        raise UnsupportedModelError("not a weight file (safetensors, PyTorch pickle or shard index)")
    report.verdict = "clean" if file_report.safe else "unsafe-file"
    if file_report.safe:
        report.note = WEIGHT_FILE_ONLY_NOTE
    return report


def _scan_hub(text: str, report: TargetReport, settings: ScanSettings, stages: _Stages, ctx: HubContext) -> TargetReport:
    """Same acceptance rules as ``repair`` (:func:`otbr_hub.fetch.preflight`: metadata and
    config.json only), then every top-level weight file is downloaded and inspected, not just
    the one the loader would pick: a hostile ``pytorch_model.bin`` next to a clean
    ``model.safetensors`` is still a trap for whoever loads it."""
    from huggingface_hub import snapshot_download

    ref = parse_source(text)
    report.target, report.revision = ref.repo_id, ref.revision
    if ctx.offline:  # the cache only, as repair does: every weight file of the snapshot is inspected
        with stages("resolve"):
            folder, report.target = cached_snapshot(ref, ctx)
        report.revision = folder.name
        with stages("inspect"):
            report.files = inspect_folder(folder, compute_sha256=settings.compute_sha256)
        return _load_and_detect(report, folder, report.target, settings, stages,
                                repaired=(folder / "otbr_report.json").is_file())
    with stages("resolve"):
        pre, _ = preflight(ref, ctx)
    report.target, report.revision = pre.repo_id, pre.sha  # the Hub's spelling of the id
    weights = sorted(name for name in pre.available if "/" not in name and is_weight_file(name))
    cap = settings.max_download_bytes

    def check_cap(files: list[str]) -> None:
        total = sum(pre.sizes.get(n) or 0 for n in files)  # sizes come with the preflight's file list
        if cap is not None and total > cap:
            raise UnsupportedModelError(
                f"weight files total {total / 1e9:.2f} GB, above the {cap / 1e9:.2f} GB download limit (--max-size)"
            )

    def download(names: list[str]) -> Path:
        return Path(call_hub(
            lambda: snapshot_download(pre.repo_id, revision=pre.sha, allow_patterns=names, cache_dir=ctx.cache_dir,
                                      token=ctx.token, endpoint=ctx.endpoint),
            ctx, repo_id=pre.repo_id, revision=pre.sha))

    check_cap(weights)
    names = sorted({*(n for n in pre.files if n != "README.md"), *weights})
    with stages("download"):
        folder = download(names)
        # shards an index keeps in a subfolder are what a loader opens: fetch and inspect them too
        extra = sorted({shard for name in weights if name.endswith(".index.json") and (folder / name).is_file()
                        for shard in _shards(pre.repo_id, folder / name, pre.available)} - set(weights))
        if extra:
            check_cap(weights + extra)
            folder = download(extra)
            weights = weights + extra
    with stages("inspect"):
        report.files = [
            inspect_file(folder / name, compute_sha256=settings.compute_sha256, display_path=name) for name in weights
        ]
    return _load_and_detect(report, folder, pre.repo_id, settings, stages, repaired="otbr_report.json" in pre.available)


def _load_and_detect(report: TargetReport, folder: Path, repo_id: str, settings: ScanSettings, stages: _Stages, *,
                     repaired: bool) -> TargetReport:
    """After the inspection of every file a load opens: stop at an unsafe one, else load
    (not inspecting again) and run the backdoor tests. ``report.revision`` is the snapshot's sha."""
    if report.unsafe_files:
        report.verdict = "unsafe-file"
        return report
    with stages("load"):
        loaded = load_folder(folder, source=repo_id, revision=report.revision, inspected=True)
    _detect_into(report, loaded, settings, stages, repaired=repaired)
    return report


# --------------------------------------------------------------------------- public API


def _kind_of(target: Target) -> SourceKind:
    if isinstance(target, (nn.Module, LoadedModel)):
        return "memory"
    text = os.fspath(target)
    path = Path(text)
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    return "hub" if is_repo_id(text) else "folder"


def _memory_label(target: nn.Module | LoadedModel, position: int | None = None) -> str:
    """``<in-memory ResNet #2>``: the class, and the position among a call's targets, so two
    models in one report can be told apart. A LoadedModel keeps the source it names."""
    if isinstance(target, LoadedModel):
        if target.source and target.source != IN_MEMORY:
            return target.source
        target = target.model
    where = f" #{position}" if position is not None else ""
    return f"<in-memory {type(target).__name__}{where}>"


def _looks_local(text: str) -> str | None:
    """The existing local folder that makes a missing repo-id-shaped target look like a path
    (``models/typo`` beside a ``models`` folder), or None. Revisions and ``hf-hub:`` are Hub only."""
    if "@" in text or text.startswith("hf-hub:"):
        return None
    parent = Path(text).parent
    return str(parent) if parent != Path(".") and parent.is_dir() else None


def scan_target(
    target: Target,
    *,
    settings: ScanSettings | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    on_stage: StageHook | None = None,
    position: int | None = None,
) -> TargetReport:
    """Scan one target and return its report; never raises for a problem with the target.

    ``token`` (a string, or False for anonymous) and ``endpoint`` are used for Hub targets
    only. ``input_size``/``mean``/``std`` describe the input of an in-memory model whose
    config does not (plain torch modules); they are ignored for folders and Hub repos.
    ``on_stage(stage, 0, None)`` is called as each stage (resolve, download, inspect,
    load, detect) starts, and ``on_stage("margin search", done, total)`` as the margin
    search's image passes add up, for progress displays. ``position`` (1-based, among a
    call's targets) goes into an in-memory model's label.
    """
    settings = settings or ScanSettings()
    stages = _Stages(on_stage)
    kind = _kind_of(target)
    if isinstance(target, (nn.Module, LoadedModel)):
        label = _memory_label(target, position)
    else:
        label = os.fspath(target)
    report = TargetReport(target=label, source=kind, verdict="error")
    t0 = time.perf_counter()
    try:
        if isinstance(target, LoadedModel):
            _detect_into(report, target, settings, stages)
        elif isinstance(target, nn.Module):
            with stages("load"):
                loaded = from_model(target, input_size=input_size, mean=mean, std=std)
            _detect_into(report, loaded, settings, stages)
        elif kind == "hub":
            _scan_hub(label, report, settings, stages, _context(token, endpoint, settings.cache_dir))
        elif Path(label).is_dir():
            _scan_folder(Path(label), report, settings, stages)
        elif Path(label).is_file():
            _scan_file(Path(label), report, settings, stages)
        else:
            raise OtbrError("no such file or folder, and not a Hub repo id (user/model[@revision])")
    except UnsupportedModelError as err:
        report.verdict, report.skipped = "skipped", str(err)
    except OtbrError as err:
        report.verdict, report.error = "error", str(err)
        folder = _looks_local(label) if kind == "hub" else None
        if folder is not None:  # a typo'd path must not read as a Hub outage only
            report.error = (f"no local folder or file named {label} (the folder {folder} exists), so it was tried "
                            f"as a Hub repo id: {err}")
    except Exception as err:  # one broken model must not abort a scan of many
        report.verdict, report.error = "error", error_text(err)
        log.info("scan of %s failed", label, exc_info=True)  # traceback with -v
    report.timings = {**stages.times, "total": round(time.perf_counter() - t0, 4)}
    return report


def scan(
    *targets: Target,
    author: str | None = None,
    search: str | None = None,
    filters: Iterable[str] = (),
    limit: int | None = None,
    settings: ScanSettings | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    progress: Progress | None = None,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> ScanReport:
    """Scan every target, plus the models a Hub query lists, into one :class:`ScanReport`.

    >>> report = scan("models/resnet", "user/vit@main", author="my-org")
    >>> report.summary()["verdicts"]["backdoored"]

    Paths and repo ids are expanded with :func:`expand_targets`; models are scanned as given.
    ``settings`` is a :class:`ScanSettings`, or a :class:`DetectSettings` when only the
    detector's budget changes. ``progress`` receives one line before and after each target
    (the CLI prints them).
    A failing Hub query raises :class:`HubError`; a failing target never raises.
    """
    if isinstance(settings, DetectSettings):  # the detector's settings alone: the rest default
        settings = ScanSettings(detector=settings)
    elif settings is not None and not isinstance(settings, ScanSettings):
        raise UsageError(f"settings must be a ScanSettings (or DetectSettings), got {type(settings).__name__}")
    settings = settings or ScanSettings()
    device = settings.detector.device
    if device is not None and device.startswith("cuda"):
        from .placement import resolve_device

        resolve_device(device)  # no GPU: one clear error now, not an 'unexpected' one per target
    for t in targets:
        if not isinstance(t, (nn.Module, LoadedModel, str, os.PathLike)):
            raise UsageError(f"cannot scan an object of type {type(t).__name__}: give models, paths or repo ids")
    tags = list(filters)
    # in the order given (a caller may zip its inputs with report.targets), each named target
    # once, the Hub query's models last; an in-memory model keeps its 1-based place for its label
    concrete: list[tuple[Target, int | None]] = []
    seen: set[str] = set()

    def add(found: list[str]) -> None:
        concrete.extend((name, None) for name in found if name not in seen)
        seen.update(found)

    for i, t in enumerate(targets, 1):
        if isinstance(t, (nn.Module, LoadedModel)):
            concrete.append((t, i))
        else:
            add(expand_targets([t]))
    if author or search or tags:
        add(expand_targets(author=author, search=search, filters=tags, limit=limit, token=token, endpoint=endpoint))
    query = {"author": author, "search": search, "filters": tags, "limit": limit} if author or search or tags else None
    report = ScanReport(settings=report_settings(settings, query))
    for target, position in concrete:
        shown = os.fspath(target) if isinstance(target, (str, os.PathLike)) else _memory_label(target, position)
        if progress:
            progress(f"scanning {shown}")
        result = scan_target(
            target, settings=settings, token=token, endpoint=endpoint, input_size=input_size, mean=mean, std=std,
            position=position,
        )
        report.targets.append(result)
        if progress:
            progress(f"  {describe(result)}")
    return report


def report_settings(settings: ScanSettings, query: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``settings`` block of a scan report (shared with the CLI's multi-process scan)."""
    out: dict[str, Any] = {"detector": dataclasses.asdict(settings.detector), "max_download_bytes": settings.max_download_bytes}
    if query:
        out["query"] = query
    return out


def describe(result: TargetReport) -> str:
    """One progress line for a finished target: verdict, key evidence and time."""
    seconds = result.timings.get("total", 0.0)
    if result.verdict == "skipped":
        return f"skipped: {result.skipped} ({seconds:.1f} s)"
    if result.verdict == "error":
        return f"error: {result.error} ({seconds:.1f} s)"
    if result.verdict == "unsafe-file":
        bad = ", ".join(f.path for f in result.unsafe_files)
        return f"unsafe-file: {bad} ({seconds:.1f} s)"
    extra = ""
    if result.backdoor is not None:
        p = result.backdoor.p_value
        extra = f", p-value {p:.2g}" if p is not None else ""
        if result.backdoor.suspected_target is not None:
            extra += f", suspected target {result.backdoor.suspected_target}"
    if result.note:
        extra += f"; {result.note}"
    return f"{result.verdict}{extra} ({seconds:.1f} s)"


__all__ = [
    "ScanSettings",
    "describe",
    "expand_targets",
    "list_hub_models",
    "report_settings",
    "scan",
    "scan_target",
]
