"""
Tests for L{fedhub.testing}, the kit plugin authors test with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.config import HubSettings, Option
from fedhub.consumers.log import LogPlugin
from fedhub.errors import ConfigError, DeadLetter, Drop, Retry, TemporarilyUnavailable
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


@implementer(IMessageHandler)
class Once:
    """
    Drops a message id seen before, retries a message whose body asks for it
    until the broker has dead-lettered it once, and holds messages while told.
    """

    topics = ("#",)

    def __init__(self, context: PluginContext) -> None:
        self.seen: set[str] = set()
        self.hold = False
        self.held: list[Deferred[None]] = []

    def handle(self, message: Message) -> Any:
        if message.body.get("retry"):
            if "x-death" not in message.headers:
                raise Retry("first time")
            return None
        duplicate = message.id in self.seen
        self.seen.add(message.id)
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        if duplicate:
            raise Drop("seen before")
        return None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@implementer(IConsumerPlugin)
class OncePlugin:
    name = "once"
    description = "drops duplicates"
    options: Mapping[str, Option] = {}

    def build(self, context: PluginContext) -> Once:
        return Once(context)


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


    def test_same_message_twice(self) -> None:
        """One Message delivered twice while the first is in hand gives each delivery its own outcome."""
        harness = ConsumerHarness(OncePlugin())
        handler: Once = harness.handler  # type: ignore[assignment]
        harness.start()
        message = Message.create("a.b", {"x": 1})
        handler.hold = True
        first = harness.deliver(message)
        second = harness.deliver(message)
        handler.hold = False
        handler.held[0].callback(None)
        harness.advance(0)
        self.assertEqual(
            (self.successResultOf(first).outcome, self.successResultOf(second).outcome),
            ("acked", "dropped"),
        )

    def test_same_id_out_of_order(self) -> None:
        """Two deliveries of one id that settle in the other order still each get their own outcome."""
        harness = ConsumerHarness(OncePlugin(), concurrency=2)
        handler: Once = harness.handler  # type: ignore[assignment]
        harness.start()
        message = Message.create("a.b", {"x": 1})
        handler.hold = True
        first = harness.deliver(message)
        handler.hold = False
        second = harness.deliver(message)
        self.assertEqual(self.successResultOf(second).outcome, "dropped")
        self.assertNoResult(first)
        handler.held[0].errback(DeadLetter("held too long"))
        harness.advance(0)
        self.assertEqual(self.successResultOf(first).outcome, "dead_lettered")

    def test_retry_copy_is_not_a_delivery(self) -> None:
        """A retried copy coming back does not take the outcome meant for a later delivery of the same message."""
        harness = ConsumerHarness(OncePlugin(), retry_delay=5)
        handler: Once = harness.handler  # type: ignore[assignment]
        harness.start()
        message = Message.create("a.b", {"retry": True})
        self.assertEqual(self.successResultOf(harness.deliver(message)).outcome, "retried")
        handler.hold = True
        gate = harness.deliver("a.b", {"gate": 1})
        handler.hold = False
        harness.advance(5)
        again = harness.deliver(message)
        handler.held[0].callback(None)
        harness.advance(0)
        self.assertEqual(self.successResultOf(gate).outcome, "acked")
        self.assertEqual(
            [s.outcome for s in harness.settled if s.message.id == message.id],
            ["retried", "acked", "retried"],
        )
        self.assertEqual(self.successResultOf(again).outcome, "retried")

    def test_state_dir_removed_on_stop(self) -> None:
        """The state directory the harness made for the plugin is gone once the harness stopped."""
        harness = ConsumerHarness(EchoPlugin())
        path = harness.state_dir
        self.assertTrue(os.path.isdir(path))
        harness.start()
        self.successResultOf(harness.stop())
        self.assertFalse(os.path.exists(path))

    def test_given_state_dir_kept(self) -> None:
        """A state directory the caller gave is left alone."""
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        harness = ConsumerHarness(EchoPlugin(), hub=HubSettings(state_dir=path))
        self.assertEqual(harness.state_dir, path)
        harness.start()
        self.successResultOf(harness.stop())
        self.assertTrue(os.path.isdir(path))

    def test_state_dir_removed_at_exit(self) -> None:
        """A harness never stopped leaves no state directory behind once its process exits."""
        script = (
            "from fedhub.consumers.log import LogPlugin\n"
            "from fedhub.testing import ConsumerHarness\n"
            "harness = ConsumerHarness(LogPlugin())\n"
            "harness.start()\n"
            "print(harness.state_dir)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        path = done.stdout.strip()
        self.assertTrue(path)
        self.assertFalse(os.path.exists(path))


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
