"""`inspectd train`, `score`, `evaluate`, `adapt`, `experiment` and `export-elpv`: the model offline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cli.common import EXIT_ERROR, EXIT_REJECTED, progress, warn_if_bf16_emulated

if TYPE_CHECKING:  # the model stack is imported by the commands that use it, so the CLI answers at once
    import numpy as np

    from csflow.artifacts import ModelVersion
    from csflow.fit import FitSpec
    from csflow.training import EpochRecord
    from daemon.config import Settings

T = TypeVar("T")


def fit_spec(args: argparse.Namespace, settings: Settings) -> FitSpec:
    """Training settings from the config, with the command line's --backbone/--image-size/--epochs/--seed."""
    from csflow.fit import FitSpec
    from daemon.config import override

    model_cfg = override(settings.model, "model", backbone=args.backbone, image_size=args.image_size)
    train_cfg = override(settings.train, "train", epochs=args.epochs, seed=args.seed)
    return FitSpec(
        backbone=model_cfg.backbone,
        weights=model_cfg.weights_source,
        image_size=model_cfg.image_size,
        flow=settings.flow.to_config(),
        train=train_cfg.to_config(),
        val_fraction=train_cfg.val_fraction,
        calibration_fraction=settings.calibration.heldout_fraction,
        target_fpr=settings.calibration.target_fpr,
        limits=settings.limits.to_limits(),
        probe_strengths=settings.calibration.probe_strengths,
    )


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    import structlog
    from tqdm import tqdm

    from csflow.artifacts import save_model
    from csflow.data import load_dataset
    from csflow.fit import fit, resolve_device

    log = structlog.get_logger()
    dataset = load_dataset(args.data)
    spec = fit_spec(args, settings)
    device = resolve_device(settings.model.device)
    paths = [s.path for s in dataset.train]
    log.info(
        "training",
        data=str(args.data),
        images=len(paths),
        device=str(device),
        backbone=spec.backbone,
        image_size=spec.image_size,
        epochs=spec.train.epochs,
        hidden_channels=spec.flow.hidden_channels,
    )
    bar = tqdm(total=spec.train.epochs, desc="train", file=sys.stderr, disable=None, leave=False)

    def on_epoch(record: EpochRecord) -> None:
        bar.update(1)
        bar.set_postfix(nll=f"{record.train_nll:.3f}", val=f"{record.val_nll:.3f}" if record.val_nll else "-")
        log.info(
            "epoch",
            epoch=record.epoch,
            train_nll=round(record.train_nll, 4),
            heldout_nll=None if record.val_nll is None else round(record.val_nll, 4),
            seconds=round(record.seconds, 1),
        )

    result = fit(paths, spec, device, progress, on_epoch)
    bar.close()
    manifest = save_model(args.out, result.model, spec.weights, result.calibration, result.summary(spec, len(paths)))
    log.info(
        "model saved",
        out=str(args.out),
        version=manifest.version,
        threshold=result.calibration.threshold,
        best_epoch=result.training.best_epoch,
        seconds_per_epoch=round(result.training.seconds_per_epoch, 2),
    )
    print(
        f"model {manifest.version} saved to {args.out} (threshold {result.calibration.threshold:.4f}, "
        f"{result.training.seconds:.0f} s training, {result.training.seconds_per_epoch:.1f} s/epoch)"
    )
    return 0


def _load(args: argparse.Namespace, settings: Settings) -> ModelVersion:
    from csflow.artifacts import load_model
    from csflow.fit import resolve_device

    return load_model(args.model, str(resolve_device(settings.model.device)))


def _load_served(args: argparse.Namespace, settings: Settings) -> ModelVersion:
    """A version prepared to serve under the [model] serving settings (not for adapting: it may be folded)."""
    from csflow.fit import resolve_device
    from csflow.inference import prepare_for_serving

    options = settings.model.serving_options()
    warn_if_bf16_emulated(options, resolve_device(settings.model.device))
    version = _load(args, settings)
    prepare_for_serving(version.model, options)
    return version


