"""Table of detect.json: per budget, margin verdicts on backdoored / clean 100-class models."""
import json
import sys
from pathlib import Path

rows = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("detect.json")).read_text())
budgets = [b for b in ("full", "screen-noev", "screen", "ev-32", "ev-16", "ev-16-2x50", "random-16", "default")
           if any(b in r["budgets"] for r in rows)]
print("| model | target | evidence top (p) | " + " | ".join(budgets) + " |")
print("|---|---|---|" + "---|" * len(budgets))
for r in sorted(rows, key=lambda r: (r["target"] is None, r["model"])):
    e = r["evidence"]
    cells = []
    for b in budgets:
        v = r["budgets"].get(b)
        cells.append("-" if v is None else f"{v['verdict']} ({v['top']}, p {v['p']:.2g}; {v['with_weights']}) {v['passes']}")
    print(f"| {r['model']} | {r['target']} | {e['top']} ({e['p']:.2g}) | " + " | ".join(cells) + " |")
print()
for b in budgets:
    bd = [r for r in rows if r["target"] is not None and b in r["budgets"]]
    cl = [r for r in rows if r["target"] is None and b in r["budgets"]]
    def n(rs, v): return sum(r["budgets"][b]["verdict"] == v for r in rs)
    def w(rs, v): return sum(r["budgets"][b]["with_weights"] == v for r in rs)
    right = sum(r["budgets"][b]["top"] == r["target"] for r in bd)
    print(f"{b:12s} backdoored models: margins backdoored {n(bd, 'backdoored')}, suspicious {n(bd, 'suspicious')} of {len(bd)}, "
          f"top = target {right}; with weights backdoored {w(bd, 'backdoored')}, suspicious {w(bd, 'suspicious')} | "
          f"clean: margins flagged {len(cl) - n(cl, 'clean')} of {len(cl)}, with weights {len(cl) - w(cl, 'clean')}")
