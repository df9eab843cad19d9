"""How strong should the repair of a *flagged* model be? Fixed-ratio OTBR with the engine's
default unlearning, pruning at a few ratios and fusing with a few lambdas (NWC computed once
per model; the same stage functions ``repair`` composes). ACC / ASR on 2,000 test images.
Usage: python strength.py OUT.json MODEL..."""
import json, sys, time
from pathlib import Path
import torch
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.fuse import fuse
from otbr_hub.layers import select_layers
from otbr_hub.load import load_folder
from otbr_hub.prune import prune
from otbr_hub.score import neuron_weight_change
from otbr_hub.settings import preset
from otbr_hub.triggers import Trigger
from otbr_hub.unlearn import unlearn

torch.set_num_threads(2)
RATIOS, LAMS = (0.05, 0.1, 0.15), (0.5, 0.75, 1.0)
out = Path(sys.argv[1])
rows = json.loads(out.read_text()) if out.exists() else []
done = {r["model"] for r in rows}
for d in sys.argv[2:]:
    if Path(d).name in done:
        continue
    t0 = time.time()
    meta = json.loads(Path(d, "trigger.json").read_text())
    trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else Trigger.from_dict({"name": "badnets", "target": 0, "params": {}})
    lm = load_folder(d)
    data = fashion_mnist_tensors("test", lm.spec, limit=2000, seed=0)
    model, spec = lm.model.eval(), lm.spec
    s = preset("default", prune_ratio=0.05)
    layers = select_layers(model, s)
    sc = neuron_weight_change(model, unlearn(model, spec, s).model, layers, s)
    b = evaluate(model, spec, data, trig)
    row = {"model": Path(d).name, "before": [b.acc, b.asr], "cells": {}}
    for r in RATIOS:
        pr = prune(model, layers, sc, r, silence_norm=s.prune_norm)
        for lam in LAMS:
            fu = fuse(model, pr.model, layers, sc.nwc, pr.pruned, lam, fuse_attached=s.fuse_attached).model
            e = evaluate(fu, spec, data, trig)
            row["cells"][f"{r}/{lam}"] = [e.acc, e.asr]
    row["seconds"] = round(time.time() - t0, 1)
    rows.append(row)
    out.write_text(json.dumps(rows, indent=1))
    print(row["model"], [round(v, 1) for v in row["before"]], flush=True)
    for k, (a, asr) in row["cells"].items():
        print(f"   {k:10s} ACC {a - b.acc:+5.1f}  ASR {asr:5.1f}", flush=True)
