"""Does random-noise unlearning point at the trigger features at the classifier input?
Rank features by how much unlearning moved the head (target row, or the whole column), or the
last block's filters, and flatten the target row's positive excess on the top ones."""
import sys, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from uap import *
from otbr_hub.settings import preset
from otbr_hub.unlearn import unlearn
from scipy.stats import spearmanr
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
    s = preset("default")
    un = unlearn(model, spec, s).model
    hn = dict(un.named_modules())[[n for n, m in model.named_modules() if m is head][0]]
    dW = (hn.weight.detach() - head.weight.detach())
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
    d = (ft - fc).mean(0)
    push = d * ex
    # last conv before the head, per output channel
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == W.shape[1]]
    un_mods = dict(un.named_modules())
    lastn, lastm = convs[-1]
    nwc = (un_mods[lastn].weight.detach() - lastm.weight.detach()).abs().flatten(1).sum(1)
    ranks = {"dW row t": -dW[t], "|dW row t|": dW[t].abs(), "|dW| column": dW.abs().sum(0), f"NWC {lastn}": nwc, "excess": ex}
    print(f"== {Path(folder).name} t={t}; before {ev(W)}; A (flatten all) {ev(torch.cat([W[:t], (Wbar + ex.clamp_max(0))[None], W[t+1:]]))}")
    for name, r in ranks.items():
        rho = spearmanr(r.numpy(), push.numpy()).statistic
        order = r.argsort(descending=True)
        cells = []
        for frac in (0.1, 0.2, 0.3):
            k = int(frac * len(r)); sel = torch.zeros(len(r), dtype=torch.bool); sel[order[:k]] = True
            WC = W.clone(); WC[t] = torch.where(sel, Wbar + ex.clamp_max(0), W[t])
            cells.append(f"{frac}: {ev(WC)}")
        print(f"   {name:22s} rho(push) {rho:+.2f}  " + "  ".join(cells))
