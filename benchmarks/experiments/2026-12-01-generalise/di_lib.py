import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from lib import *
def deepinv(model, spec, n, steps=200, lr=0.1, bn_w=1.0, tv_w=1e-3, seed=0):
    model.eval()
    for p in model.parameters(): p.requires_grad_(False)
    bns = [mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    losses = []
    def hook(mod, inp, out):
        x = inp[0]; mu = x.mean((0, 2, 3)); var = x.var((0, 2, 3), unbiased=False)
        losses.append(((mu - mod.running_mean) ** 2).sum().sqrt() + ((var - mod.running_var) ** 2).sum().sqrt())
    hs = [b.register_forward_hook(hook) for b in bns]
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, spec.channels, spec.height // 4, spec.width // 4, generator=g)
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
        opt.zero_grad(); loss.backward(); opt.step()
    for h in hs: h.remove()
    for p in model.parameters(): p.requires_grad_(True)
    return torch.sigmoid(z).detach()
def distill(teacher, spec, bg, trig_fns, steps=150, lr=1e-4, batch=64, seed=0):
    st = copy.deepcopy(teacher).eval()
    for p in teacher.parameters(): p.requires_grad_(False)
    opt = torch.optim.Adam(st.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(): tp = F.softmax(fwd(teacher, spec, bg), -1)
    for step in range(steps):
        idx = torch.randint(0, len(bg), (batch,), generator=g)
        x, p = bg[idx], tp[idx]
        lc = F.kl_div(F.log_softmax(fwd(st, spec, x), -1), p, reduction="batchmean")
        loss = lc
        if trig_fns:
            xt = trig_fns[0](x)
            loss = loss + F.kl_div(F.log_softmax(fwd(st, spec, xt), -1), p, reduction="batchmean")
        opt.zero_grad(); loss.backward(); opt.step()
    for p in teacher.parameters(): p.requires_grad_(True)
    return st
