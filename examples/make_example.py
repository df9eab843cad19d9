"""Rebuild the bundled example model ``examples/badnets-resnet/``.

A tiny timm ResNet (about 320k parameters, 1.3 MB in fp32) trained on Fashion-MNIST with
a BadNets backdoor: a 3x3 white square one pixel from the bottom-right corner of the
32x32 input sends any image to class 3 ("Dress"). The target is deliberately not class 0,
so a tool that silently assumes target 0 gets caught. Training uses the benchmark zoo's
code and settings (``benchmarks/zoo.py``), poison rate 0.1, seed 0.

    python examples/make_example.py            # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))

import torch  # noqa: E402
import zoo  # noqa: E402

OUT = HERE / "badnets-resnet"
ATTACK = "badnets:target=3,size=3,pos=br"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the bundled BadNets ResNet example.")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--epochs", type=int, default=None, help="default: the zoo's resnet default")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or zoo.idle_cores())
    folder, meta = zoo.train_one("resnet", ATTACK, seed=0, epochs=args.epochs, out=args.out, force=True)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    print(f"wrote {folder} ({size:.2f} MB): ACC {meta['acc']:.2f}  ASR {meta['asr']:.2f}  RA {meta['ra']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
