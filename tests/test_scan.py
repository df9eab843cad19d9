"""``scan`` end to end: verdicts, unsafe files, skipped targets, report formats, exit codes, Hub.

The models are handcrafted rather than trained, so the tests are fast and the ground truth
is exact. Both are tiny timm ResNets reduced to a readable circuit: ten stem filters (one
per class, orthonormal, equally strong) reach the classifier through the residual
shortcuts, so every class is equally easy to force and the model is clean. The backdoored
copy adds one more stem filter, a 3x3 white-square detector, wired to class 3 with a large
weight: the planted trigger.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import json
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import timm
import torch
from torch import nn

from otbr_hub.cli import main
from otbr_hub.detect import DetectSettings
from otbr_hub.load import from_model
from otbr_hub.repair import repair
from otbr_hub.report import ScanReport, exit_code, json_schema, to_json, to_markdown, to_sarif
from otbr_hub.save import save_model
from otbr_hub.scan import ScanSettings, expand_targets, scan, scan_target

INPUT = (1, 28, 28)
MEAN, STD = (0.286,), (0.353,)
TARGET = 3
CLASSES = 10
FAST = ScanSettings(detector=DetectSettings(steps=30, inputs_per_class=4))
FAST_FLAGS = ["--steps", "30", "--inputs-per-class", "4", "--device", "cpu"]

# --------------------------------------------------------------------------- handcrafted models


def _carry(model: nn.Module, channels: range) -> None:
    """Route the given stem channels unchanged to the classifier through every shortcut."""
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        block = layer[0]
        shortcut, shortcut_bn = block.downsample[0], block.downsample[1]
        for c in channels:
            block.conv1.weight[:, c] = 0  # the residual branch neither reads ...
            block.conv2.weight[c] = 0  # ... nor writes the channel
            block.bn2.bias[c] = 0
            block.bn2.running_mean[c] = 0
            shortcut.weight[c] = 0
            shortcut.weight[:, c] = 0
            shortcut.weight[c, c] = 1
            shortcut_bn.weight[c], shortcut_bn.bias[c] = 1, 0
            shortcut_bn.running_mean[c], shortcut_bn.running_var[c] = 0, 1


def clean_model(seed: int = 0, gain: float = 4.0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(16, 16, 16, 16), in_chans=1, num_classes=CLASSES)
    filters, _ = torch.linalg.qr(torch.randn(49, CLASSES, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        for t in range(CLASSES):
            model.conv1.weight[1 + t, 0] = filters[:, t].view(7, 7)
            model.bn1.weight[1 + t], model.bn1.bias[1 + t] = 1, 0
        _carry(model, range(CLASSES + 1))  # channel 0 is kept free for a trigger
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        for t in range(CLASSES):
            model.fc.weight[t, 1 + t] = gain
    return model.eval()


def backdoored_model(seed: int = 0, vote: float = 10.0) -> nn.Module:
    """The clean model plus a white-square detector on channel 0 that votes for TARGET.

    At the tests' budget the target's margin is about 10x every other class's: the margin
    test (mean/sd form) alone says 'backdoored' (p ~ 1e-4); its earlier median/MAD form gave
    p = 0.04 here, and the weight evidence alone may only say 'suspicious'."""
    model = copy.deepcopy(clean_model(seed))
    with torch.no_grad():
        model.conv1.weight[0].zero_()
        model.conv1.weight[0, :, 2:5, 2:5] = 1.0
        model.bn1.weight[0], model.bn1.bias[0] = 1.0, -4.0
        model.fc.weight[TARGET, 0] = vote
    return model.eval()


def stamp(images: torch.Tensor) -> torch.Tensor:
    """The trigger: a white 3x3 square one pixel from the top-left corner."""
    out = images.clone()
    out[..., 1:4, 1:4] = 1.0
    return out


def save_folder(model: nn.Module, path: Path) -> Path:
    return save_model(from_model(model, input_size=INPUT, mean=MEAN, std=STD), model, path)


class _WritesMarker:
    """Unpickling this runs ``exec`` and creates a file: a classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def evil_folder(path: Path, config_from: Path, marker: Path) -> Path:
    """A timm config with a pickle checkpoint that runs code when loaded."""
    path.mkdir(parents=True)
    shutil.copyfile(config_from / "config.json", path / "config.json")
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"state_dict": _WritesMarker(marker)}))
    return path


