"""`[redis] durability`, against real Redis servers (and Tansu, with `inspectd run` as a subprocess).

- The start-up check: `fsync` refuses a server that does not fsync every write (naming the fix), and a
  server whose CONFIG is refused unless told `fsync-assume`; `waitaof` refuses servers without WAITAOF.
- `replicas:N` with fewer replicas: verdicts are written, but the batch is not committed and /readyz
  names redis, until a replica connects.
- Redis killed mid-stream, with the worker running, under `everysec` + `none` and `always` + `fsync`, by
  SIGKILL alone and as by a power cut (powercut.c): how many frames lost their verdict although their
  offsets were committed (always: none).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from worker_line import ROOT, Line, get, wait_ready

from daemon.config import ConfigError, RedisSection, load_settings
from daemon.durability import Durability, DurabilityRefused, NotDurable
from lab.services import LocalKafka, LocalRedis

COMPOSE = ROOT / "deploy" / "docker" / "compose.yaml"
DEPLOY_README = ROOT / "deploy" / "README.md"
POWERCUT_C = Path(__file__).with_name("powercut.c")
EXIT_CONFIG = 2
SHORT_WAIT_MS = "200"
KILL_FRAMES = 400


def section(server: LocalRedis, durability: str, url: str | None = None) -> RedisSection:
    return RedisSection(url=url or server.url, durability=durability, key_prefix="t:")


def server_version(client: redis.Redis) -> tuple[int, ...]:
    return tuple(int(p) for p in str(client.info("server")["redis_version"]).split(".")[:2])


@pytest.fixture
def everysec(tmp_path: Path) -> Iterator[LocalRedis]:
    with LocalRedis(persist_dir=tmp_path / "everysec", appendfsync="everysec") as server:
        yield server


# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("value", ["sometimes", "replicas:0", "replicas:", "FSYNC", "fsync "])
def test_an_invalid_value_is_an_error_naming_the_key(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECTD_REDIS__DURABILITY", value)
    with pytest.raises(ConfigError, match=r"redis\.durability: .*fsync, fsync-assume, replicas:N"):
        load_settings(ROOT / "config.toml")


def test_the_default_keeps_the_promise_and_the_shipped_redis_keeps_it() -> None:
    """The default is `fsync`, so the compose stack's Redis must fsync every write (else workers refuse)."""
    assert load_settings(ROOT / "config.toml").redis.durability == "fsync"
    command = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["command"]
    args = shlex.split(command) if isinstance(command, str) else command
    pairs = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert pairs.get("--appendonly") == "yes" and pairs.get("--appendfsync") == "always", args


def test_the_wait_must_end_before_the_client_gives_up() -> None:
    with pytest.raises(ValueError, match="durability_timeout_ms"):
        RedisSection(timeout_s=1.0, durability_timeout_ms=1000)


# ------------------------------------------------------------------------------------------- start-up


def test_fsync_refuses_everysec_and_names_the_fix(everysec: LocalRedis) -> None:
    with everysec.client() as client:
        for mode in ("fsync", "fsync-assume"):  # CONFIG answers: an assumption it contradicts is refused too
            with pytest.raises(DurabilityRefused) as refused:
                Durability.checked(client, section(everysec, mode))
            message = str(refused.value)
            assert "appendfsync 'everysec'" in message
            assert "[redis] durability" in message and "appendfsync always" in message and "redis.conf" in message
        Durability.checked(client, section(everysec, "none"))  # a documented loss window, accepted


def test_fsync_accepts_always(tmp_path: Path) -> None:
    with LocalRedis(persist_dir=tmp_path / "always") as server, server.client() as client:
        guard = Durability.checked(client, section(server, "fsync"))
        guard.after_write()  # nothing to wait for: a reply already means "on disk"
    with LocalRedis() as scratch, scratch.client() as client:  # the tests' and the demo's Redis
        Durability.checked(client, section(scratch, "fsync"))


