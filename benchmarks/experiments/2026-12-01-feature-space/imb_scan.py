"""Scan clean models trained on imbalanced labels with the default detector (weight evidence
+ margins) and with the weight evidence alone. Usage: python imb_scan.py MODEL_DIR... [--out F]"""
from __future__ import annotations
import json, sys, time
from pathlib import Path
import torch
from otbr_hub.load import load_folder
from otbr_hub.detect import detect
from otbr_hub.evidence import weight_evidence

torch.set_num_threads(1)
args = sys.argv[1:]
out = None
if "--out" in args:
    i = args.index("--out"); out = args[i + 1]; del args[i:i + 2]
rows = []
for d in args:
    lm = load_folder(d)
    meta = json.loads(Path(d, "trigger.json").read_text())
    t = time.time()
    det = detect(lm.model, lm.spec)
    ev = det.weight_evidence or {}
    row = {"model": Path(d).name, "imbalance": meta.get("imbalance"), "target": (meta.get("trigger") or {}).get("target"),
           "verdict": det.verdict, "p": det.p_value, "decided_by": det.decided_by, "suspected": det.suspected_target,
           "p_margins": det.p_first, "margin_top": det.top_class, "weights_top": ev.get("top_class"),
           "weights_z": ev.get("z"), "weights_p": ev.get("p_value"), "secs": round(time.time() - t, 1)}
    rows.append(row)
    imb = row["imbalance"] or {}
    print(f"{row['model']:34s} over={imb.get('class')} counts={imb.get('class_counts')} verdict={det.verdict:10s} p={det.p_value:.4f} "
          f"by={det.decided_by} margins p={det.p_first:.3f} top {det.top_class} | weights top {row['weights_top']} z={row['weights_z']} p={row['weights_p']}", flush=True)
if out:
    Path(out).write_text(json.dumps(rows, indent=1))
