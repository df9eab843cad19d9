import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
torch.set_num_threads(1)
for name in sys.argv[1].split(","):
    m = M(name)
    for sk in [True, False]:
        s = settings_default(skip_shortcuts=sk, include_classifier=False)
        layers = select_layers(m.model, s)
        xtr, ytr = fashion_mnist_tensors("train", m.spec, limit=300, seed=5)
        xc = xtr[ytr != m.trigger.target]; xt = m.trigger.apply(xc)
        nwc = random_nwc(m.model, m.spec, layers, s)
        rank = act_scores(m.model, layers, m.spec, xc, xt, "z")
        row = []
        for r in [0.01, 0.02, 0.05, 0.1]:
            out, pr = build(m.model, layers, nwc, rank, r)
            row.append(f"{r}: {m.ev(out['pruned'])}")
        print(f"{name} skip_shortcuts={sk} oracle-actdiff: " + " | ".join(row), flush=True)
