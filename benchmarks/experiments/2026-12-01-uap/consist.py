"""Data-free consistency distillation: a copy of the model is trained so that its outputs on
synthesised inputs x and on randomly corrupted x (random patch, noise blend, smooth offset,
sinusoid: fresh random draws, never the real trigger) both match the original's on x.

    python consist.py OUT.json FOLDER... [--arms NAME=JSON ...]
"""
from __future__ import annotations
import copy, json, math, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parent))
from uap import CACHE, cli, deepinv, evaluate, fashion_mnist_tensors, fwd, load_folder, parse_trigger
from otbr_hub.verify import synthesize_inputs


def corrupt(x, g, kinds=("patch", "blend", "smooth", "sine")):
    n, c, h, w = x.shape
    out = x.clone()
    kind = torch.randint(0, len(kinds), (n,), generator=g)
    for i in range(n):
        k = kinds[int(kind[i])]
        if k == "patch":
            s = int(torch.randint(2, max(3, h // 6) + 1, (1,), generator=g))
            r, q = int(torch.randint(0, h - s + 1, (1,), generator=g)), int(torch.randint(0, w - s + 1, (1,), generator=g))
            out[i, :, r:r + s, q:q + s] = torch.rand(c, s, s, generator=g).round() if torch.rand(1, generator=g) < 0.5 else torch.rand(c, 1, 1, generator=g)
        elif k == "blend":
            a = 0.3 * float(torch.rand(1, generator=g))
            pat = torch.rand(c, h, w, generator=g)
            out[i] = (1 - a) * x[i] + a * pat
        elif k == "smooth":
            kk = int(torch.randint(2, 6, (1,), generator=g))
            f = F.interpolate(torch.rand(1, c, kk, kk, generator=g) * 2 - 1, size=(h, w), mode="bicubic", align_corners=True)[0]
            out[i] = (x[i] + 0.2 * float(torch.rand(1, generator=g)) * f / f.abs().max()).clamp(0, 1)
        elif k == "sine":
            fr = float(torch.randint(2, 12, (1,), generator=g))
            cols = torch.arange(w, dtype=x.dtype)
            ph = 2 * math.pi * float(torch.rand(1, generator=g))
            sig = 0.2 * float(torch.rand(1, generator=g)) * torch.sin(2 * math.pi * cols * fr / w + ph)
            out[i] = (x[i] + (sig if torch.rand(1, generator=g) < 0.5 else sig[:, None])).clamp(0, 1)
    return out


def train(teacher, spec, bg, *, steps=150, lr=1e-4, batch=64, seed=0, kinds=("patch", "blend", "smooth", "sine"), params=None, w_aug=1.0):
    st = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    named = [(n, p) for n, p in st.named_parameters()]
    train_p = [p for n, p in named if params is None or any(n.startswith(k) for k in params)]
    for n, p in named:
        p.requires_grad_(False)
    for p in train_p:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train_p, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tp = F.softmax(fwd(teacher, spec, bg), -1)
    for _ in range(steps):
        idx = torch.randint(0, len(bg), (batch,), generator=g)
        x, p = bg[idx], tp[idx]
        xa = corrupt(x, g, kinds)
        lc = F.kl_div(F.log_softmax(fwd(st, spec, x), -1), p, reduction="batchmean")
        la = F.kl_div(F.log_softmax(fwd(st, spec, xa), -1), p, reduction="batchmean")
        opt.zero_grad()
        (lc + w_aug * la).backward()
        opt.step()
    for p in teacher.parameters():
        p.requires_grad_(True)
    return st


def main(out, folders, arms):
    rows = []
    for folder in folders:
        meta = json.loads((Path(folder) / "trigger.json").read_text())
        trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
        lm = load_folder(folder)
        model, spec = lm.model.eval(), lm.spec
        data = fashion_mnist_tensors("test", spec, limit=2000)
        before = evaluate(model, spec, data, trig)
        row = {"model": Path(folder).name, "before": [round(before.acc, 1), round(before.asr, 1)], "arms": {}}
        print(f"== {row['model']} before {row['before']}", flush=True)
        bgs = {}
        for name, kw in arms.items():
            kw = dict(kw)
            src = kw.pop("bg", "probe")
            if src not in bgs:
                t0 = time.time()
                if src == "probe":
                    bgs[src] = synthesize_inputs(model, spec, 1024, seed=5)
                else:
                    cp = CACHE / f"{Path(folder).name}-di256.pt"
                    bgs[src] = torch.load(cp) if cp.exists() else deepinv(model, spec, 256)
                print(f"   inputs {src}: {time.time()-t0:.0f} s", flush=True)
            t1 = time.time()
            st = train(model, spec, bgs[src], **kw)
            after = evaluate(st, spec, data, trig)
            row["arms"][name] = {"after": [round(after.acc, 1), round(after.asr, 1)], "s": round(time.time() - t1)}
            print(f"   {name:16s} {after.acc:5.1f} / {after.asr:5.1f}   ({time.time()-t1:.0f} s)", flush=True)
        rows.append(row)
        Path(out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


ARMS = {"probe": {}, "probe-noaug": {"w_aug": 0.0}, "di": {"bg": "di"}}

if __name__ == "__main__":
    cli(main, ARMS)
