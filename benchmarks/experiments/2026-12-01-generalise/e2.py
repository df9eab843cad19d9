# trigger-unlearning distillation on synthetic backgrounds
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)

def distill(teacher, spec, bg, trig_fns, steps=100, lr=1e-4, batch=64, seed=0, w_clean=1.0):
    """student(x) ~ teacher(x) and student(trig(x)) ~ teacher(x) on synthetic x; BN frozen (eval)."""
    st = copy.deepcopy(teacher).eval()
    for p in teacher.parameters(): p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in st.parameters()], lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tp = F.softmax(fwd(teacher, spec, bg), -1)
    for step in range(steps):
        idx = torch.randint(0, len(bg), (batch,), generator=g)
        x, p = bg[idx], tp[idx]
        j = torch.randint(0, len(trig_fns), (batch,), generator=g)
        xt = torch.stack([trig_fns[int(jj)](x[i:i+1])[0] for i, jj in enumerate(j)])
        lc = F.kl_div(F.log_softmax(fwd(st, spec, x), -1), p, reduction="batchmean")
        lt = F.kl_div(F.log_softmax(fwd(st, spec, xt), -1), p, reduction="batchmean")
        loss = w_clean * lc + lt
        opt.zero_grad(); loss.backward(); opt.step()
    for p in teacher.parameters(): p.requires_grad_(True)
    return st

names = sys.argv[1].split(",")
for name in names:
    t0 = time.time()
    m = M(name)
    bg = synthesize_inputs(m.model, m.spec, 20, seed=0, steps=5, lr=0.02)
    train_bg = synthesize_inputs(m.model, m.spec, 512, seed=2, steps=5, lr=0.02)
    res = trigger_search(m.model, m.spec, bg)
    sizes = {c: round(v[0], 1) for c, v in res.items()}
    top = min(sizes, key=sizes.get)
    print(f"== {name} before {m.before} target {m.trigger.target} top {top} sizes {sizes} ({time.time()-t0:.0f}s)", flush=True)
    variants = {
        "none(clean distill only)": [lambda x: x],
        "oracle real trigger": [m.trigger.apply],
        "top reversed": [lambda x, r=res[top]: apply_trig(x, r[1], r[2])],
        "all reversed": [lambda x, r=res[c]: apply_trig(x, r[1], r[2]) for c in res],
    }
    for vname, fns in variants.items():
        for lr in [1e-4, 1e-3]:
            st = distill(m.model, m.spec, train_bg, fns, steps=100, lr=lr)
            print(f"  {vname} lr{lr}: {m.ev(st)} ({time.time()-t0:.0f}s)", flush=True)
