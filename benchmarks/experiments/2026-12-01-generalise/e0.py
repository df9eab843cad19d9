# oracle: activation-difference ranking from REAL triggered images (train split) -> is pruning able at all?
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
names = sys.argv[1].split(",")
ratios = [0.01, 0.02, 0.05, 0.1]
for name in names:
    m = M(name)
    s = settings_default()
    layers = select_layers(m.model, s)
    xtr, ytr = fashion_mnist_tensors("train", m.spec, limit=300, seed=5)
    xc = xtr[ytr != m.trigger.target]
    xt = m.trigger.apply(xc)
    nwc = random_nwc(m.model, m.spec, layers, s)
    print(f"== {name} before {m.before}", flush=True)
    for mode in ["z", "sel"]:
        rank = act_scores(m.model, layers, m.spec, xc, xt, mode)
        row = []
        for r in ratios:
            out, pr = build(m.model, layers, nwc, rank, r, lam=0.5)
            row.append(f"{r}: {m.ev(out['pruned'])} f{m.ev(out['fused'])}")
        print(f"  [{mode}] " + " | ".join(row), flush=True)
    # oracle NWC: unlearning on real poisoned data (ascent on target label)
