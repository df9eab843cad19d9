# universal-trigger search on DeepInversion backgrounds as a detector signal
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
from di_lib import deepinv
torch.set_num_threads(1)
for name in sys.argv[1].split(","):
    t0 = time.time()
    m = M(name, n=10)
    p = Path(f"/tmp/exp/di_{name}.pt")
    if p.exists(): di = torch.load(p)
    else:
        di = deepinv(m.model, m.spec, 256); torch.save(di, p)
    res = trigger_search(m.model, m.spec, di[:20])
    sizes = {c: round(v[0], 1) for c, v in res.items()}
    order = sorted(sizes, key=sizes.get)
    print(f"== {name} target {m.trigger.target} clean={m.clean}: top {order[0]} {sizes[order[0]]}, second {order[1]} {sizes[order[1]]}, ratio {sizes[order[1]]/max(sizes[order[0]],1e-3):.1f}, target rank {order.index(m.trigger.target)}; sizes {sizes} ({time.time()-t0:.0f}s)", flush=True)
