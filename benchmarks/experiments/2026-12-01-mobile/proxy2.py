"""Is the low agreement of repaired backdoored models disagreement on probes the original sent
to the target? Agreement on all probes against agreement on the probes the original does not
put in the suspected class (the true target here; `--class N` for a clean model)."""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
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

for arg in sys.argv[1:]:
    folder, _, cls = arg.partition(":")
    meta = json.loads((Path(folder) / "trigger.json").read_text())
    trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
    t = int(cls) if cls else trig.target
    lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
    data = fashion_mnist_tensors("test", spec, limit=1000)
    before = evaluate(model, spec, data, trig)
    probe = synthesize_inputs(model, spec, 256)
    with torch.no_grad():
        po = forward_logits(model, spec.normalize(probe)).argmax(-1)
    s = preset("default")
    un = unlearn(model, spec, s).model
    layers = select_layers(model, s)
    scores = neuron_weight_change(model, un, layers, s)
    links = dataflow_links(model, spec, layers)
    print(f"== {Path(folder).name} (class {t}): {before.acc:.1f} / {before.asr:.1f}; probes the original puts in class {t}: {(po == t).float().mean():.2f}", flush=True)
    for ratio in (0.01, 0.03, 0.05):
        pr = prune(model, layers, scores, ratio, layer_cap=s.layer_cap)
        fz = fuse(model, pr.model, layers, scores.nwc, pr.pruned, 0.5, links=links).model.eval()
        after = evaluate(fz, spec, data, trig)
        with torch.no_grad():
            pf = forward_logits(fz, spec.normalize(probe)).argmax(-1)
        same = pf == po
        keep = po != t
        print(f"   {ratio}: ACC drop {before.acc - after.acc:5.1f}  ASR {after.asr:5.1f}  agree all {same.float().mean():.3f}  "
              f"not-class-{t} {same[keep].float().mean():.3f}  class-{t} {same[~keep].float().mean() if (~keep).any() else float('nan'):.3f}", flush=True)
