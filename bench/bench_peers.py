"""inspectd's scoring against anomalib's `CsFlowModel` at equal settings, side by side in one run.

Both sides: B5 cut after the stage of 304 channels (timm `tf_efficientnet_b5` blocks[5]; anomalib:
torchvision `efficientnet_b5` features.6.8), 3 scales, 1024 hidden channels, kernels 3,3,3,5, clamp 3,
random weights (nothing is downloaded), input `torch.randn`, 2 threads. anomalib's timed call is its eval
forward (scores and anomaly maps, its only inference path); inspectd's is `csflow.scoring.score_images`
under each serving mode asked for (`fp32`, `bf16-flow`, `bf16-blocks` or `bf16`, with options joined by `+`: `cl`
channels-last, `fold` batch norms folded). Every (configuration, peer) runs in a fresh process,
`--rounds` times, the peers alternating within a round, so load from other processes falls on all of
them alike; a row's figure is the median over all its timed calls. anomalib's model hard-codes 304
channels: lite0 has no anomalib row.

    bash bench/peers_venv.sh              # once: .venv-peers with anomalib
    .venv/bin/python bench/bench_peers.py [--inspectd fp32,bf16-flow+cl,bf16-blocks+cl,bf16+cl] [--reps 5] [--rounds 2]
        [--only BACKBONE:SIZE:BATCH,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
B5, LITE0 = "tf_efficientnet_b5", "tf_efficientnet_lite0"
CONFIGS = [(B5, 256, 1), (B5, 256, 8), (B5, 768, 1), (B5, 768, 8), (LITE0, 256, 1), (LITE0, 256, 8)]
HIDDEN = 1024
THREADS = 2
ANOMALIB = "anomalib"


class StageClock:
    """Forward pre/post hooks on the extractor and the flow: their share of each call, for free."""

    def __init__(self, extractor: object, flow: object) -> None:
        self.seconds = {"extractor": 0.0, "flow": 0.0}
        for name, module in (("extractor", extractor), ("flow", flow)):
            module.register_forward_pre_hook(self._start(name))  # type: ignore[attr-defined]
            module.register_forward_hook(self._stop(name))  # type: ignore[attr-defined]
        self._t0: dict[str, float] = {}

    def _start(self, name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            self._t0[name] = time.process_time()

        return hook

    def _stop(self, name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            self.seconds[name] += time.process_time() - self._t0[name]

        return hook

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, {"extractor": 0.0, "flow": 0.0}
        return taken


def anomalib_call(size: int) -> tuple[Callable[[Any], object], StageClock]:
    import torchvision
    from anomalib.models.image.csflow import torch_model

    # Random weights: anomalib asks torchvision for ImageNet weights, which would be a download.
    torch_model.efficientnet_b5 = lambda weights=None: torchvision.models.efficientnet_b5(weights=None)
    model = torch_model.CsFlowModel((size, size), HIDDEN, n_coupling_blocks=4, clamp=3).eval()
    clock = StageClock(model.feature_extractor, model.graph)
    return model, clock


def inspectd_call(backbone: str, size: int, mode: str) -> tuple[Callable[[Any], object], StageClock]:
    import torch

    from csflow.backbones import NO_WEIGHTS
    from csflow.fit import build_model
    from csflow.flow import FlowConfig
    from csflow.inference import prepare_for_serving
    from csflow.scoring import score_images
    from csflow.serving_options import parse_options

    options = parse_options(mode)
    model = prepare_for_serving(build_model(backbone, NO_WEIGHTS, size, FlowConfig(hidden_channels=HIDDEN)), options)
    clock = StageClock(model.extractor, model.flow)

    def call(images: torch.Tensor) -> object:
        return score_images(model, images, options=options)

    return call, clock


def run_one(peer: str, backbone: str, size: int, batch: int, reps: int) -> dict:
    """One process, one peer, one configuration: `reps` timed calls after one warm-up."""
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if peer == ANOMALIB:
        call, clock = anomalib_call(size)
    else:
        call, clock = inspectd_call(backbone, size, peer)
    images = torch.randn(batch, 3, size, size)
    times: list[float] = []
    cpu_times: list[float] = []
    stages: list[dict[str, float]] = []
    with torch.inference_mode():
        for i in range(reps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            call(images)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            split = clock.take()
            if i:  # the first call pays for one-off allocations
                times.append(elapsed)
                cpu_times.append(cpu)
                stages.append(split)
    return {
        "peer": peer,
        "ms": [1000 * t / batch for t in times],
        "cpu_ms": [1000 * t / batch for t in cpu_times],
        "extractor_ms": [1000 * s["extractor"] / batch for s in stages],
        "flow_ms": [1000 * s["flow"] / batch for s in stages],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def spawn(peer: str, backbone: str, size: int, batch: int, reps: int) -> dict:
    python = str(PEERS_PYTHON) if peer == ANOMALIB else sys.executable
    # Threads sleep at barriers instead of spinning, so that a process's CPU time is its work: on a machine
    # shared with other jobs the wall time of a 2-thread forward mostly measures when both threads ran.
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [python, __file__, "--child", f"{peer}:{backbone}:{size}:{batch}", "--reps", str(reps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{peer} {backbone} {size} b{batch} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--inspectd", default="fp32,bf16-flow+cl,bf16-blocks+cl,bf16+cl", help="inspectd's serving modes"
    )
    parser.add_argument("--reps", type=int, default=5, help="timed calls per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per peer and configuration")
    parser.add_argument("--only", help="configurations BACKBONE:SIZE:BATCH, comma-separated (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peer, backbone, size, batch = args.child.split(":")
        print(json.dumps(run_one(peer, backbone, int(size), int(batch), args.reps)))
        return
    configs = CONFIGS
    if args.only:
        configs = [(b, int(s), int(n)) for b, s, n in (c.split(":") for c in args.only.split(","))]
    modes = args.inspectd.split(",")
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)", flush=True)
    print(
        f"{'config':14} {'peer':14} {'wall ms':>8} {'cpu ms':>8} {'extract':>8} {'flow':>8} {'peak MiB':>9} "
        f"{'wall ratio':>10} {'cpu ratio':>10}"
    )
    rows = []
    for backbone, size, batch in configs:
        peers = ([ANOMALIB] if backbone == B5 else []) + modes
        calls: dict[str, list[dict]] = {p: [] for p in peers}
        for r in range(args.rounds):
            for peer in peers if r % 2 == 0 else peers[::-1]:
                calls[peer].append(spawn(peer, backbone, size, batch, args.reps))
        base: dict | None = None
        for peer in peers:
            runs = calls[peer]
            row = {
                "backbone": backbone,
                "size": size,
                "batch": batch,
                "peer": peer,
                "ms_per_image": statistics.median(t for run in runs for t in run["ms"]),
                "cpu_ms_per_image": statistics.median(t for run in runs for t in run["cpu_ms"]),
                "extractor_ms": statistics.median(t for run in runs for t in run["extractor_ms"]),
                "flow_ms": statistics.median(t for run in runs for t in run["flow_ms"]),
                "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
                "load_average": load_average(),
            }
            if peer == ANOMALIB:
                base = row
            for key in ("ms_per_image", "cpu_ms_per_image"):
                row[key.replace("per_image", "ratio")] = row[key] / base[key] if base else None
            rows.append(row)
            short = "b5" if backbone == B5 else "lite0"
            ratios = [f"{row[k]:.2f}" if row[k] else "-" for k in ("ms_ratio", "cpu_ms_ratio")]
            print(
                f"{short + f' {size} b{batch}':14} {peer:14} {row['ms_per_image']:8.0f} {row['cpu_ms_per_image']:8.0f} "
                f"{row['extractor_ms']:8.0f} {row['flow_ms']:8.0f} {row['peak_rss_mib']:9.0f} {ratios[0]:>10} "
                f"{ratios[1]:>10}",
                flush=True,
            )
    print(f"load average at end: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
