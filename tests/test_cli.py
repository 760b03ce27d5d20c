"""The command line end to end on a tiny synthetic dataset: train, score, evaluate, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli.main import main
from csflow.calibration import PROBE_REVISION
from csflow.inference import bf16_is_native

TINY = {
    "INSPECTD_FLOW__HIDDEN_CHANNELS": "8",
    "INSPECTD_MODEL__IMAGE_SIZE": "128",
    "INSPECTD_MODEL__DEVICE": "cpu",
    "INSPECTD_TRAIN__EPOCHS": "4",
    "INSPECTD_TRAIN__LR": "5e-3",  # a fresh flow is the identity: a few large steps make it a model
    "INSPECTD_TRAIN__BATCH_SIZE": "4",
    "INSPECTD_TRAIN__EVAL_EVERY": "1",
    "INSPECTD_TRAIN__VAL_FRACTION": "0.25",
    "INSPECTD_CALIBRATION__HELDOUT_FRACTION": "0.25",
    "INSPECTD_CALIBRATION__TARGET_FPR": "0.1",
}


def _cell(rng: np.random.Generator, defect: bool) -> Image.Image:
    """A grey textured square; defective ones carry a dark scratch."""
    img = (128 + 20 * rng.standard_normal((96, 96))).clip(0, 255)
    if defect:
        img[40:46, 10:90] = 10
    return Image.fromarray(img.astype(np.uint8), mode="L")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for folder, n, defect in (("train/good", 12, False), ("test/good", 4, False), ("test/scratch", 4, True)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            _cell(rng, defect).save(root / folder / f"{i:03d}.png")
    (root / "ground_truth/scratch").mkdir(parents=True)
    for i in range(4):
        mask = np.zeros((96, 96), np.uint8)
        mask[40:46, 10:90] = 255
        Image.fromarray(mask).save(root / "ground_truth/scratch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def model_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in TINY.items():
            mp.setenv(k, v)
        assert main(["train", "--data", str(dataset), "--out", str(out)]) == 0
    return out


@pytest.fixture(autouse=True)
def _tiny_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("INSPECTD_")]:
        monkeypatch.delenv(k)
    for k, v in TINY.items():
        monkeypatch.setenv(k, v)


def test_train_writes_a_verified_model(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert sorted(p.name for p in model_dir.iterdir()) == ["flow.safetensors", "manifest.json"]
    assert manifest["image_size"] == 128
    assert manifest["flow"]["hidden_channels"] == 8
    assert manifest["summary"]["n_train"] == 12
    assert manifest["summary"]["n_heldout"] == 3
    assert (manifest["summary"]["n_weight_selection"], manifest["summary"]["n_fit"]) == (3, 6)
    assert len(manifest["calibration"]["scores"]) == len(manifest["calibration"]["nll"]) == 3
    assert manifest["flow_revision"] == 2
    # the sensitivity probe's reference: every strength measured on the held-out normals
    detection = manifest["calibration"]["probe_detection"]
    assert list(detection) == ["0.25", "0.5", "0.75", "1"] and all(0.0 <= v <= 1.0 for v in detection.values())
    assert manifest["calibration"]["probe_revision"] == PROBE_REVISION  # which probe measured it


def test_score_prints_verdicts(model_dir: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = [str(dataset / "test/good/000.png"), str(dataset / "test/scratch/000.png")]
    assert main(["score", "--model", str(model_dir), *images, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == images
    for row in rows:
        assert row["anomalous"] == (row["score"] > row["threshold"])
        assert np.isfinite(row["score"])


@pytest.mark.parametrize("precision", ["fp32", "bf16-flow"])
def test_score_says_when_bf16_would_be_emulated(
    model_dir: Path, dataset: Path, precision: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bf16 on a CPU without native bf16 (AVX2 only) scores right, 17x slower: a warning naming the setting,
    on such a CPU only (this test's expectation follows the CPU it runs on)."""
    monkeypatch.setenv("INSPECTD_MODEL__PRECISION", precision)
    assert main(["score", "--model", str(model_dir), str(dataset / "test/good/000.png")]) == 0
    warned = "model.precision is bf16 on a device without native bf16" in capsys.readouterr().err
    assert warned == (precision != "fp32" and not bf16_is_native(torch.device("cpu")))


