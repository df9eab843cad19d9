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
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import OtbrError, UsageError
from .settings import RepairSettings

log = logging.getLogger("otbr_hub")

# Flags that the main parser defines by hand (with short forms or special parsing).
_HAND_MADE = {"preset", "prune_ratio", "lam", "seed", "device"}


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RepairSettings field; defaults stay None so presets can fill them."""
    core = parser.add_argument_group("repair")
    core.add_argument("--preset", default="default", help="named starting point: 'default' or 'paper'")
    core.add_argument("--prune-ratio", default=None, help="fraction of neurons to prune in (0, 1), or 'auto' (default)")
    core.add_argument("--lambda", dest="lam", type=float, default=None, help="fusion weight of the pruned model, in [0, 1]")
    core.add_argument("--seed", type=int, default=None, help="random seed")
    core.add_argument("--device", default=None, help="'auto' (default; GPU when Accelerate sees one), 'cpu' or 'cuda'")
    adv = parser.add_argument_group("advanced engine settings")
    for f in dataclasses.fields(RepairSettings):
        if f.name in _HAND_MADE:
            continue
        help_text = f.metadata.get("help", "")
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


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="otbr-hub", description="Data-free backdoor repair and scanning for image classifiers.")
    p.add_argument("--version", action="version", version=f"otbr-hub {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("repair", help="remove a possible backdoor from a model, without data")
    r.add_argument("source", help="model folder (timm or transformers), or a Hub repo id")
    r.add_argument("-o", "--output", help="folder to write the repaired model into (required unless --push/--pr)")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    r.add_argument("--eval-dataset", help="measure ACC/ASR on this dataset ('fashion_mnist', a saved datasets folder, or a Hub id)")
    r.add_argument("--trigger", help="trigger spec for ASR, e.g. 'badnets:target=3', or a trigger.json file")
    r.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many test images")
    hub = r.add_argument_group("publishing")
    hub.add_argument("--push", action="store_true", help="upload the repaired model to <your-namespace>/<name>-otbr (or --repo-id)")
    hub.add_argument("--pr", action="store_true", help="open a pull request with the repaired weights on the source repo instead")
    hub.add_argument("--repo-id", help="destination repo for --push")
    hub.add_argument("--private", action="store_true", help="create the --push destination as a private repo")
    hub.add_argument("--revision", help="source revision (branch, tag, commit sha or refs/pr/N); 'user/model@rev' also works")
    r.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    r.add_argument("-v", "--verbose", action="store_true", help="print details (and tracebacks on unexpected errors)")
    add_settings_flags(r)

    from .scan_cli import add_scan_parser

    add_scan_parser(sub)
    return p


def _fmt_eval(e: Any) -> str:
    return f"ACC {e.acc:5.1f}%  ASR {e.asr:5.1f}%  RA {e.ra:5.1f}%"


def cmd_repair(args: argparse.Namespace) -> int:
    from .repair import repair
    from .save import check_destination, save_model

    settings = settings_from_args(args)
    publishing = args.push or args.pr
    if args.push and args.pr:
        raise UsageError("--push and --pr are alternatives; pick one")
    if not args.output and not publishing:
        raise UsageError("--output is required (or publish with --push / --pr)")
    if args.output:
        check_destination(args.output, overwrite=args.overwrite)
    evaluation = _prepare_eval(args)
    say = (lambda *a: None) if args.quiet else print

    t0 = time.perf_counter()
    source = args.source if not args.revision else f"{args.source}@{args.revision}"
    result = repair(source, settings)
    report = result.report
    if evaluation is not None:
        report.evaluation = _evaluate(evaluation, result)
    report.timings["total"] = round(time.perf_counter() - t0, 3)
    report_dict = report.to_dict()
    report_dict["command"] = " ".join(["otbr-hub", *sys.argv[1:]]) if sys.argv else "otbr-hub repair"
    if args.output:
        out = save_model(result.source, result.model, args.output, extra_files={"otbr_report.json": report_dict}, overwrite=args.overwrite)
    if publishing:
        from .push import publish

        url = publish(result, report_dict, repo_id=args.repo_id, private=args.private, pr=args.pr, folder=out if args.output else None)

    say(f"repaired {report.source} ({report.library}, {report.neurons_scored} neurons in {report.layers_scored} layers)")
    say(f"  prune ratio {report.prune_ratio:g}: {report.ratio_reason}")
    say(f"  pruned {report.neurons_pruned} neurons, fused with lambda {report.lam:g}; agreement with the original "
        f"on synthetic inputs {report.verification['agreement']:.3f}")
    if report.evaluation:
        ev = report.evaluation
        say(f"  before: ACC {ev['before']['acc']:5.1f}%  ASR {ev['before']['asr']:5.1f}%")
        say(f"  after:  ACC {ev['after']['acc']:5.1f}%  ASR {ev['after']['asr']:5.1f}%   DER {ev['der']:.3f}")
    if args.output:
        say(f"  saved to {out} in {report.timings['total']:.1f} s")
    if publishing:
        say(f"  {'opened pull request' if args.pr else 'pushed to'} {url}")
    return 0


def _prepare_eval(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """Parse --eval-dataset/--trigger up front so a typo fails before the slow part."""
    if not args.eval_dataset and not args.trigger:
        return None
    if not (args.eval_dataset and args.trigger):
        raise UsageError("--eval-dataset and --trigger go together")
    from .triggers import parse_trigger

    spec = args.trigger
    if os.path.isfile(spec):
        try:
            data = json.loads(Path(spec).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"cannot read trigger file {spec}: {err}") from None
        spec = data.get("trigger", data) if isinstance(data, dict) else data
    trigger = parse_trigger(spec)
    from .data import load_eval_dataset

    dataset = load_eval_dataset(args.eval_dataset, "test")
    return dataset, trigger, args.eval_limit


def _evaluate(prepared: tuple[Any, Any, Any], result: Any) -> dict[str, Any]:
    from .evaluate import der, evaluate

    dataset, trigger, limit = prepared
    spec = result.source.spec
    before = evaluate(result.source.model, spec, dataset, trigger, limit=limit)
    after = evaluate(result.model, spec, dataset, trigger, limit=limit)
    return {
        "dataset": getattr(dataset, "info", None) and (dataset.info.dataset_name or "dataset"),
        "trigger": trigger.to_dict(),
        "before": dataclasses.asdict(before),
        "after": dataclasses.asdict(after),
        "der": der(before, after),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        _quiet_libraries(progress=not getattr(args, "quiet", False) and sys.stderr.isatty())
    try:
        if args.command == "repair":
            return cmd_repair(args)
        if args.command == "scan":
            from .scan_cli import cmd_scan

            return cmd_scan(args)
        parser.error(f"unknown command {args.command}")
    except OtbrError as err:
        print(f"otbr-hub: error: {err}", file=sys.stderr)
        return err.exit_code if args.command == "scan" else 2
    except KeyboardInterrupt:
        print("otbr-hub: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # never a traceback for the user unless asked
        if verbose:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"otbr-hub: error: unexpected {type(err).__name__}: {msg} (rerun with -v for details)", file=sys.stderr)
        return 2
    return 0


def _quiet_libraries(progress: bool) -> None:
    """Keep library chatter (warnings, info logs) out of the user's terminal; progress bars
    only when a person is watching."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("timm").setLevel(logging.ERROR)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    if not progress:
        disable_progress_bars()
        tlog.disable_progress_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
