"""The repair CLI on local folders: output format, report, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from otbr_hub.cli import main
from otbr_hub.load import load_folder
from tiny import timm_folder, transformers_folder

FAST = ["--unlearn-steps", "2", "--unlearn-batch", "16", "--verify-samples", "32", "--device", "cpu"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_repair_timm_folder_writes_same_format(tmp_path, capsys):
    src = timm_folder(tmp_path / "src", dtype=torch.float16)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["repair", str(src), "--output", str(out), "--prune-ratio", "0.05", *FAST], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "otbr_report.json"]
    # the same config, with the activation bounds' ReLU6 (otbr_hub.clip) recorded for timm
    written, source_cfg = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    report = json.loads((out / "otbr_report.json").read_text())
    assert report["clipping"]["applied"]
    source_cfg["model_args"]["act_layer"] = "relu6"
    assert written == source_cfg
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    report = json.loads((out / "otbr_report.json").read_text())
    assert report["prune_ratio"] == 0.05 and report["neurons_pruned"] >= 1
    assert report["source_dtype"] == "float16"
    assert "prune ratio 0.05" in stdout
    assert "activation bounds:" in stdout and "saved as ReLU6" in stdout
    assert load_folder(out).dtype == torch.float16


def test_saved_folder_has_a_card_whose_snippet_loads_it(tmp_path, capsys, monkeypatch):
    """A local repair writes the model card a push would write; its usage line names the folder."""
    import re

    import timm

    src = timm_folder(tmp_path / "src")
    out = tmp_path / "fixed-model"
    code, _, err = run_cli(["repair", str(src), "--output", str(out), "--prune-ratio", "0.05", "-q", *FAST], capsys)
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card and "backdoor-defense" in card
    assert "Pruning ratio 0.05" in card and "# fixed-model" in card
    name = re.search(r'timm.create_model\("([^"]+)"', card).group(1)
    assert name == "local-dir:fixed-model"
    monkeypatch.chdir(tmp_path)
    model = timm.create_model(name, pretrained=True).eval()
    ours = load_folder(out)
    x = torch.rand(2, ours.spec.channels, ours.spec.height, ours.spec.width)
    assert torch.allclose(model(x), ours.model.eval()(x), atol=1e-6)


def test_repair_transformers_folder_carries_processor(tmp_path, capsys):
    src = transformers_folder(tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(["repair", str(src), "-o", str(out), "--prune-ratio", "0.05", "--quiet", *FAST], capsys)
    assert code == 0, err
    assert (out / "preprocessor_config.json").read_text() == (src / "preprocessor_config.json").read_text()
    reloaded = load_folder(out)
    assert type(reloaded.model).__name__ == "ViTForImageClassification"
    assert reloaded.spec.mean == (0.5, 0.5, 0.5)


def test_quiet_prints_nothing(tmp_path, capsys):
    src = timm_folder(tmp_path / "src")
    code, stdout, err = run_cli(["repair", str(src), "-o", str(tmp_path / "o"), "--prune-ratio", "0.1", "-q", *FAST], capsys)
    assert code == 0 and stdout == "" and err == ""


def test_repair_warnings_reach_the_terminal_but_not_with_quiet(tmp_path, capsys, caplog, monkeypatch):
    """Every repair warns once the threshold is above any agreement (our own constant, patched);
    -q keeps the terminal silent and the warning stays in otbr_report.json."""
    monkeypatch.setattr("otbr_hub.verify.LOW_AGREEMENT", 1.01)
    src = timm_folder(tmp_path / "src")
    args = ["repair", str(src), "--prune-ratio", "0.1", *FAST]
    code, stdout, err = run_cli([*args, "-o", str(tmp_path / "loud")], capsys)  # the log goes to pytest's handler
    assert code == 0 and any(r.message.startswith("warning:") and "disagrees with the original" in r.message
                             for r in caplog.records)
    caplog.clear()
    code, stdout, err = run_cli([*args, "-o", str(tmp_path / "quiet"), "-q"], capsys)
    assert code == 0 and stdout == "" and err == "" and not [r for r in caplog.records if r.name == "otbr_hub"]
    report = json.loads((tmp_path / "quiet" / "otbr_report.json").read_text())
    assert len(report["warnings"]) == 1 and "disagrees" in report["warnings"][0]
    assert "Check before use" in (tmp_path / "quiet" / "README.md").read_text()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = timm_folder(tmp_path / "good")
    not_model = tmp_path / "notmodel"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello")
    nan = timm_folder(tmp_path / "nan")
    sd = load_file(nan / "model.safetensors")
    sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, nan / "model.safetensors")
    text = tmp_path / "text"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(text)
    return {
        "not a model": ([str(not_model)], "not a model folder"),
        "missing path": ([str(tmp_path / "nope")], "does not exist"),
        "no supported layer": ([str(good), "--layer-types", "linear"], "no supported layer"),
        "text model": ([str(text)], "not an image classifier"),
        "nan weights": ([str(nan)], "NaN"),
        "ratio too big": ([str(good), "--prune-ratio", "1.5"], "(0, 1)"),
        "ratio zero": ([str(good), "--prune-ratio", "0"], "(0, 1)"),
        "ratio not a number": ([str(good), "--prune-ratio", "lots"], "prune-ratio"),
        "lambda": ([str(good), "--lambda", "2"], "lambda"),
        "unknown preset": ([str(good), "--preset", "magic"], "preset"),
        "bad unlearn lr": ([str(good), "--unlearn-lr", "-1"], "--unlearn-lr"),
        "bad noise size": ([str(good), "--noise-size", "0"], "--noise-size"),
        "bad regex": ([str(good), "--include", "["], "--include"),
        "bad min agreement": ([str(good), "--min-agreement", "2"], "--min-agreement"),
        "bad eval limit": ([str(good), "--eval-limit", "0"], "--eval-limit"),
        "eval split alone": ([str(good), "--eval-split", "train"], "--eval-split needs --eval-dataset"),
        "unknown eval split": ([str(good), "--eval-dataset", "fashion_mnist", "--eval-split", "val", "--trigger",
                                "badnets:target=1"], "not 'val'"),
        "repo id without push": ([str(good), "--repo-id", "me/x"], "--push"),
        "revision of a local folder": ([str(good), "--revision", "v1"], "--revision"),
        "trigger without target": ([str(good), "--eval-dataset", "fashion_mnist", "--trigger", "badnets:size=3"],
                                   "name the attack's target class"),
    }


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    capsys.readouterr()  # what building the inputs printed (transformers' shard progress bar)
    for name, (args, expected) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code, stdout, err = run_cli(["repair", *args, "--output", str(out), *FAST], capsys)
        assert code != 0, name
        lines = [l for l in err.strip().splitlines() if l]
        assert len(lines) == 1, (name, err)
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in err
        assert not out.exists(), name
        assert not list(tmp_path.glob(f".out-{name.replace(' ', '-')}*")), name


def test_an_evaluation_the_model_cannot_take_fails_before_the_repair(tmp_path, capsys, monkeypatch):
    """A trigger target or label set outside the model's classes is refused once the model is
    loaded, not after minutes of repairing it (and nothing is written)."""
    import datasets
    import numpy as np

    import importlib

    repair_module = importlib.import_module("otbr_hub.repair")  # the package's ``repair`` is the function

    def no_repair(*args, **kwargs):
        raise AssertionError("the repair ran although the evaluation could not")

    monkeypatch.setattr(repair_module, "repair", no_repair)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(6)]
    wide = datasets.Dataset.from_dict({"image": images, "label": [0, 3, 5, 7, 9, 11]},
                                      features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=12)}))
    wide.save_to_disk(str(tmp_path / "wide"))
    plain = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3, 4, 10]},
                                       features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    plain.save_to_disk(str(tmp_path / "plain"))
    src = timm_folder(tmp_path / "src")
    capsys.readouterr()  # the datasets progress bars of saving them
    cases = {
        "trigger target": ([str(tmp_path / "plain"), "badnets:target=10"], "trigger target 10 is not a class of this 10-class model"),
        "declared classes": ([str(tmp_path / "wide"), "badnets:target=1"], "the dataset has 12 classes but the model has 10"),
        "label range": ([str(tmp_path / "plain"), "badnets:target=1"], "dataset labels span 0..10 but the model has 10 classes"),
    }
    for name, ((dataset, trigger), expected) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code, _, err = run_cli(["repair", str(src), "-o", str(out), *FAST, "--eval-dataset", dataset, "--trigger", trigger], capsys)
        lines = [l for l in err.strip().splitlines() if l]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (name, err)
        assert not out.exists(), name


def test_missing_output_parent(tmp_path, capsys):
    src = timm_folder(tmp_path / "src")
    code, _, err = run_cli(["repair", str(src), "--output", str(tmp_path / "no" / "such" / "dir"), *FAST], capsys)
    assert code != 0 and "parent folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()


def test_output_that_holds_the_source_is_refused_even_with_overwrite(tmp_path, capsys):
    src = timm_folder(tmp_path / "src")
    (src / "trigger.json").write_text("{}")
    before = sorted(p.name for p in src.iterdir())
    for out in (src, tmp_path):
        code, _, err = run_cli(["repair", str(src), "--output", str(out), "--overwrite", *FAST], capsys)
        assert code != 0 and "holds the source model" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in src.iterdir()) == before


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    src = timm_folder(tmp_path / "src")
    code, _, err = run_cli(["repair", str(src), "--output", "/proc/otbr-out", *FAST], capsys)
    assert code != 0 and "cannot write to /proc" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["repair", str(src), "--output", str(src / "config.json" / "x"), *FAST], capsys)
    assert code != 0 and "is a file, not a folder" in err


def test_saved_files_are_readable_by_others(tmp_path, capsys):
    src = timm_folder(tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(["repair", str(src), "--output", str(out), "--prune-ratio", "0.05", *FAST], capsys)
    assert code == 0, err
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o755 & ~mask
    assert all((p.stat().st_mode & 0o777) == 0o644 & ~mask for p in out.iterdir())


def test_non_empty_output_is_not_overwritten(tmp_path, capsys):
    src = timm_folder(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["repair", str(src), "--output", str(out), *FAST], capsys)
    assert code != 0 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_interrupted_save_leaves_no_copy_and_keeps_the_earlier_output(tmp_path, monkeypatch):
    """Ctrl-C while the weights are written: no hidden temporary folder stays behind, and
    with ``--overwrite`` the earlier output is still there, whole."""
    import pytest

    from otbr_hub import save

    src = load_folder(timm_folder(tmp_path / "src"))
    out = save.save_model(src, src.model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = save.write_folder

    def interrupted(*args, **kwargs):
        real_write(*args, **kwargs)  # the files are there, half the job done
        raise KeyboardInterrupt

    monkeypatch.setattr(save, "write_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save.save_model(src, src.model, tmp_path / "out", overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        save.save_model(src, src.model, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_console_script_runs_as_a_process(tmp_path):
    """The installed entry point: a real process, no traceback on bad input."""
    proc = subprocess.run([sys.executable, "-m", "otbr_hub", "repair", str(tmp_path), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("otbr-hub: error:") and "Traceback" not in proc.stderr


def test_eval_dataset_is_measured_and_named_in_report_and_card(tmp_path, capsys):
    """--eval-dataset / --trigger: the report records ACC/ASR before and after and the name the
    user gave, and the card and its model-index say which dataset and split."""
    import datasets
    import numpy as np

    from otbr_hub.card import render_card

    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {"image": [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(24)], "label": [i % 10 for i in range(24)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )
    ds.save_to_disk(str(tmp_path / "evalset"))
    src = timm_folder(tmp_path / "src")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["repair", str(src), "-o", str(out), "--prune-ratio", "0.05", *FAST,
                                 "--eval-dataset", str(tmp_path / "evalset"), "--trigger", "badnets:target=1"], capsys)
    assert code == 0, err
    report = json.loads((out / "otbr_report.json").read_text())
    ev = report["evaluation"]
    assert ev["dataset"] == "evalset" and ev["split"] is None  # a public name, and a plain Dataset has no split
    assert str(tmp_path) not in json.dumps(ev)
    assert ev["before"]["n_clean"] == 24 and 0 <= ev["after"]["acc"] <= 100 and ev["after"]["asr"] is not None
    assert "before: ACC" in stdout and "after:" in stdout
    card = render_card(report, repo_id="me/x")
    head = card.split("## How to use")[0]
    assert "Measured on `evalset`, 24 images (" in card and "with trigger" in card
    assert "split:" not in head and "name: evalset" in head
    assert str(tmp_path) not in card  # the Reproduce command too: local paths by their last component
    assert "--eval-dataset evalset --trigger badnets:target=1" in card

    from otbr_hub.data import describe_eval_source

    assert describe_eval_source("Fashion-MNIST") == ("fashion_mnist", "test")
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert describe_eval_source(tmp_path / "dd") == ("dd", "test")
    assert describe_eval_source("user/some-dataset") == ("user/some-dataset", "test")


def test_eval_split_picks_the_split_and_the_report_names_it(tmp_path, capsys):
    import datasets
    import numpy as np

    rng = np.random.default_rng(1)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    part = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)], "label": [i % 10 for i in range(n)]},
        features=features)
    datasets.DatasetDict({"test": part(20), "validation": part(30)}).save_to_disk(str(tmp_path / "dd"))
    src = timm_folder(tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(["repair", str(src), "-o", str(out), "--prune-ratio", "0.05", *FAST, "--eval-dataset",
                            str(tmp_path / "dd"), "--eval-split", "validation", "--trigger", "badnets:target=1"], capsys)
    assert code == 0, err
    ev = json.loads((out / "otbr_report.json").read_text())["evaluation"]
    assert ev["split"] == "validation" and ev["before"]["n_clean"] == 30
    code, _, err = run_cli(["repair", str(src), "-o", str(tmp_path / "o2"), *FAST, "--eval-dataset",
                            str(tmp_path / "dd"), "--eval-split", "train", "--trigger", "badnets:target=1"], capsys)
    assert code == 2 and "no split 'train'; it has test, validation" in err and not (tmp_path / "o2").exists()


def test_output_links_long_names_and_reserved_names_are_handled_before_the_repair(tmp_path, capsys):
    """Review fixes: a symlinked --output writes the folder it points to (the link stays); a
    dangling link, a name too long for the temporary sibling and a seed torch cannot take are
    refused up front; with several sources a file where a model folder goes is refused even
    with --overwrite, and a source folder named like the summary does not take its place."""
    src = timm_folder(tmp_path / "src")
    target = tmp_path / "real-out"
    target.mkdir()
    link = tmp_path / "link-out"
    link.symlink_to(target)
    code, _, err = run_cli(["repair", str(src), "-o", str(link), "--prune-ratio", "0.05", "-q", *FAST], capsys)
    assert code == 0, err
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden leftovers
    code, _, err = run_cli(["repair", str(src), "-o", str(link), "--prune-ratio", "0.05", "-q", "--overwrite", *FAST], capsys)
    assert code == 0, err
    assert link.is_symlink() and (target / "otbr_report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for args, why in [
        (["-o", str(dangling)], "symbolic link to .*nowhere, which does not exist"),
        (["-o", str(tmp_path / ("x" * 250))], "250 bytes long"),
        (["-o", str(tmp_path / ("y" * 300))], "250 bytes long|File name too long"),
        (["-o", str(tmp_path / "o"), "--seed", str(2**70)], r"seed \(--seed\) must be in \[0, 2\*\*63\)"),
        (["-o", str(tmp_path / "o"), "--trigger", "", "--eval-dataset", "fashion_mnist"], "--trigger is empty"),
    ]:
        code, _, err = run_cli(["repair", str(src), "--prune-ratio", "0.05", *args, *FAST], capsys)
        assert code != 0 and len(err.strip().splitlines()) == 1, (args, err)
        assert __import__("re").search(why, err), (why, err)

    many = tmp_path / "many"
    many.mkdir()
    (many / "src").write_text("not a folder")
    other = timm_folder(tmp_path / "other")
    code, _, err = run_cli(["repair", str(src), str(other), "-o", str(many), "--overwrite", "-q", *FAST], capsys)
    assert code == 2 and "exists and is not a folder" in err and not (many / "other").exists(), err
    summary_named = timm_folder(tmp_path / "repair_summary.json")
    out = tmp_path / "two"
    code, _, err = run_cli(["repair", str(summary_named), str(src), "-o", str(out), "--prune-ratio", "0.05", "-q", *FAST], capsys)
    assert code == 0, err
    summary = json.loads((out / "repair_summary.json").read_text())
    assert sorted(Path(r["output"]).name for r in summary["results"]) == ["repair_summary.json-2", "src"]


_NO_TORCH = """
import sys
from otbr_hub.cli import main
for argv in (["--help"], ["repair", "--help"], ["scan", "--help"], ["repair", "--no-such-flag"]):
    try:
        main(argv)
    except SystemExit:
        pass
