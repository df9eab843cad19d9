"""Weight-only neuron rankings from BatchNorm's stored statistics (session 16 experiment, not in the engine).

Idea (after Zheng et al., "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022):
a backdoor neuron's pre-activation is a mixture of the benign population and a shifted poisoned
one, so the running statistics BatchNorm stored while training on the poisoned set should be
unusual for it. Those statistics are in the checkpoint, so rankings built from them cost no
forward pass and need no data. Rankings, each z-scored within the layer (high = prune first):

* ``logvar``: log running_var (the stored pre-activation variance);
* ``excess``: log running_var - log ||W_k||^2 (variance beyond what the filter's norm explains
  with independent inputs: correlated, trigger-driven inputs inflate it);
* ``shift``: running_mean / sqrt(running_var);
* ``act``: the post-BN, post-ReLU mean of a Gaussian N(beta, gamma^2) (how strongly the channel
  fires on average);
* ``random``: a control.

Each is compared with the oracle (activation difference under the real trigger on 400 training
images, z within layer; section 6.1 of NOTES.md): Spearman, top-2 % overlap, and ACC / ASR on
1,000 test images after pruning the top 1 / 2 / 5 % with the engine's prune (no fusion).

Usage: OMP_NUM_THREADS=2 python bnstats.py MODEL_NAME [...]   (folders under benchmarks/cache)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent / "2026-12-01-generalise"))

from lib import M, act_scores  # noqa: E402
from otbr_hub.layers import select_layers  # noqa: E402
from otbr_hub.prune import prune  # noqa: E402
from otbr_hub.score import Scores  # noqa: E402
from otbr_hub.settings import preset  # noqa: E402


def _z(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return (v - v.mean()) / (v.std() + 1e-12)


def bn_rankings(model, layers, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in ("logvar", "excess", "shift", "act", "random")}
    for L in layers:
        bn = mods[L.norm_name] if L.norm_name else None
        if bn is None or getattr(bn, "running_var", None) is None:
            raise SystemExit(f"{L.name}: no BatchNorm statistics")
        var = bn.running_var.double().clamp_min(1e-12)
        mean = bn.running_mean.double()
        w = mods[L.name].weight.detach().double().flatten(1)
        g = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
        b = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
        out["logvar"][L.name] = _z(var.log())
        out["excess"][L.name] = _z(var.log() - (w.pow(2).sum(1) + 1e-12).log())
        out["shift"][L.name] = _z(mean / var.sqrt())
        s = g.abs().clamp_min(1e-12)
        a = b / s
        phi = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        Phi = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
        out["act"][L.name] = _z(b * Phi + s * phi)  # E[relu(N(b, s^2))]
        out["random"][L.name] = torch.randn(L.n_out, generator=gen, dtype=torch.float64)
    return out


def run(name: str, ratios=(0.01, 0.02, 0.05)) -> dict:
    m = M(name, n=1000)
    layers = select_layers(m.model, preset("default"))
    t0 = time.perf_counter()
    ranks = bn_rankings(m.model, layers)
    secs = time.perf_counter() - t0
    nwc = {L.name: torch.ones(L.n_out, dtype=torch.float64) for L in layers}
    row = {"model": name, "before": m.before, "target": None if m.clean else m.trigger.target,
           "seconds": round(secs, 3), "rank": {}, "spearman": {}, "top2_overlap": {}}
    oracle = None
    if not m.clean:
        from otbr_hub.data import fashion_mnist_tensors

        tr = fashion_mnist_tensors("train", m.spec, limit=400)
        xc = tr[0] if isinstance(tr, tuple) else tr.x
        oracle = act_scores(m.model, layers, m.spec, xc, m.trigger.apply(xc), mode="z")
        ranks = {"oracle": oracle, **ranks}
        oflat = torch.cat([oracle[L.name] for L in layers])
        k = max(1, int(0.02 * oflat.numel()))
        otop = set(oflat.argsort(descending=True)[:k].tolist())
    for rname, rank in ranks.items():
        sc = Scores(nwc=nwc, rank=rank, ranking=rname)
        row["rank"][rname] = {str(r): m.ev(prune(m.model, layers, sc, r).model) for r in ratios}
        if oracle is not None and rname != "oracle":
            flat = torch.cat([rank[L.name] for L in layers])
            row["spearman"][rname] = round(float(spearmanr(flat.numpy(), oflat.numpy())[0]), 3)
            row["top2_overlap"][rname] = round(len(set(flat.argsort(descending=True)[:k].tolist()) & otop) / k, 3)
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    rows = [run(n) for n in sys.argv[1:]]
    (HERE / "logs").mkdir(exist_ok=True)
    with open(HERE / "logs" / "bnstats.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
