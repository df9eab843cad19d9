import copy, json, sys, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from torch import nn
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from otbr_hub.load import load_folder, forward_logits
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.evaluate import evaluate
from otbr_hub.triggers import Trigger
from otbr_hub.settings import preset
from otbr_hub.layers import select_layers
from otbr_hub.unlearn import unlearn
from otbr_hub.score import neuron_weight_change, Scores
from otbr_hub.prune import prune
from otbr_hub.fuse import fuse
from otbr_hub.verify import synthesize_inputs, agreement
from otbr_hub.detect import _initial_patterns

CACHE = Path(__file__).resolve().parents[2] / "cache"
def folder(name):
    if name == "example": return Path(__file__).resolve().parents[3] / "examples" / "badnets-resnet"
    return CACHE / name

class M:
    def __init__(self, name, n=1000):
        self.name = name
        f = folder(name)
        self.meta = json.loads((f / "trigger.json").read_text())
        self.lm = load_folder(f)
        self.model = self.lm.model.eval()
        self.spec = self.lm.spec
        self.data = fashion_mnist_tensors("test", self.spec, limit=n)
        t = self.meta.get("trigger") or self.meta.get("eval_trigger")
        self.trigger = Trigger.from_dict(t) if isinstance(t, dict) else Trigger.from_dict({"name": "badnets", "target": 0, "params": {}})
        self.clean = not isinstance(t, dict)
        self.before = self.ev(self.model)
    def ev(self, m):
        r = evaluate(m, self.spec, self.data, self.trigger)
        return (round(r.acc, 1), round(r.asr, 1))

def fwd(model, spec, x):
    return forward_logits(model, spec.normalize(x)).float()

def trigger_search(model, spec, bg, classes=None, steps=120, lr=0.1, flip=0.9, seed=0):
    """Returns dict class -> (size, mask[1,H,W], pattern[C,H,W]) of the smallest flipping trigger."""
    model.eval()
    for p in model.parameters(): p.requires_grad_(False)
    c, h, w = spec.channels, spec.height, spec.width
    area = float(h * w)
    K = spec.num_classes
    classes = list(range(K)) if classes is None else classes
    n_bg = len(bg)
    with torch.no_grad():
        own = fwd(model, spec, bg).argmax(-1)
    k = len(classes)
    t = torch.tensor(classes)
    valid = (own[None, :] != t[:, None]).float(); n_valid = valid.sum(1)
    a = torch.full((k, 1, h, w), -3.0, requires_grad=True)
    p0 = _initial_patterns(classes, (c, h, w), seed, 1).clamp(0.01, 0.99)
    b = torch.logit(p0).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    lam = torch.full((k,), 1e-2)
    best = torch.full((k,), float("inf"))
    bm = torch.sigmoid(a).detach().clone(); bp = torch.sigmoid(b).detach().clone()
    for _ in range(steps):
        m, pat = torch.sigmoid(a), torch.sigmoid(b)
        x = (1 - m[:, None]) * bg[None] + (m * pat)[:, None]
        logits = fwd(model, spec, x.reshape(k * n_bg, c, h, w))
        ce = F.cross_entropy(logits, t.repeat_interleave(n_bg), reduction="none").view(k, n_bg)
        ce = (ce * valid).sum(1) / n_valid.clamp_min(1)
        hits = (logits.argmax(-1).view(k, n_bg) == t[:, None]).float()
        rate = (hits * valid).sum(1) / n_valid.clamp_min(1)
        size = m.flatten(1).sum(1)
        ok = rate >= flip
        better = ok & (size.detach() < best)
        best = torch.where(better, size.detach(), best)
        bm[better] = m.detach()[better]; bp[better] = pat.detach()[better]
        g = torch.autograd.grad((ce + lam * size / area).sum(), [a, b])
        a.grad, b.grad = g
        opt.step()
        lam = torch.where(ok, lam * 1.2, lam / 1.2)
    for p in model.parameters(): p.requires_grad_(True)
    return {cls: (float(best[i]), bm[i], bp[i]) for i, cls in enumerate(classes)}

def apply_trig(x, mask, pat):
    return (1 - mask[None]) * x + (mask * pat)[None]

def flip_rate(model, spec, x, mask, pat, t):
    with torch.no_grad():
        own = fwd(model, spec, x).argmax(-1)
        pr = fwd(model, spec, apply_trig(x, mask, pat)).argmax(-1)
    keep = own != t
    return float((pr[keep] == t).float().mean()) if keep.any() else 0.0

def layer_acts(model, layers, spec, x):
    """Per-layer per-channel activations (mean over positions), shape [N, C]."""
    mods = dict(model.named_modules())
    out = {}
    hooks = []
    for L in layers:
        tgt = mods[L.norm_name] if L.norm_name else mods[L.name]
        def hook(mod, inp, o, name=L.name, kind=L.kind):
            if o.dim() == 4 and kind == "conv":
                out[name] = o.mean((2, 3)).detach()
            elif o.dim() == 4:  # NHWC linear
                out[name] = o.mean((1, 2)).detach()
            elif o.dim() == 3:
                out[name] = o.mean(1).detach()
            else:
                out[name] = o.detach()
        hooks.append(tgt.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        fwd(model, spec, x)
    for h in hooks: h.remove()
    return out

def act_scores(model, layers, spec, xc, xt, mode="z"):
    ac = layer_acts(model, layers, spec, xc)
    at = layer_acts(model, layers, spec, xt)
    rank = {}
    for L in layers:
        d = (at[L.name] - ac[L.name]).mean(0).double()
        if mode == "z":     # z-score within layer
            r = (d - d.mean()) / (d.std() + 1e-12)
        elif mode == "sel":  # per-channel standardised difference
            r = d / (ac[L.name].double().std(0) + ac[L.name].double().abs().mean(0) * 0.1 + 1e-6)
        elif mode == "abs_z":
            r = (d.abs() - d.abs().mean()) / (d.abs().std() + 1e-12)
        rank[L.name] = r
    return rank

def settings_default(**kw):
    return preset("default", **kw)

def random_nwc(model, spec, layers, s):
    un = unlearn(model, spec, s)
    return neuron_weight_change(model, un.model, layers, s)

def build(model, layers, nwc_scores, rank, ratio, lam=None, s=None):
    sc = Scores(nwc=nwc_scores.nwc, rank=rank, ranking="custom")
    pr = prune(model, layers, sc, ratio, silence_norm=True)
    out = {"pruned": pr.model}
    if lam is not None:
        out["fused"] = fuse(model, pr.model, layers, nwc_scores.nwc, pr.pruned, lam, fuse_attached=True).model
    return out, pr
