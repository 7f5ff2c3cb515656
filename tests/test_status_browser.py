"""
The status page in a real browser: headless Chromium, driven by Selenium
through Debian's C{chromedriver}, shows messages published while it is open
without being reloaded, renders hostile text as text, and breaks none of its
own Content-Security-Policy.

The hub runs in the test's reactor; the browser is driven from threads so
the reactor keeps serving it.  Without Chromium the test is skipped, except
in CI (C{CI=true}), where it fails: CI installs Debian's C{chromium} and
C{chromium-driver}.  Set C{FEDHUB_STATUS_SCREENSHOT} to a file name to keep
a copy of the screenshot.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from fedhub.config import parse_config
from fedhub.consumers.log import LogPlugin
from fedhub.hub import Hub
from fedhub.message import Message
from fedhub.status import StatusService

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)

HUB_CONFIG = """
[hub]
state_dir = "{state}"

[domains.infra]
broker = "memory"

[[consumers]]
name = "audit"
plugin = "log"
domain = "infra"
topics = ["#"]
"""

HOSTILE = "<img src=x onerror=\"document.title='owned'\"><script>document.title='owned'</script>"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing() -> str | None:
    """
    What this test lacks, or C{None}.
    """
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian package {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is missing"
    return None


def start_browser(profile: str) -> Any:
    """
    Start headless Chromium under chromedriver with a fresh profile.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = DriverService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=options, service=service)


def recent_topics(driver: Any) -> list[str]:
    """
    The topics in the page's recent-messages list, newest first.
    """
    return texts(driver, "#recent-rows td.topic")


def texts(driver: Any, selector: str) -> list[str]:
    """
    The rendered text of every element matching C{selector}, read in one
    step in the page: the live list is redrawn while the test reads it, so
    element handles taken one by one can go stale.
    """
    result: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);", selector
    )
    return result


def wait_for(driver: Any, condition: Any, timeout: float = 20.0) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition)


class BrowserTests(TestCase):
    """
    The status page in headless Chromium.
    """

    timeout = 120

    def setUp(self) -> None:
        missing = _missing()
        if missing is not None:
            if _in_ci():
                self.fail(f"the browser test can not run in CI: {missing}")
            raise SkipTest(missing)

    @inlineCallbacks
    def test_page_updates_live(self) -> Any:
        """Messages published while the page is open appear on it, as text, without a reload."""
        from selenium.webdriver.common.by import By

        lookup = {"log": LogPlugin()}
        config = parse_config(
            HUB_CONFIG.format(state=os.path.abspath(self.mktemp())), "test",
            find_plugin=lambda kind, name: lookup.get(name),
        )
        hub = Hub(config, reactor, find_consumer=lambda name: lookup[name])  # type: ignore[arg-type]
        status = StatusService(hub, "tcp:0:interface=127.0.0.1", reactor, update_interval=0.5)
        status.setServiceParent(hub)
        hub.startService()
        self.addCleanup(hub.stopService)
        port = yield status.when_listening()
        url = f"http://127.0.0.1:{port.getHost().port}/"
        publisher = hub.domains["infra"].publisher

        yield publisher.publish(
            Message.create("org.fedoraproject.dev.before.load", {"summary": "published before loading"})
        )
        scratch = os.path.abspath(self.mktemp())
        os.makedirs(scratch)
        driver = yield deferToThread(start_browser, os.path.join(scratch, "profile"))
        self.addCleanup(deferToThread, driver.quit)

        yield deferToThread(driver.get, url)
        yield deferToThread(
            wait_for, driver, lambda d: "org.fedoraproject.dev.before.load" in recent_topics(d)
        )
        yield deferToThread(
            wait_for, driver, lambda d: d.find_element(By.ID, "feed").text == "live"
        )
        # A reload would lose this.
        yield deferToThread(driver.execute_script, "window.fedhubMarker = 'same page';")
        rows_before = len((yield deferToThread(recent_topics, driver)))

        topics = [f"org.fedoraproject.dev.live.update{n}" for n in range(3)]
        for n, topic in enumerate(topics):
            yield publisher.publish(
                Message.create(topic, {"summary": f"live update {n} {HOSTILE}"})
            )
            yield deferLater(reactor, 0.1, lambda: None)

        shown = yield deferToThread(
            wait_for, driver, lambda d: all(t in recent_topics(d) for t in topics) and recent_topics(d)
        )
        self.assertEqual(shown[0], topics[-1], "the newest message comes first")
        self.assertGreater(len(shown), rows_before)
        marker = yield deferToThread(driver.execute_script, "return window.fedhubMarker;")
        self.assertEqual(marker, "same page")

        # The counters follow too, through the periodic status events.
        yield deferToThread(
            wait_for,
            driver,
            lambda d: d.find_element(By.CSS_SELECTOR, "#section-consumers tbody tr td:nth-child(6)").text
            == "4",
        )

        # Hostile summaries are shown as text and ran nothing.
        summaries = yield deferToThread(texts, driver, "#recent-rows td.summary")
        self.assertIn(f"live update 2 {HOSTILE}", summaries)
        injected = yield deferToThread(
            lambda: driver.find_elements(By.CSS_SELECTOR, "#recent-rows img, #recent-rows script")
        )
        self.assertEqual(injected, [])
        title = yield deferToThread(lambda: driver.title)
        self.assertEqual(title, "fedhub status")

        # Nothing on the page broke the Content-Security-Policy or failed.
        logs = yield deferToThread(driver.get_log, "browser")
        problems = [
            entry for entry in logs
            if entry.get("level") == "SEVERE" and "favicon.ico" not in entry.get("message", "")
        ]
        self.assertEqual(problems, [])

        screenshot = os.path.join(scratch, "status-page.png")
        saved = yield deferToThread(driver.save_screenshot, screenshot)
        self.assertTrue(saved)
        with open(screenshot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        keep = os.environ.get("FEDHUB_STATUS_SCREENSHOT")
        if keep:
            shutil.copyfile(screenshot, keep)

        # A new status server on the same port (as after a restart): the
        # open page reconnects, and as the numbering starts again, so does
        # its list.
        number = port.getHost().port
        yield status.disownServiceParent()
        restarted = StatusService(hub, f"tcp:{number}:interface=127.0.0.1", reactor, update_interval=0.5)
        restarted.setServiceParent(hub)
        yield restarted.when_listening()
        yield publisher.publish(Message.create("org.fedoraproject.dev.after.restart", {"summary": "again"}))
        yield deferToThread(
            wait_for, driver, lambda d: recent_topics(d) == ["org.fedoraproject.dev.after.restart", "–"]
        )
        marker = yield deferToThread(driver.execute_script, "return window.fedhubMarker;")
        self.assertEqual(marker, "same page")
