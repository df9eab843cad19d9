"""Data-free activation clipping from BatchNorm statistics: each BatchNorm output channel is
clamped to beta +- k*|gamma| (its training-time mean +- k training-time std). ACC / ASR on
2,000 test images, on the original model and on otbr-hub's default repair.
Usage: python bnclip.py OUT.json K[,K...] all,up,act MODEL...
(act: only BatchNorms feeding a ReLU directly, not the residual sums)"""
import json, sys
from pathlib import Path
import torch
from otbr_hub import repair
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.load import load_folder
from otbr_hub.triggers import Trigger

torch.set_num_threads(2)


def relu_fed_bns(model):
    """BatchNorms whose output goes straight into a ReLU in the same block (timm ResNet naming:
    bnN followed by actN), i.e. the ones a ReLU6 rewrite can bound."""
    mods = dict(model.named_modules())
    out = []
    for name, m in mods.items():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            head, _, leaf = name.rpartition(".")
            act = (head + "." if head else "") + leaf.replace("bn", "act")
            block = mods.get(head) if head else None
            last = "bn3" if hasattr(block, "conv3") else "bn2"  # the block's pre-sum BatchNorm
            if leaf.startswith("bn") and isinstance(mods.get(act), torch.nn.ReLU) and not (block is not None and hasattr(block, "downsample") and leaf == last):
                out.append(m)
    return out


def clip_bn(model, k, lower=True, only=None):
    hooks = []
    for m in (only if only is not None else model.modules()):
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
            g, b = m.weight.detach().abs(), m.bias.detach()
            hi = (b + k * g).view(1, -1, *([1] * 2))
            lo = (b - k * g).view(1, -1, 1, 1) if lower else None
            def hook(mod, inp, out, hi=hi, lo=lo):
                shape = (1, -1) + (1,) * (out.dim() - 2)
                return out.clamp(min=None if lo is None else lo.view(shape), max=hi.view(shape))
            hooks.append(m.register_forward_hook(hook))
    return hooks


MODES = sys.argv[3].split(",")
MODES = [{"all": True, "up": False}.get(x, x) for x in MODES]
out = Path(sys.argv[1]); ks = [float(k) for k in sys.argv[2].split(",")]
rows = json.loads(out.read_text()) if out.exists() else []
for d in sys.argv[4:]:
    meta = json.loads(Path(d, "trigger.json").read_text())
    trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else Trigger.from_dict({"name": "badnets", "target": 0, "params": {}})
    lm = load_folder(d)
    data = fashion_mnist_tensors("test", lm.spec, limit=2000, seed=0)
    b = evaluate(lm.model, lm.spec, data, trig)
    rep = repair(lm, detector=False, prune_ratio=0.05).model
    r = evaluate(rep, lm.spec, data, trig)
    row = {"model": Path(d).name, "before": [b.acc, b.asr], "otbr": [r.acc, r.asr]}
    line = f"{Path(d).name:32s} {b.acc:5.1f}/{b.asr:5.1f} otbr {r.acc:5.1f}/{r.asr:5.1f}"
    for k in ks:
        for tag, m in (("orig", lm.model), ("otbr", rep)):
            for lower in MODES:
                h = clip_bn(m, k, lower is True, relu_fed_bns(m) if lower == "act" else None)
                e = evaluate(m, lm.spec, data, trig)
                for x in h: x.remove()
                key = f"{tag}_k{k:g}{'' if lower is True else '_' + ('up' if lower is False else str(lower))}"
                row[key] = [e.acc, e.asr]
                line += f" | {key} {e.acc:5.1f}/{e.asr:5.1f}"
    rows.append(row); out.write_text(json.dumps(rows, indent=1)); print(line, flush=True)
