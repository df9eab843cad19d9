import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
from di_lib import deepinv, distill
torch.set_num_threads(1)
for name in sys.argv[1].split(","):
    t0 = time.time()
    m = M(name)
    p = Path(f"/tmp/exp/di_{name}.pt")
    if p.exists(): di = torch.load(p)
    else:
        di = deepinv(m.model, m.spec, 256); torch.save(di, p)
    res = trigger_search(m.model, m.spec, di[:20])
    sizes = {c: round(v[0], 1) for c, v in res.items()}
    order = sorted(sizes, key=sizes.get); top = order[0]
    med = float(np.median(list(sizes.values())))
    print(f"== {name} before {m.before} target {m.trigger.target} clean={m.clean}; DI+search {time.time()-t0:.0f}s; top {top} sizes {sizes} target rank {order.index(m.trigger.target)}", flush=True)
    fns_top = [lambda x, r=res[top]: apply_trig(x, r[1], r[2])]
    def all_fn(x, res=res):
        cs = torch.randint(0, len(res), (len(x),))
        return torch.stack([apply_trig(x[i:i+1], res[int(c)][1], res[int(c)][2])[0] for i, c in enumerate(cs)])
    for vname, fns, lr in [("top", fns_top, 1e-4), ("top", fns_top, 3e-4), ("all", [all_fn], 1e-4), ("all", [all_fn], 3e-4)]:
        st = distill(m.model, m.spec, di, fns, lr=lr)
        print(f"  {vname} lr{lr}: {m.ev(st)} ({time.time()-t0:.0f}s)", flush=True)
