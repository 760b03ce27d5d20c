"""What the verdict store keeps in a real Redis, and for how long (issue 11, item 3: a Redis that fits a plant).

Frames are cached only where an operator may confirm them (near or over the threshold, a deterministic
sample, a denser sample during a drift alarm), at the model's input size; verdict keys live for the
redelivery window; the verdicts stream is trimmed by time. Confirmations of a cached frame still reach the
adaptation buffer as the model saw the frame.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from console.thumbs import Thumbnails
from csflow.data import ImageLimits, decode_image, to_tensor
from daemon.config import ConfirmationsSection, LimitsSection, RedisSection
from daemon.confirmations import NOT_CACHED, AdaptationBuffer, ConfirmationProcessor, normal_entry, submit
from daemon.frames import Frame
from daemon.store import ALARM, NEAR, SAMPLE, CachePolicy, Keys, Verdict, VerdictStore, _bucket, cached_bytes
from lab.services import LocalRedis

KEYS = Keys("s:")
POLICY = CachePolicy(near_threshold=0.9, sample_every=1000, alarm_every=5)
VERDICT_TTL_S, FRAME_TTL_S = 600, 1800
MODEL_PX = 64


def store(client: redis.Redis, policy: CachePolicy = POLICY, retention_s: int = 3600) -> VerdictStore:
    return VerdictStore(client, KEYS, VERDICT_TTL_S, FRAME_TTL_S, 100_000, policy, retention_s)


def ids(camera: str, n: int, every: int, sampled: bool) -> list[str]:
    """Frame ids of `camera` that are (or are not) in the 1-in-`every` sample."""
    found, i = [], 0
    while len(found) < n:
        frame_id = f"{camera}-f{i:06d}"
        if (_bucket(camera, frame_id) % every == 0) == sampled:
            found.append(frame_id)
        i += 1
    return found


def jpeg(seed: int, px: int = 256) -> bytes:
    """A camera-like frame: larger than the model's input, noisy enough that PNG at that size is smaller."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(128, 40, (px, px, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def frame(frame_id: str, camera: str = "cam-1", data: bytes | None = None) -> Frame:
    return Frame(frame_id, camera, 1000, "image/jpeg", data or jpeg(len(frame_id)), "frames", 0, 0)


def verdict(frame_id: str, score: float, camera: str = "cam-1", drift: str = "ok", threshold: float = 1.0) -> Verdict:
    return Verdict(frame_id, camera, 1000, score, threshold, score > threshold, "v1", 5.0, drift, "", "ab" * 32)


def model_input(f: Frame) -> torch.Tensor:
    """What the worker scores: the decoded frame resized to the model's input size."""
    return to_tensor(decode_image(f.data, ImageLimits()), MODEL_PX)


def write(s: VerdictStore, verdicts: list[Verdict], frames: list[Frame]) -> int:
    """As the worker writes: the policy picks the frames, stored as the model's input."""
    return s.write_all(verdicts, s.to_cache(verdicts, frames, [model_input(f) for f in frames]))[0]


def test_a_normal_frame_far_below_the_threshold_is_not_cached(client: redis.Redis) -> None:
    s = store(client)
    frame_id = ids("cam-1", 1, 1000, sampled=False)[0]
    assert write(s, [verdict(frame_id, 0.3)], [frame(frame_id)]) == 1
    assert client.exists(KEYS.verdict(frame_id)) and not client.exists(KEYS.frame(frame_id))
    assert s.verdict(frame_id) == verdict(frame_id, 0.3)


