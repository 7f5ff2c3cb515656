"""
Tests for the bound on stopping the hub: a service whose stop never
finishes is logged by name and the services after it stop all the same.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.config import ComponentConfig, Option
from fedhub.consumers.log import LogPlugin
from fedhub.consumers.runner import ConsumerService
from fedhub.hub import STOP_TIMEOUT, SequentialMultiService
from fedhub.interfaces import IMessageHandler, IProducerPlugin
from fedhub.message import Message
from fedhub.plugins import PluginContext
from tests import test_hub_edge
from tests.test_hub import Step


class Recorder(test_hub_edge.Recorder):
    """
    Collects log events for the duration of a test.
    """

    def unfinished(self) -> list[dict[str, Any]]:
        """
        The hub's events saying one of its services did not stop in time.
        """
        return [
            e for e in self.events
            if "service" in e and "did not stop within" in e.get("log_format", "")
        ]


def staged(clock: Clock, order: list[str], *names: str) -> tuple[SequentialMultiService, list[Step]]:
    """
    A started L{SequentialMultiService} bounded by C{clock}, with a L{Step}
    child for each name, in order.
    """
    parent = SequentialMultiService(clock=clock)
    steps = [Step(name, order) for name in names]
    for step in steps:
        step.setServiceParent(parent)
    parent.startService()
    return parent, steps


class StopBoundTests(SynchronousTestCase):
    """
    L{SequentialMultiService} with a clock waits a bounded time for each
    child's stop.
    """

    def test_hanging_stop_does_not_hold_later_stages(self) -> None:
        """A producer whose stop never fires holds the outbox and the bus only for STOP_TIMEOUT."""
        events = Recorder(self)
        clock, order = Clock(), list[str]()
        parent, (bus, outbox, stuck) = staged(clock, order, "bus:one", "outbox:one", "producer:stuck")
        stopped = parent.stopService()
        self.assertEqual(order, ["producer:stuck"])
        clock.advance(STOP_TIMEOUT - 1)
        self.assertEqual(order, ["producer:stuck"])
        self.assertEqual(events.unfinished(), [])
        clock.advance(1)
        self.assertEqual(order, ["producer:stuck", "outbox:one"])
        outbox.release.callback(None)
        self.assertEqual(order[-1], "bus:one")
        self.assertNoResult(stopped)
        bus.release.callback(None)
        self.successResultOf(stopped)
        unfinished = events.unfinished()
        self.assertEqual(len(unfinished), 1)
        self.assertEqual(unfinished[0]["service"], "producer:stuck")
        self.assertEqual(unfinished[0]["producer"], "stuck")
        self.assertEqual(unfinished[0]["timeout"], STOP_TIMEOUT)
        self.assertEqual(unfinished[0]["log_level"].name, "error")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_each_unfinished_service_named_once(self) -> None:
        """Of a stage, only the services that did not stop are logged, each once, also when they stop late."""
        events = Recorder(self)
        clock, order = Clock(), list[str]()
        parent, (outbox, a, b, c) = staged(
            clock, order, "outbox:one", "consumer:a", "consumer:b", "consumer:c"
        )
        stopped = parent.stopService()
        b.release.callback(None)
        clock.advance(STOP_TIMEOUT)
        self.assertEqual(order[-1], "outbox:one")
        self.assertEqual(sorted(e["service"] for e in events.unfinished()), ["consumer:a", "consumer:c"])
        self.assertEqual(sorted(e["consumer"] for e in events.unfinished()), ["a", "c"])
        # Finishing late, or failing late, logs nothing more about the timeout.
        a.release.callback(None)
        c.release.errback(RuntimeError("stopped badly, late"))
        outbox.release.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(events.unfinished()), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stops_in_time_leave_no_timer(self) -> None:
        """Stops that finish in time log nothing and leave no delayed call behind."""
        events = Recorder(self)
        clock, order = Clock(), list[str]()
        parent, (outbox, producer) = staged(clock, order, "outbox:one", "producer:p")
        plain = Service()
        plain.setName("status")
        plain.setServiceParent(parent)
        stopped = parent.stopService()
        clock.advance(STOP_TIMEOUT - 1)
        producer.release.callback(None)
        clock.advance(STOP_TIMEOUT - 1)
        outbox.release.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(order, ["producer:p", "outbox:one"])
        self.assertEqual(events.unfinished(), [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_failing_stop_goes_on_at_once(self) -> None:
        """A stop that fails is logged as a failure, not as unfinished, and the next stage starts at once."""
        events = Recorder(self)
        clock, order = Clock(), list[str]()
        parent, (outbox, producer) = staged(clock, order, "outbox:one", "producer:p")
        stopped = parent.stopService()
        producer.release.errback(RuntimeError("cannot stop"))
        self.assertEqual(order, ["producer:p", "outbox:one"])
        outbox.release.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(events.unfinished(), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(clock.getDelayedCalls(), [])


@implementer(IMessageHandler)
class StuckStopHandler:
    """
    A handler whose C{stop()} never finishes.
    """

    topics = ("#",)

    def handle(self, message: Message) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return Deferred()


class ConsumerAllowanceTests(SynchronousTestCase):
    """
    A consumer bounds its own stop by its C{drain_timeout}; the hub's bound
    never cuts that short.
    """

    def test_long_drain_timeout_respected(self) -> None:
        """A consumer with a drain_timeout beyond STOP_TIMEOUT finishes its own stop; the hub logs nothing of it."""
        events = Recorder(self)
        clock, order = Clock(), list[str]()
        drain = STOP_TIMEOUT + 40
        parent = SequentialMultiService(clock=clock)
        outbox = Step("outbox:one", order)
        outbox.setServiceParent(parent)
        bus = MemoryBus("one", clock=clock)
        component = ComponentConfig(
            kind="consumer", index=0, name="slow", plugin="test", domain="one", options={},
            topics=("#",), drain_timeout=drain,
        )
        consumer = ConsumerService(component, StuckStopHandler(), bus, clock)
        consumer.setName("consumer:slow")
        consumer.setServiceParent(parent)
        bus.startService()
        parent.startService()
        for _ in range(5):
            clock.advance(0)
        self.assertTrue(consumer.consuming)
        stopped = parent.stopService()
        clock.advance(STOP_TIMEOUT + 1)
        self.assertEqual(order, [])
        clock.advance(drain - STOP_TIMEOUT - 1)
        # The consumer gave up on its plugin's stop() itself and finished.
        self.assertEqual(order, ["outbox:one"])
        outbox.release.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(events.unfinished(), [])
        self.assertEqual(
            [e["consumer"] for e in events.events if "its plugin did not stop" in e.get("log_format", "")],
            ["slow"],
        )
        self.successResultOf(bus.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])


class NeverStops(Service):
    """
    A producer service whose stop never finishes.
    """

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred()


@implementer(IProducerPlugin)
class NeverStopsPlugin:
    """
    Builds a L{NeverStops}.
    """

    name = "never-stops"
    description = "a producer that never finishes stopping"
    options: Mapping[str, Option] = {}

    def build(self, context: PluginContext) -> IService:
        return NeverStops()


CONFIG = """
[hub]
state_dir = "{state}"

