"""
Tests for stopping the C{exec} consumer: runs still going when the hub stops
are terminated, and whatever is left when the runner stops waiting for the
plugin's C{stop()} is killed at once, so that no process a run started
outlives the hub.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import signal
import sys
import textwrap
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fedhub.consumers.exec import ExecHandler, ExecPlugin, ExecSettings, parse_template
from fedhub.message import Message
from fedhub.testing import ConsumerHarness
from tests.test_consumer_exec import ProcessCase, alive

PY = sys.executable
TOPIC = "org.example.dev.pkg.update"

#: Ignores SIGTERM, writes its pid to argv[2], then "ready" to argv[1], and
#: sleeps.
IGNORES_TERM = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[2], 'w').write(str(os.getpid()))
    open(sys.argv[1], 'w').write('ready')
    time.sleep(120)
""")


class ClockedReactor:
    """
    The real reactor for processes, a L{Clock} for timers: the grace
    periods of a run pass only when the test advances the clock.
    """

    def __init__(self, real: Any, clock: Clock) -> None:
        self.real = real
        self.clock = clock

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        return self.real.spawnProcess(*args, **kwargs)

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()


class StopNothingTests(SynchronousTestCase):
    """
    Stopping a handler with nothing running.
    """

    def test_stop_idle(self) -> None:
        """stop() with no run going succeeds at once."""
        handler = ExecHandler("idle", ("#",), Clock(), ExecSettings(
            command=(parse_template("/bin/true"),)))
        handler.start()
        self.assertIsNone(self.successResultOf(handler.stop()))

    def test_cancel_idle(self) -> None:
        """Cancelling a stop() that already finished changes nothing."""
        handler = ExecHandler("idle", ("#",), Clock(), ExecSettings(
            command=(parse_template("/bin/true"),)))
        handler.start()
        d = handler.stop()
        d.cancel()
        self.successResultOf(d)


