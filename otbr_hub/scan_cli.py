"""``otbr-hub scan``: argument parsing, report output and exit codes.

Exit codes are part of the interface, because CI jobs branch on them:

    0  nothing at or above --fail-on was found
    1  a finding at or above --fail-on (an unsafe weight file counts unless --fail-on none)
    2  the scan itself failed for a target (network, unreadable input) or for a Hub query
    3  nothing could be scanned (no targets left, or every target was skipped)
    4  usage error: bad flags or no targets
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import HubError, UsageError, error_text
from .report import FAIL_ON_LEVELS, FORMATS

log = logging.getLogger("otbr_hub")

USAGE_EXIT = 4
DEFAULT_LIMIT = 100

_EPILOG = """\
examples:
  otbr-hub scan models/my-resnet                      scan a local folder (or a folder of model folders)
  otbr-hub scan user/model@v1.0 --format json -o r.json
  otbr-hub scan --author my-org --filter image-classification --format sarif -o scan.sarif

exit codes: 0 nothing at or above --fail-on, 1 findings at or above it, 2 scan error, 3 nothing scannable, 4 usage error.
The token is read from the environment variable named by --token-env and never printed.
"""


class _ScanParser(argparse.ArgumentParser):
    """Argument errors of ``scan`` exit with 4: argparse's usual 2 already means 'scan error'."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        # argparse fills a '*' positional once, so targets after an option come back as
        # leftovers: they are targets too. Anything else left over would be reported by the
        # main parser with exit 2, so it is refused here.
        ns, extra = super().parse_known_args(args, namespace)
        unknown = [a for a in extra if a.startswith("-") and a != "-"]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        ns.targets = [*getattr(ns, "targets", []), *(a for a in extra if a not in unknown)]
        return ns, []


def add_scan_parser(sub: argparse._SubParsersAction) -> None:
    # add_parser() has no per-call parser class, so swap it in just for this subcommand.
    previous = sub._parser_class
    sub._parser_class = _ScanParser
    try:
        s = sub.add_parser(
            "scan",
            help="check models for backdoors (no data needed) and unsafe weight files",
            description="Check image classifiers for backdoors without data, and their weight files for code that runs on load.",
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    finally:
        sub._parser_class = previous

    s.add_argument("targets", nargs="*", help="model folders, weight files or Hub repo ids (user/model[@revision])")
    s.add_argument("--from-file", metavar="FILE", help="read more targets from FILE, one per line ('#' comments; '-' for stdin)")

    hub = s.add_argument_group("Hub queries and access")
    hub.add_argument("--author", help="scan the models of this user or organisation")
    hub.add_argument("--search", help="scan models whose id contains this text")
    hub.add_argument("--filter", dest="filters", action="append", default=[], metavar="TAG",
                     help="only models with this tag, e.g. image-classification or timm (repeatable: all must match)")
    hub.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                     help=f"most models a query lists (default {DEFAULT_LIMIT}; 0 for no limit)")
    hub.add_argument("--token-env", metavar="VAR", default=None,
                     help="environment variable holding the Hub token (default HF_TOKEN, else your saved login)")
    hub.add_argument("--endpoint", help="Hub URL (default $HF_ENDPOINT or huggingface.co)")
    hub.add_argument("--cache-dir", help="download cache (default: the usual Hugging Face cache)")
    hub.add_argument("--max-size", type=float, default=2.0, metavar="GB",
                     help="skip Hub repos whose weight files exceed this many GB (default 2; 0 for no limit)")

    out = s.add_argument_group("output")
    out.add_argument("--format", default="console", choices=FORMATS, help="report format (default console)")
    out.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of standard output ('-': standard output; "
                     "with a non-console --format the console table is still printed, unless --quiet)")
    out.add_argument("--fail-on", default="backdoored", choices=FAIL_ON_LEVELS,
                     help="lowest finding that makes the exit code 1 (default backdoored; unsafe files always count unless 'none')")
    out.add_argument("-q", "--quiet", action="store_true", help="print nothing but the report and errors (no progress)")
    out.add_argument("-v", "--verbose", action="store_true", help="print details: process split, tracebacks of failed targets")

    det = s.add_argument_group("detector")
    det.add_argument("--seed", type=int, default=0, help="seed of the random starting images (default 0)")
    det.add_argument("--device", default="auto",
                     help="'auto' (default: this process's GPU when Accelerate sees one, else the CPU), 'cpu' or 'cuda[:N]'")
    det.add_argument("--steps", type=int, default=None,
                     help="optimisation steps per class (default 100; 50 above --max-classes classes)")
    det.add_argument("--inputs-per-class", type=int, default=None,
                     help="random starting images per class (default 8; 4 above --max-classes classes)")
    det.add_argument("--max-classes", type=int, default=None,
                     help="search every class of models with at most this many (default 64); above it, the weight "
                          "evidence's top 4 classes and a random sample of 20 are searched at the smaller budget")
    det.add_argument("--method", choices=("robust", "mmbd"), default=None,
                     help="'robust' (default) or 'mmbd' (the published Gamma test only)")
    det.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                     help="arithmetic of the margin search: 'auto' (default: bf16 where the device runs it natively "
                          "and inputs are at least 96x96), 'fp32' or 'bf16' (autocast)")
    det.add_argument("--margin-scale", choices=("sd", "mad"), default=None,
                     help="'robust' outlier score of the log-margins: against the others' mean and sd "
                          "('sd', default) or median and MAD ('mad', the earlier rule, weaker with few classes); 'robust' only")


