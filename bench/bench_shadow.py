"""What a shadow costs the worker per shadowed frame, as a ratio to serving the frame alone.

The worker scores each frame of the shadowed camera with the active version (the verdict); then the candidate
in one pass over the frame and its sensitivity probes (`[adapt] shadow_probes_per_frame`), with NLLs, and the
parent over the same probes, plus the frame with `[adapt] recalibrate` (the NLLs its recalibration needs)
(`daemon/worker.py` `shadow_pass`; this follows config.toml's `recalibrate`). A parent alone in shadow (its
candidate refused offline, `[adapt] recalibrate`) costs the parent's pass only. This times serving and both
kinds of shadow on the same frames in one run, alternating, with a model directory of yours (its own model
stands in for the candidate: the cost does not depend on the weights) and images of a folder. Usage:

    python bench/bench_shadow.py --model runs/demo-model --images data/elpv/test --frames 64 [--batch 16]

Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from adapters.shadow import ShadowEvaluation
    from csflow.artifacts import load_model
    from csflow.data import load_batch
    from csflow.scoring import score_images
    from daemon.config import load_settings
    from daemon.worker import shadow_pass

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="a folder of images (searched recursively)")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    settings = load_settings()
    version = load_model(args.model, "cpu")
    calibration = version.manifest.threshold_calibration
    if not calibration.probe_detection:
        sys.exit(f"{args.model} has no sensitivity reference: retrain it with `inspectd train`")
    paths = sorted(x for x in args.images.rglob("*") if x.suffix.lower() in {".png", ".jpg", ".jpeg"})[: args.frames]
    frames = load_batch(paths, version.model.image_size, settings.limits.to_limits())
    shadow_config = settings.adapt.shadow_config()
    options = settings.model.worker_serving_options()
    recalibrate = settings.adapt.recalibrate  # as the worker: the parent's frames again only for a recalibration

    def serve() -> None:
        for batch in frames.split(args.batch):
            score_images(version.model, batch, options=options)

    def probes_only() -> None:
        evaluation = ShadowEvaluation(calibration, [], shadow_config)
        for batch in frames.split(args.batch):
            evaluation.probe_images(batch)

    def shadow(with_candidate: bool) -> None:
        evaluation = ShadowEvaluation(calibration, [], shadow_config)
        for batch in frames.split(args.batch):
            probes = evaluation.probe_images(batch)
            parent = shadow_pass(version.model, batch, probes, options, not with_candidate or recalibrate)
            ours = shadow_pass(version.model, batch, probes, options) if with_candidate else parent
            rows = zip(parent.scores, ours.scores, ours.nll, ours.probes, parent.probes, parent.nll, strict=True)
            for row in rows:
                evaluation.update(*row)

    serve()  # warm-up
    times: dict[str, list[float]] = {"serve": [], "shadow": [], "parent": [], "probes": []}
    runs = (
        ("serve", serve),
        ("shadow", lambda: shadow(True)),
        ("parent", lambda: shadow(False)),
        ("probes", probes_only),
    )
    for _ in range(args.reps):
        for name, run in runs:
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / len(frames) * 1000)
    serve_ms, shadow_ms = statistics.median(times["serve"]), statistics.median(times["shadow"])
    print(
        f"{version.model.extractor_name} {version.model.image_size} px, {len(frames)} frames, batch {args.batch}, "
        f"{shadow_config.probes_per_frame} probes per frame, {torch.get_num_threads()} threads, median of {args.reps}:"
    )
    print(f"  serving a frame:                {serve_ms:8.1f} ms")
    print(f"  its shadow (candidate, parent): {shadow_ms:8.1f} ms  ({shadow_ms / serve_ms:.2f}x the frame's serving)")
    parent_ms = statistics.median(times["parent"])
    print(f"  its shadow (the parent alone):  {parent_ms:8.1f} ms  ({parent_ms / serve_ms:.2f}x)")
    probes_ms = statistics.median(times["probes"])
    print(f"  of which drawing the probes:    {probes_ms:8.1f} ms")
    print(f"  a shadowed frame in all:        {serve_ms + shadow_ms:8.1f} ms  ({1 + shadow_ms / serve_ms:.2f}x)")


if __name__ == "__main__":
    main()