[domains.one]
broker = "memory"

[[consumers]]
name = "log"
plugin = "log"
domain = "one"
topics = ["#"]

[[producers]]
name = "stuck"
plugin = "never-stops"
domain = "one"
"""


class HubStopTests(TestCase):
    """
    A whole hub (with its outbox on disk) whose producer never stops.
    """

    @inlineCallbacks
    def test_hub_stops_its_outbox_and_bus(self) -> Generator[Deferred[Any], Any, None]:
        """After STOP_TIMEOUT on the hub's clock the consumers, the outbox and the bus stop, and the hub's stop fires."""
        events = Recorder(self)
        lookup: dict[str, Any] = {"log": LogPlugin(), "never-stops": NeverStopsPlugin()}
        hub = test_hub_edge.hub_from(self, CONFIG, lookup)
        clock = Clock()
        hub.clock = clock
        hub.startService()
        stopped = hub.stopService()
        consumer = hub.consumers["log"]
        outbox = IService(hub.domains["one"].publisher)
        bus = IService(hub.domains["one"].bus)
        self.assertFalse(hub.producers["stuck"].running)
        self.assertTrue(consumer.running)
        clock.advance(STOP_TIMEOUT)
        self.assertFalse(consumer.running)
        yield stopped
        self.assertFalse(outbox.running)
        self.assertFalse(bus.running)
        self.assertEqual([e["producer"] for e in events.unfinished()], ["stuck"])
        self.assertEqual(clock.getDelayedCalls(), [])
