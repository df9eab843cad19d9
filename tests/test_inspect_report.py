"""Weight-file inspection and scan report rendering: no model, no detector, CPU only."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

from otbr_hub.errors import UsageError
from otbr_hub.inspect import FileReport, Finding, inspect_file, inspect_folder
from otbr_hub.report import (
    BackdoorEvidence,
    ScanReport,
    TargetReport,
    exit_code,
    json_schema,
    render,
    to_json,
    to_markdown,
    to_sarif,
    write_report,
)

# --------------------------------------------------------------------------- helpers


class _WritesMarker:
    """Unpickling this runs ``exec`` and creates a file: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _codes(report: FileReport) -> set[str]:
    return {f.code for f in report.findings}


def _write_safetensors(path: Path, header: dict, data: bytes, *, length: int | None = None) -> Path:
    """Raw safetensors bytes, so tests can forge any header the library would refuse to write."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _f32(offsets: list[int], shape: list[int], dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


# --------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("payload", [_WritesMarker, _RunsShell])
def test_malicious_pickle_is_critical_and_never_runs(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(payload(marker)))

    report = inspect_file(evil)

    assert not marker.exists(), "inspection must not unpickle"
    assert not report.safe
    critical = [f for f in report.findings if f.severity == "critical"]
    assert critical and critical[0].code == "pickle-unsafe-import"
    assert critical[0].details["name"] in ("exec", "system")
    # The payload is live: loading it really would have written the marker.
    pickle.loads(evil.read_bytes())
    assert marker.exists()


def test_malicious_object_inside_torch_zip(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "x": _WritesMarker(marker)}, path)

    report = inspect_file(path)

    assert report.format == "torch-zip"
    assert "pickle-unsafe-import" in _codes(report)
    assert not report.safe and not marker.exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_clean_state_dict_is_safe(tmp_path: Path, zipped: bool) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path, _use_new_zipfile_serialization=zipped)

    report = inspect_file(path)

    assert report.safe and report.findings == []
    assert report.format == ("torch-zip" if zipped else "pickle")
    assert report.size == path.stat().st_size and len(report.sha256 or "") == 64


def test_unlisted_global_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "training_args.bin"
    path.write_bytes(pickle.dumps(Path("x")))  # harmless class, but not plain weights

    report = inspect_file(path)

    assert not report.safe
    (finding,) = report.findings
    assert finding.code == "pickle-unlisted-import" and finding.severity == "high"


def test_pickle_named_safetensors_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_RunsShell(tmp_path / "m")))

    report = inspect_file(path)

    assert {"format-mismatch", "pickle-unsafe-import"} <= _codes(report)


# --------------------------------------------------------------------------- safetensors


def test_valid_safetensors_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(
        {"a": torch.ones(2, 3), "b": torch.zeros(5, dtype=torch.bfloat16), "c": torch.ones(0)},
        str(path),
        metadata={"format": "pt"},
    )

    report = inspect_file(path)

    assert report.format == "safetensors"
    assert report.safe and report.findings == []


@pytest.mark.parametrize(
    ("name", "header", "data", "length", "code"),
    [
        ("length past end", {"a": _f32([0, 16], [4])}, bytes(16), 10_000, "safetensors-truncated"),
        ("length over limit", {"a": _f32([0, 16], [4])}, bytes(16), 2**40, "safetensors-bad-header"),
        ("overlap", {"a": _f32([0, 16], [4]), "b": _f32([8, 24], [4])}, bytes(24), None, "safetensors-bad-offsets"),
        ("gap", {"a": _f32([0, 16], [4]), "b": _f32([20, 36], [4])}, bytes(36), None, "safetensors-bad-offsets"),
        ("data past end", {"a": _f32([0, 16], [4])}, bytes(12), None, "safetensors-truncated"),
        ("trailing bytes", {"a": _f32([0, 16], [4])}, bytes(20), None, "safetensors-bad-offsets"),
        ("unknown dtype", {"a": _f32([0, 16], [4], "F128")}, bytes(16), None, "safetensors-unknown-dtype"),
        ("size vs shape", {"a": _f32([0, 16], [3])}, bytes(16), None, "safetensors-size-mismatch"),
        ("bad metadata", {"__metadata__": {"epoch": 3}, "a": _f32([0, 16], [4])}, bytes(16), None, "safetensors-bad-metadata"),
        ("bad shape", {"a": _f32([0, 16], [-4])}, bytes(16), None, "safetensors-bad-header"),
    ],
)
def test_corrupt_safetensors_is_reported(
    tmp_path: Path, name: str, header: dict, data: bytes, length: int | None, code: str
) -> None:
    path = _write_safetensors(tmp_path / "model.safetensors", header, data, length=length)

    report = inspect_file(path)

    assert code in _codes(report), (name, report.findings)
    assert not report.safe


def test_truncated_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(8)}, str(path))
    path.write_bytes(path.read_bytes()[:-4])
    assert "safetensors-truncated" in _codes(inspect_file(path))

    path.write_bytes(b"\x01\x02")
    assert "safetensors-truncated" in _codes(inspect_file(path))


def test_duplicate_header_keys(tmp_path: Path) -> None:
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    report = inspect_file(path)
    assert "safetensors-bad-header" in _codes(report) and "repeats" in report.findings[0].message


# --------------------------------------------------------------------------- folders and indexes


def test_folder_walk_and_shard_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00001.safetensors", "b": "../../etc/passwd", "c": "gone.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "junk.bin").write_bytes(b"not scanned")

    reports = {r.path: r for r in inspect_folder(tmp_path)}

    assert set(reports) == {"model-00001-of-00001.safetensors", "model.safetensors.index.json"}
    assert reports["model-00001-of-00001.safetensors"].safe
    idx = reports["model.safetensors.index.json"]
    assert idx.format == "shard-index"
    assert {"shard-index-path-escape", "shard-index-missing-shard"} <= _codes(idx)
    assert not idx.safe


def test_folder_walk_finds_pickles_under_any_name_and_in_hidden_folders(tmp_path: Path) -> None:
    """torch.load reads a pickle whatever it is called, so content decides, not only the name;
    hidden folders are walked too (only .git is not)."""
    marker = tmp_path / "marker.txt"
    model = tmp_path / "model"
    (model / ".cache").mkdir(parents=True)
    (model / ".cache" / "x.bin").write_bytes(pickle.dumps(_RunsShell(marker)))
    (model / "weights.dat").write_bytes(pickle.dumps(_WritesMarker(marker)))
    torch.save({"w": torch.ones(2)}, model / "checkpoint.data")  # a zip holding data.pkl
    (model / "notes.txt").write_text("plain text")
    with zipfile.ZipFile(model / "images.zip", "w") as archive:
        archive.writestr("a.png", b"not a pickle")

    reports = {r.path: r for r in inspect_folder(model)}

    assert set(reports) == {".cache/x.bin", "weights.dat", "checkpoint.data"}
    assert "pickle-unsafe-import" in _codes(reports[".cache/x.bin"]) and "pickle-unsafe-import" in _codes(reports["weights.dat"])
    assert reports["checkpoint.data"].format == "torch-zip" and reports["checkpoint.data"].safe
    assert not marker.exists()


# --------------------------------------------------------------------------- what the import scan cannot see


def _shell_ops(marker: Path) -> bytes:
    """Protocol-0 opcodes that call ``os.system`` (GLOBAL, MARK, STRING, TUPLE, REDUCE, STOP)."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def _torch_zip(path: Path, *entries: tuple[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
        archive.writestr("archive/version", "3\n")
    return path


