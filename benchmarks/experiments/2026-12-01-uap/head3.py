"""Data-free head repairs given a target class: flatten the target row's positive excess,
with bias compensation, restricted to features quiet on clean data, or refitted on probes."""
import sys, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from uap import *
from otbr_hub.evidence import mean_features
from otbr_hub.verify import synthesize_inputs
for folder in sys.argv[1:]:
    meta = json.loads((Path(folder) / "trigger.json").read_text())
    trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
    lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
    x, y = fashion_mnist_tensors("test", spec, limit=2000)
    head = model.get_classifier()
    feats = {}
    h = head.register_forward_hook(lambda m, i, o: feats.__setitem__("f", i[0].detach()))
    probes = synthesize_inputs(model, spec, 512, seed=1)
    with torch.no_grad():
        model(spec.normalize(x)); fc = feats["f"]
        model(spec.normalize(trig.apply(x))); ft = feats["f"]
        model(spec.normalize(probes)); fp = feats["f"]
    h.remove()
    Ef = mean_features(model, spec)[0].float()
    t = trig.target
    W, b = head.weight.detach(), head.bias.detach()
    keep = y != t
    def ev(W2, b2=b):
        with torch.no_grad():
            lc = fc @ W2.T + b2; lt = ft @ W2.T + b2
        acc_t = float((lc.argmax(-1)[y == t] == t).float().mean() * 100)
        return f"{float((lc.argmax(-1) == y).float().mean() * 100):5.1f}/{float((lt.argmax(-1)[keep] == t).float().mean() * 100):5.1f} (cls t {acc_t:5.1f})"
    Wbar = (W.sum(0) - W[t]) / (W.shape[0] - 1)
    ex = W[t] - Wbar
    print(f"== {Path(folder).name} t={t}; before {ev(W)}; corr(Ef, real mean f) {torch.corrcoef(torch.stack([Ef, fc.mean(0)]))[0,1]:.2f}")
    # A: flatten positive excess
    WA = W.clone(); WA[t] = Wbar + ex.clamp_max(0)
    print(f"   A flatten positive excess:           {ev(WA)}")
    # B: + bias keeps the mean logit under the BN-moment mean feature
    bB = b.clone(); bB[t] += (W[t] - WA[t]) @ Ef
    print(f"   B  + bias from BN mean feature:      {ev(WA, bB)}")
    bB2 = b.clone(); bB2[t] += (W[t] - WA[t]) @ fp.mean(0)
    print(f"   B2 + bias from probe mean feature:   {ev(WA, bB2)}")
    # C: only features quiet on clean data (BN mean feature below its median)
    for q in (0.25, 0.5, 0.75):
        quiet = Ef <= Ef.quantile(q)
        WC = W.clone(); WC[t] = torch.where(quiet, Wbar + ex.clamp_max(0), W[t])
        print(f"   C flatten where E[f] <= q{q:.2f}:        {ev(WC)}")
    # D: ridge refit of row t to the original's logit_t on probe features, prior Wbar
    for lam in (1.0, 10.0, 100.0):
        F_ = torch.cat([fp, torch.ones(len(fp), 1)], 1).double()
        target = (fp @ W[t] + b[t]).double()
        prior = torch.cat([Wbar, b[t:t+1]]).double()
        A = F_.T @ F_ + lam * torch.eye(F_.shape[1], dtype=torch.double)
        sol = prior + torch.linalg.solve(A, F_.T @ (target - F_ @ prior))
        WD = W.clone(); WD[t] = sol[:-1].float(); bD = b.clone(); bD[t] = sol[-1].float()
        print(f"   D ridge refit on probes lam {lam:5g}:   {ev(WD, bD)}")
