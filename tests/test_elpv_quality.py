"""Real-data regression guard: CS-Flow trained on ELPV normal cells must separate defective ones.

Slow (about 5 minutes on 2 free CPU cores): run with `pytest -m slow`. Same settings as `make evaluate`
(lite0, 256 px, 64 hidden channels, 30 epochs); the figures are in docs/RESULTS.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli.main import main

pytestmark = pytest.mark.slow

# Measured with the [train] defaults (lr 2e-3, flow as the original): image AUROC 0.933, FPR 0.000, TPR 0.68
# (seed 0, 30 epochs; 15 epochs, seeds 0-2: 0.930-0.941, FPR 0.000), see docs/RESULTS.md; the floors leave
# room for seed and platform noise. At the original's lr 2e-4 this failed (AUROC 0.887).
MIN_IMAGE_AUROC = 0.90
MAX_NORMAL_FPR = 0.10  # calibrated for 1% on held-out normals; the test normals are other cells


def test_elpv_lite0_256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("INSPECTD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("INSPECTD_FLOW__HIDDEN_CHANNELS", "64")
    monkeypatch.setenv("INSPECTD_TRAIN__EPOCHS", "30")
    monkeypatch.setenv("INSPECTD_MODEL__DEVICE", "cpu")
    data, model, report = tmp_path / "elpv", tmp_path / "model", tmp_path / "eval.json"
    assert main(["export-elpv", "--out", str(data)]) == 0
    assert main(["train", "--data", str(data), "--image-size", "256", "--out", str(model)]) == 0
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert figures["n_normal"] == 118 and figures["n_anomalous"] == 313
    assert figures["image_auroc"] >= MIN_IMAGE_AUROC
    assert figures["operating_point"]["fpr"] <= MAX_NORMAL_FPR
