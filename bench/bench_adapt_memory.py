"""Adaptation memory (issue 14): peak RSS and seconds per step of few-shot adaptation, the full-batch step
without checkpointing (before) against micro-batches of shots with checkpointed extractor blocks (now).

Each configuration runs in a fresh subprocess (its peak RSS, `ru_maxrss`, is its own) under an
RLIMIT_DATA bound (`--cap-mib`, the mechanism `daemon/adaptation_job.py` uses), so a configuration that
needs more fails with MemoryError instead of pushing the host into the OOM killer; it is reported as
over the cap. B5 (`tf_efficientnet_b5`) has random weights (downloads are blocked; the arithmetic and the
memory are those of the pretrained one), the flow has the deployed 1024 hidden channels, the shots are
smooth random images, the run takes a fixed number of steps (no stopping rule) and 2 threads.
s/step: median wall time between consecutive optimiser updates (the first, which includes the
candidate's copy, is left out when there is more than one), CPU s/step the process's CPU time over the
same spans (both threads; less sensitive to other processes on the cores); s/first: start of the run to
the first update.
Usage:

    python bench/bench_adapt_memory.py [--runs b5:768:10:2:ckpt,b5:768:1:0:full,...] [--steps 2]
                                       [--cap-mib 9216] [--hidden 1024] [--json OUT]

A run is BACKBONE:SIZE:SHOTS:MICRO_BATCH:{ckpt,full} (micro-batch 0: all shots in one pass).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

BACKBONES = {"lite0": "efficientnet_lite0", "b5": "tf_efficientnet_b5"}
DEFAULT_RUNS = "b5:768:10:2:ckpt,b5:768:1:0:full,b5:768:1:1:ckpt"
MIB = 2**20


def smooth_shots(k: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random low-frequency RGB images in [0, 1] (like the tests' images, at `size`)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(k, 3, 16, 16, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def bench_one(spec: str, args: argparse.Namespace) -> dict:
    if args.cap_mib > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (args.cap_mib * MIB, args.cap_mib * MIB))
    torch.set_num_threads(args.threads)
    from adapters.adapt import AdaptConfig, adapt
    from csflow.backbones import NO_WEIGHTS
    from csflow.fit import build_model
    from csflow.flow import FlowConfig

    name, size, k, micro_batch, mode = spec.split(":")
    torch.manual_seed(0)
    model = build_model(BACKBONES[name], NO_WEIGHTS, int(size), FlowConfig(hidden_channels=args.hidden))
    shots = smooth_shots(int(k), int(size))
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = AdaptConfig(
        n_blocks=args.blocks,
        max_steps=args.steps,
        stop_quantile=None,
        micro_batch=int(micro_batch),
        checkpoint=mode == "ckpt",
    )
    stamps: list[tuple[float, float]] = []
    hook = register_optimizer_step_post_hook(lambda *_: stamps.append((time.perf_counter(), time.process_time())))
    t0 = (time.perf_counter(), time.process_time())
    try:
        result = adapt(model, shots, config)
    finally:
        hook.remove()
    walls, cpus = ([b[i] - a[i] for a, b in itertools.pairwise([t0, *stamps])] for i in (0, 1))
    later = slice(1, None) if len(walls) > 1 else slice(None)  # the first includes the candidate's copy
    return {
        "run": spec,
        "steps": result.steps,
        "s_per_step": statistics.median(walls[later]),
        "cpu_s_per_step": statistics.median(cpus[later]),
        "s_first": walls[0],
        "s_total": result.seconds,
        "rss_model_mib": rss_model,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "initial_nll": result.initial.nll,
        "final_nll": result.final.nll,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="BACKBONE:SIZE:SHOTS:MICRO_BATCH:{ckpt,full},...")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024, help="flow hidden channels (config.toml's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-mib", type=int, default=9216, help="RLIMIT_DATA of each run (0: none)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(bench_one(args.one, args)))
        return
    passthrough = ["--steps", str(args.steps), "--blocks", str(args.blocks), "--hidden", str(args.hidden)]
    passthrough += ["--threads", str(args.threads), "--cap-mib", str(args.cap_mib)]
    print(f"{'run':<24}{'steps':>6}{'s/step':>8}{'CPU s/step':>11}{'s/first':>9}{'model MiB':>11}{'peak MiB':>10}")
    results = []
    for spec in args.runs.split(","):
        done = subprocess.run(
            [sys.executable, __file__, "--one", spec, *passthrough], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            over = any(m in done.stderr for m in ("MemoryError", "can't allocate", "DefaultCPUAllocator"))
            why = f"over the {args.cap_mib} MiB cap" if over else done.stderr.strip().splitlines()[-1:]
            print(f"{spec:<24}  failed: {why}", flush=True)
            results.append({"run": spec, "failed": str(why)})
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"{spec:<24}{r['steps']:>6}{r['s_per_step']:>8.1f}{r['cpu_s_per_step']:>11.1f}{r['s_first']:>9.1f}"
            f"{r['rss_model_mib']:>11.0f}{r['peak_mib']:>10.0f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
