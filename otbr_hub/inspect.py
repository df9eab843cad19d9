"""Weight-file safety checks that never load or unpickle anything.

``scan`` must be safe to point at an untrusted repository, so this module only reads
bytes: pickle-based files are disassembled by ``picklescan`` (opcodes are listed, never
executed), safetensors headers are parsed and checked here, and shard indexes are read as
plain JSON. Each file yields a :class:`FileReport` whose findings say what is wrong and
how badly; a file is ``safe`` when no finding is ``high`` or ``critical``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickletools
import struct
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

Severity = Literal["critical", "high", "medium", "info"]
FileFormat = Literal["pickle", "torch-zip", "safetensors", "shard-index", "unknown"]

SEVERITY_RANK: dict[str, int] = {"info": 0, "medium": 1, "high": 2, "critical": 3}
UNSAFE_SEVERITIES = frozenset({"high", "critical"})

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".index.json"

# safetensors refuses headers above this size; a larger one is corrupt or hostile.
MAX_SAFETENSORS_HEADER = 100_000_000
# Shard indexes are a few hundred KiB at most; refuse to parse anything absurd.
MAX_INDEX_BYTES = 64 * 1024 * 1024
# One broken header can produce a finding per tensor; keep reports readable.
MAX_FINDINGS_PER_CODE = 20
# A checkpoint's pickle holds tensor metadata only (the data is stored beside it); a larger
# one is not read into memory, so that a small compressed file cannot exhaust it.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
# Legacy (pre-zip) torch files are five pickles in a row, starting with this number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Element width in bits of every dtype safetensors 0.8 knows (sub-byte floats included).
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

_TORCH_DTYPES = frozenset(
    {
        "float64", "float32", "float16", "bfloat16", "double", "float", "half",
        "complex32", "complex64", "complex128", "cfloat", "cdouble",
        "int64", "int32", "int16", "int8", "long", "int", "short",
        "uint64", "uint32", "uint16", "uint8", "bool",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    }
)  # fmt: skip
_TORCH_STORAGES = frozenset(
    f"{kind}Storage"
    for kind in (
        "Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
        "ComplexFloat", "ComplexDouble", "QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4",
        "Untyped", "Typed",
    )
)  # fmt: skip

# Globals a plain checkpoint needs: tensors, parameters, dtypes and containers. This
# mirrors what ``torch.load(weights_only=True)`` accepts, written out statically so the
# verdict does not depend on the installed torch version. Anything else is reported.
SAFE_GLOBALS: dict[str, frozenset[str]] = {
    "collections": frozenset({"OrderedDict", "Counter"}),
    "torch": _TORCH_DTYPES | _TORCH_STORAGES | {"Size", "Tensor", "device"},
    "torch._utils": frozenset(
        {
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
            "_rebuild_qtensor",
            "_rebuild_sparse_tensor",
            "_rebuild_nested_tensor",
            "_rebuild_meta_tensor_no_storage",
        }
    ),
    "torch._tensor": frozenset({"_rebuild_from_type_v2"}),
    "torch.nn.parameter": frozenset({"Parameter"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "_codecs": frozenset({"encode"}),
    "builtins": frozenset({"set", "bytearray", "complex"}),
    "numpy": frozenset({"dtype", "ndarray"}),
    "numpy.core.multiarray": frozenset({"_reconstruct"}),
    "numpy._core.multiarray": frozenset({"_reconstruct"}),
}

# picklescan logs every dangerous import as a warning ("...: dangerous import 'posix system'
# FOUND"). The same facts end up in our findings, so its records are kept from the root
# logger's handlers (the CLI's included, which would print them even under --quiet).
_PICKLESCAN_LOG = logging.getLogger("picklescan")
_PICKLESCAN_LOG.addHandler(logging.NullHandler())


@contextmanager
def _quiet_picklescan() -> Iterator[None]:
    """While picklescan runs, its log records go nowhere; afterwards the logger is as it was."""
    before = _PICKLESCAN_LOG.propagate
    _PICKLESCAN_LOG.propagate = False
    try:
        yield
    finally:
        _PICKLESCAN_LOG.propagate = before


@dataclass
class Finding:
    """One problem in one file. ``code`` is stable (SARIF rule id); ``message`` is for people."""

    severity: Severity
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "message": self.message, "details": self.details}


@dataclass
class FileReport:
    """What inspection learned about one file. ``path`` is relative to the scanned folder."""

    path: str
    format: FileFormat
    size: int
    sha256: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        """No high or critical finding: loading it cannot run code and its structure is sound."""
        return not any(f.severity in UNSAFE_SEVERITIES for f in self.findings)

    @property
    def worst_severity(self) -> Severity | None:
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITY_RANK.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "safe": self.safe,
            "findings": [f.to_dict() for f in self.findings],
        }


def is_weight_file(path: str | Path) -> bool:
    """Whether a file name is one of the weight formats this module inspects."""
    name = Path(path).name.lower()
    return (
        name.endswith(INDEX_SUFFIX)
        or name.endswith(SAFETENSORS_SUFFIX)
        or Path(name).suffix in PICKLE_SUFFIXES
    )


def inspect_folder(path: str | Path, *, compute_sha256: bool = True) -> list[FileReport]:
    """Inspect every weight file below ``path``, hidden folders included (only ``.git`` is
    skipped): files with a weight name, files under any other name whose content is a
    pickle or a PyTorch zip checkpoint (``torch.load`` does not care about the name), and
    every shard a shard index names, wherever it is (a loader opens those).

    A link that leads out of the folder is reported and not read: it could point at any
    file of the machine. Paths in the reports are POSIX paths relative to ``path``, so
    reports stay portable and can be used as SARIF artifact locations.
    """
    root = Path(path)
    # what to inspect, and whether a loader hands it to torch.load whatever its content
    wanted: dict[str, bool] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if _link_escapes(full, root):  # not even sniffed; reported when a loader would open it
                keep = is_weight_file(name)
            else:
                keep = (is_weight_file(name) or _pickle_content(full)) and full.is_file()
            if keep:
                wanted[full.relative_to(root).as_posix()] = False
    for index in [rel for rel in wanted if rel.lower().endswith(INDEX_SUFFIX)]:
        for shard in _index_shards(root / index):
            rel = PurePosixPath(index).parent.joinpath(shard).as_posix()
            if not _escapes_folder(shard) and ((root / rel).is_file() or (root / rel).is_symlink()):
                wanted[rel] = not rel.endswith(SAFETENSORS_SUFFIX)  # escaping or missing: the index's own report says so
    reports = []
    for rel, torch_loaded in sorted(wanted.items()):
        full = root / rel
        if _link_escapes(full, root):
            target = os.path.realpath(full)
            reports.append(FileReport(rel, "unknown", 0, None, [Finding(
                "high", "link-outside-folder",
                f"a link to {target}, outside the model folder; not read (a loader would follow it)", {"target": target})]))
        else:
            reports.append(inspect_file(full, compute_sha256=compute_sha256, display_path=rel, torch_loaded=torch_loaded))
    return reports


def _link_escapes(full: Path, root: Path) -> bool:
    """Whether ``full`` really lives outside ``root`` (a symlink, or a linked folder on the
    way). A Hugging Face cache snapshot links into its repo's ``blobs`` folder: allowed."""
    real = Path(os.path.realpath(full))
    base = Path(os.path.realpath(root))
    if real == base or base in real.parents:
        return False
    blobs = base.parent.parent / "blobs" if base.parent.name == "snapshots" else None
    if blobs is not None and blobs in real.parents:
        return False
    # git-annex and DVC link weights into the enclosing work tree's object store
    tree = next((p for p in [base, *base.parents] if (p / ".git").exists()), None)
    return not (tree is not None and tree in real.parents)


