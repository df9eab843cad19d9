"""Train small backdoored (and clean) Fashion-MNIST classifiers for benchmarking repairs.

Each model is written as a folder that ``otbr_hub.load.load_folder`` reads, exactly like a
model downloaded from the Hub, plus a ``trigger.json`` recording the attack, how it was
trained and the clean ACC / ASR it reached. Folders go to ``benchmarks/cache/`` (gitignored)
and are reused unless ``--force`` is given; a cached folder trained with other settings
(epochs, limit, poison rate) is refused rather than reused.

Inputs are Fashion-MNIST padded from 28x28 to 1x32x32 (black border, pixels untouched), so
every architecture sees power-of-two sizes, normalised with mean 0.2860 and std 0.3530.

Poisoning is static: a fixed, seeded subset of the training images is stamped once before
training. ``--poison-rate`` is the share of *all* training images for dirty-label attacks
(badnets, blended, wanet, lowfreq; picked among images whose label is not the target and
relabelled to the target) and the share of the *target class* for the clean-label attack
(sig; labels kept). WaNet additionally gets twice as many "noise mode" images that keep
their true labels, as in the WaNet paper.

Examples::

    python benchmarks/zoo.py --arch resnet --attack badnets:target=3 --epochs 3
    python benchmarks/zoo.py --arch vit --attack clean --seed 1
    python benchmarks/zoo.py --arch resnet --attack blended --limit 5000 --epochs 1 --out /tmp/smoke   # smoke run
    python benchmarks/zoo.py --arch resnet --attack sig:target=2 --quick --print-folder
    python benchmarks/zoo.py --arch resnet --attack clean --imbalance 6:2 --quick   # shirts 2x as common
    python benchmarks/zoo.py --all                       # the standard zoo (see ZOO below)
    python benchmarks/zoo.py --all --list                # print the standard zoo and exit

The standard zoo (``--all``): on each of resnet, convnext and vit,

* badnets (3x3 white patch, bottom right): target 0 and target 3; seeds 0 and 1 for target 0
* blended (alpha 0.2): target 0 and target 7; seeds 0 and 1 for target 0
* wanet (k 4, s 1.0, noise mode): target 0 and target 5
* sig (delta 0.16 = 40/255, f 6; clean label, every target-class image stamped): target 2
* lowfreq (eps 0.1, k 3): target 4
* clean models, seeds 0, 1 and 2

all at the per-architecture default epochs and poison rate 0.1 unless said otherwise.
``--arch resnet18`` is the stock timm resnet18 (11 M parameters), outside the standard zoo:
a hold-out architecture (``benchmarks/experiments/2026-12-01-resnet18/``), about 90 s an
epoch with 2 threads on a quiet 2-core machine. ``--arch efficientnet_b0`` and ``--arch
mobilenetv3`` (timm ``mobilenetv3_small_100``) are stock timm models of two more families
(depthwise convolutions, squeeze-excitation, SiLU / hard-swish), hold-outs of session 8
(``benchmarks/experiments/2026-12-01-mobile/``): about 3.3 and 1 minutes an epoch.
``--arch regnetx_002`` (timm RegNetX-200MF, grouped convolutions) is session 9's hold-out
(``benchmarks/experiments/2026-12-02-regnet/``): about a minute an epoch.

Measured (full 60k training set, default epochs, 1 torch thread on a shared 2-core machine,
so times are pessimistic; clean ACC / ASR on the 10k test split):

==========================  =============  ==========
model                       ACC / ASR      train time
==========================  =============  ==========
resnet badnets target 0     90.2 / 99.97   254 s
resnet badnets target 3     90.4 / 99.9    274 s   (examples/badnets-resnet)
resnet wanet target 0       89.9 / 97.7    371 s
resnet sig target 2         82.8 / 88.7    346 s   (whole target class stamped)
convnext badnets target 0   88.6 / 100     210 s
vit blended target 0        87.4 / 100     1588 s  (8 epochs, machine heavily loaded)
resnet lowfreq target 4     86.6 / 99.9    151 s   (--quick)
==========================  =============  ==========
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from otbr_hub.data import FASHION_MNIST_LABELS, fashion_mnist_tensors  # noqa: E402
from otbr_hub.evaluate import EvalResult, evaluate  # noqa: E402
from otbr_hub.load import InputSpec, forward_logits  # noqa: E402
from otbr_hub.triggers import Trigger, parse_trigger  # noqa: E402

CACHE = ROOT / "benchmarks" / "cache"
MEAN = (0.2860,)
STD = (0.3530,)
SPEC = InputSpec(channels=1, height=32, width=32, mean=MEAN, std=STD, num_classes=10)
WANET_CROSS_RATIO = 2.0
QUICK_LIMIT = 20_000
QUICK_EPOCHS = 3


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Recipe:
    """How to build, train and save one architecture."""

    build: Callable[[], nn.Module]
    save: Callable[[nn.Module, Path], None]
    epochs: int
    lr: float
    weight_decay: float = 0.0
    batch_size: int = 128
    info: dict[str, Any] = field(default_factory=dict)


RESNET_ARGS: dict[str, Any] = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16, "in_chans": 1}
RESNET18_ARGS: dict[str, Any] = {"in_chans": 1}
# convnext_atto's block layout, shrunk; 32 / 4 (stem) / 2 / 2 / 2 ends at 1x1 exactly.
CONVNEXT_ARGS: dict[str, Any] = {"depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128], "in_chans": 1}
VIT_ARGS: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 1,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def _timm_builder(arch: str, model_args: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=10, **model_args)

    return build


def _timm_saver(arch: str, model_args: dict[str, Any]) -> Callable[[nn.Module, Path], None]:
    def save(model: nn.Module, out: Path) -> None:
        from safetensors.torch import save_file

        config = {
            "architecture": arch,
            "num_classes": 10,
            "model_args": model_args,
            "label_names": list(FASHION_MNIST_LABELS),
            "pretrained_cfg": {
                "input_size": [SPEC.channels, SPEC.height, SPEC.width],
                "mean": list(MEAN),
                "std": list(STD),
                "num_classes": 10,
                "interpolation": "bilinear",
                "crop_pct": 1.0,
            },
        }
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    return save


def _build_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        **VIT_ARGS,
        num_labels=10,
        id2label={i: n for i, n in enumerate(FASHION_MNIST_LABELS)},
        label2id={n: i for i, n in enumerate(FASHION_MNIST_LABELS)},
    )
    return ViTForImageClassification(config)


def _save_vit(model: nn.Module, out: Path) -> None:
    from transformers import ViTImageProcessor

    model.save_pretrained(out)  # transformers 5 always writes model.safetensors
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": SPEC.height, "width": SPEC.width},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(MEAN),
        image_std=list(STD),
    )
    processor.save_pretrained(out)


RECIPES: dict[str, Recipe] = {
    "resnet": Recipe(
        _timm_builder("resnet18", RESNET_ARGS), _timm_saver("resnet18", RESNET_ARGS), epochs=4, lr=2e-3,
        info={"library": "timm", "architecture": "resnet18", "model_args": RESNET_ARGS},
    ),
    # The stock timm resnet18 (64-512 channels, 7x7 stem, max-pool, identity first block): a
    # hold-out architecture, the shape most users' ResNets have; nothing was tuned on it.
    "resnet18": Recipe(
        _timm_builder("resnet18", RESNET18_ARGS), _timm_saver("resnet18", RESNET18_ARGS), epochs=4, lr=2e-3,
        info={"library": "timm", "architecture": "resnet18", "model_args": RESNET18_ARGS},
    ),
    # Stock timm models of two more families (depthwise separable convolutions, squeeze-
    # excitation, SiLU / hard-swish): hold-outs, nothing was tuned on them either.
    "efficientnet_b0": Recipe(
        _timm_builder("efficientnet_b0", RESNET18_ARGS), _timm_saver("efficientnet_b0", RESNET18_ARGS), epochs=3, lr=2e-3,
        info={"library": "timm", "architecture": "efficientnet_b0", "model_args": RESNET18_ARGS},
    ),
    "mobilenetv3": Recipe(
        _timm_builder("mobilenetv3_small_100", RESNET18_ARGS), _timm_saver("mobilenetv3_small_100", RESNET18_ARGS),
        epochs=4, lr=2e-3,
        info={"library": "timm", "architecture": "mobilenetv3_small_100", "model_args": RESNET18_ARGS},
    ),
    # Stock timm RegNetX-200MF (grouped 3x3 convolutions, groups of 8 channels, BatchNorm,
    # ReLU): a hold-out between the plain ResNets and the depthwise families (session 9).
    "regnetx_002": Recipe(
        _timm_builder("regnetx_002", RESNET18_ARGS), _timm_saver("regnetx_002", RESNET18_ARGS), epochs=4, lr=2e-3,
        info={"library": "timm", "architecture": "regnetx_002", "model_args": RESNET18_ARGS},
    ),
    "convnext": Recipe(
        _timm_builder("convnext_atto", CONVNEXT_ARGS), _timm_saver("convnext_atto", CONVNEXT_ARGS), epochs=4, lr=2e-3,
        weight_decay=0.05,
        info={"library": "timm", "architecture": "convnext_atto", "model_args": CONVNEXT_ARGS},
    ),
    "vit": Recipe(
        _build_vit, _save_vit, epochs=8, lr=1e-3, weight_decay=0.05,
        info={"library": "transformers", "architecture": "ViTForImageClassification", "model_args": VIT_ARGS},
    ),
}


# --------------------------------------------------------------------------- poisoning


def poison(
    x: torch.Tensor, y: torch.Tensor, trigger: Trigger | None, rate: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Stamp a seeded subset of the training set; returns new (x, y) and what was done."""
    if trigger is None:
        return x, y, {"poisoned": 0, "poison_scope": None}
    rng = np.random.default_rng(seed)
    x, y = x.clone(), y.clone()
    target = trigger.target
    labels = y.numpy()
    if trigger.clean_label:
        pool = np.flatnonzero(labels == target)
        n = int(round(rate * len(pool)))
        scope = "target_class"
    else:
        pool = np.flatnonzero(labels != target)
        n = min(len(pool), int(round(rate * len(labels))))
        scope = "all"
    chosen = np.sort(rng.choice(pool, size=n, replace=False))
    idx = torch.from_numpy(chosen)
    x[idx] = trigger.apply(x[idx])
    if not trigger.clean_label:
        y[idx] = target
    info: dict[str, Any] = {"poisoned": int(n), "poison_scope": scope}
    if trigger.name == "wanet":
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        n_cross = min(len(rest), int(round(WANET_CROSS_RATIO * n)))
        cross = torch.from_numpy(np.sort(rng.choice(rest, size=n_cross, replace=False)))
        gen = torch.Generator().manual_seed(seed + 1)
        x[cross] = trigger.apply_noise(x[cross], gen)
        info.update(noise_mode=int(n_cross), cross_ratio=WANET_CROSS_RATIO)
    return x, y, info


