"""The GitHub Action's shell steps and the example workflow's change detection, run as bash
scripts with a stand-in ``otbr-hub`` that records its arguments (the real CLI is tested
elsewhere; here what matters is what the scripts hand it and what they report back)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None, reason="needs bash and git")

STUB = """#!/bin/bash
# Records its arguments and the --from-file list; writes --output when STUB_WRITE is set.
printf '%s\\n' "$@" > "$RUNNER_TEMP/args.txt"
prev=""
for a in "$@"; do
  [ "$prev" = "--from-file" ] && cp "$a" "$RUNNER_TEMP/targets-seen.txt"
  [ "$prev" = "--output" ] && out="$a"
  prev="$a"
done
[ -n "$STUB_WRITE" ] && echo '{"summary": {"targets": 1, "verdicts": {"clean": 1}, "unsafe_files": 0}}' > "$out"
exit "${STUB_CODE:-0}"
"""


def _step(path: Path, step_id: str, jobs: bool = False) -> str:
    doc = yaml.safe_load(path.read_text())
    steps = doc["jobs"]["scan"]["steps"] if jobs else doc["runs"]["steps"]
    return next(s for s in steps if s.get("id") == step_id)["run"]


def _outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture()
def runner(tmp_path: Path):
    """Run the action's scan step in ``tmp_path`` with the stand-in CLI; returns (rc, outputs, args, targets)."""
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "otbr-hub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    script = tmp_path / "scan.sh"
    script.write_text(_step(ROOT / "action.yml", "scan"))
    base = {"OTBR_FORMAT": "sarif", "OTBR_FAIL_ON": "suspicious", "OTBR_LIMIT": "50", "OTBR_MODELS": "",
            "OTBR_AUTHOR": "", "OTBR_SEARCH": "", "OTBR_FILTER": "", "OTBR_OUTPUT": "", "OTBR_ARGS": "", "HF_TOKEN": ""}

    def run(**env: str) -> tuple[int, dict[str, str], list[str], list[str]]:
        out = tmp_path / "github_output"
        out.write_text("")
        for name in ("args.txt", "targets-seen.txt"):
            (tmp_path / name).unlink(missing_ok=True)
        full = {**os.environ, **base, **env, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                "RUNNER_TEMP": str(tmp_path), "GITHUB_OUTPUT": str(out)}
        proc = subprocess.run(["bash", "-e", str(script)], cwd=tmp_path, env=full, capture_output=True, text=True,
                              timeout=60)
        read = lambda name: (tmp_path / name).read_text().splitlines() if (tmp_path / name).exists() else []  # noqa: E731
        return proc.returncode, _outputs(out), read("args.txt"), read("targets-seen.txt")

    return run


def test_one_folder_with_a_space_stays_one_target_and_args_keep_their_quoting(runner, tmp_path: Path) -> None:
    (tmp_path / "models" / "my model").mkdir(parents=True)
    rc, out, args, targets = runner(OTBR_MODELS="models/my model", OTBR_ARGS='--steps 5\n--cache-dir "/a b"',
                                    OTBR_FILTER="timm,*", STUB_WRITE="1")
    assert rc == 0 and out["exit-code"] == "0" and out["fresh"] == "true"
    assert targets == ["models/my model"]
    assert args[-4:] == ["--steps", "5", "--cache-dir", "/a b"]
    assert ["--filter", "*"] == args[args.index("*") - 1: args.index("*") + 1]  # not expanded against the workspace
    # a single line that is not one path is a space-separated list
    rc, _, _, targets = runner(OTBR_MODELS="alice/a bob/b")
    assert targets == ["alice/a", "bob/b"]


def test_an_old_report_is_not_taken_for_this_runs(runner, tmp_path: Path) -> None:
    old = tmp_path / "otbr-hub-report.sarif"
    old.write_text("{}")
    rc, out, _, _ = runner(OTBR_MODELS="x", STUB_CODE="4")
    assert rc == 0 and out["exit-code"] == "4" and out["fresh"] == "false"
    rc, out, _, _ = runner(OTBR_MODELS="x", STUB_CODE="1", STUB_WRITE="1")
    assert out["exit-code"] == "1" and out["fresh"] == "true"


def test_a_bad_format_or_bad_args_quoting_still_sets_the_outputs(runner) -> None:
    """The step itself succeeds, so that the summary step still sets ``verdict`` (to "none");
    the action's last step fails the job with the exit code 4 recorded here."""
    rc, out, args, _ = runner(OTBR_FORMAT="xml", OTBR_MODELS="x")
    assert rc == 0 and out == {"report": "", "fresh": "false", "exit-code": "4"} and args == []
    rc, out, args, _ = runner(OTBR_MODELS="x", OTBR_ARGS='--cache-dir "/a b')  # unbalanced quote
    assert rc == 0 and out["exit-code"] == "4" and args == []


def test_whitespace_only_args_add_no_empty_word(runner) -> None:
    """An empty word would reach the CLI as a target "" (the working directory)."""
    rc, out, args, _ = runner(OTBR_MODELS="x", OTBR_ARGS="  \n ")
    assert rc == 0 and "" not in args and args[-2:] == ["--limit", "50"]


def test_changed_model_detection_keeps_any_file_name_and_stays_under_models(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo,  # noqa: E731
                                    check=True, capture_output=True, text=True)
    git("init", "-q", ".")
    git("commit", "-q", "--allow-empty", "-m", "base")
    base = git("rev-parse", "HEAD").stdout.strip()
    for folder in ("models/é", "models/my model", "webapp"):
        (repo / folder).mkdir(parents=True)
        (repo / folder / "config.json").write_text("{}")
    (repo / "models/é/model.safetensors").write_bytes(b"")
    (repo / "models/my model/model.safetensors").write_bytes(b"")
    (repo / "models/top é.pt").write_bytes(b"")
    (repo / "models/README.md").write_text("notes")
    (repo / "tests.bin").write_bytes(b"")  # outside models/: not this workflow's business
    git("add", "-A")
    git("commit", "-q", "-m", "change")
    script = tmp_path / "changed.sh"
    script.write_text(_step(ROOT / ".github/workflows/scan-changed-models.yml", "changed", jobs=True))
    out = tmp_path / "github_output"
    env = {**os.environ, "BASE": base, "MODELS_DIR": "models", "GITHUB_OUTPUT": str(out)}
    subprocess.run(["bash", "-e", str(script)], cwd=repo, env=env, check=True, capture_output=True, timeout=60)
    lines = out.read_text().splitlines()
    assert lines[0] == "models<<OTBR_EOF" and lines[-1] == "OTBR_EOF"
    assert sorted(lines[1:-1]) == ["models/my model", "models/top é.pt", "models/é"]
