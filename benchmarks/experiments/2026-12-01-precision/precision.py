"""Does bfloat16 autocast in the gradient passes change what repair and scan decide?

For each model, three arms: fp32 seed 0 (reference), bf16 seed 0 (same noise and starting
images: only the arithmetic differs) and fp32 seed 1 (other noise: the seed floor that any
change has to be compared with). Measured per arm:
  * NWC ranking (random unlearning at the defaults): Spearman and top-5 % overlap vs the reference;
  * fixed-ratio repair (0.05, defaults otherwise): ACC / ASR on the first 2,000 test images;
  * margin search (weight evidence off): top class, verdict, p, Spearman of the per-class
    log-margins vs the reference.
Usage: python precision.py OUT.json MODEL_DIR...
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from otbr_hub import repair
from otbr_hub.data import fashion_mnist_tensors
from otbr_hub.detect import DetectSettings, decide, max_margin
from otbr_hub.evaluate import evaluate
from otbr_hub.layers import select_layers
from otbr_hub.load import load_folder
from otbr_hub.score import neuron_weight_change
from otbr_hub.settings import preset
from otbr_hub.triggers import Trigger
from otbr_hub.unlearn import unlearn

ARMS = {"fp32": ("fp32", 0), "bf16": ("bf16", 0), "fp32-seed1": ("fp32", 1)}
RATIO, LIMIT = 0.05, 2000


def ranking(lm, precision: str, seed: int) -> torch.Tensor:
    s = preset("default", precision=precision, seed=seed)
    layers = select_layers(lm.model, s)
    un = unlearn(lm.model, lm.spec, s)
    sc = neuron_weight_change(lm.model, un.model, layers, s)
    return torch.cat([sc.rank[layer.name] for layer in layers])


def main() -> None:
    out = Path(sys.argv[1])
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {r["model"] for r in rows}
    for d in sys.argv[2:]:
        name = Path(d).name
        if name in done:
            continue
        meta = json.loads(Path(d, "trigger.json").read_text())
        trig = Trigger.from_dict(meta["trigger"]) if meta.get("trigger") else None
        lm = load_folder(d)
        data = fashion_mnist_tensors("test", lm.spec, limit=LIMIT, seed=0)
        before = evaluate(lm.model, lm.spec, data, trig)
        row = {"model": name, "attack": meta.get("attack"), "before": [before.acc, before.asr], "arms": {}}
        ranks, logm = {}, {}
        for arm, (precision, seed) in ARMS.items():
            t = time.perf_counter()
            ranks[arm] = ranking(lm, precision, seed)
            t_rank = time.perf_counter() - t
            res = repair(lm, prune_ratio=RATIO, precision=precision, seed=seed)
            ev = evaluate(res.model, lm.spec, data, trig)
            t = time.perf_counter()
            ds = DetectSettings(seed=seed, precision=precision, weight_evidence=False)
            mr = max_margin(lm.model, lm.spec, ds)
            det = decide(mr, ds)
            t_det = time.perf_counter() - t
            logm[arm] = np.log(np.maximum([mr.margins[c] for c in sorted(mr.margins)], 1e-6))
            row["arms"][arm] = {"acc": ev.acc, "asr": ev.asr, "unlearn_s": round(t_rank, 2), "detect_s": round(t_det, 2),
                                "top": det.suspected_target, "verdict": det.verdict, "p": det.p_value}
        k = max(1, int(0.05 * len(ranks["fp32"])))
        ref_top = set(ranks["fp32"].topk(k).indices.tolist())
        for arm in ARMS:
            a = row["arms"][arm]
            a["nwc_spearman"] = float(spearmanr(ranks["fp32"], ranks[arm])[0])
            a["top5_overlap"] = len(ref_top & set(ranks[arm].topk(k).indices.tolist())) / k
            a["margin_spearman"] = float(spearmanr(logm["fp32"], logm[arm])[0])
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1))
        cells = "  ".join(
            f"{arm}: {v['acc']:.1f}/{(v['asr'] if v['asr'] is not None else float('nan')):.1f} nwc {v['nwc_spearman']:.3f} "
            f"top5 {v['top5_overlap']:.2f} m {v['margin_spearman']:.2f} {v['top']} {v['verdict']} {v['p']:.3g}"
            for arm, v in row["arms"].items() if arm != "fp32"
        )
        ref = row["arms"]["fp32"]
        print(f"{name:30s} {before.acc:.1f}/{(before.asr or 0):.1f} fp32 {ref['acc']:.1f}/{(ref['asr'] if ref['asr'] is not None else float('nan')):.1f} "
              f"{ref['top']} {ref['verdict']} {ref['p']:.3g} | {cells}", flush=True)


if __name__ == "__main__":
    main()
