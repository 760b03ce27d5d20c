"""Few-shot adaptation cost: wall time per step and per run vs k, image size and backbone; adapter size.

Each configuration runs a fixed number of adaptation steps (no early stop, so runs are comparable) on
k real ELPV cells in its own subprocess (peak memory belongs to it alone). The wall time of a real run
is steps x s/step; the default stopping rule ended the ELPV runs in docs/RESULTS.md after 4-50 steps.
B5 uses random weights when the timm hub is unreachable (the arithmetic is the same). The adapter
size is the bytes of the first `--blocks` blocks' tensors, i.e. what an adapted version stores.
Usage:

    python bench/bench_adapt.py [--device cpu|cuda] [--configs lite0:256,b5:768] [--shots 1,5,10] [--steps 5]
                                [--hidden 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from adapters.adapt import AdaptConfig, adapt, blocks_nbytes
from csflow.backbones import LITE0, LITE0_PACKAGE, NO_WEIGHTS
from csflow.data import ImageLimits, decode_image, to_tensor
from csflow.elpv import elpv_labels
from csflow.fit import build_model, resolve_device
from csflow.flow import FlowConfig

BACKBONES = {"lite0": LITE0, "b5": "tf_efficientnet_b5"}


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_one(backbone: str, size: int, k: int, args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    weights = LITE0_PACKAGE if backbone == LITE0 else NO_WEIGHTS
    model = build_model(backbone, weights, size, FlowConfig(hidden_channels=args.hidden)).to(device)
    data_dir, rows = elpv_labels()
    shots = torch.stack(
        [to_tensor(decode_image((data_dir / n).read_bytes(), ImageLimits()), size) for n, _, _ in rows[:k]]
    )
    config = AdaptConfig(n_blocks=args.blocks, max_steps=args.steps, stop_quantile=None)  # fixed step count
    adapt(model, shots[:1].to(device), AdaptConfig(n_blocks=args.blocks, max_steps=1))  # warm-up
    t0 = time.perf_counter()
    result = adapt(model, shots.to(device), config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "backbone": backbone,
        "size": size,
        "k": k,
        "steps": result.steps,
        "s_per_step": seconds / max(result.steps, 1),
        "s_total": seconds,
        "adapter_kib": blocks_nbytes(model.extractor, args.blocks) / 1024,
        "peak_mib": peak_mib(device),
        "device": str(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="lite0:256,lite0:512,b5:512,b5:768", help="BACKBONE:SIZE,...")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64, help="flow hidden channels (the CPU demo's size)")
    parser.add_argument("--one", nargs=3, metavar=("BACKBONE", "SIZE", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(bench_one(args.one[0], int(args.one[1]), int(args.one[2]), args)))
        return
    shots = [int(k) for k in args.shots.split(",")]
    passthrough = ["--device", args.device, "--steps", str(args.steps), "--blocks", str(args.blocks)]
    passthrough += ["--hidden", str(args.hidden)]
    print(f"{'backbone':<24}{'size':>6}{'k':>4}{'s/step':>9}{'s total':>9}{'adapter KiB':>13}{'peak MiB':>10}")
    results = []
    configs = [(BACKBONES[name], int(size)) for name, size in (c.split(":") for c in args.configs.split(","))]
    for backbone, size in configs:
        for k in shots:
            cmd = [sys.executable, __file__, "--one", backbone, str(size), str(k), *passthrough]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{backbone:<24}{size:>6}{k:>4}  failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"{backbone:<24}{size:>6}{k:>4}{r['s_per_step']:>9.2f}{r['s_total']:>9.1f}"
                f"{r['adapter_kib']:>13.0f}{r['peak_mib']:>10.0f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