def test_score_reports_a_corrupt_image_and_goes_on(
    model_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = dataset / "test/good/001.png"
    assert main(["score", "--model", str(model_dir), str(bad), str(good)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "ERROR" in out[0] and "bad.png" in out[0]
    assert out[1].startswith(str(good)) and ("normal" in out[1] or "ANOMALOUS" in out[1])


def test_evaluate_writes_figures_and_plot(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    report, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    assert (
        main(
            ["evaluate", "--model", str(model_dir), "--data", str(dataset), "--json", str(report), "--plot", str(plot)]
        )
        == 0
    )
    figures = json.loads(report.read_text())
    assert figures["n_normal"] == 4 and figures["n_anomalous"] == 4
    assert 0.0 <= figures["image_auroc"] <= 1.0
    assert figures["pixel_auroc"] is not None
    assert set(figures["per_type_auroc"]) == {"scratch"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_tampered_model_is_refused(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "m"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["calibration"]["threshold"] = 1e9
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["score", "--model", str(copy), str(model_dir / "manifest.json")]) == 1
    assert "does not match version" in capsys.readouterr().err


def test_bad_image_size_flag_names_the_key(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(dataset), "--image-size", "200", "--out", str(tmp_path / "m")]) == 2
    assert "model.image_size" in capsys.readouterr().err


def test_adapt_reports_the_gate_and_writes_only_an_accepted_candidate(
    model_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from csflow.artifacts import load_model

    out = tmp_path / "adapted"
    shots = [str(dataset / "test/good" / f"{i:03d}.png") for i in range(4)]
    code = main(["adapt", "--model", str(model_dir), "--images", *shots, "--out", str(out), "--steps", "5", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["accepted"] else 3)
    assert report["adaptation"]["n_shots"] == 3  # one of four held out by the gate
    assert report["reasons"] and "figures" in report
    if report["accepted"]:
        adapted = load_model(out)
        assert adapted.manifest.parent == load_model(model_dir).version
        assert adapted.version == report["version"]
    else:
        assert not (out / "manifest.json").exists()


def test_one_image_is_never_accepted_without_live_frames_and_live_frames_decide(
    model_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offline gate made permissive, so that only the shadow can refuse."""
    monkeypatch.setenv("INSPECTD_ADAPT__MIN_VIEW_RECOVERY", "0")
    monkeypatch.setenv("INSPECTD_ADAPT__MIN_DEFECT_DETECTION", "0")
    from PIL import Image

    from adapters.shifts import get_shift

    def shifted(path: Path) -> str:  # a frame of the new domain: lamp light (higher scores than the source)
        target = tmp_path / "new" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(get_shift("lamp")(np.asarray(Image.open(path).convert("RGB")))).save(target)
        return str(target)

    out = tmp_path / "adapted"
    shot = shifted(dataset / "test/good/000.png")
    args = ["adapt", "--model", str(model_dir), "--images", shot, "--out", str(out), "--steps", "3", "--json"]
    assert main(args) == 3
    report = json.loads(capsys.readouterr().out)
    offline = [r for r in report["reasons"] if not r.startswith(("ok", "FAIL shadow"))]
    assert offline == [], f"the offline gate must pass for this test to mean anything: {offline}"
    assert not report["accepted"] and not (out / "manifest.json").exists()
    assert "FAIL shadow: a candidate adapted on one image needs --live frames of the new domain" in report["reasons"]

    live = [shifted(p) for p in sorted((dataset / "test").glob("*/*.png"))]  # stream order, defects included
    code = main([*args, "--live", *live])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["accepted"] else 3)
    assert report["figures"]["shadow"]["frames_seen"] == len(live)
    assert any(r.startswith(("ok shadow", "FAIL shadow")) for r in report["reasons"])
    if report["accepted"]:  # its own operating point, set on the live frames
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["calibration"]["threshold"] == report["figures"]["shadow"]["threshold"]


def test_adapt_rejects_a_broken_candidate_with_exit_3(
    model_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapted"
    shots = [str(dataset / "test/good" / f"{i:03d}.png") for i in range(4)]
    code = main(
        ["adapt", "--model", str(model_dir), "--images", *shots, "--out", str(out), "--steps", "20", "--lr", "5"]
    )
    assert code == 3, capsys.readouterr().out
    assert "REJECTED" in capsys.readouterr().out
    assert not (out / "manifest.json").exists()


def test_adapt_live_recalibrates_the_parent_of_a_refused_candidate_when_asked(
    model_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken candidate (refused offline) and live frames: without [adapt] recalibrate that is the end;
    with it, the parent goes through the live frames as its own candidate, and is written to --out with its
    weights and the new threshold exactly when that passes (exit 0), else nothing is written (exit 3)."""
    from csflow.artifacts import load_model

    shots = [str(dataset / "test/good" / f"{i:03d}.png") for i in range(4)]
    live = [str(p) for p in sorted((dataset / "test").glob("*/*.png"))]
    out = tmp_path / "adapted"
    args = ["adapt", "--model", str(model_dir), "--images", *shots, "--out", str(out), "--steps", "20", "--lr", "5"]
    assert main([*args, "--live", *live, "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert "recalibration" not in report["figures"] and not report["recalibrated"]

    monkeypatch.setenv("INSPECTD_ADAPT__RECALIBRATE", "true")
    code = main([*args, "--live", *live, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert not report["accepted"] and report["figures"]["recalibration"]["frames_seen"] == len(live)
    assert any(r.startswith(("ok recalibration", "FAIL recalibration")) for r in report["reasons"])
    assert code == (0 if report["recalibrated"] else 3)
    if report["recalibrated"]:
        parent, written = load_model(model_dir), load_model(out)
        assert written.manifest.summary["recalibrated_from"] == parent.version
        assert written.manifest.backbone_sha256 == parent.manifest.backbone_sha256
        assert written.threshold == report["figures"]["recalibration"]["threshold"]
    else:
        assert not (out / "manifest.json").exists()


def test_evaluate_under_a_shift(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    plain, shifted = tmp_path / "plain.json", tmp_path / "dark.json"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(dataset), "--json", str(plain)]) == 0
    args = ["evaluate", "--model", str(model_dir), "--data", str(dataset), "--json", str(shifted), "--shift", "dark"]
    assert main(args) == 0
    before, after = json.loads(plain.read_text()), json.loads(shifted.read_text())
    assert before["shift"] is None and after["shift"] == "dark"
    assert after["operating_point"]["fpr"] > before["operating_point"]["fpr"]  # darker normals look anomalous


def test_evaluate_unknown_shift_is_a_clear_error(
    model_dir: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", str(model_dir), "--data", str(dataset), "--shift", "sepia"]) == 1
    assert "unknown shift 'sepia'" in capsys.readouterr().err


def test_experiment_runs_every_setting_and_resumes(
    model_dir: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSPECTD_ADAPT__MAX_STEPS", "2")
    out = tmp_path / "exp"
    args = ["experiment", "--data", str(dataset), "--shift", "dark,style", "--shots", "1,2", "--folds", "2"]
    args += ["--out", str(out), "--source", str(model_dir)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    # per shift: target + source; per shift, k and fold: shots, source+shots, adapted
    assert len(cells) == 2 * 2 + 2 * 2 * 2 * 3
    assert {c["setting"] for c in cells.values()} == {"target", "source", "shots", "source+shots", "adapted"}
    assert all(0.0 <= c["auroc"] <= 1.0 and len(c["detail"]["scores"]) == 8 for c in cells.values())
    adapted = cells["dark/adapted/k=2/fold=1"]
    assert adapted["detail"]["steps"] <= 2 and len(adapted["detail"]["shots"]) == 2
    # the adapted setting is what a worker runs: the offline gate, then the shadow on half the test stream
    assert isinstance(adapted["detail"]["accepted"], bool) and adapted["detail"]["shadow_accepted"] in (True, False)
    assert adapted["detail"]["accepted"] == (
        adapted["detail"]["offline_accepted"] and adapted["detail"]["shadow_accepted"]
    )
    detail = adapted["detail"]  # kept: what a worker keeps, refused in shadow with an operating point
    refused_in_shadow = detail["offline_accepted"] and not detail["shadow_accepted"]
    assert detail["kept"] == (refused_in_shadow and detail["shadow"]["scale"] is not None)
    assert 0.0 <= adapted["detail"]["source_clean_tpr"] <= 1.0
    assert cells["dark/shots/k=1/fold=0"]["fpr"] is None  # no held-out normals, no threshold
    assert cells["dark/adapted/k=1/fold=0"]["detail"]["shots"] != cells["dark/adapted/k=1/fold=1"]["detail"]["shots"]
    table = (out / "results.md").read_text()
    assert "source model adapted with the k shots" in table and "| style |" in table
    assert "Does the gate decide right?" in table and "accepted-bad" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = (out / "results.json").read_text()
    assert main(args) == 0  # everything done: nothing recomputed (per-cell timings would differ)
    assert (out / "results.json").read_text() == before

    assert main([*args, "--epochs", "1"]) == 1  # other settings never mix into these results

    more = [a if a != "1,2" else "1,2,3" for a in args]  # k = 3 not computed: reported as missing
    assert main([*more, "--report-only"]) == 0
    assert (out / "results.json").read_text() == before
    table = (out / "results.md").read_text()
    assert "Incomplete: 12 planned cells not computed" in table and "| k = 3: AUROC (FPR / TPR) |" in table


def test_the_protocols_baselines_pick_weights_and_threshold_on_different_images(dataset: Path, tmp_path: Path) -> None:
    """The flows the protocol trains from scratch split their normals as `fit` does: the images that pick the
    kept epoch are not the ones that set the threshold (it would sit too low), nor trained on."""
    import torch

    from adapters.adapt import AdaptConfig
    from cli.main import build_parser
    from cli.model import fit_spec
    from csflow.fit import no_progress
    from daemon.config import load_settings
    from lab.experiment import ExperimentSpec, _Runner

    args = build_parser().parse_args(["experiment", "--data", str(dataset), "--shift", "dark", "--out", str(tmp_path)])
    spec = ExperimentSpec(dataset, tmp_path, ("dark",), (1,), 1, fit_spec(args, load_settings()), AdaptConfig())
    runner = _Runner(spec, torch.device("cpu"), no_progress)
    fit, select, cal = (set(idx) for idx in (runner.fit_idx, runner.select_idx, runner.cal_idx))
    assert fit and select and cal and not (fit & select or fit & cal or select & cal)
    assert fit | select | cal == set(range(len(runner.train_paths)))


def test_experiment_refuses_an_unknown_shift_before_working(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["experiment", "--data", str(dataset), "--shift", "dark,sepia", "--out", str(tmp_path / "e")]
    assert main(args) == 1
    assert "unknown shift 'sepia'" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
