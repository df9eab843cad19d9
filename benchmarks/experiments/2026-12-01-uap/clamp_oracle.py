"""Oracle: bound each channel of the last block's output (before pooling) at a quantile of its
clean activations (real data), or the pooled features at their clean maximum. Does the
backdoor survive?"""
import sys, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from uap import *
from otbr_hub.evidence import mean_features
for folder in sys.argv[1:]:
    meta = json.loads((Path(folder) / "trigger.json").read_text())
    trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
    lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
    x, y = fashion_mnist_tensors("test", spec, limit=2000)
    xtr, _ = fashion_mnist_tensors("train", spec, limit=2000)
    t = trig.target; keep = y != t
    block = model.layer4
    store = {}
    h = block.register_forward_hook(lambda m, i, o: store.__setitem__("o", o.detach()))
    with torch.no_grad():
        model(spec.normalize(xtr)); a = store["o"]           # N, C, H, W
        model(spec.normalize(trig.apply(x))); at = store["o"]
    h.remove()
    per_ch = a.permute(1, 0, 2, 3).flatten(1)
    pooled = a.mean((2, 3))
    def run(bound, where="map"):
        def hook(m, i, o):
            return torch.minimum(o, bound.view(1, -1, 1, 1))
        hh = block.register_forward_hook(hook)
        with torch.no_grad():
            pc = fwd(model, spec, x).argmax(-1); pt = fwd(model, spec, trig.apply(x)).argmax(-1)
        hh.remove()
        return f"{float((pc == y).float().mean()*100):5.1f}/{float((pt[keep] == t).float().mean()*100):5.1f}"
    with torch.no_grad():
        pc = fwd(model, spec, x).argmax(-1); pt = fwd(model, spec, trig.apply(x)).argmax(-1)
    print(f"== {Path(folder).name} t={t} before {float((pc==y).float().mean()*100):.1f}/{float((pt[keep]==t).float().mean()*100):.1f};"
          f" triggered/clean max ratio, median over channels {float((at.permute(1,0,2,3).flatten(1).max(1).values / per_ch.max(1).values.clamp_min(1e-6)).median()):.2f}")
    cells = []
    for q in (1.0, 0.999, 0.99, 0.95):
        b = per_ch.quantile(q, dim=1) if q < 1 else per_ch.max(1).values
        cells.append(f"map q{q}: {run(b)}")
    print("   " + "  ".join(cells))
