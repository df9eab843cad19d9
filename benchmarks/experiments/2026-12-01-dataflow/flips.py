"""Observation: after a fixed 0.05 repair (default settings, data-flow fusion), which classes'
synthesised probes change their prediction? A probe is an input the original was pushed to
assign to class c (verify.synthesize_inputs). Per class: share of its probes whose top-1
changes, and of all probes, share that were the original's class c and left it. Reports the
top class, its z-score against the others, and the attack's target.
Usage: python flips.py OUT.json MODEL..."""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from otbr_hub import repair
from otbr_hub.load import load_folder
from otbr_hub.verify import synthesize_inputs, predictions

torch.set_num_threads(2)
out = Path(sys.argv[1])
rows = json.loads(out.read_text()) if out.exists() else []
done = {r["model"] for r in rows}
for d in sys.argv[2:]:
    name = Path(d).name
    if name in done:
        continue
    t0 = time.time()
    meta = json.loads(Path(d, "trigger.json").read_text())
    target = (meta.get("trigger") or {}).get("target")
    lm = load_folder(d); spec = lm.spec; K = spec.num_classes
    probe = synthesize_inputs(lm.model, spec, 512, seed=0)
    before = predictions(lm.model, spec, probe)
    rep = repair(lm, prune_ratio=0.05, detector=False).model
    after = predictions(rep, spec, probe)
    changed = (before != after).numpy()
    left = np.array([changed[before.numpy() == c].mean() if (before.numpy() == c).any() else 0.0 for c in range(K)])
    gained = np.array([((after.numpy() == c) & changed).sum() / max(1, changed.sum()) for c in range(K)])
    def z(v):
        top = int(np.argmax(v)); rest = np.delete(v, top)
        return top, float((v[top] - rest.mean()) / (rest.std(ddof=1) + 1e-9))
    row = {"model": name, "target": target, "agreement": float(1 - changed.mean()),
           "left": left.round(3).tolist(), "gained": gained.round(3).tolist(),
           "left_top_z": z(left), "gained_top_z": z(gained), "seconds": round(time.time() - t0, 1)}
    rows.append(row); out.write_text(json.dumps(rows, indent=1))
    print(f"{name:34s} target {str(target):4s} agree {row['agreement']:.3f} left top {row['left_top_z'][0]} z {row['left_top_z'][1]:5.2f}"
          f"  gained top {row['gained_top_z'][0]} z {row['gained_top_z'][1]:5.2f}", flush=True)
