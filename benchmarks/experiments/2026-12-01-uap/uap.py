"""Data-free min-max unlearning of universal perturbations (I-BAU's idea, with synthesised
inputs instead of clean data).

1. DeepInversion: images that match the model's own BatchNorm statistics (no data).
2. Repeat: find one universal additive perturbation (L2 ball, RMS `rms` per pixel) that
   changes the student's predictions on those images most (untargeted: no suspected class);
   then a few Adam steps so that the student's outputs on both the images and the perturbed
   images match the original's on the images (KL).

    python uap.py OUT.json FOLDER...  [--arms NAME=JSON ...]
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from otbr_hub.data import fashion_mnist_tensors  # noqa: E402
from otbr_hub.evaluate import evaluate  # noqa: E402
from otbr_hub.load import forward_logits, load_folder  # noqa: E402
from otbr_hub.triggers import parse_trigger  # noqa: E402

LIMIT = 2000
CACHE = Path("/tmp/uap-cache")


def fwd(model, spec, x):
    return forward_logits(model, spec.normalize(x)).float()


def deepinv(model, spec, n, steps=200, lr=0.1, bn_w=1.0, tv_w=1e-3, seed=0):
    """Images whose per-BatchNorm batch statistics match the running ones, each pushed to an
    assigned class (DeepInversion, Yin et al. 2020, without the competition term)."""
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    losses = []

    def hook(mod, inp, out):
        x = inp[0].float()
        mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        losses.append((mu - mod.running_mean).norm() + (var - mod.running_var).norm())

    hs = [b.register_forward_hook(hook) for b in bns]
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, spec.channels, max(2, spec.height // 4), max(2, spec.width // 4), generator=g)
    x0 = F.interpolate(low, size=(spec.height, spec.width), mode="bilinear").clamp(0.02, 0.98)
    z = torch.logit(x0).requires_grad_(True)
    y = torch.arange(n) % spec.num_classes
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        losses.clear()
        x = torch.sigmoid(z)
        ce = F.cross_entropy(fwd(model, spec, x), y)
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        loss = ce + bn_w * sum(losses) + tv_w * tv
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in hs:
        h.remove()
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    return torch.sigmoid(z).detach()


def project(d, radius):
    n = d.flatten().norm()
    return d * (radius / n) if n > radius else d


def minmax(teacher, spec, bg, *, rms=0.1, outer=10, inner=10, steps=20, lr=1e-4, batch=64,
           params=None, seed=0, clean_w=1.0):
    st = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train = [p for n, p in st.named_parameters() if params is None or any(n.startswith(k) for k in params)]
    for p in st.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tp = F.softmax(fwd(teacher, spec, bg), -1)
        ty = tp.argmax(-1)
    radius = rms * (bg[0].numel() ** 0.5)
    delta = torch.zeros_like(bg[0])
    log = []
    for k in range(outer):
        # inner: universal perturbation that the student is most sensitive to
        d = delta.clone().requires_grad_(True)
        for _ in range(inner):
            idx = torch.randint(0, len(bg), (batch,), generator=g)
            loss = F.cross_entropy(fwd(st, spec, (bg[idx] + d).clamp(0, 1)), ty[idx])
            (gd,) = torch.autograd.grad(loss, d)
            with torch.no_grad():
                d += (radius / 4) * gd / gd.norm().clamp_min(1e-12)
                d.copy_(project(d, radius))
        delta = d.detach()
        with torch.no_grad():
            flip = float((fwd(st, spec, (bg + delta).clamp(0, 1)).argmax(-1) != ty).float().mean())
        log.append(round(flip, 3))
        # outer: outputs on perturbed and clean inputs match the teacher's
        for _ in range(steps):
            idx = torch.randint(0, len(bg), (batch,), generator=g)
            x, p = bg[idx], tp[idx]
            lc = F.kl_div(F.log_softmax(fwd(st, spec, x), -1), p, reduction="batchmean")
            lp = F.kl_div(F.log_softmax(fwd(st, spec, (x + delta).clamp(0, 1)), -1), p, reduction="batchmean")
            opt.zero_grad()
            (clean_w * lc + lp).backward()
            opt.step()
    for p in teacher.parameters():
        p.requires_grad_(True)
    return st, log


ARMS = {
    "rms.1": {},
    "rms.05": {"rms": 0.05},
    "rms.2": {"rms": 0.2},
}


def main(out, folders, arms):
    rows = []
    CACHE.mkdir(exist_ok=True)
    for folder in folders:
        t0 = time.time()
        meta = json.loads((Path(folder) / "trigger.json").read_text())
        trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
        lm = load_folder(folder)
        model, spec = lm.model.eval(), lm.spec
        data = fashion_mnist_tensors("test", spec, limit=LIMIT)
        before = evaluate(model, spec, data, trig)
        cp = CACHE / f"{Path(folder).name}-di256.pt"
        if cp.exists():
            bg = torch.load(cp)
        else:
            bg = deepinv(model, spec, 256)
            torch.save(bg, cp)
        row = {"model": Path(folder).name, "attack": meta.get("attack", "clean"),
               "before": [round(before.acc, 1), round(before.asr, 1)], "di_s": round(time.time() - t0), "arms": {}}
        print(f"== {row['model']} before {row['before']} (DI {row['di_s']} s)", flush=True)
        for name, kw in arms.items():
            t1 = time.time()
            st, log = minmax(model, spec, bg, **kw)
            after = evaluate(st, spec, data, trig)
            row["arms"][name] = {"after": [round(after.acc, 1), round(after.asr, 1)], "flip": log,
                                 "s": round(time.time() - t1)}
            print(f"   {name:12s} {after.acc:5.1f} / {after.asr:5.1f}  flips {log}  ({time.time()-t1:.0f} s)", flush=True)
        rows.append(row)
        Path(out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


def cli(main, default_arms):
    """``OUT.json FOLDER... [--arms NAME=JSON ...]``, shared by this directory's scripts."""
    args = sys.argv[1:]
    arms = default_arms
    if "--arms" in args:
        i = args.index("--arms")
        arms = {a.split("=", 1)[0]: json.loads(a.split("=", 1)[1]) for a in args[i + 1:]}
        args = args[:i]
    main(args[0], args[1:], arms)


if __name__ == "__main__":
    cli(main, ARMS)