class StopTests(ProcessCase):
    """
    Real processes that do not end when asked to.
    """

    def reap_later(self, *paths: Path) -> None:
        """
        After the test, kill whatever process the files at C{paths} name
        that still lives, so a failing test leaves nothing behind.
        """

        def kill() -> None:
            for path in paths:
                if not path.exists() or not path.read_text().strip().isdigit():
                    continue
                pid = int(path.read_text())
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)

        self.addCleanup(kill)

    def errors(self) -> list[dict[str, Any]]:
        """
        The error events logged from now on.
        """
        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.error:
                events.append(event)

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    def harness(self, command: list[str], kill_grace: float) -> ConsumerHarness:
        """
        A started harness on the real reactor whose consumer waits 0.2 s
        for runs, then 0.2 s for the plugin's stop().
        """
        harness = ConsumerHarness(
            ExecPlugin(), {"kill_grace": kill_grace, "command": command}, reactor=reactor
        )
        harness.start()
        harness.service.drain_timeout = 0.2
        return harness

    @inlineCallbacks
    def stop_once_ready(
        self, harness: ConsumerHarness, ready: Path, pids: Path
    ) -> Generator[Any, Any, tuple[ExecHandler, int]]:
        """
        Hand C{harness} a message, wait until its command wrote "ready" to
        C{ready}, then stop the harness; the handler, and the pid the
        command wrote to C{pids}.
        """
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        harness.deliver(Message.create(TOPIC, {}))
        yield self.wait_for(lambda: ready.exists() and ready.read_text() == "ready")
        pid = int(pids.read_text())
        yield harness.stop()
        return handler, pid

    @inlineCallbacks
    def clocked_run(self, clock: Clock) -> Generator[Any, Any, tuple[ExecHandler, Deferred[Any], int]]:
        """
        A started handler whose timers run on C{clock}, handling a message
        with a command that ignores SIGTERM; once the command is ready: the
        handler, the Deferred of its handling, and the command's pid.
        """
        ready, pids = self.out("ready"), self.out("pid")
        self.reap_later(pids)
        handler = ExecHandler("clocked", ("#",), ClockedReactor(reactor, clock), ExecSettings(
            command=tuple(parse_template(item) for item in (
                PY, "-c", IGNORES_TERM, str(ready), str(pids))),
            kill_grace=30, timeout=3600))
        handler.start()
        handled = handler.handle(Message.create(TOPIC, {}))
        yield self.wait_for(lambda: ready.exists() and ready.read_text() == "ready")
        return handler, handled, int(pids.read_text())

    @inlineCallbacks
    def test_run_ignoring_term_killed_when_stop_times_out(self) -> Any:
        """A run ignoring SIGTERM, with kill_grace beyond drain_timeout, is killed when the runner gives up on stop(), which is logged."""
        ready, pids = self.out("ready"), self.out("pid")
        self.reap_later(pids)
        errors = self.errors()
        harness = self.harness([PY, "-c", IGNORES_TERM, str(ready), str(pids)], kill_grace=30)
        handler, pid = yield self.stop_once_ready(harness, ready, pids)
        self.assertEqual(len(errors), 1)
        self.assertIn("did not stop within", errors[0]["log_format"])
        self.assertEqual(errors[0]["consumer"], "test")
        # SIGKILL went out before stop() returned: only its delivery and
        # the reaping are left.
        yield self.wait_for(lambda: not alive(pid), limit=10.0)
        yield self.wait_for(lambda: handler.running == 0, limit=10.0)
        self.assertEqual(harness.settled, [])

    @inlineCallbacks
    def test_leftover_ignoring_term_killed_when_stop_times_out(self) -> Any:
        """A process left by a command that exited, ignoring SIGTERM, is killed when the runner gives up on stop()."""
        ready, pids = self.out("ready"), self.out("pid")
        self.reap_later(pids)
        errors = self.errors()
        harness = self.harness([PY, "-c", textwrap.dedent("""
            import os, subprocess, sys, time
            child = subprocess.Popen(
                [sys.executable, '-c', sys.argv[3], sys.argv[1], sys.argv[2]],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            while not os.path.exists(sys.argv[1]):
                time.sleep(0.01)
        """), str(ready), str(pids), IGNORES_TERM], kill_grace=30)
        handler, pid = yield self.stop_once_ready(harness, ready, pids)
        self.assertEqual(len(errors), 1)
        self.assertIn("did not stop within", errors[0]["log_format"])
        yield self.wait_for(lambda: not alive(pid), limit=10.0)
        yield self.wait_for(lambda: handler.running == 0, limit=10.0)

    @inlineCallbacks
    def test_cancel_kills_without_waiting_for_grace(self) -> Any:
        """Cancelling stop() sends SIGKILL at once, before any grace period passes, and fails it with CancelledError."""
        clock = Clock()
        handler, handled, pid = yield self.clocked_run(clock)
        stopped = handler.stop()
        # SIGTERM is ignored and the clock does not move: nothing ends.
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertNoResult(stopped)
        self.assertTrue(alive(pid))
        stopped.cancel()
        self.failureResultOf(stopped, CancelledError)
        yield self.wait_for(lambda: not alive(pid), limit=10.0)
        yield self.wait_for(lambda: handler.running == 0, limit=10.0)
        self.assertNoResult(handled)
        self.assertEqual(clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_timeout_of_stop_kills(self) -> Any:
        """stop() bounded with addTimeout, as the runner does, fails with TimeoutError and kills the run."""
        clock = Clock()
        handler, _, pid = yield self.clocked_run(clock)
        stopped: Deferred[None] = handler.stop()
        stopped.addTimeout(5, clock)
        clock.advance(5)
        self.failureResultOf(stopped, TimeoutError)
        yield self.wait_for(lambda: not alive(pid), limit=10.0)
        yield self.wait_for(lambda: handler.running == 0, limit=10.0)

    @inlineCallbacks
    def test_stop_within_grace_succeeds(self) -> Any:
        """A run that ends at SIGTERM lets stop() succeed; nothing is logged as an error."""
        pids = self.out("pid")
        self.reap_later(pids)
        errors = self.errors()
        harness = self.harness([PY, "-c", textwrap.dedent("""
            import os, sys, time
            open(sys.argv[1], 'w').write(str(os.getpid()))
            time.sleep(60)
        """), str(pids)], kill_grace=30)
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        harness.deliver(Message.create(TOPIC, {}))
        yield self.wait_for(lambda: pids.exists() and pids.read_text() != "")
        pid = int(pids.read_text())
        yield harness.stop()
        self.assertEqual(errors, [])
        self.assertFalse(alive(pid))
        self.assertEqual(handler.running, 0)
