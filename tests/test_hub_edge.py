"""
Edge cases of L{fedhub.hub}: services whose start fails, and the order and
concurrency of stopping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, cast

from twisted.application.service import IService, Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from fedhub import hub as hub_module
from fedhub.cli import check_config
from fedhub.config import Config, Option, parse_config
from fedhub.errors import ConfigError
from fedhub.consumers.log import LogPlugin
from fedhub.hub import Hub, SequentialMultiService
from fedhub.interfaces import IProducerPlugin
from fedhub.plugins import PluginContext


class Step(Service):
    """
    A service that records its starts and stops, and stops only when told.
    """

    def __init__(self, name: str, order: list[str]) -> None:
        self.setName(name)
        self.order = order
        self.release: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        self.order.append(f"start {self.name}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.order.append(f"stop {self.name}")
        return self.release


class RaisingStart(Service):
    """
    A service whose C{startService} raises.
    """

    def startService(self) -> None:
        super().startService()
        raise RuntimeError("cannot start")


class FailingStart(Service):
    """
    A service whose C{startService} returns a failed Deferred.
    """

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        super().startService()
        return fail(RuntimeError("start failed later"))


class Recorder:
    """
    Collects log events for the duration of a test.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_failure") is not None]


class StartFailureTests(SynchronousTestCase):
    """
    A child whose start fails is contained: the others still start.
    """

    def test_raising_start_contained(self) -> None:
        """A child whose startService raises is logged by name and the children after it still start."""
        events = Recorder(self)
        order: list[str] = []
        parent = SequentialMultiService()
        Step("first", order).setServiceParent(parent)
        RaisingStart().setServiceParent(parent)
        last = Step("producer:last", order)
        last.setServiceParent(parent)
        parent.startService()
        self.assertEqual(order, ["start first", "start producer:last"])
        self.assertTrue(last.running)
        failures = events.failures()
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failed_start_deferred_logged(self) -> None:
        """A child whose startService returns a failed Deferred is logged with its component name, not left unhandled."""
        events = Recorder(self)
        parent = SequentialMultiService()
        failing = FailingStart()
        failing.setName("producer:mail")
        failing.setServiceParent(parent)
        parent.startService()
        failures = events.failures()
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["producer"], "mail")
        self.assertEqual(failures[0]["service"], "producer:mail")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_start_failures_kept(self) -> None:
        """
        Why each child's start failed is kept by service name (for
        C{/ready}); a later start begins afresh.
        """
        parent = SequentialMultiService()
        raising = RaisingStart()
        raising.setName("producer:raising")
        raising.setServiceParent(parent)
        failing = FailingStart()
        failing.setName("producer:mail")
        failing.setServiceParent(parent)
        Service().setServiceParent(parent)
        parent.startService()
        self.assertEqual(parent.start_failures, {
            "producer:raising": "RuntimeError: cannot start",
            "producer:mail": "RuntimeError: start failed later",
        })
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.successResultOf(parent.stopService())
        parent.removeService(raising)
        parent.removeService(failing)
        parent.startService()
        self.assertEqual(parent.start_failures, {})


class StagedStopTests(SynchronousTestCase):
    """
    Children of one kind stop together; kinds stop one after the other.
    """

    def test_same_kind_stops_together(self) -> None:
        """Consumers stop at the same time, and the outbox only once every consumer has stopped."""
        order: list[str] = []
        parent = SequentialMultiService()
        outbox = Step("outbox:one", order)
        a, b = Step("consumer:a", order), Step("consumer:b", order)
        for service in (outbox, a, b):
            service.setServiceParent(parent)
        parent.startService()
        del order[:]
        stopped = parent.stopService()
        self.assertEqual(order, ["stop consumer:b", "stop consumer:a"])
        b.release.callback(None)
        self.assertEqual(order, ["stop consumer:b", "stop consumer:a"])
        a.release.callback(None)
        self.assertEqual(order, ["stop consumer:b", "stop consumer:a", "stop outbox:one"])
        self.assertNoResult(stopped)
        outbox.release.callback(None)
        self.successResultOf(stopped)

    def test_failed_stop_does_not_stop_the_stage(self) -> None:
        """A child whose stop fails is logged and the next kind still stops after its peers."""
        order: list[str] = []
        parent = SequentialMultiService()
        outbox = Step("outbox:one", order)
        a, b = Step("consumer:a", order), Step("consumer:b", order)
        for service in (outbox, a, b):
            service.setServiceParent(parent)
        parent.startService()
        del order[:]
        stopped = parent.stopService()
        a.release.errback(RuntimeError("stop failed"))
        self.assertEqual(order, ["stop consumer:b", "stop consumer:a"])
        b.release.callback(None)
        self.assertEqual(order[-1], "stop outbox:one")
        outbox.release.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


@implementer(IProducerPlugin)
class ServicePlugin:
    """
    A producer plugin building a given kind of service.
    """

    description = "builds a test service"
    options: Mapping[str, Option] = {}

    def __init__(self, name: str, factory: type[Service]) -> None:
        self.name = name
        self.factory = factory
        self.built: list[Service] = []

    def build(self, context: PluginContext) -> IService:
        service = self.factory()
        self.built.append(service)
        return service


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
name = "broken"
plugin = "raising"
domain = "one"

