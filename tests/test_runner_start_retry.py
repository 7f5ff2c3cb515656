"""
Tests for L{fedhub.consumers.runner}: a consumer whose start fails (the
broker refuses its topology, its plugin's C{start()} raises) tries again with
backoff until it consumes, and stops trying when it is stopped.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.consumers.runner import START_SLOW, ConsumerService
from fedhub.errors import AccessRefused, ConfigError, ConfigProblem, PreconditionFailed
from fedhub.interfaces import IMessageHandler
from fedhub.message import Message
from fedhub.topology import Topology
from tests.test_consumer_runner import component


@implementer(IMessageHandler)
class StartingHandler:
    """
    A handler whose start() raises the given exceptions, one per call, then
    succeeds; it records its start() and stop() calls in order.
    """

    topics = ("#",)

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls: list[str] = []
        self.seen: list[Message] = []

    def handle(self, message: Message) -> None:
        self.seen.append(message)

    def start(self) -> None:
        self.calls.append("start")
        if self.failures:
            raise self.failures.pop(0)

    def stop(self) -> None:
        self.calls.append("stop")


class RefusingBus(MemoryBus):
    """
    A memory bus that refuses the first C{refusals} declarations (as a
    broker answering C{403 ACCESS_REFUSED}), or holds each declaration
    until the test fires it, when C{hold} is set.
    """

    def __init__(self, *args: Any, refusals: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals = refusals
        self.declares = 0
        self.subscribes = 0
        self.hold = False
        self.held: list[Deferred[None]] = []

    def declare(self, topology: Topology) -> Deferred[None]:
        self.declares += 1
        if self.hold:
            held: Deferred[None] = Deferred()
            self.held.append(held)
            return held.addCallback(lambda _: super(RefusingBus, self).declare(topology))
        if self.refusals:
            self.refusals -= 1
            return fail(AccessRefused(403, "ACCESS_REFUSED - configure access to queue refused"))
        return super().declare(topology)

    def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        self.subscribes += 1
        return super().subscribe(*args, **kwargs)


class StartRetryTests(SynchronousTestCase):
    """
    A consumer on a memory bus that refuses, whose time is a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def make(self, handler: StartingHandler, refusals: int = 0) -> tuple[ConsumerService, RefusingBus]:
        bus = RefusingBus("d", clock=self.clock, refusals=refusals)
        bus.startService()
        service = ConsumerService(component(), handler, bus, self.clock)
        return service, bus

    def next_delay(self) -> float:
        """The delay until the one call the clock holds."""
        calls = self.clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        return calls[0].getTime() - self.clock.seconds()

    def start_failures(self) -> list[dict[str, Any]]:
        return [
            e for e in self.events
            if "could not start" in e.get("log_format", "") and e.get("consumer") == "c"
        ]

    def told(self, kind: type[Exception]) -> int:
        """
        How many start failures were logged with an error of C{kind}, one
        of fedhub's: by what it says, without a traceback.
        """
        told = [e for e in self.start_failures() if e.get("error", "").startswith(kind.__name__ + ": ")]
        for event in told:
            self.assertIsNone(event.get("log_failure"))
        return len(told)

    def test_refused_declare_retried_with_backoff(self) -> None:
        """A refused declaration is tried again after 1, 2, 4 s; then the consumer consumes, its plugin started once."""
        handler = StartingHandler()
        service, bus = self.make(handler, refusals=3)
        service.startService()
        self.assertFalse(service.consuming)
        self.assertIn("AccessRefused", service.start_error or "")
        delays = []
        while not service.consuming:
            delays.append(self.next_delay())
            self.clock.advance(delays[-1])
        self.assertIsNone(service.start_error)
        self.assertEqual(delays, [1.0, 2.0, 4.0])
        self.assertEqual(bus.declares, 4)
        self.assertEqual(bus.subscribes, 1)
        self.assertEqual(handler.calls, ["start"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        failures = self.start_failures()
        self.assertEqual([e["log_level"] for e in failures], [LogLevel.error] * 3)
        self.assertEqual([e["attempt"] for e in failures], [1, 2, 3])
        self.assertEqual([e["delay"] for e in failures], [1.0, 2.0, 4.0])
        self.assertEqual(self.told(AccessRefused), 3)
        message = Message.create("t.x", {"n": 1})
        self.successResultOf(bus.publish(message))
        self.clock.advance(0)
        self.assertEqual([m.id for m in handler.seen], [message.id])

    def test_backoff_capped(self) -> None:
        """The delay doubles from 1 s and stays at 60 s."""
        handler = StartingHandler()
        service, bus = self.make(handler, refusals=9)
        service.startService()
        delays = []
        while not service.consuming:
            delays.append(self.next_delay())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0])
        self.assertEqual(self.told(AccessRefused), 9)

    def test_backoff_starts_over_after_a_start(self) -> None:
        """Once a start succeeded, the next failed start (after a restart of the service) waits 1 s again."""
        handler = StartingHandler()
        service, bus = self.make(handler, refusals=3)
        service.startService()
        self.clock.advance(1)
        self.clock.advance(2)
        self.clock.advance(4)
        self.assertTrue(service.consuming)
        self.successResultOf(service.stopService())
        bus.refusals = 1
        service.startService()
        self.assertEqual(self.next_delay(), 1.0)
        self.clock.advance(1)
        self.assertTrue(service.consuming)
        self.assertEqual(self.told(AccessRefused), 4)

    def test_plugin_start_retried(self) -> None:
        """A plugin whose start() raised is started again after the backoff, without a stop() between."""
        handler = StartingHandler(RuntimeError("CA file unreadable"), OSError("still unreadable"))
        service, bus = self.make(handler)
        service.startService()
        self.assertFalse(service.consuming)
        self.assertEqual(bus.declares, 0)
        self.clock.advance(1)
        self.assertFalse(service.consuming)
        self.clock.advance(2)
        self.assertTrue(service.consuming)
        self.assertEqual(handler.calls, ["start", "start", "start"])
        self.assertEqual(bus.declares, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError, OSError)), 2)
        self.assertEqual([e["log_level"] for e in self.start_failures()], [LogLevel.error] * 2)

    def test_same_failure_traced_once(self) -> None:
        """
        A plugin whose start() keeps raising the same error has its
        traceback logged at the first attempt only; the next attempts say
        the error on one line, until the error changes, and again after the
        consumer started and failed anew.
        """
        handler = StartingHandler(
            RuntimeError("boom"), RuntimeError("boom"), RuntimeError("boom"), OSError("other"),
        )
        service, bus = self.make(handler)
        service.startService()
        self.clock.advance(1)
        self.clock.advance(2)
        self.clock.advance(4)
        self.clock.advance(8)
        self.assertTrue(service.consuming)
        failures = self.start_failures()
        self.assertEqual([e["attempt"] for e in failures], [1, 2, 3, 4])
        self.assertEqual(
            [e.get("log_failure") is not None for e in failures], [True, False, False, True]
        )
        self.assertEqual([e.get("error") for e in failures[1:3]], ["RuntimeError: boom"] * 2)
        self.assertEqual([e["log_level"] for e in failures], [LogLevel.error] * 4)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        service.stopService()
        handler.failures = [RuntimeError("boom")]
        service.startService()
        self.assertIsNotNone(self.start_failures()[-1].get("log_failure"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_configuration_error_on_one_line(self) -> None:
        """
        A plugin whose start() finds its configuration unusable (exec's
        missing program) is logged and shown by its problems, on one line,
        without a traceback.
        """
        problem = ConfigProblem("notify.command", "can not run 'notify': not found or not executable")
        handler = StartingHandler(ConfigError([problem]))
        service, bus = self.make(handler)
        service.startService()
        expected = "ConfigError: notify.command: can not run 'notify': not found or not executable"
        self.assertEqual(service.start_error, expected)
        self.assertEqual(self.told(ConfigError), 1)
        self.assertEqual(self.start_failures()[0]["error"], expected)
        self.clock.advance(1)
        self.assertTrue(service.consuming)

    def test_changed_arguments_retried(self) -> None:
        """A 406 on the queue's arguments is retried too, the plugin not started again."""
        handler = StartingHandler()
        service, bus = self.make(handler)
        real = bus.declare
        answers: list[Any] = [PreconditionFailed(406, "PRECONDITION_FAILED - inequivalent arg"), None]

        def declare(topology: Topology) -> Deferred[None]:
            answer = answers.pop(0)
            return fail(answer) if answer is not None else real(topology)

        bus.declare = declare  # type: ignore[method-assign]
        service.startService()
        self.assertFalse(service.consuming)
        self.clock.advance(1)
        self.assertTrue(service.consuming)
        self.assertEqual(handler.calls, ["start"])
        self.assertEqual(self.told(PreconditionFailed), 1)

    def test_stop_during_backoff(self) -> None:
        """Stopping while waiting to try again cancels the retry; nothing is tried afterwards."""
        handler = StartingHandler()
        service, bus = self.make(handler, refusals=100)
        service.startService()
        self.clock.advance(1)
        self.assertEqual(bus.declares, 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual(bus.declares, 2)
        self.assertFalse(service.consuming)
        self.assertEqual(self.told(AccessRefused), 2)

    def test_failure_after_stop_not_retried(self) -> None:
        """An attempt that fails after the consumer stopped is not retried and not logged as an error."""
        handler = StartingHandler()
        service, bus = self.make(handler)
        bus.hold = True
        service.startService()
        self.assertEqual(len(bus.held), 1)
        self.successResultOf(service.stopService())
        bus.held[0].errback(AccessRefused(403, "ACCESS_REFUSED"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.start_failures(), [])
        self.assertEqual(bus.subscribes, 0)
        self.assertEqual(self.flushLoggedErrors(AccessRefused), [])

    def test_no_two_starts_at_once(self) -> None:
        """
        A restart while an attempt still waits for the bus starts nothing
        new; once that attempt ends, it does not subscribe for the old run,
        and one fresh attempt (plugin started again) follows.
        """
        handler = StartingHandler()
        service, bus = self.make(handler)
        bus.hold = True
        service.startService()
        self.successResultOf(service.stopService())
        service.startService()
        self.assertEqual(bus.declares, 1)
        self.assertEqual(handler.calls, ["start", "stop"])
        bus.hold = False
        bus.held[0].callback(None)
        self.assertTrue(service.consuming)
        self.assertEqual(bus.declares, 2)
        self.assertEqual(bus.subscribes, 1)
        self.assertEqual(handler.calls, ["start", "stop", "start"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SlowStartHandler(StartingHandler):
    """
    A handler whose start() returns a Deferred the test fires.
    """

    def __init__(self) -> None:
        super().__init__()
        self.started: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:  # type: ignore[override]
        self.calls.append("start")
        return self.started


class StopDuringStartTests(SynchronousTestCase):
    """
    A consumer stopped while its plugin's start() is still going.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def service(self, handler: StartingHandler) -> ConsumerService:
        bus = RefusingBus("d", clock=self.clock, refusals=0)
        bus.startService()
        return ConsumerService(component(), handler, bus, self.clock)

    def test_stop_comes_after_start(self) -> None:
        """The plugin's stop() is called after its start() ended, never before; nothing is consumed."""
        handler = SlowStartHandler()
        service = self.service(handler)
        service.startService()
        stopped = service.stopService()
        self.assertEqual(handler.calls, ["start"])
        self.assertNoResult(stopped)
        handler.started.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(handler.calls, ["start", "stop"])
        self.assertFalse(service.consuming)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_start_that_never_ends_bounded(self) -> None:
        """A start() that never ends holds the stop for drain_timeout at most; then stop() is called."""
        handler = SlowStartHandler()
        service = self.service(handler)
        service.startService()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(service.drain_timeout)
        self.successResultOf(stopped)
        self.assertEqual(handler.calls, ["start", "stop"])

    def test_slow_start_said(self) -> None:
        """
        A start() still going after START_SLOW seconds is logged as a
        warning and shown in start_error (so /ready says why the consumer
        does not consume); once it ends the consumer consumes and the error
        is gone.  A stop while it goes says what it waits for.
        """
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        handler = SlowStartHandler()
        service = self.service(handler)
        service.startService()
        self.clock.advance(START_SLOW - 1)
        self.assertIsNone(service.start_error)
        self.clock.advance(1)
        self.assertEqual(service.start_error,
                         f"its plugin's start() has not finished after {START_SLOW:g} s")
        [warning] = [e for e in events if e.get("log_level") == LogLevel.warn and "consumer" in e]
        self.assertIn("has not finished", warning["log_format"])
        self.assertEqual(warning["consumer"], "c")
        handler.started.callback(None)
        self.assertTrue(service.consuming)
        self.assertIsNone(service.start_error)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Started again: a start() that does not end, and a stop.
        self.successResultOf(service.stopService())
        handler.started = Deferred()
        service.startService()
        stopped = service.stopService()
        [waiting] = [e for e in events if "waiting up to" in e.get("log_format", "")]
        self.assertEqual(waiting["timeout"], service.drain_timeout)
        handler.started.callback(None)
        self.successResultOf(stopped)
