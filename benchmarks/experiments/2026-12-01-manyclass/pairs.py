"""A 100-class task from real data, to test the margin search's screening on many classes.

The zoo's models have 10 classes, so the screening pass that ImageNet-size heads need
(``DetectSettings.max_classes``) was never run on a backdoored model. Here an image is two
Fashion-MNIST test-free training images side by side (1 x 32 x 64, each padded 28 -> 32) and
its label is ``10 * left + right``: 100 classes, each a real visual concept pair. Models are
timm ResNets of the zoo's layout with a 100-way head; the backdoor is the zoo's BadNets
patch (bottom right of the whole image) or its blend, relabelled to one target class.

    python pairs.py train --attack badnets:target=37 --seed 0
    python pairs.py train --attack clean --seed 1
    python pairs.py detect OUT.json FOLDER...     # full search vs screened budgets

Folders go to ``benchmarks/cache/pairs-*`` (gitignored) in the zoo's layout
(``trigger.json`` with ACC / ASR on 5,000 test pairs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import zoo  # noqa: E402
from otbr_hub.data import fashion_mnist_tensors  # noqa: E402
from otbr_hub.detect import DetectSettings, detect  # noqa: E402
from otbr_hub.evidence import weight_evidence  # noqa: E402
from otbr_hub.evaluate import evaluate  # noqa: E402
from otbr_hub.load import InputSpec, load_folder  # noqa: E402
from otbr_hub.triggers import parse_trigger  # noqa: E402

K = 100
SPEC = InputSpec(channels=1, height=32, width=64, mean=zoo.MEAN, std=zoo.STD, num_classes=K)
ARCH, ARGS = "resnet18", zoo.RESNET_ARGS


def pairs(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n composite images with balanced labels: for each, a random left and right image."""
    x, y = fashion_mnist_tensors(split, zoo.SPEC, seed=seed)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y.numpy() == c) for c in range(10)]
    labels = rng.integers(0, K, size=n)
    left = np.array([rng.choice(by_class[c // 10]) for c in labels])
    right = np.array([rng.choice(by_class[c % 10]) for c in labels])
    return torch.cat([x[left], x[right]], dim=3), torch.from_numpy(labels)


def save(model: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"architecture": ARCH, "num_classes": K, "model_args": ARGS,
              "pretrained_cfg": {"input_size": [1, 32, 64], "mean": list(zoo.MEAN), "std": list(zoo.STD),
                                 "num_classes": K, "interpolation": "bilinear", "crop_pct": 1.0}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def train_cmd(args: argparse.Namespace) -> None:
    import timm

    trigger = None if args.attack == "clean" else parse_trigger(args.attack)
    name = f"pairs-{'clean' if trigger is None else f'{trigger.name}-t{trigger.target}'}-s{args.seed}"
    out = ROOT / "benchmarks" / "cache" / name
    if (out / "trigger.json").exists():
        print(out, "cached")
        return
    torch.manual_seed(args.seed)
    x, y = pairs("train", args.images, args.seed)
    x, y, info = zoo.poison(x, y, trigger, zoo.default_poison_rate(trigger), args.seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=K, **ARGS)
    recipe = zoo.RECIPES["resnet"]
    old = zoo.SPEC
    zoo.SPEC = SPEC  # zoo.train normalises with its module SPEC; same mean/std, other size
    try:
        t = time.time()
        zoo.train(model, x, y, recipe, args.epochs, args.seed, torch.device("cpu"))
        secs = time.time() - t
    finally:
        zoo.SPEC = old
    xt, yt = pairs("test", 5000, args.seed + 100)
    res = evaluate(model, SPEC, (xt, yt), trigger)
    print(name, res, f"{secs:.0f}s")
    save(model, out)
    meta = {"trigger": None if trigger is None else trigger.to_dict(), "attack": args.attack, "task": "fashion-mnist pairs, 100 classes",
            "train_images": args.images, "epochs": args.epochs, "seed": args.seed, **info, "acc": round(res.acc, 2),
            "asr": None if res.asr is None else round(res.asr, 2), "train_seconds": round(secs, 1)}
    (out / "trigger.json").write_text(json.dumps(meta, indent=2) + "\n")


# budgets compared: the full search on all 100 classes, the screening as it was (a short
# margin search over every class), with the weight evidence's top classes added, and
# evidence-only screens (no per-class pass: the only kind a 1000-class model can afford)
BUDGETS = {
    "full": dict(max_classes=100),  # every class at 8 x 100: the reference
    # the screen before session 4: a 2 x 20 margin pass over every class, its top 16 + 48 random at 8 x 100
    "screen-noev": dict(evidence_screen=False, screen_top=16, screen_sample=48, screened_inputs_per_class=None,
                        screened_steps=None),
    # the same with the evidence's top 16 added (first run only: since then candidates replace the margin pass)
    "screen": dict(screen_top=16, screen_sample=48, screened_inputs_per_class=None, screened_steps=None),
    # evidence-only screens at 4 x 50 (2 x 50): top 8 + 24 random, top 4 + 12 random
    "ev-32": dict(screen_top=8, screen_sample=24, screen_steps=0),
    "ev-16": dict(screen_top=4, screen_sample=12, screen_steps=0),
    "ev-16-2x50": dict(screen_top=4, screen_sample=12, screen_steps=0, screened_inputs_per_class=2),
    # no candidates at all, only the random sample: what the evidence adds
    "random-16": dict(screen_top=4, screen_sample=12, screen_steps=0, evidence_screen=False),
    # the screened default adopted in session 4: top 4 + 20 random at 4 x 50
    "default": dict(),
}


def detect_cmd(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    for folder in args.folders:
        name = Path(folder).name
        old = next((r for r in rows if r["model"] == name), None)
        if old is not None and all(b in old["budgets"] for b in (args.budgets or BUDGETS)):
            continue
        meta = json.loads(Path(folder, "trigger.json").read_text())
        target = (meta.get("trigger") or {}).get("target")
        lm = load_folder(folder)
        ev = weight_evidence(lm.model, lm.spec)
        ev_rank = [int(c) for c in np.argsort(-np.asarray(ev.per_class), kind="stable")]
        row = {"model": name, "target": target, "acc": meta["acc"], "asr": meta.get("asr"),
               "evidence": {"top": ev.top_class, "p": ev.p_value, "z": ev.z,
                            "target_rank": ev_rank.index(target) if target is not None else None},
               "budgets": dict(old["budgets"]) if old else {}}
        for bname, kw in BUDGETS.items():
            if (args.budgets and bname not in args.budgets) or bname in row["budgets"]:
                continue
            passes: list[int] = []
            t = time.perf_counter()
            # margins decide (weight_evidence=False); the evidence may still choose candidates
            d = detect(lm.model, lm.spec, DetectSettings(weight_evidence=False, **kw), progress=lambda s, n, tot: passes.append(n))
            both = _combined(d, ev)
            row["budgets"][bname] = {"top": d.top_class, "verdict": d.verdict, "p": d.p_value, "with_weights": both,
                                     "passes": passes[-1] if passes else None, "secs": round(time.perf_counter() - t, 1),
                                     "target_searched": target in d.statistics if target is not None else None}
        rows = [r for r in rows if r["model"] != name] + [row]
        out.write_text(json.dumps(rows, indent=1))
        e = row["evidence"]
        print(f"{name} target {target}, evidence top {e['top']} p={e['p']:.2g} (target rank {e['target_rank']})  "
              + " | ".join(f"{b}: {v['top']} {v['verdict']} p={v['p']:.3g} [{v['with_weights']}] ({v['passes']}, {v['secs']}s)"
                           for b, v in row["budgets"].items()), flush=True)


def _combined(det, ev) -> str:
    """The default verdict (margins + weights) this margin result would give."""
    from copy import deepcopy

    from otbr_hub.detect import _add_weight_evidence

    d = deepcopy(det)
    _add_weight_evidence(d, ev, DetectSettings())
    return d.verdict


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--attack", default="badnets:target=37")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--images", type=int, default=40_000)
    t.add_argument("--epochs", type=int, default=4)
    d = sub.add_parser("detect")
    d.add_argument("out")
    d.add_argument("folders", nargs="+")
    d.add_argument("--budgets", nargs="*", default=None, help="only these budgets (default: all)")
    a = p.parse_args()
    torch.set_num_threads(1)
    train_cmd(a) if a.cmd == "train" else detect_cmd(a)


if __name__ == "__main__":
    main()
