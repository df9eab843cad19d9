"""ABS-style neuron stimulation without data (session 14 experiment, not in the engine).

ABS (Liu et al., CCS 2019) raises one neuron's activation on a few clean images and calls a
neuron compromised when that alone sends every image to one label. Here the clean images are
replaced by inputs synthesised from the model itself (otbr_hub.verify.synthesize_inputs), and
the stimulated "neuron" is a whole output channel of a scored layer (its BatchNorm output when
it has one), set to a constant value at every position.

Per channel: for each stimulation value v (factors of the layer's largest activation on the
base images), the share of base images whose own class differs from the modal class of the
stimulated predictions and that are sent there. The score is the largest share over v, ties
broken by the median logit margin. Then:

* detection: the modal class of the top channels against the real target;
* pruning: the top-ranked channels zeroed (the engine's prune), ACC / ASR on real test data,
  next to the oracle ranking with the real trigger (activation difference, z within layer).

Usage: OMP_NUM_THREADS=2 python abs.py MODEL_FOLDER_NAME [...]  (names under benchmarks/cache)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent / "2026-12-01-generalise"))

from lib import M, act_scores  # noqa: E402
from otbr_hub.fuse import fuse  # noqa: E402
from otbr_hub.layers import select_layers  # noqa: E402
from otbr_hub.load import forward_logits  # noqa: E402
from otbr_hub.prune import prune  # noqa: E402
from otbr_hub.score import Scores  # noqa: E402
from otbr_hub.settings import preset  # noqa: E402
from otbr_hub.verify import synthesize_inputs  # noqa: E402

FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
import os
SCALE = os.environ.get("ABS_SCALE", "layer")  # layer: factors of the layer's max; channel: of the channel's own max


def stimulation_scores(model, spec, layers, base, factors=FACTORS):
    """Per layer: (score[C], label[C]) from raising each channel alone on ``base``."""
    mods = dict(model.named_modules())
    model.eval()
    with torch.no_grad():
        own = forward_logits(model, spec.normalize(base)).argmax(-1)
    n = len(base)
    out = {}
    for L in layers:
        target = mods[L.norm_name] if L.norm_name else mods[L.name]
        seen = {}
        h = target.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o.detach()))
        with torch.no_grad():
            forward_logits(model, spec.normalize(base))
        h.remove()
        a = seen["a"]
        per = a.transpose(0, 1).reshape(a.shape[1], -1).amax(1) if SCALE == "channel" else None
        top = float(a.amax())
        c = L.n_out
        shares, labs = [], []
        xn = spec.normalize(base)
        group = max(1, 4096 // n)
        for f in factors:
            v = f * top if per is None else f * per.clamp_min(1e-3 * top)
            parts = []
            for c0 in range(0, c, group):
                g = min(group, c - c0)

                def stim(m, i, o, v=v, c0=c0, g=g):
                    o = o.clone()
                    shaped = o.view(g, n, *o.shape[1:])
                    for j in range(g):
                        shaped[j, :, c0 + j] = v if per is None else v[c0 + j]
                    return o

                h = target.register_forward_hook(stim)
                with torch.no_grad():
                    parts.append(forward_logits(model, xn.repeat(g, *[1] * (xn.dim() - 1))).float())
                h.remove()
            logits = torch.cat(parts)
            logits = logits.view(c, n, -1)
            pred = logits.argmax(-1)  # [c, n]
            mode = pred.mode(dim=1).values  # [c]
            moved = (own[None, :] != mode[:, None])
            hit = (pred == mode[:, None]) & moved
            share = hit.sum(1).float() / moved.sum(1).clamp_min(1).float()
            shares.append(share)
            labs.append(mode)
        out[L.name] = (torch.stack(shares), torch.stack(labs))  # [F, C]
    return out


def run(name: str, n_base: int = 40, ratios=(0.01, 0.02, 0.05)) -> dict:
    m = M(name, n=1000)
    s = preset("default")
    layers = select_layers(m.model, s)
    t0 = time.perf_counter()
    base = synthesize_inputs(m.model, m.spec, n_base, seed=1)
    stim = stimulation_scores(m.model, m.spec, layers, base)
    secs = time.perf_counter() - t0
    auc = {k: v[0].mean(0).double() for k, v in stim.items()}
    low = {k: v[0][:3].mean(0).double() for k, v in stim.items()}  # the gentle half of the factors
    zauc = {k: (a - a.mean()) / (a.std() + 1e-9) for k, a in auc.items()}
    labels = torch.cat([v[1][2] for v in stim.values()])  # modal class at factor 1
    flat = torch.cat(list(low.values()))
    order = flat.argsort(descending=True)
    counts = torch.bincount(labels[order[:20]], minlength=m.spec.num_classes)
    row = {"scale": SCALE, "model": name, "before": m.before, "target": None if m.clean else m.trigger.target, "seconds": round(secs, 1),
           "top10_labels": labels[order[:10]].tolist(), "top20_mode": int(counts.argmax()), "top20_mode_count": int(counts.max()),
           "share_by_factor": {str(f): round(float(torch.cat([v[0][i] for v in stim.values()]).mean()), 3) for i, f in enumerate(FACTORS)},
           "channels": int(flat.numel()), "rank": {}, "oracle": {}}
    nwc = {L.name: torch.ones(L.n_out, dtype=torch.float64) for L in layers}
    for rname, rank in (("auc", auc), ("low", low), ("zauc", zauc)):
        sc = Scores(nwc=nwc, rank=rank, ranking=rname)
        row["rank"][rname] = {str(r): m.ev(prune(m.model, layers, sc, r).model) for r in ratios}
    if not m.clean:
        import numpy as np  # noqa: F401

        from otbr_hub.data import fashion_mnist_tensors

        tr = fashion_mnist_tensors("train", m.spec, limit=400)
        xc = tr[0] if isinstance(tr, tuple) else tr.x
        orank = act_scores(m.model, layers, m.spec, xc, m.trigger.apply(xc), mode="z")
        osc = Scores(nwc=nwc, rank=orank, ranking="oracle")
        for r in ratios:
            row["oracle"][str(r)] = m.ev(prune(m.model, layers, osc, r).model)
        oflat = torch.cat([orank[L.name] for L in layers])
        k = max(1, int(0.02 * flat.numel()))
        otop = oflat.argsort(descending=True)[:k]
        row["top2pct_overlap_with_oracle"] = len(set(order[:k].tolist()) & set(otop.tolist())) / k
        row["oracle_top_low_share"] = round(float(flat[otop].mean()), 3)
        row["oracle_top_labels"] = labels[otop].tolist()
        row["all_low_share"] = round(float(flat.mean()), 3)
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    rows = [run(n) for n in sys.argv[1:]]
    (HERE / "logs").mkdir(exist_ok=True)
    with open(HERE / "logs" / "abs.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
