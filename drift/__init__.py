"""Online drift detection on per-camera anomaly-score streams; pure computation, no I/O."""

from drift.config import DriftConfig
from drift.monitor import Alarm, DriftMonitor
from drift.reference import Reference
from drift.thresholds import Thresholds, calibrate_thresholds

__all__ = ["Alarm", "DriftConfig", "DriftMonitor", "Reference", "Thresholds", "calibrate_thresholds"]
