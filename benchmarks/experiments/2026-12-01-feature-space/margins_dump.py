"""Run the default max-margin search (and the weight evidence) on model folders and store the
raw per-class margins, so other outlier statistics can be compared offline.
Usage: python margins_dump.py OUT.json MODEL_DIR..."""
from __future__ import annotations
import json, sys, time
from pathlib import Path
import torch
from otbr_hub.load import load_folder
from otbr_hub.detect import DetectSettings, max_margin, decide
from otbr_hub.evidence import weight_evidence

torch.set_num_threads(1)
out = Path(sys.argv[1])
rows = json.loads(out.read_text()) if out.exists() else []
done = {r["model"] for r in rows}
for d in sys.argv[2:]:
    name = Path(d).name
    if name in done:
        continue
    meta = json.loads(Path(d, "trigger.json").read_text()) if Path(d, "trigger.json").exists() else {}
    trig = meta.get("trigger") or {}
    group = "imbalanced" if meta.get("imbalance") else ("clean" if not trig else ("clean-label" if meta.get("clean_label") else "dirty"))
    lm = load_folder(d)
    t = time.time()
    res = max_margin(lm.model, lm.spec, DetectSettings())
    det = decide(res, DetectSettings())
    ev = weight_evidence(lm.model, lm.spec)
    rows.append({"model": name, "group": group, "target": trig.get("target"), "over": (meta.get("imbalance") or {}).get("class"),
                 "margins": [res.margins.get(c) for c in range(lm.spec.num_classes)],
                 "p_margin": det.p_value, "p_gamma": det.p_gamma, "p_robust": det.p_robust, "margin_top": det.top_class,
                 "w_top": ev.top_class, "w_p": ev.p_value, "w_z": ev.z, "secs": round(time.time() - t, 1)})
    out.write_text(json.dumps(rows, indent=1))
    print(name, group, det.top_class, round(det.p_value, 4), ev.top_class, ev.p_value, rows[-1]["secs"], flush=True)
