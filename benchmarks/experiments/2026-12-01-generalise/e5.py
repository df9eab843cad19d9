# oracle ceiling for unstructured (per-weight) pruning by weight change under real-poison unlearning; also random-noise WC
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
for name in sys.argv[1].split(","):
    m = M(name)
    xtr, ytr = fashion_mnist_tensors("train", m.spec, limit=600, seed=5)
    keep = ytr != m.trigger.target
    xt = m.trigger.apply(xtr[keep])
    print(f"== {name} before {m.before}", flush=True)
    for src in ["oracle", "noise"]:
        if src == "oracle":
            un = copy.deepcopy(m.model).train(True)
            opt = torch.optim.SGD(un.parameters(), lr=1e-4, momentum=0.9)
            g = torch.Generator().manual_seed(0)
            for step in range(20):
                idx = torch.randint(0, len(xt), (128,), generator=g)
                loss = -F.cross_entropy(fwd(un, m.spec, xt[idx]), torch.full((128,), m.trigger.target))
                opt.zero_grad(); loss.backward(); opt.step()
        else:
            un = unlearn(m.model, m.spec, settings_default()).model
        un.eval()
        mo, mu = dict(m.model.named_modules()), dict(un.named_modules())
        names = [n for n, mod in mo.items() if isinstance(mod, (nn.Conv2d, nn.Linear))]
        for scope in ["all", "nostem"]:
            ns = names[1:] if scope == "nostem" else names
            chg = {n: (mu[n].weight.detach() - mo[n].weight.detach()).abs() for n in ns}
            flat = torch.cat([v.flatten() for v in chg.values()])
            row = []
            for frac in [0.002, 0.005, 0.01, 0.02, 0.05]:
                thr = torch.topk(flat, max(1, int(frac * flat.numel()))).values[-1]
                pm = copy.deepcopy(m.model); pmods = dict(pm.named_modules())
                with torch.no_grad():
                    for n in ns:
                        pmods[n].weight[chg[n] >= thr] = 0
                row.append(f"{frac}: {m.ev(pm)}")
            print(f"  {src} {scope}: " + " | ".join(row), flush=True)
