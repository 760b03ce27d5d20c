"""What a shadow costs the worker per shadowed frame, as a ratio to serving the frame alone.

The worker scores each frame of the shadowed camera with the active version (the verdict), and with the
candidate in one more pass that also holds the frame's sensitivity probes (`[adapt]
shadow_probes_per_frame`) and returns the NLL, and scores the probes with the parent too, for its sensitivity
on the same frames (`daemon/worker.py` `_score_shadow`). This times both on the
same frames in one run, alternating, with a model directory of yours (its own model stands in for the
candidate: the cost does not depend on the weights) and images of a folder. Usage:

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

    def serve() -> None:
        for batch in frames.split(args.batch):
            score_images(version.model, batch)

    def probes_only() -> None:
        evaluation = ShadowEvaluation(calibration, [], shadow_config)
        for batch in frames.split(args.batch):
            evaluation.probe_images(batch)

    def shadow() -> None:
        evaluation = ShadowEvaluation(calibration, [], shadow_config)
        for batch in frames.split(args.batch):
            probes = evaluation.probe_images(batch)
            out = score_images(version.model, torch.cat([batch, probes]), nll=True)
            parent_probes = score_images(version.model, probes).image
            n = len(batch)
            rows = zip(out.image[:n], out.image[n:].reshape(n, -1), parent_probes.reshape(n, -1), strict=True)
            for c, q, r in rows:
                evaluation.update(c, c, 0.0, q.tolist(), r.tolist())

    serve()  # warm-up
    times: dict[str, list[float]] = {"serve": [], "shadow": [], "probes": []}
    for _ in range(args.reps):
        for name, run in (("serve", serve), ("shadow", shadow), ("probes", probes_only)):
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / len(frames) * 1000)
    serve_ms, shadow_ms = statistics.median(times["serve"]), statistics.median(times["shadow"])
    print(
        f"{version.model.extractor_name} {version.model.image_size} px, {len(frames)} frames, batch {args.batch}, "
        f"{shadow_config.probes_per_frame} probes per frame, {torch.get_num_threads()} threads, median of {args.reps}:"
    )
    print(f"  serving a frame:                {serve_ms:8.1f} ms")
    print(f"  its shadow (candidate, probes): {shadow_ms:8.1f} ms  ({shadow_ms / serve_ms:.2f}x the frame's serving)")
    probes_ms = statistics.median(times["probes"])
    print(f"  of which drawing the probes:    {probes_ms:8.1f} ms")
    print(f"  a shadowed frame in all:        {serve_ms + shadow_ms:8.1f} ms  ({1 + shadow_ms / serve_ms:.2f}x)")


if __name__ == "__main__":
    main()