def test_pickles_the_import_scan_cannot_parse_are_unsafe(tmp_path: Path) -> None:
    """pickletools stops at ``I0x1`` (the unpickler reads it with int(x, 0)), so what follows
    is never listed; a pickle that cannot be parsed to its end has unknown imports."""
    marker = tmp_path / "marker.txt"
    hexint = b"\x80\x02I0x1\n0" + _shell_ops(marker)
    (tmp_path / "hex.pkl").write_bytes(hexint)
    _torch_zip(tmp_path / "hex.bin", ("archive/data.pkl", hexint))
    for name in ("hex.pkl", "hex.bin"):
        report = inspect_file(tmp_path / name)
        assert not report.safe and "pickle-unparsable" in _codes(report), (name, report.findings)
    # a file that is not a pickle at all is noted, not called unsafe: an unpickler stops at its first byte
    (tmp_path / "other.bin").write_bytes(b"\x00\x01 raw bytes")
    assert inspect_file(tmp_path / "other.bin").safe
    assert not marker.exists()


def test_zip_with_two_entries_of_one_name_is_critical(tmp_path: Path) -> None:
    """torch reads the first of two same-named entries, Python's zipfile (and picklescan) the last."""
    marker = tmp_path / "marker.txt"
    evil = b"\x80\x02" + _shell_ops(marker)
    with pytest.warns(UserWarning, match="Duplicate name"):
        _torch_zip(tmp_path / "dup.bin", ("archive/data.pkl", evil), ("archive/data.pkl", pickle.dumps({}, 2)))
    report = inspect_file(tmp_path / "dup.bin")
    assert "zip-duplicate-entry" in _codes(report) and report.worst_severity == "critical"
    assert not marker.exists()


