"""Hold-out on stock timm MobileNetV3-small and EfficientNet-B0 (depthwise separable blocks,
squeeze-excitation, hard-swish / SiLU): otbr-hub's default, the same with the layer-normalised
ranking, and CLP, with ACC / ASR on 2,000 test images and the scan of the original.

    python benchmarks/experiments/2026-12-01-mobile/holdout.py OUT.json FOLDER...
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import otbr_hub  # noqa: E402
from otbr_hub.data import load_eval_dataset  # noqa: E402
from otbr_hub.evaluate import der, evaluate  # noqa: E402
from otbr_hub.load import load_folder  # noqa: E402
from otbr_hub.triggers import parse_trigger  # noqa: E402
from quality import clp  # noqa: E402

ARMS = {"default": {}, "layer-normalized ranking": {"ranking": "layer-normalized"}}
if os.environ.get("ARMS"):  # e.g. ARMS=default: only these arms (comma-separated names)
    ARMS = {k: v for k, v in ARMS.items() if k in os.environ["ARMS"].split(",")}
LIMIT = 2000


def main(out: str, folders: list[str]) -> None:
    data = load_eval_dataset("fashion_mnist", "test")
    rows = []
    for folder in folders:
        meta = json.loads((Path(folder) / "trigger.json").read_text())
        trigger = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
        source = load_folder(folder)
        before = evaluate(source.model, source.spec, data, trigger, limit=LIMIT)
        row = {"model": Path(folder).name, "attack": meta.get("attack", "clean"), "before": dataclasses.asdict(before), "arms": {}}
        for name, kw in ARMS.items():
            t0 = time.perf_counter()
            res = otbr_hub.repair(source, device="cpu", **kw)
            after = evaluate(res.model, source.spec, data, trigger, limit=LIMIT)
            scan = res.report.scan_before or {}
            row["arms"][name] = {"after": dataclasses.asdict(after), "der": der(before, after), "ratio": res.report.prune_ratio,
                                 "lam": res.report.lam, "reason": res.report.ratio_reason,
                                 "agreement": res.report.verification.get("agreement"), "warnings": res.report.warnings,
                                 "scan": {k: scan.get(k) for k in ("verdict", "p_value", "suspected_target", "decided_by")},
                                 "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{row['model']:28s} {name:24s} ACC {before.acc:5.1f} -> {after.acc:5.1f}  ASR {before.asr:5.1f} -> {after.asr:5.1f}"
                  f"  (ratio {res.report.prune_ratio:g}, lambda {res.report.lam:g}, agreement {res.report.verification.get('agreement'):.3f};"
                  f" scan {scan.get('verdict')} p {scan.get('p_value', float('nan')):.3g} class {scan.get('suspected_target')})", flush=True)
        model, pruned = clp(source.model)
        after = evaluate(model, source.spec, data, trigger, limit=LIMIT)
        row["arms"]["CLP (u = 3)"] = {"after": dataclasses.asdict(after), "der": der(before, after), "channels": pruned}
        print(f"{row['model']:28s} {'CLP (u = 3)':24s} ACC {before.acc:5.1f} -> {after.acc:5.1f}  ASR {before.asr:5.1f} -> {after.asr:5.1f}  ({pruned} channels)", flush=True)
        rows.append(row)
        if Path(out).exists():  # earlier runs' rows for other models are kept
            rows = [r for r in json.loads(Path(out).read_text())["rows"] if r["model"] not in {x["model"] for x in rows}] + rows
        Path(out).write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "limit": LIMIT, "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", "rows": rows,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
