"""The evaluation picture: ROC curve, score histograms and a few anomaly-map overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

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