[[producers]]
name = "fine"
plugin = "plain"
domain = "one"
"""


def hub_from(test: SynchronousTestCase, text: str, lookup: Mapping[str, Any]) -> Hub:
    """
    A hub on the real reactor configured by C{text}, its C{{state}} a new
    directory of C{test}'s, with the plugins of C{lookup} by name.
    """
    config = parse_config(
        text.format(state=os.path.abspath(test.mktemp())), "test",
        find_plugin=lambda kind, name: lookup.get(name),
    )
    return Hub(config, reactor, find_consumer=lambda n: lookup[n], find_producer=lambda n: lookup[n])


class HubStartFailureTests(TestCase):
    """
    A hub with a producer whose start raises.
    """

    def test_hub_runs_without_the_broken_producer(self) -> None:
        """Starting the hub does not raise; every other service runs, and the failure names the producer."""
        events = Recorder(self)
        plain = ServicePlugin("plain", Service)
        lookup: dict[str, Any] = {
            "log": LogPlugin(), "raising": ServicePlugin("raising", RaisingStart), "plain": plain,
        }
        hub = hub_from(self, CONFIG, lookup)
        hub.startService()
        self.addCleanup(hub.stopService)
        self.assertTrue(hub.producers["fine"].running)
        self.assertTrue(hub.consumers["log"].running)
        self.assertTrue(IService(hub.domains["one"].publisher).running)
        failures = events.failures()
        self.assertEqual([f.get("producer") for f in failures], ["broken"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class Builds:
    """
    A plugin of either kind whose C{build} returns what it is given.
    """

    description = "builds what it is given"
    options: Mapping[str, Option] = {}

    def __init__(self, name: str, built: object) -> None:
        self.name = name
        self.built = built

    def build(self, context: PluginContext) -> object:
        return self.built


class Handler:
    """
    A message handler with the given topics (C{None}: no attribute).
    """

    def __init__(self, topics: object = None) -> None:
        if topics is not None:
            self.topics = topics

    def handle(self, message: object) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class NoStop:
    topics = ("#",)

    def handle(self, message: object) -> None:
        pass

    def start(self) -> None:
        pass


BUILT_CONFIG = """
[hub]
state_dir = "{state}"

[domains.one]
broker = "memory"

[[{kind}s]]
name = "odd"
plugin = "odd"
domain = "one"
{extra}
"""


class BuiltCheckTests(SynchronousTestCase):
    """
    What a plugin's C{build} returns is checked before the hub runs it, by
    the hub and by C{fedhub check-config} alike: a plugin that builds
    something that can not run is a configuration problem naming the
    component, never a traceback.
    """

    def config(self, kind: str, built: object, extra: str) -> tuple[Config, dict[str, Builds]]:
        """
        A configuration of one component C{odd} of C{kind}, whose plugin
        builds C{built}; the hub and check-config find that plugin.
        """
        text = BUILT_CONFIG.format(state=os.path.abspath(self.mktemp()), kind=kind, extra=extra)
        lookup = {"odd": Builds("odd", built)}
        find = lambda k, name: lookup[name]  # noqa: E731
        self.patch(hub_module, "find_plugin", find)
        self.patch(check_config, "find_plugin", find)
        return parse_config(text, "test", find_plugin=find), lookup

    def problems(self, kind: str, built: object, extra: str = "") -> list[str]:
        """
        The problems the hub and check-config find, which must agree.
        """
        config, lookup = self.config(kind, built, extra)
        checked = [str(p) for p in check_config.build_problems(config)]
        with self.assertRaises(ConfigError) as raised:
            Hub(config, reactor, find_consumer=lookup.__getitem__, find_producer=lookup.__getitem__)
        self.assertEqual([str(p) for p in raised.exception.problems], checked)
        return checked

    def problems_none(self, kind: str, built: object, extra: str = "") -> list[str]:
        """
        What check-config finds in a configuration the hub takes.
        """
        config, lookup = self.config(kind, built, extra)
        Hub(config, reactor, find_consumer=lookup.__getitem__, find_producer=lookup.__getitem__)
        return [str(p) for p in check_config.build_problems(config)]

    def test_consumer_built_none(self) -> None:
        """A consumer plugin that built C{None} is named with what it built."""
        (problem,) = self.problems("consumer", None, 'topics = ["#"]')
        self.assertIn("consumers[0]", problem)
        self.assertIn("plugin 'odd' built a NoneType, not a message handler: it has no callable "
                      "handle, start, stop", problem)

    def test_consumer_without_stop(self) -> None:
        """A handler missing one of its methods is refused, naming it."""
        (problem,) = self.problems("consumer", NoStop())
        self.assertIn("it has no callable stop", problem)

    def test_topics_from_nowhere(self) -> None:
        """No topics in the configuration and none (or bad ones) on the handler: refused."""
        for topics, shown in [(None, "missing"), ("a.b", "'a.b'"), ((), "()"), ([1], "[1]")]:
            (problem,) = self.problems("consumer", Handler(topics))
            self.assertIn("consumers[0]", problem)
            self.assertIn("no topics: the configuration gives none", problem)
            self.assertIn(shown, problem)

    def test_topics_from_either(self) -> None:
        """Topics in the configuration or on the handler are enough."""
        self.assertEqual(self.problems_none("consumer", Handler(), 'topics = ["#"]'), [])
        self.assertEqual(self.problems_none("consumer", Handler(["a.#"])), [])

    def test_producer_not_a_service(self) -> None:
        """A producer plugin that built something that is no service is refused."""
        (problem,) = self.problems("producer", object())
        self.assertIn("producers[0]", problem)
        self.assertIn("plugin 'odd' built a object, not a Twisted service (IService)", problem)
