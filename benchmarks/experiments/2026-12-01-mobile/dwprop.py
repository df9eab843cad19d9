"""A pruned expansion channel still reaches the block's output through the depthwise conv's
BatchNorm constant (beta - gamma * mean / std). Silence (0) or mean-replace (beta) the
depthwise channel too, and compare ACC after pruning / fusion (1,000 test images)."""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.fuse import dataflow_links, fuse
from otbr_hub.layers import select_layers
from otbr_hub.load import load_folder
from otbr_hub.prune import prune
from otbr_hub.score import neuron_weight_change
from otbr_hub.settings import preset
from otbr_hub.triggers import parse_trigger
from otbr_hub.unlearn import unlearn
from otbr_hub.verify import agreement, synthesize_inputs
import json

def propagate(model, pruned_idx, mode):
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, idx in pruned_idx.items():
            if not idx or not name.endswith("conv_pw"):
                continue
            block = name[: -len("conv_pw")]
            dw, bn = mods.get(block + "conv_dw"), mods.get(block + "bn2")
            if dw is None or bn is None:
                continue
            bn.weight[idx] = 0
            if mode == "zero":
                bn.bias[idx] = 0
    return model

for arg in sys.argv[1:]:
    folder = arg
    meta = json.loads((Path(folder) / "trigger.json").read_text())
    trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
    lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
    data = fashion_mnist_tensors("test", spec, limit=1000)
    before = evaluate(model, spec, data, trig)
    probe = synthesize_inputs(model, spec, 256)
    s = preset("default")
    un = unlearn(model, spec, s).model
    print(f"== {Path(folder).name}: {before.acc:.1f} / {before.asr:.1f}", flush=True)
    for inc in (None, r"conv_pw$"):
        s2 = preset("default", include=inc)
        layers = select_layers(model, s2)
        scores = neuron_weight_change(model, un, layers, s2)
        links = dataflow_links(model, spec, layers)
        for ratio in (0.01, 0.03):
            cells = []
            for mode in ("none", "zero", "mean"):
                pr = prune(model, layers, scores, ratio, layer_cap=s2.layer_cap)
                if mode != "none":
                    propagate(pr.model, pr.pruned, mode)
                fz = fuse(model, pr.model, layers, scores.nwc, pr.pruned, 0.5, links=links).model.eval()
                a, b = evaluate(pr.model, spec, data, trig), evaluate(fz, spec, data, trig)
                cells.append(f"{mode}: pruned {a.acc:5.1f}/{a.asr:5.1f} fused {b.acc:5.1f}/{b.asr:5.1f} agr {agreement(model, fz, spec, probe):.2f}")
            print(f"   {inc or 'all':9s} {ratio}: " + " | ".join(cells), flush=True)