@pytest.mark.parametrize("how", ["acl", "renamed"])
def test_where_config_is_refused_fsync_needs_an_explicit_assume(how: str) -> None:
    extra = ["--rename-command", "CONFIG", ""] if how == "renamed" else []
    with LocalRedis(extra_args=extra) as server, server.client() as admin:
        url = server.url
        if how == "acl":
            admin.execute_command("ACL", "SETUSER", "w", "on", ">pw", "~*", "&*", "+@all", "-config")
            url = f"redis://w:pw@{server.host}:{server.port}/0"
        with redis.Redis.from_url(url) as client:
            with pytest.raises(DurabilityRefused) as refused:
                Durability.checked(client, section(server, "fsync", url))
            message = str(refused.value)
            assert "refuses CONFIG" in message and '"fsync-assume"' in message and "+config|get" in message
            assert "NoPermissionError" in message if how == "acl" else "unknown command" in message
            Durability.checked(client, section(server, "fsync-assume", url)).after_write()


def test_the_documented_worker_acl_needs_assume_or_a_per_batch_wait() -> None:
    """deploy/README.md's worker user has no CONFIG: `fsync` says so, `fsync-assume` and `replicas:N` run."""
    block = re.search(r"<!-- acl:begin -->(.*?)<!-- acl:end -->", DEPLOY_README.read_text(), re.S)
    assert block, "deploy/README.md has no ACL block"
    line = next(x for x in block.group(1).splitlines() if x.startswith("ACL SETUSER inspectd-worker"))
    with LocalRedis() as server, server.client() as admin:
        admin.execute_command(*shlex.split(line.replace("WORKER_PASSWORD", "pw")))
        url = f"redis://inspectd-worker:pw@{server.host}:{server.port}/0"
        with redis.Redis.from_url(url) as client:
            as_worker = RedisSection(url=url, durability="fsync", key_prefix="inspectd:")
            with pytest.raises(DurabilityRefused, match="fsync-assume"):
                Durability.checked(client, as_worker)
            Durability.checked(client, as_worker.model_copy(update={"durability": "fsync-assume"})).after_write()
            replicas = Durability.checked(client, as_worker.model_copy(update={"durability": "replicas:1"}))
            with pytest.raises(NotDurable):  # WAIT and the barrier write are allowed; no replica acknowledges
                replicas.after_write()


def test_waitaof_needs_redis_7_2() -> None:
    with LocalRedis() as server, server.client() as client:
        if server_version(client) >= (7, 2):
            Durability.checked(client, section(server, "waitaof")).after_write()
            return
        with pytest.raises(DurabilityRefused, match=r"no WAITAOF, which came with Redis 7\.2") as refused:
            Durability.checked(client, section(server, "waitaof"))
        assert '"fsync"' in str(refused.value) and "appendfsync always" in str(refused.value)


def test_replicas_wait_counts_the_writes_of_every_connection() -> None:
    """A replica that is connected acknowledges; with it gone, the same wait is a NotDurable outage."""
    with LocalRedis() as primary, primary.client() as client:
        guard = Durability.checked(client, RedisSection(url=primary.url, durability="replicas:1"))
        with pytest.raises(NotDurable, match="0 of 1 replicas"):
            guard.after_write()
        with LocalRedis(extra_args=["--replicaof", primary.host, str(primary.port)]) as replica:
            _wait_replica_online(client)
            client.set("written-elsewhere", "1")
            guard.after_write()
            assert replica.client().get("written-elsewhere") == b"1"


