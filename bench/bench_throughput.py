"""Frames per second of the scoring call by serving mode and batch size, on any device.

B5 (random weights: the arithmetic is that of the real ones) at `--size`, the original flow (1024 hidden
channels), `csflow.scoring.score_images` without maps; on CUDA each timing ends with a synchronisation and
the peak is the allocated device memory, on the CPU the process's max RSS.

    python bench/bench_throughput.py --device cuda --size 768 --batches 1,8,16,32,64
        --modes fp32,bf16-flow+cl,bf16-blocks+cl,bf16+cl
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from csflow.backbones import NO_WEIGHTS
from csflow.fit import build_model, resolve_device
from csflow.flow import FlowConfig
from csflow.inference import prepare_for_serving
from csflow.scoring import score_images
from csflow.serving_options import parse_options


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="tf_efficientnet_b5")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batches", default="1,8,16,32,64")
    parser.add_argument("--modes", default="fp32,bf16-flow+cl,bf16-blocks+cl,bf16+cl")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per (mode, batch)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    print(f"{args.backbone} {args.size} px, {args.hidden} hidden channels on {device}")
    print(f"{'mode':16} {'batch':>5} {'frames/s':>9} {'ms/batch':>9} {'peak MiB':>9}")
    for mode in args.modes.split(","):
        options = parse_options(mode)
        model = build_model(args.backbone, NO_WEIGHTS, args.size, FlowConfig(hidden_channels=args.hidden))
        model = prepare_for_serving(model.to(device), options)
        for batch in (int(b) for b in args.batches.split(",")):
            images = torch.rand(batch, 3, args.size, args.size, device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                score_images(model, images, options=options)  # warm-up (and cudnn's algorithm search)
                calls, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds or calls < 2:
                    score_images(model, images, options=options)  # ends in .cpu(): synchronised
                    calls += 1
                elapsed = time.perf_counter() - t0
            except torch.OutOfMemoryError:
                print(f"{mode:16} {batch:5d} {'OOM':>9}", flush=True)
                break
            print(
                f"{mode:16} {batch:5d} {calls * batch / elapsed:9.1f} {1000 * elapsed / calls:9.1f} "
                f"{peak_mib(device):9.0f}",
                flush=True,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