def _index_shards(path: Path) -> list[str]:
    """The shard file names an index lists (empty when it cannot be read)."""
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            return []
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return []
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return []
    return sorted({v for v in weight_map.values() if isinstance(v, str)})


def _pickle_content(path: Path) -> bool:
    """A file whose bytes are a pickle, or a zip archive holding one (PyTorch's format)."""
    try:
        if not path.is_file():
            return False
        with path.open("rb") as fh:
            kind = _sniff(fh.read(16))
        if kind == "pickle":
            return True
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                return any(n.endswith(".pkl") for n in archive.namelist())
    except (OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile):
        return False
    return False


def inspect_file(
    path: str | Path, *, compute_sha256: bool = True, display_path: str | None = None, torch_loaded: bool = False
) -> FileReport:
    """Inspect one file without loading it. The format comes from the name, checked by content;
    ``torch_loaded``: a loader will hand it to ``torch.load`` whatever its name (a shard an
    index names), so content that is neither safetensors nor a zip is read as a pickle."""
    path = Path(path)
    shown = display_path if display_path is not None else str(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as err:
        return FileReport(shown, "unknown", 0, None, [_unreadable(err)])

    report = FileReport(shown, _declared_format(path, head), size)
    if torch_loaded and report.format == "unknown":
        report.format = "pickle"
    try:
        if compute_sha256:
            report.sha256 = _sha256(path)
        _check(path, head, report)
    except OSError as err:
        report.findings.append(_unreadable(err))
    except Exception as err:  # a file built to crash the checks must not hide what is next to it
        report.findings.append(Finding("high", "inspect-failed",
                                       f"the file could not be inspected ({type(err).__name__}); treat it as unsafe", {}))
    report.findings = _cap_findings(report.findings)
    return report


# --------------------------------------------------------------------------- dispatch


def _sniff(head: bytes) -> str:
    """Content kind from the first bytes: 'zip', 'pickle', 'safetensors' or 'unknown'."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _declared_format(path: Path, head: bytes) -> FileFormat:
    name = path.name.lower()
    if name.endswith(INDEX_SUFFIX):
        return "shard-index"
    kind = _sniff(head)
    if name.endswith(SAFETENSORS_SUFFIX):
        return "safetensors"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "safetensors" if kind == "safetensors" else ("torch-zip" if kind == "zip" else "pickle")
    return {"zip": "torch-zip", "pickle": "pickle", "safetensors": "safetensors"}.get(kind, "unknown")  # type: ignore[return-value]


def _check(path: Path, head: bytes, report: FileReport) -> None:
    kind = _sniff(head)
    name = path.name.lower()
    if report.format == "shard-index":
        report.findings += _check_index(path)
    elif name.endswith(SAFETENSORS_SUFFIX) and kind in ("zip", "pickle"):
        # Some tools pick the loader from the content, so a pickle in disguise is hostile.
        report.format = "torch-zip" if kind == "zip" else "pickle"
        report.findings.append(
            Finding(
                "high",
                "format-mismatch",
                f"file is named .safetensors but contains a {'zip archive' if kind == 'zip' else 'pickle'}",
                {"content": kind},
            )
        )
        report.findings += _check_pickle(path, is_zip=kind == "zip")
    elif report.format == "safetensors":
        if not name.endswith(SAFETENSORS_SUFFIX):
            report.findings.append(
                Finding("medium", "format-mismatch", "file has a pickle extension but a safetensors header", {})
            )
        report.findings += _check_safetensors(path)
    elif report.format in ("pickle", "torch-zip"):
        report.findings += _check_pickle(path, is_zip=kind == "zip")
    else:
        report.findings.append(
            Finding("info", "unknown-format", "not a recognised weight format; content was not inspected", {})
        )


def _unreadable(err: OSError) -> Finding:
    return Finding("high", "file-unreadable", f"could not read the file: {err.strerror or err}", {})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cap_findings(findings: list[Finding]) -> list[Finding]:
    """Keep the first few findings of each code and summarise the rest in one line."""
    seen: Counter[str] = Counter()
    kept: list[Finding] = []
    for f in findings:
        seen[f.code] += 1
        if seen[f.code] <= MAX_FINDINGS_PER_CODE:
            kept.append(f)
    for code, count in seen.items():
        if count > MAX_FINDINGS_PER_CODE:
            worst = max((f.severity for f in findings if f.code == code), key=SEVERITY_RANK.__getitem__)
            extra = count - MAX_FINDINGS_PER_CODE
            kept.append(Finding(worst, code, f"{extra} more '{code}' findings omitted", {"omitted": extra}))
    return kept


# --------------------------------------------------------------------------- pickles


def _is_safe_global(module: str, name: str) -> bool:
    allowed = SAFE_GLOBALS.get(module)
    return allowed is not None and name in allowed


def _check_pickle(path: Path, *, is_zip: bool) -> list[Finding]:
    """List the globals a pickle would import and flag every one outside the allowlist."""
    from picklescan.scanner import SafetyLevel, scan_file_path

    findings = _pickle_structure(path, is_zip=is_zip)
    if any(f.code == "pickle-too-large" for f in findings):
        return findings  # not read into memory
    try:
        with _quiet_picklescan():
            result = scan_file_path(str(path))
    except Exception as err:  # picklescan raises plain exceptions on files it cannot parse
        return [
            Finding(
                "high",
                "pickle-scan-failed",
                f"picklescan could not analyse the file ({type(err).__name__}: {err}); its imports are unknown",
                {"error": str(err)},
            )
        ]

    seen: set[tuple[str, str]] = set()
    for g in result.globals:
        key = (g.module, g.name)
        if key in seen:
            continue
        seen.add(key)
        qualified = f"{g.module}.{g.name}"
        details = {"module": g.module, "name": g.name, "picklescan": g.safety.value}
        if g.safety is SafetyLevel.Dangerous:
            findings.append(
                Finding("critical", "pickle-unsafe-import", f"unpickling imports {qualified}, which can run code", details)
            )
        elif not _is_safe_global(g.module, g.name):
            findings.append(
                Finding(
                    "high",
                    "pickle-unlisted-import",
                    f"unpickling imports {qualified}, which is not on the weights allowlist",
                    details,
                )
            )

    if result.scan_err and not findings:
        findings.append(
            Finding("medium", "pickle-parse-error", "the pickle stream is malformed after some opcodes", {})
        )
    return findings


def _pickle_structure(path: Path, *, is_zip: bool) -> list[Finding]:
    """What the import scan relies on: it sees exactly the pickles a loader would run.

    picklescan lists imports with ``pickletools``, which stops at opcodes the real unpickler
    accepts (``I0x1``: ``int(x, 0)``), and reads zip entries by name, so of two entries with
    one name it sees the last while torch reads the first. Each pickle must therefore parse
    to its end here, zip entry names must be unique, no pickle may be too large to read, and
    torch's old tar format (its members are pickles too) is refused outright.
    """
    import tarfile

    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                names = Counter(i.filename for i in infos)
                dupes = sorted(n for n, k in names.items() if k > 1)
                if dupes:
                    return [Finding("critical", "zip-duplicate-entry",
                                    f"the archive holds {len(dupes)} name(s) twice ({', '.join(dupes[:3])}): loaders "
                                    "disagree on which copy they read, so the one torch unpickles may not be the one inspected",
                                    {"entries": dupes[:50]})]
                pickles = [i for i in infos if i.filename.endswith(".pkl")]
                if not pickles:
                    return [Finding("medium", "pickle-parse-error", "zip archive holds no pickle (.pkl) entry", {})]
                for info in pickles:
                    if info.file_size > MAX_PICKLE_BYTES:
                        return [_too_large(info.filename, info.file_size)]
                    with archive.open(info) as fh:
                        problem = _unparsable(fh, count=1)
                    if problem:
                        return [_unparsable_finding(f"{info.filename}: {problem}")]
                return []
        if tarfile.is_tarfile(path):
            return [Finding("high", "legacy-tar-checkpoint",
                            "torch's old tar checkpoint format: its members are pickles that are not inspected; "
                            "re-save the weights as safetensors", {})]
        with path.open("rb") as fh:
            first = fh.read(1)
            if not first or pickletools.code2op.get(first.decode("latin-1")) is None:
                # an unpickler stops at once on this byte: not a pickle, and nothing to run
                return [Finding("medium", "pickle-parse-error", f"not a pickle (first byte {first!r})", {})]
            fh.seek(0)
            problem = _unparsable(fh, count=None)
        return [_unparsable_finding(problem)] if problem else []
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, ValueError) as err:
        return [Finding("high", "pickle-scan-failed", f"the archive cannot be read ({type(err).__name__}: {err}); "
                        "its imports are unknown", {"error": str(err)})]


def _too_large(name: str, size: int) -> Finding:
    return Finding("high", "pickle-too-large", f"{name} unpacks to {size} bytes, more than a checkpoint's pickle "
                   f"needs ({MAX_PICKLE_BYTES} at most are inspected); not read, imports unknown", {"bytes": size})


def _unparsable_finding(problem: str) -> Finding:
    return Finding("high", "pickle-unparsable", f"the pickle cannot be parsed to its end ({problem}), so its imports "
                   "are unknown; an unpickler may still run it", {"problem": problem})


def _unparsable(stream: IO[bytes], *, count: int | None) -> str | None:
    """Why the first ``count`` pickles of ``stream`` do not parse to their STOP, or None.
    ``count=None``: a plain file, whose first pickle must parse; when it is the legacy torch
    magic number, the five pickles of that format must (raw tensor bytes follow them)."""
    wanted = count or 1
    done = 0
    while done < wanted:
        try:
            first = None
            for op, arg, _pos in pickletools.genops(stream):
                if first is None and op.name not in ("PROTO", "FRAME"):
                    first = arg
        except Exception as err:  # what pickletools cannot read, picklescan cannot either
            return f"pickle {done + 1}: {err}"
        if count is None and done == 0 and first == _LEGACY_MAGIC:
            wanted = 5
        done += 1
    return None


# --------------------------------------------------------------------------- safetensors


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: duplicate keys let two parsers see two different files."""
    counts = Counter(k for k, _ in pairs)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        raise _DuplicateKeys(dupes)
    return dict(pairs)


class _DuplicateKeys(ValueError):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(", ".join(keys))
        self.keys = keys


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_safetensors(path: Path) -> list[Finding]:
    """Validate the header against the file, the way a strict loader would, without reading data."""
    size = path.stat().st_size
    if size < 8:
        return [Finding("high", "safetensors-truncated", f"file has {size} bytes, fewer than the 8-byte header length", {})]
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_SAFETENSORS_HEADER:
            return [
                Finding(
                    "high",
                    "safetensors-bad-header",
                    f"header length {header_len} exceeds the {MAX_SAFETENSORS_HEADER}-byte limit",
                    {"header_length": header_len},
                )
            ]
        if header_len > size - 8:
            return [
                Finding(
                    "high",
                    "safetensors-truncated",
                    f"header length {header_len} runs past the end of the {size}-byte file",
                    {"header_length": header_len, "file_size": size},
                )
            ]
        raw = fh.read(header_len)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKeys as err:
        return [
            Finding("high", "safetensors-bad-header", f"header repeats keys: {err}", {"duplicate_keys": err.keys[:50]})
        ]
    except (UnicodeDecodeError, ValueError) as err:
        return [Finding("high", "safetensors-bad-header", f"header is not valid UTF-8 JSON: {err}", {})]
    if not isinstance(header, dict):
        return [Finding("high", "safetensors-bad-header", "header is not a JSON object", {})]

    findings: list[Finding] = []
    if "__metadata__" in header:
        findings += _check_metadata(header.pop("__metadata__"))
    data_len = size - 8 - header_len
    findings += _check_tensors(header, data_len)
    return findings


def _check_metadata(meta: Any) -> list[Finding]:
    if not isinstance(meta, dict):
        return [Finding("high", "safetensors-bad-metadata", "__metadata__ is not an object", {})]
    bad = sorted(k for k, v in meta.items() if not isinstance(v, str))
    if bad:
        return [
            Finding(
                "high",
                "safetensors-bad-metadata",
                f"__metadata__ values must be strings; not for {', '.join(bad[:5])}",
                {"keys": bad[:50]},
            )
        ]
    return []


def _check_tensors(header: dict[str, Any], data_len: int) -> list[Finding]:
    findings: list[Finding] = []
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        where = {"tensor": name}
        if not isinstance(info, dict):
            findings.append(Finding("high", "safetensors-bad-header", f"entry for {name!r} is not an object", where))
            continue
        extra = sorted(set(info) - {"dtype", "shape", "data_offsets"})
        if extra:
            findings.append(
                Finding("medium", "safetensors-unexpected-field", f"{name!r} has unknown fields {extra}", where)
            )
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
            findings.append(Finding("high", "safetensors-bad-header", f"{name!r} has an invalid shape {shape!r}", where))
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
            findings.append(
                Finding("high", "safetensors-bad-header", f"{name!r} has invalid data_offsets {offsets!r}", where)
            )
            continue
        begin, end = offsets
        if end < begin:
            findings.append(
                Finding("high", "safetensors-bad-offsets", f"{name!r} ends before it begins ({begin} > {end})", where)
            )
            continue
        spans.append((begin, end, name))
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
            findings.append(
                Finding("high", "safetensors-unknown-dtype", f"{name!r} has unknown dtype {dtype!r}", {**where, "dtype": dtype})
            )
            continue
        bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            findings.append(
                Finding(
                    "high",
                    "safetensors-size-mismatch",
                    f"{name!r} spans {end - begin} bytes but {dtype}{shape} needs {bits / 8:g}",
                    {**where, "expected_bytes": bits / 8, "actual_bytes": end - begin},
                )
            )
    findings += _check_layout(spans, data_len)
    return findings


def _check_layout(spans: list[tuple[int, int, str]], data_len: int) -> list[Finding]:
    """Tensors must tile the data section exactly: from 0, no gaps, no overlaps, to the end."""
    findings: list[Finding] = []
    cursor = 0
    previous = None
    for begin, end, name in sorted(spans):
        where = {"tensor": name, "data_offsets": [begin, end]}
        if begin < cursor:
            findings.append(
                Finding("high", "safetensors-bad-offsets", f"{name!r} overlaps {previous!r} at byte {begin}", where)
            )
        elif begin > cursor:
            findings.append(
                Finding("high", "safetensors-bad-offsets", f"{begin - cursor} unaccounted bytes before {name!r}", where)
            )
        if end > data_len:
            findings.append(
                Finding(
                    "high",
                    "safetensors-truncated",
                    f"{name!r} ends at byte {end} but the data section has {data_len}",
                    {**where, "data_length": data_len},
                )
            )
        cursor = max(cursor, end)
        previous = name
    if cursor < data_len:
        findings.append(
            Finding(
                "high",
                "safetensors-bad-offsets",
                f"{data_len - cursor} trailing bytes after the last tensor",
                {"data_length": data_len, "covered": cursor},
            )
        )
    return findings


# --------------------------------------------------------------------------- shard indexes


def _check_index(path: Path) -> list[Finding]:
    """An index names the shard files a loader will open; they must stay inside the folder."""
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        return [Finding("medium", "shard-index-invalid", f"index is {size} bytes; refusing to parse it", {})]
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        return [Finding("medium", "shard-index-invalid", f"index is not valid JSON: {err}", {})]
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return [Finding("medium", "shard-index-invalid", "index has no weight_map of tensor name to file name", {})]

    findings: list[Finding] = []
    for shard in sorted(set(weight_map.values())):
        if _escapes_folder(shard):
            findings.append(
                Finding(
                    "high",
                    "shard-index-path-escape",
                    f"index points outside the model folder: {shard!r}",
                    {"shard": shard},
                )
            )
        elif not (path.parent / shard).is_file():
            findings.append(
                Finding("medium", "shard-index-missing-shard", f"shard {shard!r} is not present", {"shard": shard})
            )
    return findings


def _escapes_folder(name: str) -> bool:
    normalized = name.replace("\\", "/")
    pure = PurePosixPath(normalized)
    return pure.is_absolute() or ".." in pure.parts or (len(normalized) > 1 and normalized[1] == ":")


__all__ = [
    "Finding",
    "FileReport",
    "SEVERITY_RANK",
    "SAFE_GLOBALS",
    "inspect_file",
    "inspect_folder",
    "is_weight_file",
]
