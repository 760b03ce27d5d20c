"""`inspectd demo --console`: a person (here: a script speaking HTTP) confirms the frames in the operator
console, against the demo's real broker, Redis and `inspectd run` worker, at test_demo.py's tiny size.

The person logs in with the one-time login the demo prints, waits on the line page for the camera's drift
alarm, opens its review queue, picks five frames that show normal cells (as a person looking at them would;
here the frame id says which) and confirms them; the worker then adapts on exactly those frames.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import requests
import test_demo

from cli.demo import DEMO_USER, console_beside
from daemon.config import Settings
from lab.demo.run import run_demo
from lab.demo.spec import DemoSpec

elpv, out, settings, no_leftovers = test_demo.elpv, test_demo.out, test_demo.settings, test_demo.no_leftovers
SHOTS = 5
PERSON_TIMEOUT_S = 300.0


class Person(threading.Thread):
    def __init__(self, lines: list[str], camera: str) -> None:
        super().__init__(daemon=True)
        self.lines, self.camera = lines, camera
        self.picked: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # handed to the test's thread
            self.error = exc

    def _wait(self, what: str, check: callable) -> object:  # type: ignore[valid-type]
        deadline = time.monotonic() + PERSON_TIMEOUT_S
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.5)
        raise TimeoutError(f"the person waited in vain for {what}")

    def _work(self) -> None:
        line = self._wait("the console's line", lambda: next((x for x in self.lines if "console: http" in x), None))
        found = re.search(r"console: (http://\S+?)/cameras/\S+ — log in as (\S+) with password (\S+) ", str(line))
        assert found, line
        base, user, password = found.groups()
        s = requests.Session()
        form = s.get(f"{base}/login").text
        token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
        s.post(f"{base}/login", data={"csrf": token, "username": user, "password": password}).raise_for_status()
        alarm = f'class="tile drift-alarm" href="/cameras/{self.camera}"'
        self._wait("the drift alarm on the line page", lambda: alarm in s.get(f"{base}/line").text)
        page = s.get(f"{base}/cameras/{self.camera}").text
        queue = re.findall(r'<label class="frame" data-frame="([^"]+)"', page)
        self.picked = [f for f in queue if f.endswith("-normal")][:SHOTS]
        assert len(self.picked) == SHOTS, queue
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        done = s.post(f"{base}/cameras/{self.camera}/confirm", data={"csrf": csrf, "frame_id": self.picked})
        assert f"{SHOTS} frame(s) confirmed as normal by {user}" in done.text, done.text


def test_a_person_confirms_in_the_console_and_the_worker_adapts(
    elpv: Path, out: Path, settings: Settings, no_leftovers: None
) -> None:
    lines: list[str] = []
    spec = DemoSpec(out=out, data=elpv, person=True, person_timeout_s=PERSON_TIMEOUT_S, **test_demo.TINY)
    person = Person(lines, spec.camera)
    person.start()
    console = lambda url, prefix: console_beside(settings, out, spec.camera, url, prefix)  # noqa: E731
    result = run_demo(spec, settings, lines.append, console=console)
    person.join(10)
    log = "\n".join(lines)
    assert person.error is None, f"{person.error!r}\n{log}"
    summary = json.loads(result.summary_path.read_text())
    adaptation = summary["adaptation"]
    assert adaptation["confirmed"] == [person.picked], log
    confirmed = [e for e in summary["events"] if e["kind"] == "frames_confirmed"]
    assert [e["detail"] for e in confirmed] == [{"operator": DEMO_USER, "frame_ids": person.picked}]
    assert [e["kind"] for e in summary["events"]].count("adaptation_started") == 1, log
    assert f"operator {DEMO_USER} (console): confirmed {SHOTS} frames" in log
    assert "operator demo-operator" not in log  # nobody simulated
    assert summary["processes"]["worker"]["exit_code"] == 0
