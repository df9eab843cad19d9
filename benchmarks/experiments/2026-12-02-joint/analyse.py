"""Joint per-class test of the margins and the weight evidence, from collect.py's JSON.

For every class c: z_m(c), its log-margin against the mean and sd of the other classes'
(floored at 0.1, as the margin test), and z_w(c), the same for its log positive evidence
(floor 0.02, as the weight test). T = max_c z_m(c) + z_w(c). Null: both vectors i.i.d.
Gaussian and independent, by seeded Monte Carlo. A backdoor that both tests point at, each
too weakly to be significant alone, should stand out; a clean model's easy class (margins)
and its most common class (weights) need not be the same class.
Usage: analyse.py COLLECTED.json"""
import functools, json, math, sys

import numpy as np


def loo_z(x, floor):
    """Leave-one-out z of every entry against the others' mean and sd (rows of x)."""
    k = x.shape[-1]
    s, ss = x.sum(-1, keepdims=True), (x ** 2).sum(-1, keepdims=True)
    mean_o = (s - x) / (k - 1)
    var_o = np.clip((ss - x ** 2 - (k - 1) * mean_o ** 2) / (k - 2), 0, None)
    return (x - mean_o) / np.maximum(np.sqrt(var_o), floor)


@functools.lru_cache(maxsize=32)
def joint_null(k, draws=20000, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((draws, k)), rng.standard_normal((draws, k))
    # under the null the scale is free; the floors are relative to the data's scale, so the
    # null uses no floor (a floor only lowers an observed z: conservative)
    return np.sort((loo_z(a, 0.0) + loo_z(b, 0.0)).max(-1))


def joint_p(margins, weights, floor_m=0.1, floor_w=0.02):
    classes = [c for c in range(len(weights)) if margins.get(c, 0) > 0 and weights[c] > 0]
    if len(classes) < 4:
        return 1.0, None, None
    lm = np.log([margins[c] for c in classes])
    lw = np.log([weights[c] for c in classes])
    t = loo_z(lm, floor_m) + loo_z(lw, floor_w)
    i = int(np.argmax(t))
    null = joint_null(len(classes))
    p = (1 + len(null) - np.searchsorted(null, t[i], side="left")) / (len(null) + 1)
    return float(p), classes[i], float(t[i])


def main(path):
    rows = json.load(open(path))
    groups = {}
    for r in rows:
        if r["weights"] is None:
            continue
        pj, cj, tj = joint_p(r["margins"] if isinstance(next(iter(r["margins"])), int) else {int(k): v for k, v in r["margins"].items()}, r["weights"])
        r["p_joint"], r["joint_top"], r["joint_t"] = pj, cj, tj
        g = "clean" if r["target"] is None and not r["imbalance"] else "imbalanced" if r["target"] is None else \
            ("sig" if r["model"].split("-")[1] == "sig" else "dirty")
        r["group"] = g
        groups.setdefault(g, []).append(r)
    rules = {
        "current (2 min(p_m, p_w))": lambda r: min(1, 2 * min(r["p_margins"], r["weights_p"])),
        "joint alone": lambda r: r["p_joint"],
        "3 min(p_m, p_w, p_j)": lambda r: min(1, 3 * min(r["p_margins"], r["weights_p"], r["p_joint"])),
        "2 min(p_w, p_j)": lambda r: min(1, 2 * min(r["weights_p"], r["p_joint"])),
    }
    for name, rule in rules.items():
        line = [name.ljust(28)]
        for g in ("dirty", "sig", "clean", "imbalanced"):
            rs = groups.get(g, [])
            flagged = [r for r in rs if rule(r) < 0.05 or r["p_margins"] < 0.01]
            line.append(f"{g} {len(flagged)}/{len(rs)}")
        print("  ".join(line))
    print()
    for g in ("dirty", "sig", "clean", "imbalanced"):
        for r in sorted(groups.get(g, []), key=lambda r: r["model"]):
            print(f"{g:<10} {r['model']:<36} t={r['target']} p_m={r['p_margins']:.3f}({r['margin_top']}) "
                  f"p_w={r['weights_p']:.3f}({r['weights_top']}) p_j={r['p_joint']:.4f}({r['joint_top']})")


if __name__ == "__main__":
    main(sys.argv[1])