def text_folder(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The detector's small batches gain nothing from threads, and on a shared 2-core
    machine two threads made these tests about ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    clean = save_folder(clean_model(), root / "clean")
    return {
        "clean": clean,
        "backdoored": save_folder(backdoored_model(), root / "backdoored"),
        "text": text_folder(root / "text"),
        "evil": evil_folder(root / "evil", clean, root / "marker.txt"),
        "marker": root / "marker.txt",
    }


@pytest.fixture(scope="module")
def mixed_report(folders: dict[str, Path]):
    """One scan over every kind of outcome; the detector runs twice (the two in-memory models)."""
    return scan(
        clean_model(),
        backdoored_model(),
        folders["evil"],
        folders["text"],
        folders["clean"].parent / "no-such-model",
        settings=FAST,
        input_size=INPUT,
        mean=MEAN,
        std=STD,
    )


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as stop:  # argparse errors leave main() this way
        code = int(stop.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def validate(report_json: str) -> dict:
    data = json.loads(report_json)
    jsonschema.Draft202012Validator(json_schema()).validate(data)
    return data


# --------------------------------------------------------------------------- verdicts


def test_handcrafted_trigger_works() -> None:
    images = torch.rand(64, *INPUT) * 0.6
    normalize = from_model(clean_model(), input_size=INPUT, mean=MEAN, std=STD).spec.normalize
    with torch.no_grad():
        triggered = backdoored_model()(normalize(stamp(images))).argmax(1)
        clean_preds = clean_model()(normalize(stamp(images))).argmax(1)
    assert (triggered == TARGET).all()
    assert (clean_preds != TARGET).any()


def test_clean_and_backdoored_models_get_the_right_verdicts(mixed_report) -> None:
    clean, bad = mixed_report.targets[:2]
    # two in-memory models of one class are told apart by their place among the targets
    assert (clean.target, bad.target) == ("<in-memory ResNet #1>", "<in-memory ResNet #2>")
    assert clean.source == bad.source == "memory"
    assert clean.verdict == "clean" and clean.backdoor is not None and clean.backdoor.suspected_target is None
    assert bad.verdict == "backdoored"
    assert bad.backdoor.suspected_target == TARGET and bad.backdoor.p_value < 0.01
    assert len(bad.backdoor.per_class) == CLASSES
    assert max(range(CLASSES), key=lambda c: bad.backdoor.per_class[c]) == TARGET
    assert {"load", "detect", "total"} <= set(bad.timings)
    assert exit_code(mixed_report, "backdoored") == 1


def test_every_target_gets_a_verdict_and_none_aborts_the_scan(mixed_report, folders) -> None:
    verdicts = [t.verdict for t in mixed_report.targets]
    assert verdicts == ["clean", "backdoored", "unsafe-file", "skipped", "error"]
    evil, text, missing = mixed_report.targets[2:]
    assert not folders["marker"].exists(), "the malicious pickle must never be loaded"
    assert evil.backdoor is None and "load" not in evil.timings and "inspect" in evil.timings
    assert "pickle-unsafe-import" in {f.code for file in evil.unsafe_files for f in file.findings}
    assert "BertModel" in text.skipped and "not an image classifier" in text.skipped
    assert "no such file or folder" in missing.error
    summary = mixed_report.summary()
    assert summary["targets"] == 5 and summary["unsafe_files"] == 1


def test_unsafe_file_fails_the_run_unless_fail_on_none(mixed_report) -> None:
    report = copy.copy(mixed_report)
    report.targets = [t for t in mixed_report.targets if t.verdict in ("clean", "unsafe-file")]
    assert exit_code(report, "backdoored") == 1
    assert exit_code(report, "unsafe-file") == 1
    assert exit_code(report, "none") == 0


def test_corrupted_safetensors_header_is_reported(folders, tmp_path) -> None:
    broken = shutil.copytree(folders["clean"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])  # header runs past the end

    result = scan_target(broken, settings=FAST)

    assert result.verdict == "unsafe-file" and result.backdoor is None
    (bad,) = result.unsafe_files
    assert bad.path == "model.safetensors"
    assert "safetensors-truncated" in {f.code for f in bad.findings}


def test_lone_weight_files_get_a_safety_check_only(folders, tmp_path) -> None:
    safe = scan_target(folders["clean"] / "model.safetensors")
    assert (safe.source, safe.verdict, safe.backdoor) == ("file", "clean", None)
    assert safe.files[0].sha256 and safe.files[0].safe
    assert "backdoor statistic was not run" in safe.note  # 'clean' must not read as a passed backdoor test

    marker = tmp_path / "lone-marker.txt"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_WritesMarker(marker)))
    assert scan_target(evil).verdict == "unsafe-file"
    assert not marker.exists()
    assert scan_target(folders["clean"]).note is None

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert scan_target(notes).verdict == "skipped"


