"""Compare outlier statistics on stored margins (margins_dump.py output): the default
(max of Gamma and median/MAD p) against mean/sd variants with the same Monte Carlo null.
Usage: python margin_stats.py logs/margins.json"""
from __future__ import annotations
import json, math, sys
import numpy as np
from otbr_hub.evidence import max_outlier_p_value
from otbr_hub.detect import gamma_p_value

rows = json.load(open(sys.argv[1]))
FLOOR = 0.1


def p_sd(m, trim=0):
    v = np.array([x for x in m if x is not None and x > 0])
    top = int(np.argmax(v)); rest = np.log(np.delete(v, top))
    if trim:
        rest = np.sort(rest)[:-trim]  # drop the next largest too (a second natural outlier)
    z = (math.log(v[top]) - rest.mean()) / max(rest.std(ddof=1), FLOOR)
    return max_outlier_p_value(z, len(v)) if not trim else None, z


def p_gamma(m):
    v = np.array([x for x in m if x is not None and x > 0])
    top = int(np.argmax(v))
    return gamma_p_value(float(v[top]), np.delete(v, top), len(v))

groups = {}
for r in rows:
    m = r["margins"]
    ps, z = p_sd(m)
    pg = p_gamma(m)
    r["p_sd"] = ps; r["z_sd"] = z; r["p_sd_gamma"] = max(ps, pg)
    groups.setdefault(r["group"], []).append(r)
for g, rs in sorted(groups.items()):
    for key in ("p_margin", "p_sd", "p_sd_gamma"):
        b = sum(r[key] < 0.005 for r in rs); s = sum(r[key] < 0.025 for r in rs)
        right = sum(r[key] < 0.025 and r["margin_top"] == r["target"] for r in rs)
        print(f"{g:11s} n={len(rs):2d} {key:10s} p<0.005: {b:2d}  p<0.025: {s:2d}  right target among those: {right}")
print()
for r in sorted(rows, key=lambda r: r["p_sd"]):
    if r["p_sd"] < 0.1 or r["p_margin"] < 0.1:
        print(f"{r['model']:36s} {r['group']:11s} tgt={r['target']} top={r['margin_top']} p_default={r['p_margin']:.4f} p_sd={r['p_sd']:.4f} z_sd={r['z_sd']:.2f} p_sd_gamma={r['p_sd_gamma']:.4f}")
