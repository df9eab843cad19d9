# trigger-guided activation pruning
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
names = sys.argv[1].split(",")
modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["z"]
ratios = [0.005, 0.01, 0.02, 0.03, 0.05]
for name in names:
    t0 = time.time()
    m = M(name)
    s = settings_default()
    layers = select_layers(m.model, s)
    bg = synthesize_inputs(m.model, m.spec, 20, seed=0, steps=5, lr=0.02)
    res = trigger_search(m.model, m.spec, bg)
    sizes = {c: round(v[0], 1) for c, v in res.items()}
    top = min(sizes, key=sizes.get)
    order = sorted(sizes, key=sizes.get)
    tt = m.trigger.target
    print(f"== {name} before {m.before} target {tt} clean={m.clean} top {top} sizes {sizes} target rank {order.index(tt)} ({time.time()-t0:.0f}s)", flush=True)
    held = synthesize_inputs(m.model, m.spec, 100, seed=1, steps=5, lr=0.02)
    nwc = random_nwc(m.model, m.spec, layers, s)
    for cls in ([top] if (top == tt or m.clean) else [top, tt]):
        _, mask, pat = res[cls]
        print(f"  class {cls}: size {sizes[cls]} flip(held) {flip_rate(m.model, m.spec, held, mask, pat, cls):.2f}")
        for mode in modes:
            rank = act_scores(m.model, layers, m.spec, held, apply_trig(held, mask, pat), mode)
            row = []
            for r in ratios:
                out, pr = build(m.model, layers, nwc, rank, r)
                fr = flip_rate(out["pruned"], m.spec, held, mask, pat, cls)
                row.append(f"{r}: {m.ev(out['pruned'])} fl{fr:.2f}")
            print(f"  [{mode}] " + " | ".join(row), flush=True)
    print(f"  ({time.time()-t0:.0f}s)")
