import json, sys, collections
rows = [r for f in sys.argv[2:] for r in json.load(open(f))]
ratio = float(sys.argv[1])
per = collections.defaultdict(dict)
for r in rows:
    if r["ratio"] != ratio or r["clean"]: continue
    d = (max(0, r["before"][1] - r["asr"]) - max(0, r["before"][0] - r["acc"]) + 100) / 2
    per[r["model"]][r["variant"]] = round(d, 1)
vs = ["F0", "P1", "U1"]
print("model", vs)
for m, d in sorted(per.items()): print(m, [d.get(v) for v in vs])
for v in vs: print(v, "mean DER", round(sum(d[v] for d in per.values()) / len(per), 1))
