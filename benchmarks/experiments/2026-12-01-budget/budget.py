"""Does a cheaper unlearning budget change repair quality? (scale issue, item 4)

Arms, all at a fixed ratio (default 0.05) with default settings otherwise:
  ref   20 x 256, seed 0      (the paper's budget, the current default)
  ref1  20 x 256, seed 1      (the same budget with other noise: the noise floor)
  b128  20 x 128, seed 1      (half the images per step)
  s10   10 x 256, seed 1      (half the steps; seed 1 so it does not replay ref's batches)
  s5    5  x 256, seed 1      (a quarter)
Measured: ACC / ASR on the first --limit test images, and the top-5 % overlap of pruned
neurons with ref. Usage: python budget.py OUT.json MODEL_DIR...
"""
from __future__ import annotations
import json, sys, time
from pathlib import Path
import torch
from otbr_hub import repair
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.load import load_folder
from otbr_hub.triggers import Trigger

torch.set_num_threads(1)
ARMS = {"ref": (20, 256, 0), "ref1": (20, 256, 1), "b128": (20, 128, 1), "s10": (10, 256, 1), "s5": (5, 256, 1)}
RATIO, LIMIT = 0.05, 2000
out = Path(sys.argv[1])
rows = json.loads(out.read_text()) if out.exists() else []
done = {r["model"] for r in rows}
for d in sys.argv[2:]:
    name = Path(d).name
    if name in done:
        continue
    meta = json.loads(Path(d, "trigger.json").read_text())
    trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else None
    lm = load_folder(d)
    data = fashion_mnist_tensors("test", lm.spec, limit=LIMIT, seed=0)
    before = evaluate(lm.model, lm.spec, data, trig)
    row = {"model": name, "attack": meta.get("attack"), "before": [before.acc, before.asr], "arms": {}}
    pruned = {}
    for arm, (steps, batch, seed) in ARMS.items():
        t = time.time()
        res = repair(lm, prune_ratio=RATIO, unlearn_steps=steps, unlearn_batch=batch, seed=seed)
        ev = evaluate(res.model, lm.spec, data, trig)
        pruned[arm] = {(k, int(i)) for k, idx in res.report.pruned_neurons.items() for i in idx} if hasattr(res.report, "pruned_neurons") else None
        row["arms"][arm] = {"acc": ev.acc, "asr": ev.asr, "secs": round(time.time() - t, 1)}
    if pruned["ref"] is not None:
        for arm in ARMS:
            row["arms"][arm]["overlap"] = len(pruned[arm] & pruned["ref"]) / max(1, len(pruned["ref"]))
    rows.append(row)
    out.write_text(json.dumps(rows, indent=1))
    cells = "  ".join(f"{a} {v['acc']:.1f}/{(v['asr'] if v['asr'] is not None else float('nan')):.1f}" for a, v in row["arms"].items())
    print(f"{name:34s} before {before.acc:.1f}/{(before.asr if before.asr is not None else float('nan')):.1f}  {cells}", flush=True)