@pytest.mark.parametrize("score", [0.9, 0.95, 1.5, float("nan")])
def test_a_frame_near_or_over_the_threshold_is_cached_at_the_models_input_size(
    client: redis.Redis, score: float
) -> None:
    s = store(client)
    frame_id = ids("cam-1", 1, 1000, sampled=False)[0]
    v = verdict(frame_id, score)
    if score != score:  # NaN: the worker judges it anomalous
        v = Verdict(frame_id, "cam-1", 1000, score, 1.0, True, "v1", 5.0, "ok", "non_finite_score", "ab" * 32)
    assert POLICY.reason(v) == NEAR
    f = frame(frame_id)
    write(s, [v], [f])
    data = client.get(KEYS.frame(frame_id))
    assert data is not None and len(data) < len(f.data)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.size == (MODEL_PX, MODEL_PX)
    # adaptation decodes it and resizes to the model's input: exactly the tensor the model scored
    assert torch.equal(to_tensor(decode_image(data, ImageLimits()), MODEL_PX), model_input(f))
    assert 0 < client.ttl(KEYS.frame(frame_id)) <= FRAME_TTL_S


def test_frames_encoded_on_the_workers_pool_are_the_same_bytes_in_frame_order() -> None:
    """The worker encodes a batch's cached frames on its thread pool: the same lossless bytes, each under
    its own frame id, as encoding them one by one."""
    s = store(redis.Redis())  # to_cache talks to no server
    frame_ids = ids("cam-1", 6, 1000, sampled=False)
    frames = [frame(i, data=jpeg(seed)) for seed, i in enumerate(frame_ids)]
    verdicts = [verdict(i, 1.5 if k % 3 else 0.2) for k, i in enumerate(frame_ids)]  # 4 of 6 over the threshold
    inputs = [model_input(f) for f in frames]
    with ThreadPoolExecutor(2) as pool:
        parallel = s.to_cache(verdicts, frames, inputs, pool)
    assert parallel == s.to_cache(verdicts, frames, inputs)
    assert list(parallel) == [v.frame_id for v in verdicts if v.anomalous]
    for f, x in zip(frames, inputs, strict=True):
        if f.frame_id in parallel:
            assert torch.equal(to_tensor(decode_image(parallel[f.frame_id], ImageLimits()), MODEL_PX), x)


def test_a_frame_sent_at_most_a_byte_per_input_pixel_is_cached_as_sent_without_encoding() -> None:
    """An ELPV-like cell (300 px grey PNG, model input 256 px): the PNG of the input would be a little smaller,
    but encoding it costs the worker's cores a few ms a frame. The bytes as sent are kept, and they decode to
    exactly what the model scored."""
    rng = np.random.default_rng(3)
    cell = np.clip(128 + np.cumsum(rng.normal(0, 2, (300, 300)), axis=1), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(cell).save(out, "PNG", compress_level=9)
    f = Frame("cell-1", "cam-1", 1000, "image/png", out.getvalue(), "frames", 0, 0)
    x = to_tensor(decode_image(f.data, ImageLimits()), 256)
    png = io.BytesIO()
    Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)).save(png, "PNG", compress_level=1)
    assert len(png.getvalue()) < len(f.data) <= 256 * 256  # the case: the PNG is smaller, the frame small
    cached = cached_bytes(f, x)
    assert cached == f.data
    assert torch.equal(to_tensor(decode_image(cached, ImageLimits()), 256), x)


def test_below_the_near_ratio_is_not_cached_and_a_negative_threshold_is_measured_the_same_way() -> None:
    frame_id = ids("cam-1", 1, 1000, sampled=False)[0]
    assert POLICY.reason(verdict(frame_id, 0.89)) is None
    assert POLICY.reason(verdict(frame_id, -1.05, threshold=-1.0)) == NEAR
    assert POLICY.reason(verdict(frame_id, -1.2, threshold=-1.0)) is None


def test_a_deterministic_sample_of_the_rest_is_cached(client: redis.Redis) -> None:
    s = store(client)
    sampled = ids("cam-1", 3, 1000, sampled=True)
    rest = ids("cam-1", 3, 1000, sampled=False)
    write(s, [verdict(i, 0.2) for i in sampled + rest], [frame(i) for i in sampled + rest])
    assert [bool(client.exists(KEYS.frame(i))) for i in sampled + rest] == [True] * 3 + [False] * 3
    assert {POLICY.reason(verdict(i, 0.2)) for i in sampled} == {SAMPLE}
    # about 1 in 1000 of a camera's frames
    share = np.mean([POLICY.reason(verdict(f"f{i}", 0.2)) == SAMPLE for i in range(20_000)])
    assert 0.0005 < share < 0.002