import otbr_hub
print("torch" in sys.modules, sorted(set(dir(otbr_hub)) - {"__version__"}) == sorted(otbr_hub.__all__))
"""


def test_help_and_argument_errors_answer_without_importing_torch() -> None:
    """`otbr-hub --help` and a mistyped flag answer in a fraction of a second: the package and
    the parsers import torch only when a command runs."""
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False True"
    import otbr_hub
    from otbr_hub.repair import RepairResult

    # the public functions stay functions after their submodules load (otbr_hub.repair, otbr_hub.scan)
    assert callable(otbr_hub.repair) and callable(otbr_hub.scan) and otbr_hub.RepairResult is RepairResult


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C as soon as the command starts (torch still loading) ends with one line and 130."""
    import signal
    import time

    example = Path(__file__).resolve().parents[1] / "examples" / "badnets-resnet"

    # a shell's background job (`make test &`) starts with SIGINT ignored, and Python keeps it so: restore it
    proc = subprocess.Popen([sys.executable, "-m", "otbr_hub", "repair", str(example), "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:  # wait until torch's library is being loaded
        if "libtorch" in maps.read_text(errors="replace"):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "otbr-hub: interrupted"
    assert not (tmp_path / "out").exists()


def test_evaluation_options_that_would_be_ignored_are_refused(tmp_path: Path, capsys) -> None:
    import datasets
    import numpy as np

    folder = timm_folder(tmp_path / "m")
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps({"trigger": None, "attack": "none"}))
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"image": [np.zeros((28, 28), np.uint8)] * 2, "label": [0, 1]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.ClassLabel(num_classes=10)})).save_to_disk(str(single))
    cases = {
        "--eval-limit needs --eval-dataset": ["--eval-limit", "5"],
        "describes a clean model": ["--eval-dataset", str(single), "--trigger", str(clean)],
        "holds a single dataset, not splits": ["--eval-dataset", str(single), "--trigger", "badnets:target=3",
                                              "--eval-split", "validation"],
    }
    for expected, extra in cases.items():
        code = main(["repair", str(folder), "-o", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, (expected, err)
        assert not (tmp_path / "out").exists()
