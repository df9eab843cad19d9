"""Does the *shape* of the top class's positive evidence tell a dirty-label backdoor from a
clean model trained on imbalanced labels? Prints, per model, the weight-evidence top class
and statistics of how its excess evidence is spread over features."""
from __future__ import annotations
import json, sys
from pathlib import Path
import numpy as np, torch
from otbr_hub.load import load_folder
from otbr_hub.evidence import _classifier, head_norm_bias, mean_features, weight_evidence

torch.set_num_threads(1)
rows = []
for d in sys.argv[1:]:
    meta = json.loads(Path(d, "trigger.json").read_text()) if Path(d, "trigger.json").exists() else {}
    trig = meta.get("trigger") or {}
    group = "imbalanced" if meta.get("imbalance") else ("clean" if not trig else ("clean-label" if meta.get("clean_label") else "dirty"))
    lm = load_folder(d)
    ev = weight_evidence(lm.model, lm.spec)
    if not ev.applicable:
        continue
    head = _classifier(lm.model)
    mf = head_norm_bias(lm.model)
    if mf is None:
        mf = mean_features(lm.model, lm.spec)[0]
    W = head.weight.detach().double().reshape(head.weight.shape[0], -1)
    C = torch.clamp(W * mf.double()[None], min=0).numpy()
    t = ev.top_class
    others = np.delete(C, t, axis=0)
    excess = np.clip(C[t] - np.median(others, 0), 0, None)
    srt = np.sort(excess)[::-1]
    tot = srt.sum()
    n = len(srt)
    top1 = srt[0] / tot; top5p = srt[: max(1, n // 20)].sum() / tot
    # participation ratio of the excess: effective number of features carrying it / n
    pr = (tot ** 2) / (np.square(srt).sum() * n)
    # same concentration stats for every class's own positive evidence, and the top class's z
    share = np.array([np.sort(C[c])[::-1][: max(1, n // 20)].sum() / max(C[c].sum(), 1e-12) for c in range(len(C))])
    zsh = (share[t] - np.delete(share, t).mean()) / np.delete(share, t).std(ddof=1)
    bias = getattr(head, "bias", None)
    b = bias.detach().double().numpy() if bias is not None else np.zeros(len(C))
    zb = (b[t] - np.delete(b, t).mean()) / np.delete(b, t).std(ddof=1)
    r = dict(model=Path(d).name, group=group, target=trig.get("target"), over=(meta.get("imbalance") or {}).get("class"),
             top=t, z=round(ev.z or 0, 2), p=ev.p_value, top1=round(top1, 3), top5p=round(top5p, 3), pr=round(pr, 3),
             z_share=round(zsh, 2), z_bias=round(zb, 2))
    rows.append(r)
    print(f"{r['model']:36s} {group:11s} tgt={r['target']} over={r['over']} top={t} z={r['z']:5.2f} p={ev.p_value:.4f} top1={r['top1']:.3f} top5%={r['top5p']:.3f} pr={r['pr']:.3f} z_share={r['z_share']:5.2f} z_bias={r['z_bias']:5.2f}", flush=True)
Path("benchmarks/experiments/2026-12-01-feature-space/logs/conc.json").write_text(json.dumps(rows, indent=1))
