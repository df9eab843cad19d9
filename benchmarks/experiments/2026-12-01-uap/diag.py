import sys, torch, json
from pathlib import Path
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parent))
from uap import *
folder = sys.argv[1]
meta = json.loads((Path(folder) / "trigger.json").read_text())
trig = parse_trigger(meta.get("trigger") or meta.get("eval_trigger") or "badnets:target=0")
lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
x, y = fashion_mnist_tensors("test", spec, limit=512)
bg = torch.load(CACHE / f"{Path(folder).name}-di256.pt")
with torch.no_grad():
    pb = F.softmax(fwd(model, spec, bg), -1); px = F.softmax(fwd(model, spec, x), -1)
    print("teacher conf DI", pb.max(-1).values.mean().item(), "real", px.max(-1).values.mean().item())
    print("DI acc to assigned", (pb.argmax(-1) == torch.arange(256) % 10).float().mean().item())
    for name, xs in (("DI", bg), ("real", x)):
        pt = fwd(model, spec, trig.apply(xs)).argmax(-1)
        print(name, "trigger -> target", (pt == trig.target).float().mean().item())
for p in model.parameters(): p.requires_grad_(False)
for rms in (0.02, 0.05, 0.1):
    for src_name, src in (("DI", bg), ("real", x)):
        ty = fwd(model, spec, src).argmax(-1).detach()
        radius = rms * src[0].numel() ** 0.5
        d = torch.zeros_like(src[0]).requires_grad_(True)
        for _ in range(30):
            loss = F.cross_entropy(fwd(model, spec, (src + d).clamp(0, 1)), ty)
            gd, = torch.autograd.grad(loss, d)
            with torch.no_grad():
                d += radius / 4 * gd / gd.norm(); d.copy_(project(d, radius))
        with torch.no_grad():
            fd = (fwd(model, spec, (bg + d).clamp(0, 1)).argmax(-1) != fwd(model, spec, bg).argmax(-1)).float().mean().item()
            fr = (fwd(model, spec, (x + d).clamp(0, 1)).argmax(-1) != fwd(model, spec, x).argmax(-1)).float().mean().item()
            top = fwd(model, spec, (x + d).clamp(0, 1)).argmax(-1).bincount(minlength=10).argmax().item()
        print(f"rms {rms} UAP from {src_name}: flips DI {fd:.2f} real {fr:.2f}, top class on real {top}")
