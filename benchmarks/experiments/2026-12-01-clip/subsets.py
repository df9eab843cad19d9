"""Which bounded BatchNorms buy the ASR and which cost the accuracy? The default auto repair
without bounds (clip_sigma 0) is made once per model, then hooks bound subsets of the
ReLU-fed BatchNorms at beta + k|gamma|, with bounds from the fused model (as the engine does)
or from the original's BatchNorms. ACC / ASR on 2,000 test images.
Usage: python subsets.py OUT.json MODEL..."""
import json, sys
from pathlib import Path
import torch
from otbr_hub import repair
from otbr_hub.clip import _pairs_and_streams, _plan, bounds
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.load import load_folder
from otbr_hub.triggers import Trigger

torch.set_num_threads(2)


def bounded_norms(model):
    """(name, BatchNorm) of the norms the engine bounds, in model order."""
    net = _plan(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(n)], n) for n, _ in _pairs_and_streams(net)[0]]


def hooked_eval(model, spec, data, trig, chosen, limits):
    hooks = []
    for name, bn in chosen:
        c = limits[name].float().view(1, -1, 1, 1)
        hooks.append(bn.register_forward_hook(lambda m, i, o, c=c: torch.where(c == 0, torch.zeros_like(o), torch.minimum(o, c))))
    try:
        return evaluate(model, spec, data, trig)
    finally:
        for h in hooks:
            h.remove()


SUBSETS = {
    "all": lambda n: True,
    "no_stem": lambda n: n != "bn1",
    "deep": lambda n: n.startswith(("layer3", "layer4")),
    "shallow": lambda n: n == "bn1" or n.startswith(("layer1", "layer2")),
    "last_stage": lambda n: n.startswith("layer4"),
}

out = Path(sys.argv[1])
rows = json.loads(out.read_text()) if out.exists() else []
done = {r["model"] for r in rows}
for d in sys.argv[2:]:
    if Path(d).name in done:
        continue
    meta = json.loads(Path(d, "trigger.json").read_text())
    trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else Trigger.from_dict({"name": "badnets", "target": 0, "params": {}})
    lm = load_folder(d)
    data = fashion_mnist_tensors("test", lm.spec, limit=2000, seed=0)
    b = evaluate(lm.model, lm.spec, data, trig)
    res = repair(lm, clip_sigma=0)
    fused = res.model.eval()
    row = {"model": Path(d).name, "before": [b.acc, b.asr], "plan": res.report.ratio_reason[:60], "lam": res.report.lam}
    e = evaluate(fused, lm.spec, data, trig)
    row["fused"] = [e.acc, e.asr]
    norms_f = bounded_norms(fused)
    norms_o = dict(bounded_norms(lm.model))
    for k in (3.0,):
        lim_f = {n: bounds(bn, k) for n, bn in norms_f}
        lim_o = {n: bounds(norms_o[n], k) for n, _ in norms_f}
        for sub, keep in SUBSETS.items():
            chosen = [(n, bn) for n, bn in norms_f if keep(n)]
            e = hooked_eval(fused, lm.spec, data, trig, chosen, lim_f)
            row[f"{sub}_k{k:g}"] = [e.acc, e.asr]
        e = hooked_eval(fused, lm.spec, data, trig, norms_f, lim_o)
        row[f"all_k{k:g}_origbounds"] = [e.acc, e.asr]
        e = hooked_eval(lm.model, lm.spec, data, trig, list(norms_o.items()), {n: bounds(bn, k) for n, bn in norms_o.items()})
        row[f"orig_model_k{k:g}"] = [e.acc, e.asr]
    rows.append(row)
    out.write_text(json.dumps(rows, indent=1))
    print(Path(d).name, " ".join(f"{k}={v[0]:.1f}/{v[1]:.1f}" for k, v in row.items() if isinstance(v, list)), flush=True)
