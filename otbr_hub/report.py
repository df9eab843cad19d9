"""The ``scan`` report: one data model, rendered as JSON, SARIF, Markdown or a console table.

The JSON form is the contract (see ``schemas/scan-report.schema.json``); SARIF feeds GitHub
code scanning, Markdown goes to ``$GITHUB_STEP_SUMMARY`` or a PR comment, and the console
table is for people at a terminal. All renderers read the same dataclasses, so they
cannot disagree about a verdict.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from .errors import UsageError
from .inspect import SEVERITY_RANK, FileReport, Finding

SCHEMA_VERSION = "1.2"
TOOL_NAME = "otbr-hub"
INFORMATION_URI = "https://github.com/otbr-hub/otbr-hub"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"

Verdict = Literal["clean", "suspicious", "backdoored", "unsafe-file", "skipped", "error"]
SourceKind = Literal["folder", "file", "hub", "memory"]
ReportFormat = Literal["json", "sarif", "markdown", "console"]

VERDICTS: tuple[str, ...] = ("clean", "suspicious", "backdoored", "unsafe-file", "skipped", "error")
FORMATS: tuple[str, ...] = ("json", "sarif", "markdown", "console")
FAIL_ON_LEVELS: tuple[str, ...] = ("suspicious", "backdoored", "unsafe-file", "none")

VERDICT_WORDS: dict[str, str] = {
    "clean": "Clean",
    "suspicious": "Suspicious",
    "backdoored": "Backdoor detected",
    "unsafe-file": "Unsafe file",
    "skipped": "Skipped",
    "error": "Error",
}


WEIGHT_FILE_ONLY_NOTE = (
    "weight file only: its safety was checked; no architecture, so the backdoor statistic was not run"
)
NOT_TESTED = "not tested"


def tool_version() -> str:
    """Installed package version, so a report says which tool produced it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TOOL_NAME)
    except PackageNotFoundError:
        return "0+unknown"


