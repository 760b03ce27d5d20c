"""Few-shot domain adaptation of CS-Flow's early extractor blocks (Dobrevski & Skočaj).

The flow and every extractor block after the first `n_blocks` stay frozen; the first blocks are tuned so
that k normal frames of the new domain become likely again under the frozen flow, by minimising the
same per-sample NLL the flow was trained with, back-propagated through the flow. The extractor already
runs each image at three scales, so every shot is used at all three. Early blocks see colour, contrast
and texture statistics, which is what lighting, camera or material changes move; the deep blocks and
the flow keep what "normal" means.

Pure computation: no files, no logging. The candidate is a copy of the parent's extractor; the flow
module is shared with the parent (it is frozen and never written; at B5 it is hundreds of MB).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from adapters.augment import NO_AUGMENTATION, Augmentation, augment
from csflow.artifacts import ModelVersion
from csflow.calibration import Calibration
from csflow.extractor import FeatureExtractor
from csflow.model import CSFlow, image_scores, per_sample_nll
from csflow.serving_options import AUTO, forward_batch

StopReason = Literal["target", "max_steps", "diverged"]
StopStatistic = Literal["nll", "score"]


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of one adaptation run.

    lr 1e-4 with Adam (eps 1e-8, so steps do not depend on the gradients' scale): a usual fine-tuning
    rate for pretrained conv weights, half the flow's training rate, so 100 steps move a weight by at
    most ~1e-2 (Adam's step is about lr): enough to re-centre early features, too little to relearn
    them. `stop_quantile` and `stop_on` set the stopping target (see `adapt`); `max_steps` caps the run
    either way.
    `batch_norm='frozen'` keeps the running statistics (those of one or a few shots are meaningless; BN
    scale and shift are still tuned); `'batch'` uses batch statistics in the adapted blocks while
    training and updates their running ones.
    `micro_batch` shots go through each forward/backward pass (0: all at once; 'auto': the worker's
    forward-batch rule, see `micro_batch_size`), their gradients are
    accumulated, so the update is the full batch's (to float rounding) with a fraction of its
    activations; `checkpoint` keeps only each extractor block's input for the backward pass and
    recomputes the block there (about one more extractor forward per step). Together they bound B5 at
    768 px (see docs/RESULTS.md). With `batch_norm='batch'` the training pass stays one batch (its
    statistics are those of all shots) and only the frozen blocks are checkpointed.
    """

    n_blocks: int = 5
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-4
    momentum: float = 0.9  # sgd only
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # decay pulls toward zero, not toward the source weights: off
    grad_clip: float = 1.0
    max_steps: int = 100
    batch_norm: Literal["frozen", "batch"] = "frozen"
    augmentation: Augmentation = NO_AUGMENTATION  # measured on ELPV: augmented shots made clean ones worse
    stop_quantile: float | None = 0.5
    stop_on: StopStatistic = "nll"
    seed: int = 0
    micro_batch: int | Literal["auto"] = 2
    checkpoint: bool = True

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {self.n_blocks}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.batch_norm not in ("frozen", "batch"):
            raise ValueError(f"batch_norm must be 'frozen' or 'batch', got {self.batch_norm!r}")
        if not self.lr > 0 or self.max_steps < 0 or not self.grad_clip > 0:
            raise ValueError("need lr > 0, max_steps >= 0 and grad_clip > 0")
        if self.stop_quantile is not None and not 0.0 <= self.stop_quantile <= 1.0:
            raise ValueError(f"stop_quantile must be in [0, 1] or None, got {self.stop_quantile}")
        if self.stop_on not in ("nll", "score"):
            raise ValueError(f"stop_on must be 'nll' or 'score', got {self.stop_on!r}")
        if self.micro_batch != AUTO and not (isinstance(self.micro_batch, int) and self.micro_batch >= 0):
            raise ValueError(f"micro_batch must be >= 0 (0: all shots at once) or 'auto', got {self.micro_batch!r}")


@dataclass
class AdaptStep:
    """Clean shots (no augmentation, running BN statistics) before the update of `step`, and the loss
    of the batch that update used (None where no update followed; equal to `nll` when the update used
    the clean shots themselves)."""

    step: int
    nll: float
    score: float
    train_nll: float | None = None


