"""FT-SAM (Zhu et al. 2023: fine-tuning with adaptive sharpness-aware minimisation removes
backdoors) with DeepInversion images instead of clean data: the student is fine-tuned towards
the original's predictions on the synthesised images under ASAM. One-off experiment;
usage: ftsam.py OUT.json NAME [NAME ...]; env RHO, LR, STEPS, LOSS (kl|ce), BN (eval|train), OPT (adam|sgd)."""
import os, sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from rnp import *  # noqa: F401,F403  (di_images, M, fwd, torch, F, copy, json, time, Path)


def augment(x, g):
    """Random shifts of up to 3 pixels and horizontal flips (Fashion-MNIST is flip-symmetric enough)."""
    n, c, h, w = x.shape
    pad = F.pad(x, (3, 3, 3, 3))
    dx, dy = torch.randint(0, 7, (2,), generator=g).tolist()
    out = pad[..., dy:dy + h, dx:dx + w]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def ftsam(model, spec, x, rho=2.0, eta=0.01, lr=0.01, steps=300, batch=64, loss_kind="kl", bn="eval", seed=0):
    st = copy.deepcopy(model)
    teacher = model.eval()
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if os.environ.get("OPT", "adam") == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = augment(x[idx], g)
        with torch.no_grad():
            tl = fwd(teacher, spec, xb)
        st.train(bn == "train")

        def loss_fn():
            out = fwd(st, spec, xb)
            if loss_kind == "ce":
                return F.cross_entropy(out, tl.argmax(-1))
            return F.kl_div(F.log_softmax(out, -1), F.softmax(tl, -1), reduction="batchmean")

        loss = loss_fn()
        opt.zero_grad(); loss.backward()
        if rho > 0:
            with torch.no_grad():
                scaled = [(p.abs() + eta) * p.grad for p in params if p.grad is not None]
                norm = torch.norm(torch.stack([s.norm() for s in scaled])) + 1e-12
                eps = []
                for p in params:
                    if p.grad is None:
                        eps.append(None); continue
                    e = rho * (p.abs() + eta) ** 2 * p.grad / norm
                    p.add_(e); eps.append(e)
            opt.zero_grad(); loss_fn().backward()
            with torch.no_grad():
                for p, e in zip(params, eps):
                    if e is not None: p.sub_(e)
        opt.step()
    return st.eval()


def main(out, names):
    rows = json.loads(Path(out).read_text()) if Path(out).exists() else {}
    cfg = dict(rho=float(os.environ.get("RHO", 2.0)), lr=float(os.environ.get("LR", 0.01)),
               steps=int(os.environ.get("STEPS", 300)), loss_kind=os.environ.get("LOSS", "kl"), bn=os.environ.get("BN", "eval"))
    tag = ",".join(f"{k}={v}" for k, v in cfg.items()) + f",opt={os.environ.get('OPT', 'adam')}"
    for name in names:
        t0 = time.time()
        m = M(name, n=2000)
        x = di_images(m)
        st = ftsam(m.model, m.spec, x, **cfg)
        r = {"before": m.before, "after": m.ev(st), "t": round(time.time() - t0, 1)}
        print(name, tag, json.dumps(r), flush=True)
        rows.setdefault(name, {})[tag] = r
        Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2:])
