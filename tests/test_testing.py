"""
Tests for L{fedhub.testing}, the kit plugin authors test with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.config import Option
from fedhub.consumers.log import LogPlugin
from fedhub.errors import ConfigError, DeadLetter, Retry, TemporarilyUnavailable
from fedhub.interfaces import IConsumerPlugin, IMessageHandler, IPublisher
from fedhub.message import Message
from fedhub.plugins import PluginContext
from fedhub.testing import ConsumerHarness, RecordingPublisher


@implementer(IMessageHandler)
class Echo:
    """Publishes an echo of each message; fails as the body says."""

    topics = ("#",)

    def __init__(self, context: PluginContext) -> None:
        self.context = context
        self.calls = 0

    def handle(self, message: Message) -> Any:
        self.calls += 1
        if message.body.get("retry") and self.calls < 3:
            raise Retry("not yet")
        if message.body.get("dead"):
            raise DeadLetter("bad input")
        return self.context.publisher.publish(
            Message.create(self.context.topic("echo"), {"of": message.id})
        )

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@implementer(IConsumerPlugin)
class EchoPlugin:
    name = "echo"
    description = "echoes"
    options: Mapping[str, Option] = {"loud": Option(bool, False, "shout")}

    def build(self, context: PluginContext) -> Echo:
        return Echo(context)


class HarnessTests(SynchronousTestCase):
    """
    L{ConsumerHarness} runs a plugin the way the hub does.
    """

    def test_acked_and_published(self) -> None:
        """A handled message settles as acked and what the plugin published is recorded."""
        harness = ConsumerHarness(EchoPlugin())
        harness.start()
        settled = self.successResultOf(harness.deliver("a.b", {"x": 1}))
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(len(harness.published), 1)
        self.assertEqual(harness.published[0].topic, "org.fedoraproject.dev.echo")
        self.assertEqual(harness.published[0].body, {"of": settled.message.id})

    def test_concurrency_and_prefetch(self) -> None:
        """The harness's consumer takes concurrency and prefetch as a configuration gives them."""
        self.assertEqual(ConsumerHarness(EchoPlugin()).service.prefetch, 10)
        harness = ConsumerHarness(EchoPlugin(), concurrency=3, prefetch=3)
        self.assertEqual((harness.service.concurrency, harness.service.prefetch), (3, 3))

    def test_retry_then_success(self) -> None:
        """Retry goes through the retry queue: after the delay the message comes back and is acked."""
        harness = ConsumerHarness(EchoPlugin(), retry_delay=5)
        harness.start()
        first = self.successResultOf(harness.deliver("a.b", {"retry": True}))
        self.assertEqual(first.outcome, "retried")
        harness.advance(5)
        harness.advance(10)
        self.assertEqual([s.outcome for s in harness.settled], ["retried", "retried", "acked"])

    def test_dead_letter(self) -> None:
        """A DeadLetter verdict settles as dead_lettered with its reason."""
        harness = ConsumerHarness(EchoPlugin())
        harness.start()
        settled = self.successResultOf(harness.deliver("a.b", {"dead": True}))
        self.assertEqual((settled.outcome, settled.reason), ("dead_lettered", "bad input"))
        self.assertEqual(harness.bus.queue_depth("fedhub.test.dead"), 1)

    def test_options_checked(self) -> None:
        """Options are checked against the plugin's declaration, naming the key."""
        error = self.assertRaises(ConfigError, ConsumerHarness, EchoPlugin(), {"loud": "yes", "x": 1})
        self.assertEqual([p.path for p in error.problems], ["options.loud", "options.x"])

    def test_log_plugin(self) -> None:
        """The built-in log consumer acks every message under the harness."""
        harness = ConsumerHarness(LogPlugin(), {"max_length": 40})
        harness.start()
        self.assertEqual(self.successResultOf(harness.deliver("a.b", {"x": 1})).outcome, "acked")

    def test_stop_stops_handler(self) -> None:
        """stop() drains and fires."""
        harness = ConsumerHarness(EchoPlugin())
        harness.start()
        self.successResultOf(harness.stop())
        self.assertFalse(harness.service.running)


class RecordingPublisherTests(SynchronousTestCase):
    """
    The fake publisher is honest.
    """

    def test_interface(self) -> None:
        """It provides IPublisher."""
        verifyObject(IPublisher, RecordingPublisher("d"))

    def test_records(self) -> None:
        """Hand-overs succeed and are kept in order."""
        publisher = RecordingPublisher()
        messages = [Message.create("a", {}), Message.create("b", {})]
        for message in messages:
            self.successResultOf(publisher.publish(message))
        self.assertEqual(publisher.published, messages)

    def test_refuses(self) -> None:
        """With refuse_with set, hand-overs fail with it and nothing is kept."""
        publisher = RecordingPublisher()
        publisher.refuse_with = TemporarilyUnavailable("full")
        self.failureResultOf(publisher.publish(Message.create("a", {})), TemporarilyUnavailable)
        self.assertEqual(publisher.published, [])

    def test_hold(self) -> None:
        """With hold set, a hand-over completes only when the test fires it."""
        publisher = RecordingPublisher()
        publisher.hold = True
        d = publisher.publish(Message.create("a", {}))
        self.assertNoResult(d)
        self.assertEqual(publisher.published, [])
        publisher.waiting[0][1].callback(None)
        self.successResultOf(d)
        self.assertEqual(len(publisher.published), 1)

    def test_rejects_non_messages(self) -> None:
        """Handing over something that is not a Message fails."""
        self.failureResultOf(RecordingPublisher().publish({"topic": "a"}), TypeError)  # type: ignore[arg-type]


class PeerTests(SynchronousTestCase):
    """
    Only plugins that cross domains get the other domains' publishers.
    """

    def test_bridge_gets_peers(self) -> None:
        """The bridge plugin forwards into the peer publisher; the echo plugin sees no peers."""
        from fedhub.consumers.bridge import BridgePlugin

        harness = ConsumerHarness(
            BridgePlugin(), {"to_domain": "other", "allow": ["a.#"]}, peer_domains=("other",)
        )
        harness.start()
        settled = self.successResultOf(harness.deliver("a.b", {"x": 1}))
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual([m.id for m in harness.peers["other"].published], [settled.message.id])
        echo = ConsumerHarness(EchoPlugin(), peer_domains=("other",))
        self.assertEqual(dict(echo.handler.context.peer_publishers), {})  # type: ignore[attr-defined]