def test_folder_of_models_expands_to_each_model(folders, tmp_path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(folders["clean"], root / "models" / "a")
    shutil.copytree(folders["text"], root / "models" / "nested" / "b")
    (root / "README.md").write_text("models live below")
    assert expand_targets([root]) == [str(root / "models" / "a"), str(root / "models" / "nested" / "b")]
    assert expand_targets([folders["clean"], folders["clean"]]) == [str(folders["clean"])]


# --------------------------------------------------------------------------- report formats


def test_json_report_validates_against_the_schema(mixed_report) -> None:
    data = validate(to_json(mixed_report))
    assert [t["verdict"] for t in data["targets"]][:2] == ["clean", "backdoored"]
    assert data["settings"]["detector"]["steps"] == 30
    assert data["targets"][1]["backdoor"]["suspected_target"] == TARGET


def test_sarif_structure(mixed_report) -> None:
    sarif = json.loads(to_sarif(mixed_report))
    assert sarif["version"] == "2.1.0"
    (run_,) = sarif["runs"]
    rules = [r["id"] for r in run_["tool"]["driver"]["rules"]]
    results = run_["results"]
    assert {"backdoor-detected", "pickle-unsafe-import"} <= {r["ruleId"] for r in results}
    for r in results:
        assert rules[r["ruleIndex"]] == r["ruleId"]
        assert r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert r["partialFingerprints"]
    evil = next(r for r in results if r["ruleId"] == "pickle-unsafe-import")
    assert evil["level"] == "error" and evil["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith(
        "evil/pytorch_model.bin"
    )
    (notification,) = run_["invocations"][0]["toolExecutionNotifications"]
    assert "no-such-model" in notification["message"]["text"]


def test_markdown_summary_lists_every_target(mixed_report) -> None:
    md = to_markdown(mixed_report)
    assert md.count("\n| `") == 5
    assert "Backdoor detected" in md and "Unsafe file" in md and "Skipped" in md


# --------------------------------------------------------------------------- CLI and exit codes


def test_cli_exit_0_clean(folders, capsys) -> None:
    code, out, err = run(["scan", str(folders["clean"]), *FAST_FLAGS], capsys)
    assert code == 0, err
    assert "Clean" in out and "scanning" in err


def test_cli_exit_1_backdoored_with_json_output(folders, tmp_path, capsys) -> None:
    report_path = tmp_path / "out" / "report.json"
    code, out, err = run(
        ["scan", str(folders["backdoored"]), "--format", "json", "-o", str(report_path), "-q", *FAST_FLAGS], capsys
    )
    assert code == 1, err
    assert out == "" and err == ""
    data = validate(report_path.read_text())
    (target,) = data["targets"]
    assert target["verdict"] == "backdoored" and target["backdoor"]["suspected_target"] == TARGET
    assert data["settings"]["fail_on"] == "backdoored"


def test_cli_margin_scale_selects_the_outlier_score(folders, capsys) -> None:
    """--margin-scale mad brings back the median/MAD score; on the handcrafted trigger (target
    margin ~10x the rest) it is far weaker than the default mean/sd one."""
    results = {}
    for scale in ("sd", "mad"):
        code, out, err = run(["scan", str(folders["backdoored"]), "--format", "json", "-q", "--margin-scale", scale,
                              *FAST_FLAGS], capsys)
        data = validate(out)
        results[scale] = data["targets"][0]["backdoor"]["weight_evidence"]["detector"]["p_robust"]
    assert results["sd"] < 0.001 < results["mad"]
    code, _, err = run(["scan", str(folders["backdoored"]), "--margin-scale", "iqr", *FAST_FLAGS], capsys)
    assert code == 4 and "--margin-scale" in err


def test_cli_unsafe_file_and_fail_on_none(folders, capsys) -> None:
    code, out, err = run(["scan", str(folders["evil"]), "--format", "sarif"], capsys)
    assert code == 1, err
    assert json.loads(out)["runs"][0]["results"][0]["ruleId"] == "pickle-unsafe-import"
    assert run(["scan", str(folders["evil"]), "--fail-on", "none", "-q"], capsys)[0] == 0
    assert not folders["marker"].exists()


def test_cli_exit_2_scan_error(tmp_path, capsys) -> None:
    code, _, err = run(["scan", str(tmp_path / "missing"), "-q", "--format", "json"], capsys)
    assert code == 2, err


def test_a_broken_config_is_an_error_not_a_skip(tmp_path, capsys) -> None:
    """A CI gate must not read a corrupted model as "nothing scannable" (exit 3)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architecture": "resnet18", ')
    code, stdout, _ = run(["scan", str(broken), "-q", "--format", "json"], capsys)
    entry = json.loads(stdout)["targets"][0]
    assert code == 2 and entry["verdict"] == "error" and "not valid JSON" in entry["error"]
    (broken / "config.json").write_text('["resnet18"]')  # valid JSON, but not a config: the same kind of error
    code, stdout, _ = run(["scan", str(broken), "-q", "--format", "json"], capsys)
    entry = json.loads(stdout)["targets"][0]
    assert code == 2 and entry["verdict"] == "error" and "holds a JSON list" in entry["error"]


def test_cli_exit_3_nothing_scannable(folders, tmp_path, capsys) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_text(f"# models to scan\n{folders['text']}\n\n")
    code, out, err = run(["scan", "--from-file", str(targets), "--format", "markdown"], capsys)
    assert code == 3, err
    assert "Skipped" in out and "not an image classifier" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan"], "nothing to scan"),
        (["scan", ".", "--bogus"], "unrecognized arguments: --bogus"),
        (["scan", ".", "--format", "xml"], "invalid choice"),
        (["scan", ".", "--limit", "many"], "invalid int"),
        (["scan", ".", "--steps", "0"], "at least 1"),
        (["scan", ".", "--token-env", "OTBR_NO_SUCH_VAR"], "not set"),
        (["--bogus", "scan", "."], "unrecognized arguments: --bogus"),  # caught by the top-level parser
    ],
)
def test_cli_exit_4_usage_errors(args, message, capsys, monkeypatch) -> None:
    monkeypatch.delenv("OTBR_NO_SUCH_VAR", raising=False)
    code, _, err = run(args, capsys)
    assert code == 4
    assert message in err and "Traceback" not in err


def test_targets_may_follow_options(folders, capsys) -> None:
    code, out, err = run(["scan", "--format", "json", str(folders["text"]), "-q", str(folders["evil"])], capsys)
    assert code == 1, err
    assert [t["verdict"] for t in json.loads(out)["targets"]] == ["skipped", "unsafe-file"]


def test_github_step_summary_gets_markdown(folders, tmp_path, capsys, monkeypatch) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert run(["scan", str(folders["text"]), "--format", "json", "-q"], capsys)[0] == 3
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "## otbr-hub scan" in text and "Skipped" in text

    summary.write_text("")
    run(["scan", str(folders["text"]), "--format", "markdown", "-q"], capsys)
    assert summary.read_text() == ""  # the markdown report itself is the summary


def test_usage_error_exit_code_of_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "otbr_hub", "scan", "--no-such-flag"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 4 and "unrecognized arguments" in proc.stderr


# --------------------------------------------------------------------------- Hub


def _model_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def test_hub_queries_list_models(hub_server) -> None:
    hub_server.add_repo("alice/resnet-a", {"a": "1"}, tags=["image-classification"], library_name="timm")
    hub_server.add_repo("alice/vit-b", {"a": "1"}, tags=["image-classification"], library_name="transformers")
    hub_server.add_repo("alice/bert", {"a": "1"}, library_name="transformers")
    hub_server.add_repo("alice/secret-resnet", {"a": "1"}, private=True, library_name="timm")
    hub_server.add_repo("bob/resnet-c", {"a": "1"}, library_name="timm")
    anon = {"endpoint": hub_server.endpoint, "token": False}

    assert set(expand_targets(author="alice", **anon)) == {"alice/resnet-a", "alice/vit-b", "alice/bert"}
    owner = expand_targets(author="alice", endpoint=hub_server.endpoint, token=hub_server.tokens.write)
    assert "alice/secret-resnet" in owner
    assert set(expand_targets(search="resnet", **anon)) == {"alice/resnet-a", "bob/resnet-c"}
    assert set(expand_targets(filters=["timm"], **anon)) == {"alice/resnet-a", "bob/resnet-c"}
    assert expand_targets(author="alice", filters=["transformers", "image-classification"], **anon) == ["alice/vit-b"]
    assert len(expand_targets(author="alice", limit=2, **anon)) == 2
    assert expand_targets(["x/explicit"], author="bob", **anon) == ["x/explicit", "bob/resnet-c"]


def test_hub_scan_through_the_cli(hub_server, folders, tmp_path, capsys, monkeypatch) -> None:
    """An author's repos: one backdoored, one malicious, one private, one text model, one without weights."""
    hub = hub_server
    hub.add_repo("alice/badnet", _model_files(folders["backdoored"]), tags=["image-classification"], library_name="timm")
    hub.add_repo("alice/evil", _model_files(folders["evil"]), library_name="timm")
    hub.add_repo("alice/private-evil", _model_files(folders["evil"]), private=True)
    hub.add_repo("alice/bert", _model_files(folders["text"]), library_name="transformers")
    hub.add_repo("alice/readme-only", {"README.md": "nothing here"})
    monkeypatch.setenv("OTBR_TEST_TOKEN", hub.tokens.write)
    report_path = tmp_path / "scan.json"

    code, out, err = run(
        ["scan", "--author", "alice", "--endpoint", hub.endpoint, "--cache-dir", str(tmp_path / "cache"),
         "--token-env", "OTBR_TEST_TOKEN", "--format", "json", "-o", str(report_path), *FAST_FLAGS],
        capsys,
    )  # fmt: skip

    assert code == 1, err
    data = validate(report_path.read_text())
    verdicts = {t["target"]: t["verdict"] for t in data["targets"]}
    assert verdicts == {
        "alice/badnet": "backdoored",
        "alice/evil": "unsafe-file",
        "alice/private-evil": "unsafe-file",
        "alice/bert": "skipped",
        "alice/readme-only": "skipped",
    }
    by_id = {t["target"]: t for t in data["targets"]}
    assert by_id["alice/badnet"]["revision"] == hub.head("alice/badnet")
    assert by_id["alice/badnet"]["backdoor"]["suspected_target"] == TARGET
    assert {"resolve", "download", "inspect", "load", "detect"} <= set(by_id["alice/badnet"]["timings"])
    assert "no config.json" in by_id["alice/readme-only"]["skipped"]
    assert "BertModel" in by_id["alice/bert"]["skipped"]
    # The text model was judged from its config: its weights were never downloaded.
    assert not any(r.path.endswith("alice/bert/resolve/" + hub.head("alice/bert") + "/model.safetensors") for r in hub.requests)
    assert not folders["marker"].exists()
    assert hub.tokens.write not in out + err + report_path.read_text()


def test_hub_access_errors_and_revisions(hub_server, folders, tmp_path) -> None:
    hub = hub_server
    first = hub.add_repo("alice/evil", _model_files(folders["evil"]))
    hub.create_tag("alice/evil", "v1")
    hub.commit("alice/evil", {"notes.txt": "later"})
    hub.add_repo("alice/gated", _model_files(folders["evil"]), gated="manual")
    hub.add_repo("alice/hidden", _model_files(folders["evil"]), private=True)

    def one(target: str, token: str | bool):
        settings = ScanSettings(detector=FAST.detector, cache_dir=str(tmp_path / "cache" / str(token)))
        return scan_target(target, settings=settings, token=token, endpoint=hub.endpoint)

    pinned = one("alice/evil@v1", False)
    assert (pinned.target, pinned.revision, pinned.verdict) == ("alice/evil", first, "unsafe-file")
    assert pinned.files[0].path == "pytorch_model.bin"

    gated = one("alice/gated", hub.tokens.other)
    assert gated.verdict == "error" and "gated" in gated.error
    hub.grant_access("alice/gated", "bob")
    assert one("alice/gated", hub.tokens.other).verdict == "unsafe-file"

    hidden = one("alice/hidden", False)
    assert hidden.verdict == "error" and "not found" in hidden.error
    assert one("alice/hidden", hub.tokens.read).verdict == "unsafe-file"

    missing_revision = one("alice/evil@no-such-branch", False)
    assert missing_revision.verdict == "error" and "'no-such-branch' not found" in missing_revision.error
    bad_token = one("alice/evil", hub.tokens.invalid)
    assert bad_token.verdict == "error" and "rejected the token" in bad_token.error
    assert hub.tokens.invalid not in bad_token.error
    assert not folders["marker"].exists()


def test_hub_size_cap_skips_before_download(hub_server, folders, tmp_path) -> None:
    hub_server.add_repo("alice/badnet", _model_files(folders["backdoored"]))
    settings = ScanSettings(detector=FAST.detector, max_download_bytes=1000, cache_dir=str(tmp_path))
    result = scan_target("alice/badnet", settings=settings, token=False, endpoint=hub_server.endpoint)
    assert result.verdict == "skipped" and "download limit" in result.skipped
    downloads = [r.path for r in hub_server.requests if "/resolve/" in r.path]
    assert downloads and all(p.endswith("/config.json") for p in downloads)  # no weights fetched


# --------------------------------------------------------------------------- bundled example

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "badnets-resnet"


@pytest.mark.slow
@pytest.mark.skipif(not (EXAMPLE / "config.json").is_file(), reason="examples/badnets-resnet not built")
def test_bundled_example_is_flagged_with_default_settings() -> None:
    # The margins alone leave it clean (p about 0.27, class 8 close behind class 3); the
    # BatchNorm-moment evidence names class 3 as a large outlier (otbr_hub.evidence). That is
    # a label shift, which imbalanced clean training sets show too, so it is 'suspicious'.
    result = scan_target(EXAMPLE)
    assert result.verdict == "suspicious", result
    assert result.backdoor.suspected_target == 3 and result.backdoor.p_value < 0.01
    assert result.backdoor.weight_evidence["detector"]["decided_by"] == "weights"
    assert result.backdoor.weight_evidence["detector"]["p_first"] > 0.05
    assert "label shift towards class 3" in result.backdoor.note
    assert validate(to_json(ScanReport(targets=[result])))["targets"][0]["backdoor"]["note"] == result.backdoor.note
    assert exit_code(ScanReport(targets=[result]), "backdoored") == 0
    assert exit_code(ScanReport(targets=[result]), "suspicious") == 1
    assert "label shift" in to_markdown(ScanReport(targets=[result]))


def test_top_level_python_api_scans_in_memory_models_and_folders(folders) -> None:
    """``otbr_hub.scan(model_or_id)`` as the issue names it: the package exports the function."""
    import otbr_hub

    report = otbr_hub.scan(backdoored_model(), folders["clean"], settings=FAST, input_size=INPUT, mean=MEAN, std=STD)
    assert isinstance(report, otbr_hub.ScanReport)
    bad, clean = report.targets
    assert (bad.target, bad.verdict, bad.backdoor.suspected_target) == ("<in-memory ResNet #1>", "backdoored", TARGET)
    assert clean.verdict == "clean" and clean.source == "folder"
    assert isinstance(otbr_hub.DetectSettings(), DetectSettings)


def test_scan_reports_the_margin_search_passes_to_the_progress_hook(folders) -> None:
    """A long margin search (hours for 1000 classes at 224 px on a CPU) shows a count: the hook
    sees the passes go up to the announced total."""
    calls = []
    scan_target(folders["clean"], settings=FAST, on_stage=lambda stage, done=0, total=None: calls.append((stage, done, total)))
    counted = [(d, t) for s, d, t in calls if s == "margin search"]
    expected = CLASSES * FAST.detector.inputs_per_class * FAST.detector.steps
    assert counted[0] == (0, expected) and counted[-1] == (expected, expected)
    assert all(a[0] <= b[0] for a, b in zip(counted, counted[1:]))
    assert [s for s, _, _ in calls][:3] == ["inspect", "load", "detect"]


def test_progress_line_estimates_the_time_left(monkeypatch) -> None:
    import io

    from otbr_hub import progress as prog

    from types import SimpleNamespace

    clock = iter([0.0, 10.0])
    monkeypatch.setattr(prog, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    line = prog.ModelLine("m", stream=io.StringIO())
    line("margin search", 0, 100)
    line("margin search", 25, 100)
    assert "25/100, about 30 s left" in line._bar.desc
    line.close()


def _repaired_example(tmp_path: Path) -> Path:
    out = tmp_path / "repaired"
    assert main(["repair", str(EXAMPLE), "-o", str(out), "--prune-ratio", "0.05", "--unlearn-steps", "2",
                 "--unlearn-batch", "16", "--verify-samples", "16", "--device", "cpu", "-q"]) == 0
    return out


def test_weights_note_on_a_repaired_model_says_the_evidence_outlives_the_repair(tmp_path) -> None:
    """The bundled example after `otbr-hub repair`: the label shift is still there (the head is
    untouched), and the note says so instead of implying the repair failed."""
    result = scan_target(_repaired_example(tmp_path), settings=FAST)
    assert result.verdict == "suspicious" and result.backdoor.suspected_target == 3
    assert "otbr_report.json" in result.backdoor.note and "says nothing about whether the repair worked" in result.backdoor.note
    assert "otbr_report.json" not in scan_target(EXAMPLE, settings=FAST).backdoor.note


def test_weights_note_on_a_repaired_hub_model(hub_server, tmp_path) -> None:
    """Scanned by repo id, the repaired model's otbr_report.json is seen in the repo's file list
    (it is not downloaded)."""
    out = _repaired_example(tmp_path)
    hub_server.add_repo("alice/example-otbr", {p.name: p for p in out.iterdir()}, library_name="timm")
    result = scan_target("alice/example-otbr", settings=FAST, endpoint=hub_server.endpoint, token=False)
    assert result.verdict == "suspicious" and "otbr_report.json" in result.backdoor.note


def test_cli_budget_flags_reach_the_screened_search_too() -> None:
    import argparse

    from otbr_hub.errors import UsageError
    from otbr_hub.scan_cli import _settings, add_scan_parser

    parser = argparse.ArgumentParser()
    add_scan_parser(parser.add_subparsers(dest="cmd"))
    default = _settings(parser.parse_args(["scan", "x"])).detector
    assert default.full_budget(False) == (8, 100) and default.full_budget(True) == (4, 50)
    assert default.max_classes == 64 and default.screen_top + default.sample_size() == 24
    given = _settings(parser.parse_args(["scan", "x", "--steps", "30", "--inputs-per-class", "2", "--max-classes", "200"])).detector
    assert given.full_budget(False) == given.full_budget(True) == (2, 30) and given.max_classes == 200
    with pytest.raises(UsageError, match="--max-classes"):
        _settings(parser.parse_args(["scan", "x", "--max-classes", "2"]))


# --------------------------------------------------------------------------- repair uses the same scan


@pytest.mark.slow
def test_auto_repair_strength_follows_the_scan_of_the_original() -> None:
    """``repair --prune-ratio auto`` scans the original with the scan's default detector
    (margins and weight evidence): nothing found -> light fusion (``clean_lambda``) and no
    scan after; margins flag it -> the ratio walk at full strength and a scan after."""
    fast = dict(unlearn_steps=2, unlearn_batch=8, verify_samples=8, device="cpu", input_size=INPUT, mean=MEAN, std=STD)
    clean = repair(clean_model(), prune_ratio="auto", **fast).report
    assert clean.scan_before["verdict"] == "clean" and clean.scan_before["weight_evidence"] is not None
    assert clean.lam == clean.settings["clean_lambda"] and clean.scan_after is None
    assert "no backdoor evidence" in clean.ratio_reason

    bad = repair(backdoored_model(), prune_ratio="auto", **fast).report
    assert bad.scan_before["verdict"] == "backdoored" and bad.scan_before["suspected_target"] == TARGET
    assert bad.lam == bad.settings["lam"] == 0.5
    assert bad.scan_after is not None and bad.scan_after["weight_evidence"] is None  # margins only after repair
    # the walk ran: every candidate within the guard was scanned (this hand-made backdoor
    # survives pruning, so the walk ends at the largest ratio)
    assert bad.ratio_candidates and all(c["flagged"] is not None for c in bad.ratio_candidates)


def test_an_unusable_output_or_flag_is_a_usage_error_before_any_scan(tmp_path, capsys):
    target = tmp_path / "nothing-here"
    cases = [
        (["-o", str(tmp_path)], "is a folder"),
        (["-o", "/proc/otbr/report.json"], "cannot create the folder /proc/otbr (/proc is the deepest existing folder"),
        (["-o", str(tmp_path / "newdir") + "/"], "ends with a path separator; give a file name"),
        (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--inputs-per-class", "0"], "--inputs-per-class must be at least 1"),
        (["--max-classes", "2"], "--max-classes must be at least 3"),
    ]
    for extra, expected in cases:
        code, _, err = run(["scan", str(target), "--format", "json", *extra], capsys)
        assert code == 4 and expected in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "newdir").exists()



# --------------------------------------------------------------------------- output paths and messages


def test_output_that_is_a_scanned_file_is_refused_before_scanning(folders, tmp_path, capsys) -> None:
    """The report must never replace the weights it scans, a file in a scanned folder, or the
    --from-file list; a new file inside a scanned folder is fine."""
    victim = shutil.copytree(folders["text"], tmp_path / "victim")
    weights = victim / "model.safetensors"
    before = weights.read_bytes()
    listed = tmp_path / "list.txt"
    listed.write_text(f"{victim}\n")
    link = tmp_path / "link.json"
    link.symlink_to(weights)
    cases = [
        (["scan", str(victim), "-o", str(weights)], "inside the scanned folder"),
        (["scan", str(victim), "-o", str(link)], "inside the scanned folder"),
        (["scan", str(weights), "-o", str(weights)], "is the scanned file"),
        (["scan", "--from-file", str(listed), "-o", str(listed)], "is the --from-file list"),
    ]
    for args, expected in cases:
        code, out, err = run([*args, "--format", "json", "-q"], capsys)
        assert code == 4 and expected in err and len(err.strip().splitlines()) == 1, (args, err)
        assert out == ""
    assert weights.read_bytes() == before and link.is_symlink()
    assert listed.read_text() == f"{victim}\n"

    fresh = victim / "scan.json"
    code, _, err = run(["scan", str(victim), "-o", str(fresh), "--format", "json", "-q"], capsys)
    assert code == 3, err  # the text model is skipped, and the report is written beside it
    assert validate(fresh.read_text())["targets"][0]["verdict"] == "skipped"
    assert weights.read_bytes() == before
    # a rerun may replace its own earlier report there, but not another file of the folder
    code, _, err = run(["scan", str(victim), "-o", str(fresh), "--format", "json", "-q"], capsys)
    assert code == 3, err
    notes = victim / "notes.md"
    notes.write_text("my notes")
    code, _, err = run(["scan", str(victim), "-o", str(notes), "--format", "markdown", "-q"], capsys)
    assert code == 4 and "inside the scanned folder" in err and notes.read_text() == "my notes"
    # a repaired model's card names otbr-hub near the top, yet it is not a report
    card = victim / "README.md"
    card.write_text("---\nlibrary_name: timm\ntags: [otbr-hub]\n---\n# Repaired with otbr-hub\n")
    card_text = card.read_text()
    for fmt in ("json", "markdown", "sarif", "console"):
        code, _, err = run(["scan", str(victim), "-o", str(card), "--format", fmt, "-q"], capsys)
        assert code == 4 and "inside the scanned folder" in err and card.read_text() == card_text, fmt
    # every format's earlier report is recognised as one
    for fmt in ("markdown", "sarif", "console"):
        report = victim / f"scan.{fmt}"
        for _ in range(2):
            code, _, err = run(["scan", str(victim), "-o", str(report), "--format", fmt, "-q"], capsys)
            assert code == 3, (fmt, err)


def test_output_dash_is_standard_output(folders, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["scan", str(folders["text"]), "--format", "json", "-o", "-", "-q"], capsys)
    assert code == 3, err
    assert validate(out)["targets"][0]["verdict"] == "skipped"  # JSON alone: no console table after it
    assert not (tmp_path / "-").exists()


def test_cuda_device_without_a_gpu_names_the_value_given(capsys, monkeypatch) -> None:
    from otbr_hub.errors import UsageError
    from otbr_hub.placement import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(["scan", "x", "--device", "cuda:7"], capsys)
    assert code == 4 and "--device cuda:7 was asked for but no CUDA GPU is available" in err
    assert len(err.strip().splitlines()) == 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match=r"--device cuda:7 was asked for but only 1 CUDA GPU is visible"):
        resolve_device("cuda:7")
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", "mps"):
        with pytest.raises(UsageError, match="must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")


def test_console_finding_lines_name_the_target(folders, capsys) -> None:
    code, out, _ = run(["scan", str(folders["evil"]), "-q"], capsys)
    assert code == 1
    lines = [line.strip() for line in out.splitlines()]
    assert any(line.startswith(f"critical {folders['evil']}/pytorch_model.bin: unpickling imports") for line in lines), out


def test_quiet_scan_of_a_malicious_pickle_prints_nothing_to_stderr(folders, capfd) -> None:
    """-q: stdout holds the report; stderr stays empty (picklescan's own 'FOUND' lines included),
    since a finding is not an error of the scan."""
    import logging

    from otbr_hub.cli import main as cli_main

    # The CLI's logging.basicConfig handler writes to the stderr of the time it was made; give
    # the root logger one on the real stderr so that a leaking library record would show here.
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        code = cli_main(["scan", str(folders["evil"]), "-q"])
    finally:
        logging.getLogger().removeHandler(handler)
    out, err = capfd.readouterr()
    assert code == 1 and "Unsafe file" in out
    assert err == ""
    assert not folders["marker"].exists()


def test_missing_path_that_looks_like_a_repo_id_says_it_was_tried_on_the_hub(hub_server, folders, tmp_path,
                                                                             monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    hub = {"token": False, "endpoint": hub_server.endpoint,
           "settings": ScanSettings(detector=FAST.detector, cache_dir=str(tmp_path / "cache"))}

    typo = scan_target("models/typo", **hub)
    assert typo.verdict == "error"
    assert typo.error.startswith("no local folder or file named models/typo (the folder models exists), "
                                 "so it was tried as a Hub repo id: ")
    assert "not found" in typo.error  # what the Hub said is kept

    away = scan_target("nobody/typo", **hub)  # no local 'nobody' folder: a plain Hub error
    assert away.verdict == "error" and "no local folder" not in away.error

    hub_server.add_repo("models/real", _model_files(folders["evil"]))  # a real repo is still scanned
    assert scan_target("models/real", **hub).verdict == "unsafe-file"


def test_an_empty_target_file_says_so(tmp_path, capsys) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text("# nothing yet\n\n")
    code, _, err = run(["scan", "--from-file", str(listed)], capsys)
    assert code == 4 and f"--from-file {listed} lists no targets" in err and "nothing to scan" not in err


def test_lone_weight_file_reads_as_not_tested_in_the_cli(folders, capsys) -> None:
    code, out, err = run(["scan", str(folders["clean"] / "model.safetensors"), *FAST_FLAGS], capsys)
    assert code == 0, err
    assert out.count("not tested") == 2 and "backdoor statistic was not run" in out
    assert "weight file only" in err  # the progress line says it too
    code, out, _ = run(["scan", str(folders["clean"] / "model.safetensors"), "--format", "json", "-q"], capsys)
    assert "backdoor statistic was not run" in validate(out)["targets"][0]["note"]


@contextlib.contextmanager
def _hub_answering(status: int) -> Iterator[str]:
    """A real HTTP server on loopback that answers every GET with ``status`` and no body, for
    Hub failures the loopback Hub server does not stage; yields its endpoint."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_a_failed_hub_query_is_an_error_entry_and_the_other_targets_are_still_scanned(folders, tmp_path, capsys,
                                                                                        monkeypatch) -> None:
    """A Hub that refuses every request (HTTP 400): the listing fails, the local folder is
    still scanned, the report is written with the query as an error target, exit code 2."""
    from otbr_hub import fetch

    monkeypatch.setattr(fetch, "RETRY_DELAYS", ())  # otbr-hub's own retries; the client is untouched
    report_path = tmp_path / "scan.json"
    with _hub_answering(400) as endpoint:
        code, _, err = run(["scan", str(folders["text"]), "--author", "alice", "--endpoint", endpoint,
                            "--format", "json", "-o", str(report_path), "-q", *FAST_FLAGS], capsys)
    assert code == 2, err
    assert "the Hub query failed, scanning the other targets" in err
    targets = validate(report_path.read_text())["targets"]
    assert [t["verdict"] for t in targets] == ["skipped", "error"]
    assert targets[1]["target"] == "hub query author=alice" and "400" in targets[1]["error"]


def test_quiet_hides_the_hub_clients_retry_lines(folders, tmp_path, capfd, monkeypatch) -> None:
    """huggingface_hub logs "Retrying in N s" for a Hub answering 503; with -q only otbr-hub's
    own one-line error may reach stderr."""
    from otbr_hub import fetch

    monkeypatch.setattr(fetch, "RETRY_DELAYS", ())
    with _hub_answering(503) as endpoint:
        code = main(["scan", str(folders["text"]), "--author", "alice", "--endpoint", endpoint,
                     "--format", "json", "-o", str(tmp_path / "r.json"), "-q", *FAST_FLAGS])
    err = capfd.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [line for line in err.strip().splitlines() if line.startswith("otbr-hub: error:")]
    assert "Retrying" not in err and len(err.strip().splitlines()) == 1


def test_text_from_a_scanned_file_cannot_inject_html_and_paths_stay_inside(tmp_path, capsys, monkeypatch) -> None:
    """A pickle's import names and a folder's name reach the Markdown summary escaped; an empty
    target is refused (it would mean the working directory); a ``../`` target's SARIF URI
    does not climb out of the checkout."""
    example = Path(__file__).resolve().parents[1] / "examples" / "badnets-resnet"
    bad = tmp_path / "repo" / "<details>"
    bad.mkdir(parents=True)
    shutil.copyfile(example / "config.json", bad / "config.json")
    # a pickle importing a made-up global whose name carries HTML
    (bad / "pytorch_model.bin").write_bytes(b"c<details><summary>all clean</summary>\nsystem\n(tR.")
    monkeypatch.chdir(tmp_path / "repo")
    code, out, _ = run(["scan", "<details>", "--format", "markdown", "-q", "--fail-on", "none"], capsys)
    assert code == 0 and "unsafe" in out.lower()
    import re

    outside_code = re.sub(r"(`+)(?:(?!\1).)*\1", "", out)  # code spans show their text literally
    assert "<details>" not in outside_code and "<summary>" not in outside_code and "&lt;summary&gt;" in outside_code

    code, _, err = run(["scan", "", "--format", "json", "-q"], capsys)
    assert code == 4 and "empty target" in err

    (tmp_path / "repo" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "repo" / "sub")
    code, out, _ = run(["scan", "../<details>", "--format", "sarif", "-q", "--fail-on", "none"], capsys)
    uris = [loc["physicalLocation"]["artifactLocation"]["uri"]
            for r in json.loads(out)["runs"][0]["results"] for loc in r["locations"]]
    assert uris and not any(u.startswith("..") for u in uris), uris


def test_small_max_classes_screen_fewer_top_classes(tmp_path: Path, capsys) -> None:
    """--max-classes 3 or 4 was refused with 'screen_top must be below max_classes', an option
    the CLI does not have: the screen now keeps at most max_classes - 1 top classes."""
    from tiny import timm_folder

    folder = timm_folder(tmp_path / "m")
    for n in ("3", "4"):
        code = main(["scan", str(folder), "--max-classes", n, "--steps", "2", "--inputs-per-class", "1",
                     "--format", "json", "-o", str(tmp_path / f"r{n}.json"), "-q", "--fail-on", "none"])
        assert code == 0, capsys.readouterr().err
        target = json.loads((tmp_path / f"r{n}.json").read_text())["targets"][0]
        assert target["verdict"] in ("clean", "suspicious", "backdoored")
