"""Is the MobileNet's accuracy loss the NWC ranking's doing, or does removing any 1 % of its
neurons cost as much? Prune (no fusion) 1 % / 3 % chosen by raw NWC (default), by the
layer-normalised ranking, at random, and the lowest NWC; 1,000 test images."""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.layers import select_layers
from otbr_hub.load import load_folder
from otbr_hub.prune import prune
from otbr_hub.score import neuron_weight_change, Scores
from otbr_hub.settings import preset
from otbr_hub.triggers import parse_trigger
from otbr_hub.unlearn import unlearn

for folder in sys.argv[1:]:
    meta = json.loads((Path(folder) / "trigger.json").read_text())
    trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
    lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
    data = fashion_mnist_tensors("test", spec, limit=1000)
    before = evaluate(model, spec, data, trig)
    s = preset("default")
    un = unlearn(model, spec, s).model
    layers = select_layers(model, s)
    print(f"== {Path(folder).name}: {before.acc:.1f} / {before.asr:.1f}", flush=True)
    sc = neuron_weight_change(model, un, layers, s)
    sl = neuron_weight_change(model, un, layers, preset("default", ranking="layer-normalized"))
    g = torch.Generator().manual_seed(0)
    rnd = Scores(nwc=sc.nwc, rank={k: torch.rand(v.shape, generator=g) for k, v in sc.rank.items()}, ranking="global") if hasattr(sc, "rank") else None
    for ratio in (0.01, 0.03):
        cells = []
        variants = {"raw NWC": sc, "layer-norm": sl}
        if rnd is not None:
            variants["random"] = rnd
            variants["lowest NWC"] = Scores(nwc=sc.nwc, rank={k: -v for k, v in sc.rank.items()}, ranking="global")
        for name, scores in variants.items():
            pr = prune(model, layers, scores, ratio, layer_cap=s.layer_cap)
            a = evaluate(pr.model, spec, data, trig)
            cells.append(f"{name} {a.acc:5.1f}/{a.asr:5.1f}")
        print(f"   {ratio}: " + " | ".join(cells), flush=True)
