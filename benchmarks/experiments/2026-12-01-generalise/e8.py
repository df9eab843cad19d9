# which layers count as neurons: only "hidden" layers (MLP fc1 / block conv1), not residual-writing ones
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
out_path = sys.argv[3]
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
RATIOS = [float(v) for v in sys.argv[4].split(",")] if len(sys.argv) > 4 else [0.02, 0.05, 0.1, 0.2]
for name in sys.argv[1].split(","):
    m = M(name)
    for inc in [None, sys.argv[2]]:
        s = settings_default(include=inc)
        layers = select_layers(m.model, s)
        sc = random_nwc(m.model, m.spec, layers, s)
        ones = {k: torch.ones_like(v) for k, v in sc.nwc.items()}
        print(f"== {name} before {m.before} include={inc} ({len(layers)} layers)", flush=True)
        for r in RATIOS:
            pm = prune_mean(m.model, layers, sc, r)
            var = {"P1": pm.model, "F1": fuse(m.model, pm.model, layers, sc.nwc, pm.pruned, 0.5).model,
                   "U1": fuse(m.model, pm.model, layers, ones, pm.pruned, 0.5).model}
            line = []
            for k, mod in var.items():
                acc, asr = m.ev(mod)
                rows.append(dict(model=name, clean=m.clean, before=m.before, ratio=r, variant=k + ("h" if inc else ""), acc=acc, asr=asr))
                line.append(f"{k} {acc}/{asr}")
            print(f"  {r}: " + " | ".join(line), flush=True)
    json.dump(rows, open(out_path, "w"))
