"""Hold-out check on the stock timm resnet18 (64-512 channels, identity first block), an
architecture no default was chosen on: otbr-hub's default, the same with the activation
bounds off, and a fixed full-strength ratio 0.05, with ACC / ASR on 2,000 test images.

    python benchmarks/experiments/2026-12-01-resnet18/holdout.py OUT.json FOLDER...
    python benchmarks/experiments/2026-12-01-resnet18/holdout.py --clp OUT.json FOLDER...   # adds CLP (u = 3)
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

import otbr_hub
from otbr_hub.data import load_eval_dataset
from otbr_hub.evaluate import der, evaluate
from otbr_hub.load import load_folder
from otbr_hub.triggers import parse_trigger

ARMS = {
    "default": {},
    "default, bounds off": {"clip_sigma": 0.0},
    "fixed 0.05": {"prune_ratio": 0.05},
}
LIMIT = 2000


def main(out: str, folders: list[str]) -> None:
    data = load_eval_dataset("fashion_mnist", "test")
    rows = []
    for folder in folders:
        meta = json.loads((Path(folder) / "trigger.json").read_text())
        # clean models: ASR of the zoo's white patch towards class 0, as in benchmarks/quality.py
        trigger = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
        source = load_folder(folder)
        before = evaluate(source.model, source.spec, data, trigger, limit=LIMIT)
        row = {"model": Path(folder).name, "attack": meta.get("attack", "clean"),
               "before": dataclasses.asdict(before), "arms": {}}
        for name, kw in ARMS.items():
            t0 = time.perf_counter()
            res = otbr_hub.repair(source, device="cpu", **kw)
            after = evaluate(res.model, source.spec, data, trigger, limit=LIMIT)
            row["arms"][name] = {"after": dataclasses.asdict(after), "der": der(before, after),
                                 "ratio": res.report.prune_ratio, "lam": res.report.lam,
                                 "reason": res.report.ratio_reason, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{row['model']:28s} {name:20s} ACC {before.acc:5.1f} -> {after.acc:5.1f}  "
                  f"ASR {before.asr:5.1f} -> {after.asr:5.1f}  (ratio {res.report.prune_ratio:g}, lambda {res.report.lam:g})",
                  flush=True)
        rows.append(row)
        Path(out).write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "limit": LIMIT, "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", "rows": rows,
        }, indent=2) + "\n")


def add_clp(out: str, folders: list[str]) -> None:
    """The data-free CLP baseline of ``benchmarks/quality.py`` for the same models, merged into OUT."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from quality import clp

    data = load_eval_dataset("fashion_mnist", "test")
    saved = json.loads(Path(out).read_text())
    by_name = {r["model"]: r for r in saved["rows"]}
    for folder in folders:
        row = by_name[Path(folder).name]
        meta = json.loads((Path(folder) / "trigger.json").read_text())
        trigger = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
        source = load_folder(folder)
        before = evaluate(source.model, source.spec, data, trigger, limit=LIMIT)
        model, pruned = clp(source.model)
        after = evaluate(model, source.spec, data, trigger, limit=LIMIT)
        row["arms"]["CLP (u = 3)"] = {"after": dataclasses.asdict(after), "der": der(before, after), "channels": pruned}
        print(f"{row['model']:28s} CLP (u = 3)          ACC {before.acc:5.1f} -> {after.acc:5.1f}  "
              f"ASR {before.asr:5.1f} -> {after.asr:5.1f}  ({pruned} channels)", flush=True)
    saved["command_clp"] = "python " + " ".join(sys.argv)
    Path(out).write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--clp":
        add_clp(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1], sys.argv[2:])
