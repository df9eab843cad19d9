"""The repair pipeline: unlearn -> score -> prune -> fuse -> bound -> verify, composed from
the stage modules. :func:`repair` is the public entry point for models and folders."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import __version__
from .clip import ClipResult, clip_activations, copy_activations
from .errors import OtbrError, UnsupportedModelError, UsageError
from .fuse import FuseResult, dataflow_links, fuse, order_links
from .layers import Layer, classifier_names, select_layers, weight_standardised
from .load import LoadedModel, check_forward, eval_mode, folder_spec, from_model, has_inference_tensors, load_folder
from .placement import release_memory, resolve_device, resolve_precision
from .progress import Progress
from .prune import PruneResult, prune
from .ratio import RatioChoice, choose_ratio
from .score import Scores, neuron_weight_change
from .settings import RepairSettings, preset
from .unlearn import unlearn
from .verify import Verification, agreement, low_agreement_warning, predictions, synthesize_inputs, verify

log = logging.getLogger("otbr_hub")


_CLIP_CHECK_PROBES = 8
"""Synthesised probes the activation-bound rewrite is also checked on (besides 2 noise images)."""


@dataclass
class RepairReport:
    """Everything that was done, in a form that goes straight into JSON and the model card."""

    source: str
    library: str
    otbr_hub_version: str
    settings: dict[str, Any]
    input: dict[str, Any]
    device: str
    source_dtype: str
    prune_ratio: float
    ratio_reason: str
    ratio_candidates: list[dict] = field(default_factory=list)
    lam: float = 0.5
    layers_scored: int = 0
    neurons_scored: int = 0
    neurons_pruned: int = 0
    pruned_per_layer: dict[str, int] = field(default_factory=dict)
    nwc: dict[str, Any] = field(default_factory=dict)
    unlearning: dict[str, Any] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    clipping: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    revision: str | None = None
    evaluation: dict[str, Any] | None = None
    scan_before: dict[str, Any] | None = None
    scan_after: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    """What the user should check before using the model (e.g. a low agreement)."""

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


@dataclass
class RepairResult:
    """The repaired model (same class as the input) and its report."""

    model: nn.Module
    report: RepairReport
    source: LoadedModel
    url: str | None = None
    """The repo or pull request URL when ``repair(push=True)`` or ``pr=True`` published it."""

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write the repaired model as ``otbr-hub repair --output`` writes it, so that the folder
        loads with the source's own library and is ready to upload: the weights in the source
        format and dtype (timm: ``config.json`` + ``model.safetensors``; transformers:
        ``save_pretrained``), ``otbr_report.json`` and a model card (``README.md``). Returns the
        folder's absolute path. A non-empty ``out_dir`` is refused unless ``overwrite``, and so is
        the source's own folder. Plain torch modules have no config to rebuild them from:
        :class:`UnsupportedModelError` (save ``self.model.state_dict()`` yourself).

        Saving with timm's own ``timm.models.save_for_hf(result.model, out)`` loses the
        activation bounds of a repaired timm ResNet (its ReLU6s come back as ReLUs): pass
        ``model_args=result.report.clipping.get("config")`` (``{"act_layer": "relu6"}`` when
        bounds were applied), which this method does for you.
        """
        from .save import check_destination, check_savable, report_files, save_model

        check_savable(self.source)
        check_destination(out_dir, overwrite=overwrite, source=self.source.folder)
        report = self.report.to_dict()
        return save_model(self.source, self.model, out_dir, extra_files=report_files(self.source, report, out_dir),
                          overwrite=overwrite)


