# oracle NWC: unlearning on REAL triggered train images (ascent on target label / descent on true label)
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
names = sys.argv[1].split(",")
ratios = [0.01, 0.02, 0.05, 0.1]
for name in names:
    m = M(name)
    xtr, ytr = fashion_mnist_tensors("train", m.spec, limit=600, seed=5)
    keep = ytr != m.trigger.target
    xc, yc = xtr[keep], ytr[keep]
    xt = m.trigger.apply(xc)
    print(f"== {name} before {m.before}", flush=True)
    for stem in [True]:
        s = settings_default(skip_stem=stem, skip_shortcuts=False)
        layers = select_layers(m.model, s)
        for obj in ["ascent_target"]:
            un = copy.deepcopy(m.model).train(True)
            opt = torch.optim.SGD(un.parameters(), lr=1e-3 if obj == "descent_true" else 1e-4, momentum=0.9)
            g = torch.Generator().manual_seed(0)
            for step in range(20):
                idx = torch.randint(0, len(xt), (128,), generator=g)
                lo = fwd(un, m.spec, xt[idx])
                if obj == "ascent_target":
                    loss = -F.cross_entropy(lo, torch.full((128,), m.trigger.target))
                else:
                    loss = F.cross_entropy(lo, yc[idx])
                opt.zero_grad(); loss.backward(); opt.step()
            un.eval()
            sc = neuron_weight_change(m.model, un, layers, s)
            row = []
            for r in ratios:
                out, pr = build(m.model, layers, sc, sc.rank, r, lam=0.5)
                row.append(f"{r}: {m.ev(out['pruned'])} f{m.ev(out['fused'])}")
            top = sorted(((float(v.max()), n) for n, v in sc.rank.items()), reverse=True)[:3]
            print(f"  skip_stem={stem} {obj}: " + " | ".join(row) + f"  top layers {[n for _, n in top]}", flush=True)
