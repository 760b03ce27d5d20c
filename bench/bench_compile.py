"""What `torch.compile` would give the extractor, and what it costs to start (issue 14's candidate list).

B5 cut after blocks[5], random weights, prepared as `--mode` serves it (default bf16-flow+cl: the extractor in
fp32 channels-last), 2 threads, `torch.randn` input. Times the extractor (all three scales) eagerly, then
compiled by inductor (with `--freeze`, weights folded in as constants), then eagerly again, and prints
median wall ms per image, the compile time of the first call, and the largest relative difference of the
features. The flow is left out: it already runs its convolutions in bf16. Usage:

    OMP_WAIT_POLICY=PASSIVE python bench/bench_compile.py [--size 256] [--batch 1] [--reps 8] [--freeze]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from csflow.backbones import NO_WEIGHTS
from csflow.fit import build_model
from csflow.flow import FlowConfig
from csflow.inference import prepare_for_serving
from csflow.serving_options import parse_options

THREADS = 2
HIDDEN = 1024


def median_ms(call: Callable[[], object], reps: int, batch: int) -> float:
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2] / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_b5")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--mode", default="bf16-flow+cl")
    parser.add_argument("--freeze", action="store_true", help="inductor's freezing: weights become constants")
    args = parser.parse_args()

    import torch._inductor.config as inductor

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    inductor.freezing = args.freeze
    options = parse_options(args.mode)
    model = build_model(args.backbone, NO_WEIGHTS, args.size, FlowConfig(hidden_channels=HIDDEN))
    extractor = prepare_for_serving(model, options).extractor
    images = torch.randn(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        eager = median_ms(lambda: extractor(images), args.reps, args.batch)
        compiled_extractor = torch.compile(extractor)
        start = time.perf_counter()
        compiled_extractor(images)
        compile_s = time.perf_counter() - start
        compiled = median_ms(lambda: compiled_extractor(images), args.reps, args.batch)
        eager_again = median_ms(lambda: extractor(images), args.reps, args.batch)
        difference = max(
            float((a - b).abs().max() / a.abs().max())
            for a, b in zip(extractor(images), compiled_extractor(images), strict=True)
        )
    print(
        f"{args.backbone} {args.size} b{args.batch} {args.mode}{' freeze' if args.freeze else ''}: extractor "
        f"eager {eager:.0f} / {eager_again:.0f} ms per image, compiled {compiled:.0f} "
        f"({compiled / ((eager + eager_again) / 2):.2f}x), first call {compile_s:.0f} s, "
        f"largest relative difference {difference:.1e}"
    )


if __name__ == "__main__":
    main()
