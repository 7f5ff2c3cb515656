"""
Tests for configured topology: a domain's C{topology} table and a consumer's
C{queue_arguments}, from the file to the broker declarations.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fedhub.bus.memory import MemoryBus
from fedhub.config import parse_config
from fedhub.consumers.log import LogHandler, LogPlugin
from fedhub.consumers.runner import ConsumerService
from fedhub.errors import ConfigError
from fedhub.hub import Hub
from fedhub.message import Message
from fedhub.topology import (
    BindingSpec,
    ExchangeSpec,
    OverlapSearch,
    topic_matched_by_all,
    topic_matches,
)

LOOKUP = {"log": LogPlugin()}


def parse(text: str) -> Any:
    return parse_config(text, "test", find_plugin=lambda kind, name: LOOKUP.get(name))


DOMAIN = """
[hub]
state_dir = "{state}"

[domains.infra]
broker = "memory"

[domains.infra.topology]
exchanges = [{{ name = "fedhub.archive", type = "fanout" }}]
queues = [{{ name = "archive", arguments = {{ "x-queue-type" = "quorum", "x-max-length" = 1000 }} }}]
bindings = [
    {{ queue = "archive", exchange = "fedhub.archive" }},
    {{ queue = "archive", exchange = "amq.topic", routing_key = "org.#" }},
]
"""


class ParseTests(SynchronousTestCase):
    """
    The C{topology} table and C{queue_arguments} key.
    """

    def test_topology(self) -> None:
        """Exchanges, queues (with arguments) and bindings become topology specs."""
        config = parse(DOMAIN.format(state="/tmp/x"))
        topology = config.domains["infra"].topology
        self.assertEqual(topology.exchanges, (ExchangeSpec("fedhub.archive", "fanout", True),))
        self.assertEqual(topology.queues[0].name, "archive")
        self.assertEqual(dict(topology.queues[0].arguments), {"x-queue-type": "quorum", "x-max-length": 1000})
        self.assertEqual(
            topology.bindings,
            (BindingSpec("archive", "fedhub.archive", "#"), BindingSpec("archive", "amq.topic", "org.#")),
        )

    def test_problems(self) -> None:
        """Every mistake in the topology table is reported with its key path."""
        text = (
            '[domains.d]\nbroker = "memory"\n[domains.d.topology]\n'
            'exchanges = [{ name = "e", type = "weird" }]\n'
            'queues = [{ durable = true }, { name = "q", arguments = { "max" = 1, "x-a" = [1] } }]\n'
            'bindings = [{ queue = "q", exchange = "e", routing_key = "a..b", extra = 1 }]\n'
            'other = 1\n'
        )
        error = self.assertRaises(ConfigError, parse, text)
        paths = sorted(p.path for p in error.problems)
        self.assertEqual(
            paths,
            sorted([
                "domains.d.topology.exchanges[0].type",
                "domains.d.topology.queues[0].name",
                "domains.d.topology.queues[1].arguments.max",
                "domains.d.topology.queues[1].arguments.x-a",
                "domains.d.topology.bindings[0].extra",
                "domains.d.topology.bindings[0].routing_key",
                "domains.d.topology.other",
            ]),
        )

    def test_queue_arguments(self) -> None:
        """A consumer's queue_arguments apply to its queue, dead-letter and retry queues."""
        config = parse(
            '[domains.d]\nbroker = "memory"\n[[consumers]]\nname = "c"\nplugin = "log"\n'
            'domain = "d"\ntopics = ["#"]\nmax_retries = 2\n'
            'queue_arguments = { "x-queue-type" = "quorum" }\n'
        )
        component = config.consumers[0]
        self.assertEqual(dict(component.queue_arguments), {"x-queue-type": "quorum"})
        service = ConsumerService(component, LogHandler("c"), MemoryBus("d", clock=Clock()), Clock())
        queues = {q.name: q for q in service.topology().queues}
        self.assertEqual(set(queues), {"fedhub.c", "fedhub.c.dead", "fedhub.c.retry.1", "fedhub.c.retry.2"})
        for queue in queues.values():
            self.assertEqual(queue.arguments["x-queue-type"], "quorum")
        self.assertEqual(queues["fedhub.c.retry.2"].arguments["x-message-ttl"], 20000)

    def test_bad_queue_arguments(self) -> None:
        """queue_arguments names must start with x-."""
        error = self.assertRaises(
            ConfigError, parse,
            '[domains.d]\nbroker = "memory"\n[[consumers]]\nname = "c"\nplugin = "log"\n'
            'domain = "d"\nqueue_arguments = { "type" = "quorum" }\n',
        )
        self.assertEqual([p.path for p in error.problems], ["consumers[0].queue_arguments.type"])