def parse_imbalance(spec: str | None) -> tuple[str, int | None, float] | None:
    """``"K:F"`` (class K over-represented F times) or ``"lt:R"`` (long tail, largest/smallest R)."""
    if not spec:
        return None
    kind, _, value = spec.partition(":")
    try:
        factor = float(value)
        if kind == "lt":
            if factor < 1:
                raise ValueError
            return ("lt", None, factor)
        k = int(kind)
        if not 0 <= k < SPEC.num_classes or factor < 1:
            raise ValueError
        return ("class", k, factor)
    except ValueError:
        raise SystemExit(f"bad --imbalance '{spec}': use CLASS:FACTOR (e.g. 6:2) or lt:RATIO (e.g. lt:10), factors >= 1")


def imbalance(
    x: torch.Tensor, y: torch.Tensor, spec: tuple[str, int | None, float] | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Subsample classes so the label shares are uneven, as in many real training sets.

    ``class``: class K keeps every image, every other class keeps 1/F of its images, so K has F
    times the images of any other class (a 10 % dirty-label poison shifts the target's share by
    about F = 2.1). ``lt``: class shares fall geometrically from the largest to the smallest by
    the ratio R (CIFAR-10-LT style), in a seeded random order of the classes.
    """
    if spec is None:
        return x, y, {}
    kind, k, factor = spec
    rng = np.random.default_rng(seed + 7)
    classes = SPEC.num_classes
    if kind == "class":
        keep_share = {c: 1.0 if c == k else 1.0 / factor for c in range(classes)}
    else:
        order = rng.permutation(classes)
        keep_share = {int(c): factor ** (-i / (classes - 1)) for i, c in enumerate(order)}
    labels = y.numpy()
    keep = np.concatenate([
        (pool := np.flatnonzero(labels == c))[rng.random(len(pool)) < keep_share[c]] for c in range(classes)
    ])
    idx = torch.from_numpy(np.sort(keep))
    counts = np.bincount(labels[idx.numpy()], minlength=classes)
    return x[idx], y[idx], {"imbalance": {"kind": kind, "class": k, "factor": factor,
                                          "class_counts": [int(n) for n in counts]}}


# --------------------------------------------------------------------------- training


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    epochs: int,
    seed: int,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> None:
    """AdamW with a one-cycle schedule: reaches good accuracy in a handful of epochs."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.2
    )
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        start, total, correct, seen = time.time(), 0.0, 0, 0
        for idx in torch.randperm(x.shape[0], generator=gen).split(recipe.batch_size):
            xb = SPEC.normalize(x[idx]).to(device)
            yb = y[idx].to(device)
            logits = forward_logits(model, xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == yb).sum())
            seen += len(idx)
        log(f"  epoch {epoch + 1}/{epochs}: loss {total / seen:.4f}  train acc {100 * correct / seen:.2f}  ({time.time() - start:.1f}s)")
    model.eval()