def json_schema() -> dict[str, Any]:
    """The JSON Schema the ``json`` format follows, as shipped in the package."""
    from importlib.resources import files

    text = files(__package__).joinpath("schemas", "scan-report.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class BackdoorEvidence:
    """What the data-free detector measured for one model.

    ``per_class`` holds the statistic for each class index; ``thresholds`` records the
    cut-offs the verdict used (e.g. ``{"p_value": 0.05}``) so a reader can re-judge it;
    ``weight_evidence`` carries any weight-only signals the engine adds.
    """

    statistic: str
    p_value: float | None
    suspected_target: int | None = None
    suspected_label: str | None = None
    per_class: list[float] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    weight_evidence: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    """Why the verdict is what it is when the p-value alone would mislead (see
    :attr:`otbr_hub.detect.Detection.note`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            # float rounding can put a p-value a hair outside [0, 1]; the schema (and readers) expect inside
            "p_value": None if self.p_value is None else min(1.0, max(0.0, float(self.p_value))),
            "suspected_target": self.suspected_target,
            "suspected_label": self.suspected_label,
            "per_class": list(self.per_class),
            "thresholds": dict(self.thresholds),
            "weight_evidence": dict(self.weight_evidence),
            "note": self.note,
        }


@dataclass
class TargetReport:
    """The outcome for one scanned model: a folder, a single file, a Hub repository or an
    in-memory model (``source="memory"``)."""

    target: str
    source: SourceKind
    verdict: Verdict
    revision: str | None = None
    backdoor: BackdoorEvidence | None = None
    files: list[FileReport] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    note: str | None = None
    """What the verdict does not cover, when that is not obvious from it (a lone weight file is
    ``clean`` from its safety check alone: :data:`WEIGHT_FILE_ONLY_NOTE`)."""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}")

    @property
    def unsafe_files(self) -> list[FileReport]:
        return [f for f in self.files if not f.safe]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "revision": self.revision,
            "verdict": self.verdict,
            "backdoor": self.backdoor.to_dict() if self.backdoor else None,
            "files": [f.to_dict() for f in self.files],
            "skipped": self.skipped,
            "error": self.error,
            "timings": dict(self.timings),
            "note": self.note,
        }


@dataclass
class ScanReport:
    """Everything one ``otbr-hub scan`` run found, with the settings that produced it."""

    targets: list[TargetReport] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    tool_version: str = field(default_factory=tool_version)
    created: str = field(default_factory=_now)
    schema_version: str = SCHEMA_VERSION

    def summary(self) -> dict[str, Any]:
        """Counts a CI step can test without walking the targets."""
        verdicts = {v: 0 for v in VERDICTS}
        for t in self.targets:
            verdicts[t.verdict] += 1
        return {
            "targets": len(self.targets),
            "verdicts": verdicts,
            "unsafe_files": sum(len(t.unsafe_files) for t in self.targets),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool": TOOL_NAME,
            "tool_version": self.tool_version,
            "created": self.created,
            "settings": dict(self.settings),
            "summary": self.summary(),
            "targets": [t.to_dict() for t in self.targets],
        }


# --------------------------------------------------------------------------- exit codes


def exit_code(report: ScanReport, fail_on: str = "backdoored") -> int:
    """The process exit status for a finished scan.

    ``fail_on`` sets which outcomes fail the run, from most to least sensitive:
    ``suspicious`` (suspicious or backdoored verdicts, or any unsafe file), ``backdoored``
    (backdoored verdicts or any unsafe file; the default), ``unsafe-file`` (only unsafe
    weight files) and ``none`` (never fail on findings). An unsafe file is always counted
    unless ``fail_on='none'``, because a file that can run code on load is worse than a
    backdoor.

    Precedence, first match wins:

    1. a finding at or above ``fail_on`` in any target -> 1, even if other targets errored;
    2. any target with verdict ``error`` -> 2;
    3. no targets, or every target ``skipped`` -> 3 (nothing could be scanned);
    4. otherwise -> 0 (skipped targets next to clean ones do not fail the run).

    Exit code 4 (bad arguments) is never returned here: the CLI raises ``UsageError``
    before scanning, and an unknown ``fail_on`` raises it here too.
    """
    if fail_on not in FAIL_ON_LEVELS:
        raise UsageError(f"--fail-on must be one of {', '.join(FAIL_ON_LEVELS)}, not {fail_on!r}")
    failing: set[str] = set()
    if fail_on != "none":
        failing.add("unsafe-file")
    if fail_on in ("suspicious", "backdoored"):
        failing.add("backdoored")
    if fail_on == "suspicious":
        failing.add("suspicious")

    for t in report.targets:
        if t.verdict in failing or ("unsafe-file" in failing and t.unsafe_files):
            return 1
    if any(t.verdict == "error" for t in report.targets):
        return 2
    if all(t.verdict == "skipped" for t in report.targets):
        return 3
    return 0


# --------------------------------------------------------------------------- JSON


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN/inf become null (JSON has no spelling for them), numpy scalars unwrap."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):  # numpy array or torch tensor
        return _jsonable(value.tolist())
    if hasattr(value, "item"):  # numpy or torch scalar
        return _jsonable(value.item())
    return str(value)


def to_json(report: ScanReport) -> str:
    """The report as JSON matching ``schemas/scan-report.schema.json``."""
    return json.dumps(_jsonable(report.to_dict()), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- SARIF


@dataclass(frozen=True)
class _Rule:
    id: str
    short: str
    full: str
    severity: str  # finding severity; decides SARIF level and GitHub security-severity


_SARIF_LEVEL = {"critical": "error", "high": "error", "medium": "warning", "info": "note"}
_SECURITY_SEVERITY = {"critical": "9.5", "high": "7.5", "medium": "5.0", "info": "1.0"}

_RULES: dict[str, _Rule] = {
    r.id: r
    for r in (
        _Rule("backdoor-detected", "Backdoor detected", "The data-free detector found a class that is far easier to force than the others, the signature of a planted trigger.", "high"),
        _Rule("backdoor-suspicious", "Possible backdoor", "An anomaly a backdoor leaves but that has benign explanations too (usually a shift of the classifier weights towards one class, which imbalanced clean training also causes): worth a closer look or a repair.", "medium"),
        _Rule("pickle-unsafe-import", "Pickle imports code-executing global", "Loading this file with pickle or torch.load imports a function that can run arbitrary code.", "critical"),
        _Rule("pickle-unlisted-import", "Pickle imports unexpected global", "The pickle imports a global outside the allowlist for plain weights; torch.load(weights_only=True) would refuse it.", "high"),
        _Rule("pickle-scan-failed", "Pickle could not be analysed", "The pickle scanner failed on this file, so its imports are unknown and it cannot be trusted.", "high"),
        _Rule("pickle-parse-error", "Malformed pickle", "The file does not disassemble as a complete pickle stream.", "medium"),
        _Rule("pickle-unparsable", "Pickle the scanner cannot follow", "The pickle stops parsing before its end in a way an unpickler may not (for example a hexadecimal integer), so imports after that point are unknown.", "high"),
        _Rule("pickle-too-large", "Pickle too large to inspect", "A pickle entry unpacks to more bytes than a checkpoint's pickle needs; it was not read, so its imports are unknown.", "high"),
        _Rule("zip-duplicate-entry", "Zip archive repeats an entry name", "Two entries share a name; torch reads one copy and Python's zipfile (and the scanner) the other, so what is inspected may not be what is loaded.", "critical"),
        _Rule("legacy-tar-checkpoint", "Old tar checkpoint format", "torch's pre-1.6 tar checkpoint: its members are pickles that are not inspected.", "high"),
        _Rule("link-outside-folder", "Link out of the model folder", "A weight file is a link to a file outside the model folder; it was not read, and a loader would follow it.", "high"),
        _Rule("inspect-failed", "File could not be inspected", "The checks failed on this file (it may be built to crash them), so nothing is known about it.", "high"),
        _Rule("format-mismatch", "Content does not match extension", "The file's bytes are a different format from the one its name claims.", "high"),
        _Rule("safetensors-truncated", "Truncated safetensors file", "The header or a tensor extends beyond the end of the file.", "high"),
        _Rule("safetensors-bad-header", "Invalid safetensors header", "The safetensors header length, JSON or tensor entries are malformed.", "high"),
        _Rule("safetensors-unknown-dtype", "Unknown safetensors dtype", "A tensor declares a dtype safetensors does not define.", "high"),
        _Rule("safetensors-bad-offsets", "Invalid safetensors offsets", "Tensor data ranges overlap, leave gaps, or do not cover the data section exactly.", "high"),
        _Rule("safetensors-size-mismatch", "Tensor size does not match shape", "A tensor's byte range differs from its shape times its element size.", "high"),
        _Rule("safetensors-bad-metadata", "Invalid safetensors metadata", "__metadata__ must map strings to strings.", "high"),
        _Rule("safetensors-unexpected-field", "Unexpected safetensors field", "A tensor entry has fields beyond dtype, shape and data_offsets.", "medium"),
        _Rule("shard-index-path-escape", "Shard index escapes the model folder", "A sharded-checkpoint index points at a file outside the model folder.", "high"),
        _Rule("shard-index-missing-shard", "Shard file missing", "A sharded-checkpoint index names a shard that is not present.", "medium"),
        _Rule("shard-index-invalid", "Invalid shard index", "The shard index is not valid JSON with a weight_map.", "medium"),
        _Rule("file-unreadable", "File could not be read", "The file could not be opened or read, so it was not checked.", "high"),
        _Rule("unsafe-file", "Unsafe weight file", "The target was reported unsafe without a finding that says why (a report built by hand or by another tool); treat its files as untrusted.", "high"),
        _Rule("unknown-format", "Unrecognised weight format", "The file was not recognised as a weight format and was not inspected.", "info"),
    )
}  # fmt: skip


def _rule_for(code: str, severity: str) -> _Rule:
    """Known rules keep their text; a new finding code still gets a valid rule."""
    return _RULES.get(code) or _Rule(code, code.replace("-", " ").capitalize(), f"otbr-hub finding '{code}'.", severity)


def _sarif_rule(rule: _Rule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "name": "".join(part.capitalize() for part in rule.id.split("-")),
        "shortDescription": {"text": rule.short},
        "fullDescription": {"text": rule.full},
        "helpUri": f"{INFORMATION_URI}/blob/main/docs/SCAN_RULES.md#{rule.id}",
        "help": {"text": rule.full},
        "defaultConfiguration": {"level": _SARIF_LEVEL[rule.severity]},
        "properties": {"tags": ["security"], "security-severity": _SECURITY_SEVERITY[rule.severity]},
    }


def _is_semver(version: str) -> bool:
    """SARIF's semanticVersion must be SemVer 2.0; a local or dev build (0+unknown) is not."""
    import re

    return bool(re.fullmatch(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?", version))


def _artifact_uri(target: TargetReport, file_path: str | None) -> str:
    """Where a result lives: a Hub URL for Hub targets, else a path relative to the working directory."""
    from urllib.parse import quote

    if target.source == "hub":
        base = f"https://huggingface.co/{quote(target.target, safe='/')}"
        if file_path is None:
            return base
        return f"{base}/blob/{quote(target.revision or 'main', safe='')}/{quote(file_path, safe='/')}"
    if target.source == "memory":  # nothing on disk: the label, as a relative reference
        return quote(target.target, safe="")
    base = Path(target.target)
    if target.source == "file":
        full = base
    else:
        full = base / file_path if file_path else base
    if not full.is_absolute() and ".." in full.parts:  # ../model: judge it from where it really is
        full = Path(os.path.normpath(Path.cwd() / full))
    if full.is_absolute():
        try:
            full = full.relative_to(Path.cwd())
        except ValueError:  # outside the checkout: a relative URI still, without the machine's layout
            full = Path(*full.parts[-2:]) if file_path else Path(full.name)
    return quote(PurePosixPath(*full.parts).as_posix(), safe="/") if full.parts else "."


def _primary_file(target: TargetReport) -> str | None:
    """The file a model-level result points at: the first real weight file, not an index."""
    for f in target.files:
        if f.format != "shard-index":
            return f.path
    return None


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:32]


def _sarif_result(rule: _Rule, level: str, text: str, uri: str, key: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "ruleId": rule.id,
        "level": level,
        "message": {"text": text},
        "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri}}}],
        "partialFingerprints": {"otbrResult/v1": _fingerprint(rule.id, uri, key)},
        "properties": _jsonable(props),
    }


def to_sarif(report: ScanReport) -> str:
    """SARIF 2.1.0 for GitHub code scanning: one result per backdoor verdict and per file finding.

    Skipped targets produce no result; errored targets appear as tool execution
    notifications, since they are a failure of the scan rather than a property of the code.
    """
    used: dict[str, _Rule] = {}
    results: list[dict[str, Any]] = []
    notifications: list[dict[str, Any]] = []

    for t in report.targets:
        name = f"{t.target}@{t.revision}" if t.revision else t.target
        if t.verdict in ("backdoored", "suspicious"):
            rule = _RULES["backdoor-detected" if t.verdict == "backdoored" else "backdoor-suspicious"]
            used[rule.id] = rule
            ev = t.backdoor
            text = f"{VERDICT_WORDS[t.verdict]} in {name}"
            if ev is not None:
                text += f": {ev.statistic} p-value {_fmt_p(ev.p_value)}, suspected target {_fmt_target(ev)}"
                if ev.note:
                    text += f" ({ev.note})"
            props = {"target": t.target, "verdict": t.verdict, "backdoor": ev.to_dict() if ev else None}
            uri = _artifact_uri(t, _primary_file(t))
            results.append(_sarif_result(rule, _SARIF_LEVEL[rule.severity], text + ".", uri, t.verdict, props))
        for f in t.files:
            for n, finding in enumerate(f.findings):
                rule = _rule_for(finding.code, finding.severity)
                used.setdefault(rule.id, rule)
                uri = _artifact_uri(t, f.path)
                props = {"severity": finding.severity, "sha256": f.sha256, "details": finding.details}
                results.append(
                    # the finding's place in the file's list keeps two findings with one message apart
                    _sarif_result(rule, _SARIF_LEVEL[finding.severity], f"{f.path}: {finding.message}", uri,
                                  finding.message if n == 0 else f"{finding.message}#{n}", props)
                )
        if t.verdict == "unsafe-file" and not any(f.findings for f in t.files):
            # a verdict code scanning must still show, even with no file finding to carry it
            rule = _RULES["unsafe-file"]
            used[rule.id] = rule
            uri = _artifact_uri(t, _primary_file(t))
            results.append(_sarif_result(rule, _SARIF_LEVEL[rule.severity], f"{VERDICT_WORDS[t.verdict]} in {name}.",
                                         uri, t.verdict, {"target": t.target, "verdict": t.verdict}))
        if t.verdict == "error":
            notifications.append({"level": "error", "message": {"text": f"{name}: {t.error or 'scan failed'}"}})

    rules = sorted(used.values(), key=lambda r: r.id)
    index = {r.id: i for i, r in enumerate(rules)}
    for r in results:
        r["ruleIndex"] = index[r["ruleId"]]

    sarif = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": TOOL_NAME,
                        "informationUri": INFORMATION_URI,
                        "version": report.tool_version,
                        **({"semanticVersion": report.tool_version} if _is_semver(report.tool_version) else {}),
                        "rules": [_sarif_rule(r) for r in rules],
                    }
                },
                "invocations": [
                    {
                        "executionSuccessful": not notifications,
                        "toolExecutionNotifications": notifications,
                        "startTimeUtc": report.created,
                    }
                ],
                "results": results,
                "properties": {"schema_version": report.schema_version, "summary": report.summary()},
            }
        ],
    }
    return json.dumps(sarif, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- Markdown and console


def _fmt_p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "n/a"
    if p < 1e-3:
        return f"{p:.2e}"
    return f"{p:.2g}" if p < 0.1 else f"{p:.3f}"  # two significant digits: 0.0014, not 0.001


def _fmt_target(ev: BackdoorEvidence | None) -> str:
    if ev is None or ev.suspected_target is None:
        return "-"
    return f"{ev.suspected_target} ({ev.suspected_label})" if ev.suspected_label else str(ev.suspected_target)


def _untested(t: TargetReport) -> bool:
    """A model verdict without detector evidence (a lone weight file): its p-value and target
    cells must not read like a passed test."""
    return t.backdoor is None and t.verdict in ("clean", "suspicious", "backdoored")


def _p_cell(t: TargetReport) -> str:
    return NOT_TESTED if _untested(t) else _fmt_p(t.backdoor.p_value if t.backdoor else None)


def _target_cell(t: TargetReport) -> str:
    return NOT_TESTED if _untested(t) else _fmt_target(t.backdoor)


def _notes(t: TargetReport) -> list[str]:
    """The target's own note, then the detector's."""
    return [n for n in (t.note, t.backdoor.note if t.backdoor else None) if n]


def _finding_place(t: TargetReport, f: FileReport) -> str:
    """Where a file finding is, target included: ``evil/pytorch_model.bin``, or the file itself."""
    if t.source == "file":
        return t.target
    return f"{t.target.rstrip('/')}/{f.path}"


def _verdict_text(t: TargetReport) -> str:
    words = VERDICT_WORDS[t.verdict]
    if t.verdict == "skipped" and t.skipped:
        return f"{words}: {t.skipped}"
    if t.verdict == "error" and t.error:
        return f"{words}: {t.error}"
    return words


def _unsafe_text(t: TargetReport, limit: int = 3) -> str:
    names = [f.path for f in t.unsafe_files]
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _md_cell(text: str) -> str:
    """Table cells must stay on one line and must not end the cell early. Text in them can come
    from a scanned file (a pickle's import names, a folder name), so HTML is escaped too: a job
    summary or PR comment renders ``<details>`` and would let a hostile file hide or fake lines."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_code(text: str) -> str:
    """``text`` as an inline code span that nothing in it can end early (CommonMark: a fence
    of more backticks than the longest run inside), on one line, safe in a table cell."""
    import re

    flat = str(text).replace("\r", " ").replace("\n", " ")
    longest = max((len(run) for run in re.findall(r"`+", flat)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") or longest else ""
    return f"{fence}{pad}{flat}{pad}{fence}".replace("|", "\\|")


def to_markdown(report: ScanReport) -> str:
    """A summary table for ``$GITHUB_STEP_SUMMARY`` or a PR comment, then unsafe-file details."""
    lines = [
        "## otbr-hub scan",
        "",
        "| Target | Verdict | p-value | Suspected target | Unsafe files |",
        "|---|---|---|---|---|",
    ]
    for t in report.targets:
        name = f"{t.target}@{t.revision}" if t.revision else t.target
        cells = [
            _md_code(name),
            _md_cell(_verdict_text(t)),
            _p_cell(t),
            _md_cell(_target_cell(t)),
            _md_cell(_unsafe_text(t)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not report.targets:
        lines.append("| (no targets) | | | | |")

    notes = [(t, n) for t in report.targets for n in _notes(t)]
    if notes:
        lines += ["", "### Notes", ""]
        for t, n in notes:
            lines.append(f"- {_md_code(t.target)}: {_md_cell(n)}")
    details = [(t, f, x) for t in report.targets for f in t.files for x in f.findings if x.severity in ("critical", "high")]
    if details:
        lines += ["", "### Unsafe file findings", ""]
        for t, f, x in details:
            lines.append(f"- **{x.severity}** `{x.code}` in {_md_code(f.path)} ({_md_cell(t.target)}): {_md_cell(x.message)}")
    counts = report.summary()["verdicts"]
    tally = ", ".join(f"{n} {VERDICT_WORDS[v].lower()}" for v, n in counts.items() if n)
    lines += ["", f"otbr-hub {report.tool_version}, {report.created}" + (f": {tally}." if tally else ".")]
    return "\n".join(lines) + "\n"


_VERDICT_STYLE = {
    "clean": "green",
    "suspicious": "yellow",
    "backdoored": "bold red",
    "unsafe-file": "bold red",
    "skipped": "dim",
    "error": "magenta",
}


def to_console(report: ScanReport, console: Any = None) -> None:
    """Print the summary table with ``rich``; reasons (skips, errors, notes, unsafe-file
    findings) go below it, one line each, so the table stays readable in 80 columns."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="otbr-hub scan")
    for column in ("Target", "Verdict", "p-value", "Suspected target", "Unsafe files"):
        table.add_column(column, overflow="fold")
    for t in report.targets:
        name = f"{t.target}@{t.revision}" if t.revision else t.target
        table.add_row(
            _escape(name),
            f"[{_VERDICT_STYLE[t.verdict]}]{_escape(VERDICT_WORDS[t.verdict])}[/]",
            _p_cell(t),
            _escape(_target_cell(t)),
            _escape(_unsafe_text(t)),
        )
    console.print(table)
    for t in report.targets:
        if t.verdict in ("skipped", "error") and (t.skipped or t.error):
            console.print(f"  [{_VERDICT_STYLE[t.verdict]}]{t.verdict}[/] {_escape(t.target)}: {_escape(t.skipped or t.error or '')}",
                          soft_wrap=True)
        for n in _notes(t):
            console.print(f"  [yellow]note[/] {_escape(t.target)}: {_escape(n)}", soft_wrap=True)
        for f in t.unsafe_files:
            for x in f.findings:
                if SEVERITY_RANK[x.severity] >= SEVERITY_RANK["high"]:
                    console.print(f"  [red]{x.severity}[/] {_escape(_finding_place(t, f))}: {_escape(x.message)}",
                                  soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --------------------------------------------------------------------------- writing


def render(report: ScanReport, fmt: str) -> str:
    """The report as text in one of ``FORMATS``; the console format is rendered without colour."""
    if fmt == "json":
        return to_json(report)
    if fmt == "sarif":
        return to_sarif(report)
    if fmt == "markdown":
        return to_markdown(report)
    if fmt == "console":
        from rich.console import Console

        buffer = io.StringIO()
        to_console(report, Console(file=buffer, width=120, no_color=True, highlight=False))
        return buffer.getvalue()
    raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def is_report_text(text: str) -> bool:
    """Whether ``text`` is a report that ``render`` wrote: JSON with this tool's name and schema
    version, SARIF whose driver is this tool, or Markdown/console text under this tool's title.
    Mentioning otbr-hub is not enough: a repaired model's README does that too."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        if data.get("tool") == TOOL_NAME and "schema_version" in data and "targets" in data:
            return True
        runs = data.get("runs")
        if data.get("version") != "2.1.0" or not isinstance(runs, list) or not runs:
            return False
        driver = (runs[0].get("tool") or {}).get("driver") if isinstance(runs[0], dict) else None
        return isinstance(driver, dict) and driver.get("name") == TOOL_NAME
    first = stripped.splitlines()[0].strip() if stripped else ""
    return first in ("## otbr-hub scan", "otbr-hub scan")


def write_text_atomically(target: Path, text: str) -> None:
    """Write a temporary sibling and move it into place, so a reader never sees half a report."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o7777  # an existing report keeps its permissions
    except FileNotFoundError:
        mode = 0o644  # mkstemp creates 0600; reports are meant to be shared
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: ScanReport, fmt: str, output_path: str | Path | None = None) -> None:
    """Print the report (``output_path`` None or ``"-"``), or write it to ``output_path``.

    A regular file is written atomically (temporary sibling, then ``os.replace``), so a CI
    step reading it never sees half a report. A symlink is followed and its target written,
    not replaced; a path that exists but is not a regular file (``/dev/null``, a FIFO) is
    written into directly, since replacing it would destroy it.
    """
    if output_path is None or os.fspath(output_path) == "-":
        if fmt == "console":
            to_console(report)
        else:
            print(render(report, fmt), end="")
        return
    text = render(report, fmt)
    target = Path(os.path.realpath(Path(output_path).expanduser()))
    if target.exists() and not target.is_file():
        if target.is_dir():
            raise UsageError(f"--output {output_path} is a folder; give a file name")
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(text)
        return
    write_text_atomically(target, text)


__all__ = [
    "BackdoorEvidence",
    "TargetReport",
    "ScanReport",
    "Finding",
    "FileReport",
    "SCHEMA_VERSION",
    "WEIGHT_FILE_ONLY_NOTE",
    "VERDICTS",
    "FORMATS",
    "FAIL_ON_LEVELS",
    "exit_code",
    "to_json",
    "to_sarif",
    "to_markdown",
    "to_console",
    "render",
    "is_report_text",
    "write_report",
    "tool_version",
    "json_schema",
]
