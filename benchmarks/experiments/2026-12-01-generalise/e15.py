# fully data-free: DeepInversion inputs -> trigger search (top class) -> distillation of the deep layers only
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
from di_lib import deepinv
from e14 import distill3
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
    trig = lambda x, r=res[top]: apply_trig(x, r[1], r[2])
    print(f"== {name} before {m.before} target {m.trigger.target} clean={m.clean} top {top} ({sizes[top]} vs {sizes[order[1]]}) ({time.time()-t0:.0f}s)", flush=True)
    for pf, lr in [(["layer4", "fc"], 3e-4), (["layer3", "layer4", "fc"], 1e-4)]:
        st = distill3(m.model, m.spec, di, trig, pf, lr=lr)
        print(f"  train {pf} lr{lr}: {m.ev(st)} ({time.time()-t0:.0f}s)", flush=True)
