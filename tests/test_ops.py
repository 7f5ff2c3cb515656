"""
Tests for what operators run the hub with: JSON logs and systemd's
notification protocol.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from fedhub.logs import HubLogger, JSONLinesObserver, allow_level, event_record, log_level, set_log_level
from fedhub.systemd import Notifier, NotifyService
from tests.processes import reaped


def read_until(process: subprocess.Popen[str], marker: str) -> list[str]:
    """
    The lines C{process} writes up to one holding C{marker}, or up to its
    end (or for a minute at most).
    """
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            break
    return lines


def start_hub(state: Path, logger: str, hub: str = "") -> subprocess.Popen[str]:
    """
    Start C{twistd fedhub} with the log observer factory C{logger}, on a
    memory domain with a C{log} consumer, its state (and configuration) in
    C{state}; C{hub} adds lines to its C{[hub]} table.
    """
    config = state / "hub.toml"
    config.write_text(
        f'[hub]\nstate_dir = "{state}"\n{hub}[domains.d]\nbroker = "memory"\n'
        '[[consumers]]\nname = "log"\nplugin = "log"\ndomain = "d"\ntopics = ["#"]\n'
    )
    twistd = Path(sys.executable).parent / "twistd"
    return subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "--logger", logger, "fedhub", "--config", str(config)],
        cwd=str(state), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


class LogLevelTests(SynchronousTestCase):
    """
    The hub's log level, applied by L{HubLogger} where events are made.
    """

    class Emitter:
        log = HubLogger()

    def setUp(self) -> None:
        self.addCleanup(set_log_level, log_level())
        self.events: list[dict[str, Any]] = []
        self.emitter = self.Emitter()
        self.emitter.log.observer = self.events.append  # type: ignore[misc]

    def emit_all(self) -> list[str]:
        del self.events[:]
        log = HubLogger(observer=self.events.append)
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.error("e")
        return [e["log_format"] for e in self.events]

    def test_info_by_default(self) -> None:
        """Below info nothing is emitted unless asked for; the level applies to every HubLogger."""
        set_log_level(LogLevel.info)
        self.assertEqual(self.emit_all(), ["i", "w", "e"])
        set_log_level(LogLevel.warn)
        self.assertEqual(self.emit_all(), ["w", "e"])
        set_log_level(LogLevel.debug)
        self.assertEqual(self.emit_all(), ["d", "i", "w", "e"])

    def test_every_logger_of_fedhub_applies_the_level(self) -> None:
        """
        Every logger fedhub's modules and classes hold is a HubLogger, so
        the level (and the escaping of untrusted fields) applies to all of
        them.
        """
        import importlib
        import pkgutil

        import fedhub

        plain = []
        for info in pkgutil.walk_packages(fedhub.__path__, "fedhub."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            holders: list[Any] = [module] + [
                value for value in vars(module).values()
                if isinstance(value, type) and value.__module__ == module.__name__
            ]
            for holder in holders:
                for name, value in vars(holder).items():
                    if isinstance(value, Logger) and not isinstance(value, HubLogger):
                        plain.append(f"{getattr(holder, '__name__', holder)}.{name}")
        self.assertEqual(plain, [])

    def test_allow_only_lowers(self) -> None:
        """allow_level lowers the level and never raises it."""
        set_log_level(LogLevel.warn)
        allow_level(LogLevel.error)
        self.assertEqual(log_level(), LogLevel.warn)
        allow_level(LogLevel.debug)
        self.assertEqual(log_level(), LogLevel.debug)

    def test_untrusted_fields_escaped(self) -> None:
        """
        Fields that carry outside text (message ids, topics, reasons,
        peers) are escaped in every event, whoever logs them: a message id
        can not forge a log line, drive the terminal or reverse the text.
        """
        from twisted.logger import formatEvent

        log = HubLogger(observer=self.events.append)
        forged = "id1\n2026-11-29T02:39:00+0000 [fedhub.tap#critical] FAKE \x1b[31mred\u202eevil\x00"
        log.warn("Consumer {consumer} dead-letters {msg_id}: {reason}", consumer="c", msg_id=forged,
                 reason="bad\r\nline", count=3)
        [event] = self.events
        text = formatEvent(event)
        self.assertEqual(text.count("\n"), 0)
        for raw in ("\x1b", "\u202e", "\x00", "\r"):
            self.assertNotIn(raw, text)
        self.assertIn("\\x1b[31mred", text)
        self.assertIn("\\u202e", text)
        self.assertEqual(event["count"], 3)
        # A lone surrogate (JSON allows it) would make a file observer fail
        # to write the line at all.
        log.info("Consumer {consumer}: {reason}", consumer="c", reason="half \ud800 a pair")
        formatEvent(self.events[-1]).encode("utf-8")

    def test_class_attribute(self) -> None:
        """As a class attribute it still is a HubLogger, named after the class."""
        self.assertIsInstance(self.Emitter.log, HubLogger)
        self.assertTrue(self.Emitter.log.namespace.endswith("Emitter"))


class JSONLogTests(SynchronousTestCase):
    """
    L{fedhub.logs}.
    """

    def event(self, **fields: Any) -> dict[str, Any]:
        event: dict[str, Any] = {
            "log_format": "Consumer {consumer} got {topic}",
            "log_level": LogLevel.info,
            "log_namespace": "fedhub.test",
            "log_time": 1_790_000_000.25,
        }
        event.update(fields)
        return event

    def test_record(self) -> None:
        """A record has time, level, namespace, text and the stable fields present."""
        record = event_record(self.event(consumer="log", topic="a.b", msg_id="m1", other="x"))
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "fedhub.test")
        self.assertEqual(record["text"], "Consumer log got a.b")
        self.assertTrue(record["time"].endswith("+00:00"))
        self.assertEqual((record["consumer"], record["topic"], record["msg_id"]), ("log", "a.b", "m1"))
        self.assertNotIn("other", record)

    def test_control_characters(self) -> None:
        """Hostile field values can not forge lines or drive terminals."""
        record = event_record(self.event(consumer="x", topic="a\nb\x1b[2J"))
        self.assertNotIn("\n", record["text"])
        self.assertNotIn("\x1b", record["topic"])

    def test_failure(self) -> None:
        """A logged failure adds its traceback."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = event_record(self.event(log_failure=failure, consumer="c", topic="t"))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_one_line_each(self) -> None:
        """The observer writes one parseable JSON line per event."""
        stream = io.StringIO()
        observer = JSONLinesObserver(stream)
        observer(self.event(consumer="a", topic="t"))
        observer(self.event(consumer="b", topic="t"))
        lines = stream.getvalue().splitlines()
        self.assertEqual([json.loads(line)["consumer"] for line in lines], ["a", "b"])

    def test_twistd_json_logs(self) -> None:
        """twistd --logger fedhub.logs.json_logger makes every output line a JSON object."""
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        process = start_hub(state, "fedhub.logs.json_logger")
        lines: list[str] = []
        with reaped(process):
            lines += read_until(process, "SIGTERM or SIGINT stops it")
            process.send_signal(signal.SIGHUP)
            lines += read_until(process, "SIGHUP")
            process.send_signal(signal.SIGTERM)
            rest, errors = process.communicate(timeout=60)
        lines += rest.splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        self.assertTrue(any(r.get("consumer") == "log" for r in records), lines)
        self.assertTrue(any("Server Shut Down" in r["text"] for r in records), lines)
        self.assertTrue(any("SIGHUP: reopening files" in r["text"] for r in records), lines)
        self.assertEqual(process.returncode, 0, errors)


