"""Does the fusion lose accuracy because it chains OT plans in parameter order across
residual connections? Prototype of a data-flow-aware chain: layer i's rows are mapped
through its OT plan (and layer i+1's inputs aligned with it) only when layer i+1 reads
layer i's output *alone* (zeroing layer i's output makes layer i+1's input the same for every
image); otherwise layer i keeps its neuron order (pruned rows at (1 - lambda) strength).
Compared with the reference chain at the same NWC, ratio and lambda.
Usage: python dataflow.py OUT.json RATIO MODEL..."""
import copy, json, sys, time
from pathlib import Path
import numpy as np, ot, torch
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.fuse import fuse, target_mass, transport_plan, _sparse_map, align_inputs, _fuse_attached
from otbr_hub.layers import select_layers
from otbr_hub.load import load_folder, forward_logits
from otbr_hub.prune import prune
from otbr_hub.score import neuron_weight_change
from otbr_hub.settings import preset
from otbr_hub.triggers import Trigger
from otbr_hub.unlearn import unlearn

torch.set_num_threads(2)
import os
VARIANT = os.environ.get("VARIANT", "chain")


class _Stop(Exception):
    pass


def exclusive_links(model, spec, layers):
    """links[i]: layer i+1 reads layer i's output alone (and widths match)."""
    mods = dict(model.named_modules())
    x = spec.normalize(torch.rand(2, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(0)))
    links = []
    for a, b in zip(layers, layers[1:]):
        if b.groups != 1 or a.n_out != b.n_in:
            links.append(False); continue
        seen = {}
        h1 = mods[a.name].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        def grab(m, i, seen=seen):
            seen["x"] = i[0].detach(); raise _Stop
        h2 = mods[b.name].register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                forward_logits(model, x)
        except _Stop:
            pass
        finally:
            h1.remove(); h2.remove()
        v = seen.get("x")
        links.append(v is not None and bool((v[0] - v[1]).abs().max() <= 1e-6 * (1 + v.abs().max())))
    return links


def fuse_dataflow(original, pruned, layers, nwc, pruned_idx, lam, links):
    fused = copy.deepcopy(original)
    start = next((i for i, l in enumerate(layers) if pruned_idx.get(l.name)), None)
    if start is None:
        return fused
    mo, mp, mf = dict(original.named_modules()), dict(pruned.named_modules()), dict(fused.named_modules())
    prev = None
    for i in range(start, len(layers)):
        layer = layers[i]
        w_bd = mo[layer.name].weight.detach().double().numpy()
        w_pn = mp[layer.name].weight.detach().double().numpy()
        n = w_bd.shape[0]
        w_al = w_pn.reshape(n, w_pn.shape[1], -1)
        if prev is not None:
            w_al = align_inputs(w_al, *prev)
        chained = i + 1 < len(layers) and links[i]
        if chained:
            b = target_mass(nwc[layer.name].numpy())
            plan = transport_plan(w_pn.reshape(n, -1), w_bd.reshape(n, -1), b)
            mapping = _sparse_map(plan, b, transpose=True)
            prev = (plan, b)
        else:
            mapping = None
            prev = None
        w_f = (np.asarray(mapping @ w_al.reshape(n, -1)) if mapping is not None else w_al.reshape(n, -1)).reshape(w_bd.shape)
        with torch.no_grad():
            mf[layer.name].weight.copy_(torch.from_numpy(lam * w_f + (1 - lam) * w_bd).float())
            if mapping is not None:
                _fuse_attached(layer, mo, mp, mf, mapping, lam)
            else:
                pairs = [(layer.name, "bias")] + ([(layer.norm_name, t) for t in ("weight", "bias", "running_mean", "running_var")] if layer.norm_name else [])
                for mn, attr in pairs:
                    t_o = getattr(mo[mn], attr, None)
                    if t_o is None:
                        continue
                    v = lam * getattr(mp[mn], attr).detach() + (1 - lam) * t_o.detach()
                    getattr(mf[mn], attr).copy_(v.clamp_min(1e-8) if attr == "running_var" else v)
    return fused


def main():
    out = Path(sys.argv[1]); ratio = float(sys.argv[2])
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {r["model"] for r in rows}
    for d in sys.argv[3:]:
        if Path(d).name in done:
            continue
        t0 = time.time()
        meta = json.loads(Path(d, "trigger.json").read_text())
        trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else Trigger.from_dict({"name": "badnets", "target": 0, "params": {}})
        lm = load_folder(d); model, spec = lm.model.eval(), lm.spec
        data = fashion_mnist_tensors("test", spec, limit=2000, seed=0)
        s = preset("default", prune_ratio=ratio)
        layers = select_layers(model, s)
        links = exclusive_links(model, spec, layers)
        sc = neuron_weight_change(model, unlearn(model, spec, s).model, layers, s)
        pr = prune(model, layers, sc, ratio, silence_norm=s.prune_norm)
        def ev(m):
            r = evaluate(m, spec, data, trig)
            return [round(r.acc, 2), None if r.asr is None else round(r.asr, 2)]
        row = {"model": Path(d).name, "ratio": ratio, "before": ev(model), "pruned": ev(pr.model),
               "links": sum(links), "pairs": len(links), "cells": {}}
        if VARIANT == "hidden":  # prune only neurons whose output the next scored layer reads alone
            from otbr_hub.score import Scores
            hidden = {l.name for l, k in zip(layers, links) if k}
            hs = Scores(nwc=sc.nwc, rank={n: v for n, v in sc.rank.items() if n in hidden}, ranking="global")
            pr = prune(model, layers, hs, ratio, silence_norm=s.prune_norm)
            row["hidden_pruned"] = ev(pr.model)
            for lam in (0.5, 1.0):
                row["cells"][f"hidden/{lam}"] = ev(fuse_dataflow(model, pr.model, layers, sc.nwc, pr.pruned, lam, links))
        else:
            row["cells"]["order/0.5"] = ev(fuse(model, pr.model, layers, sc.nwc, pr.pruned, 0.5, fuse_attached=True).model)
            for lam in (0.5, 0.75, 1.0):
                row["cells"][f"dataflow/{lam}"] = ev(fuse_dataflow(model, pr.model, layers, sc.nwc, pr.pruned, lam, links))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row); out.write_text(json.dumps(rows, indent=1))
        print(row["model"], "before", row["before"], "pruned", row["pruned"], f"links {row['links']}/{row['pairs']}", flush=True)
        for k, v in row["cells"].items():
            print(f"   {k:14s} {v}", flush=True)


main()
