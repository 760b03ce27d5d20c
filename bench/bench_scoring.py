"""Scoring throughput, per-stage time and peak memory; training time per epoch.

Configurations: lite0 at 256/384/512 and B5 at 512/768, each in its own subprocess so that peak
memory (max RSS on the CPU, max allocated on CUDA) belongs to that configuration alone. Images are
real ELPV cells (encoded PNG, so decode time is real). Weights do not change the arithmetic, so B5
uses random weights when the timm hub is unreachable. Usage:

    python bench/bench_scoring.py [--device cpu|cuda] [--hidden 1024] [--batch 8] [--images 16] [--json OUT]

"train s/epoch(400)" is the time of one optimiser step on pre-extracted features, scaled to an
epoch of 400 images (the extractor runs once before training, not per epoch).
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

from csflow.backbones import LITE0, LITE0_PACKAGE, NO_WEIGHTS
from csflow.data import ImageLimits, decode_image, to_tensor
from csflow.elpv import elpv_labels
from csflow.fit import build_model, resolve_device
from csflow.flow import FlowConfig
from csflow.inference import prepare_for_serving
from csflow.model import image_scores, per_sample_nll
from csflow.serving_options import ServingOptions

CONFIGS = [(LITE0, 256), (LITE0, 384), (LITE0, 512), ("tf_efficientnet_b5", 512), ("tf_efficientnet_b5", 768)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: torch.device) -> float:
    """Peak so far: allocated CUDA memory, or the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def elpv_png_bytes(n: int) -> list[bytes]:
    data_dir, rows = elpv_labels()
    return [(data_dir / name).read_bytes() for name, _, _ in rows[:n]]


def bench_one(backbone: str, size: int, args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    weights = LITE0_PACKAGE if backbone == LITE0 else NO_WEIGHTS
    model = build_model(backbone, weights, size, FlowConfig(hidden_channels=args.hidden)).to(device)
    if args.channels_last:
        prepare_for_serving(model, ServingOptions(channels_last=True))
    blobs = elpv_png_bytes(args.images)
    limits = ImageLimits()
    stages = {"decode": 0.0, "preprocess": 0.0, "extractor": 0.0, "flow": 0.0}
    with torch.no_grad():
        model(torch.rand(2, 3, size, size, device=device))  # warm-up
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(0, len(blobs), args.batch):
            t0 = time.perf_counter()
            arrays = [decode_image(b, limits) for b in blobs[i : i + args.batch]]
            t1 = time.perf_counter()
            batch = torch.stack([to_tensor(a, size) for a in arrays]).to(device)
            sync(device)
            t2 = time.perf_counter()
            feats = model.features(batch)
            sync(device)
            t3 = time.perf_counter()
            image_scores(model.flow_forward(feats).z).cpu()
            t4 = time.perf_counter()
            for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stages[key] += dt
    total = sum(stages.values())
    peak_scoring = peak_mib(device)
    # training: optimiser steps on pre-extracted features (the second one timed), scaled to an epoch
    opt = torch.optim.Adam(model.flow.parameters(), lr=2e-4, eps=1e-4)
    with torch.no_grad():
        feats = model.features(torch.rand(args.train_batch, 3, size, size, device=device))
    model.flow.train()
    for _ in range(2):
        t0 = time.perf_counter()
        loss = per_sample_nll(model.flow_forward(feats)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
    step_s = time.perf_counter() - t0
    return {
        "backbone": backbone,
        "image_size": size,
        "device": str(device),
        "hidden_channels": args.hidden,
        "images_per_s": len(blobs) / total,
        "ms_per_image": {k: 1000 * v / len(blobs) for k, v in stages.items()},
        "peak_mib": peak_scoring,
        "peak_train_mib": peak_mib(device),
        "train_s_per_epoch_400": step_s * 400 / args.train_batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024, help="flow hidden channels (original: 1024)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=4, help="batch of the timed training step")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--only", help="BACKBONE:SIZE, run one configuration in this process")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.only:
        backbone, size = args.only.split(":")
        print(json.dumps(bench_one(backbone, int(size), args)))
        return
    rows = []
    passthrough = [
        "--device",
        args.device,
        "--hidden",
        str(args.hidden),
        "--batch",
        str(args.batch),
        "--images",
        str(args.images),
        "--train-batch",
        str(args.train_batch),
    ]
    passthrough += ["--channels-last"] if args.channels_last else []
    print(
        f"{'backbone':24} {'size':>5} {'img/s':>7} {'decode':>7} {'prep':>7} {'extract':>8} {'flow':>8} "
        f"{'peak MiB':>9} {'train s/epoch(400)':>19} {'train peak MiB':>15}"
    )
    for backbone, size in CONFIGS:
        cmd = [sys.executable, __file__, *passthrough, "--only", f"{backbone}:{size}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        ms = row["ms_per_image"]
        print(
            f"{backbone:24} {size:5d} {row['images_per_s']:7.2f} {ms['decode']:7.1f} {ms['preprocess']:7.1f} "
            f"{ms['extractor']:8.1f} {ms['flow']:8.1f} {row['peak_mib']:9.0f} {row['train_s_per_epoch_400']:19.1f} "
            f"{row['peak_train_mib']:15.0f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
