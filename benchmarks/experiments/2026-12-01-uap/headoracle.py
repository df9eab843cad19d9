"""Oracle: is the backdoor's effect at the classifier input carried by a few features?"""
import sys, json, torch
from pathlib import Path
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parent))
from uap import *
for folder in sys.argv[1:]:
    meta = json.loads((Path(folder) / "trigger.json").read_text())
    trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
    lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
    x, y = fashion_mnist_tensors("test", spec, limit=2000)
    head = model.get_classifier()
    feats = {}
    h = head.register_forward_hook(lambda m, i, o: feats.__setitem__("f", i[0].detach()))
    with torch.no_grad():
        model(spec.normalize(x)); fc = feats["f"]
        model(spec.normalize(trig.apply(x))); ft = feats["f"]
    h.remove()
    t = trig.target
    W, b = head.weight.detach(), head.bias.detach()
    d = (ft - fc).mean(0)                     # mean feature shift under the trigger
    contrib = d * (W[t] - W.mean(0))           # its push towards the target
    order = contrib.argsort(descending=True)
    share = contrib[order].cumsum(0) / contrib.clamp_min(0).sum()
    keep = y != t
    def ev(mask):
        with torch.no_grad():
            lc = (fc * mask) @ W.T + b; lt = (ft * mask) @ W.T + b
        return round(float((lc.argmax(-1) == y).float().mean() * 100), 1), round(float((lt.argmax(-1)[keep] == t).float().mean() * 100), 1)
    print(f"== {Path(folder).name}: {fc.shape[1]} features, before {ev(torch.ones(fc.shape[1]))}")
    print("   top features' share of the push:", [round(float(share[k-1]), 2) for k in (1, 5, 10, 20, 50)])
    for k in (1, 5, 10, 20, 50):
        m = torch.ones(fc.shape[1]); m[order[:k]] = 0
        print(f"   zero top {k:3d} features (oracle): ACC/ASR {ev(m)}")
