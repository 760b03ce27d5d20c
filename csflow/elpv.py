"""Export the ELPV solar-cell images (PyPI `elpv-dataset`) into the MVTec AD layout.

Normal = defect probability 0, defective = probability 1 (the uncertain 1/3 and 2/3 are left out),
one cell type. The split is a seeded permutation of the sorted file names, so it is reproducible.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from csflow.data import GOOD, DatasetError

DEFECTIVE = "defective"
MARKER = "export.json"


@dataclass(frozen=True)
class ElpvExport:
    cell_type: str = "mono"
    test_normal_fraction: float = 0.2
    seed: int = 0


def elpv_labels() -> tuple[Path, list[tuple[str, float, str]]]:
    """The package's image folder and its (file, defect probability, cell type) rows."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DatasetError("the ELPV export needs the package 'elpv-dataset' (pip install elpv-dataset)") from exc
    data_dir = Path(elpv_dataset.__file__).parent / "data"
    rows = []
    for line in (data_dir / "labels.csv").read_text().splitlines():
        if line.strip():
            name, prob, kind = line.split()
            rows.append((name, float(prob), kind))
    return data_dir, rows


def export_elpv(out: str | Path, spec: ElpvExport) -> dict[str, int]:
    """Write `out/train/good`, `out/test/good`, `out/test/defective`; skipped if already exported alike."""
    out = Path(out)
    marker = out / MARKER
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous.get("spec") == asdict(spec):
            return previous["counts"]
    data_dir, rows = elpv_labels()
    if spec.cell_type not in {kind for _, _, kind in rows}:
        raise DatasetError(f"unknown ELPV cell type {spec.cell_type!r} (mono or poly)")
    rows = sorted(r for r in rows if r[2] == spec.cell_type)
    normal = [name for name, prob, _ in rows if prob == 0.0]
    defective = [name for name, prob, _ in rows if prob == 1.0]
    order = np.random.default_rng(spec.seed).permutation(len(normal))
    n_test = round(len(normal) * spec.test_normal_fraction)
    test_normal = {normal[i] for i in order[:n_test]}
    split = {
        Path("train") / GOOD: [n for n in normal if n not in test_normal],
        Path("test") / GOOD: sorted(test_normal),
        Path("test") / DEFECTIVE: defective,
    }
    for sub in ("train", "test"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for folder, names in split.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(data_dir / name, out / folder / Path(name).name)
    counts = {str(folder): len(names) for folder, names in split.items()}
    marker.write_text(json.dumps({"spec": asdict(spec), "counts": counts}, indent=2))
    return counts
