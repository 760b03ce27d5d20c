"""Pictures: an evaluation (ROC, score histograms, anomaly-map overlays), the adaptation protocol's bar chart and
the demo's timeline (score per frame, thresholds, alarm and version markers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from adapters.protocol import SETTINGS, Row
from csflow.evaluation import Evaluation, roc

N_OVERLAYS = 4


def plot_evaluation(
    path: str | Path,
    title: str,
    evaluation: Evaluation,
    scores: np.ndarray,
    anomalous: np.ndarray,
    overlays: list[tuple[str, np.ndarray, np.ndarray]],
) -> None:
    """`overlays`: (caption, RGB image in [0, 1] (H, W, 3), anomaly map (H, W)) for up to 4 images."""
    fig = plt.figure(figsize=(14, 7), layout="constrained")
    grid = fig.add_gridspec(2, max(N_OVERLAYS, 2))
    ax_roc = fig.add_subplot(grid[0, 0:2])
    fpr, tpr = roc(scores, anomalous)
    op = evaluation.operating_point
    ax_roc.plot(fpr, tpr, label=f"image AUROC {evaluation.image_auroc:.3f}")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.scatter([op.fpr], [op.tpr], color="red", zorder=3, label=f"threshold: FPR {op.fpr:.2f}, TPR {op.tpr:.2f}")
    ax_roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    ax_roc.legend(loc="lower right")
    ax_hist = fig.add_subplot(grid[0, 2:])
    bins = np.histogram_bin_edges(scores, bins=40)
    ax_hist.hist(scores[~anomalous], bins=bins, alpha=0.6, label=f"normal (n={int((~anomalous).sum())})")
    ax_hist.hist(scores[anomalous], bins=bins, alpha=0.6, label=f"defective (n={int(anomalous.sum())})")
    ax_hist.axvline(op.threshold, color="red", ls="--", label="threshold")
    ax_hist.set(xlabel="anomaly score", ylabel="images", title="score distributions")
    ax_hist.legend()
    vmax = max((float(amap.max()) for _, _, amap in overlays[:N_OVERLAYS]), default=1.0)
    for i, (caption, image, amap) in enumerate(overlays[:N_OVERLAYS]):
        ax = fig.add_subplot(grid[1, i])
        ax.imshow(image)
        ax.imshow(amap, cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax)  # one scale: maps are comparable
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_protocol(
    path: str | Path, rows: Sequence[Row], shifts: Sequence[str], shots: Sequence[int], title: str
) -> None:
    """Figure 4 of the paper: per k, image AUROC of each setting grouped by shift, with the spread over folds."""
    width = max(7.0, 5.0 * len(shots))  # wide enough for the legend under a single panel
    fig, axes = plt.subplots(1, len(shots), figsize=(width, 5.5), squeeze=False, layout="constrained")
    width = 0.8 / len(SETTINGS)
    by_key = {(r.shift, r.k, r.setting): r for r in rows}
    for ax, k in zip(axes[0], shots, strict=True):
        for j, setting in enumerate(SETTINGS):
            found = [
                (i, by_key[(shift, k, setting)]) for i, shift in enumerate(shifts) if (shift, k, setting) in by_key
            ]
            if found:
                x = np.array([i for i, _ in found]) + (j - (len(SETTINGS) - 1) / 2) * width
                means, stds = [r.auroc_mean for _, r in found], [r.auroc_std for _, r in found]
                ax.bar(x, means, width, yerr=stds, capsize=2, label=SETTINGS[setting])
        ax.set_xticks(range(len(shifts)), shifts)
        ax.set(title=f"k = {k}", ylabel="image AUROC", ylim=(0.4, 1.0))
        ax.axhline(0.5, color="k", lw=0.6, ls=":")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2 if len(shots) == 1 else 3, fontsize=7)
    fig.suptitle(f"few-shot adaptation protocol: {title}")
    fig.savefig(path, dpi=90)
    plt.close(fig)


# One colour per meaning on the timeline; nothing else on it uses these.
TIMELINE_COLOURS = {
    "normal": "tab:blue",
    "defective": "tab:red",
    "confirmed": "tab:green",
    "threshold_source": "black",
    "threshold_adapted": "tab:purple",
    "shift": "tab:gray",
    "alarm": "tab:orange",
    "confirms": "tab:green",
    "rejected": "tab:brown",
    "serves": "tab:purple",
}
PHASE_SHADES = {"before_shift": "none", "shifted_before_adaptation": "#fde9d9", "after_adaptation": "#ebe3f5"}


@dataclass(frozen=True)
class TimelineMarker:
    """A vertical line on the timeline at frame `frame`; `kind` (shift, alarm, confirms, rejected, serves)
    picks its colour, `label` goes into the legend with the frame number."""

    frame: int
    kind: str
    label: str


@dataclass(frozen=True)
class TimelinePhase:
    """A shaded span of frames [start, end) (a key of PHASE_SHADES) with its legend label."""

    name: str
    start: int
    end: int
    label: str


def plot_timeline(
    path: str | Path,
    title: str,
    frames: np.ndarray,
    scores: np.ndarray,
    defective: np.ndarray,
    thresholds: Sequence[tuple[str, int, int, float]],
    markers: Sequence[TimelineMarker],
    phases: Sequence[TimelinePhase] = (),
    confirmed: Sequence[int] = (),
) -> None:
    """Score per frame by ground truth, the frames operators confirmed, each version's threshold over the
    frames it scored (`thresholds`: label, first frame, last frame, value; the first is the source
    version's), the phases shaded, and `markers`. Every label is in the legend, none on the plot, so they
    cannot overlap. Log scale when the scores span more than a factor of 30 (a shift can lift them far)."""
    c = TIMELINE_COLOURS
    fig, ax = plt.subplots(figsize=(14, 5.5), layout="constrained")
    for phase in phases:
        if PHASE_SHADES[phase.name] != "none" and phase.end > phase.start:
            ax.axvspan(phase.start, phase.end, color=PHASE_SHADES[phase.name], zorder=0, label=phase.label)
    ax.scatter(
        frames[~defective], scores[~defective], s=6, color=c["normal"], label=f"normal (n={int((~defective).sum())})"
    )
    ax.scatter(
        frames[defective],
        scores[defective],
        s=14,
        color=c["defective"],
        marker="x",
        label=f"defective (n={int(defective.sum())})",
    )
    is_confirmed = np.isin(frames, np.asarray(confirmed, dtype=frames.dtype))
    if is_confirmed.any():
        ax.scatter(
            frames[is_confirmed],
            scores[is_confirmed],
            s=70,
            facecolors="none",
            edgecolors=c["confirmed"],
            linewidths=1.5,
            label=f"confirmed normal by the operator (n={int(is_confirmed.sum())})",
        )
    for i, (label, first, last, value) in enumerate(thresholds):
        colour = c["threshold_source"] if i == 0 else c["threshold_adapted"]
        ax.hlines(value, first, last, colors=colour, linestyles="--", label=f"threshold, {label}")
    positive = scores[scores > 0]
    if positive.size and positive.max() / positive.min() > 30:
        ax.set_yscale("log")
    for marker in markers:
        ax.axvline(marker.frame, color=c[marker.kind], ls=":", lw=1.5, label=f"{marker.label} (frame {marker.frame})")
    ax.set(xlabel="frame", ylabel="anomaly score", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=90)
    plt.close(fig)
