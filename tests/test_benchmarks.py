"""The benchmark scripts' bookkeeping: a cached zoo model is only reused for the settings it
was trained with, and results files keep every section when several runs write them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import speed, zoo  # noqa: E402


def test_a_cached_zoo_model_is_reused_only_for_its_own_settings(tmp_path) -> None:
    out = tmp_path / "m"
    quiet = lambda *_: None  # noqa: E731
    folder, meta = zoo.train_one("resnet", "badnets:target=3", epochs=1, limit=300, out=out, log=quiet)
    assert meta["settings"]["epochs"] == 1 and meta["settings"]["limit"] == 300
    assert not list(out.glob(".*.tmp"))  # trigger.json was moved into place, no temporary left
    again, cached = zoo.train_one("resnet", "badnets:target=3", epochs=1, limit=300, out=out, log=quiet)
    assert again == folder and cached == meta
    with pytest.raises(SystemExit, match=r"other settings \(epochs, poison_rate\)"):
        zoo.train_one("resnet", "badnets:target=3", epochs=2, limit=300, poison_rate=0.2, out=out, log=quiet)
    _, forced = zoo.train_one("resnet", "badnets:target=3", epochs=2, limit=300, out=out, force=True, log=quiet)
    assert forced["settings"]["epochs"] == 2


def test_zoo_all_refuses_flags_it_would_ignore(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        zoo.main(["--all", "--quick"])
    assert exc.value.code == 2 and "does not take --quick" in capsys.readouterr().err


def test_results_sections_from_separate_runs_are_all_kept(tmp_path) -> None:
    path = tmp_path / "speed-cpu.json"
    speed.save_section(path, "emd", {"widths": [64]}, {"cpu": "a"})
    speed.save_section(path, "pipeline", {"models": {"resnet50": {"fixed": {"total_s": 1}}}}, {"cpu": "b"})
    speed.save_section(path, "pipeline", {"models": {"resnet50": {"scan": {"total_s": 2}}}}, {"cpu": "b"},
                       merge_models=True)
    doc = json.loads(path.read_text())
    assert doc["emd"] == {"widths": [64]}
    assert doc["pipeline"]["models"]["resnet50"] == {"fixed": {"total_s": 1}, "scan": {"total_s": 2}}
    assert set(doc["machines"]) == {"emd", "pipeline"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".speed-cpu.json.lock", "speed-cpu.json"]