class LogLevelObserverTests(SynchronousTestCase):
    """
    The observers twistd's C{--logger} takes write Twisted's own lines at
    the hub's log level too.
    """

    def test_filtered_at_event_time(self) -> None:
        """Events below the log level as it is when they come are dropped; unlevelled ones pass."""
        from fedhub.logs import at_log_level

        self.addCleanup(set_log_level, log_level())
        seen: list[dict[str, Any]] = []
        observer = at_log_level(seen.append)  # type: ignore[arg-type]
        set_log_level(LogLevel.warn)
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.critical):
            observer({"log_level": level, "n": level.name})
        observer({"n": "none"})
        set_log_level(LogLevel.debug)
        observer({"log_level": LogLevel.debug, "n": "later"})
        self.assertEqual([e["n"] for e in seen], ["warn", "critical", "none", "later"])

    def test_twistd_text_logs_at_level(self) -> None:
        """
        twistd --logger fedhub.logs.text_logger with log_level warn writes
        the hub's warnings and none of Twisted's own info lines (starting
        up, the main loop ending, shut down).
        """
        import shutil
        import tempfile

        # Short enough for the status server's UNIX socket path.
        state = Path(tempfile.mkdtemp(prefix="fedhub-")).resolve()
        self.addCleanup(shutil.rmtree, state, True)
        process = start_hub(state, "fedhub.logs.text_logger",
                            'log_level = "warn"\nstatus = "unix:status.sock"\n')
        lines: list[str] = []
        with reaped(process):
            lines += read_until(process, "in-process memory bus")
            # Nothing at info level says the hub runs: its status server
            # answering does.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.settimeout(5)
                        probe.connect(str(state / "status.sock"))
                        probe.sendall(b"GET /live HTTP/1.0\r\nHost: localhost\r\n\r\n")
                        if b" 200 " in probe.recv(100):
                            break
                except OSError:
                    pass
                time.sleep(0.1)
            else:
                self.fail(f"the hub's status server never answered: {lines}")
            process.send_signal(signal.SIGTERM)
            rest, errors = process.communicate(timeout=60)
        lines += [line for line in rest.splitlines() if line.strip()]
        self.assertEqual(process.returncode, 0, errors)
        self.assertTrue(any("#warn]" in line and "memory bus" in line for line in lines), lines)
        self.assertFalse([line for line in lines if "#info]" in line or "[-]" in line], lines)
        self.assertFalse(any("Shut Down" in line or "starting up" in line for line in lines), lines)


