import json, sys, collections
excl = sys.argv[1]
rows = [r for f in sys.argv[2:] for r in json.load(open(f)) if not (excl and excl in r["model"])]
print(len({r['model'] for r in rows}), "models", sorted({r['model'] for r in rows}))
by = collections.defaultdict(list)
for r in rows: by[(r["variant"], r["ratio"])].append(r)
for v in ["F0", "F1", "P0", "P1", "U1"]:
    cells = []
    for ratio in [0.01, 0.02, 0.05, 0.1]:
        rs = by[(v, ratio)]
        bd = [r for r in rs if not r["clean"]]; cl = [r for r in rs if r["clean"]]
        f = lambda xs: sum(xs) / max(1, len(xs))
        cells.append(f"{f([r['asr'] for r in bd]):.1f}; {f([r['before'][0]-r['acc'] for r in bd]):.1f} / {f([r['before'][0]-r['acc'] for r in cl]):.1f} ({max([r['before'][0]-r['acc'] for r in cl]):.1f})")
    print(f"| {v} | " + " | ".join(cells) + " |")