@dataclass
class AdaptResult:
    """The candidate and how it got there. `history[i]` is the clean shots' state before update i;
    `steps` counts updates applied. After `stop_reason='diverged'` the last record is the non-finite one
    and the model holds the weights of the record before it."""

    model: CSFlow
    history: list[AdaptStep]
    steps: int  # optimiser updates taken
    stop_reason: StopReason
    target: float | None  # of the statistic `config.stop_on`
    block_names: list[str]
    config: AdaptConfig
    n_shots: int
    seconds: float

    @property
    def initial(self) -> AdaptStep:
        return self.history[0]

    @property
    def final(self) -> AdaptStep:
        return self.history[-1]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for the adapted version's manifest."""
        return {
            "method": "few-shot extractor adaptation (frozen flow NLL)",
            "n_shots": self.n_shots,
            "steps": self.steps,
            "stop_reason": self.stop_reason,
            "stop_on": self.config.stop_on,
            "target": self.target,
            "initial_nll": _json_float(self.initial.nll),
            "final_nll": _json_float(self.final.nll),
            "initial_score": _json_float(self.initial.score),
            "final_score": _json_float(self.final.score),
            "adapted_blocks": list(self.block_names),
            "seconds": round(self.seconds, 2),
            "config": asdict(self.config),
        }


def _json_float(x: float) -> float | None:
    """Manifests are strict JSON (no NaN/inf): a diverged run's figures are recorded as null."""
    return x if math.isfinite(x) else None


def flat_blocks(extractor: FeatureExtractor) -> dict[str, nn.Module]:
    """The extractor's blocks in the paper's flat order, keyed by state-dict prefix (`blocks.<stage>.<i>`).

    timm nests blocks in stages (lite0: 1, 2, 2, 3, 3, 4 up to blocks[5]); the paper and lukemelas count
    them flat, so "the first five" are blocks.0.0, blocks.1.0, blocks.1.1, blocks.2.0, blocks.2.1.
    """
    return {f"blocks.{s}.{i}": block for s, stage in enumerate(extractor.blocks) for i, block in enumerate(stage)}


def first_blocks(extractor: FeatureExtractor, n_blocks: int) -> dict[str, nn.Module]:
    blocks = flat_blocks(extractor)
    if not 1 <= n_blocks <= len(blocks):
        raise ValueError(f"n_blocks must be in [1, {len(blocks)}] for this extractor, got {n_blocks}")
    return dict(list(blocks.items())[:n_blocks])


def blocks_nbytes(extractor: FeatureExtractor, n_blocks: int) -> int:
    """Bytes of all state tensors (weights and BN buffers) of the first `n_blocks`: an adapter's payload."""
    return sum(
        t.numel() * t.element_size()
        for b in first_blocks(extractor, n_blocks).values()
        for t in b.state_dict().values()
    )


def check_shots(shots: Tensor, image_size: int) -> None:
    if shots.dim() != 4 or shots.shape[1] != 3 or shots.shape[2:] != (image_size, image_size):
        raise ValueError(f"shots must be (k, 3, {image_size}, {image_size}), got {tuple(shots.shape)}")
    if shots.shape[0] < 1:
        raise ValueError("adaptation needs at least one shot")
    if not torch.isfinite(shots).all() or shots.min() < 0 or shots.max() > 1:
        raise ValueError("shots must be finite and in [0, 1]")


def stop_target(
    calibration: Calibration | None, quantile: float | None, stop_on: StopStatistic = "nll"
) -> float | None:
    """The level adaptation aims for: a quantile of the source calibration NLLs (or image scores with
    `stop_on='score'`); None: no target.

    The NLL by default: it is what adaptation minimises. The image score leaves out the log-det, so the
    two can disagree on a shifted domain (measured on toy models: shots at the calibration median NLL
    still scored far above the median score); `'score'` is there for such cases."""
    if calibration is None or quantile is None:
        return None
    if stop_on == "score":
        return float(np.quantile(np.asarray(calibration.scores, dtype=np.float64), quantile))
    try:
        return calibration.nll_quantile(quantile)
    except ValueError as exc:
        raise ValueError(f"no stopping target: {exc}; retrain the model, or set stop_quantile to None") from exc


