# broad table: prune variants x fusion variants x ratios, with agreement on synthetic probes
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
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
rows = []
for name in sys.argv[1].split(","):
    t0 = time.time()
    m = M(name)
    s = settings_default()
    layers = select_layers(m.model, s)
    sc = random_nwc(m.model, m.spec, layers, s)
    probe = synthesize_inputs(m.model, m.spec, 256, seed=0)
    ones = {k: torch.ones_like(v) for k, v in sc.nwc.items()}
    print(f"== {name} before {m.before}", flush=True)
    for r in [0.01, 0.02, 0.05, 0.1]:
        pz = prune(m.model, layers, sc, r, silence_norm=True)
        pm = prune_mean(m.model, layers, sc, r)
        var = {
            "P0": pz.model, "P1": pm.model,
            "F0": fuse(m.model, pz.model, layers, sc.nwc, pz.pruned, 0.5).model,
            "F1": fuse(m.model, pm.model, layers, sc.nwc, pm.pruned, 0.5).model,
            "U1": fuse(m.model, pm.model, layers, ones, pm.pruned, 0.5).model,
        }
        line = []
        for k, mod in var.items():
            acc, asr = m.ev(mod)
            ag = agreement(m.model, mod, m.spec, probe)
            rows.append(dict(model=name, clean=m.clean, before=m.before, ratio=r, variant=k, acc=acc, asr=asr, agree=ag))
            line.append(f"{k} {acc}/{asr} ag{ag:.2f}")
        print(f"  {r}: " + " | ".join(line), flush=True)
    json.dump(rows, open(out_path, "w"))
    print(f"  ({time.time()-t0:.0f}s)", flush=True)
