"""Where do random inputs land? Share of uniform noise, smooth noise and 50/50 blends of noise
with synthesised probes that each model puts in each class."""
import sys, json, torch
from pathlib import Path
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parent))
from uap import *
from otbr_hub.verify import synthesize_inputs
g = torch.Generator().manual_seed(0)
for folder in sys.argv[1:]:
    meta = json.loads((Path(folder) / "trigger.json").read_text())
    t = (meta.get("trigger") or {}).get("target", "-")
    lm = load_folder(folder); model, spec = lm.model.eval(), lm.spec
    n = 512
    u = torch.rand(n, spec.channels, spec.height, spec.width, generator=g)
    low = torch.rand(n, spec.channels, spec.height // 4, spec.width // 4, generator=g)
    s = F.interpolate(low, size=(spec.height, spec.width), mode="bilinear")
    probes = synthesize_inputs(model, spec, n, seed=3)
    out = []
    with torch.no_grad():
        for name, xs in (("uniform", u), ("smooth", s), ("probe+0.2u", 0.8 * probes + 0.2 * u), ("probe", probes)):
            h = fwd(model, spec, xs).argmax(-1).bincount(minlength=spec.num_classes).float() / n
            top = int(h.argmax())
            out.append(f"{name} {top}:{h[top]:.2f}")
    print(f"{Path(folder).name:34s} t={t}  " + "  ".join(out), flush=True)
