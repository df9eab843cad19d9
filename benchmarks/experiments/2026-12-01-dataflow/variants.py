"""Fixed-ratio repairs through the public API with setting overrides, ACC / ASR on 2,000
test images. Usage: python variants.py OUT.json 'NAME=JSON_OVERRIDES' ... -- MODEL...
e.g. 'base={}' 'layerz={"ranking": "layer-normalized"}'"""
import json, sys, time
from pathlib import Path
import torch
from otbr_hub import repair
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.load import load_folder
from otbr_hub.triggers import Trigger

torch.set_num_threads(2)
out = Path(sys.argv[1])
split = sys.argv.index("--")
variants = dict(v.split("=", 1) for v in sys.argv[2:split])
rows = json.loads(out.read_text()) if out.exists() else []
done = {(r["model"], r["variant"]) for r in rows}
for d in sys.argv[split + 1:]:
    meta = json.loads(Path(d, "trigger.json").read_text())
    trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else Trigger.from_dict({"name": "badnets", "target": 0, "params": {}})
    lm = load_folder(d)
    data = fashion_mnist_tensors("test", lm.spec, limit=2000, seed=0)
    b = evaluate(lm.model, lm.spec, data, trig)
    for name, js in variants.items():
        if (Path(d).name, name) in done:
            continue
        kw = {"prune_ratio": 0.05, "detector": False, **json.loads(js)}
        t0 = time.time()
        e = evaluate(repair(lm, **kw).model, lm.spec, data, trig)
        rows.append({"model": Path(d).name, "variant": name, "overrides": kw if kw.get("detector") is not False else {**kw, "detector": False},
                     "before": [b.acc, b.asr], "after": [e.acc, e.asr], "seconds": round(time.time() - t0, 1)})
        out.write_text(json.dumps(rows, indent=1))
        print(f"{Path(d).name:34s} {name:10s} ACC {e.acc - b.acc:+6.1f}  ASR {b.asr:5.1f} -> {e.asr:5.1f}", flush=True)
