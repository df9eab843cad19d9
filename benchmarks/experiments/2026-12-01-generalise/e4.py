# mean-replacement pruning: BN scale -> 0 but keep BN shift (channel emits its mean) vs zeroing
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
names = sys.argv[1].split(",")
ratios = [0.02, 0.05, 0.1]
def prune_mean(model, layers, sc, r):
    pr = prune(model, layers, sc, r, silence_norm=False)
    mods = dict(pr.model.named_modules())
    with torch.no_grad():
        for L in layers:
            idx = pr.pruned.get(L.name) or []
            if idx and L.norm_name:
                mods[L.norm_name].weight[idx] = 0
    return pr
for name in names:
    m = M(name)
    s = settings_default()
    layers = select_layers(m.model, s)
    sc = random_nwc(m.model, m.spec, layers, s)
    print(f"== {name} before {m.before}", flush=True)
    for r in ratios:
        row = []
        for kind in ["zero", "mean"]:
            pr = prune(m.model, layers, sc, r, silence_norm=True) if kind == "zero" else prune_mean(m.model, layers, sc, r)
            fu = fuse(m.model, pr.model, layers, sc.nwc, pr.pruned, 0.5, fuse_attached=True).model
            row.append(f"{kind}: pruned {m.ev(pr.model)} fused {m.ev(fu)}")
        print(f"  {r}: " + " | ".join(row), flush=True)
