"""Drift monitor on real scores: false alarms, detection delay per domain shift, defect bursts.

Each test image of an MVTec-style folder (as written by `inspectd export-elpv`) is scored once under the
model, unshifted and under each shift of adapters/shifts.py. Streams are then built by resampling those
scores and fed to live `DriftMonitor`s whose reference is the model's own calibration sample (as in the
worker), so that the false alarms include the real gap between calibration and test images. Usage:

    python bench/bench_drift.py --model runs/MODEL --data data/elpv [--shifts dark,illumination,blur,noise]
        [--device cpu] [--ert 10000] [--window 100] [--scores CACHE.json] [--json OUT]

(a) false alarms per 10,000 frames of unshifted normal images (alarm, reset, go on);
(b) frames from the switch to a shifted domain (normal images only) to the alarm: median and p90 over
    repetitions, misses counted when nothing fired within --max-delay frames;
(c) defect bursts, no shift: --burst-frames frames in which each frame is a defective image with the
    given probability, between two stretches of normal frames; share of streams with an alarm, next to
    the same streams without the burst.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from adapters.shifts import SHIFTS, get_shift
from csflow.artifacts import load_model
from csflow.data import ImageLimits, load_dataset
from csflow.evaluation import evaluate_samples
from csflow.fit import resolve_device
from drift import DriftConfig, DriftMonitor, Reference, calibrate_thresholds

NO_SHIFT = "none"


def score_test_set(args: argparse.Namespace) -> tuple[dict, np.ndarray, dict[str, dict]]:
    """Manifest calibration, the defect mask of the test set, and per shift its scores and operating point.

    With --scores, they are read from that file when it exists (written otherwise), so that stream figures
    for other drift settings do not need the model again.
    """
    if args.scores and args.scores.exists():
        cached = json.loads(args.scores.read_text())
        scored = {name: {**v, "scores": np.asarray(v["scores"])} for name, v in cached["scored"].items()}
        return cached["calibration"], np.asarray(cached["anomalous"]), scored
    device = resolve_device(args.device)
    version = load_model(args.model, str(device))
    samples = load_dataset(args.data).test
    scored = {}
    for name in [NO_SHIFT, *args.shifts]:
        started = time.perf_counter()
        transform = None if name == NO_SHIFT else get_shift(name)
        result = evaluate_samples(
            version.model, samples, version.threshold, ImageLimits(), args.batch_size, transform=transform
        )
        op = result.evaluation.operating_point
        scored[name] = {"scores": result.scores, "fpr": op.fpr, "tpr": op.tpr, "auroc": result.evaluation.image_auroc}
        print(f"scored {name}: FPR {op.fpr:.3f} at the threshold ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.scores:
        plain = {name: {**v, "scores": v["scores"].tolist()} for name, v in scored.items()}
        cache = {"calibration": version.manifest.calibration, "anomalous": result.anomalous.tolist(), "scored": plain}
        args.scores.write_text(json.dumps(cache))
    return version.manifest.calibration, result.anomalous, scored


def run(monitor: DriftMonitor, scores: np.ndarray) -> int | None:
    """Frame (1-based, in `scores`) at which the monitor first alarms, None if it does not."""
    for i, score in enumerate(scores, 1):
        monitor.update(float(score))
        if monitor.drift_detected:
            return i
    return None


def false_alarms(template: DriftMonitor, normal: np.ndarray, args: argparse.Namespace, rng) -> dict:
    alarms = 0
    for _ in range(args.null_streams):
        monitor = DriftMonitor.from_state_dict(template.state_dict())
        stream = rng.choice(normal, args.null_frames)
        while (at := run(monitor, stream)) is not None:
            alarms += 1
            monitor.reset()
            stream = stream[at:]
    frames = args.null_streams * args.null_frames
    return {"frames": frames, "alarms": alarms, "per_10k": 1e4 * alarms / frames}


def delays(template: DriftMonitor, normal: np.ndarray, shifted: np.ndarray, args, rng) -> dict:
    found, early, missed, by = [], 0, 0, {"cusum": 0, "window": 0}
    for _ in range(args.repeats):
        monitor = DriftMonitor.from_state_dict(template.state_dict())
        if run(monitor, rng.choice(normal, args.lead)) is not None:
            early += 1
            continue
        at = run(monitor, rng.choice(shifted, args.max_delay))
        if at is None:
            missed += 1
        else:
            found.append(at)
            by[monitor.alarm.detector] += 1
    return {
        "median": float(np.median(found)) if found else None,
        "p90": float(np.quantile(found, 0.9)) if found else None,
        "missed": missed,
        "alarm_before_shift": early,
        "detected_by": by,
    }


def show(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def bursts(template: DriftMonitor, normal: np.ndarray, defective: np.ndarray, rate: float, args, rng) -> dict:
    with_burst = without = 0
    for _ in range(args.repeats):
        stream = rng.choice(normal, 2 * args.lead + args.burst_frames)
        burst = stream.copy()
        hit = args.lead + np.flatnonzero(rng.random(args.burst_frames) < rate)
        burst[hit] = rng.choice(defective, hit.size)
        with_burst += run(DriftMonitor.from_state_dict(template.state_dict()), burst) is not None
        without += run(DriftMonitor.from_state_dict(template.state_dict()), stream) is not None
    return {"alarm_share": with_burst / args.repeats, "alarm_share_without_burst": without / args.repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model version directory")
    parser.add_argument("--data", type=Path, required=True, help="MVTec-style folder with test/good and defects")
    parser.add_argument("--shifts", default="dark,illumination,blur,noise", help=f"of {', '.join(SHIFTS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ert", type=int, default=DriftConfig.ert)
    parser.add_argument("--window", type=int, default=DriftConfig.window)
    parser.add_argument("--quantile", type=float, default=DriftConfig.quantile)
    parser.add_argument("--cap", type=float, default=DriftConfig.cap)
    parser.add_argument("--slack", type=float, default=DriftConfig.slack)
    parser.add_argument("--null-streams", type=int, default=20, help="(a) streams of --null-frames frames")
    parser.add_argument("--null-frames", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=50, help="(b), (c) streams per shift / burst rate")
    parser.add_argument("--lead", type=int, default=200, help="normal frames before a shift or burst")
    parser.add_argument("--max-delay", type=int, default=2_000)
    parser.add_argument("--burst-rates", default="0.1,0.3")
    parser.add_argument("--burst-frames", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scores", type=Path, help="JSON cache of the test scores (read if present, else written)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    args.shifts = [s for s in args.shifts.split(",") if s]
    if args.device == "cpu":
        torch.set_num_threads(1)  # small batches; the machine is shared (see tests/conftest.py)
    rng = np.random.default_rng(args.seed)

    calibration, anomalous, scored = score_test_set(args)
    config = DriftConfig(ert=args.ert, window=args.window, quantile=args.quantile, cap=args.cap, slack=args.slack)
    reference = calibration["scores"]
    started = time.process_time()
    thresholds = calibrate_thresholds(Reference.from_scores(reference, config.min_reference), config)
    calibrate_s = time.process_time() - started
    template = DriftMonitor(reference, config, thresholds)
    normal = scored[NO_SHIFT]["scores"][~anomalous]
    defective = scored[NO_SHIFT]["scores"][anomalous]
    print(
        f"\nreference: {len(reference)} calibration scores, threshold {calibration['threshold']:.4f}; "
        f"test: {normal.size} normal, {defective.size} defective; drift thresholds {thresholds} "
        f"simulated in {calibrate_s:.2f} s CPU"
    )

    report: dict = {"config": dataclasses.asdict(config), "thresholds": dataclasses.asdict(thresholds)}
    report["calibrate_cpu_s"] = calibrate_s
    report["false_alarms"] = false_alarms(template, normal, args, rng)
    fa = report["false_alarms"]
    print(f"\n(a) no shift: {fa['alarms']} alarms in {fa['frames']} frames = {fa['per_10k']:.2f} per 10,000 frames")

    print(
        f"\n(b) {'shift':14} {'FPR@thr':>8} {'AUROC':>6} {'median':>7} {'p90':>6} {'missed':>7} {'early':>6} "
        f"{'cusum/window':>13}"
    )
    report["delays"] = {}
    for name in args.shifts:
        result = delays(template, normal, scored[name]["scores"][~anomalous], args, rng)
        report["delays"][name] = {**result, "fpr": scored[name]["fpr"], "auroc": scored[name]["auroc"]}

        print(
            f"    {name:14} {scored[name]['fpr']:8.3f} {scored[name]['auroc']:6.3f} {show(result['median']):>7} "
            f"{show(result['p90']):>6} {result['missed']:7d} {result['alarm_before_shift']:6d} "
            f"{result['detected_by']['cusum']:>6d}/{result['detected_by']['window']:<6d}"
        )

    print(f"\n(c) defect bursts of {args.burst_frames} frames between {args.lead}-frame normal stretches")
    report["bursts"] = {}
    for rate in (float(r) for r in args.burst_rates.split(",")):
        result = bursts(template, normal, defective, rate, args, rng)
        report["bursts"][str(rate)] = result
        print(
            f"    {rate:.0%} defective: alarm in {result['alarm_share']:.0%} of streams "
            f"({result['alarm_share_without_burst']:.0%} without the burst)"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