def test_frames_of_a_camera_in_drift_alarm_are_cached(client: redis.Redis) -> None:
    every_frame = store(client, CachePolicy(0.9, sample_every=0, alarm_every=1))
    frame_ids = [f"alarm-{i}" for i in range(20)]
    write(every_frame, [verdict(i, 0.2, drift="alarm") for i in frame_ids], [frame(i) for i in frame_ids])
    assert all(client.exists(KEYS.frame(i)) for i in frame_ids)
    ok = [f"ok-{i}" for i in range(20)]
    write(every_frame, [verdict(i, 0.2, drift="ok") for i in ok], [frame(i) for i in ok])
    assert not any(client.exists(KEYS.frame(i)) for i in ok)
    # the default samples the alarm's normal-looking frames (1 in 5), the same ones on every worker
    dense = ids("cam-2", 4, 5, sampled=True)
    sparse = ids("cam-2", 4, 5, sampled=False)
    sparse = [i for i in sparse if _bucket("cam-2", i) % 1000 != 0]
    s = store(client)
    vs = [verdict(i, 0.2, camera="cam-2", drift="alarm") for i in dense + sparse]
    write(s, vs, [frame(i, "cam-2") for i in dense + sparse])
    assert [bool(client.exists(KEYS.frame(i))) for i in dense] == [True] * 4
    assert not any(client.exists(KEYS.frame(i)) for i in sparse)
    assert {POLICY.reason(v) for v in vs[:4]} == {ALARM}


def test_verdict_keys_live_for_the_redelivery_window_and_a_cached_frames_verdict_as_long_as_the_frame(
    client: redis.Redis,
) -> None:
    s = store(client)
    normal, near = ids("cam-1", 2, 1000, sampled=False)
    write(s, [verdict(normal, 0.2), verdict(near, 0.95)], [frame(normal), frame(near)])
    assert 0 < client.ttl(KEYS.verdict(normal)) <= VERDICT_TTL_S
    assert VERDICT_TTL_S < client.ttl(KEYS.verdict(near)) <= FRAME_TTL_S  # confirmable as long as cached
    # the configured defaults: hours, not the former 7 days
    assert RedisSection().verdict_ttl_s <= 6 * 3600 and RedisSection().frame_ttl_s <= RedisSection().verdict_ttl_s
    # a redelivered frame still gets no second verdict
    assert write(s, [verdict(normal, 0.2)], [frame(normal)]) == 0
    assert client.xlen(KEYS.verdicts) == 2


def test_the_verdicts_stream_is_trimmed_by_time(client: redis.Redis) -> None:
    old_ms = int(time.time() * 1000) - 2 * 3600 * 1000  # two hours ago: past a one-hour retention
    pipe = client.pipeline(transaction=False)
    for i in range(500):
        pipe.xadd(KEYS.verdicts, {"frame_id": f"old-{i}"}, id=f"{old_ms}-{i}")
    pipe.execute()
    recent = ids("cam-1", 3, 1000, sampled=False)
    write(store(client, retention_s=3600), [verdict(i, 0.2) for i in recent], [frame(i) for i in recent])
    left = [f[b"frame_id"].decode() for _, f in client.xrange(KEYS.verdicts)]
    assert left[-3:] == recent  # what is within the retention stays
    assert len(left) - 3 < 100, f"{len(left) - 3} entries older than the retention are left"  # ~: whole nodes
    # with retention 0 the stream is trimmed by count only (as before)
    client.delete(KEYS.verdicts)
    for i in range(300):
        client.xadd(KEYS.verdicts, {"frame_id": f"old-{i}"}, id=f"{old_ms}-{i}")
    more = ids("cam-1", 4, 1000, sampled=False)[3:]
    write(store(client, retention_s=0), [verdict(i, 0.2) for i in more], [frame(i) for i in more])
    assert client.xlen(KEYS.verdicts) == 301


