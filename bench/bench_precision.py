"""The serving path's accuracy against fp32 on a labelled test set (ELPV): AUROC and verdicts.

A serving mode passes when its image AUROC is within `--auroc-tol` (0.002) of fp32's and at least
`--verdicts` (99.5 %) of the test images get the same verdict at the model's own threshold. Also prints
the largest relative score difference and the CPU time per image of each mode (2 threads).

    inspectd export-elpv --out data/elpv
    INSPECTD_FLOW__HIDDEN_CHANNELS=64 inspectd train --data data/elpv --image-size 256 --epochs 10 --out runs/prec
    .venv/bin/python bench/bench_precision.py --model runs/prec --data data/elpv
        [--modes fp32+cl,bf16-flow+cl,bf16-blocks+cl,bf16+cl]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from csflow.artifacts import load_model
from csflow.data import ImageLimits, load_dataset
from csflow.evaluation import ScoredTestSet, evaluate_samples
from csflow.inference import prepare_for_serving
from csflow.serving_options import parse_options

THREADS = 2


def scored(model_dir: Path, data: Path, mode: str, batch: int) -> tuple[ScoredTestSet, float, float]:
    """The test set scored under `mode` by a freshly loaded model, its threshold, and CPU ms per image."""
    version = load_model(model_dir)
    options = parse_options(mode)
    model = prepare_for_serving(version.model, options)
    samples = load_dataset(data).test
    t0 = time.process_time()
    result = evaluate_samples(model, samples, version.threshold, ImageLimits(), batch, options=options)
    return result, version.threshold, 1000 * (time.process_time() - t0) / len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument(
        "--modes", default="fp32+cl,bf16-flow+cl,bf16-blocks+cl,bf16+cl", help="serving modes against fp32"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--auroc-tol", type=float, default=0.002)
    parser.add_argument("--verdicts", type=float, default=0.995, help="least share of identical verdicts")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    reference, threshold, ref_ms = scored(args.model, args.data, "fp32", args.batch)
    ref_auroc = reference.evaluation.image_auroc
    ref_flags = reference.scores > threshold
    print(f"{len(reference.scores)} test images, threshold {threshold:.4f}")
    print(f"{'mode':16} {'AUROC':>7} {'dAUROC':>8} {'same verdicts':>14} {'max rel diff':>13} {'cpu ms/img':>11} ok")
    print(f"{'fp32':16} {ref_auroc:7.4f} {0:8.4f} {1:14.2%} {0:13.2e} {ref_ms:11.1f} -")
    failed = False
    for mode in args.modes.split(","):
        result, _, ms = scored(args.model, args.data, mode, args.batch)
        auroc = result.evaluation.image_auroc
        same = float(((result.scores > threshold) == ref_flags).mean())
        rel = float(np.max(np.abs(result.scores - reference.scores) / np.abs(reference.scores)))
        ok = abs(auroc - ref_auroc) <= args.auroc_tol and same >= args.verdicts
        failed |= not ok
        verdict = "yes" if ok else "NO"
        print(f"{mode:16} {auroc:7.4f} {auroc - ref_auroc:+8.4f} {same:14.2%} {rel:13.2e} {ms:11.1f} {verdict}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
