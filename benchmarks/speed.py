"""Speed and memory benchmarks for repair and scan, plus the measurements behind
``benchmarks/SPEED_NOTES.md``.

Modes (all write into one JSON file, ``benchmarks/results/speed-<device>.json``, each
mode replacing only its own section, next to a description of the machine):

``pipeline`` (default)
    End-to-end ``repair`` (load, unlearn, score, prune, fuse, verify, save) and ``scan`` of
    full-size models built from their configs with random weights: timm ``resnet50``, timm
    ``convnext_tiny`` and transformers ViT-B/16, all at 224 px. Each model is saved to a
    temporary folder first, so loading is measured like for a downloaded model. Every run
    happens in a fresh child process, so its peak RSS is its own; a run that passes
    ``--time-limit`` is stopped and reported with the stage it was in.
``emd``
    Seconds of POT's exact ``ot.emd`` against layer width (64..4096 neurons), and one full
    ``fuse`` pass over the scored layers of each pipeline model.
``nwc``
    How well cheaper unlearning settings (fewer steps, smaller batches, smaller noise)
    reproduce the neuron ranking of the paper's settings (20 steps x batch 256 at the
    model's input size): Spearman correlation over all scored neurons and overlap of the
    top-k sets that pruning would remove.

Examples::

    python benchmarks/speed.py                                   # pipeline, all three models
    python benchmarks/speed.py pipeline --models resnet50 --unlearn-batch 32 --noise-size 64
    python benchmarks/speed.py emd
    python benchmarks/speed.py nwc --models examples/badnets-resnet benchmarks/cache/*
    python benchmarks/speed.py nwc --models resnet50 --chunk 32 --candidates 5x32@64,20x64@112
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("resnet50", "convnext_tiny", "vit_b16")
REFERENCE = "20x256"  # the paper's unlearning budget: 20 steps of 256 noise images
# Candidate unlearning budgets, STEPSxBATCH[@NOISE_SIZE]; no size means the model's own.
DEFAULT_CANDIDATES = (
    "20x256@16,10x256,5x256,20x128,10x128,20x64,10x64,5x64,20x32,10x32,5x32,"
    "20x64@16,10x64@16,10x32@16,20x64@24"
)
# Width sweep of the emd timing; the largest widths in the pipeline models are 2048
# (resnet50's last 1x1 convs) and 3072 (the MLPs of ViT-B and ConvNeXt-T).
EMD_WIDTHS = (64, 128, 256, 512, 768, 1024, 2048, 3072, 4096)


# --------------------------------------------------------------------------- shared helpers


def machine() -> dict[str, Any]:
    """What the numbers were measured on; they mean little without it."""
    import psutil
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "timm", "transformers", "ot", "accelerate", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # pragma: no cover - informational only
            versions[name] = None
    return {
        "command": command_line(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def command_line() -> str:
    """The command that produced a result, shell-quoted, with the thread settings it ran under."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ]
    return shlex.join([*env, "python", *sys.argv])


def write_json(path: Path, doc: Any) -> None:
    """Write a results file through a private temporary sibling, so a reader (or a second run
    finishing at the same moment) never sees half a file (the scan reports' writer)."""
    from otbr_hub.report import write_text_atomically

    write_text_atomically(path, json.dumps(doc, indent=2, default=str) + "\n")


def results_path(device: str) -> Path:
    return RESULTS / f"speed-{'cuda' if device.startswith('cuda') else 'cpu'}.json"


