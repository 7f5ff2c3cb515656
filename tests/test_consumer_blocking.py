"""
A consumer notices a plugin that blocks the event loop: each synchronous call
into the plugin is timed, and one that took longer than the consumer's
C{blocking_warning} is counted (C{/metrics}) and logged, the first at once,
then in a summary at most once per L{SUMMARY_INTERVAL}.

The calls are timed with a monotonic clock the tests control: a test
handler "blocks" by moving that clock on (one test really sleeps, against
the real clock, and asserts only what the sleep guarantees).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.config import parse_config
from fedhub.consumers.blocking import CALLS, SUMMARY_INTERVAL, BlockingCalls
from fedhub.consumers.runner import ConsumerService
from fedhub.errors import ConfigError, NotHandled
from fedhub.interfaces import IMessageHandler
from fedhub.message import Message
from fedhub.status.metrics import HubMonitor
from tests.test_consumer_runner import FakeDelivery, component
from tests.test_status import FakeHub


class Monotonic:
    """
    A monotonic clock that moves only when told.
    """

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def block(self, seconds: float) -> None:
        """Pretend the code running now held the event loop C{seconds}."""
        self.now += seconds


@implementer(IMessageHandler)
class Blocking:
    """
    A handler whose calls take as long (on a L{Monotonic}) as the test says:
    C{handle} the message's C{takes}, the others their entry in C{takes}.
    """

    topics = ("#",)

    def __init__(self, clock: Monotonic, **takes: float) -> None:
        self.clock = clock
        self.takes = takes
        self.seen: list[Message] = []
        self.pending: list[Deferred[None]] = []

    def handle(self, message: Message) -> Any:
        self.seen.append(message)
        self.clock.block(message.body.get("takes", 0.0))
        if message.body.get("fail"):
            raise RuntimeError("failed after blocking")
        if message.body.get("hold"):
            d: Deferred[None] = Deferred()
            self.pending.append(d)
            return d
        return None

    def start(self) -> None:
        self.clock.block(self.takes.get("start", 0.0))

    def stop(self) -> None:
        self.clock.block(self.takes.get("stop", 0.0))

    def drain(self) -> None:
        self.clock.block(self.takes.get("drain", 0.0))
        for d in self.pending:
            d.callback(None)
        self.pending = []

    def abandon(self, message: Message) -> None:
        self.clock.block(self.takes.get("abandon", 0.0))


@implementer(IMessageHandler)
class Sleeping:
    """
    A handler that really blocks: C{time.sleep} for its message's C{sleep}.
    """

    topics = ("#",)

    def handle(self, message: Message) -> None:
        time.sleep(message.body["sleep"])

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Warnings:
    """
    The log events about blocking calls, collected for one test.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []

        @implementer(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if "held the event loop" in event.get("log_format", ""):
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        case.addCleanup(globalLogPublisher.removeObserver, observe)

    def first(self) -> list[tuple[str, str, float]]:
        """(consumer, call, seconds) of each warning about one call."""
        return [
            (e["consumer"], e["call"], round(e["seconds"], 9))
            for e in self.events if "count" not in e
        ]

    def summaries(self) -> list[tuple[str, int, str, float]]:
        """(consumer, count, longest call, its seconds) of each summary."""
        return [
            (e["consumer"], e["count"], e["call"], round(e["seconds"], 9))
            for e in self.events if "count" in e
        ]


class BlockingCase(SynchronousTestCase):
    """
    A consumer on a memory bus, its reactor a L{Clock} and its calls into
    the plugin timed on a L{Monotonic}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.monotonic = Monotonic()
        self.bus = MemoryBus("d", clock=self.clock)
        self.bus.startService()
        self.warnings = Warnings(self)

    def consumer(
        self, handler: IMessageHandler, monotonic: Callable[[], float] | None = None, **settings: Any
    ) -> ConsumerService:
        service = ConsumerService(
            component(**settings), handler, self.bus, self.clock,
            monotonic=monotonic or self.monotonic,
        )
        service.startService()
        self.turn()
        self.assertTrue(service.consuming)
        return service

    def turn(self) -> None:
        for _ in range(5):
            self.clock.advance(0)

    def publish(self, **body: Any) -> None:
        self.successResultOf(self.bus.publish(Message.create("t.x", body)))
        self.turn()


class WarningTests(BlockingCase):
    """
    A call that blocks is logged and counted; one that does not is not.
    """

    def test_blocking_handle_warned_and_counted(self) -> None:
        """A handle() that holds the loop 0.7 s (default threshold 0.5 s): one warning naming the consumer, the call and the time; counted once."""
        handler = Blocking(self.monotonic)
        service = self.consumer(handler)
        self.publish(takes=0.7)
        self.assertEqual(self.warnings.first(), [("c", "handle", 0.7)])
        (event,) = self.warnings.events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["threshold"], 0.5)
        self.assertEqual(service.blocking.counts, {**dict.fromkeys(CALLS, 0), "handle": 1})
        # Only logged: the message is handled as usual.
        self.assertEqual(service.stats["acked"], 1)

    def test_fast_handler_silent(self) -> None:
        """Calls of at most the threshold (exactly 0.5 s included) log and count nothing, and set no timer."""
        # Times a float holds exactly, so that 0.5 is 0.5.
        handler = Blocking(self.monotonic, start=0.5, stop=0.125)
        service = self.consumer(handler)
        for takes in (0.0, 0.25, 0.5):
            self.publish(takes=takes)
        self.assertEqual(service.stats["acked"], 3)
        self.successResultOf(service.stopService())
        self.assertEqual(self.warnings.events, [])
        self.assertEqual(service.blocking.counts, dict.fromkeys(CALLS, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_threshold_per_consumer(self) -> None:
        """A consumer's blocking_warning is its threshold: 0.7 s passes under 1 s, 1.2 s does not."""
        service = self.consumer(Blocking(self.monotonic), blocking_warning=1.0)
        self.publish(takes=0.7)
        self.assertEqual(self.warnings.events, [])
        self.publish(takes=1.2)
        self.assertEqual(self.warnings.first(), [("c", "handle", 1.2)])
        self.assertEqual(self.warnings.events[0]["threshold"], 1.0)
        self.assertEqual(service.blocking.counts["handle"], 1)

    def test_constructor_overrides_configuration(self) -> None:
        """ConsumerService(blocking_warning=...) wins over the component's key."""
        service = ConsumerService(
            component(blocking_warning=5.0), Blocking(self.monotonic), self.bus, self.clock,
            blocking_warning=0.1, monotonic=self.monotonic,
        )
        self.assertEqual(service.blocking.threshold, 0.1)

    def test_real_sleep(self) -> None:
        """A handle() that really sleeps, timed on the real monotonic clock, is warned about and counted once."""
        service = self.consumer(Sleeping(), monotonic=time.monotonic, blocking_warning=0.01)
        self.publish(sleep=0.05)
        self.assertEqual([(c, call) for c, call, _ in self.warnings.first()], [("c", "handle")])
        self.assertGreaterEqual(self.warnings.events[0]["seconds"], 0.05)
        self.assertEqual(service.blocking.counts["handle"], 1)
        self.successResultOf(service.stopService())

    def test_raising_handler_timed(self) -> None:
        """A handle() that blocks and then raises is counted, and its failure follows the policy."""
        service = self.consumer(Blocking(self.monotonic))
        self.publish(takes=0.9, fail=True)
        self.assertEqual(self.warnings.first(), [("c", "handle", 0.9)])
        self.assertEqual(service.stats["retried"], 1)
        self.flushLoggedErrors(RuntimeError)

    def test_coroutine_timed_to_its_first_await(self) -> None:
        """An async handle() is timed up to its first await (which runs in the call), not after it."""
        clock = self.monotonic
        later: Deferred[None] = Deferred()

        @implementer(IMessageHandler)
        class Async:
            topics = ("#",)

            async def handle(self, message: Message) -> None:
                clock.block(message.body["before"])
                await later
                clock.block(message.body["after"])

            def start(self) -> None:
                pass

            def stop(self) -> None:
                pass

        service = self.consumer(Async())
        self.publish(before=0.8, after=3.0)
        self.assertEqual(self.warnings.first(), [("c", "handle", 0.8)])
        later.callback(None)
        self.turn()
        self.assertEqual(service.stats["acked"], 1)
        self.assertEqual(service.blocking.counts["handle"], 1)
        self.assertEqual(len(self.warnings.events), 1)

    def test_every_call_into_the_plugin_timed(self) -> None:
        """start(), drain(), abandon() and stop() are timed and counted under their own names."""
        handler = Blocking(self.monotonic, start=0.6, drain=0.7, abandon=0.8, stop=0.9)
        service = self.consumer(handler, concurrency=2, blocking_warning=0.5)
        self.assertEqual(self.warnings.first(), [("c", "start", 0.6)])
        # A call whose delivery's channel closed is forgotten, and the
        # handler told (abandon) when the next delivery comes.
        orphan = FakeDelivery(Message.create("t.x", {"hold": True}).evolve(queue=service.queue))
        service._on_delivery(orphan)
        orphan.verdicts.append("channel closed")
        held = FakeDelivery(Message.create("t.x", {"hold": True}).evolve(queue=service.queue))
        service._on_delivery(held)
        stopped = service.stopService()
        self.turn()
        self.successResultOf(stopped)
        self.assertEqual(
            service.blocking.counts, {"start": 1, "handle": 0, "drain": 1, "abandon": 1, "stop": 1}
        )
        # The first one at once; the others, held back, in one summary as
        # the consumer stops, with the longest.
        self.assertEqual(self.warnings.summaries(), [("c", 3, "stop", 0.9)])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RateLimitTests(BlockingCase):
    """
    A handler that blocks on every message gets one line, then a summary at
    most once per SUMMARY_INTERVAL.
    """

    def test_always_slow_handler(self) -> None:
        """Ten blocking calls at once: one line; the nine others summed up SUMMARY_INTERVAL later, with the longest."""
        service = self.consumer(Blocking(self.monotonic))
        for n in range(10):
            self.publish(takes=0.6 + n / 100)
        self.assertEqual(len(self.warnings.events), 1)
        self.assertEqual(service.blocking.counts["handle"], 10)
        self.clock.advance(SUMMARY_INTERVAL - 1)
        self.assertEqual(len(self.warnings.events), 1)
        self.clock.advance(1)
        self.assertEqual(self.warnings.summaries(), [("c", 9, "handle", 0.69)])
        # Still slow: the next summary comes another interval later.
        self.publish(takes=0.6)
        self.publish(takes=2.0)
        self.clock.advance(SUMMARY_INTERVAL - 1)
        self.assertEqual(len(self.warnings.events), 2)
        self.clock.advance(1)
        self.assertEqual(self.warnings.summaries()[1:], [("c", 2, "handle", 2.0)])
        self.assertEqual(service.blocking.counts["handle"], 12)
        # An interval without a blocking call ends the hold: nothing is
        # logged for it, and the next one is logged at once.
        self.clock.advance(SUMMARY_INTERVAL)
        self.assertEqual(len(self.warnings.events), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.publish(takes=0.8)
        self.assertEqual(self.warnings.first(), [("c", "handle", 0.6), ("c", "handle", 0.8)])
        self.successResultOf(service.stopService())
        self.assertEqual(len(self.warnings.events), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_sums_up_what_is_held(self) -> None:
        """Stopping logs the summary held back at once and leaves no timer."""
        service = self.consumer(Blocking(self.monotonic))
        self.publish(takes=0.6)
        self.publish(takes=0.7)
        self.successResultOf(service.stopService())
        self.assertEqual(self.warnings.summaries(), [("c", 1, "handle", 0.7)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_consumers_limited_apart(self) -> None:
        """Each consumer has its own limit: a second one's first blocking call is logged at once."""
        first = self.consumer(Blocking(self.monotonic), name="one", queue="q.one")
        second = self.consumer(Blocking(self.monotonic), name="two", queue="q.two")
        self.successResultOf(self.bus.publish(Message.create("t.x", {"takes": 0.6})))
        self.turn()
        self.assertEqual(sorted(c for c, _, _ in self.warnings.first()), ["one", "two"])
        self.successResultOf(first.stopService())
        self.successResultOf(second.stopService())


class ThresholdTests(SynchronousTestCase):
    """
    blocking_warning values: the configuration refuses bad ones with the
    key's path; the runner refuses them too.
    """

    CONFIG = (
        '[domains.d]\nbroker = "memory"\n'
        '[[consumers]]\nname = "w"\nplugin = "log"\ndomain = "d"\n{line}\n'
    )

    def problems(self, line: str) -> list[tuple[str, str]]:
        error = self.assertRaises(ConfigError, parse_config, self.CONFIG.format(line=line))
        return [(p.path, p.message) for p in error.problems]

    def test_default_and_given(self) -> None:
        """Absent, the key is 0.5 s; an integer is taken as seconds."""
        (consumer,) = parse_config(self.CONFIG.format(line="")).consumers
        self.assertEqual(consumer.blocking_warning, 0.5)
        (consumer,) = parse_config(self.CONFIG.format(line="blocking_warning = 2")).consumers
        self.assertEqual(consumer.blocking_warning, 2.0)
        self.assertIsInstance(consumer.blocking_warning, float)

    def test_bad_values_refused(self) -> None:
        """Zero, negative, over 60 s, not a number, inf and nan are each refused at the key."""
        path = "consumers[0].blocking_warning"
        cases = {
            "blocking_warning = 0": "must be greater than 0",
            "blocking_warning = -0.5": "must be greater than 0",
            "blocking_warning = 61": "is in seconds and at most 60",
            "blocking_warning = 500.0": "is in seconds and at most 60",
            "blocking_warning = nan": "must be a finite number, not nan",
            "blocking_warning = inf": "must be a finite number, not inf",
            'blocking_warning = "fast"': "expected a number, not a string",
            "blocking_warning = true": "expected a number, not a boolean",
        }
        for line, message in cases.items():
            self.assertEqual(self.problems(line), [(path, message)], line)

    def test_runner_refuses_bad_values(self) -> None:
        """Built by hand, a consumer refuses a threshold that is not a number greater than 0."""
        bus = MemoryBus("d", clock=Clock())
        handler = Blocking(Monotonic())
        for bad in (0, -1.0, float("nan"), True, "0.5"):
            error = self.assertRaises(
                ValueError, ConsumerService, component(), handler, bus, Clock(),
                blocking_warning=bad,
            )
            self.assertIn("blocking_warning must be a number greater than 0", str(error))

    def test_watch_alone(self) -> None:
        """BlockingCalls counts only calls longer than its threshold."""
        clock = Monotonic()
        calls = BlockingCalls("c", 0.25, Clock(), clock)
        began = clock()
        clock.block(0.25)
        calls.ended("drain", began)
        self.assertEqual(calls.counts["drain"], 0)
        began = clock()
        clock.block(0.375)
        calls.ended("drain", began)
        self.assertEqual(calls.counts["drain"], 1)
        calls.stop()
        self.flushLoggedErrors()


class MetricsTests(BlockingCase):
    """
    /metrics counts the blocking calls per consumer and call.
    """

    def samples(self, monitor: HubMonitor) -> dict[str, float]:
        body, _ = monitor.render()
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                if sample.name == "fedhub_consumer_blocking_calls_total":
                    self.assertEqual(
                        (sample.labels["consumer"], sample.labels["domain"]), ("c", "d")
                    )
                    found[sample.labels["call"]] = sample.value
        return found

    def test_counter(self) -> None:
        """Every call is there at 0 from the start; a blocking handle() counts 1 under handle."""
        service = self.consumer(Blocking(self.monotonic))
        monitor = HubMonitor(FakeHub(consumers={"c": service}), self.clock)
        self.assertEqual(self.samples(monitor), dict.fromkeys(CALLS, 0.0))
        self.publish(takes=0.6)
        self.publish(takes=0.1)
        self.assertEqual(self.samples(monitor), {**dict.fromkeys(CALLS, 0.0), "handle": 1.0})
        self.successResultOf(service.stopService())


class NotHandledTimedTests(BlockingCase):
    """
    A call ending with a verdict is timed like any other.
    """

    def test_not_handled_counted(self) -> None:
        """A handle() that blocks and gives the message back is counted."""
        clock = self.monotonic

        @implementer(IMessageHandler)
        class GivesBack:
            topics = ("#",)

            def handle(self, message: Message) -> None:
                clock.block(0.6)
                raise NotHandled("not now")

            def start(self) -> None:
                pass

            def stop(self) -> None:
                pass

        service = self.consumer(GivesBack())
        delivery = FakeDelivery(Message.create("t.x", {}).evolve(queue=service.queue))
        service._on_delivery(delivery)
        self.assertEqual(delivery.verdicts, ["requeue"])
        self.assertEqual(service.blocking.counts["handle"], 1)
        self.successResultOf(service.stopService())
