"""Which layer groups make a MobileNet/EfficientNet fragile under OTBR pruning? Prune (and fuse,
lambda 0.5) at one ratio with only one group of layers scored, ACC on 1,000 real test images."""
import re, sys
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

folder, ratio = sys.argv[1], float(sys.argv[2])
groups = sys.argv[3:] or ["", r"\.se\.", r"conv_dw$", r"conv_pw$", r"conv_pwl$", r"(conv_head|blocks\.5\.0\.conv|blocks\.6\.0\.conv)$"]
lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
data = fashion_mnist_tensors("test", spec, limit=1000)
trig = parse_trigger("badnets:target=4")
probe = synthesize_inputs(model, spec, 256)
base = evaluate(model, spec, data, trig).acc
print(f"{Path(folder).name}: ACC {base:.1f}; ratio {ratio}")
s = preset("default")
un = unlearn(model, spec, s).model
for g in groups:
    s2 = preset("default", include=g or None)
    layers = select_layers(model, s2)
    scores = neuron_weight_change(model, un, layers, s2)
    pr = prune(model, layers, scores, ratio, layer_cap=s2.layer_cap)
    links = dataflow_links(model, spec, layers)
    fz = fuse(model, pr.model, layers, scores.nwc, pr.pruned, 0.5, links=links).model
    n = sum(len(v) for v in pr.pruned.values())
    print(f"  scored {g or 'all (default)':45s} {len(layers):3d} layers, {n:4d} pruned: pruned {evaluate(pr.model, spec, data, trig).acc:5.1f}"
          f"  fused {evaluate(fz, spec, data, trig).acc:5.1f}  agreement {agreement(model, fz, spec, probe):.2f}", flush=True)