def save_section(path: Path, section: str, data: Any, machine_info: dict[str, Any], merge_models: bool = False) -> None:
    """Replace one section of the results file, keeping the other modes' numbers; with
    ``merge_models`` the section's ``models`` already on file are kept unless remeasured
    (read at write time, so two runs of one mode can go on side by side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-modify-write under a lock: two runs of different modes may finish together.
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _save_section_locked(path, section, data, machine_info, merge_models)


def _save_section_locked(path: Path, section: str, data: Any, machine_info: dict[str, Any], merge_models: bool) -> None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("machines", {})[section] = machine_info
    if merge_models and isinstance(doc.get(section), dict):
        models = dict(doc[section].get("models", {}))
        for name, entry in data.get("models", {}).items():
            # one model's other modes (a fixed-ratio run when only the scan was remeasured) stay
            old = models.get(name)
            models[name] = {**old, **entry} if isinstance(old, dict) and isinstance(entry, dict) else entry
        data = {**data, "models": models}
    doc[section] = data
    doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(path, doc)


def build_model(name: str, num_classes: int = 1000) -> Any:
    """A full-size model from its config with random (seeded) weights."""
    import torch

    torch.manual_seed(0)
    if name == "vit_b16":
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, num_labels=num_classes)
        return ViTForImageClassification(cfg).eval()
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()


def save_pipeline_model(name: str, folder: Path, num_classes: int = 1000) -> Path:
    """Save a pipeline model the way the Hub would hold it (config + safetensors)."""
    from otbr_hub.load import from_model
    from otbr_hub.save import save_model

    model = build_model(name, num_classes)
    out = save_model(from_model(model), model, folder)
    if name == "vit_b16":  # transformers keeps preprocessing next to the weights
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "ViTImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "size": {"height": 224, "width": 224}, "do_resize": True, "do_normalize": True, "do_rescale": True,
        }))  # fmt: skip
    return out


def fp32_weight_bytes(folder: Path) -> int:
    from otbr_hub.load import load_folder

    model = load_folder(folder).model
    return sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())


def load_model(ref: str):
    """A benchmark model by pipeline name (built in memory) or by folder."""
    from otbr_hub.load import from_model, load_folder

    if ref in MODELS:
        return from_model(build_model(ref))
    return load_folder(ref)


# --------------------------------------------------------------------------- nwc agreement


def parse_budget(text: str) -> tuple[int, int, int | None]:
    """'20x64@112' -> (steps 20, batch 64, noise size 112); no '@' means the model's own size."""
    budget, _, size = text.partition("@")
    steps, batch = (int(v) for v in budget.lower().split("x"))
    return steps, batch, int(size) if size else None


def unlearn_scores(loaded: Any, steps: int, batch: int, size: int | None, seed: int, chunk: int | None) -> Any:
    """NWC scores under one unlearning budget (default preset otherwise), on the CPU.

    With ``chunk`` below ``batch`` each step's batch is pushed through in slices whose
    gradients are summed (the same mean loss and the same noise), so that the paper's
    batch of 256 fits in memory at 224 px. Only BatchNorm's batch statistics then come
    from a slice instead of the whole batch; over 224x224 positions of i.i.d. noise they
    differ little. Without chunking the engine's own :func:`otbr_hub.unlearn.unlearn` runs.
    """
    import torch
    import torch.nn.functional as F

    from otbr_hub.layers import select_layers
    from otbr_hub.load import forward_logits
    from otbr_hub.score import neuron_weight_change
    from otbr_hub.settings import preset
    from otbr_hub.unlearn import noise_batch, unlearn

    settings = preset("default", unlearn_steps=steps, unlearn_batch=batch, noise_size=size, seed=seed, device="cpu")
    torch.manual_seed(seed)
    work = copy.deepcopy(loaded.model).float().eval()
    layers = select_layers(work, settings)
    spec = loaded.spec
    if not chunk or chunk >= batch:
        unlearned = unlearn(work, spec, settings, torch.device("cpu")).model
    else:
        unlearned = copy.deepcopy(work)
        unlearned.train(settings.unlearn_train_mode)
        params = [p for p in unlearned.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=settings.unlearn_lr, momentum=settings.unlearn_momentum, weight_decay=0.0)
        gen = torch.Generator().manual_seed(settings.seed)
        n_labels = spec.num_classes - 1 if settings.label_off_by_one and spec.num_classes > 1 else spec.num_classes
        for _ in range(steps):
            x = noise_batch(spec, batch, gen, size, settings.normalize_noise)
            y = torch.randint(0, n_labels, (batch,), generator=gen)
            opt.zero_grad(set_to_none=True)
            for i in range(0, batch, chunk):
                xs, ys = x[i : i + chunk], y[i : i + chunk]
                loss = F.cross_entropy(forward_logits(unlearned, xs).float(), ys) * (len(ys) / batch)
                (-loss).backward()
            opt.step()
        unlearned.eval()
    return neuron_weight_change(work, unlearned, layers, settings)


def _flat(values: dict[str, Any]) -> Any:
    import torch

    return torch.cat([values[k].double().flatten() for k in sorted(values)]).numpy()


def _layer_z(nwc: dict[str, Any]) -> dict[str, Any]:
    """NWC z-scored within each layer: the ``layer-normalized`` ranking (dividing by the
    weights per neuron first would not change a z-score)."""
    out = {}
    for name, v in nwc.items():
        v = v.double()
        out[name] = (v - v.mean()) / (v.std() + 1e-12) if v.numel() > 1 else v * 0
    return out