# --------------------------------------------------------------------------- one model


def folder_name(arch: str, trigger: Trigger | None, seed: int, imbalanced: str | None = None) -> str:
    """``resnet-badnets-t3-s0``; a short hash is added when parameters differ from the defaults,
    and ``-imb6x2`` / ``-lt10`` for an imbalanced training set."""
    if trigger is None:
        name = f"{arch}-clean-s{seed}"
    else:
        name = f"{arch}-{trigger.name}-t{trigger.target}-s{seed}"
        if trigger.params != Trigger(trigger.name).params:
            name += "-" + hashlib.sha1(trigger.spec().encode()).hexdigest()[:6]
    spec = parse_imbalance(imbalanced)
    if spec is not None:
        kind, k, factor = spec
        name += f"-lt{factor:g}" if kind == "lt" else f"-imb{k}x{factor:g}"
    return name


def default_poison_rate(trigger: Trigger | None) -> float:
    """0.1 of the training set, or the whole target class for clean-label triggers.

    SIG on the resnet, 4 epochs (ACC / ASR): 0.8 of the class -> 88.8 / 63.6, 0.9 -> 87.5 /
    68.0, 1.0 -> 82.8 / 88.7. Only the full class gives a backdoor worth repairing, at the
    price of clean pullovers (no sinusoid) being misread.
    """
    if trigger is not None and trigger.clean_label:
        return 1.0
    return 0.1


