"""Does knowing the suspected target class (the weight evidence's top class, data-free) give
a better neuron ranking than OTBR's random labels? Unlearning variants on the same noise:
random labels (the engine default), all labels = t (ascent on CE(t)). Prune / fuse at a few
ratios and evaluate ACC / ASR on 1,000 test images.
Usage: python targeted.py OUT.json MODEL..."""
import copy, json, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "2026-12-01-generalise"))
from lib import M, settings_default  # noqa: E402
from otbr_hub.layers import select_layers
from otbr_hub.unlearn import unlearn, noise_batch
from otbr_hub.score import neuron_weight_change
from otbr_hub.prune import prune
from otbr_hub.fuse import fuse
from otbr_hub.load import forward_logits
from otbr_hub.evidence import weight_evidence

torch.set_num_threads(2)
RATIOS = (0.02, 0.05, 0.1)


def unlearn_target(model, spec, s, t, mode):
    work = copy.deepcopy(model).float().train()
    opt = torch.optim.SGD(work.parameters(), lr=s.unlearn_lr, momentum=s.unlearn_momentum)
    gen = torch.Generator().manual_seed(s.seed)
    for _ in range(s.unlearn_steps):
        x = noise_batch(spec, s.unlearn_batch, gen)
        y = torch.randint(0, spec.num_classes, (s.unlearn_batch,), generator=gen)
        logits = forward_logits(work, x).float()
        if mode == "asc-t":
            loss = -F.cross_entropy(logits, torch.full_like(y, t))
        elif mode == "logit-t":  # push the target logit down relative to the rest
            loss = (logits[:, t] - logits.logsumexp(-1)).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return work.eval()


def main():
    out = Path(sys.argv[1]); rows = []
    if out.exists():
        rows = json.loads(out.read_text())
    done = {r["model"] for r in rows}
    for name in sys.argv[2:]:
        if name in done:
            continue
        t0 = time.time()
        m = M(name)
        s = settings_default(prune_ratio=0.05)
        layers = select_layers(m.model, s)
        ev = weight_evidence(m.model, m.spec)
        t = ev.top_class if ev.applicable else int(m.trigger.target)
        row = {"model": name, "before": m.before, "target": int(m.trigger.target), "ev_top": ev.top_class,
               "ev_p": ev.p_value, "variants": {}}
        nwcs = {"random": neuron_weight_change(m.model, unlearn(m.model, m.spec, s).model, layers, s)}
        for mode in ("asc-t", "logit-t"):
            nwcs[mode] = neuron_weight_change(m.model, unlearn_target(m.model, m.spec, s, t, mode), layers, s)
        for key, sc in nwcs.items():
            for r in RATIOS:
                pr = prune(m.model, layers, sc, r, silence_norm=True)
                fu = fuse(m.model, pr.model, layers, sc.nwc, pr.pruned, 0.5, fuse_attached=True).model
                row["variants"][f"{key}@{r}"] = {"P": m.ev(pr.model), "F": m.ev(fu)}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1))
        print(name, m.before, "t", t, "target", m.trigger.target, flush=True)
        for k, v in row["variants"].items():
            print(f"   {k:14s} P {v['P']}  F {v['F']}", flush=True)


main()
