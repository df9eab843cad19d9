"""ACC cost of the fusion weight lambda at the fallback ratio on clean zoo models (and ASR on
backdoored ones). Usage: python clean_lambda.py OUT.json MODEL_DIR..."""
import json, sys
from pathlib import Path
import torch
from otbr_hub import repair
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.load import load_folder
from otbr_hub.triggers import Trigger

torch.set_num_threads(1)
LAMS = (0.0, 0.1, 0.25, 0.5)
out = Path(sys.argv[1]); rows = []
for d in sys.argv[2:]:
    meta = json.loads(Path(d, "trigger.json").read_text())
    trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else None
    lm = load_folder(d); data = fashion_mnist_tensors("test", lm.spec, limit=2000, seed=0)
    before = evaluate(lm.model, lm.spec, data, trig)
    row = {"model": Path(d).name, "before": [before.acc, before.asr], "lam": {}}
    for lam in LAMS:
        e = evaluate(repair(lm, prune_ratio=0.05, lam=lam, detector=False).model, lm.spec, data, trig)
        row["lam"][str(lam)] = [e.acc, e.asr]
    rows.append(row); out.write_text(json.dumps(rows, indent=1))
    print(row["model"], round(before.acc, 1), {k: (round(v[0] - before.acc, 1), None if v[1] is None else round(v[1], 1)) for k, v in row["lam"].items()}, flush=True)
