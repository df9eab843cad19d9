"""Detection idea: does bounding the stem (otbr_hub.clip on the *original* model) cut the
max-margin of the backdoor's target class more than the others'? Per class: the default
detector's margin statistic on the model and on its bounded copy; prints the class whose
log-margin falls most and its z against the other classes. Usage: python margin_drop.py OUT.json MODEL..."""
import json, math, sys
from pathlib import Path
import numpy as np
import torch
from otbr_hub.clip import clip_activations
from otbr_hub.detect import DetectSettings, detect
from otbr_hub.load import load_folder

torch.set_num_threads(2)
out = Path(sys.argv[1])
rows = json.loads(out.read_text()) if out.exists() else []
done = {r["model"] for r in rows}
for d in sys.argv[2:]:
    name = Path(d).name
    if name in done:
        continue
    meta = json.loads(Path(d, "trigger.json").read_text())
    trig = meta.get("trigger") or {}
    target = trig.get("target") if trig.get("name") not in (None, "clean") and meta.get("attack", "") != "clean" else None
    lm = load_folder(d)
    cr = clip_activations(lm.model, lm.spec, 3.0)
    if not cr.applied:
        print(name, "not applied:", cr.reason); continue
    s = DetectSettings(weight_evidence=False)
    a = detect(lm.model, lm.spec, s).to_dict()["statistics"]
    b = detect(cr.model, lm.spec, s).to_dict()["statistics"]
    cls = sorted(a, key=int)
    drop = np.array([math.log(max(b[c], 1e-6) / max(a[c], 1e-6)) for c in cls])
    i = int(drop.argmin())
    others = np.delete(drop, i)
    z = float((drop[i] - others.mean()) / max(others.std(ddof=1), 0.02))
    rows.append({"model": name, "target": target, "attack": trig.get("name"), "margins": a, "bounded": b,
                 "most_dropped": int(cls[i]), "z": z})
    out.write_text(json.dumps(rows, indent=1))
    print(f"{name:34s} target {target} most dropped {cls[i]} z {z:6.2f} drop {drop[i]:+.2f} (others {others.mean():+.2f} sd {others.std(ddof=1):.2f})", flush=True)