def test_a_cached_frame_is_confirmed_into_the_buffer_as_the_model_saw_it_and_its_thumbnail_renders(
    client: redis.Redis,
) -> None:
    cfg = ConfirmationsSection(buffer_max_frames=10, claim_min_idle_ms=100)
    s = store(client)
    near, normal = ids("cam-1", 2, 1000, sampled=False)
    frames = [frame(near), frame(normal)]
    write(s, [verdict(near, 0.95), verdict(normal, 0.2)], frames)
    for frame_id in (near, normal):
        submit(client, KEYS, cfg, normal_entry(frame_id, "ana"))
    counts = ConfirmationProcessor(s, cfg, "w1").process(10)
    assert (counts.accepted, counts.rejected) == (1, 1)
    [buffered] = AdaptationBuffer(client, KEYS).frames("cam-1", 10)
    assert buffered.frame_id == near and buffered.score == 0.95
    assert torch.equal(to_tensor(decode_image(buffered.data, ImageLimits()), MODEL_PX), model_input(frames[0]))
    # the uncached one is known (its verdict is within the window) but not cached: that is the reason given
    [rejected] = client.xrange(KEYS.rejected_confirmations)
    assert rejected[1][b"frame_id"].decode() == normal and rejected[1][b"reason"].decode() == NOT_CACHED
    thumbs = Thumbnails(client, KEYS, LimitsSection(), 32, 10)
    with Image.open(io.BytesIO(thumbs.get(near))) as img:
        assert img.format == "JPEG" and max(img.size) == 32


def test_a_reused_frame_id_never_caches_the_other_frames_bytes(client: redis.Redis) -> None:
    """The first frame was not cached (far below the threshold); a second one under its id scores near it: it
    is a duplicate, and its bytes must not be cached under a verdict that describes the first."""
    s = store(client)
    frame_id = ids("cam-1", 1, 1000, sampled=False)[0]
    first = verdict(frame_id, 0.2)
    second = Verdict(frame_id, "cam-1", 2000, 0.95, 1.0, False, "v1", 5.0, "ok", "", "cd" * 32)
    write(s, [first], [frame(frame_id)])
    other = frame(frame_id, data=jpeg(99))
    assert s.write_all([second], s.to_cache([second], [other], [model_input(other)])) == (0, [0])
    assert not client.exists(KEYS.frame(frame_id)) and s.verdict(frame_id) == first


def test_a_frame_smaller_than_its_model_input_is_cached_as_sent(client: redis.Redis) -> None:
    tiny = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tiny, "PNG")
    f = frame("tiny", data=tiny.getvalue())
    write(store(client), [verdict("tiny", 2.0)], [f])
    assert client.get(KEYS.frame("tiny")) == f.data


def test_without_a_policy_the_store_caches_every_frame_as_received(client: redis.Redis) -> None:
    """Tools and tests that seed Redis (the console's benchmark, its tests) keep the former behaviour."""
    s = VerdictStore(client, KEYS, VERDICT_TTL_S, FRAME_TTL_S, 100_000)
    f = frame("any")
    s.write([verdict("any", 0.0)], [f])
    assert client.get(KEYS.frame("any")) == f.data


def test_the_default_policy_writes_under_the_workers_documented_acl(
    redis_server: LocalRedis, client: redis.Redis
) -> None:
    """The time trim and the frame cache run inside the verdict script, with the worker user's rights (a
    script calling TIME, outside that ACL, failed every write)."""
    from test_console_acl import acl_lines, user_url

    for command in acl_lines(KEYS.prefix):
        client.execute_command(*command)
    worker = redis.Redis.from_url(user_url(redis_server, "inspectd-worker"))
    s = VerdictStore(worker, KEYS, VERDICT_TTL_S, FRAME_TTL_S, 100_000, RedisSection().cache_policy(), 3600)
    near = ids("cam-1", 1, 1000, sampled=False)[0]
    assert write(s, [verdict(near, 0.95)], [frame(near)]) == 1
    assert client.xlen(KEYS.verdicts) == 1 and client.exists(KEYS.frame(near))
