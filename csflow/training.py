"""Training the flow on pre-extracted features of normal images (the extractor stays frozen)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from csflow.model import CSFlow, FlowOutput, image_scores, per_sample_nll


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings are the original's (Adam 2e-4, eps 1e-4, wd 1e-5, clip 1.0, batch 16)."""

    epochs: int = 240
    batch_size: int = 16
    lr: float = 2e-4
    adam_eps: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    eval_every: int = 5
    seed: int = 0


@dataclass
class EpochRecord:
    epoch: int
    train_nll: float
    val_nll: float | None
    seconds: float


@dataclass
class TrainResult:
    """History per epoch and the epoch whose weights were kept (lowest held-out normal NLL)."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_val_nll: float = float("inf")
    seconds: float = 0.0

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / max(len(self.history), 1)


Features = list[Tensor]  # one (N, C, h, w) tensor per scale


@torch.no_grad()
def extract_features(model: CSFlow, batches: Iterable[Tensor], device: torch.device) -> Features:
    """Run the frozen extractor once over all images; the flow then trains on these tensors."""
    model.extractor.eval()
    per_batch = [[f.cpu() for f in model.features(b.to(device))] for b in batches]
    if not per_batch:
        raise ValueError("no images to extract features from")
    return [torch.cat(scale) for scale in zip(*per_batch, strict=True)]


def _take(features: Features, idx: Tensor | slice, device: torch.device) -> list[Tensor]:
    return [f[idx].to(device, non_blocking=True) for f in features]


@torch.no_grad()
def flow_outputs(
    model: CSFlow, features: Features, batch_size: int, device: torch.device, reduce: Callable[[FlowOutput], Tensor]
) -> Tensor:
    """`reduce(flow output)` for every sample of `features`, in batches, on the CPU."""
    model.flow.eval()
    n = features[0].shape[0]
    return torch.cat(
        [
            reduce(model.flow_forward(_take(features, slice(i, i + batch_size), device))).cpu()
            for i in range(0, n, batch_size)
        ]
    )


def features_nll(model: CSFlow, features: Features, batch_size: int, device: torch.device) -> Tensor:
    return flow_outputs(model, features, batch_size, device, per_sample_nll)


def features_scores(model: CSFlow, features: Features, batch_size: int, device: torch.device) -> Tensor:
    return flow_outputs(model, features, batch_size, device, lambda out: image_scores(out.z))


def features_scores_and_nll(
    model: CSFlow, features: Features, batch_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Image scores and per-sample NLLs from one flow pass (calibration stores both)."""
    both = flow_outputs(
        model, features, batch_size, device, lambda out: torch.stack((image_scores(out.z), per_sample_nll(out)), 1)
    )
    return both[:, 0], both[:, 1]


def train_flow(
    model: CSFlow,
    train: Features,
    val: Features | None,
    config: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Maximise the likelihood of normal features; keep the weights with the best held-out NLL.

    Training loss can jump between epochs, so the last epoch is not simply taken: every
    `eval_every` epochs (and at the end) the held-out normal NLL decides which weights are kept.
    Without held-out features the last epoch is kept. The trained flow is returned frozen
    (`requires_grad=False`): from here on it is served or adapted through, never written.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.flow.to(device).requires_grad_(True)
    optimizer = torch.optim.Adam(
        model.flow.parameters(), lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay
    )
    n = train[0].shape[0]
    result = TrainResult()
    best_state = None
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        model.flow.train()
        total, count = 0.0, 0
        for idx in torch.randperm(n, generator=generator).split(config.batch_size):
            loss = per_sample_nll(model.flow_forward(_take(train, idx, device))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.flow.parameters(), config.grad_clip)
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        if not math.isfinite(total):
            raise RuntimeError(f"training diverged at epoch {epoch} (non-finite loss); lower train.lr")
        val_nll = None
        if val is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
            val_nll = features_nll(model, val, config.batch_size, device).mean().item()
            if val_nll < result.best_val_nll:
                result.best_val_nll, result.best_epoch = val_nll, epoch
                best_state = copy.deepcopy(model.flow.state_dict())
        record = EpochRecord(epoch, total / count, val_nll, time.perf_counter() - t0)
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if best_state is not None:
        model.flow.load_state_dict(best_state)
    else:
        result.best_epoch = config.epochs
    result.seconds = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    model.flow.eval().requires_grad_(False)
    return result


def split_normals(
    n: int, val_fraction: float, calibration_fraction: float, seed: int
) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
    """A seeded split of n normal items into disjoint (train, weight selection, calibration) index lists.

    The threshold is a high quantile of the calibration scores; taking it on the images that also chose
    the kept epoch would bias it low (the kept weights are the ones that happen to fit those images
    best), so the two held-out sets are separate. Each gets at least one item.
    """
    n_val = max(1, round(n * val_fraction))
    n_cal = max(1, round(n * calibration_fraction))
    if n < n_val + n_cal + 1:
        raise ValueError(
            f"need at least {n_val + n_cal + 1} normal images to hold out {n_val} for weight selection and "
            f"{n_cal} for calibration, got {n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val + n_cal :]), sorted(perm[:n_val]), sorted(perm[n_val : n_val + n_cal])


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Sequence[int], Sequence[int]]:
    """A seeded split of n items into (train, held-out) index lists; held-out gets at least one item."""
    if n < 2:
        raise ValueError(f"need at least 2 normal images to hold some out for calibration, got {n}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])
