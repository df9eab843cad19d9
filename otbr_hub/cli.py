"""Command line: a thin layer over :func:`otbr_hub.repair` and :func:`otbr_hub.scan`.

Repair flags are generated from :class:`~otbr_hub.settings.RepairSettings`, so every
setting of the Python API is also a flag and the help texts are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .errors import OtbrError, UsageError, error_text
from .settings import PRESETS, RepairSettings

log = logging.getLogger("otbr_hub")

SUMMARY_FILE = "repair_summary.json"

# Flags that the main parser defines by hand (with short forms or special parsing).
_HAND_MADE = {"preset", "prune_ratio", "lam", "seed", "device"}


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RepairSettings field; defaults stay None so presets can fill them."""
    core = parser.add_argument_group("repair")
    core.add_argument("--preset", default="default", help="named starting point: 'default' or 'paper'")
    core.add_argument("--prune-ratio", default=None, help="fraction of neurons to prune in (0, 1), or 'auto' (default)")
    core.add_argument("--lambda", dest="lam", type=float, default=None,
                      help="fusion weight of the pruned model, in [0, 1] (default: 0.5, when the scan flags the model "
                           "or the ratio is given; see --clean-lambda)")
    core.add_argument("--seed", type=int, default=None, help="random seed")
    core.add_argument("--device", default=None, help="'auto' (default; GPU when Accelerate sees one), 'cpu', 'cuda' or 'cuda:N'")
    adv = parser.add_argument_group("advanced engine settings")
    for f in dataclasses.fields(RepairSettings):
        if f.name in _HAND_MADE:
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        paper = PRESETS["paper"].get(f.name, default)
        if default is not None:
            help_text += f" (default: {default}" + (f"; paper preset: {paper})" if paper != default else ")")
        if f.type in ("bool", bool):
            adv.add_argument(_flag(f), dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            adv.add_argument(_flag(f), dest=f.name, type=kind, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> RepairSettings:
    from .settings import preset

    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(RepairSettings)}
    values.pop("preset")
    return preset(args.preset, **values)


def _trigger_help() -> str:
    from .triggers import TRIGGERS

    return "; ".join(f"{name} ({', '.join(f'{k}={v}' for k, v in kind.defaults.items())})" for name, kind in TRIGGERS.items())


class _MainParser(argparse.ArgumentParser):
    """Errors the top-level parser catches (an unknown option before the command, a misspelt
    command) exit like the command's own usage errors: 4 for ``scan``, whose 2 means a scan
    error, and 2 otherwise (``repair``'s code for every error)."""

    usage_exit = 2

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _MainParser(prog="otbr-hub", description="Data-free backdoor repair and scanning for image classifiers.")
    p.add_argument("--version", action="version", version=f"otbr-hub {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("repair", help="remove a possible backdoor from a model, without data")
    r.add_argument("sources", nargs="*", metavar="source",
                   help="model folder (timm or transformers) or Hub repo id; several are repaired one after the other, "
                        "or shared out between the processes of `accelerate launch`")
    r.add_argument("--from-file", metavar="FILE", help="read more sources from FILE, one per line ('#' comments; '-' for stdin)")
    r.add_argument("-o", "--output", help="folder to write the repaired model into (required unless --push/--pr); with "
                                          f"several sources, a parent folder with one subfolder per model and {SUMMARY_FILE}")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    r.add_argument("--eval-dataset", help="measure ACC/ASR on this dataset ('fashion_mnist', a saved datasets folder, or a Hub id)")
    r.add_argument("--trigger", help="trigger spec for ASR, e.g. 'badnets:target=3', or a trigger.json file; "
                                     f"triggers and their parameters: {_trigger_help()}")
    r.add_argument("--eval-split", metavar="SPLIT",
                   help="split of --eval-dataset to measure on (default: test; a saved single Dataset has none)")
    r.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on this many test images, a seeded random subset (seed 0, the same every run; "
                        "not stratified by class)")
    hub = r.add_argument_group("publishing")
    hub.add_argument("--push", action="store_true", help="upload the repaired model to <your-namespace>/<name>-otbr (or --repo-id)")
    hub.add_argument("--pr", action="store_true", help="open a pull request with the repaired weights on the source repo instead")
    hub.add_argument("--repo-id", help="destination repo for --push")
    hub.add_argument("--private", action="store_true", help="create the --push destination as a private repo")
    hub.add_argument("--revision", help="source revision (branch, tag, commit sha or refs/pr/N); 'user/model@rev' also works "
                                        "(and is the way to pin several sources)")
    r.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    r.add_argument("-v", "--verbose", action="store_true", help="print details: stage timings, process split (and tracebacks on unexpected errors)")
    add_settings_flags(r)

    from .scan_cli import add_scan_parser

    add_scan_parser(sub)
    return p


def _fmt_eval(e: Any) -> str:
    return f"ACC {e.acc:5.1f}%  ASR {e.asr:5.1f}%  RA {e.ra:5.1f}%"


def _sources(args: argparse.Namespace) -> list[str]:
    """Positional sources plus ``--from-file``, in order, each once."""
    from .scan_cli import _read_target_file

    sources = list(args.sources)
    if any(not s.strip() for s in sources):
        raise UsageError("an empty source was given (an unset variable?); name a model folder or Hub repo id")
    listed = _read_target_file(args.from_file) if args.from_file else []
    if listed is None:  # standard input, read by the first process of a launch: its list is used
        return sources
    sources += listed
    if not sources and args.from_file:
        where = "standard input (--from-file -)" if args.from_file == "-" else f"--from-file {args.from_file}"
        raise UsageError(f"{where} lists no models (only blank lines and comments)")
    if not sources:
        raise UsageError("nothing to repair: give a model folder or Hub repo id, or --from-file")
    first: dict[str, str] = {}
    for source in sources:
        first.setdefault(_source_key(source), source)
    unique = list(first.values())
    if len(unique) < len(sources):
        log.warning("some sources were given more than once; each is repaired once")
    return unique


def _source_key(source: str) -> str:
    """What makes two spellings the same source: the real path of a local folder (``./m``,
    ``m/``, a symlink), the repo id in any letter case without timm's ``hf-hub:`` prefix."""
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError as err:  # a name longer than the filesystem allows
        raise UsageError(f"cannot use {source[:80]}{'...' if len(source) > 80 else ''} as a source: {err.strerror or err}") from None
    if exists:
        return os.path.realpath(path)
    repo, at, revision = source.removeprefix("hf-hub:").partition("@")
    return repo.lower() + at + revision  # the Hub matches repo ids in any case, not revisions


def cmd_repair(args: argparse.Namespace) -> int:
    from .distribute import launched_processes, team

    procs = None
    sources = _sources(args)
    settings = settings_from_args(args)
    if launched_processes() > 1:  # one list for every process, as the first read it (stdin)
        procs = team(settings.device)
        sources = procs.broadcast(sources if procs.is_main else None)
    if args.push and args.pr:
        raise UsageError("--push and --pr are alternatives; pick one")
    if not args.output and not (args.push or args.pr):
        raise UsageError("--output is required (or publish with --push / --pr)")
    if (args.repo_id or args.private) and not (args.push or args.pr):
        raise UsageError("--repo-id and --private apply to --push / --pr only")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise UsageError(f"--eval-limit must be at least 1, got {args.eval_limit}")
    if len(sources) > 1:
        if args.repo_id:
            raise UsageError("--repo-id names one destination; with several sources each goes to <you>/<name>-otbr")
        if args.revision:
            raise UsageError("--revision applies to one source; pin several with user/model@revision")
    procs = procs or team(settings.device)
    if procs.distributed:
        log.info("process %d of %d", procs.index + 1, procs.size)
    if len(sources) == 1:
        if not procs.is_main:  # one model: the main process does it, the others must not push it again
            return 0
        return _repair_one(args, sources[0], settings)
    return _repair_many(args, sources, settings, procs)


def _repair_one(args: argparse.Namespace, source: str, settings: RepairSettings) -> int:
    """One source: ``--output`` is the model folder and errors end the command."""
    from .progress import StageBars, bars_wanted
    from .save import check_destination, report_files, save_model

    publishing = args.push or args.pr
    if args.output:
        check_destination(args.output, overwrite=args.overwrite, source=source)
    evaluation = _prepare_eval(args)
    if args.revision:
        source = _with_revision(source, args.revision)
    if publishing:  # a missing token or a refused destination should cost seconds, not a whole repair
        from .push import check_publication

        check_publication(source, repo_id=args.repo_id, pr=args.pr, private=args.private)
    say = (lambda *a: None) if args.quiet else print
    bars = StageBars() if bars_wanted(args.quiet) else None

    stage = bars or (lambda *a: None)
    try:
        result, report_dict = _repair_and_evaluate(args, source, settings, evaluation, bars)
        report = result.report
        if args.output:
            stage("save")
            out = save_model(result.source, result.model, args.output, overwrite=args.overwrite,
                             extra_files=report_files(result.source, report_dict, args.output))
        if publishing:
            from .push import publish

            stage("publish")
            try:
                url = publish(result, report_dict, repo_id=args.repo_id, private=args.private, pr=args.pr,
                              folder=out if args.output else None)
            except OtbrError as err:
                if not args.output:
                    raise
                raise type(err)(f"{err} (the repaired model is saved in {out}: a rerun with the same --output "
                                "needs --overwrite)") from None
    finally:
        if bars is not None:
            bars.close()

    say(f"repaired {report.source} ({report.library}, {report.neurons_scored} neurons in {report.layers_scored} layers)")
    say(f"  prune ratio {report.prune_ratio:g}: {report.ratio_reason}")
    say(f"  pruned {report.neurons_pruned} neurons, fused with lambda {report.lam:g}; agreement with the original "
        f"on synthetic inputs {report.verification['agreement']:.3f}")
    clip = report.clipping or {}
    if clip.get("applied"):
        say(f"  activation bounds: {clip['channels']} BatchNorm -> ReLU channels bounded at beta + {clip['sigma']:g} |gamma| "
            "(saved as ReLU6)")
    elif clip.get("reason"):
        say(f"  activation bounds: not applied ({clip['reason']})")
    if report.evaluation:
        ev = report.evaluation
        say(f"  before: ACC {ev['before']['acc']:5.1f}%  ASR {ev['before']['asr']:5.1f}%")
        say(f"  after:  ACC {ev['after']['acc']:5.1f}%  ASR {ev['after']['asr']:5.1f}%   DER {ev['der']:.1f}")
    if args.output:
        say(f"  saved to {out} in {report.timings['total']:.1f} s")
    if publishing:
        say(f"  {'pull request' if args.pr else 'pushed to'} {url}")  # the PR may be one already open
    return 0


def _with_revision(source: str, revision: str) -> str:
    """``source@revision`` for ``--revision``, refused for a local path or a source that already pins one."""
    from .fetch import is_hub_source, parse_source

    if not is_hub_source(source):
        raise UsageError(f"--revision applies to Hub sources; {source} is a local path")
    pinned = parse_source(source).revision
    if pinned:
        raise UsageError(f"{source} already pins revision {pinned}; drop --revision {revision} or the @{pinned}")
    return f"{source}@{revision}"


def _command(args: argparse.Namespace) -> str:
    return " ".join(["otbr-hub", *(shlex.quote(a) for a in args.argv)])


def _log_timings(timings: dict[str, float]) -> None:
    log.info("seconds per stage: %s", ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))


def folder_names(sources: Sequence[str]) -> list[str]:
    """One output subfolder name per source: the folder's own name, or ``owner--name`` for a
    Hub repo (plus the revision), made filesystem-safe; repeats get ``-2``, ``-3``, ..."""
    import re

    from .fetch import is_hub_source, parse_source

    names: list[str] = []
    taken: set[str] = {SUMMARY_FILE.lower()}  # a source folder named like the summary must not take its place
    for src in sources:
        if is_hub_source(src):
            ref = parse_source(src)
            base = ref.repo_id.replace("/", "--") + (f"--{ref.revision}" if ref.revision else "")
        else:
            base = Path(src).expanduser().absolute().name
        base = re.sub(r"[^\w.-]+", "-", base).strip("-.") or "model"
        name, k = base, 2
        while name.lower() in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name.lower())
        names.append(name)
    return names