class _Timer:
    """Seconds per stage; tells ``progress`` (if any) when a stage starts."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.times: dict[str, float] = {}
        self.progress = progress

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                if timer.progress is not None:
                    timer.progress(name, 0, None)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


def load_any(source: Any, **spec_kw: Any) -> LoadedModel:
    """What :func:`repair` accepts as ``source`` (model, folder, Hub id, LoadedModel), loaded."""
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, nn.Module):
        return from_model(source, **spec_kw)
    if isinstance(source, (str, Path)):
        from .fetch import is_hub_source

        if not is_hub_source(str(source)):
            loaded = load_folder(source)
        else:
            from .fetch import load_source

            loaded = load_source(str(source))
        if any(v is not None for v in spec_kw.values()):  # the caller corrects what the config says
            loaded.spec = folder_spec(loaded, **spec_kw)
        return loaded
    raise UnsupportedModelError(f"cannot repair an object of type {type(source).__name__}")


def build_repaired(work: nn.Module, pruned: PruneResult, layers: list[Layer], scores: Scores, settings: RepairSettings,
                   progress: Progress | None = None, lam: float | None = None, links: list[bool] | None = None) -> FuseResult:
    """Fuse a pruned copy back into the working model with ``lam`` (default: the settings' lambda);
    ``links``: :func:`otbr_hub.fuse.dataflow_links` of the model (None: the reference chain)."""
    lam = settings.lam if lam is None else lam
    return fuse(work, pruned.model, layers, scores.nwc, pruned.pruned, lam, fuse_attached=settings.fuse_attached,
                links=links, progress=progress)


def repair(
    source: Any,
    settings: RepairSettings | None = None,
    *,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    detector: Any | None = None,
    push: bool = False,
    pr: bool = False,
    repo_id: str | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> RepairResult:
    """Remove a possible backdoor from ``source`` without data.

    ``source`` is an in-memory timm/transformers/torch classifier, a local model folder,
    or a :class:`LoadedModel`. ``input_size``, ``mean`` and ``std`` replace what the model's
    config says (for a folder or Hub model too: the repair and its report use them, the saved
    folder keeps the source's own config). The input model is never modified; the returned model is a
    new instance of the same class, in the input model's dtype (a folder or Hub model is loaded in
    float32 to compute with; :meth:`RepairResult.save` writes each tensor in its stored dtype). Keyword ``overrides`` are
    :class:`RepairSettings` fields (e.g. ``prune_ratio=0.05``, ``preset="paper"``).
    ``detector`` optionally maps a model to ``(flagged, p_value)`` and guides the automatic
    ratio choice; by default the max-margin detector from :mod:`otbr_hub.detect` is used
    when available. ``push=True`` publishes the result to ``repo_id`` (default
    ``<you>/<name>-otbr``) and ``pr=True`` opens a pull request on the Hub source, both
    through :func:`otbr_hub.push.publish` (token from ``HF_TOKEN`` or the stored login).
    ``progress(stage, done, total)`` is told when each stage starts and how far unlearning
    and fusion are (see :mod:`otbr_hub.progress`); nothing is printed here.

    Settings come either as a :class:`RepairSettings` (``settings=``, e.g. from
    :func:`otbr_hub.preset`), with keyword overrides of its fields, or as keywords alone
    (``preset=`` included). Giving both ``settings`` and ``preset=`` raises
    :class:`UsageError`: which of the two should win is ambiguous, so start from
    ``otbr_hub.preset("paper", ...)`` instead.

    The repair is seeded with ``settings.seed`` (same seed, same device: same weights) and
    puts torch's global random state back afterwards (the CPU's, and the GPU's it ran on),
    so the caller's own random stream is not reset.

    Forward hooks and pre-hooks registered on the model run during the repair (an fp32
    model already on the repair device is run in place, any other model is deep-copied with
    its hooks), and ``result.model``, a deep copy of the input, carries them too. Hooks are part of
    how ``torch.nn.utils.weight_norm``, ``spectral_norm`` and ``torch.nn.utils.prune`` compute
    the weights, so they are not taken away; observer hooks (logging, feature capture) see the
    synthetic noise and probe images: remove them before repairing, or from ``result.model``.
    """
    publish_as_pr = pr  # the name ``pr`` is reused below for the prune result
    if settings is not None and not isinstance(settings, RepairSettings):
        raise UsageError(f"settings must be a RepairSettings, got {type(settings).__name__}; pass fields as keywords "
                         "(repair(model, prune_ratio=0.05, preset='paper'))")
    if settings is None:
        settings = preset(overrides.pop("preset", "default"), **overrides)
    elif "preset" in overrides:
        raise UsageError("pass preset= or a RepairSettings, not both (otbr_hub.preset(name, **fields) makes the settings)")
    elif overrides:
        settings = preset(settings.preset, **{**settings.to_dict(), **overrides})
    settings.validate()
    for name, value in (("progress", progress), ("detector", detector)):
        if value is not None and value is not False and not callable(value):
            raise UsageError(f"{name} must be a callable or None, got {type(value).__name__}")
    if push and publish_as_pr:
        raise UsageError("push=True and pr=True are alternatives; pick one")
    if progress is False:  # accepted above as "no display", like None; the stages call it otherwise
        progress = None
    t = _Timer(progress)
    with t("load"):
        loaded = load_any(source, input_size=input_size, mean=mean, std=std)
    spec = loaded.spec
    if spec.num_classes == 1:  # 0 (a feature extractor) gets check_forward's own message
        raise UnsupportedModelError(f"the model has {spec.num_classes} output: unlearning pushes it away from random "
                                    "labels, which needs at least two classes")
    if push or publish_as_pr:  # what can fail without the repair, fails before it
        from .push import check_result_publishable

        check_result_publishable(loaded, repo_id=repo_id, pr=publish_as_pr)
    device = resolve_device(settings.device)

    # a caller inside torch.no_grad() or torch.inference_mode() must not break unlearning or the probes
    with torch.inference_mode(False), torch.enable_grad(), _seeded(settings.seed, device), _working_model(loaded.model, device) as work:
        check_forward(work, spec)
        layers = select_layers(work, settings, spec)
        with t("fuse"):  # which layers feed which: a few forward passes, counted with the fusion
            links = (dataflow_links(work, spec, layers, attached=settings.fuse_attached)
                     if settings.fuse_chain == "dataflow" else order_links(layers, heads=classifier_names(work)))
        with t("unlearn"):
            un = unlearn(work, spec, settings, device, progress=progress)
        with t("score"):
            scores = neuron_weight_change(work, un.model, layers, settings)
        losses = {"first_loss": un.first_loss, "last_loss": un.last_loss, "images_per_pass": un.images_per_pass}
        del un
        release_memory()

        lam = settings.lam

        def build(ratio: float) -> nn.Module:
            with t("prune"):
                pr = prune(work, layers, scores, ratio, silence_norm=settings.prune_norm, layer_cap=settings.layer_cap)
            with t("fuse"):
                fr = build_repaired(work, pr, layers, scores, settings, progress=progress, lam=lam, links=links)
            # the report needs which neurons were pruned, not the pruned copy: let it go before
            # the bounds make their own copy, so that no more models are alive than while fusing
            pr = dataclasses.replace(pr, model=None)
            with t("clip"):
                cr = clip_activations(fr.model, spec, settings.clip_sigma, seed=settings.seed,
                                      inputs=probe[:_CLIP_CHECK_PROBES])
            cr.model._otbr_prune, cr.model._otbr_fuse = pr, fr
            cr.model._otbr_clip = dataclasses.replace(cr, model=None)
            fr.model = None
            return cr.model

        with t("verify"):
            probe = synthesize_inputs(work, spec, settings.verify_samples, seed=settings.seed, precision=settings.precision)
            reference = predictions(work, spec, probe)  # the original's answers, reused for every candidate
        scan_before = scan_after = None
        det_fn = None
        if settings.prune_ratio == "auto":
            plan = _scan_original(detector, work, spec, settings, t)
            scan_before, det_fn = plan.scan, plan.walk_detector
            if plan.light:
                lam = settings.clean_lambda
            with t("choose_ratio"):
                choice, fused_model = choose_ratio(
                    settings.grid(),
                    build,
                    lambda m: agreement(work, m, spec, probe, reference),
                    settings.min_agreement,
                    settings.fallback_ratio,
                    detector=det_fn,
                    original_flagged=det_fn is not None,
                    unflagged_reason=plan.reason,
                )
        else:
            fused_model = build(float(settings.prune_ratio))
            choice = RatioChoice(float(settings.prune_ratio), "given explicitly")
        pr: PruneResult = fused_model._otbr_prune
        fr: FuseResult = fused_model._otbr_fuse
        cr: ClipResult = fused_model._otbr_clip
        del fused_model._otbr_prune, fused_model._otbr_fuse, fused_model._otbr_clip

        if det_fn is not None:
            with t("detect"):
                det_fn(fused_model)
            scan_after = _last_scan(det_fn)

        with t("verify"):
            check: Verification = verify(work, fused_model, spec, inputs=probe, reference=reference)
        if not check.ok:
            raise OtbrError(f"the repaired model failed verification: {'; '.join(check.problems)}")

    # after the working model's train/eval flags are back (the copy takes them), but outside
    # inference mode: a caller under torch.inference_mode() gets ordinary, trainable tensors
    with torch.inference_mode(False):
        out = _same_kind(loaded.model, fused_model, loaded.dtype)
    report = RepairReport(
        source=loaded.source,
        revision=loaded.revision,
        library=loaded.library,
        otbr_hub_version=__version__,
        settings=settings.to_dict(),
        input=spec.to_dict(),
        device=str(device),
        source_dtype=str(loaded.dtype).replace("torch.", ""),
        prune_ratio=choice.ratio,
        ratio_reason=choice.reason,
        ratio_candidates=[c.to_dict() for c in choice.candidates],
        lam=lam,
        layers_scored=len(layers),
        neurons_scored=scores.total,
        neurons_pruned=pr.k,
        pruned_per_layer=pr.per_layer_counts(),
        nwc=scores.summary(),
        unlearning={"steps": settings.unlearn_steps, "batch": settings.unlearn_batch, "lr": settings.unlearn_lr,
                    "momentum": settings.unlearn_momentum, "normalized_noise": settings.normalize_noise,
                    "precision": resolve_precision(settings.precision, device, spec), **losses},
        fusion={"solver": "ot.emd (exact)", "chain": settings.fuse_chain, "first_layer": fr.first_layer,
                "fused_layers": len(fr.fused_layers), "ot_mapped_layers": len(fr.mapped_layers),
                "input_aligned_layers": len(fr.aligned_layers), "lambda": lam},
        clipping=cr.to_dict(),
        verification=check.to_dict(),
        timings={k: round(v, 3) for k, v in t.times.items()},
        scan_before=scan_before,
        scan_after=scan_after,
        warnings=[w for w in (low_agreement_warning(check.agreement), _no_fusion_warning(lam, pr.k, cr),
                              _standardised_warning(layers, pr.pruned, fr.mapped_layers, lam)) if w],
    )
    for warning in report.warnings:
        log.warning("warning: %s: %s", loaded.source, warning)
    result = RepairResult(model=out, report=report, source=loaded)
    if push or publish_as_pr:
        from .push import publish

        result.url = publish(result, report.to_dict(), repo_id=repo_id, pr=publish_as_pr)
    return result


def _standardised_warning(layers: list[Layer], pruned: dict[str, list[int]], mapped: list[str], lam: float) -> str | None:
    """Pruned neurons the fusion gives back in full: in a filter-standardising convolution that
    the fusion keeps in order, ``(1 - lambda) * w`` computes the same output as ``w``."""
    if lam >= 1:
        return None
    kept = sum(len(pruned.get(l.name) or []) for l in layers if l.name not in mapped and weight_standardised(l.module))
    if not kept:
        return None
    return (f"{kept} pruned neurons are in convolutions that standardise their filters (StdConv2d, as in BiT and NFNet) "
            "and keep their order in the fusion, where scaling a filter does not change its output: the fusion restores "
            "them in full (--lambda 1 removes them)")


def _no_fusion_warning(lam: float, pruned: int, clip: ClipResult) -> str | None:
    """Lambda 0 gives the pruned model no weight: the neurons counted as pruned change nothing."""
    if lam > 0 or not pruned:
        return None
    rest = ("only the activation bounds changed the model" if clip.applied
            else "the repaired model is the original, unchanged")
    return f"lambda 0 gives the pruned model no weight in the fusion, so the {pruned} pruned neurons change nothing: {rest}"


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNG seeded for the block (train-mode unlearning draws dropout from it),
    the caller's state back afterwards: a library call must not reset the caller's stream.

    Only the CPU generator and that of the GPU in use are seeded and restored: nothing else
    draws from the others, and ``torch.manual_seed`` would reseed every GPU (or, before CUDA
    starts, queue a seed it applies whenever CUDA starts later), which could not be put back."""
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"):  # reads the GPU's state first, which starts CUDA
        torch.default_generator.manual_seed(seed)
        for index in gpus:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _working_model(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The fp32 model on ``device`` that every stage reads (none writes to it: unlearning,
    pruning and fusion work on their own copies). A model that is already fp32 on that
    device is used as it is, saving one copy of the weights (100 MB for resnet50); only its
    train/eval flags change, and they are put back on the way out, error or not."""
    params = list(model.parameters())
    if not params or any(p.dtype != torch.float32 or p.device != device for p in params) or has_inference_tensors(model):
        yield copy.deepcopy(model).float().to(device).eval()
        return
    with eval_mode(model):
        yield model


@dataclass
class _Plan:
    """What the scan of the original says about how to repair it (``--prune-ratio auto``)."""

    walk_detector: Any | None
    """``model -> (flagged, p)`` to walk the ratio grid with; None: no walk (the fallback ratio)."""
    light: bool
    """Nothing flagged the original: fuse with ``clean_lambda`` instead of ``lam``."""
    reason: str | None
    """Why the fallback ratio is used, for the report (None: the walk explains itself)."""
    scan: dict[str, Any] | None
    """The scan of the original, as it goes into the report."""


def _scan_original(detector: Any, work: nn.Module, spec: Any, settings: RepairSettings, t: _Timer) -> _Plan:
    """Scan the original and decide how strongly to repair it.

    * The max-margin statistic flags it: walk the ratio grid until it no longer does (it can
      tell when the trigger stops working, so the ratio follows the model).
    * Only the weight evidence flags it (a label shift towards one class): full strength at the
      fallback ratio. The evidence reads the classifier and BatchNorm moments, which repair
      leaves alone, so it cannot say when the backdoor is gone (measured on
      resnet-badnets-t6-s1-quick: p 2e-4 at every ratio; benchmarks/DETECT_NOTES.md).
    * Nothing flags it: the fallback ratio fused with ``clean_lambda``. At lambda 0.5 clean zoo
      models lost 1-16 accuracy points, at 0.1 at most 0.8 (benchmarks/NOTES.md, 7.1 and 8);
      the backdoors the scan misses were not removed by full strength either.
    * ``detector=False``: no scan, full strength at the fallback ratio.
    A custom ``detector`` (``model -> (flagged, p)``) plays the margins' part.
    """
    if detector is False:
        return _Plan(None, False, None, None)
    if detector is None:
        try:
            from .detect import DetectSettings, detect
            from .scan import MIN_CLASSES
        except ImportError:
            return _Plan(None, False, None, None)
        if spec.num_classes < MIN_CLASSES:  # the scan has no answer here (it skips such models)
            why = (f"with {spec.num_classes} classes the data-free scan cannot test for a backdoor (it needs "
                   f"{MIN_CLASSES}), so the default ratio {settings.fallback_ratio:g} was used at full strength "
                   f"(lambda {settings.lam:g})")
            return _Plan(None, False, why, None)
        full = DetectSettings(seed=settings.seed, precision=settings.precision)
        with t("detect"):
            first = detect(work, spec, full, progress=t.progress)
        release_memory()  # the margin search's activations: RSS would otherwise stay there while fusing
        scan = first.to_dict()
        margins_p = first.p_first if first.p_first is not None else first.p_value
        # the margins flag the model as the scan counts them: at their whole level for 'backdoored',
        # else at half of it when the weight evidence shares the 'suspicious' level (Bonferroni)
        shared = bool((first.weight_evidence or {}).get("applicable"))
        level = full.alpha_suspicious / 2 if shared else full.alpha_suspicious
        if first.verdict != "clean" and (margins_p < full.alpha_backdoored or margins_p < level):
            margins_only = dataclasses.replace(full, weight_evidence=False)

            def walk(m: nn.Module) -> tuple[bool, float]:
                d = detect(m, spec, margins_only, progress=t.progress)
                walk.last = d.to_dict()  # type: ignore[attr-defined]
                return d.verdict != "clean", float(d.p_value)

            return _Plan(walk, False, None, scan)
        if first.verdict != "clean":
            why = (f"the scan flags class {first.suspected_target} through the weight evidence only (p={first.p_value:.3g}), "
                   f"which cannot tell when a backdoor is gone, so the default ratio {settings.fallback_ratio:g} was used at "
                   f"full strength (lambda {settings.lam:g})")
            return _Plan(None, False, why, scan)
        why = (f"the scan found no backdoor evidence (p={first.p_value:.3g}), so the default ratio {settings.fallback_ratio:g} "
               f"was fused lightly (lambda {settings.clean_lambda:g}) to keep a clean model's accuracy; the scan misses some "
               f"backdoors: give --prune-ratio {settings.fallback_ratio:g} for a full-strength repair")
        return _Plan(None, True, why, scan)
    detector = _checked_detector(detector)
    with t("detect"):
        flagged, p = detector(work)
    release_memory()
    if flagged:
        return _Plan(detector, False, None, _last_scan(detector))
    why = (f"the detector did not flag the model (p={p:.3g}), so the default ratio {settings.fallback_ratio:g} was fused "
           f"lightly (lambda {settings.clean_lambda:g})")
    return _Plan(None, True, why, _last_scan(detector))


def _checked_detector(detector: Any) -> Any:
    """A caller's ``detector`` whose answers are checked: ``(flagged, p)`` with p in [0, 1],
    or a UsageError that says so (instead of a failed unpacking deep in the ratio walk)."""

    def call(model: nn.Module) -> tuple[bool, float]:
        out = detector(model)
        ok = isinstance(out, (tuple, list)) and len(out) == 2
        p = out[1] if ok else None
        if not ok or isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
            raise UsageError(f"detector must return (flagged: bool, p_value: float in [0, 1]), got {out!r:.80}")
        return bool(out[0]), float(p)

    call.source = detector  # type: ignore[attr-defined]
    return call


def _last_scan(detector: Any) -> dict[str, Any] | None:
    """The detector's most recent full result, when it keeps one (the built-in one does)."""
    last = getattr(getattr(detector, "source", detector), "last", None)
    return dict(last) if isinstance(last, dict) else None


def _same_kind(original: nn.Module, repaired: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Return the repaired weights in an object of the input's class, dtype and device."""
    from .save import fitting_cast

    device = next(original.parameters()).device
    out = copy.deepcopy(original)
    target = out.state_dict()
    sd = {k: fitting_cast(k, v, v.to(device=device, dtype=target[k].dtype)) for k, v in repaired.state_dict().items()}
    out.load_state_dict(sd)
    copy_activations(repaired, out)  # ReLU6 where clip_activations bounded the channels
    return out
