"""What the demo does, and what its parts share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

Say = Callable[[str], None]

PHASES = ("before_shift", "shifted_before_adaptation", "after_adaptation")


@dataclass(frozen=True)
class DemoSpec:
    """What the demo does; the defaults are `inspectd demo`'s (sized for 2 CPU cores)."""

    out: Path = Path("runs/demo")
    data: Path = Path("data/elpv")
    shift: str = "dark"
    camera: str = "cam-1"
    frames_before: int = 200  # unshifted frames first
    frames_after: int = 400  # frames scored by the adapted version before the demo stops and judges it
    # The line counts as recovered when the adapted version served `frames_after` frames with no drift alarm
    # and rejects at most this much more of the normal cells (absolute share) than before the shift.
    recovery_margin: float = 0.02
    max_shifted: int = 400  # shifted frames scored without a drift alarm before giving up
    rate: float = 8.0  # frames per second (the CPU worker scores about 11/s at 256 px on 2 free cores)
    max_in_flight: int = 48  # the camera pauses while this many frames wait for a verdict (a slow machine)
    defect_share: float = 0.08  # share of defective cells among the frames
    shots: int | None = None  # frames the operator confirms per attempt (None: [adapt] min_shots)
    attempts: int = 2  # adaptation attempts (the operator confirms more frames after a rejection)
    # A person confirms frames in the operator console (`inspectd demo --console`) instead of the simulated
    # operator; the demo gives up when nobody has confirmed within person_timeout_s of the drift alarm.
    person: bool = False
    person_timeout_s: float = 900.0
    seed: int = 0
    fresh: bool = False  # retrain even if OUT/model matches
    # The model (trained on data/train/good; cached in OUT/model while these match).
    image_size: int = 256
    hidden_channels: int = 64
    epochs: int = 15
    # None: [train] lr (2e-3, chosen for short trainings like this one; see config.toml).
    lr: float | None = None
    max_train_images: int | None = None  # None: all
    # Worker settings that differ from the configuration (None: keep [drift] window / ert).
    drift_window: int | None = None
    drift_ert: int | None = None
    worker_env: Mapping[str, str] = field(default_factory=dict)  # extra INSPECTD_* (and other) variables
    config: str | None = None  # --config passed on to the worker
    # Time limits (seconds).
    ready_timeout_s: float = 180.0
    adapt_timeout_s: float | None = None  # None: the worker's own, [adapt] run_timeout_s + shadow_timeout_s
    drain_timeout_s: float = 120.0
    stop_timeout_s: float = 60.0