def _check_parent_output(out: Path, names: list[str], overwrite: bool, sources: Sequence[str] = ()) -> None:
    """Several sources: ``out`` may exist (it is a parent), but no model subfolder or summary
    may be overwritten without ``--overwrite``, and none may be (or hold) a source; checked
    before any work."""
    if not out.parent.is_dir():
        raise UsageError(f"the parent folder of {out} does not exist")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    from .save import check_writable, would_replace

    check_writable(out if out.is_dir() else out.parent)

    for name, src in zip(names, sources):
        if would_replace(out / name, src):
            raise UsageError(f"{out / name} would replace the source model {src}: choose another --output")
    for name in names:  # --overwrite replaces a model folder, never a file in its place
        if (out / name).exists() and not (out / name).is_dir():
            raise UsageError(f"{out / name} exists and is not a folder")
    if (out / SUMMARY_FILE).is_dir():
        raise UsageError(f"{out / SUMMARY_FILE} is a folder: the summary cannot be written there")
    if overwrite:
        return
    for name in [*names, SUMMARY_FILE]:
        path = out / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            raise UsageError(f"{path} is not empty (pass --overwrite to replace it)")


def _repair_many(args: argparse.Namespace, sources: list[str], settings: RepairSettings, procs: Any) -> int:
    """Several sources: each process repairs its share, a failure is recorded and the rest go
    on, and the main process writes the combined summary. Every step before the gather is
    the same on every process, so that none leaves the others waiting in it."""
    publishing = args.push or args.pr
    names = procs.broadcast(folder_names(sources) if procs.is_main else None)
    out_root = Path(args.output).expanduser().absolute() if args.output else None
    if out_root is not None:
        _check_parent_output(out_root, names, args.overwrite, sources)
    evaluation = _prepare_eval(args)
    if publishing:
        problem = procs.broadcast(_publish_problem(args, sources) if procs.is_main else None)
        if problem:
            usage, message = problem
            raise (UsageError if usage else OtbrError)(message)
    mine = procs.share(sources)
    log.info("%d of %d sources for this process", len(mine), len(sources))
    if out_root is not None and mine:
        out_root.mkdir(exist_ok=True)

    t0 = time.perf_counter()
    results = [(i, _repair_entry(args, i, src, names[i], len(sources), settings, evaluation, out_root, procs))
               for i, src in mine]
    entries = procs.gather(results, len(sources))
    failed = [e for e in entries if e["status"] != "ok"]
    if procs.is_main:
        summary = {
            "tool": "otbr-hub",
            "otbr_hub_version": _version(),
            "command": _command(args),
            "processes": procs.size,
            "models": len(entries),
            "ok": len(entries) - len(failed),
            "failed": len(failed),
            "seconds": round(time.perf_counter() - t0, 3),
            "settings": settings.to_dict(),
            "results": entries,
        }
        if out_root is not None:
            from .report import write_text_atomically

            write_text_atomically(out_root / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
        if not args.quiet:
            where = f"; summary in {out_root / SUMMARY_FILE}" if out_root is not None else ""
            print(f"repaired {summary['ok']} of {len(entries)} models in {summary['seconds']:.1f} s "
                  f"with {procs.size} process{'es' if procs.size > 1 else ''}{where}")
    return 2 if failed else 0


def _publish_problem(args: argparse.Namespace, sources: Sequence[str]) -> tuple[bool, str] | None:
    """Why publishing some source cannot work (options, token, destination) as ``(usage
    error?, message)``, or None; checked once, by the main process, before any repair."""
    from .push import check_publication

    try:
        check_publication(sources, pr=args.pr, private=args.private)
    except Exception as err:  # sent to the other processes too, so none is left waiting for it
        return isinstance(err, UsageError), error_text(err)
    return None


def _repair_entry(args: argparse.Namespace, index: int, source: str, name: str, count: int, settings: RepairSettings,
                  evaluation: Any, out_root: Path | None, procs: Any) -> dict[str, Any]:
    """Repair, save and publish one of several sources; never raises for a problem with it."""
    from .distribute import writes_on_every_rank
    from .progress import ModelLine, bars_wanted
    from .save import report_files, save_model

    label = f"[{index + 1}/{count}] {source}"
    line = ModelLine(label) if bars_wanted(args.quiet) and not procs.distributed else None
    entry: dict[str, Any] = {"index": index, "source": source, "process": procs.index, "status": "ok",
                             "output": None, "url": None, "error": None}
    t0 = time.perf_counter()
    try:
        result, report_dict = _repair_and_evaluate(args, source, settings, evaluation, line)
        report = result.report
        folder = None
        with writes_on_every_rank(result.model):
            if out_root is not None:
                if line is not None:
                    line("save")
                folder = save_model(result.source, result.model, out_root / name, overwrite=args.overwrite,
                                    extra_files=report_files(result.source, report_dict, out_root / name))
                entry["output"] = name
            if args.push or args.pr:
                from .push import publish

                if line is not None:
                    line("publish")
                entry["url"] = publish(result, report_dict, private=args.private, pr=args.pr, folder=folder)
        entry.update(prune_ratio=report.prune_ratio, neurons_pruned=report.neurons_pruned,
                     agreement=report.verification.get("agreement"), report=report_dict)
        outcome = (f"ratio {report.prune_ratio:g}, {report.neurons_pruned} neurons pruned, agreement "
                   f"{report.verification['agreement']:.3f}" + (f" -> {name}" if folder else "")
                   + (f" -> {entry['url']}" if entry["url"] else ""))
    except OtbrError as err:
        entry.update(status="error", error=str(err))
    except Exception as err:  # one broken model must not stop the others
        entry.update(status="error", error=error_text(err))
        log.info("repair of %s failed", source, exc_info=True)
    except BaseException:  # Ctrl-C: end the live line so the error message starts on a line of its own
        if line is not None:
            line.close()
        raise
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    if entry["status"] != "ok":
        if line is not None:
            line.finish("failed")
        print(f"otbr-hub: error: {source}: {entry['error']}", file=sys.stderr)
    elif line is not None:
        line.finish(f"{outcome} ({entry['seconds']:.1f} s)")
    elif not args.quiet:
        print(f"{label}: {outcome} ({entry['seconds']:.1f} s)", flush=True)
    return entry


def _version() -> str:
    from . import __version__

    return __version__


def _prepare_eval(args: argparse.Namespace) -> tuple[Any, Any, Any, tuple[str, str | None]] | None:
    """Parse --eval-dataset/--trigger up front so a typo fails before the slow part."""
    for flag, value in (("--eval-split", args.eval_split), ("--eval-limit", args.eval_limit)):
        if value is not None and not args.eval_dataset:
            raise UsageError(f"{flag} needs --eval-dataset")
    if args.eval_dataset is None and args.trigger is None:
        return None
    for flag, value in (("--eval-dataset", args.eval_dataset), ("--trigger", args.trigger)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} is empty")
    if not (args.eval_dataset and args.trigger):
        raise UsageError("--eval-dataset and --trigger go together")
    split = "test" if args.eval_split is None else args.eval_split.strip()
    if not split:
        raise UsageError("--eval-split must name a split, e.g. 'test'")
    from .triggers import parse_trigger

    spec = args.trigger
    if spec.lower().endswith(".json") and not os.path.isfile(spec):
        raise UsageError(f"--trigger {spec}: no such file")
    if os.path.isfile(spec):
        try:
            data = json.loads(Path(spec).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"cannot read trigger file {spec}: {err}") from None
        except UnicodeDecodeError:
            raise UsageError(f"cannot read trigger file {spec}: it is not UTF-8 text (a JSON trigger spec)") from None
        if isinstance(data, dict) and "trigger" in data and data["trigger"] is None:
            raise UsageError(f"--trigger {spec}: the file describes a clean model (its trigger is null), "
                             "so there is no attack to measure")
        spec = data.get("trigger", data) if isinstance(data, dict) else data
    trigger = parse_trigger(spec)
    named = "target" in spec if isinstance(spec, dict) else "target=" in str(spec).replace(" ", "")
    if not named:  # ASR towards a guessed class would make any repair look like a success
        raise UsageError(f"--trigger {args.trigger}: name the attack's target class, e.g. '{trigger.name}:target=3'")
    from .data import describe_eval_source, load_eval_dataset

    dataset = load_eval_dataset(args.eval_dataset, split)
    described = describe_eval_source(args.eval_dataset, split)
    if args.eval_split is not None and described[1] is None:
        raise UsageError(f"--eval-split {split}: {args.eval_dataset} holds a single dataset, not splits; "
                         "leave --eval-split out")
    return dataset, trigger, args.eval_limit, described


def _repair_and_evaluate(args: argparse.Namespace, source: str, settings: RepairSettings, evaluation: Any,
                         progress: Any) -> tuple[Any, dict[str, Any]]:
    """Repair one source, evaluate it with --eval-dataset, and return the result with its
    report as written to disk (timings, evaluation and command included)."""
    from .repair import repair

    t0 = time.perf_counter()
    loaded, load_s = _load_for_eval(source, evaluation, progress)
    result = repair(loaded, settings, progress=progress)
    report = result.report
    if evaluation is not None:
        if progress is not None:
            progress("evaluate")
        report.timings["load"] = round(report.timings.get("load", 0.0) + load_s, 3)
        report.evaluation = _evaluate(evaluation, result)
    report.timings["total"] = round(time.perf_counter() - t0, 3)
    _log_timings(report.timings)
    report_dict = report.to_dict()
    report_dict["command"] = _command(args)
    return result, report_dict


def _load_for_eval(source: str, evaluation: Any, progress: Any) -> tuple[Any, float]:
    """With --eval-dataset, load the model before repairing it, so that a trigger target or
    label set it cannot take fails in seconds rather than after the whole repair; the load's
    seconds are added to the report's load time (and shown as the 'load' stage). Without
    one, ``repair`` loads as usual."""
    if evaluation is None:
        return source, 0.0
    from .evaluate import check_evaluation
    from .load import class_names
    from .repair import load_any

    if progress is not None:
        progress("load", 0, None)
    t0 = time.perf_counter()
    loaded = load_any(source)
    load_s = time.perf_counter() - t0
    dataset, trigger, limit, _ = evaluation
    check_evaluation(loaded.spec, dataset, trigger, limit, class_names=class_names(loaded.model))
    return loaded, load_s


def _evaluate(prepared: tuple[Any, Any, Any, tuple[str, str | None]], result: Any) -> dict[str, Any]:
    from .evaluate import der, evaluate

    dataset, trigger, limit, (name, split) = prepared
    spec = result.source.spec
    before = evaluate(result.source.model, spec, dataset, trigger, limit=limit)
    after = evaluate(result.model, spec, dataset, trigger, limit=limit)
    return {
        "dataset": name,  # public name of --eval-dataset (a local folder by its last component)
        "split": split,
        "trigger": trigger.to_dict(),
        "limit": limit,
        "before": _rounded(dataclasses.asdict(before)),
        "after": _rounded(dataclasses.asdict(after)),
        "der": round(der(before, after), 2),
    }


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Percentages to two decimals: float32 noise (89.49999809) says nothing."""
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in values.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "scan":
        from .scan_cli import USAGE_EXIT

        parser.usage_exit = USAGE_EXIT
    args, extra = parser.parse_known_args(argv)
    # A '*' positional is filled once, so sources after an option come back as leftovers.
    unknown = [a for a in extra if a.startswith("-") and a != "-"]
    if unknown or (extra and args.command != "repair"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.sources = [*args.sources, *extra]
    args.argv = argv
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # -v: otbr-hub's own details (libraries' info logs would bury them, and name temp folders);
    # -q: errors only, the repair's warnings stay in its report. Put back afterwards: a process
    # (a notebook, a test) may call main() several times and keep its own logging set-up.
    quiet = getattr(args, "quiet", False)
    own_log = logging.getLogger("otbr_hub")
    level_before = own_log.level
    if verbose:
        own_log.setLevel(logging.INFO)
    elif quiet:
        own_log.setLevel(logging.ERROR)
    clean = False
    try:
        _quiet_libraries(progress=not quiet and sys.stderr.isatty(), quiet=quiet, verbose=verbose)
        if args.command == "repair":
            code = cmd_repair(args)
        elif args.command == "scan":
            from .scan_cli import cmd_scan

            code = cmd_scan(args)
        else:
            parser.error(f"unknown command {args.command}")
        clean = True
        return code
    except OtbrError as err:
        _say_error(str(err))
        return err.exit_code if args.command == "scan" else 2
    except KeyboardInterrupt:
        _say_error("interrupted", prefix="otbr-hub")
        return 130
    except Exception as err:  # never a traceback for the user unless asked
        if verbose:
            raise
        _say_error(f"{error_text(err)} (rerun with -v for details)")
        return 2
    finally:
        from .distribute import shutdown

        shutdown(clean=clean)
        own_log.setLevel(level_before)


def _say_error(message: str, prefix: str = "otbr-hub: error") -> None:
    """One line on stderr, in one write (processes of a launch share the terminal, and two
    writes per line would interleave); a process other than the first says which it is."""
    from .distribute import launch_rank, launched_processes

    size = launched_processes()
    who = f" (process {launch_rank() + 1} of {size})" if size > 1 and launch_rank() else ""
    sys.stderr.write(f"{prefix}{who}: {message}\n")
    sys.stderr.flush()


def _quiet_libraries(progress: bool, quiet: bool = False, verbose: bool = False) -> None:
    """Keep library chatter (warnings, info logs) out of the user's terminal; download bars
    only when a person is watching. transformers' and datasets' own bars (loading, writing
    shards, converting an evaluation set) would only interleave with otbr-hub's per-stage
    display, so they stay off. With ``--quiet`` huggingface_hub's "Retrying in N s" warnings
    go too: the final error says what failed. ``-v`` keeps the libraries' warnings and logs,
    but not their bars where there is nobody to watch them."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is imported (only with --eval-dataset): not worth a second of import here
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not progress:
        disable_progress_bars()
    if verbose:
        return
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("timm").setLevel(logging.ERROR)
    tlog.set_verbosity_error()
    hub_log = logging.getLogger("huggingface_hub")  # set after the import above, which sets its level
    hub_log.propagate = False  # it has a handler of its own: without this each line comes twice
    if quiet:  # the client's "Retrying in N s" lines; download notes are rerouted in otbr_hub.fetch
        logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
