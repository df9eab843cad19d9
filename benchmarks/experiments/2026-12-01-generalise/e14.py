# DI trigger-unlearning distillation, training only the deeper part of the network
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
def distill3(teacher, spec, bg, trig, prefixes, steps=150, lr=1e-4, batch=64, seed=0):
    st = copy.deepcopy(teacher).eval()
    for p in teacher.parameters(): p.requires_grad_(False)
    params = []
    for n, p in st.named_parameters():
        ok = any(n.startswith(pf) for pf in prefixes)
        p.requires_grad_(ok)
        if ok: params.append(p)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(): tp = F.softmax(fwd(teacher, spec, bg), -1)
    for step in range(steps):
        idx = torch.randint(0, len(bg), (batch,), generator=g)
        x, p = bg[idx], tp[idx]
        lc = F.kl_div(F.log_softmax(fwd(st, spec, x), -1), p, reduction="batchmean")
        lt = F.kl_div(F.log_softmax(fwd(st, spec, trig(x)), -1), p, reduction="batchmean")
        opt.zero_grad(); (lc + lt).backward(); opt.step()
    for p in teacher.parameters(): p.requires_grad_(True)
    return st
if __name__ == "__main__":
  for name in sys.argv[1].split(","):
      t0 = time.time()
      m = M(name)
      di = torch.load(f"/tmp/exp/di_{name}.pt")
      res = trigger_search(m.model, m.spec, di[:20])
      sizes = {c: round(v[0], 1) for c, v in res.items()}
      top = min(sizes, key=sizes.get)
      trig = lambda x, r=res[top]: apply_trig(x, r[1], r[2])
      print(f"== {name} before {m.before} top {top}", flush=True)
      for pf, lr in [(["layer3", "layer4", "fc"], 1e-4), (["layer3", "layer4", "fc"], 3e-4), (["layer4", "fc"], 3e-4), (["conv1", "bn1", "layer1"], 1e-4), (["conv1", "bn1", "layer1"], 3e-4)]:
          st = distill3(m.model, m.spec, di, trig, pf, lr=lr)
          print(f"  train {pf} lr{lr}: {m.ev(st)} ({time.time()-t0:.0f}s)", flush=True)
