"""Repair-quality benchmark: no defense vs CLP vs the paper preset (oracle ratio) vs otbr-hub.

Every model folder under ``benchmarks/cache/`` (made by ``benchmarks/zoo.py``) with a
``trigger.json`` is evaluated on the Fashion-MNIST test split:

* ``none``: the model as trained;
* ``clp``: channel-Lipschitz pruning (Zheng et al. 2022), data-free, u = 3: in each
  conv+BatchNorm pair, channels whose upper bound of the channel Lipschitz constant is
  above mean + u * std of their layer get a zero BatchNorm scale and shift;
* ``paper-oracle``: the ``paper`` preset at each ratio of the reference sweep, with the
  ratio picked by the best DER on *test and poisoned data* (an oracle a user never has);
* ``otbr-hub``: ``otbr_hub.repair`` with default settings (no data, automatic ratio).

Usage::

    python benchmarks/quality.py                 # all cached models, full test split
    python benchmarks/quality.py --quick         # trains (if needed) one small model per
                                                 # attack kind and asserts the targets
    python benchmarks/quality.py --models benchmarks/cache/resnet-badnets-t3-s0

Writes a table to stdout and JSON to ``benchmarks/results/quality[-quick].json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import machine, write_json  # noqa: E402
from otbr_hub import repair  # noqa: E402
from otbr_hub.errors import UnsupportedModelError  # noqa: E402
from otbr_hub.data import fashion_mnist_tensors  # noqa: E402
from otbr_hub.evaluate import EvalResult, der, evaluate  # noqa: E402
from otbr_hub.fuse import fuse  # noqa: E402
from otbr_hub.layers import select_layers  # noqa: E402
from otbr_hub.prune import prune  # noqa: E402
from otbr_hub.repair import _seeded  # noqa: E402
from otbr_hub.score import neuron_weight_change  # noqa: E402
from otbr_hub.unlearn import unlearn  # noqa: E402
from otbr_hub.load import load_folder  # noqa: E402
from otbr_hub.settings import preset  # noqa: E402
from otbr_hub.triggers import Trigger  # noqa: E402

CACHE = ROOT / "benchmarks" / "cache"
RESULTS = ROOT / "benchmarks" / "results"
PAPER_GRID = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
# --quick: one small model per attack kind, trained with zoo.py's settings if missing.
QUICK = [
    ("resnet", "badnets:target=3"),
    ("resnet", "blended:target=7"),
    ("resnet", "wanet:target=5"),
    ("resnet", "sig:target=2"),
]


def clp(model: nn.Module, u: float = 3.0) -> tuple[nn.Module, int]:
    """Channel Lipschitzness-based pruning on conv+BatchNorm pairs; returns (model, channels pruned)."""
    out = copy.deepcopy(model)
    pruned = 0
    try:
        layers = select_layers(out, preset("default", layer_types="conv", skip_shortcuts=False, skip_stem=False))
    except UnsupportedModelError:  # no conv layers at all: CLP has nothing to look at
        return out, 0
    with torch.no_grad():
        for layer in layers:
            bn = layer.norm
            if bn is None or bn.weight is None:
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            w = layer.module.weight * scale.view(-1, 1, 1, 1)
            ub = torch.linalg.matrix_norm(w.flatten(2) if w.shape[1] > 1 else w.flatten(1)[:, None], ord=2)
            ub = ub.flatten()
            idx = ub > ub.mean() + u * ub.std()
            bn.weight[idx] = 0
            bn.bias[idx] = 0
            pruned += int(idx.sum())
    return out, pruned


def paper_oracle(loaded, data, trigger: Trigger, before: EvalResult) -> dict[str, Any]:
    """The reference procedure at every ratio of its sweep; keep the best DER (uses test data).

    NWC does not depend on the ratio, so unlearning and scoring run once and only pruning
    and fusion are repeated (the same result as calling ``repair`` per ratio, faster).
    """
    settings = preset("paper")
    model, spec = loaded.model, loaded.spec
    layers = select_layers(model, settings)
    with _seeded(settings.seed, torch.device("cpu")):  # as repair() seeds it: reruns give the same numbers
        unlearned = unlearn(model, spec, settings).model
    scores = neuron_weight_change(model, unlearned, layers, settings)
    rows = []
    for r in PAPER_GRID:
        pr = prune(model, layers, scores, r, silence_norm=settings.prune_norm)
        fused = fuse(model, pr.model, layers, scores.nwc, pr.pruned, settings.lam, fuse_attached=settings.fuse_attached).model
        ev = evaluate(fused, spec, data, trigger)
        rows.append({"ratio": r, **ev.to_dict(), "der": der(before, ev)})
    best = max(rows, key=lambda row: row["der"])
    return {"best": best, "sweep": rows}


def bench_model(folder: Path, limit: int | None) -> dict[str, Any]:
    meta = json.loads((folder / "trigger.json").read_text())
    loaded = load_folder(folder)
    spec = loaded.spec
    data = fashion_mnist_tensors("test", spec, limit=limit)
    trig_spec = meta.get("trigger") or meta.get("eval_trigger")
    trigger = Trigger.from_dict(trig_spec) if isinstance(trig_spec, dict) else None
    clean_model = trigger is None
    if clean_model:  # measure a clean model's ASR against a standard patch so the columns exist
        trigger = Trigger.from_dict({"name": "badnets", "target": 0, "params": {}})
    row: dict[str, Any] = {"model": folder.name, "arch": meta.get("arch"), "attack": meta.get("attack", "clean"), "clean": clean_model}
    before = evaluate(loaded.model, spec, data, trigger)
    row["none"] = before.to_dict()

    t = time.perf_counter()
    m, n = clp(loaded.model)
    ev = evaluate(m, spec, data, trigger)
    row["clp"] = {**ev.to_dict(), "der": der(before, ev), "channels": n, "seconds": time.perf_counter() - t}

    t = time.perf_counter()
    row["paper_oracle"] = paper_oracle(loaded, data, trigger, before)
    row["paper_oracle"]["seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    res = repair(loaded)
    ev = evaluate(res.model, spec, data, trigger)
    row["otbr_hub"] = {**ev.to_dict(), "der": der(before, ev), "ratio": res.report.prune_ratio,
                       "reason": res.report.ratio_reason, "seconds": time.perf_counter() - t,
                       "candidates": res.report.ratio_candidates}
    return row


def fmt_row(row: dict[str, Any]) -> str:
    def cell(d: dict[str, Any]) -> str:
        der_s = f" {d['der']:5.1f}" if "der" in d else "      "
        return f"{d['acc']:5.1f}/{d['asr']:5.1f}{der_s}"

    po = row["paper_oracle"]["best"]
    return (f"{row['model']:<34} {cell(row['none'])} | {cell(row['clp'])} | {cell(po)} r={po['ratio']:<4} | "
            f"{cell(row['otbr_hub'])} r={row['otbr_hub']['ratio']}")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README's table: ACC / ASR / DER per model and method."""
    def cell(d: dict[str, Any]) -> str:
        return f"{d['acc']:.1f} / {d['asr']:.1f} / {d['der']:.1f}" if "der" in d else f"{d['acc']:.1f} / {d['asr']:.1f}"

    lines = ["| model | attack | before ACC / ASR | CLP | paper, oracle ratio | otbr-hub default (ratio) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        po = r["paper_oracle"]["best"]
        attack = "clean" if r["clean"] else r["attack"].split(":")[0] + " t" + r["attack"].split("target=")[1].split(",")[0]
        lines.append(f"| {r['model']} | {attack} | {cell(r['none'])} | {cell(r['clp'])} | {cell(po)} ({po['ratio']}) | "
                     f"{cell(r['otbr_hub'])} ({r['otbr_hub']['ratio']}) |")
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    bd = [r for r in rows if not r["clean"]]
    cl = [r for r in rows if r["clean"]]
    out: dict[str, Any] = {}
    if bd:
        asr = [r["otbr_hub"]["asr"] for r in bd]
        drop = [r["none"]["acc"] - r["otbr_hub"]["acc"] for r in bd]
        out["backdoored"] = {
            "n": len(bd),
            "mean_asr": sum(asr) / len(asr),
            "max_asr": max(asr),
            "mean_acc_drop": sum(drop) / len(drop),
            "mean_der": {k: sum(r[k]["der"] if k != "paper_oracle" else r[k]["best"]["der"] for r in bd) / len(bd)
                         for k in ("clp", "paper_oracle", "otbr_hub")},
            "der_at_least_clp_on_every_model": all(r["otbr_hub"]["der"] >= r["clp"]["der"] for r in bd),
        }
        b = out["backdoored"]
        b["targets"] = {
            "mean_asr<=3": b["mean_asr"] <= 3,
            "every_asr<=10": b["max_asr"] <= 10,
            "mean_acc_drop<=2": b["mean_acc_drop"] <= 2,
            "der>=clp_every_model": b["der_at_least_clp_on_every_model"],
            "mean_der>=paper_oracle": b["mean_der"]["otbr_hub"] >= b["mean_der"]["paper_oracle"],
        }
    if cl:
        drops = [r["none"]["acc"] - r["otbr_hub"]["acc"] for r in cl]
        out["clean"] = {"n": len(cl), "max_acc_drop": max(drops), "target_acc_drop<=1": max(drops) <= 1}
    return out


def write_results(out: Path, argv: list[str] | None, limit: int | None, rows: list[dict[str, Any]]) -> None:
    payload = {
        "command": shlex.join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "test_images": limit or 10000,
        "summary": summarize(rows),
        "models": rows,
    }
    write_json(out, payload)


def ensure_quick_models() -> list[Path]:
    """Train the --quick models with zoo.py unless they are cached already."""
    import subprocess

    folders = []
    for arch, attack in QUICK:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "zoo.py"), "--arch", arch, "--attack", attack, "--quick", "--print-folder"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"training {arch} {attack} failed:\n{proc.stderr[-2000:]}")
        folders.append(Path(proc.stdout.strip().splitlines()[-1]))
    return folders


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="model folders (default: every cached model with a trigger.json)")
    ap.add_argument("--quick", action="store_true", help="one small model per attack kind; assert ASR < 10%% and ACC drop <= 5")
    ap.add_argument("--limit", type=int, default=None, help="test images to use (default: all 10,000; --quick: 2,000)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--table", metavar="JSON", help="only print the Markdown table of an earlier results file")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())["models"]))
        return 0
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.models:
        folders = [Path(m) for m in args.models]
    elif args.quick:
        folders = ensure_quick_models()
    else:
        folders = sorted(p.parent for p in CACHE.glob("*/trigger.json"))
    if not folders:
        raise SystemExit("no models: run `python benchmarks/zoo.py --all` first")
    limit = args.limit if args.limit is not None else (2000 if args.quick else None)
    out = Path(args.out) if args.out else RESULTS / ("quality-quick.json" if args.quick else "quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'model':<34} {'none ACC/ASR':>18} | {'CLP ACC/ASR DER':>18} | {'paper-oracle':>24} | otbr-hub default")
    for folder in folders:
        row = bench_model(folder, limit)
        rows.append(row)
        print(fmt_row(row), flush=True)
        write_results(out, argv, limit, rows)  # after every model, so a long run keeps what it measured
    print(json.dumps(summarize(rows), indent=2))
    print(markdown_table(rows))
    if args.quick:
        # A model whose backdoor never took (ASR before < 50 %) proves nothing about the repair.
        untaken = [r["model"] for r in rows if not r["clean"] and r["none"]["asr"] < 50]
        failed = [r["model"] for r in rows if not r["clean"] and (
            r["otbr_hub"]["asr"] >= 10 or r["none"]["acc"] - r["otbr_hub"]["acc"] > 5)]
        if untaken:
            print(f"QUICK CHECK INVALID: the backdoor did not take (ASR before < 50%) in {', '.join(untaken)}")
        if failed:
            print(f"QUICK CHECK FAILED: {', '.join(failed)}")
        if untaken or failed:
            return 1
        print("quick check passed: every repaired model has ASR < 10% and lost <= 5 ACC points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