def test_legacy_tar_checkpoint_and_oversized_pickles_are_not_read(tmp_path: Path, monkeypatch) -> None:
    import io
    import tarfile

    from otbr_hub import inspect as inspect_mod

    marker = tmp_path / "marker.txt"
    with tarfile.open(tmp_path / "old.bin", "w") as archive:
        for name in ("sys_info", "storages", "tensors", "pickle"):
            data = b"\x80\x02" + _shell_ops(marker) if name == "storages" else pickle.dumps({}, 2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert "legacy-tar-checkpoint" in _codes(inspect_file(tmp_path / "old.bin"))
    # the zip-bomb guard: an entry claiming more than the limit is not decompressed
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    monkeypatch.setattr(inspect_mod, "MAX_PICKLE_BYTES", 16)
    report = inspect_file(tmp_path / "ok.pt")
    assert _codes(report) == {"pickle-too-large"} and not report.safe
    assert not marker.exists()


def test_folder_inspects_what_an_index_names_and_no_link_out_of_it(tmp_path: Path) -> None:
    """A shard index makes a loader open files a name-based walk skips (.git, no weight
    suffix); a link out of the folder is reported without being read."""
    marker = tmp_path / "marker.txt"
    model = tmp_path / "model"
    (model / ".git").mkdir(parents=True)
    (model / ".git" / "evil.bin").write_bytes(pickle.dumps(_RunsShell(marker)))
    (model / "weights.shard").write_bytes(_shell_ops(marker))  # protocol 0: no \x80 header to sniff
    index = {"weight_map": {"a": ".git/evil.bin", "b": "weights.shard"}}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (model / "passwd.bin").symlink_to("/etc/passwd")
    (model / "fine.safetensors").symlink_to(_write_safetensors(tmp_path / "real.safetensors", {}, b""))
    reports = {r.path: r for r in inspect_folder(model)}
    assert not reports[".git/evil.bin"].safe and not reports["weights.shard"].safe
    assert _codes(reports["passwd.bin"]) == {"link-outside-folder"} and reports["passwd.bin"].sha256 is None
    assert "fine.safetensors" in reports  # a link inside is followed; this one leaves, and is reported
    assert _codes(reports["fine.safetensors"]) == {"link-outside-folder"}
    # a Hugging Face cache snapshot links into its repo's blobs: that is where the files live
    snapshot = tmp_path / "models--a--b" / "snapshots" / "0123abc"
    (tmp_path / "models--a--b" / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    blob = _write_safetensors(tmp_path / "models--a--b" / "blobs" / "f00d", {}, b"")
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    (cached,) = inspect_folder(snapshot)
    assert cached.safe and cached.format == "safetensors"
    assert not marker.exists()


def test_a_file_that_crashes_the_checks_is_unsafe_and_hides_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    model = tmp_path / "model"
    model.mkdir()
    raw = b"[" * 100_000 + b"]" * 100_000  # deeper than the JSON parser's recursion limit
    (model / "deep.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    _write_safetensors(model / "odd.safetensors", {"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsShell(marker)))
    reports = {r.path: r for r in inspect_folder(model)}
    assert _codes(reports["deep.safetensors"]) == {"inspect-failed"}
    assert not reports["odd.safetensors"].safe and "pickle-unsafe-import" in _codes(reports["pytorch_model.bin"])
    assert not marker.exists()


def test_loading_refuses_what_inspection_calls_unsafe(tmp_path: Path) -> None:
    """repair loads folders too: an unsafe weight file stops it before torch.load sees it."""
    from otbr_hub.errors import UnsupportedModelError
    from otbr_hub.load import load_folder
    from tiny import timm_folder

    marker = tmp_path / "marker.txt"
    folder = timm_folder(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsShell(marker)))
    with pytest.raises(UnsupportedModelError, match="refusing to load pytorch_model.bin: unpickling imports"):
        load_folder(folder)
    (folder / "pytorch_model.bin").unlink()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.bin"}}))
    with pytest.raises(UnsupportedModelError, match="lies outside the model folder"):
        load_folder(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------- reports


def _clean_file() -> FileReport:
    return FileReport("model.safetensors", "safetensors", 128, "0" * 64)


def _unsafe_file() -> FileReport:
    finding = Finding("critical", "pickle-unsafe-import", "unpickling imports posix.system", {"module": "posix"})
    return FileReport("pytorch_model.bin", "torch-zip", 256, "a" * 64, [finding])


def _evidence(p: float, target: int | None) -> BackdoorEvidence:
    return BackdoorEvidence(
        statistic="mmbd-max-margin",
        p_value=p,
        suspected_target=target,
        suspected_label=None if target is None else "cat",
        per_class=[13.0, 58.0, float("nan")],
        thresholds={"p_value": 0.05},
        weight_evidence={"note": "none"},
    )


def _target(verdict: str, **kw) -> TargetReport:
    defaults = {"files": [_clean_file()], "timings": {"inspect": 0.1}}
    if verdict in ("clean", "suspicious", "backdoored"):
        defaults["backdoor"] = _evidence(0.3 if verdict == "clean" else 1e-11, None if verdict == "clean" else 1)
    return TargetReport(target=kw.pop("target", f"models/{verdict}"), source=kw.pop("source", "folder"), verdict=verdict, **{**defaults, **kw})


def _full_report() -> ScanReport:
    return ScanReport(
        targets=[
            _target("clean"),
            _target("suspicious"),
            _target("backdoored", target="org/model", source="hub", revision="abc123"),
            _target("unsafe-file", files=[_unsafe_file(), _clean_file()]),
            _target("skipped", files=[], skipped="not an image classifier"),
            _target("error", files=[], error="out of memory | retry"),
        ],
        settings={"p_threshold": 0.05, "fail_on": "backdoored"},
    )


def test_json_validates_against_schema() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)

    for report in (_full_report(), ScanReport()):
        data = json.loads(to_json(report))
        validator.validate(data)
    data = json.loads(to_json(_full_report()))
    assert data["schema_version"] == "1.2" and schema["$id"].endswith(":1.2")
    assert data["targets"][2]["backdoor"]["p_value"] == pytest.approx(1e-11)
    assert data["targets"][2]["backdoor"]["per_class"][2] is None  # NaN is not JSON
    assert data["targets"][4]["backdoor"] is None
    assert data["summary"]["unsafe_files"] == 1

    data["targets"][0]["verdict"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(data)


def test_sarif_structure() -> None:
    sarif = json.loads(to_sarif(_full_report()))

    assert sarif["version"] == "2.1.0" and "sarif" in sarif["$schema"]
    (run,) = sarif["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "otbr-hub" and driver["informationUri"].startswith("https://") and driver["version"]
    rule_ids = [r["id"] for r in driver["rules"]]
    assert len(rule_ids) == len(set(rule_ids))
    for rule in driver["rules"]:
        assert {"id", "shortDescription", "fullDescription", "helpUri", "defaultConfiguration"} <= set(rule)
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"]
        assert rule["defaultConfiguration"]["level"] in ("error", "warning", "note")
    for result in run["results"]:
        assert result["ruleId"] in rule_ids and rule_ids[result["ruleIndex"]] == result["ruleId"]
        assert result["level"] in ("error", "warning", "note") and result["message"]["text"]
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert uri and not uri.startswith("/")
    by_rule = {r["ruleId"]: r for r in run["results"]}
    assert set(by_rule) == {"backdoor-suspicious", "backdoor-detected", "pickle-unsafe-import"}
    assert by_rule["backdoor-detected"]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == (
        "https://huggingface.co/org/model/blob/abc123/model.safetensors"
    )
    assert by_rule["pickle-unsafe-import"]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == (
        "models/unsafe-file/pytorch_model.bin"
    )
    assert run["invocations"][0]["executionSuccessful"] is False


def test_markdown_table() -> None:
    md = to_markdown(_full_report())

    assert "| Target | Verdict | p-value | Suspected target | Unsafe files |" in md
    assert "| `org/model@abc123` | Backdoor detected | 1.00e-11 | 1 (cat) | none |" in md
    assert "| `models/unsafe-file` | Unsafe file |" in md and "pytorch_model.bin" in md
    assert "out of memory \\| retry" in md  # a pipe in a message must not break the table
    assert "Skipped: not an image classifier" in md


def test_console_render() -> None:
    text = render(_full_report(), "console")
    assert "Backdoor detected" in text and "org/model@abc123" in text
    # a finding line names the target as well as the file
    assert any(line.strip().startswith("critical models/unsafe-file/pytorch_model.bin: unpickling imports posix.system")
               for line in text.splitlines()), text
    # reasons go under the table, whole, on lines of their own
    assert any(line.strip().startswith("skipped ") and "not an image classifier" in line for line in text.splitlines())
    assert any(line.strip().startswith("error ") and "out of memory | retry" in line for line in text.splitlines())
    with pytest.raises(UsageError):
        render(_full_report(), "xml")


def test_write_report_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "out" / "scan.sarif"
    write_report(_full_report(), "sarif", out)
    write_report(_full_report(), "sarif", out)  # overwriting in place works too

    assert json.loads(out.read_text())["version"] == "2.1.0"
    assert [p.name for p in out.parent.iterdir()] == ["scan.sarif"]


def test_write_report_writes_through_a_symlink(tmp_path: Path) -> None:
    """The symlink stays a symlink; the file it points at gets the report."""
    real = tmp_path / "reports" / "scan.json"
    real.parent.mkdir()
    real.write_text("old")
    real.chmod(0o600)
    link = tmp_path / "latest.json"
    link.symlink_to(real)

    write_report(_full_report(), "json", link)

    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())["tool"] == "otbr-hub"
    assert real.stat().st_mode & 0o777 == 0o600  # an existing report keeps its permissions
    assert sorted(p.name for p in real.parent.iterdir()) == ["scan.json"]  # no temporary left over


def test_write_report_writes_into_a_fifo(tmp_path: Path) -> None:
    """A FIFO (like /dev/null, a non-regular file) is written into, never replaced by a file."""
    import stat
    import threading

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()

    write_report(_full_report(), "json", fifo)
    reader.join(timeout=30)

    assert not reader.is_alive() and json.loads(received[0])["tool"] == "otbr-hub"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["report.fifo"]


def test_write_report_dash_is_standard_output(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_report(_full_report(), "json", "-")
    assert json.loads(capsys.readouterr().out)["tool"] == "otbr-hub"
    assert not (tmp_path / "-").exists()


def test_lone_weight_file_note_and_untested_cells() -> None:
    """A lone weight file's 'clean' comes from its safety check only: every format says so."""
    from otbr_hub.report import WEIGHT_FILE_ONLY_NOTE

    lone = TargetReport(target="only.safetensors", source="file", verdict="clean", files=[_clean_file()],
                        note=WEIGHT_FILE_ONLY_NOTE)
    report = ScanReport(targets=[lone, _target("clean")])

    data = json.loads(to_json(report))
    jsonschema.Draft202012Validator(json_schema()).validate(data)
    assert data["targets"][0]["note"] == WEIGHT_FILE_ONLY_NOTE and data["targets"][1]["note"] is None

    md = to_markdown(report)
    assert "| `only.safetensors` | Clean | not tested | not tested | none |" in md
    assert f"- `only.safetensors`: {WEIGHT_FILE_ONLY_NOTE}" in md
    assert "| `models/clean` | Clean | 0.300 | - | none |" in md  # a tested model keeps its numbers

    text = render(report, "console")
    row = next(line for line in text.splitlines() if "only.safetensors" in line and "Clean" in line)
    assert row.count("not tested") == 2
    assert any(line.strip() == f"note only.safetensors: {WEIGHT_FILE_ONLY_NOTE}" for line in text.splitlines()), text


def test_in_memory_source_validates_and_has_a_relative_uri() -> None:
    model = _target("backdoored", target="<in-memory ResNet #1>", source="memory", files=[])
    data = json.loads(to_json(ScanReport(targets=[model])))
    jsonschema.Draft202012Validator(json_schema()).validate(data)
    assert data["targets"][0]["source"] == "memory"
    (result,) = json.loads(to_sarif(ScanReport(targets=[model])))["runs"][0]["results"]
    uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "%3Cin-memory%20ResNet%20%231%3E"


def test_picklescan_prints_nothing_of_its_own(tmp_path: Path) -> None:
    """picklescan logs each dangerous import ("... FOUND"); our finding says it, so no record of
    picklescan's may reach the root logger's handlers (the CLI's prints to stderr)."""
    import logging

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        evil = tmp_path / "evil.pkl"
        evil.write_bytes(pickle.dumps(_RunsShell(tmp_path / "marker")))
        report = inspect_file(evil)
    finally:
        root.removeHandler(handler)
    assert "pickle-unsafe-import" in _codes(report)
    assert [r.getMessage() for r in records if r.name.startswith("picklescan")] == []
    assert logging.getLogger("picklescan").propagate  # restored for anyone else using it


@pytest.mark.parametrize(
    ("verdicts", "fail_on", "expected"),
    [
        (["clean"], "backdoored", 0),
        (["clean", "skipped"], "backdoored", 0),
        (["suspicious"], "backdoored", 0),
        (["suspicious"], "suspicious", 1),
        (["backdoored"], "backdoored", 1),
        (["backdoored", "error"], "backdoored", 1),  # a finding outranks a scan error
        (["backdoored"], "unsafe-file", 0),
        (["unsafe-file"], "backdoored", 1),
        (["unsafe-file"], "unsafe-file", 1),
        (["unsafe-file"], "none", 0),
        (["clean", "error"], "backdoored", 2),
        (["suspicious", "error"], "backdoored", 2),
        (["skipped", "error"], "backdoored", 2),
        (["skipped", "skipped"], "backdoored", 3),
        ([], "backdoored", 3),
    ],
)
def test_exit_code(verdicts: list[str], fail_on: str, expected: int) -> None:
    targets = [_target(v, files=[_unsafe_file()] if v == "unsafe-file" else []) for v in verdicts]
    assert exit_code(ScanReport(targets=targets), fail_on) == expected


def test_exit_code_counts_unsafe_files_under_any_verdict() -> None:
    report = ScanReport(targets=[_target("clean", files=[_unsafe_file()])])
    assert exit_code(report) == 1
    assert exit_code(report, "none") == 0
    with pytest.raises(UsageError) as err:
        exit_code(report, "sometimes")
    assert err.value.exit_code == 4


def test_every_finding_code_has_a_rule_and_a_documented_section() -> None:
    """A new finding without a rule would get a generic SARIF text and a dead help link."""
    import re

    from otbr_hub import inspect as inspect_mod
    from otbr_hub.report import _RULES

    source = Path(inspect_mod.__file__).read_text()
    codes = set(re.findall(r'Finding\(\s*"(?:critical|high|medium|info)",\s*"([a-z0-9-]+)"', source))
    assert {"zip-duplicate-entry", "pickle-unparsable", "link-outside-folder"} <= codes
    docs = (Path(__file__).parents[1] / "docs" / "SCAN_RULES.md").read_text()
    for code in codes:
        assert code in _RULES, code
        assert f"## {code}\n" in docs, code


def test_links_into_the_enclosing_work_tree_are_allowed(tmp_path: Path) -> None:
    """git-annex and DVC keep weights as links into the repository's own object store."""
    repo = tmp_path / "repo"
    (repo / ".git" / "annex" / "objects").mkdir(parents=True)
    blob = _write_safetensors(repo / ".git" / "annex" / "objects" / "k", {}, b"")
    (repo / "model").mkdir()
    (repo / "model" / "model.safetensors").symlink_to(blob)
    (report,) = inspect_folder(repo / "model")
    assert report.safe and report.format == "safetensors"


def test_awkward_names_and_numbers_keep_every_format_valid() -> None:
    """Names with spaces, '#', backticks, newlines and pipes; NaN weight evidence; arrays."""
    import numpy as np

    ev = BackdoorEvidence("max-margin", 1.0000000002, weight_evidence={"weights": {
        "applicable": True, "per_class": np.array([1.0, float("nan")]), "seconds": float("nan")}})
    target = TargetReport("my models/ok 100%", "folder", "backdoored", backdoor=ev,
                          files=[FileReport("sub dir/my model#1.bin", "pickle", 1, None,
                                            [Finding("high", "pickle-unparsable", "x", {})])])
    sneaky = TargetReport("x` [click](https://evil) `\n- **fake**", "folder", "error", error="boom")
    report = ScanReport(targets=[target, sneaky])
    data = json.loads(to_json(report))
    jsonschema.validate(data, json_schema())
    assert data["targets"][0]["backdoor"]["p_value"] == 1.0
    uris = [loc["physicalLocation"]["artifactLocation"]["uri"]
            for r in json.loads(to_sarif(report))["runs"][0]["results"] for loc in r.get("locations", [])]
    assert "my%20models/ok%20100%25/sub%20dir/my%20model%231.bin" in uris
    md = to_markdown(report)
    assert "](https://evil)" not in md.replace("`` x` [click](https://evil) ` ", "")  # only inside the code span
    assert "\n- **fake**" not in md


def test_sarif_fingerprints_and_version_fields() -> None:
    same = [Finding("high", "pickle-unlisted-import", "unpickling imports a.b", {}) for _ in range(2)]
    report = ScanReport(targets=[TargetReport("m", "folder", "unsafe-file", files=[FileReport("x.bin", "pickle", 1, None, same)])])
    sarif = json.loads(to_sarif(report))
    prints = [r["partialFingerprints"]["otbrResult/v1"] for r in sarif["runs"][0]["results"]]
    assert len(prints) == 2 and len(set(prints)) == 2  # GitHub would merge two alerts with one fingerprint
    from otbr_hub.report import _is_semver

    assert _is_semver("0.1.0") and not _is_semver("0+unknown") and not _is_semver("1.0.dev3")


def test_an_unsafe_verdict_without_findings_still_gives_a_sarif_result() -> None:
    """Code scanning shows results only: an unsafe target must not vanish from it."""
    report = ScanReport(targets=[TargetReport("m", "folder", "unsafe-file", files=[FileReport("w.bin", "pickle", 1, None, [])])])
    sarif = json.loads(to_sarif(report))
    (result,) = sarif["runs"][0]["results"]
    assert result["ruleId"] == "unsafe-file" and result["level"] == "error"
    assert sarif["runs"][0]["tool"]["driver"]["rules"][result["ruleIndex"]]["id"] == "unsafe-file"
