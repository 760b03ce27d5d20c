"""`inspectd run` serves under the settings' serving options ([model] precision, channels_last), the
configured version and the adapted versions it builds on it alike (issue 14); options it cannot serve are
refused at start."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import _verdict, in_process
from test_serving import adapted_copy, own_scope, send
from worker_line import Line, png, wait_ready

from csflow.artifacts import ModelVersion, load_model, save_adapter
from csflow.data import decode_image, to_tensor
from csflow.flow import ParallelAffineCoupling
from csflow.inference import _InPrecision
from csflow.scoring import score_images
from csflow.serving_options import SCORE_RTOL, parse_options
from daemon.config import ConfigError, LimitsSection, ModelSection, Settings
from daemon.controller import _candidate
from daemon.registry import ModelRegistry
from daemon.serving import prepare
from daemon.worker import Worker
from lab.services import LocalKafka, LocalRedis

PRECISIONS = ["bf16-flow", "bf16-blocks"]  # those the worker serves besides fp32
N_FRAMES = 4  # per camera


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_worker_serves_base_and_adapted_versions_under_the_serving_options(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """With a bf16 precision and channels-last, the configured base and an adapted version built on it run
    their flow's subnets in bf16 (one flow, shared; bf16-blocks: their extractor blocks too, on fp32 weights)
    and their extractors channels-last, and their verdicts' scores are the fp32 scores of the same frames
    within SCORE_RTOL. The worker used to serve fp32 whatever the settings said."""
    base = load_model(model_dir)
    candidate, names = adapted_copy(base.model, seed=1)
    save_adapter(tmp_path / "adapted", candidate, base, names, {"options": 1}, "target", parent_dir=model_dir)
    fp32 = {base.version: base, (adapted_fp32 := load_model(tmp_path / "adapted")).version: adapted_fp32}
    with LocalRedis() as server:
        line = Line(kafka, server.url, model_dir, tmp_path)
        registry = ModelRegistry.from_settings(line.redis, Settings(redis={"key_prefix": line.prefix}))
        registry.publish(model_dir)
        adapted = registry.publish(tmp_path / "adapted").version
        registry.activate(own_scope(registry, "cam-adapted"), adapted)
        env = {
            "INSPECTD_MODEL__PRECISION": precision,
            "INSPECTD_MODEL__CHANNELS_LAST": "true",
            "INSPECTD_REGISTRY__REFRESH_S": "0.2",
        }
        try:
            with in_process(line, model_dir, monkeypatch, **env) as running:
                wait_ready(running.port)
                worker = running.worker
                sent = send(line, "first", "cam-adapted", 1)  # its version loads meanwhile (the base stands in)
                _verdict(line, sent[0])
                deadline = time.monotonic() + 30
                while "cam-adapted" in worker.models.loading():
                    assert time.monotonic() < deadline, line.logs()
                    time.sleep(0.05)
                frames = send(line, "base", "cam-base", N_FRAMES) + send(line, "adapted", "cam-adapted", N_FRAMES)
                verdicts = [_verdict(line, f) for f in frames]
                with worker.models._lock:
                    served = {v: worker.models._loaded[v] for v in (base.version, adapted)}
        finally:
            line.close()
        assert running.outcome.get("rc") == 0, running.outcome
    assert [v["model_version"] for v in verdicts] == [base.version] * N_FRAMES + [adapted] * N_FRAMES
    limits = LimitsSection().to_limits()
    images = torch.stack([to_tensor(decode_image(png(i % N_FRAMES), limits), 128) for i in range(2 * N_FRAMES)])
    for version in (base.version, adapted):
        idx = [i for i, v in enumerate(verdicts) if v["model_version"] == version]
        expected = score_images(fp32[version].model, images[idx]).image
        got = np.array([verdicts[i]["score"] for i in idx])
        np.testing.assert_allclose(got, expected, rtol=SCORE_RTOL[precision])
        assert_prepared(served[version], precision)
    assert served[adapted].model.flow is served[base.version].model.flow


def assert_prepared(version: ModelVersion, precision: str) -> None:
    """bf16 convolutions in every coupling's subnets, fp32 channels-last weights in the extractor, whose blocks
    run in bf16 under bf16-blocks."""
    couplings = [m for m in version.model.flow.modules() if isinstance(m, ParallelAffineCoupling)]
    assert couplings
    for coupling in couplings:
        for subnet in (coupling.subnet_a, coupling.subnet_b):
            assert isinstance(subnet, _InPrecision), type(subnet)
            assert {p.dtype for p in subnet.parameters()} == {torch.bfloat16}
    weights = [p for p in version.model.extractor.parameters() if p.dim() == 4]
    assert weights and all(p.dtype == torch.float32 for p in weights)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert version.model.extractor.block_dtype == (torch.bfloat16 if precision == "bf16-blocks" else None)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_shadow_candidate_runs_under_its_parents_options(model_dir: Path, tmp_path: Path, precision: str) -> None:
    """The controller builds the shadow candidate on the served parent: on a bf16 channels-last parent it
    shares the parent's bf16 flow, keeps the channels-last layout (and bf16 blocks), passes the adapter's
    digest check and scores as the fp32 adapted version within SCORE_RTOL, as its parent does."""
    options = parse_options(f"{precision}+cl")
    parent = load_model(model_dir)
    candidate, names = adapted_copy(parent.model, seed=2)
    save_adapter(tmp_path / "adapter", candidate, parent, names, {"shadow": 1}, "target", parent_dir=model_dir)
    fp32_candidate = load_model(tmp_path / "adapter").model
    prepare(parent.model, options)
    shadow = _candidate(parent, tmp_path / "adapter")
    assert shadow.flow is parent.model.flow
    assert_prepared(ModelVersion(shadow, parent.manifest), precision)
    images = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(
        score_images(shadow, images, options=options).image,
        score_images(fp32_candidate, images).image,
        rtol=SCORE_RTOL[precision],
    )


@pytest.mark.parametrize("model", [{"fold_batch_norm": True}, {"precision": "bf16"}])
def test_the_worker_refuses_options_that_change_the_extractor(model: dict[str, object]) -> None:
    """Adapters are loaded into the served extractor's blocks: a folded or bf16 extractor cannot take them,
    so `inspectd run` refuses such settings at start (`score`/`evaluate` keep them)."""
    settings = Settings(model=ModelSection(**model))
    assert settings.model.serving_options()  # accepted for `score` / `evaluate`
    with pytest.raises(ConfigError, match="inspectd run"):
        Worker(settings, None, torch.device("cpu"))  # type: ignore[arg-type]