class DeclareTests(SynchronousTestCase):
    """
    The hub declares a domain's topology when it starts.
    """

    def test_declared(self) -> None:
        """After start the configured queue exists and receives what its bindings route."""
        state = os.path.abspath(self.mktemp())
        config = parse(DOMAIN.format(state=state))
        clock = Clock()
        hub = Hub(config, clock, find_consumer=lambda name: LOOKUP[name])  # type: ignore[arg-type]
        bus = hub.domains["infra"].bus
        hub.domains["infra"].bus.startService()
        hub.namedServices["topology:infra"].startService()
        clock.advance(0)
        self.successResultOf(bus.publish(Message.create("org.x", {})))
        self.successResultOf(bus.publish(Message.create("x", {}), exchange="fedhub.archive"))
        self.assertEqual(bus.queue_depth("archive"), 2)  # type: ignore[attr-defined]


class OverlapTests(SynchronousTestCase):
    """
    L{topic_matched_by_all}: whether topic patterns overlap, with an example.
    """

    def test_examples(self) -> None:
        """Overlapping patterns give a topic every one matches; disjoint ones give None."""
        for patterns, expected in (
            (("a.#", "#.b"), "a.b"),
            (("org.example.prod.bugzilla.#", "org.example.*.bugzilla.bug.*"),
             "org.example.prod.bugzilla.bug.x"),
            (("*.*", "#.x.#", "a.#"), "a.x"),
            (("#", "#"), "x"),
            (("a.*", "a.b.c"), None),
            (("a.b", "a.c"), None),
            (("a.#.b", "#.c"), None),
        ):
            self.assertEqual(topic_matched_by_all(*patterns), expected, patterns)

    def test_bounded(self) -> None:
        """
        Patterns that would take long to tell apart (many positions after a
        '#') use up the search's steps: it answers None and says so, and a
        search sharing the budget answers None at once.
        """
        first = "#.a." + ".".join(["*"] * 20) + ".z"
        second = "#.b." + ".".join(["*"] * 20) + ".y"
        search = OverlapSearch(20_000)
        self.assertIsNone(search.find(first, second))
        self.assertTrue(search.exhausted)
        self.assertLess(search.remaining, 0)
        self.assertIsNone(search.find("a", "a"))
        # With room enough, the same search tells they do not meet.
        roomy = OverlapSearch(10_000_000)
        self.assertIsNone(roomy.find("#.a.*.*.z", "#.b.*.*.y"))
        self.assertFalse(roomy.exhausted)
        self.assertEqual(roomy.find("#.a.*.*.z", "#.*.*.*.z"), "a.x.x.z")

    @given(
        st.lists(st.lists(st.sampled_from(["a", "b", "x", "*", "#"]), min_size=1, max_size=4),
                 min_size=1, max_size=4),
        st.lists(st.lists(st.sampled_from(["a", "b", "x", "c"]), min_size=1, max_size=6),
                 max_size=30),
    )
    @settings(max_examples=300, deadline=None)
    def test_agrees_with_matching(self, patterns: list[list[str]], topics: list[list[str]]) -> None:
        """The example matches every pattern, and there is one whenever some topic matches them all."""
        texts = [".".join(words) for words in patterns]
        search = OverlapSearch()
        found = search.find(*texts)
        self.assertFalse(search.exhausted)
        if found is not None:
            self.assertTrue(all(topic_matches(p, found) for p in texts), (texts, found))
        for words in topics:
            topic = ".".join(words)
            if all(topic_matches(p, topic) for p in texts):
                self.assertIsNotNone(found, (texts, topic))
