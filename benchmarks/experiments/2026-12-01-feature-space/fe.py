"""FreeEagle-style probe in feature space (prototype, not adopted unless NOTES say so).

For each source class c, a batch of intermediate representations at the input of a late
block is optimised so that the rest of the network predicts c; then the logits of every
other class j on those representations are read. A backdoor target is a class that many
unrelated representations push up (the trigger feature), so its column stands out.
Usage: python fe.py MODEL_DIR... [--split last|second] [--steps N]
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path
import numpy as np, torch
from otbr_hub.load import load_folder, eval_mode, forward_logits
from otbr_hub.evidence import max_outlier_p_value


def split_module(model, which: str):
    names = dict(model.named_modules())
    if hasattr(model, "feature_info"):  # timm
        mods = [f["module"] for f in model.feature_info]
        stage = mods[-1] if which == "last" else mods[-2]
        return stage, names[stage]
    if hasattr(model, "vit"):
        layers = model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer
        i = len(layers) - 1 if which == "last" else len(layers) - 2
        return f"layer.{i}", layers[i]
    raise SystemExit("unknown arch")


def capture(model, module, x):
    got = {}
    def hook(m, args, kwargs):
        got["x"] = args[0] if args else kwargs["hidden_states"]
        raise StopIteration
    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_logits(model, x)
    except StopIteration:
        pass
    finally:
        h.remove()
    return got["x"]


def probe(lm, which="last", steps=100, per_class=4, seed=0, lr=0.05):
    model, spec = lm.model, lm.spec
    for p in model.parameters():
        p.requires_grad_(False)
    name, mod = split_module(model, which)
    g = torch.Generator().manual_seed(seed)
    with eval_mode(model), torch.no_grad():
        x = spec.normalize(torch.rand(64, spec.channels, spec.height, spec.width, generator=g))
        feats = capture(model, mod, x)
    nonneg = bool((feats >= 0).all())
    mu = feats.mean(0, keepdim=True)
    sd = feats.std(0, keepdim=True) + 1e-6
    K = spec.num_classes
    targets = torch.arange(K).repeat_interleave(per_class)
    init = mu + sd * torch.randn((len(targets),) + feats.shape[1:], generator=g)
    if nonneg:
        init = init.clamp_min(0)
    r = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([r], lr=lr * float(sd.mean()))
    dummy = x[:1]
    def run(rep):
        def hook(m, args, kwargs):
            if args:
                return (rep,) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs); kwargs["hidden_states"] = rep
            return args, kwargs
        h = mod.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return forward_logits(model, dummy)
        finally:
            h.remove()
    with eval_mode(model):
        for _ in range(steps):
            logits = run(r)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            opt.zero_grad(); loss.backward(); opt.step()
            if nonneg:
                with torch.no_grad():
                    r.clamp_(min=0)
        with torch.no_grad():
            logits = run(r)
    L = logits.view(K, per_class, K)
    # per row: logits of the other classes, centred by their median (row scale differs)
    M = torch.full((K, K), float("nan"))
    for c in range(K):
        row = L[c].mean(0)
        others = torch.cat([row[:c], row[c + 1:]])
        M[c] = row - others.median()
        M[c, c] = float("nan")
    acc = float((L.argmax(-1) == torch.arange(K)[:, None]).float().mean())
    return name, nonneg, acc, M.numpy()


def stat(v):
    top = int(np.nanargmax(v))
    rest = np.delete(v, top)
    z = (v[top] - rest.mean()) / max(rest.std(ddof=1), 1e-9)
    return top, float(z), max_outlier_p_value(float(z), len(v))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--split", default="last")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for d in a.dirs:
        t = time.time()
        lm = load_folder(d)
        trig = Path(d, "trigger.json")
        truth = ((json.loads(trig.read_text()).get("trigger") or {}).get("target")) if trig.exists() else None
        name, nonneg, acc, M = probe(lm, a.split, a.steps, a.per_class, a.seed)
        res = {"model": Path(d).name, "target": truth, "split": name, "nonneg": nonneg, "fit": acc,
               "secs": round(time.time() - t, 1)}
        for agg in ("mean", "median"):
            v = np.nanmean(M, 0) if agg == "mean" else np.nanmedian(M, 0)
            top, z, p = stat(v)
            res[agg] = {"top": top, "z": round(z, 2), "p": p, "v": [round(float(x), 2) for x in v]}
        rows.append(res)
        print(f"{res['model']:34s} t={truth} fit={acc:.2f} mean top {res['mean']['top']} z {res['mean']['z']:5.2f} p {res['mean']['p']:.4f} | median top {res['median']['top']} z {res['median']['z']:5.2f} p {res['median']['p']:.4f} {res['secs']}s", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