def _wait_replica_online(client: redis.Redis, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while client.info("replication").get("slave0", {}).get("state") != "online":  # synced, acknowledging
        assert time.monotonic() < deadline, "the replica did not connect"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------- the worker


def test_the_worker_refuses_to_start_on_everysec(
    kafka: LocalKafka, model_dir: Path, tmp_path: Path, everysec: LocalRedis
) -> None:
    line = Line(kafka, everysec.url, model_dir, tmp_path)
    try:
        proc, _ = line.start_worker()
        assert proc.wait(timeout=120) == EXIT_CONFIG
        log = line.logs()
        assert "appendfsync 'everysec'" in log and "appendfsync always" in log and "[redis] durability" in log
    finally:
        line.close()


def test_too_few_replicas_is_an_outage_nothing_committed(kafka: LocalKafka, model_dir: Path, tmp_path: Path) -> None:
    with LocalRedis() as primary:
        env = {"INSPECTD_REDIS__DURABILITY": "replicas:1", "INSPECTD_REDIS__DURABILITY_TIMEOUT_MS": SHORT_WAIT_MS}
        line = Line(kafka, primary.url, model_dir, tmp_path, env=env)
        try:
            _, port = line.start_worker()
            wait_ready(port)
            ids = line.send(8)
            line.wait_verdicts(len(ids))  # written, but not acknowledged by a replica
            deadline = time.monotonic() + 30
            while (status := get(port, "/readyz"))[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            body = json.loads(status[1])
            assert status[0] == 503 and body["not_ready"] == ["redis"], body
            assert "NotDurable" in body["reasons"]["redis"] and "0 of 1 replicas" in body["reasons"]["redis"]
            time.sleep(1.0)  # several more waits, each short
            assert line.committed_total() == 0
            with LocalRedis(extra_args=["--replicaof", primary.host, str(primary.port)]):
                deadline = time.monotonic() + 60
                while line.committed_total() < len(ids) and time.monotonic() < deadline:
                    time.sleep(0.3)
                assert line.committed_total() == len(ids), line.logs()
                wait_ready(port)
            assert sorted(line.verdict_ids()) == sorted(ids)
        finally:
            line.close()


# ------------------------------------------------------------------------------------ Redis SIGKILLed


@pytest.fixture(scope="module")
def powercut(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/integration/powercut.c built: with it preloaded, a SIGKILLed Redis loses what a power cut would."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for tests/integration/powercut.c")
    out = tmp_path_factory.mktemp("powercut") / "powercut.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(POWERCUT_C), "-ldl"], check=True)
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["sigkill", "powercut"])
@pytest.mark.parametrize(("appendfsync", "durability"), [("everysec", "none"), ("always", "fsync")])
def test_redis_killed_mid_stream_what_each_mode_loses(
    kafka: LocalKafka,
    model_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    appendfsync: str,
    durability: str,
    crash: str,
) -> None:
    """Count the frames whose offsets were committed but whose verdict is gone once Redis has restarted
    from its AOF: the worker never scores them again. `sigkill`: the Redis process dies (what it wrote is
    in the page cache and survives); `powercut`: what it had not fsynced is lost too. With fsync on every
    write: none, either way."""
    env = {"LD_PRELOAD": request.getfixturevalue("powercut")} if crash == "powercut" else None
    with LocalRedis(persist_dir=tmp_path / "redis", appendfsync=appendfsync, env=env) as server:
        line = Line(kafka, server.url, model_dir, tmp_path, env={"INSPECTD_REDIS__DURABILITY": durability})
        try:
            proc, port = line.start_worker()
            wait_ready(port)
            ids = line.send(KILL_FRAMES)
            line.wait_verdicts(KILL_FRAMES // 4)
            server.stop(kill=True)
            time.sleep(0.5)  # a commit in flight when Redis died lands now (its writes were acknowledged)
            committed_at_kill = line.committed_total()
            server.start()  # replays the AOF
            deadline = time.monotonic() + 180
            while line.committed_total() < KILL_FRAMES and time.monotonic() < deadline:
                time.sleep(0.3)
            assert line.committed_total() == KILL_FRAMES, line.logs()
            assert proc.poll() is None, line.logs()
            got = line.verdict_ids()
            lost = [i for i in ids if not line.redis.exists(f"{line.prefix}verdict:{i}")]
            print(
                f"\nappendfsync {appendfsync}, durability {durability}, {crash}: Redis killed with"
                f" {committed_at_kill} of {KILL_FRAMES} offsets committed; after the restart from the AOF"
                f" {len(lost)} committed frames have no verdict (lost), {len(got) - len(set(got))} duplicates"
            )
            assert len(got) == len(set(got))
            assert 0 < committed_at_kill < KILL_FRAMES, "the kill did not land mid-stream"
            if durability == "fsync":
                assert lost == []
        finally:
            line.close()
