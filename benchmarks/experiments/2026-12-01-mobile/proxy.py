"""Which data-free agreement measure tracks the real accuracy cost of a repair across
architectures? For each model, fixed-ratio repairs (prune + fuse, lambda 0.5, the default
layers, links and cap) at several ratios; real ACC drop on 1,000 test images against:
agreement on the default probes (`synthesize_inputs`, 256), on the probes the original is
confident on, on DeepInversion images (BatchNorm models), and the mean KL on the probes."""
import json, sys
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "2026-12-01-uap"))
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.fuse import dataflow_links, fuse
from otbr_hub.layers import select_layers
from otbr_hub.load import load_folder, forward_logits
from otbr_hub.prune import prune
from otbr_hub.score import neuron_weight_change
from otbr_hub.settings import preset
from otbr_hub.triggers import parse_trigger
from otbr_hub.unlearn import unlearn
from otbr_hub.verify import synthesize_inputs
from uap import CACHE, deepinv

import os
RATIOS = [float(r) for r in os.environ.get("RATIOS", "0.01,0.03,0.05,0.1").split(",")]
out_path = sys.argv[1]
rows = json.loads(Path(out_path).read_text()) if Path(out_path).exists() else []
done = {r["model"] for r in rows}
for folder in sys.argv[2:]:
    name = Path(folder).name
    if name in done:
        continue
    lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
    data = fashion_mnist_tensors("test", spec, limit=1000)
    trig = parse_trigger("badnets:target=0")
    base = evaluate(model, spec, data, trig).acc
    probe = synthesize_inputs(model, spec, 256)
    with torch.no_grad():
        po = F.softmax(forward_logits(model, spec.normalize(probe)).float(), -1)
    conf = po.max(-1).values
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    di = None
    if has_bn:
        cp = CACHE / f"{name}-di256.pt"
        di = torch.load(cp) if cp.exists() else deepinv(model, spec, 256)
        CACHE.mkdir(exist_ok=True); torch.save(di, cp)
        with torch.no_grad():
            pdi = forward_logits(model, spec.normalize(di)).argmax(-1)
    s = preset("default")
    un = unlearn(model, spec, s).model
    layers = select_layers(model, s)
    scores = neuron_weight_change(model, un, layers, s)
    links = dataflow_links(model, spec, layers)
    print(f"== {name}: ACC {base:.1f}, probes' mean confidence {conf.mean():.2f}, share >= 0.9: {(conf >= 0.9).float().mean():.2f}", flush=True)
    for ratio in RATIOS:
        pr = prune(model, layers, scores, ratio, layer_cap=s.layer_cap)
        fz = fuse(model, pr.model, layers, scores.nwc, pr.pruned, 0.5, links=links).model.eval()
        acc = evaluate(fz, spec, data, trig).acc
        with torch.no_grad():
            pf = F.log_softmax(forward_logits(fz, spec.normalize(probe)).float(), -1)
            same = pf.argmax(-1) == po.argmax(-1)
            kl = float(F.kl_div(pf, po, reduction="batchmean"))
            a_di = float((forward_logits(fz, spec.normalize(di)).argmax(-1) == pdi).float().mean()) if di is not None else None
        row = {"model": name, "ratio": ratio, "acc_drop": round(base - acc, 2), "agree": float(same.float().mean()),
               "agree_conf90": float(same[conf >= 0.9].float().mean()) if (conf >= 0.9).any() else None,
               "agree_di": a_di, "kl": kl}
        rows.append(row)
        print("   " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "model"), flush=True)
    Path(out_path).write_text(json.dumps(rows, indent=1) + "\n")