class NotifyTests(SynchronousTestCase):
    """
    L{fedhub.systemd}.
    """

    def listen(self) -> socket.socket:
        path = os.path.abspath(self.mktemp())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        self.addCleanup(sock.close)
        self.path = path
        return sock

    def test_silent_without_systemd(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent."""
        self.assertFalse(Notifier({}).notify("READY=1"))

    def test_ready_watchdog_stopping(self) -> None:
        """READY=1 once the reactor runs, WATCHDOG=1 every half interval, STOPPING=1 on stop."""
        sock = self.listen()
        notifier = Notifier({"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "10000000"})
        self.assertEqual(notifier.watchdog_interval, 5.0)
        clock = Clock()
        running: list[Any] = []
        clock.callWhenRunning = lambda f, *a: running.append((f, a))  # type: ignore[attr-defined]
        service = NotifyService(clock, notifier)
        service.startService()
        for f, a in running:
            f(*a)
        self.assertEqual(sock.recv(1000), b"READY=1\nSTATUS=fedhub running")
        self.assertEqual(sock.recv(1000), b"WATCHDOG=1")
        clock.advance(5)
        self.assertEqual(sock.recv(1000), b"WATCHDOG=1")
        service.stopService()
        self.assertEqual(sock.recv(1000), b"STOPPING=1\nSTATUS=fedhub draining")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_watchdog_for_another_pid(self) -> None:
        """A watchdog meant for another process is ignored."""
        notifier = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
        self.assertIsNone(notifier.watchdog_interval)

    def test_send_failure_logged(self) -> None:
        """A socket that is gone makes notify return False, not raise."""
        self.assertFalse(Notifier({"NOTIFY_SOCKET": "/nonexistent/socket"}).notify("READY=1"))

    def test_full_queue_drops(self) -> None:
        """A notification socket whose queue is full makes notify drop the datagram at once, counted and logged once."""
        receiver = self.listen()
        # Should sending block, fail the test instead of hanging it.
        socket.setdefaulttimeout(5)
        self.addCleanup(socket.setdefaulttimeout, None)
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        sender.setblocking(False)
        filled = 0
        while True:
            try:
                sender.sendto(b"X" * 512, self.path)
            except BlockingIOError:
                break
            filled += 1
        self.assertGreater(filled, 0)
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        notifier = Notifier({"NOTIFY_SOCKET": self.path})
        self.assertFalse(notifier.notify("WATCHDOG=1"))
        self.assertFalse(notifier.notify("WATCHDOG=1"))
        self.assertEqual(notifier.dropped, 2)
        self.assertEqual(
            len([e for e in events if "dropped" in e.get("log_format", "")]), 1, events
        )
        receiver.recv(1000)
        self.assertTrue(notifier.notify("READY=1"))