def compare_scores(ref: Any, cand: Any) -> dict[str, float]:
    """Rank agreement of two NWC scorings under both rankings the engine offers: ``global``
    (raw NWC across all layers, the paper's and the default) and ``layer_z`` (z-scored per
    layer): Spearman over all scored neurons and overlap of the top 1/5/10 % that pruning
    at those ratios would remove."""
    import numpy as np
    from scipy.stats import spearmanr

    out: dict[str, float] = {}
    for kind, fn in (("global", lambda s: s.nwc), ("layer_z", lambda s: _layer_z(s.nwc))):
        a, b = _flat(fn(ref)), _flat(fn(cand))
        out[f"spearman_{kind}"] = float(spearmanr(a, b).statistic)
        for frac in (0.01, 0.05, 0.1):
            k = max(1, int(frac * len(a)))
            top_a = set(np.argsort(-a, kind="stable")[:k])
            top_b = set(np.argsort(-b, kind="stable")[:k])
            out[f"top{int(frac * 100)}_{kind}"] = len(top_a & top_b) / k
    return out


def score_key(loaded: Any, name: str, chunk: int | None) -> str:
    """Cache key for a model's NWC scorings: its name plus a digest of what the scores depend
    on besides the budget and seed: the weights, the default preset and the chunking."""
    import hashlib

    import torch

    from otbr_hub.settings import preset

    h = hashlib.sha1(json.dumps(preset("default").to_dict(), sort_keys=True, default=str).encode())
    h.update(f"chunk={chunk}".encode())
    with torch.no_grad():
        for k, v in sorted(loaded.model.state_dict().items()):
            h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
            if v.is_floating_point() and v.numel():
                h.update(f"{float(v.double().sum()):.10g},{float(v.double().abs().sum()):.10g}".encode())
    return f"{name}-{h.hexdigest()[:10]}"


def cached_scores(key: str, compute: Callable[[], Any]) -> Any:
    """Reference scorings take an hour on resnet50 at 224 px on a small CPU; keep them
    (in the gitignored ``benchmarks/cache``) so that more candidates can be compared later.
    ``key`` comes from :func:`score_key`, so other weights or settings never hit a stale file."""
    import torch

    from otbr_hub.score import Scores

    path = ROOT / "benchmarks" / "cache" / "nwc-scores" / f"{key}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return Scores(nwc=data["nwc"], rank=data["nwc"], ranking="global")
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"nwc": {k: v.cpu() for k, v in scores.nwc.items()}}, path)
    return scores


def run_nwc(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    candidates = [c for c in args.candidates.split(",") if c.strip()]
    per_model: dict[str, Any] = {}
    for ref_name in args.models:
        loaded = load_model(ref_name)
        key = Path(ref_name).name if ref_name not in MODELS else ref_name
        ckey = score_key(loaded, key, args.chunk)
        spec = loaded.spec
        print(f"== {key}: input {spec.channels}x{spec.height}x{spec.width}, {spec.num_classes} classes", flush=True)
        if args.pairs:
            per_model[f"{key} (self-agreement)"] = {"self_agreement": self_agreement(loaded, ckey, args)}
            continue
        t0 = time.perf_counter()
        steps, batch, size = parse_budget(args.reference)
        ref = cached_scores(f"{ckey}-{args.reference}-s0",
                            lambda: unlearn_scores(loaded, steps, batch, size, seed=0, chunk=args.chunk))
        entry: dict[str, Any] = {
            "input": [spec.channels, spec.height, spec.width],
            "neurons": ref.total,
            "reference": {"budget": args.reference, "seconds": round(time.perf_counter() - t0, 1), "chunk": args.chunk},
            "candidates": {},
        }
        print(f"  reference {args.reference}: {entry['reference']['seconds']} s, {ref.total} neurons", flush=True)
        if args.seed_floor:
            t0 = time.perf_counter()
            other = cached_scores(f"{ckey}-{args.reference}-s1",
                                  lambda: unlearn_scores(loaded, steps, batch, size, seed=1, chunk=args.chunk))
            entry["reference_seed1"] = {**compare_scores(ref, other), "seconds": round(time.perf_counter() - t0, 1)}
            print(f"  reference, seed 1: {_fmt(entry['reference_seed1'])}", flush=True)
        truth = None
        if args.truth:
            t0 = time.perf_counter()
            t_steps, t_batch, t_size = parse_budget(args.truth)
            truth = cached_scores(f"{ckey}-{args.truth}-s2",
                                  lambda: unlearn_scores(loaded, t_steps, t_batch, t_size, seed=2, chunk=args.chunk))
            entry["truth"] = {"budget": args.truth, "seconds": round(time.perf_counter() - t0, 1),
                              "reference_vs_truth": compare_scores(truth, ref)}
            if args.seed_floor:
                entry["truth"]["reference_seed1_vs_truth"] = compare_scores(truth, other)
            print(f"  truth {args.truth}: reference vs truth {_fmt(entry['truth']['reference_vs_truth'])}", flush=True)
        for cand in candidates:
            c_steps, c_batch, c_size = parse_budget(cand)
            t0 = time.perf_counter()
            try:
                scores = unlearn_scores(loaded, c_steps, c_batch, c_size, seed=0, chunk=args.chunk)
            except Exception as err:  # e.g. noise too small for the architecture
                entry["candidates"][cand] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                print(f"  {cand:>10}: error {entry['candidates'][cand]['error']}", flush=True)
                continue
            row = {**compare_scores(ref, scores), "seconds": round(time.perf_counter() - t0, 2),
                   **({"vs_truth": compare_scores(truth, scores)} if truth is not None else {}),
                   "images": c_steps * c_batch, "pixels_vs_reference": _cost(c_steps, c_batch, c_size, steps, batch, size, spec)}
            entry["candidates"][cand] = row
            print(f"  {cand:>10}: {_fmt(row)}", flush=True)
        per_model[key] = entry
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"reference": args.reference, "models": per_model}