def micro_batch_size(setting: int | str, device_type: str, image_size: int, n_shots: int) -> int:
    """Shots per forward/backward pass. 'auto' follows the worker's forward batch
    (`csflow.serving_options.forward_batch`): all shots on a GPU (memory to spare, and batching pays), one
    on a CPU from 512 px (batching does not pay there, and it is the least memory), 8 below."""
    if setting == AUTO:
        return forward_batch(AUTO, device_type, image_size, n_shots)
    return min(int(setting), n_shots) or n_shots


def adapt(
    parent: ModelVersion | CSFlow,
    shots: Tensor,
    config: AdaptConfig | None = None,
    calibration: Calibration | None = None,
) -> AdaptResult:
    """Adapt the first `config.n_blocks` extractor blocks of `parent` to the normal `shots` (k, 3, S, S).

    Stopping rule: stop before the first update at which the clean shots' mean NLL (the objective) is at
    or below the `stop_quantile` (default: median) of the source calibration NLLs stored in the
    manifest, i.e. once the shots are as likely under the frozen flow as a typical held-out source
    normal (`stop_on='score'`: their mean image score against the calibration scores). Going further
    is what over-adapts (the shots then look more normal than source normals and defect sensitivity
    drops). `calibration` defaults to the parent manifest's; without one (a bare CSFlow) the run takes
    `max_steps` updates. A non-finite loss or shot NLL stops the run with the last
    weights that gave finite ones (`stop_reason='diverged'`; if the parent itself gives non-finite
    values, those are the parent's).

    With the defaults (no augmentation, frozen BN) the update's forward pass is that of the clean shots,
    so one forward per step serves both the stop check and the gradient; augmentation or batch-BN
    training need a separate clean pass for the check. Each micro-batch's backward runs right after its
    forward (that is what frees its activations), before the mean NLL is known: the pass that meets the
    target has run its backward for nothing, once per run.

    The parent is not modified. The candidate is returned in eval mode with its extractor frozen.
    """
    config = config or AdaptConfig()
    model = parent.model if isinstance(parent, ModelVersion) else parent
    if calibration is None and isinstance(parent, ModelVersion):
        calibration = parent.manifest.threshold_calibration
    check_shots(shots, model.image_size)
    target = stop_target(calibration, config.stop_quantile, config.stop_on)
    started = time.perf_counter()

    candidate = copy.deepcopy(model, memo={id(model.flow): model.flow})  # share the frozen flow
    candidate.extractor.requires_grad_(False)
    blocks = first_blocks(candidate.extractor, config.n_blocks)
    params = [p for block in blocks.values() for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = _optimizer(params, config)
    shots = shots.to(next(candidate.extractor.parameters()).device)
    micro_batch = micro_batch_size(config.micro_batch, shots.device.type, model.image_size, shots.shape[0])
    generator = torch.Generator().manual_seed(config.seed)

    history: list[AdaptStep] = []
    reason: StopReason = "max_steps"
    last_finite = _blocks_state(blocks)
    # the update's batch is the clean shots in eval mode: its forward is also the stop check's
    shared_forward = not config.augmentation.enabled and config.batch_norm == "frozen"
    # batch BN: the adapted blocks' statistics are those of the whole batch, and a recomputed block would
    # update its running ones twice
    batch_bn = config.batch_norm == "batch"
    train_micro_batch = 0 if batch_bn else micro_batch
    all_blocks = list(flat_blocks(candidate.extractor).values())
    checkpointed = (all_blocks[config.n_blocks :] if batch_bn else all_blocks) if config.checkpoint else []
    for step in range(config.max_steps + 1):
        train_nll: float | None = None
        if shared_forward and step < config.max_steps:
            candidate.eval()
            optimizer.zero_grad(set_to_none=True)
            nll, score = _forward_backward(candidate, shots, params, micro_batch, checkpointed)
            record = AdaptStep(step, nll, score)
            train_nll = nll  # the gradients of this pass are the update's
        else:
            record = _evaluate(candidate, shots, step, micro_batch)
        history.append(record)
        if not (math.isfinite(record.nll) and math.isfinite(record.score)):
            reason = "diverged"
            _load_blocks_state(blocks, last_finite)
            break
        last_finite = _blocks_state(blocks)  # a few hundred KB: cheap insurance against a bad step
        if target is not None and (record.nll if config.stop_on == "nll" else record.score) <= target:
            reason = "target"
            break
        if step == config.max_steps:
            break
        if train_nll is None:
            _train_mode(candidate, blocks, config.batch_norm)
            batch = augment(shots, config.augmentation, generator) if config.augmentation.enabled else shots
            optimizer.zero_grad(set_to_none=True)
            train_nll, _ = _forward_backward(candidate, batch, params, train_micro_batch, checkpointed)
            if not math.isfinite(train_nll):
                reason = "diverged"
                break
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        record.train_nll = train_nll

    optimizer.zero_grad(set_to_none=True)
    candidate.extractor.requires_grad_(False)
    candidate.eval()
    return AdaptResult(
        model=candidate,
        history=history,
        steps=sum(r.train_nll is not None for r in history),
        stop_reason=reason,
        target=target,
        block_names=list(blocks),
        config=config,
        n_shots=int(shots.shape[0]),
        seconds=time.perf_counter() - started,
    )


def _blocks_state(blocks: dict[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    return {name: {k: v.detach().clone() for k, v in block.state_dict().items()} for name, block in blocks.items()}


def _load_blocks_state(blocks: dict[str, nn.Module], state: dict[str, dict[str, Tensor]]) -> None:
    for name, block in blocks.items():
        block.load_state_dict(state[name])


def _optimizer(params: list[nn.Parameter], config: AdaptConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _train_mode(model: CSFlow, blocks: dict[str, nn.Module], batch_norm: str) -> None:
    """Everything in eval mode (no dropout / drop-path), except BN of the adapted blocks in 'batch' mode."""
    model.eval()
    if batch_norm == "batch":
        for block in blocks.values():
            for module in block.modules():
                if isinstance(module, _BatchNorm):
                    module.train()


def _forward_backward(
    model: CSFlow, images: Tensor, params: list[nn.Parameter], micro_batch: int, checkpointed: list[nn.Module]
) -> tuple[float, float]:
    """Mean NLL and image score of `images`, with the gradient of the mean NLL accumulated into `params`
    one micro-batch at a time: each part's NLL sum is divided by the whole count, so the parts' gradients
    add up to the full batch's mean. Only one micro-batch's activations (and, for `checkpointed`
    blocks, only their inputs) are alive at a time. Only `params` get gradients; the shared flow none."""
    n = images.shape[0]
    nll_sum = score_sum = 0.0
    with _checkpointed(checkpointed):
        for part in images.split(micro_batch or n):
            out = model(part)
            nll = per_sample_nll(out)
            (nll.sum() / n).backward(inputs=params)
            nll_sum += nll.detach().double().sum().item()
            score_sum += image_scores([z.detach() for z in out.z]).double().sum().item()
            del out, nll
    return nll_sum / n, score_sum / n


@contextmanager
def _checkpointed(blocks: Iterable[nn.Module]) -> Iterator[None]:
    """Run each of `blocks` under activation checkpointing: autograd keeps only the block's input and
    recomputes its inner activations during the backward pass. Patched on the instances (not wrapped),
    so the state-dict keys stay those of the extractor; undone on exit."""
    patched: list[nn.Module] = []
    try:
        for block in blocks:
            block.forward = _checkpoint_forward(type(block).forward.__get__(block))  # type: ignore[method-assign]
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward


def _checkpoint_forward(forward: Any) -> Any:
    def run(x: Tensor) -> Tensor:
        return checkpoint(forward, x, use_reentrant=False) if torch.is_grad_enabled() else forward(x)

    return run


@torch.no_grad()
def _evaluate(model: CSFlow, shots: Tensor, step: int, micro_batch: int = 0) -> AdaptStep:
    model.eval()
    nll = score = 0.0
    for part in shots.split(micro_batch or shots.shape[0]):
        out = model(part)
        nll += per_sample_nll(out).double().sum().item()
        score += image_scores(out.z).double().sum().item()
    n = shots.shape[0]
    return AdaptStep(step, nll / n, score / n)
