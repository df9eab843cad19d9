# (b) local fusion: only pruned neurons are replaced by their OT blend; unpruned neurons untouched, no input alignment
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
from otbr_hub.fuse import target_mass, transport_plan, _sparse_map
torch.set_num_threads(1)
out_path = sys.argv[2]
def prune_mean(model, layers, sc, r):
    pr = prune(model, layers, sc, r, silence_norm=False)
    mods = dict(pr.model.named_modules())
    with torch.no_grad():
        for L in layers:
            idx = pr.pruned.get(L.name) or []
            if idx and L.norm_name:
                mods[L.norm_name].weight[idx] = 0
    return pr
def local_fuse(model, pr, layers, nwc, lam):
    out = copy.deepcopy(model)
    mo, mp, mf = dict(model.named_modules()), dict(pr.model.named_modules()), dict(out.named_modules())
    with torch.no_grad():
        for L in layers:
            idx = pr.pruned.get(L.name) or []
            if not idx: continue
            wb = mo[L.name].weight.detach().double().numpy(); wp = mp[L.name].weight.detach().double().numpy()
            n = wb.shape[0]
            b = target_mass(nwc[L.name].numpy())
            plan = transport_plan(wp.reshape(n, -1), wb.reshape(n, -1), b)
            mapping = _sparse_map(plan, b, transpose=True)
            wf = np.asarray(mapping @ wp.reshape(n, -1)).reshape(wb.shape)
            new = wb.copy(); new[idx] = lam * wf[idx] + (1 - lam) * wb[idx]
            mf[L.name].weight.copy_(torch.from_numpy(new).float())
            pairs = [(L.name, "bias")] + ([(L.norm_name, t) for t in ("weight", "bias", "running_mean", "running_var")] if L.norm_name else [])
            for mn, attr in pairs:
                to = getattr(mo[mn], attr, None)
                if to is None: continue
                vo = to.detach().double().numpy(); vp = getattr(mp[mn], attr).detach().double().numpy()
                vf = np.asarray(mapping @ vp); v = vo.copy(); v[idx] = lam * vf[idx] + (1 - lam) * vo[idx]
                if attr == "running_var": v = np.maximum(v, 1e-8)
                getattr(mf[mn], attr).copy_(torch.from_numpy(v).float())
    return out
rows = []
for name in sys.argv[1].split(","):
    m = M(name)
    s = settings_default()
    layers = select_layers(m.model, s)
    sc = random_nwc(m.model, m.spec, layers, s)
    print(f"== {name} before {m.before}", flush=True)
    for r in [0.02, 0.05, 0.1]:
        pm = prune_mean(m.model, layers, sc, r)
        var = {"P1": pm.model, "L.5": local_fuse(m.model, pm, layers, sc.nwc, 0.5), "L1": local_fuse(m.model, pm, layers, sc.nwc, 1.0)}
        line = []
        for k, mod in var.items():
            acc, asr = m.ev(mod)
            rows.append(dict(model=name, clean=m.clean, before=m.before, ratio=r, variant=k, acc=acc, asr=asr))
            line.append(f"{k} {acc}/{asr}")
        print(f"  {r}: " + " | ".join(line), flush=True)
    json.dump(rows, open(out_path, "w"))
