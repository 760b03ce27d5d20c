"""The operator console in a real browser: Debian's Chromium, headless, driven by Selenium.

Redis is seeded through the worker's own classes (VerdictStore, EventLog, ModelRegistry; see
console_support.py), not by a running worker: the flow below is the console's, from login to the
confirmations stream and the registry. Skipped, with the reason, where /usr/bin/chromium or
/usr/bin/chromedriver is missing (`apt-get install chromium chromium-driver`). Screenshots of each page are
written to the test's tmp_path/screenshots.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import console_support as cs
import pytest
import redis
from torch import Tensor

from csflow.model import CSFlow
from daemon.frames import Frame
from daemon.registry import ModelRegistry
from daemon.store import Verdict, VerdictStore
from lab.services import LocalRedis

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 10

# POSTed from inside the page, with the page's own session cookie and CSRF token.
POST_FROM_PAGE = """
const [url, fields, done] = arguments;
const body = new URLSearchParams(fields);
body.set("csrf", document.querySelector('input[name="csrf"]').value);
fetch(url, {method: "POST", body, credentials: "same-origin"}).then(r => done(r.status));
"""


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} not found (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


class Steps:
    """Times each step and saves a screenshot after it."""

    def __init__(self, driver: WebDriver, folder: Path) -> None:
        self.driver = driver
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.timings: list[tuple[str, float]] = []
        self._t = time.monotonic()

    def done(self, name: str) -> None:
        self.driver.save_screenshot(str(self.folder / f"{len(self.timings) + 1:02d}-{name}.png"))
        now = time.monotonic()
        self.timings.append((name, now - self._t))
        self._t = now


def log_in(driver: WebDriver, base: str, name: str) -> None:
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(cs.PASSWORD)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, WAIT_S).until(ec.presence_of_element_located((By.ID, "tiles")))


def test_operator_confirms_five_frames_and_only_an_admin_activates(
    browser: WebDriver,
    redis_server: LocalRedis,
    client: redis.Redis,
    tmp_path: Path,
    make_tiny_model: Callable[..., CSFlow],
    make_images: Callable[..., Tensor],
) -> None:
    seeded = cs.seed(client)
    settings = cs.settings_for(redis_server.url, tmp_path, poll_interval_s=1.0)
    cs.make_users(settings)
    registry = ModelRegistry.from_settings(client, settings)
    published = cs.publish_versions(registry, make_tiny_model(seed=6), make_images(6, seed=1), tmp_path / "v")
    driver, wait = browser, WebDriverWait(browser, WAIT_S)
    steps = Steps(driver, tmp_path / "screenshots")
    with cs.serving(settings) as base:
        log_in(driver, base, "otto")
        tile = driver.find_element(By.CSS_SELECTOR, '[data-camera="cam-1"]')
        assert "drift-alarm" in tile.get_attribute("class") and "alarm" in tile.text
        steps.done("line")

        tile.click()
        wait.until(ec.presence_of_element_located((By.ID, "timeline")))
        assert "drift-alarm" in driver.find_element(By.ID, "drift-state").get_attribute("class")
        assert "5 more confirmation(s) needed" in driver.find_element(By.ID, "needed").text
        thumbs = driver.find_elements(By.CSS_SELECTOR, ".queue img.thumb")
        assert thumbs and all(driver.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
        steps.done("camera")

        frames = driver.find_elements(By.CSS_SELECTOR, ".queue label.frame")[:5]
        picked = [f.get_attribute("data-frame") for f in frames]
        for frame in frames:
            frame.find_element(By.CSS_SELECTOR, "img").click()  # a click on the thumbnail selects it
        assert driver.find_element(By.ID, "selected-count").text == "5 selected"
        driver.find_element(By.ID, "note").send_keys("lighting changed <b>after</b> maintenance")
        steps.done("selected")
        driver.find_element(By.ID, "confirm").click()
        done = wait.until(ec.presence_of_element_located((By.ID, "done")))
        assert "5 frame(s) confirmed as normal by otto" in done.text
        steps.done("confirmed")
        entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(cs.KEYS.confirmations)]
        assert sorted(e["frame_id"] for e in entries) == sorted(picked)
        assert {e["operator"] for e in entries} == {"otto"} and set(picked) <= set(seeded.alarm_frames)

        driver.get(f"{base}/events?camera=cam-1&kind=frames_confirmed")
        assert '"operator": "otto"' in driver.find_element(By.ID, "events").text
        steps.done("events")

        driver.get(f"{base}/versions")
        assert not driver.find_elements(By.CSS_SELECTOR, ".activate, .rollback")
        assert driver.find_element(By.ID, "admin-only").is_displayed()
        fields = {"scope": "camera:cam-1", "version": published.adapted}
        assert driver.execute_async_script(POST_FROM_PAGE, "/versions/activate", fields) == 403
        assert registry.active("cam-1") == published.base
        steps.done("versions-operator")

        driver.find_element(By.ID, "logout").click()
        wait.until(ec.presence_of_element_located((By.ID, "login")))
        log_in(driver, base, "ada")
        driver.get(f"{base}/versions")
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-version="{published.adapted}"]')
        Select(row.find_element(By.NAME, "scope")).select_by_value("camera:cam-1")
        steps.done("versions-admin")
        row.find_element(By.CSS_SELECTOR, "button.activate").click()
        assert published.adapted in wait.until(ec.presence_of_element_located((By.ID, "target"))).text
        assert registry.active("cam-1") == published.base  # nothing changes before the confirmation
        steps.done("activate-confirm")
        driver.find_element(By.ID, "do-it").click()
        assert "active in camera:cam-1" in wait.until(ec.presence_of_element_located((By.ID, "done"))).text
        assert registry.active("cam-1") == published.adapted
        steps.done("activated")

        driver.get(f"{base}/line")
        tile = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '[data-camera="cam-1"]')))
        assert published.adapted[:12] in tile.text
        store = VerdictStore(client, cs.KEYS, 3600, 3600, 100_000)
        frame = Frame("cam-9-f000", "cam-9", cs.START_MS, "image/png", cs.png(9), "frames", 0, 0)
        store.write([Verdict(frame.frame_id, "cam-9", cs.START_MS, 0.5, 1.0, False, "v", 2.0, "warmup")], [frame])
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '[data-camera="cam-9"]')))  # polled, no reload
        steps.done("line-after")
    for name, seconds in steps.timings:
        print(f"{name}: {seconds:.2f} s")
    print(f"screenshots: {steps.folder}")
    assert len(list(steps.folder.glob("*.png"))) == len(steps.timings)