def _read_target_file(name: str) -> list[str] | None:
    """The targets a ``--from-file`` lists. Under a launcher only the first process reads
    standard input (every process shares it, so only one would get the list): the others
    get None and take the list from the first through a broadcast."""
    from .distribute import launch_rank, launched_processes

    if name == "-" and launched_processes() > 1 and launch_rank() != 0:
        return None
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read --from-file {name}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--from-file {name} is not a UTF-8 text file (one model per line)") from None
    return [target for target in map(_strip_comment, text.splitlines()) if target]


_COMMENT = re.compile(r"(^|\s)#.*$")


def _strip_comment(line: str) -> str:
    """A line without its comment: ``#`` at the start or after whitespace, as in a shell, so
    that a folder named ``model#2`` is still a target and not ``model``."""
    return _COMMENT.sub("", line).strip()


def _token(var: str | None) -> str | None:
    """The token from the environment; an explicitly named variable must exist."""
    if var is None:
        return os.environ.get("HF_TOKEN") or None
    value = os.environ.get(var)
    if not value:
        raise UsageError(f"--token-env {var}: the environment variable is not set")
    return value


def _settings(args: argparse.Namespace) -> Any:
    from .detect import DetectSettings
    from .placement import resolve_device
    from .scan import ScanSettings

    overrides = {"seed": args.seed, "device": str(resolve_device(args.device))}
    for name in ("steps", "inputs_per_class", "method", "margin_scale", "precision", "max_classes"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    for name in ("steps", "inputs_per_class"):  # an explicit budget holds for screened models too
        if getattr(args, name) is not None:
            overrides["screened_" + name] = getattr(args, name)
    for flag, name, least in (("--steps", "steps", 1), ("--inputs-per-class", "inputs_per_class", 1),
                              ("--max-classes", "max_classes", 3)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise UsageError(f"{flag} must be at least {least}, got {getattr(args, name)}")
    if args.max_classes is not None and args.max_classes >= 3:  # the screen keeps at most max_classes - 1 top classes
        overrides["screen_top"] = min(DetectSettings.screen_top, args.max_classes - 1)
    try:
        detector = DetectSettings(**overrides)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.max_size < 0:
        raise UsageError("--max-size must be 0 (no limit) or positive")
    if args.limit < 0:
        raise UsageError("--limit must be 0 (no limit) or positive")
    max_bytes = int(args.max_size * 1e9) if args.max_size > 0 else None
    return ScanSettings(detector=detector, max_download_bytes=max_bytes, cache_dir=args.cache_dir)


def _check_report_path(output: str, targets: Sequence[str] = (), from_file: str | None = None) -> None:
    """Before any scanning: the report file must be creatable (its folders are made as needed),
    and must not be one of the files the scan reads: the report would replace them."""
    if output.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise UsageError(f"--output {output} ends with a path separator; give a file name")
    target = Path(os.path.realpath(Path(output).expanduser()))  # a symlink's target is what gets written
    if target.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file name")
    _check_not_scanned(output, target, targets, from_file)
    if target.exists() and not target.is_file():  # a device or FIFO: written into, not replaced
        if not os.access(target, os.W_OK):
            raise UsageError(f"--output {output}: cannot write to {target}: permission denied")
        return
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output {output}: {parent} is a file, not a folder")
    _check_creatable(output, parent, target)


def _check_creatable(output: str, parent: Path, target: Path) -> None:
    """Probe ``parent``, the deepest folder that exists, the way writing will use it: a file
    goes in directly, otherwise the first missing subfolder is made there."""
    from .save import write_problem

    why = write_problem(parent)
    if why is None:
        return
    if target.parent == parent:
        raise UsageError(f"--output {output}: cannot create a file in {parent}: {why}")
    first_missing = parent / target.relative_to(parent).parts[0]
    raise UsageError(f"--output {output}: cannot create the folder {first_missing} ({parent} is the deepest "
                     f"existing folder, and nothing can be created in it: {why})")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_not_scanned(output: str, target: Path, targets: Sequence[str], from_file: str | None) -> None:
    """Refuse an output that is a scanned file, the --from-file list, or an existing file in a
    scanned folder (a new file there is fine: it does not exist while the scan reads)."""
    if from_file and from_file != "-" and _same_file(target, Path(from_file).expanduser()):
        raise UsageError(f"--output {output} is the --from-file list {from_file}; the report would replace it")
    for name in targets:
        path = Path(name).expanduser()
        if path.is_dir():
            root = Path(os.path.realpath(path))
            if target.is_file() and root in target.parents and not _earlier_report(target):
                raise UsageError(f"--output {output} is an existing file inside the scanned folder {name}; "
                                 "the report would replace it (give a new file name or a path outside)")
        elif path.is_file() and _same_file(target, path):
            raise UsageError(f"--output {output} is the scanned file {name}; the report would replace it")


def _earlier_report(path: Path) -> bool:
    """A report an earlier scan wrote, which a rerun may replace (``scan models/ -o
    models/scan.json`` twice); any other file of a scanned folder, such as a model card that
    mentions otbr-hub, is not one."""
    from .inspect import is_weight_file
    from .report import is_report_text

    if is_weight_file(path) or path.name.lower().endswith("config.json"):
        return False
    try:
        if path.stat().st_size > 64 * 2**20:  # far larger than any report this tool writes
            return False
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return is_report_text(text)


def _append_step_summary(markdown: str) -> None:
    """In GitHub Actions, the Markdown table also goes to the job summary page."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(markdown + "\n")
    except OSError as err:
        print(f"otbr-hub: warning: cannot write GITHUB_STEP_SUMMARY: {err.strerror or err}", file=sys.stderr)


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan every target; under ``accelerate launch`` the targets are shared out between the
    processes and the main process alone writes the combined report."""
    from .distribute import team
    from .placement import check_device_name
    from .report import ScanReport, TargetReport, exit_code, to_console, to_markdown, write_report
    from .scan import expand_targets, report_settings

    targets = list(args.targets)
    if any(not t.strip() for t in targets):  # Path("") is the working directory: never scan it by accident
        raise UsageError("an empty target was given (an unset variable?); name a folder, file or repo id")
    listed = _read_target_file(args.from_file) if args.from_file else []
    targets += listed or []
    query = bool(args.author or args.search or args.filters)
    if not targets and not query and listed is not None:
        if args.from_file:
            where = "standard input (--from-file -)" if args.from_file == "-" else f"--from-file {args.from_file}"
            raise UsageError(f"{where} lists no targets")
        raise UsageError("nothing to scan: give folders, files or repo ids, --from-file, or --author/--search/--filter")
    output = None if args.output == "-" else args.output  # '-': standard output
    if output:
        _check_report_path(output, targets, args.from_file)
    check_device_name(args.device)  # before Accelerate sees it
    procs = team(args.device)
    targets = procs.broadcast(targets if procs.is_main else None)  # one list, whatever each process read
    settings = _settings(args)
    token = _token(args.token_env)
    limit = args.limit or None

    # The target list is made once (a Hub query could change between two calls) and shared.
    # A failed Hub query is recorded as an error of its own, and the explicit targets are
    # still scanned: one unreachable listing must not leave a CI job without any report.
    # Anything it raises is sent to the other processes as the error, so none is left waiting.
    def expand() -> tuple[list[str] | None, str | None]:
        try:
            found = expand_targets(targets, author=args.author, search=args.search, filters=args.filters, limit=limit,
                                   token=token, endpoint=args.endpoint)
        except Exception as err:
            if not query:
                return None, error_text(err)
            try:
                return expand_targets(targets), error_text(err)
            except Exception as err2:
                return None, error_text(err2)
        return found, None

    concrete, problem = procs.broadcast(expand() if procs.is_main else None)
    if concrete is None:
        raise HubError(problem or "cannot list the targets")
    if problem is not None and procs.is_main:
        print(f"otbr-hub: error: the Hub query failed, scanning the other targets: {problem}", file=sys.stderr)
    mine = procs.share(concrete)
    log.info("process %d of %d: %d of %d targets", procs.index + 1, procs.size, len(mine), len(concrete))
    results = [(i, _scan_one(target, i, len(concrete), args, settings, token, procs.distributed)) for i, target in mine]
    reports = procs.gather(results, len(concrete))
    if problem is not None:
        reports.append(TargetReport(target=_query_label(args), source="hub", verdict="error", error=problem))

    code_query = {"author": args.author, "search": args.search, "filters": args.filters, "limit": limit} if query else None
    report = ScanReport(targets=reports, settings=report_settings(settings, code_query))
    report.settings.update({"fail_on": args.fail_on, "format": args.format})
    if procs.distributed:
        report.settings["processes"] = procs.size
    if procs.is_main:
        write_report(report, args.format, output)
        if output and args.format != "console" and not args.quiet:
            to_console(report)
        if args.format != "markdown":
            _append_step_summary(to_markdown(report))
    return exit_code(report, args.fail_on)


def _query_label(args: argparse.Namespace) -> str:
    """How a Hub query appears as a target of its own in the report (when it failed)."""
    parts = [f"author={args.author}" if args.author else "", f"search={args.search}" if args.search else "",
             *(f"filter={f}" for f in args.filters or ())]
    return "hub query " + " ".join(p for p in parts if p)


def _scan_one(target: str, index: int, count: int, args: argparse.Namespace, settings: Any, token: str | None,
              distributed: bool) -> Any:
    """Scan one target with the progress display that suits where stderr goes.

    At a terminal, one live line per target (stage, then verdict); otherwise, and when
    several processes share the terminal, plain lines before and after each target.
    """
    from .progress import ModelLine, bars_wanted
    from .scan import describe, scan_target

    label = target if count == 1 else f"[{index + 1}/{count}] {target}"
    line = ModelLine(label) if bars_wanted(args.quiet) and not distributed else None
    if line is None and not args.quiet:
        print(f"scanning {label}", file=sys.stderr, flush=True)
    try:
        result = scan_target(target, settings=settings, token=token, endpoint=args.endpoint, on_stage=line)
    except BaseException:  # Ctrl-C: end the live line so the error message starts on a line of its own
        if line is not None:
            line.close()
        raise
    if line is not None:
        line.finish(describe(result))
    elif not args.quiet:
        print(f"  {describe(result) if not distributed else target + ': ' + describe(result)}", file=sys.stderr, flush=True)
    return result
