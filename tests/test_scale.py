"""Many models, several processes, progress output and device choice.

The multi-process tests start real ``accelerate launch`` runs with two CPU processes
(``ACCELERATE_USE_CPU=1`` with the torchrun launcher: ``accelerate launch --cpu`` alone
starts a single process unless MPI is installed). Three models over two processes is an
uneven split (two and one), which is where duplicates or gaps would show.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from otbr_hub.cli import folder_names, main
from otbr_hub.distribute import Team, team
from hubserver import HubServer
from tiny import timm_folder, transformers_folder

FAST = ["--unlearn-steps", "2", "--unlearn-batch", "16", "--verify-samples", "32", "--prune-ratio", "0.05"]
SCAN_FAST = ["--steps", "10", "--inputs-per-class", "2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    return [timm_folder(root / "resnet-a"), timm_folder(root / "resnet-b"), transformers_folder(root / "vit")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], env: dict[str, str] | None = None, processes: int = 2,
           stdin: str | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the otbr-hub CLI on ``processes`` CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "otbr_hub", *args]
    full_env = {**os.environ, **(env or {}), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300, input=stdin)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- two processes


def test_two_processes_repair_and_push_each_model_once(models, tmp_path, hub_server: HubServer) -> None:
    out = tmp_path / "out"
    env = {**hub_server.env, "HF_TOKEN": hub_server.tokens.write}
    proc = launch(["repair", *map(str, models), "--output", str(out), "--push", "-q", *FAST], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and "otbr-hub" not in proc.stderr  # --quiet: nothing but errors

    summary = json.loads((out / "repair_summary.json").read_text())
    assert summary["processes"] == 2 and summary["models"] == 3 and summary["ok"] == 3
    results = summary["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["source"] for r in results] == [str(m) for m in models]
    assert sorted(r["process"] for r in results) == [0, 0, 1]  # uneven split, nothing twice
    assert [r["output"] for r in results] == ["resnet-a", "resnet-b", "vit"]
    assert sorted(p.name for p in out.iterdir()) == ["repair_summary.json", "resnet-a", "resnet-b", "vit"]
    assert all((out / name / "README.md").is_file() for name in ("resnet-a", "resnet-b", "vit"))
    for r in results:
        assert json.loads((out / r["output"] / "otbr_report.json").read_text())["neurons_pruned"] >= 1

    pushed = sorted(hub_server.repo_ids())
    assert pushed == ["alice/resnet-a-otbr", "alice/resnet-b-otbr", "alice/vit-otbr"]
    for repo in pushed:
        history = hub_server.commits(repo)
        assert len(history) == 2 and history[1].title == "initial commit"  # one push commit, not two
    commit_posts = [r for r in hub_server.requests if r.method == "POST" and "/commit/" in r.path]
    assert len(commit_posts) == 3
    assert {r["url"] for r in results} == {f"{hub_server.endpoint}/{repo}" for repo in pushed}


def test_two_processes_scan_one_combined_report(models, tmp_path) -> None:
    report_path = tmp_path / "scan.json"
    proc = launch(["scan", *map(str, models), "--format", "json", "-o", str(report_path), "--fail-on", "none",
                   "-q", *SCAN_FAST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report_path.read_text())
    assert [t["target"] for t in data["targets"]] == [str(m) for m in models]
    assert data["summary"]["targets"] == 3 and data["settings"]["processes"] == 2
    assert all(t["verdict"] in ("clean", "suspicious", "backdoored") for t in data["targets"])


# --------------------------------------------------------------------------- one process, many models


def test_two_processes_take_a_list_from_standard_input_once(models, tmp_path) -> None:
    """Every process shares standard input, so only the first reads it and the others get its
    list; before, the other process saw a different list and the run hung in a collective step."""
    out = tmp_path / "out"
    proc = launch(["repair", str(models[0]), "--from-file", "-", "--output", str(out), "-q", *FAST],
                  stdin=f"{models[1]}\n{models[2]}\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "repair_summary.json").read_text())
    assert [r["source"] for r in summary["results"]] == [str(m) for m in models]
    report_path = tmp_path / "scan.json"
    proc = launch(["scan", "--from-file", "-", "--format", "json", "-o", str(report_path), "--fail-on", "none", "-q",
                   *SCAN_FAST], stdin=f"{models[0]}\n{models[2]}\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [t["target"] for t in json.loads(report_path.read_text())["targets"]] == [str(models[0]), str(models[2])]


def test_many_sources_in_one_process(models, tmp_path, capsys) -> None:
    listed = tmp_path / "sources.txt"
    listed.write_text(f"# two more\n{models[1]}\n{models[2]}\n")
    out = tmp_path / "out"
    code, stdout, err = run(["repair", str(models[0]), "--from-file", str(listed), "-o", str(out), "--device", "cpu", *FAST],
                            capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("[1/3]") and lines[-1].startswith("repaired 3 of 3 models")
    assert sorted(p.name for p in out.iterdir()) == ["repair_summary.json", "resnet-a", "resnet-b", "vit"]
    assert all((out / name / "README.md").is_file() for name in ("resnet-a", "resnet-b", "vit"))

    # A second run may not replace the models without --overwrite, and checks that before any work.
    code, _, err = run(["repair", *map(str, models), "-o", str(out), "--device", "cpu", *FAST], capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_quiet_prints_only_errors_and_a_failure_does_not_stop_the_rest(models, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    code, stdout, err = run(["repair", str(models[0]), str(missing), "-o", str(out), "-q", "--device", "cpu", *FAST], capsys)
    assert code == 2
    assert stdout == ""
    assert err.strip().splitlines() == [f"otbr-hub: error: {missing}: {missing} does not exist"]
    summary = json.loads((out / "repair_summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["ok", "error"] and summary["failed"] == 1
    assert (out / "resnet-a" / "model.safetensors").is_file() and not (out / "no-such-model").exists()


def test_scan_quiet_prints_nothing(models, tmp_path, capsys) -> None:
    code, stdout, err = run(["scan", str(models[0]), str(models[2]), "-q", "--format", "json", "-o",
                             str(tmp_path / "r.json"), "--fail-on", "none", *SCAN_FAST], capsys)
    assert code == 0 and stdout == "" and err == ""


def test_several_sources_never_write_over_a_source(tmp_path, capsys) -> None:
    """``repair root/a root/b -o root --overwrite`` would put the results where the sources are."""
    a, b = timm_folder(tmp_path / "a"), timm_folder(tmp_path / "b")
    before = {p: p.read_bytes() for p in [*a.iterdir(), *b.iterdir()]}
    code, _, err = run(["repair", str(a), str(b), "-o", str(tmp_path), "--overwrite", "--device", "cpu", *FAST], capsys)
    assert code == 2 and "would replace the source model" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in [*a.iterdir(), *b.iterdir()]} == before


def test_several_sources_check_the_output_and_repair_each_folder_once(models, tmp_path, capsys, caplog) -> None:
    """An unwritable parent is a one-line error before any work; one folder under two
    spellings (``x`` and ``x/``, a symlink) is one source."""
    code, _, err = run(["repair", str(models[0]), str(models[1]), "-o", "/proc/otbr-out", "--device", "cpu", *FAST], capsys)
    assert code == 2 and "cannot write to /proc" in err and len(err.strip().splitlines()) == 1
    link = tmp_path / "alias"
    link.symlink_to(models[0])
    out = tmp_path / "out"
    code, stdout, err = run(["repair", str(models[0]), f"{models[0]}/", str(link), str(models[1]), "-o", str(out),
                             "--device", "cpu", *FAST], capsys)
    assert code == 0, err
    assert "given more than once" in caplog.text
    summary = json.loads((out / "repair_summary.json").read_text())
    assert [r["source"] for r in summary["results"]] == [str(models[0]), str(models[1])]


def test_several_sources_refuse_a_single_destination(models, capsys) -> None:
    code, _, err = run(["repair", str(models[0]), str(models[1]), "--push", "--repo-id", "me/x", *FAST], capsys)
    assert code == 2 and "--repo-id" in err


def test_output_folder_names_are_unique() -> None:
    names = folder_names(["./models/resnet", "/data/other/resnet", "alice/vit-base@v1", "./resnet/", "bob/x"])
    assert names == ["resnet", "resnet-2", "alice--vit-base--v1", "resnet-3", "bob--x"]


# --------------------------------------------------------------------------- placement and gathering


def test_device_auto_is_the_cpu_without_a_gpu(models, tmp_path, capsys, monkeypatch) -> None:
    from accelerate import PartialState

    from otbr_hub.placement import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    PartialState._reset_state()
    try:
        assert resolve_device("auto") == torch.device("cpu")
        code, _, err = run(["repair", str(models[0]), "-o", str(tmp_path / "o"), "-q", *FAST], capsys)  # --device auto
        assert code == 0, err
        assert json.loads((tmp_path / "o" / "otbr_report.json").read_text())["device"] == "cpu"
    finally:
        PartialState._reset_state()


def test_single_process_team_keeps_one_result_per_item() -> None:
    solo = team()
    assert (solo.index, solo.size, solo.is_main) == (0, 1, True)
    assert solo.share(["a", "b", "c"]) == [(0, "a"), (1, "b"), (2, "c")]
    assert solo.gather([(2, "C"), (0, "A"), (1, "B"), (0, "again")], expected=3) == ["A", "B", "C"]
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        Team(index=0, size=1).gather([(0, "A"), (2, "C")], expected=3)


# --------------------------------------------------------------------------- arithmetic


def test_precision_auto_keeps_small_inputs_in_fp32_and_names_bad_values() -> None:
    from otbr_hub.errors import UsageError
    from otbr_hub.load import InputSpec
    from otbr_hub.placement import BF16_MIN_PIXELS, bf16_is_fast, resolve_precision

    cpu = torch.device("cpu")
    small = InputSpec(channels=3, height=32, width=32, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
    large = InputSpec(channels=3, height=224, width=224, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
    assert small.height * small.width < BF16_MIN_PIXELS <= large.height * large.width
    assert resolve_precision("auto", cpu, small) == "fp32"
    assert resolve_precision("auto", cpu, large) == ("bf16" if bf16_is_fast(cpu) else "fp32")
    assert resolve_precision("bf16", cpu, small) == "bf16" and resolve_precision("fp32", cpu, large) == "fp32"
    with pytest.raises(UsageError, match="precision"):
        resolve_precision("fp16", cpu, small)


def test_bf16_autocasts_the_gradient_passes_and_is_recorded(tmp_path, capsys) -> None:
    from otbr_hub.placement import gradient_precision
    from otbr_hub.settings import preset

    cpu = torch.device("cpu")
    a = torch.randn(4, 4)
    with gradient_precision("bf16", cpu):
        assert (a @ a).dtype == torch.bfloat16
    with gradient_precision("fp32", cpu):
        assert (a @ a).dtype == torch.float32
    assert preset("paper").precision == "fp32" and preset("default").precision == "auto"

    src = timm_folder(tmp_path / "m")
    code, _, err = run(["repair", str(src), "-o", str(tmp_path / "o"), "-q", "--precision", "bf16", *FAST], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "otbr_report.json").read_text())
    assert report["unlearning"]["precision"] == "bf16" and report["verification"]["ok"]
    from otbr_hub.card import render_card

    assert "bfloat16 autocast" in render_card(report)
    code, _, err = run(["repair", str(src), "-o", str(tmp_path / "p"), "-q", "--precision", "half", *FAST], capsys)
    assert code != 0 and "precision" in err and "Traceback" not in err


def test_channels_last_images_fall_back_for_a_forward_that_views_its_input() -> None:
    from otbr_hub.load import forward_logits

    class Flat(torch.nn.Module):  # a conv net whose forward flattens the raw input with .view
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(3 * 8 * 8 + 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.view(x.shape[0], -1)
            return self.fc(torch.cat([flat, self.conv(x).mean((2, 3))], 1))

    model = Flat().eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, x), model(x))
        torch.testing.assert_close(forward_logits(model, x), model(x))  # remembered, no second failure


class _Terminal:
    """A stderr that says it is a terminal and keeps what was drawn on it."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_a_terminal_sees_every_stage_and_a_clean_line_after_the_bars(models, tmp_path, monkeypatch, capsys) -> None:
    """At a terminal, one model's bars name the stages after the repair too (save); with
    several models each gets its one line, ending with its outcome."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    code = main(["repair", str(models[0]), "-o", str(tmp_path / "one"), "--device", "cpu", *FAST])
    assert code == 0
    for stage in ("load", "unlearn", "fuse", "save"):
        assert f"{stage}" in term.text, stage
    assert capsys.readouterr().out.startswith("repaired ")

    term.text = ""
    code = main(["repair", str(models[0]), str(models[1]), "-o", str(tmp_path / "two"), "--device", "cpu", *FAST])
    assert code == 0
    assert f"[1/2] {models[0]}: ratio 0.05" in term.text and f"[2/2] {models[1]}: ratio 0.05" in term.text
    assert f"[1/2] {models[0]}: save" in term.text