def cmd_score(args: argparse.Namespace, settings: Settings) -> int:
    from csflow.data import ImageError, read_image, to_tensor
    from csflow.scoring import score_images

    version = _load_served(args, settings)
    options = settings.model.serving_options()
    limits = settings.limits.to_limits()
    rows, failed = [], 0
    for path in args.images:
        try:
            image = to_tensor(read_image(path, limits), version.model.image_size)[None]
        except ImageError as exc:
            failed += 1
            rows.append({"image": str(path), "error": str(exc)})
            continue
        score = float(score_images(version.model, image, options=options).image[0])
        rows.append(
            {
                "image": str(path),
                "score": score,
                "threshold": version.threshold,
                "anomalous": score > version.threshold,
                "model_version": version.version,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if "error" in row:
                print(f"{row['image']}\tERROR\t{row['error']}")
            else:
                verdict = "ANOMALOUS" if row["anomalous"] else "normal"
                print(f"{row['image']}\t{row['score']:.4f}\t(threshold {row['threshold']:.4f})\t{verdict}")
    return EXIT_ERROR if failed else 0


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.shifts import get_shift
    from csflow.data import DatasetError, load_batch, load_dataset
    from csflow.evaluation import evaluate_samples
    from csflow.scoring import score_images
    from lab.plots import plot_evaluation

    version = _load_served(args, settings)
    options = settings.model.serving_options()
    model, size = version.model, version.model.image_size
    dataset = load_dataset(args.data)
    if not dataset.test:
        raise DatasetError(f"{args.data} has no test/ folder to evaluate on")
    limits = settings.limits.to_limits()
    shift = get_shift(args.shift, limits) if args.shift else None
    result = evaluate_samples(
        model, dataset.test, version.threshold, limits, settings.train.batch_size, progress, shift, options
    )
    evaluation = result.evaluation
    op = evaluation.operating_point
    print(
        f"image AUROC {evaluation.image_auroc:.4f}"
        + (f", pixel AUROC {evaluation.pixel_auroc:.4f}" if evaluation.pixel_auroc is not None else "")
        + f" | at threshold {op.threshold:.4f}: FPR {op.fpr:.3f}, TPR {op.tpr:.3f}, "
        f"balanced accuracy {op.balanced_accuracy:.3f} | {evaluation.n_normal} normal, "
        f"{evaluation.n_anomalous} defective"
    )
    for defect, auroc in evaluation.per_type_auroc.items():
        print(f"  {defect}: AUROC {auroc:.4f}")
    if args.json:
        report = {"model_version": version.version, "data": str(args.data), "shift": args.shift}
        report |= evaluation.to_dict()
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        picks = _overlay_picks(result.scores, result.anomalous)
        images = load_batch([dataset.test[i].path for i in picks], size, limits, shift)
        maps = score_images(model, images, maps=True, options=options).maps
        overlays = [
            (
                f"{'defective' if result.anomalous[i] else 'normal'}: {result.scores[i]:.3f}",
                image.permute(1, 2, 0).numpy(),
                amap,
            )
            for i, image, amap in zip(picks, images, maps, strict=True)
        ]
        plot_evaluation(
            args.plot, f"{args.data} — model {version.version}", evaluation, result.scores, result.anomalous, overlays
        )
    return 0


def _overlay_picks(scores: np.ndarray, anomalous: np.ndarray) -> list[int]:
    """The two highest-scoring defective images and the highest and lowest normal ones."""
    import numpy as np

    defective = np.flatnonzero(anomalous)[np.argsort(-scores[anomalous])][:2]
    normal = np.flatnonzero(~anomalous)[np.argsort(-scores[~anomalous])]
    return [*defective.tolist(), int(normal[0]), int(normal[-1])]


def cmd_adapt(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from adapters.gate import adapt_and_gate
    from adapters.shadow import ShadowDecision, shadow_stream
    from csflow.artifacts import save_adapter
    from csflow.data import load_batch
    from daemon.config import override
    from daemon.registry import RECALIBRATED_FROM

    parent = _load(args, settings)
    adapt_config, gate_config = override(
        settings.adapt, "adapt", max_steps=args.steps, n_blocks=args.blocks, lr=args.lr
    ).to_configs()
    shots = load_batch(args.images, parent.model.image_size, settings.limits.to_limits())
    gate_config = replace(gate_config, shadowed=bool(args.live))  # the live frames set the operating point
    gated = adapt_and_gate(parent, shots, adapt_config, gate_config)
    decision, result = gated.decision, gated.result
    recalibrate = settings.adapt.recalibrate
    evaluation = None
    if args.live and (decision.accepted or recalibrate):
        live = load_batch(args.live, parent.model.image_size, settings.limits.to_limits())
        evaluation = shadow_stream(
            parent.model,
            result.model,
            live,
            parent.manifest.threshold_calibration,
            list(decision.figures.get("defect_scores", [])),
            settings.adapt.shadow_config(),
            settings.drift.to_config(),
            settings.train.batch_size,
            list(decision.figures.get("parent_defect_scores", [])),
        )
    shadow: ShadowDecision | None = evaluation.decide() if evaluation is not None and decision.accepted else None
    reasons = [*decision.reasons, *(shadow.reasons if shadow else [])]
    if decision.accepted and shadow is None and gated.split.heldout_kind == "views":
        reasons.append("FAIL shadow: a candidate adapted on one image needs --live frames of the new domain")
    accepted = decision.accepted and not any(r.startswith("FAIL") for r in reasons)
    figures = {**decision.figures, **({"shadow": shadow.figures} if shadow else {})}
    # [adapt] recalibrate: a refused candidate's parent, put through the same live frames as its own candidate
    recalibration = evaluation.recalibration().decide() if evaluation is not None and not accepted else None
    if recalibration is not None:
        reasons += recalibration.reasons
        figures["recalibration"] = recalibration.figures
    recalibrated = recalibration is not None and recalibration.accepted
    report = {
        "accepted": accepted,
        "recalibrated": recalibrated,
        "reasons": reasons,
        "figures": figures,
        "adaptation": result.summary(),
    }
    if accepted or recalibrated:
        manifest = save_adapter(
            args.out,
            result.model if accepted else parent.model,
            parent,
            result.block_names,
            {**result.summary(), "gate": figures} if accepted else {RECALIBRATED_FROM: parent.version},
            domain=args.domain,
            parent_dir=args.model,
            calibration=(shadow.calibration if shadow else None) if accepted else recalibration.calibration,
        )
        report["version"] = manifest.version
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(
            f"adaptation: {result.steps} steps ({result.stop_reason}), {len(shots)} shots, "
            f"blocks {', '.join(result.block_names)}"
        )
        for key, value in report["figures"].items():
            print(f"  {key}: {value}")
        failed = "; ".join(reason for reason in reasons if not reason.startswith("ok"))
        if accepted:
            print(f"candidate ACCEPTED as version {report['version']} in {args.out}")
        elif recalibrated:
            print(f"candidate REJECTED: {failed}")
            print(f"parent RECALIBRATED as version {report['version']} in {args.out}")
        else:
            print(f"candidate REJECTED: {failed}")
    return 0 if accepted or recalibrated else EXIT_REJECTED


def cmd_experiment(args: argparse.Namespace, settings: Settings) -> int:
    import structlog

    from adapters.protocol import SETTINGS, Cell
    from adapters.shifts import get_shift
    from csflow.fit import resolve_device
    from lab.experiment import ExperimentSpec, run_experiment

    spec = ExperimentSpec(
        data=args.data,
        out=args.out,
        shifts=tuple(_csv(args.shift, str, "--shift")),
        shots=tuple(_csv(args.shots, int, "--shots")),
        folds=args.folds,
        fit=fit_spec(args, settings),
        adapt=settings.adapt.to_configs()[0],
        gate=settings.adapt.to_configs()[1],
        shadow=settings.adapt.shadow_config(),
        drift=settings.drift.to_config(),
        seed=args.seed or 0,
        source=args.source,
        settings=tuple(_csv(args.settings, str, "--settings")) if args.settings else tuple(SETTINGS),
    )
    unknown = set(spec.settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"--settings: unknown {', '.join(sorted(unknown))}; known: {', '.join(SETTINGS)}")
    if spec.folds < 1 or min(spec.shots) < 1:
        raise ValueError("--folds and every --shots value must be at least 1")
    for name in spec.shifts:
        get_shift(name, spec.fit.limits)  # an unknown shift fails now, not an hour in
    log = structlog.get_logger()

    def on_cell(cell: Cell) -> None:
        log.info("cell", key=cell.key, auroc=round(cell.auroc, 4), fpr=cell.fpr, tpr=cell.tpr, seconds=cell.seconds)

    run_experiment(spec, progress, on_cell, resolve_device(settings.model.device), compute=not args.report_only)
    print((args.out / "results.md").read_text())
    print(f"results: {args.out / 'results.json'}, table: {args.out / 'results.md'}, chart: {args.out / 'results.png'}")
    return 0


def _csv(text: str, kind: Callable[[str], T], option: str) -> list[T]:
    try:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option}: cannot read {text!r} as a comma-separated list") from None
    if not values:
        raise ValueError(f"{option}: empty list")
    return values


def cmd_export_elpv(args: argparse.Namespace, settings: Settings) -> int:
    from csflow.elpv import ElpvExport, export_elpv

    counts = export_elpv(args.out, ElpvExport(args.cell_type, args.test_fraction, args.seed))
    print(f"ELPV ({args.cell_type}) exported to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _add_fit_options(p: argparse.ArgumentParser, epochs: str, seed: str) -> None:
    """The training options that `fit_spec` reads."""
    p.add_argument("--backbone", help="timm backbone name (default from config)")
    p.add_argument("--image-size", type=int, help="square input size, a multiple of 128")
    p.add_argument("--epochs", type=int, help=epochs)
    p.add_argument("--seed", type=int, help=seed)


def add_model_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train CS-Flow on the normal images of a dataset",
        description="Train on DIR/train/good (MVTec layout) or a plain folder of normal images; "
        "a share is held out to select weights and calibrate the threshold.",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset folder")
    _add_fit_options(p, epochs="training epochs", seed="seed for the held-out split and training")
    p.add_argument("--out", type=Path, default=Path("models/latest"), help="model directory to write")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "score",
        help="score images with a model",
        description="Print score, threshold and verdict per image; exit 1 if any image could not be read.",
    )
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=cmd_score)

    p = sub.add_parser(
        "evaluate",
        help="AUROC and operating point on a labelled test set",
        description="Image AUROC, pixel AUROC where masks exist, per-defect-type AUROC and the "
        "FPR/TPR at the model's calibrated threshold, on DIR/test.",
    )
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("--data", required=True, type=Path, help="dataset folder (MVTec layout)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the figures as JSON")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="write ROC, histograms and overlays")
    p.add_argument("--shift", help="evaluate on the test set under this domain shift (e.g. dark, blur, style:REF.png)")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser(
        "adapt",
        help="adapt a model to a new domain from a few normal images",
        description="Tune the first extractor blocks on the images through the frozen flow, check the candidate "
        "on held-out shots and synthetic defects, then (with --live) on live frames of the new domain beside the "
        "parent, and write it as a new version if it passes. Exit 0 accepted, 3 rejected.",
    )
    p.add_argument("--model", required=True, type=Path, help="parent model directory")
    p.add_argument("--images", required=True, nargs="+", type=Path, metavar="IMG", help="normal target-domain images")
    p.add_argument("--out", required=True, type=Path, help="directory for the adapted version")
    p.add_argument(
        "--live",
        nargs="+",
        type=Path,
        metavar="FRAME",
        help="unlabelled frames of the new domain in stream order (mostly normal, may hold defects): the shadow "
        "evaluation, which sets the candidate's own threshold and drift reference; needed to accept one image",
    )
    p.add_argument("--domain", default="adapted", help="domain tag for the manifest")
    p.add_argument("--steps", type=int, help="maximum adaptation steps (default from [adapt])")
    p.add_argument("--blocks", type=int, help="number of early blocks to adapt (default from [adapt])")
    p.add_argument("--lr", type=float, help="learning rate (default from [adapt])")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(handler=cmd_adapt)

    p = sub.add_parser(
        "experiment",
        help="the paper's protocol: five settings per shift, k and fold",
        description="Trained on the shifted training set (best case), source model on shifted test (worst case), "
        "trained on the k shots, trained on source + k shots, and the source model adapted with the k shots, "
        "all on the same folds. Writes OUT/results.json (after every cell: a rerun resumes), results.md and "
        "results.png.",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset folder (MVTec layout)")
    p.add_argument("--shift", required=True, help="comma-separated shifts, e.g. dark,blur,style")
    p.add_argument("--shots", default="1,5,10", help="comma-separated k values (default 1,5,10)")
    p.add_argument("--folds", type=int, default=3, help="draws of the k shots per k (default 3)")
    p.add_argument("--out", required=True, type=Path, help="folder for results (resumed if it holds some)")
    p.add_argument("--source", type=Path, help="source model directory (default: trained into OUT/source)")
    _add_fit_options(p, epochs="epochs of every flow trained from scratch", seed="seed for the shots and the trainings")
    p.add_argument("--settings", help="comma-separated settings to compute (default all), e.g. adapted")
    p.add_argument("--report-only", action="store_true", help="write the table and chart from the cells done")
    p.set_defaults(handler=cmd_experiment)

    p = sub.add_parser(
        "export-elpv",
        help="export the ELPV solar cells into the MVTec layout",
        description="Normal = defect probability 0, defective = 1, one cell type; seeded split.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    p.add_argument("--cell-type", default="mono", choices=["mono", "poly"])
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of normal images for the test set")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_export_elpv)