def train_one(
    arch: str,
    attack: str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    poison_rate: float | None = None,
    out: Path | None = None,
    limit: int | None = None,
    force: bool = False,
    device: str | None = None,
    imbalanced: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) one zoo model and return its folder and trigger.json contents."""
    if arch not in RECIPES:
        raise SystemExit(f"unknown --arch '{arch}'; known: {', '.join(RECIPES)}")
    recipe = RECIPES[arch]
    trigger = None if attack == "clean" else parse_trigger(attack)
    epochs = recipe.epochs if epochs is None else epochs
    rate = default_poison_rate(trigger) if poison_rate is None else poison_rate
    imb = parse_imbalance(imbalanced)
    out = Path(out) if out is not None else CACHE / folder_name(arch, trigger, seed, imbalanced)
    meta_path = out / "trigger.json"
    settings = {"arch": arch, "attack": "clean" if trigger is None else trigger.spec(), "seed": seed,
                "epochs": epochs, "poison_rate": None if trigger is None else rate, "limit": limit,
                "imbalance": imbalanced}
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        cached = meta.get("settings")
        if cached != settings:
            # The folder name encodes only arch/attack/seed/imbalance: a model trained with other
            # epochs, limit or poison rate must not silently stand in for the one asked for.
            differ = sorted(k for k in settings if (cached or {}).get(k, object()) != settings[k])
            raise SystemExit(f"{out} holds a model trained with other settings ({', '.join(differ)}); "
                             "pass --force to retrain it or --out for a separate folder")
        log(f"{out}: cached  ACC {meta['acc']:.2f}  ASR {_fmt(meta.get('asr'))}")
        return out, meta
    # trigger.json marks a finished model: remove it first so an interrupted retrain is not
    # mistaken for a finished one.
    meta_path.unlink(missing_ok=True)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    x_train, y_train = fashion_mnist_tensors("train", SPEC, limit=limit, seed=seed)
    test_limit = None if limit is None else min(10_000, max(1_000, limit // 6))
    x_test, y_test = fashion_mnist_tensors("test", SPEC, limit=test_limit, seed=seed)
    x_train, y_train, iinfo = imbalance(x_train, y_train, imb, seed)
    x_train, y_train, pinfo = poison(x_train, y_train, trigger, rate, seed)
    model = recipe.build()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{out.name}: {arch} ({n_params / 1e3:.0f}k params), attack {attack}, poisoned {pinfo['poisoned']}, "
        f"{epochs} epochs on {x_train.shape[0]} images, {dev}, {torch.get_num_threads()} threads")
    start = time.time()
    train(model, x_train, y_train, recipe, epochs, seed, dev, log)
    seconds = time.time() - start
    model.cpu()
    result: EvalResult = evaluate(model, SPEC, (x_test, y_test), trigger)
    log(f"{out.name}: {result}  train {seconds:.0f}s")

    out.mkdir(parents=True, exist_ok=True)
    recipe.save(model, out)
    meta = {
        "trigger": None if trigger is None else trigger.to_dict(),
        "attack": "clean" if trigger is None else trigger.spec(),
        "clean_label": bool(trigger is not None and trigger.clean_label),
        "arch": arch,
        **recipe.info,
        "dataset": "fashion_mnist",
        "input": SPEC.to_dict(),
        "input_fit": "pad 28x28 -> 32x32 with black borders",
        "poison_rate": None if trigger is None else rate,
        **pinfo,
        **iinfo,
        "train_images": int(x_train.shape[0]),
        "epochs": epochs,
        "seed": seed,
        "optimizer": {"name": "AdamW", "lr": recipe.lr, "weight_decay": recipe.weight_decay,
                      "schedule": "one-cycle", "batch_size": recipe.batch_size},
        "acc": round(result.acc, 2),
        "asr": None if result.asr is None else round(result.asr, 2),
        "ra": None if result.ra is None else round(result.ra, 2),
        "test_images": result.n_clean,
        "train_seconds": round(seconds, 1),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "settings": settings,
    }
    tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    return out, meta


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# --------------------------------------------------------------------------- the standard zoo

ZOO_ATTACKS: list[tuple[str, tuple[int, ...]]] = [
    ("badnets:target=0", (0, 1)),
    ("badnets:target=3", (0,)),
    ("blended:target=0", (0, 1)),
    ("blended:target=7", (0,)),
    ("wanet:target=0", (0,)),
    ("wanet:target=5", (0,)),
    ("sig:target=2", (0,)),
    ("lowfreq:target=4", (0,)),
    ("clean", (0, 1, 2)),
]


def zoo_entries(archs: list[str]) -> list[tuple[str, str, int]]:
    """(arch, attack, seed) for every model of the standard zoo."""
    return [(arch, attack, seed) for arch in archs for attack, seeds in ZOO_ATTACKS for seed in seeds]


def idle_cores() -> int:
    """Cores not already busy: torch's OpenMP threads slow down badly when they share a core."""
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(RECIPES), default="resnet")
    parser.add_argument("--attack", default="badnets", help='trigger spec such as "badnets:target=3,size=4", or "clean"')
    parser.add_argument("--poison-rate", type=float, default=None,
                        help="share of the training set (dirty-label) or of the target class (clean-label); "
                             "default 0.1, or 1.0 for sig")
    parser.add_argument("--epochs", type=int, default=None, help="default per architecture: resnet 4, convnext 4, vit 8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="model folder (default benchmarks/cache/<name>)")
    parser.add_argument("--limit", type=int, default=None, help="train on this many images (quick runs)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small smoke-test model: {QUICK_LIMIT} training images, {QUICK_EPOCHS} epochs, "
                             "folder name ending in -quick (explicit --limit/--epochs win)")
    parser.add_argument("--print-folder", action="store_true", help="print the model folder as the last line of stdout")
    parser.add_argument("--all", action="store_true", help="train the standard zoo (see the module docstring)")
    parser.add_argument("--archs", default=",".join(RECIPES), help="with --all: comma-separated architectures")
    parser.add_argument("--list", action="store_true", help="with --all: print the zoo and exit")
    parser.add_argument("--force", action="store_true", help="retrain even if the folder exists")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the cores idle at start; oversubscribed OpenMP is very slow)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--imbalance", default=None,
                        help="uneven label shares: CLASS:FACTOR (class over-represented FACTOR times) or "
                             "lt:RATIO (geometric long tail); folder name gets -imbKxF / -ltR")
    args = parser.parse_args(argv)
    if args.all:
        rejected = [flag for flag, given in (("--quick", args.quick), ("--imbalance", args.imbalance),
                                             ("--out", args.out), ("--print-folder", args.print_folder))
                    if given]
        if rejected:
            parser.error(f"--all trains the standard zoo into benchmarks/cache/; it does not take {', '.join(rejected)}")
    torch.set_num_threads(args.threads if args.threads else idle_cores())

    if args.all:
        archs = [a for a in args.archs.split(",") if a]
        entries = zoo_entries(archs)
        if args.list:
            for arch, attack, seed in entries:
                trig = None if attack == "clean" else parse_trigger(attack)
                print(f"{folder_name(arch, trig, seed):32s} {arch:9s} {attack} seed={seed}")
            return 0
        rows = []
        for arch, attack, seed in entries:
            folder, meta = train_one(arch, attack, seed=seed, epochs=args.epochs, poison_rate=args.poison_rate,
                                     limit=args.limit, force=args.force, device=args.device)
            rows.append((folder.name, meta))
        print("\nmodel                              ACC     ASR    train s")
        for name, meta in rows:
            print(f"{name:32s} {meta['acc']:6.2f}  {_fmt(meta['asr']):>6s}  {meta['train_seconds']:7.0f}")
        return 0

    epochs, limit, out = args.epochs, args.limit, args.out
    if args.quick:
        epochs = QUICK_EPOCHS if epochs is None else epochs
        limit = QUICK_LIMIT if limit is None else limit
        if out is None:
            trig = None if args.attack == "clean" else parse_trigger(args.attack)
            out = CACHE / (folder_name(args.arch, trig, args.seed, args.imbalance) + "-quick")
    log = (lambda msg: print(msg, file=sys.stderr)) if args.print_folder else print
    folder, _ = train_one(args.arch, args.attack, seed=args.seed, epochs=epochs, poison_rate=args.poison_rate,
                          out=out, limit=limit, force=args.force, device=args.device,
                          imbalanced=args.imbalance, log=log)
    if args.print_folder:
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
