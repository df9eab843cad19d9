# reduce the ACC cost of trigger-unlearning distillation on cached DI images
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
def distill2(teacher, spec, bg, trig, steps=150, lr=1e-4, batch=64, seed=0, w_clean=1.0, anchor=0.0, bn_only=False):
    st = copy.deepcopy(teacher).eval()
    for p in teacher.parameters(): p.requires_grad_(False)
    params = [p for p in st.parameters()]
    ref = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(): tp = F.softmax(fwd(teacher, spec, bg), -1)
    for step in range(steps):
        idx = torch.randint(0, len(bg), (batch,), generator=g)
        x, p = bg[idx], tp[idx]
        lc = F.kl_div(F.log_softmax(fwd(st, spec, x), -1), p, reduction="batchmean")
        lt = F.kl_div(F.log_softmax(fwd(st, spec, trig(x)), -1), p, reduction="batchmean")
        loss = w_clean * lc + lt
        if anchor: loss = loss + anchor * sum(((q - r) ** 2).sum() for q, r in zip(params, ref))
        opt.zero_grad(); loss.backward(); opt.step()
    for p in teacher.parameters(): p.requires_grad_(True)
    return st
for name in sys.argv[1].split(","):
    t0 = time.time()
    m = M(name)
    di = torch.load(f"/tmp/exp/di_{name}.pt")
    res = trigger_search(m.model, m.spec, di[:20])
    sizes = {c: round(v[0], 1) for c, v in res.items()}
    top = min(sizes, key=sizes.get)
    trig = lambda x, r=res[top]: apply_trig(x, r[1], r[2])
    print(f"== {name} before {m.before} top {top}", flush=True)
    for kw in [dict(lr=3e-5, steps=300), dict(lr=1e-4, w_clean=4.0), dict(lr=1e-4, anchor=1.0), dict(lr=1e-4, anchor=10.0)]:
        st = distill2(m.model, m.spec, di, trig, **kw)
        print(f"  {kw}: {m.ev(st)} ({time.time()-t0:.0f}s)", flush=True)
