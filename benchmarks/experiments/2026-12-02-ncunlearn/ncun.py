"""Data-free Neural-Cleanse unlearning towards one suspected class.

Why: the universal-trigger search (``detect.py``, method "trigger") finds, on synthesised
backgrounds, a tiny mask that sends most of them to the target of a *whole-image* backdoor
(blended, low frequency, WaNet, ViT blended: DETECT_NOTES, "Universal-trigger search"), and
the weight evidence names the target in 29 of 33 zoo models. Pruning cannot remove those
backdoors even with an oracle ranking (NOTES 6.1). So: min-max fine-tuning, one class only.

For rounds 1..R:
  1. inner: mask m (H x W) and pattern p (C x H x W) so that x' = (1 - m) x + m p sends the
     synthesised backgrounds to class t, with an L1 penalty on m (the search of
     ``detect._trigger_search``, kept here so that m and p come back);
  2. outer: a few Adam steps so that the student's outputs on x and on x' both match the
     original's on x (KL), BatchNorm frozen (eval mode).

t is the weight evidence's top class (``ev``) or, as an oracle, the true target (``true``).

    python ncun.py OUT.json FOLDER... [--arms NAME=JSON ...]
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from otbr_hub.data import fashion_mnist_tensors  # noqa: E402
from otbr_hub.evaluate import evaluate  # noqa: E402
from otbr_hub.evidence import weight_evidence  # noqa: E402
from otbr_hub.load import load_folder  # noqa: E402
from otbr_hub.triggers import parse_trigger  # noqa: E402
from otbr_hub.verify import synthesize_inputs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "2026-12-01-uap"))
from uap import cli, fwd  # noqa: E402  (session 8's helpers, by import)


def search(model, spec, bg, t, *, steps=100, lr=0.1, flip=0.9, seed=0, init=None):
    """Smallest universal mask + pattern sending the backgrounds not already in t to t."""
    c, h, w = spec.channels, spec.height, spec.width
    with torch.no_grad():
        valid = (fwd(model, spec, bg).argmax(-1) != t).float()
    g = torch.Generator().manual_seed(seed)
    if init is None:
        a = torch.full((1, h, w), -3.0)
        b = torch.logit(torch.rand(c, h, w, generator=g).clamp(0.01, 0.99))
    else:
        a, b = init
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    lam = 1e-2
    best = (float("inf"), None, None, 0.0)
    tt = torch.full((len(bg),), t)
    for _ in range(steps):
        m, pat = torch.sigmoid(a), torch.sigmoid(b)
        x = (1 - m) * bg + m * pat
        logits = fwd(model, spec, x)
        ce = (F.cross_entropy(logits, tt, reduction="none") * valid).sum() / valid.sum().clamp_min(1)
        rate = float(((logits.argmax(-1) == t).float() * valid).sum() / valid.sum().clamp_min(1))
        size = float(m.detach().sum())
        if rate >= flip and size < best[0]:
            best = (size, m.detach().clone(), pat.detach().clone(), rate)
        opt.zero_grad()
        (ce + lam * m.mean()).backward()
        opt.step()
        lam = lam * 1.2 if rate >= flip else lam / 1.2
    if best[1] is None:  # never reached the flip rate: use the last mask
        m, pat = torch.sigmoid(a).detach(), torch.sigmoid(b).detach()
        best = (float(m.sum()), m, pat, rate)
    return best, (a.detach(), b.detach())


def unlearn(teacher, spec, bg, t, *, rounds=6, steps=30, lr=1e-4, batch=64, search_steps=100, seed=0, warm=True,
            w_trig=1.0, w_clean=1.0, params=None):
    """``params``: substrings of the parameter names to train (None: all)."""
    st = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train = [p for n, p in st.named_parameters() if params is None or any(k in n for k in params)]
    opt = torch.optim.Adam(train, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tp = F.softmax(fwd(teacher, spec, bg), -1)
    log, init = [], None
    for r in range(rounds):
        for p in st.parameters():
            p.requires_grad_(False)
        (size, m, pat, rate), state = search(st, spec, bg, t, steps=search_steps, seed=seed + r, init=init)
        init = state if warm else None
        for p in train:
            p.requires_grad_(True)
        log.append([round(size, 1), round(rate, 2)])
        for _ in range(steps):
            idx = torch.randint(0, len(bg), (batch,), generator=g)
            x, p = bg[idx], tp[idx]
            xt = (1 - m) * x + m * pat
            lc = F.kl_div(F.log_softmax(fwd(st, spec, x), -1), p, reduction="batchmean")
            lt = F.kl_div(F.log_softmax(fwd(st, spec, xt), -1), p, reduction="batchmean")
            opt.zero_grad()
            (w_clean * lc + w_trig * lt).backward()
            opt.step()
    for p in teacher.parameters():
        p.requires_grad_(True)
    return st, log


ARMS = {"ev": {"target": "ev"}}


def main(out, folders, arms):
    rows = []
    for folder in folders:
        meta = json.loads((Path(folder) / "trigger.json").read_text())
        attack = meta.get("attack", "clean")
        trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
        lm = load_folder(folder)
        model, spec = lm.model.eval(), lm.spec
        data = fashion_mnist_tensors("test", spec, limit=2000)
        before = evaluate(model, spec, data, trig)
        ev = weight_evidence(model, spec)
        t0 = time.time()
        bgs = {"gentle": synthesize_inputs(model, spec, 256, seed=5, steps=5, lr=0.02)}
        row = {"model": Path(folder).name, "attack": attack, "true_target": trig.target, "ev_target": ev.top_class,
               "ev_p": ev.p_value, "before": [round(before.acc, 1), round(before.asr, 1)], "arms": {}}
        print(f"== {row['model']} before {row['before']} true t {trig.target} ev t {ev.top_class} (p {ev.p_value:.3g})",
              flush=True)
        for name, kw in arms.items():
            kw = dict(kw)
            which = kw.pop("target", "ev")
            t = ev.top_class if which == "ev" else trig.target
            src = kw.pop("bg", "gentle")
            if src not in bgs:  # "probe": the repair's own verification probes (10 steps, lr 0.1)
                bgs[src] = synthesize_inputs(model, spec, 512, seed=5)
            bg = bgs[src]
            t1 = time.time()
            st, log = unlearn(model, spec, bg, t, **kw)
            after = evaluate(st, spec, data, trig)
            row["arms"][name] = {"t": t, "after": [round(after.acc, 1), round(after.asr, 1)], "search": log,
                                 "s": round(time.time() - t1)}
            print(f"   {name:14s} t={t} {after.acc:5.1f} / {after.asr:5.1f}  size,flip per round {log}  "
                  f"({time.time()-t1:.0f} s)", flush=True)
        rows.append(row)
        Path(out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    cli(main, ARMS)
