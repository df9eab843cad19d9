"""Run the default detector on zoo models and keep what a joint test needs: every class's
margin and weight evidence. Usage: collect.py OUT.json FOLDER... (rows merged by model name)."""
import json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from otbr_hub.detect import detect  # noqa: E402
from otbr_hub.load import load_folder  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
rows = {r["model"]: r for r in json.loads(out.read_text())} if out.exists() else {}
for d in sys.argv[2:]:
    name = Path(d).name
    if name in rows:
        continue
    lm = load_folder(d)
    meta = json.loads(Path(d, "trigger.json").read_text())
    t = time.time()
    det = detect(lm.model, lm.spec)
    ev = det.weight_evidence or {}
    rows[name] = {"model": name, "target": (meta.get("trigger") or {}).get("target"), "imbalance": meta.get("imbalance"),
                  "verdict": det.verdict, "p": det.p_value, "p_margins": det.p_first, "margin_top": det.top_class,
                  "margins": {int(k): float(v) for k, v in det.statistics.items()},
                  "weights": ev.get("per_class"), "weights_p": ev.get("p_value"), "weights_top": ev.get("top_class"),
                  "secs": round(time.time() - t, 1)}
    print(name, rows[name]["verdict"], f"p={det.p_value:.3g}", f"t={rows[name]['secs']}", flush=True)
    out.write_text(json.dumps(list(rows.values()), indent=1))
