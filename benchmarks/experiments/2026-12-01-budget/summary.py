"""Summarise budget.json: per arm, mean ACC / ASR and mean absolute difference from ref."""
import json, sys
import numpy as np
rows = json.load(open(sys.argv[1]))
arms = list(rows[0]["arms"])
print("| arm | budget | cost | mean ACC | mean ASR (backdoored) | mean abs dACC vs ref | mean abs dASR vs ref | max abs dASR |")
print("|---|---|---|---|---|---|---|---|")
budget = {"ref": "20 x 256, seed 0", "ref1": "20 x 256, seed 1", "b128": "20 x 128, seed 1", "s10": "10 x 256, seed 1", "s5": "5 x 256, seed 1"}
cost = {"ref": "1", "ref1": "1", "b128": "1/2", "s10": "1/2", "s5": "1/4"}
for a in arms:
    acc = np.array([r["arms"][a]["acc"] for r in rows])
    ref_acc = np.array([r["arms"]["ref"]["acc"] for r in rows])
    bd = [r for r in rows if r["arms"][a]["asr"] is not None and r["before"][1] is not None]
    asr = np.array([r["arms"][a]["asr"] for r in bd]); ref_asr = np.array([r["arms"]["ref"]["asr"] for r in bd])
    print(f"| {a} | {budget[a]} | {cost[a]} | {acc.mean():.1f} | {asr.mean():.1f} | {np.abs(acc - ref_acc).mean():.2f} | {np.abs(asr - ref_asr).mean():.2f} | {np.abs(asr - ref_asr).max():.1f} |")
