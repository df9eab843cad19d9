"""Oracle checks for the quiet-feature rule: if the clean mean feature were known (real data),
or taken from DeepInversion images, would flattening the target's excess on quiet features work?"""
import sys, json, torch
from pathlib import Path
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
    cp = CACHE / f"{Path(folder).name}-di256.pt"
    if cp.exists():
        di = torch.load(cp)
    else:
        t0 = time.time(); di = deepinv(model, spec, 256); torch.save(di, cp); print(f"   DI {time.time()-t0:.0f} s")
    with torch.no_grad():
        model(spec.normalize(x)); fc = feats["f"]
        model(spec.normalize(trig.apply(x))); ft = feats["f"]
        model(spec.normalize(di)); fd = feats["f"]
    h.remove()
    t = trig.target
    W, b = head.weight.detach(), head.bias.detach()
    keep = y != t
    def ev(W2, b2=b):
        with torch.no_grad():
            lc = fc @ W2.T + b2; lt = ft @ W2.T + b2
        acc_t = float((lc.argmax(-1)[y == t] == t).float().mean() * 100)
        return f"{float((lc.argmax(-1) == y).float().mean() * 100):5.1f}/{float((lt.argmax(-1)[keep] == t).float().mean() * 100):5.1f} (t {acc_t:5.1f})"
    Wbar = (W.sum(0) - W[t]) / (W.shape[0] - 1)
    ex = W[t] - Wbar
    with torch.no_grad():
        dtrig = fwd(model, spec, trig.apply(di)).argmax(-1)
    print(f"== {Path(folder).name} t={t}; before {ev(W)}; DI->t {float((fd @ W.T + b).argmax(-1).eq(t).float().mean()):.2f}, DI+trigger->t {float(dtrig.eq(t).float().mean()):.2f}")
    yd = torch.arange(len(di)) % 10
    sources = {"real all": fc.mean(0), "real class t": fc[y == t].mean(0), "DI all": fd.mean(0), "DI class t": fd[yd == t].mean(0),
               "DI not t": fd[yd != t].mean(0)}
    for name, E in sources.items():
        cells = []
        for q in (0.5, 0.75, 0.9):
            quiet = E <= E.quantile(q)
            WC = W.clone(); WC[t] = torch.where(quiet, Wbar + ex.clamp_max(0), W[t])
            cells.append(f"q{q}: {ev(WC)}")
        print(f"   {name:13s} " + "  ".join(cells))