def self_agreement(loaded: Any, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Agreement of a budget with itself under two other seeds: how reproducible its
    ranking is at all. Where the reference is too costly to run twice (resnet50 at 224 px),
    this bounds what any comparison with a single reference run can show."""
    out = {}
    for budget in args.pairs.split(","):
        steps, batch, size = parse_budget(budget)
        t0 = time.perf_counter()
        a, b = (cached_scores(f"{key}-{budget}-s{seed}",
                              lambda seed=seed: unlearn_scores(loaded, steps, batch, size, seed=seed, chunk=args.chunk))
                for seed in (1, 2))
        out[budget] = {**compare_scores(a, b), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  {budget} seed 1 vs seed 2: {_fmt(out[budget])}", flush=True)
    return out


def _cost(steps: int, batch: int, size: int | None, r_steps: int, r_batch: int, r_size: int | None, spec: Any) -> float:
    """Relative compute of a budget (images x pixels) against the reference."""
    px = (size or spec.height) * (size or spec.width)
    r_px = (r_size or spec.height) * (r_size or spec.width)
    return round(steps * batch * px / (r_steps * r_batch * r_px), 4)


def _fmt(row: dict[str, Any]) -> str:
    parts = [f"global rho {row['spearman_global']:.3f} top5% {row['top5_global']:.2f}",
             f"layer-z rho {row['spearman_layer_z']:.3f} top5% {row['top5_layer_z']:.2f}"]
    if "vs_truth" in row:
        t = row["vs_truth"]
        parts.append(f"vs truth: global {t['spearman_global']:.3f}/{t['top5_global']:.2f}, "
                     f"layer-z {t['spearman_layer_z']:.3f}/{t['top5_layer_z']:.2f}")
    if "seconds" in row:
        parts.append(f"{row['seconds']} s")
    if "pixels_vs_reference" in row:
        parts.append(f"cost x{row['pixels_vs_reference']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- emd timing


def run_emd(args: argparse.Namespace) -> dict[str, Any]:
    """Exact OT solve time against width, with the engine's own plan function."""
    import numpy as np
    import ot

    from otbr_hub.fuse import target_mass, transport_plan

    rng = np.random.default_rng(0)
    rows = []
    for n in args.widths:
        if n > args.max_width:
            continue
        d = min(4608, 9 * n)  # a 3x3 conv with as many inputs as outputs, capped at resnet50's widest
        w_orig = rng.standard_normal((n, d)) / np.sqrt(d)
        w_pruned = w_orig.copy()
        w_pruned[rng.choice(n, max(1, n // 20), replace=False)] = 0.0  # 5 % of the neurons pruned
        b = target_mass(np.abs(rng.standard_normal(n)) + 0.1)
        t0 = time.perf_counter()
        cost = ot.dist(w_pruned, w_orig, metric="euclidean")
        t_cost = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan, log = ot.emd(np.full(n, 1.0 / n), b, cost, numItermax=max(100_000, 50 * n * n), log=True)
        t_emd = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan2 = transport_plan(w_pruned, w_orig, b)
        t_engine = time.perf_counter() - t0
        row = {
            "width": n, "dims": d, "cost_matrix_s": round(t_cost, 3), "emd_s": round(t_emd, 3),
            "engine_plan_s": round(t_engine, 3), "emd_warning": log.get("warning"),
            "nonzeros": int((plan > 0).sum()), "permutation": bool((plan > 0).sum() == n),
            "same_plan_as_engine": bool(np.array_equal(plan, plan2)),
            "plan_mb": round(plan.nbytes / 1e6, 1),
        }
        rows.append(row)
        print(f"  width {n:5d}: cost {t_cost:7.3f} s, emd {t_emd:7.3f} s, nonzeros {row['nonzeros']} "
              f"({'permutation' if row['permutation'] else 'split mass'}), warning {row['emd_warning']}", flush=True)
    parts = {name: layer_parts(*shape) for name, shape in LAYER_SHAPES.items()} if args.parts else {}
    fuse_rows = {}
    for name in args.fuse_models:
        fuse_rows[name] = fuse_once(name, args.fuse_ratio)
        print(f"  fuse {name}: {fuse_rows[name]}", flush=True)
    return {"widths": rows, "layer_parts": parts, "fuse": fuse_rows}


# (out, in, kernel positions) of the widest layers in the pipeline models.
LAYER_SHAPES = {
    "resnet50 layer3 conv2 (256x256x3x3)": (256, 256, 9),
    "resnet50 layer4 conv2 (512x512x3x3)": (512, 512, 9),
    "resnet50 layer4 conv3 (2048x512x1x1)": (2048, 512, 1),
    "vit-b / convnext-t mlp fc1 (3072x768)": (3072, 768, 1),
    "vit-b mlp fc2 (768x3072)": (768, 3072, 1),
}


def layer_parts(n_out: int, n_in: int, k: int) -> dict[str, Any]:
    """Seconds of each step of one layer's fusion, and the two ways to align inputs."""
    import numpy as np
    import ot

    from otbr_hub.fuse import _sparse_map, align_inputs, target_mass

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_out, n_in, k))
    w_pn = w.copy()
    w_pn[rng.choice(n_out, max(1, n_out // 20), replace=False)] = 0.0
    b = target_mass(np.abs(rng.standard_normal(n_out)) + 0.1)
    b_prev = target_mass(np.abs(rng.standard_normal(n_in)) + 0.1)
    plan_prev = ot.emd(np.full(n_in, 1.0 / n_in), b_prev, ot.dist(rng.standard_normal((n_in, 8)), rng.standard_normal((n_in, 8))))
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    cost = ot.dist(w_pn.reshape(n_out, -1), w.reshape(n_out, -1), metric="euclidean")
    out["cost_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    plan = ot.emd(np.full(n_out, 1.0 / n_out), b, cost, numItermax=max(100_000, 50 * n_out * n_out))
    out["emd_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    einsum = np.einsum("pik,iq->pqk", w_pn, plan_prev / b_prev[None, :])
    out["align_einsum_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    engine = align_inputs(w_pn, plan_prev, b_prev)
    out["align_engine_s"] = round(time.perf_counter() - t0, 3)
    out["align_max_abs_diff"] = float(np.abs(engine - einsum).max())
    t0 = time.perf_counter()
    dense = (plan.T / b[:, None]) @ engine.reshape(n_out, -1)
    out["map_dense_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    sparse_map = _sparse_map(plan, b, transpose=True) @ engine.reshape(n_out, -1)
    out["map_engine_s"] = round(time.perf_counter() - t0, 3)
    out["map_max_abs_diff"] = float(np.abs(np.asarray(sparse_map) - dense).max())
    out["plan_nonzeros"] = int((plan > 0).sum())
    print(f"  {n_out}x{n_in}x{k}: {out}", flush=True)
    return out


def fuse_once(name: str, ratio: float) -> dict[str, Any]:
    """One prune + fuse pass over a pipeline model with synthetic NWC (no unlearning)."""
    import torch

    import otbr_hub.fuse as fuse_mod
    from otbr_hub.fuse import fuse
    from otbr_hub.layers import select_layers
    from otbr_hub.load import from_model
    from otbr_hub.prune import prune
    from otbr_hub.score import Scores
    from otbr_hub.settings import preset

    model = build_model(name)
    settings = preset("default", device="cpu")
    layers = select_layers(model, settings)
    gen = torch.Generator().manual_seed(0)
    nwc = {l.name: torch.rand(l.n_out, generator=gen, dtype=torch.float64) + 0.01 for l in layers}
    scores = Scores(nwc=nwc, rank=nwc, ranking="global")
    pr = prune(model, layers, scores, ratio, silence_norm=settings.prune_norm, layer_cap=settings.layer_cap)
    per_layer: dict[str, float] = {}
    t0 = time.perf_counter()
    links = (fuse_mod.dataflow_links(model, from_model(model).spec, layers, attached=settings.fuse_attached)
             if settings.fuse_chain == "dataflow" else None)  # timed with the fusion, as in repair
    fr = fuse(model, pr.model, layers, nwc, pr.pruned, settings.lam, fuse_attached=settings.fuse_attached, links=links)
    total = time.perf_counter() - t0
    widths = sorted({l.n_out for l in layers})
    return {"layers": len(layers), "fused_layers": len(fr.fused_layers), "ot_mapped_layers": len(fr.mapped_layers),
            "widths": widths, "seconds": round(total, 1),
            **({"per_layer": per_layer} if per_layer else {})}


# --------------------------------------------------------------------------- pipeline


class PeakRss:
    """Samples this process's RSS every 50 ms; ``ru_maxrss`` alone cannot say which stage peaked."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stage_peak: dict[str, int] = {}
        self.stage = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def sample(self) -> None:
        rss = self.proc.memory_info().rss
        self.peak = max(self.peak, rss)
        self.stage_peak[self.stage] = max(self.stage_peak.get(self.stage, 0), rss)

    def enter(self, stage: str) -> None:
        self.sample()
        self.stage = stage

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> None:
    """One measured run (repair or scan) in this fresh process; JSON lines on stdout.

    A ``stage`` line is printed whenever a stage starts, so that the parent can say where a
    run was when it hit the time limit; the last line is the ``result``.
    """
    import torch

    rss = PeakRss()
    base_rss = rss.proc.memory_info().rss

    def emit(kind: str, **data: Any) -> None:
        print(json.dumps({"kind": kind, "t": round(time.perf_counter() - t_start, 2), **data}), flush=True)

    current = {"stage": None}

    def progress(stage: str, done: int = 0, total: int | None = None) -> None:
        if stage != current["stage"]:
            current["stage"] = stage
            rss.enter(stage)
            emit("stage", stage=stage, rss_mb=round(rss.proc.memory_info().rss / 1e6))

    t_start = time.perf_counter()
    folder = Path(args.folder)
    if args.what == "scan":
        from otbr_hub.detect import DetectSettings
        from otbr_hub.scan import ScanSettings, scan_target

        det = {k: v for k, v in {"steps": args.detect_steps, "inputs_per_class": args.detect_inputs}.items() if v}
        settings = ScanSettings(detector=DetectSettings(device="cpu", **det), compute_sha256=True)
        report = scan_target(folder, settings=settings, on_stage=progress)
        timings = dict(report.timings)
        extra = {"verdict": report.verdict, "error": report.error or report.skipped}
    else:
        from otbr_hub.repair import repair
        from otbr_hub.save import save_model

        overrides = {k: v for k, v in {"unlearn_steps": args.unlearn_steps, "unlearn_batch": args.unlearn_batch,
                                      "noise_size": args.noise_size, "verify_samples": args.verify_samples}.items() if v}
        result = repair(folder, prune_ratio=args.ratio, device="cpu", progress=progress, **overrides)
        progress("save")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="otbr-speed-out-") as tmp:
            save_model(result.source, result.model, Path(tmp) / "out", extra_files={"otbr_report.json": result.report.to_dict()})
        timings = {**result.report.timings, "save": round(time.perf_counter() - t0, 3)}
        rep = result.report
        extra = {"prune_ratio": rep.prune_ratio, "ratio_reason": rep.ratio_reason, "neurons_scored": rep.neurons_scored,
                 "layers_scored": rep.layers_scored, "agreement": rep.verification.get("agreement"),
                 "settings": {k: rep.settings[k] for k in ("unlearn_steps", "unlearn_batch", "noise_size", "verify_samples")}}
    rss.stop()
    emit("result", timings=timings, total_s=round(time.perf_counter() - t_start, 2),
         peak_rss_mb=round(max(rss.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e6),
         start_rss_mb=round(base_rss / 1e6), stage_peak_rss_mb={k: round(v / 1e6) for k, v in rss.stage_peak.items()},
         threads=torch.get_num_threads(), **extra)


def measure(what: str, folder: Path, args: argparse.Namespace, ratio: str | None = None) -> dict[str, Any]:
    """Run one child and collect its result, or where it was when the time limit hit."""
    cmd = [sys.executable, __file__, "_child", "--what", what, "--folder", str(folder)]
    if ratio is not None:
        cmd += ["--ratio", ratio]
    for flag in ("unlearn_steps", "unlearn_batch", "noise_size", "verify_samples", "detect_steps", "detect_inputs"):
        if getattr(args, flag, None):
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    t0 = time.perf_counter()
    # stderr goes to a file: a pipe read only after exit stalls a child that warns a lot.
    errlog = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True)
    lines: list[dict[str, Any]] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.strip()
            if line.startswith("{"):
                lines.append(json.loads(line))
                if lines[-1]["kind"] == "stage":
                    print(f"    [{lines[-1]['t']:7.1f} s] {lines[-1]['stage']} (rss {lines[-1]['rss_mb']} MB)", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    import psutil

    child_proc = psutil.Process(proc.pid)
    why, max_rss = None, 0
    while proc.poll() is None:  # a time and a memory limit, so that a run cannot take the machine down
        try:
            max_rss = max(max_rss, child_proc.memory_info().rss)
        except psutil.Error:
            pass
        if time.perf_counter() - t0 > args.time_limit:
            why = f"no result within {args.time_limit:g} s"
        elif max_rss > args.rss_limit_gb * 1e9:
            why = f"RSS above the {args.rss_limit_gb:g} GB limit"
        if why:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.25)
    reader.join(timeout=5)
    wall = round(time.perf_counter() - t0, 1)
    errlog.seek(0)
    err = errlog.read().strip().splitlines()[-3:]
    errlog.close()
    result = next((l for l in lines if l["kind"] == "result"), None)
    if result is not None:
        return {**{k: v for k, v in result.items() if k not in ("kind", "t")}, "wall_s": wall}
    stages = [l for l in lines if l["kind"] == "stage"]
    return {
        "stopped": why or f"exit code {proc.returncode}",
        "max_rss_mb_seen": round(max_rss / 1e6),
        "last_stage": stages[-1]["stage"] if stages else None,
        "stage_starts": {l["stage"]: l["t"] for l in stages},
        "last_rss_mb": stages[-1]["rss_mb"] if stages else None,
        "stderr_tail": err,
        "wall_s": wall,
    }


TARGETS = {"repair_fixed_s": 180, "repair_auto_s": 300, "scan_s": 120}


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"targets": {**TARGETS, "peak_rss": "3 x fp32 weights + 1.5 GB"},
                           "fixed_ratio": args.fixed_ratio, "time_limit_s": args.time_limit,
                           "rss_limit_gb": args.rss_limit_gb, "models": {}}
    settings_note = {k: getattr(args, k) for k in ("unlearn_steps", "unlearn_batch", "noise_size", "verify_samples",
                                                  "detect_steps", "detect_inputs") if getattr(args, k)}
    with tempfile.TemporaryDirectory(prefix="otbr-speed-") as tmp:
        for name in args.models:
            print(f"== {name}", flush=True)
            folder = save_pipeline_model(name, Path(tmp) / name)
            weights = fp32_weight_bytes(folder)
            budget_mb = round((3 * weights + 1.5e9) / 1e6)
            row: dict[str, Any] = {"fp32_weights_mb": round(weights / 1e6), "rss_budget_mb": budget_mb,
                                   "settings_overrides": settings_note}
            for mode in args.modes:
                print(f"  {mode} ...", flush=True)
                if mode == "scan":
                    r = measure("scan", folder, args)
                    target = TARGETS["scan_s"]
                else:
                    ratio = "auto" if mode == "auto" else str(args.fixed_ratio)
                    r = measure("repair", folder, args, ratio)
                    target = TARGETS["repair_auto_s" if mode == "auto" else "repair_fixed_s"]
                seconds = r.get("total_s")
                r["time_target_s"] = target
                r["time_target_met"] = seconds is not None and seconds <= target
                r["rss_target_met"] = r.get("peak_rss_mb") is not None and r["peak_rss_mb"] <= budget_mb
                row[mode] = r
                print(f"  {mode}: {summary_line(r, budget_mb)}", flush=True)
            key = name if not settings_note else f"{name} ({', '.join(f'{k}={v}' for k, v in settings_note.items())})"
            out["models"][key] = row
    return out


def summary_line(r: dict[str, Any], budget_mb: int) -> str:
    if "stopped" in r:
        return f"{r['stopped']} (was in '{r['last_stage']}', max RSS seen {r['max_rss_mb_seen']} MB)"
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items() if k != "total")
    return (f"{r['total_s']:.1f} s (target {r['time_target_s']}: {'met' if r['time_target_met'] else 'MISSED'}), "
            f"peak RSS {r['peak_rss_mb']} MB (budget {budget_mb}: {'met' if r['rss_target_met'] else 'MISSED'}) [{stages}]")


def print_table(section: dict[str, Any]) -> None:
    print("\nmodel                          mode     seconds  target  peak RSS MB  budget MB  slowest stages")
    for name, row in section["models"].items():
        for mode in ("fixed", "auto", "scan"):
            r = row.get(mode)
            if not r:
                continue
            if "stopped" in r:
                print(f"{name[:30]:30} {mode:6} {'> ' + str(r['wall_s']):>9} {r['time_target_s']:>7} "
                      f"{'>=' + str(r['max_rss_mb_seen']):>12} {row['rss_budget_mb']:>10}  {r['stopped']} in {r['last_stage']}")
                continue
            slow = sorted(((v, k) for k, v in r["timings"].items() if k != "total"), reverse=True)[:3]
            print(f"{name[:30]:30} {mode:6} {r['total_s']:9.1f} {r['time_target_s']:>7} {r['peak_rss_mb']:>12} "
                  f"{row['rss_budget_mb']:>10}  " + ", ".join(f"{k} {v:.0f}s" for v, k in slow))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":
        p = argparse.ArgumentParser()
        p.add_argument("--what", choices=("repair", "scan"))
        p.add_argument("--folder")
        p.add_argument("--ratio", default="0.05")
        for flag in ("--unlearn-steps", "--unlearn-batch", "--noise-size", "--verify-samples", "--detect-steps", "--detect-inputs"):
            p.add_argument(flag, type=int, default=None)
        child(p.parse_args(argv[1:]))
        return 0
    if not argv or argv[0].startswith("-"):
        argv = ["pipeline", *argv]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    pl = sub.add_parser("pipeline", help="end-to-end repair and scan of full-size models")
    pl.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    pl.add_argument("--modes", nargs="+", default=["fixed", "auto", "scan"], choices=("fixed", "auto", "scan"))
    pl.add_argument("--fixed-ratio", type=float, default=0.05)
    pl.add_argument("--time-limit", type=float, default=1800, help="seconds before a run is stopped (default 1800)")
    pl.add_argument("--rss-limit-gb", type=float, default=12.0, help="stop a run whose RSS passes this (default 12)")
    pl.add_argument("--append", action="store_true", help="keep other models' rows already in the results file")
    for flag in ("--unlearn-steps", "--unlearn-batch", "--noise-size", "--verify-samples"):
        pl.add_argument(flag, type=int, default=None, help="repair setting override (default: the engine's)")
    pl.add_argument("--detect-steps", type=int, default=None, help="scan: detector steps (default: the engine's)")
    pl.add_argument("--detect-inputs", type=int, default=None, help="scan: detector inputs per class")

    em = sub.add_parser("emd", help="ot.emd time against layer width, and one fuse pass per model")
    em.add_argument("--widths", type=int, nargs="+", default=list(EMD_WIDTHS))
    em.add_argument("--max-width", type=int, default=4096)
    em.add_argument("--fuse-models", nargs="*", default=list(MODELS), choices=MODELS)
    em.add_argument("--fuse-ratio", type=float, default=0.05)
    em.add_argument("--no-parts", dest="parts", action="store_false", help="skip the per-step timing of wide layers")

    nw = sub.add_parser("nwc", help="NWC ranking agreement of cheaper unlearning budgets with the paper's")
    nw.add_argument("--models", nargs="+", required=True, help="model folders or pipeline names (resnet50, ...)")
    nw.add_argument("--reference", default=REFERENCE)
    nw.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="comma list of STEPSxBATCH[@SIZE]")
    nw.add_argument("--chunk", type=int, default=None, help="largest slice pushed through at once (memory)")
    nw.add_argument("--seed-floor", action="store_true", help="also compare the reference with itself at seed 1")
    nw.add_argument("--truth", default=None, help="a much larger budget (e.g. 20x2048) that both the reference and "
                    "the candidates are also compared with: the reference is itself a noisy estimate")
    nw.add_argument("--pairs", default=None, help="instead of comparing with the reference: run each of these "
                    "budgets (comma list) with seeds 1 and 2 and compare the two")
    nw.add_argument("--append", action="store_true", help="keep other models' rows already in the results file")

    args = p.parse_args(argv)
    info = machine()
    path = results_path("cpu")
    if args.mode == "pipeline":
        section = run_pipeline(args)
        save_section(path, "pipeline", section, info, merge_models=args.append)
        print_table(section)
    elif args.mode == "emd":
        data = run_emd(args)
        if not data["fuse"]:  # widths only: keep the fuse timings already on file
            try:
                data["fuse"] = json.loads(path.read_text()).get("emd", {}).get("fuse", {})
            except (OSError, ValueError):
                pass
        save_section(path, "emd", data, info)
    else:
        save_section(path, "nwc", run_nwc(args), info, merge_models=args.append)
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
