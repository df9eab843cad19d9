# trigger-unlearning distillation on synthetic backgrounds, only norm affine params trainable
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
def distill(teacher, spec, bg, trig_fns, steps=100, lr=1e-2, batch=64, seed=0, which="norm"):
    st = copy.deepcopy(teacher).eval()
    for p in st.parameters(): p.requires_grad_(False)
    params = []
    for mod in st.modules():
        if which == "norm" and isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) or (which == "normbias" and isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))):
            for p in mod.parameters(): p.requires_grad_(True); params.append(p)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tp = F.softmax(fwd(teacher, spec, bg), -1)
    for step in range(steps):
        idx = torch.randint(0, len(bg), (batch,), generator=g)
        x, p = bg[idx], tp[idx]
        j = torch.randint(0, len(trig_fns), (batch,), generator=g)
        xt = torch.cat([trig_fns[int(jj)](x[i:i+1]) for i, jj in enumerate(j)])
        lc = F.kl_div(F.log_softmax(fwd(st, spec, x), -1), p, reduction="batchmean")
        lt = F.kl_div(F.log_softmax(fwd(st, spec, xt), -1), p, reduction="batchmean")
        opt.zero_grad(); (lc + lt).backward(); opt.step()
    return st
for name in sys.argv[1].split(","):
    t0 = time.time()
    m = M(name)
    bg = synthesize_inputs(m.model, m.spec, 20, seed=0, steps=5, lr=0.02)
    train_bg = synthesize_inputs(m.model, m.spec, 512, seed=2, steps=5, lr=0.02)
    res = trigger_search(m.model, m.spec, bg)
    sizes = {c: round(v[0], 1) for c, v in res.items()}
    top = min(sizes, key=sizes.get)
    print(f"== {name} before {m.before} target {m.trigger.target} top {top} ({time.time()-t0:.0f}s)", flush=True)
    variants = {
        "clean only": [lambda x: x],
        "oracle": [m.trigger.apply],
        "top": [lambda x, r=res[top]: apply_trig(x, r[1], r[2])],
        "all": [lambda x, r=res[c]: apply_trig(x, r[1], r[2]) for c in res],
    }
    for vname, fns in variants.items():
        for lr in [1e-3, 1e-2]:
            st = distill(m.model, m.spec, train_bg, fns, lr=lr)
            print(f"  {vname} lr{lr}: {m.ev(st)} ({time.time()-t0:.0f}s)", flush=True)
