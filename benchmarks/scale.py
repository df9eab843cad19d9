"""Does sharing models between processes pay? Times ``otbr-hub scan`` of several small
models in one process and in several processes started by ``accelerate launch``.

The models are small timm ResNets (1x32x32, 10 classes, random weights, one seed each)
saved to a temporary folder. Each configuration is one command, timed from start to exit,
so process start-up and imports count too:

* ``1 process``: the plain command, once with torch's default number of threads and once
  with one thread (``OMP_NUM_THREADS=1``);
* ``N processes``: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N``
  (the torchrun launcher on CPUs) with ``--num_cpu_threads_per_process 1``.

Both single-process variants are needed for a fair ratio: the launcher runs one thread per
process, and on a small, shared machine torch's default of one thread per core can be far
slower than one thread for the detector's small batches, which would make the processes
look better than they are. Every run must report every model exactly once, in order; the
speed-up is ``seconds(faster single-process variant) / seconds(N processes)``.

    python benchmarks/scale.py                      # 8 models, 1 vs 2 processes
    python benchmarks/scale.py --models 8 --processes 1 2 --repeats 2

Writes ``benchmarks/results/scale-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.speed import machine, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def make_models(root: Path, count: int) -> list[Path]:
    import timm
    import torch

    from otbr_hub.load import from_model
    from otbr_hub.save import save_model

    folders = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(16, 32, 64, 128), stem_width=16,
                                  in_chans=1, num_classes=10).eval()
        folders.append(save_model(from_model(model, input_size=(1, 32, 32), mean=(0.286,), std=(0.353,)), model,
                                  root / f"model-{seed}"))
    return folders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scan(folders: list[Path], processes: int, report: Path, detector: list[str], threads: int | None = None) -> dict[str, Any]:
    scan = ["scan", *map(str, folders), "--format", "json", "-o", str(report), "--fail-on", "none", "-q", *detector]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if processes == 1:
        cmd = [sys.executable, "-m", "otbr_hub", *scan]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()), "-m", "otbr_hub", *scan]
        env["ACCELERATE_USE_CPU"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{processes} process run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(report.read_text())
    targets = [t["target"] for t in data["targets"]]
    if targets != [str(f) for f in folders]:
        raise SystemExit(f"{processes} process run reported {targets}, expected each model once in order")
    detect = sum(t["timings"].get("detect", 0.0) for t in data["targets"])
    return {"processes": processes, "threads_per_process": threads or "default", "seconds": round(seconds, 1),
            "detect_seconds_sum": round(detect, 1),
            "targets": len(targets), "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (alternating); the best is kept")
    p.add_argument("--steps", type=int, default=None, help="detector steps per class (default: the engine's)")
    p.add_argument("--inputs-per-class", type=int, default=None)
    args = p.parse_args(argv)
    detector = ["--device", "cpu"]
    if args.steps:
        detector += ["--steps", str(args.steps)]
    if args.inputs_per_class:
        detector += ["--inputs-per-class", str(args.inputs_per_class)]
    info = machine()
    configs = [(1, None), (1, 1)] + [(n, 1) for n in args.processes if n > 1]
    label = {c: f"{c[0]} process{'es' if c[0] > 1 else ''}, {'default threads' if c[1] is None else '1 thread each'}"
             for c in configs}
    runs: dict[str, list[dict[str, Any]]] = {label[c]: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="otbr-scale-") as tmp:
        folders = make_models(Path(tmp), args.models)
        for rep in range(args.repeats):
            for c in configs:  # alternate, so that a change in machine load hits every configuration
                r = run_scan(folders, c[0], Path(tmp) / f"report-{c[0]}-{c[1]}-{rep}.json", detector, threads=c[1])
                runs[label[c]].append(r)
                print(f"{args.models} models, {label[c]}: {r['seconds']} s "
                      f"(detector {r['detect_seconds_sum']} s summed over models)", flush=True)
    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    single = min((r for r in best.values() if r["processes"] == 1), key=lambda r: r["seconds"])
    speedup = {name: round(single["seconds"] / r["seconds"], 2) for name, r in best.items() if r["processes"] > 1}
    out = {"machine": info, "models": args.models, "detector_flags": detector, "runs": runs, "best": best,
           "single_process_baseline_s": single["seconds"], "speedup_vs_best_single_process": speedup,
           "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = RESULTS / "scale-cpu.json"
    write_json(path, out)
    print("\nconfiguration                        seconds  speed-up vs best single process")
    for name, r in best.items():
        print(f"{name:36} {r['seconds']:7.1f}  {single['seconds'] / r['seconds']:8.2f}")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
