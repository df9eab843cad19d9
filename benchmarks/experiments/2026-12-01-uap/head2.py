"""Head-only repairs: oracle (trigger shift known) vs data-free (target row's excess weights)."""
import sys, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from uap import *
from otbr_hub.evidence import weight_evidence
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
    ev_ = weight_evidence(model, spec)
    W, b = head.weight.detach(), head.bias.detach()
    n = W.shape[1]
    keep = y != t
    def ev(W2, b2=b):
        with torch.no_grad():
            lc = fc @ W2.T + b2; lt = ft @ W2.T + b2
        return round(float((lc.argmax(-1) == y).float().mean() * 100), 1), round(float((lt.argmax(-1)[keep] == t).float().mean() * 100), 1)
    Wbar = W.mean(0)
    excess = W[t] - Wbar
    d = (ft - fc).mean(0)
    orac = (d * excess).argsort(descending=True)
    free = excess.argsort(descending=True)
    print(f"== {Path(folder).name} t={t} evidence top {ev_.top_class} p {ev_.p_value:.3g}; before {ev(W)}")
    for frac in (0.05, 0.1, 0.2, 0.3, 0.5):
        k = max(1, int(frac * n))
        out = []
        for name, order in (("oracle", orac), ("excess", free)):
            W2 = W.clone(); W2[t, order[:k]] = Wbar[order[:k]]
            out.append(f"{name} {ev(W2)}")
        W2 = W.clone(); W2[t] = torch.minimum(W[t], Wbar + frac * 0) if False else W2[t]
        print(f"   top {frac:.0%} ({k}) of row t set to class mean: " + "   ".join(out))
    # shrink the whole excess
    for s in (0.5, 0.0):
        W2 = W.clone(); W2[t] = Wbar + s * excess.clamp_max(0) + s * excess.clamp_min(0) if s else Wbar + excess.clamp_max(0)
        print(f"   positive excess of row t x{s}: {ev(W2)}")
