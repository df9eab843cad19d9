"""Default scan verdicts before and after capping weights-only findings at 'suspicious',
from the stored margins_dump.py output. Usage: python verdicts.py logs/margins.json [--sd]
(--sd: recompute the margin p-value from the stored margins with the mean/sd outlier test)"""
import json, sys
import numpy as np
A_B, A_S = 0.01, 0.05
rows = json.load(open(sys.argv[1]))
if "--sd" in sys.argv:
    from otbr_hub.detect import gamma_p_value, outlier_p_value
    for r in rows:
        v = {c: m for c, m in enumerate(r["margins"]) if m is not None}
        top = max(v, key=v.get)
        null = np.array([m for c, m in v.items() if c != top and m > 0])
        r["p_margin"] = max(gamma_p_value(v[top], null, 10), outlier_p_value(v[top], null, 10, 0.1)[0])
        r["margin_top"] = top

def union(r):
    pm, pw = r["p_margin"], r["w_p"]
    if pw is None:
        return pm, r["margin_top"], "margins", pm
    if pm <= pw:
        return min(1, 2 * pm), r["margin_top"], "margins", min(1, 2 * pm)
    return min(1, 2 * pw), r["w_top"], "weights", min(1, 2 * pm)

def old(r):
    p, t, by, _ = union(r)
    return ("backdoored" if p < A_B else "suspicious" if p < A_S else "clean"), t

def new(r):
    p, t, by, pm2 = union(r)
    if pm2 < A_B:
        return "backdoored", r["margin_top"]
    return ("suspicious" if p < A_S else "clean"), (t if p < A_S else None)

groups = {}
for r in rows:
    groups.setdefault(r["group"], []).append(r)
print("| group | models | rule | backdoored | suspicious | right target among flagged |")
print("|---|---|---|---|---|---|")
for g in ("dirty", "clean-label", "clean", "imbalanced"):
    rs = groups.get(g, [])
    for name, rule in (("before (union)", old), ("after (weights capped)", new)):
        v = [rule(r) for r in rs]
        b = sum(x[0] == "backdoored" for x in v); s = sum(x[0] == "suspicious" for x in v)
        right = sum(x[0] != "clean" and r["target"] is not None and x[1] == r["target"] for x, r in zip(v, rs))
        print(f"| {g} | {len(rs)} | {name} | {b} | {s} | {right if g in ('dirty', 'clean-label') else '-'} |")
print()
for r in sorted(groups["imbalanced"], key=lambda r: r["model"]):
    print(f"| {r['model']} | {r['over']} | {r['w_top']} | {r['w_p']:.4f} | {r['margin_top']} | {r['p_margin']:.3f} | {old(r)[0]} | {new(r)[0]} |")
