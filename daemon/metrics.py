"""Prometheus metrics of one worker (own registry, so several workers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ADAPTATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


OTHER_CAMERAS = "_other"  # the label of cameras past the cap (not a valid camera id: no underscore start)


class WorkerMetrics:
    """`max_camera_series` bounds the per-camera series: the first cameras seen get their own label, the
    rest share `_other`, so that a flood of camera ids cannot grow the scrape without bound."""

    def __init__(self, max_camera_series: int = 1000) -> None:
        self.max_camera_series = max_camera_series
        self._cameras: set[str] = set()
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("inspectd_frames", "Frames handled, by outcome", ["outcome"], registry=r)
        self.bad_frames = Counter("inspectd_bad_frames", "Frames sent to the dead-letter topic", ["reason"], registry=r)
        self.batch_size = Histogram(
            "inspectd_batch_size", "Frames per scored batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.stage_seconds = Histogram(
            "inspectd_stage_seconds", "Time per batch stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e_latency = Histogram(
            "inspectd_end_to_end_latency_seconds",
            "From the frame's ts header to its verdict in Redis",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.scores = Histogram(
            "inspectd_score", "Anomaly scores", buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 100), registry=r
        )
        self.non_finite_scores = Counter(
            "inspectd_non_finite_scores", "Frames whose score was NaN or infinite (judged anomalous)", registry=r
        )
        self.model_load_failures = Counter(
            "inspectd_model_load_failures",
            "Model versions that could not be loaded (the camera kept what it served)",
            registry=r,
        )
        self.anomalous = Counter("inspectd_anomalous_frames", "Frames judged anomalous", ["camera_id"], registry=r)
        self.consumer_lag = Gauge(
            "inspectd_consumer_lag", "Records behind the partition end", ["partition"], registry=r
        )
        self.model = Info("inspectd_model", "The model version each camera is served", ["camera_id"], registry=r)
        self.drift_alarm = Gauge(
            "inspectd_drift_alarm", "1 while the camera's drift monitor is in alarm", ["camera_id"], registry=r
        )
        self.retries = Counter("inspectd_retries", "Retried operations after an outage", ["target"], registry=r)
        self.permanent_errors = Counter(
            "inspectd_permanent_errors",
            "Errors a retry cannot fix (NOPERM, WRONGTYPE, OOM), by target and error class",
            ["target", "error"],
            registry=r,
        )
        self.dlq_refused = Counter(
            "inspectd_dead_letters_refused",
            "Dead letters the DLQ topic refused for good (noted in Redis instead), by error class",
            ["error"],
            registry=r,
        )
        self.shadow_frames = Counter(
            "inspectd_shadow_frames", "Frames also scored by an adaptation candidate in shadow", registry=r
        )
        self.shadow_seconds = Counter(
            "inspectd_shadow_seconds", "Time spent scoring frames with a candidate in shadow", registry=r
        )
        self.confirmations = Counter(
            "inspectd_confirmations", "Operator confirmations handled, by outcome", ["outcome"], registry=r
        )
        self.adaptations = Counter(
            "inspectd_adaptations",
            "Adaptation runs by outcome: started, then accepted, rejected, failed (the child died) or superseded",
            ["outcome"],
            registry=r,
        )
        self.adaptation_seconds = Histogram(
            "inspectd_adaptation_seconds",
            "Wall time of an adaptation run's child process, from its start to its exit",
            buckets=ADAPTATION_BUCKETS,
            registry=r,
        )

    def camera(self, camera_id: str) -> str:
        """The label for a camera: its id while under the cap, else `_other`."""
        if camera_id in self._cameras:
            return camera_id
        if len(self._cameras) < self.max_camera_series:
            self._cameras.add(camera_id)
            return camera_id
        return OTHER_CAMERAS
