"""Memory and time of adapted versions served beside their base: built on the loaded base, or rebuilt.

Saves a base version (the configured backbone, image size and flow of config.toml, random flow weights:
memory does not depend on them) and two adapted versions of it (the first `--blocks` extractor blocks moved,
as `adapters.adapt` would), then, each in a fresh process, loads the base and the two adapted versions
either with `csflow.artifacts.load_adapted` (what `daemon/serving.py` does: flow and unadapted blocks
shared) or with `load_model` (a whole model each). Prints the parameter storage held by the three
models together (distinct storages by data_ptr), the resident-set growth, and the load time per adapted
version. Usage:

    python bench/bench_adapter_sharing.py [--image-size 256] [--blocks 5]

Prints figures only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make(root: Path, image_size: int, n_blocks: int) -> None:
    import torch

    from adapters.adapt import first_blocks
    from csflow.artifacts import load_model, save_adapter, save_model
    from csflow.calibration import calibrate
    from csflow.fit import build_model
    from csflow.model import image_scores
    from daemon.config import load_settings

    settings = load_settings(ROOT / "config.toml")
    torch.manual_seed(0)
    model = build_model(
        settings.model.backbone, settings.model.weights_source, image_size, settings.flow.to_config()
    ).eval()
    with torch.no_grad():
        calibration = calibrate(image_scores(model(torch.rand(4, 3, image_size, image_size)).z).numpy(), 0.1)
    save_model(root / "base", model, settings.model.weights_source, calibration, {"bench": "adapter sharing"})
    parent = load_model(root / "base")
    for i in (1, 2):
        candidate = copy.deepcopy(parent.model, memo={id(parent.model.flow): parent.model.flow})
        blocks = first_blocks(candidate.extractor, n_blocks)
        with torch.no_grad():
            for block in blocks.values():
                for p in block.parameters():
                    p.add_(0.01 * i)
        save_adapter(root / f"a{i}", candidate, parent, list(blocks), {"i": i}, "bench", parent_dir=root / "base")


def measure(root: Path, mode: str, n_blocks: int) -> dict[str, float]:
    import torch

    from adapters.adapt import blocks_nbytes
    from csflow.artifacts import load_adapted, load_model

    torch.set_num_threads(1)
    r0 = rss_mib()
    base = load_model(root / "base")
    r1 = rss_mib()
    started = time.perf_counter()
    adapted = [load_adapted(root / f"a{i}", base) if mode == "shared" else load_model(root / f"a{i}") for i in (1, 2)]
    seconds = (time.perf_counter() - started) / 2
    r2 = rss_mib()

    def storages(module: torch.nn.Module) -> dict[int, int]:
        tensors = [*module.parameters(), *module.buffers()]
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    held = storages(base.model)
    alone = sum(held.values())
    for version in adapted:
        held |= storages(version.model)
    return {
        "base_mib": alone / 2**20,
        "flow_mib": sum(t.nbytes for t in base.model.flow.state_dict().values()) / 2**20,
        "adapter_blocks_mib": blocks_nbytes(base.model.extractor, n_blocks) / 2**20,
        "three_models_mib": sum(held.values()) / 2**20,
        "rss_base_mib": r1 - r0,
        "rss_two_adapted_mib": r2 - r1,
        "seconds_per_adapted_load": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=5, help="adapted extractor blocks ([adapt] n_blocks)")
    parser.add_argument("--measure", choices=["shared", "rebuilt"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.root, args.measure, args.blocks)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make(root, args.image_size, args.blocks)
        for mode in ("shared", "rebuilt"):
            command = [sys.executable, __file__, "--measure", mode, "--root", str(root), "--blocks", str(args.blocks)]
            figures = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(
                f"{mode:8s} base {figures['base_mib']:.1f} MiB (flow {figures['flow_mib']:.1f}), adapter blocks "
                f"{figures['adapter_blocks_mib']:.2f} MiB; base + 2 adapted hold {figures['three_models_mib']:.1f} MiB "
                f"of parameter storage; RSS +{figures['rss_base_mib']:.0f} MiB for the base, "
                f"+{figures['rss_two_adapted_mib']:.0f} MiB for 2 adapted; "
                f"{figures['seconds_per_adapted_load']:.2f} s per adapted load"
            )


if __name__ == "__main__":
    main()
