"""Per-layer cap on pruning: no layer loses more than CAP x ratio of its neurons; the rest of
the budget goes to the next-ranked neurons of other layers. Fixed ratio 0.05, default
settings otherwise (data-flow fusion), ACC / ASR on 2,000 test images.
Usage: python cap.py OUT.json CAP[,CAP...] MODEL...   (CAP 0 = no cap)"""
import json, sys
from pathlib import Path
import torch
import otbr_hub.prune as prune_mod
from otbr_hub import repair
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.load import load_folder
from otbr_hub.triggers import Trigger

torch.set_num_threads(2)
original_top = prune_mod.top_neurons
CAP = [0.0]


def capped(scores, ratio):
    if not CAP[0]:
        return original_top(scores, ratio)
    names = list(scores.rank)
    flat = sorted(((float(v), i, j) for i, n in enumerate(names) for j, v in enumerate(scores.rank[n].tolist())),
                  key=lambda t: (-t[0], t[1], t[2]))
    k = max(1, int(ratio * len(flat)))
    limit = {n: max(1, int(CAP[0] * ratio * scores.rank[n].numel())) for n in names}
    chosen = {n: [] for n in names}
    taken = 0
    for _, i, j in flat:
        if taken == k:
            break
        n = names[i]
        if len(chosen[n]) < limit[n]:
            chosen[n].append(j); taken += 1
    return {n: sorted(v) for n, v in chosen.items()}


prune_mod.top_neurons = capped
out = Path(sys.argv[1]); caps = [float(c) for c in sys.argv[2].split(",")]
rows = json.loads(out.read_text()) if out.exists() else []
for d in sys.argv[3:]:
    meta = json.loads(Path(d, "trigger.json").read_text())
    trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else Trigger.from_dict({"name": "badnets", "target": 0, "params": {}})
    lm = load_folder(d); data = fashion_mnist_tensors("test", lm.spec, limit=2000, seed=0)
    b = evaluate(lm.model, lm.spec, data, trig)
    for c in caps:
        CAP[0] = c
        e = evaluate(repair(lm, prune_ratio=0.05, detector=False).model, lm.spec, data, trig)
        rows.append({"model": Path(d).name, "cap": c, "before": [b.acc, b.asr], "after": [e.acc, e.asr]})
        out.write_text(json.dumps(rows, indent=1))
        print(f"{Path(d).name:34s} cap {c:3g} ACC {e.acc - b.acc:+6.1f}  ASR {b.asr:5.1f} -> {e.asr:5.1f}", flush=True)
