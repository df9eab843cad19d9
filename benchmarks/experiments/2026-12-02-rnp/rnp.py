"""RNP (reconstructive neuron pruning, Li et al. 2023) with DeepInversion images instead of
clean data: unlearn the model on the synthesised images (gradient ascent), learn per-channel
BatchNorm masks that recover it on the same images, prune the original's channels with the
smallest masks. One-off experiment; usage: rnp.py OUT.json NAME [NAME ...] (zoo names).
Env: RTRAIN (1: recover masks in train mode, as RNP; 0: eval mode), RLR (mask lr, 0.2), ULR
(unlearning lr, 0.01), LAYERS (comma-separated BatchNorm name prefixes that may be pruned),
EXCLUDE (regex of BatchNorm names never pruned). logs/sink-and-prune.json: RTRAIN=0 RLR=0.05."""
import os, sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "2026-12-01-generalise"))
from di_lib import *  # noqa: F401,F403  (M, fwd, deepinv, torch, F, nn, copy, json, time, Path)

DI_CACHE = Path("/tmp/exp")


def di_images(m, n=256, seed=0):
    DI_CACHE.mkdir(exist_ok=True)
    f = DI_CACHE / f"di_{m.name}_{n}_{seed}.pt"
    if f.exists():
        return torch.load(f)
    x = deepinv(copy.deepcopy(m.model), m.spec, n, seed=seed)
    torch.save(x, f)
    return x


def bns(model):
    return [(n, b) for n, b in model.named_modules() if isinstance(b, nn.BatchNorm2d)]


def acc_on(model, spec, x, y):
    with torch.no_grad():
        return float((fwd(model.eval(), spec, x).argmax(-1) == y).float().mean())


def unlearn_on(model, spec, x, y, lr=0.01, max_epochs=20, stop=0.2, batch=128, seed=0):
    u = copy.deepcopy(model)
    opt = torch.optim.SGD(u.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for ep in range(max_epochs):
        u.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = -F.cross_entropy(fwd(u, spec, x[idx]), y[idx])
            opt.zero_grad(); loss.backward()
            torch.nn.utils.clip_grad_norm_(u.parameters(), 20)
            opt.step()
        a = acc_on(u, spec, x, y)
        if a <= stop:
            return u, ep + 1, a
    return u, max_epochs, a


def recover_masks(u, spec, x, y, lr=0.2, epochs=20, batch=128, seed=0, train_mode=True):
    u = copy.deepcopy(u)
    for p in u.parameters(): p.requires_grad_(False)
    layers = bns(u)
    masks = [torch.ones(b.num_features, requires_grad=True) for _, b in layers]
    hooks = [b.register_forward_hook(lambda mod, inp, out, mk=mk: out * mk[None, :, None, None])
             for (_, b), mk in zip(layers, masks)]
    opt = torch.optim.SGD(masks, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        u.train(train_mode)
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(fwd(u, spec, x[idx]), y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
            with torch.no_grad():
                for mk in masks: mk.clamp_(0, 1)
    for h in hooks: h.remove()
    return {n: mk.detach().clone() for (n, _), mk in zip(layers, masks)}


def prune_bn(model, masks, names_idx):
    p = copy.deepcopy(model)
    mods = dict(p.named_modules())
    with torch.no_grad():
        for n, i in names_idx:
            mods[n].weight[i] = 0; mods[n].bias[i] = 0
    return p


def main(out, names):
    rows = json.loads(Path(out).read_text()) if Path(out).exists() else {}
    for name in names:
        t0 = time.time()
        m = M(name, n=2000)
        x = di_images(m)
        with torch.no_grad():
            y = fwd(m.model, m.spec, x).argmax(-1)
        t_di = time.time() - t0
        u, eps, a = unlearn_on(m.model, m.spec, x, y, lr=float(os.environ.get('ULR', 0.01)))
        with torch.no_grad():
            sink = torch.bincount(fwd(u.eval(), m.spec, x).argmax(-1), minlength=m.spec.num_classes).tolist()

        masks = recover_masks(u, m.spec, x, y, lr=float(os.environ.get('RLR', 0.2)), train_mode=os.environ.get('RTRAIN', '1') == '1')
        flat = [(float(v), n, i) for n, mk in masks.items() for i, v in enumerate(mk.tolist())]
        keep = os.environ.get("LAYERS", "")  # comma-separated prefixes of BN names to prune (default: all but the stem)
        skip = {n for n in masks if n == "bn1" or (keep and not any(n.startswith(k) for k in keep.split(","))) or (os.environ.get("EXCLUDE") and __import__("re").search(os.environ["EXCLUDE"], n))}
        flat_ns = sorted(v for v in flat if v[1] not in skip)
        r = {"before": m.before, "unlearn_epochs": eps, "unlearn_acc": a, "sink": sink,
             "target": None if m.clean else m.trigger.target, "n_channels": len(flat),
             "below_0.2": sum(v[0] < 0.2 for v in flat), "t_di": round(t_di, 1), "low2pct_layers": sorted({n for v, n, i in sorted(v for v in flat if v[1] not in {"bn1"})[:16]})}
        ev = m.ev(m.model.eval())
        for thr in (0.2, 0.5):
            sel = [(n, i) for v, n, i in flat_ns if v < thr]
            r[f"thr{thr}"] = (len(sel),) + m.ev(prune_bn(m.model, masks, sel).eval())
        for frac in (0.01, 0.02, 0.05, 0.1):
            k = int(round(frac * len(flat_ns)))
            sel = [(n, i) for v, n, i in flat_ns[:k]]
            r[f"frac{frac}"] = m.ev(prune_bn(m.model, masks, sel).eval())
        r["t"] = round(time.time() - t0, 1)
        print(name, json.dumps(r), flush=True)
        rows[name] = r
        Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2:])
