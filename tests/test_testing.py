"""
Tests for L{fedhub.testing}, the kit plugin authors test with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.config import ComponentConfig, HubSettings, Option
from fedhub.consumers.log import LogPlugin
from fedhub.errors import (
    ConfigError,
    DeadLetter,
    Drop,
    MessageReturned,
    NotConnected,
    Retry,
    TemporarilyUnavailable,
)
from fedhub.interfaces import (
    IConsumerPlugin,
    IDelivery,
    IMessageHandler,
    IProducerPlugin,
    IPublisher,
)
from fedhub.message import Message
from fedhub.plugins import PluginContext
from fedhub.testing import (
    ConsumerHarness,
    RecordingPublisher,
    Settled,
    _Redelivery,
    producer_context,
)


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


@implementer(IMessageHandler)
class Recorder:
    """
    Keeps each message it gets; raises C{fail} when set, and runs C{work}
    (when set) in the reactor's thread pool, answering with its result.
    """

    def __init__(self, context: PluginContext, topics: tuple[str, ...]) -> None:
        self.context = context
        self.topics = topics
        self.got: list[Message] = []
        self.fail: BaseException | None = None
        self.work: Any = None
        self.threads: list[int] = []

    def handle(self, message: Message) -> Any:
        self.got.append(message)
        if self.fail is not None:
            raise self.fail
        if self.work is not None:
            reactor = self.context.reactor
            return deferToThreadPool(reactor, reactor.getThreadPool(), self.work, message)
        return None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@implementer(IConsumerPlugin)
class RecorderPlugin:
    """
    Builds a L{Recorder} for its own topics, or for the consumer's when the
    configuration gives some, as the built-in plugins do.
    """

    name = "recorder"
    description = "records"

    def __init__(
        self, topics: tuple[str, ...] = ("a.#",), options: Any = None
    ) -> None:
        self.topics = topics
        self.options: Any = {} if options is None else options
        self.built: list[PluginContext] = []

    def build(self, context: PluginContext) -> Recorder:
        self.built.append(context)
        topics = self.topics
        if context.component is not None and context.component.topics:
            topics = tuple(context.component.topics)
        return Recorder(context, topics)


@implementer(IDelivery)
class FakeDelivery:
    """
    A delivery that records its verdicts (C{None} for an ack, else the
    requeue flag) and counts them while C{live}.
    """

    redelivered = False

    def __init__(self, message: Message) -> None:
        self.message = message
        self.queue = message.queue
        self.live = True
        self.verdicts: list[bool | None] = []

    def ack(self) -> bool:
        self.verdicts.append(None)
        return self.live

    def reject(self, requeue: bool) -> bool:
        self.verdicts.append(requeue)
        return self.live


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

    def test_blocking_calls(self) -> None:
        """
        A handler that blocks longer than C{blocking_warning} is counted as
        the hub counts it, whatever clock the harness runs on; a fast one
        is not.
        """

        class Sleepy(Echo):
            def handle(self, message: Message) -> Any:
                time.sleep(0.05)
                return super().handle(message)

        @implementer(IConsumerPlugin)
        class SleepyPlugin(EchoPlugin):
            def build(self, context: PluginContext) -> Echo:
                return Sleepy(context)

        harness = ConsumerHarness(SleepyPlugin(), blocking_warning=0.01)
        harness.start()
        self.assertEqual(self.successResultOf(harness.deliver("a.b", {})).outcome, "acked")
        self.assertEqual(harness.blocking_calls["handle"], 1)
        self.assertEqual(harness.blocking_calls["start"], 0)
        self.flushLoggedErrors()
        fast = ConsumerHarness(EchoPlugin())
        fast.start()
        self.successResultOf(fast.deliver("a.b", {}))
        self.assertEqual(fast.blocking_calls, dict.fromkeys(("start", "handle", "drain", "abandon", "stop"), 0))
        with self.assertRaises(ValueError):
            ConsumerHarness(EchoPlugin(), blocking_warning=0)

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

    def test_retries_used_up(self) -> None:
        """
        Once its retries are used up a message is dead-lettered, and its
        Settled reason is the one its dead-letter copy carries.
        """
        harness = ConsumerHarness(EchoPlugin(), retry_delay=1, max_retries=1)
        harness.start()
        self.assertEqual(self.successResultOf(harness.deliver("a.b", {"retry": True})).outcome,
                         "retried")
        harness.advance(1)
        last = harness.settled[-1]
        self.assertEqual((last.outcome, last.reason),
                         ("dead_lettered", "gave up after 1 retries; last: not yet"))
        dead: list[Message] = []

        def take(delivery: Any) -> None:
            dead.append(delivery.message)
            delivery.ack()

        self.successResultOf(harness.bus.subscribe("fedhub.test.dead", take, 1))
        harness.advance(0)
        [copy] = dead
        self.assertEqual(copy.headers["fedhub_dead_letter_reason"], last.reason)

    def test_consumer_keys(self) -> None:
        """
        The consumer's retry, drain and delivery keys reach its runner as a
        configuration's would: retries wait at most C{max_retry_delay}.
        """
        harness = ConsumerHarness(EchoPlugin(), retry_delay=5, max_retries=4, max_retry_delay=12,
                                  drain_timeout=2, max_deliveries=3)
        self.assertEqual(harness.service.retry_delays, (5, 10, 12, 12))
        self.assertEqual((harness.service.drain_timeout, harness.service.max_deliveries), (2, 3))
        # Its defaults are a configuration's.
        component = ConsumerHarness(EchoPlugin()).service.component
        configured = {f.name: f.default for f in fields(ComponentConfig)}
        for key in ("retry_delay", "max_retries", "max_retry_delay", "on_error", "drain_timeout",
                    "max_deliveries"):
            self.assertEqual(getattr(component, key), configured[key], key)

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

    def test_keys_together_checked(self) -> None:
        """
        The plugin's own check of its keys taken together is asked, as a
        configuration asks it: the harness refuses what check-config would.
        """

        class Picky(EchoPlugin):
            def check_options(self, options: Mapping[str, Any]) -> list[tuple[str, str]]:
                return [("loud", "not on Sundays")] if options["loud"] else []

        error = self.assertRaises(ConfigError, ConsumerHarness, Picky(), {"loud": True})
        self.assertEqual([(p.path, p.message) for p in error.problems],
                         [("options.loud", "not on Sundays")])
        ConsumerHarness(Picky(), {"loud": False})

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


class TopicTests(SynchronousTestCase):
    """
    The harness binds the consumer's queue as the hub does: to the topics
    given, else to the handler's own.
    """

    def test_handler_topics_by_default(self) -> None:
        """Without topics the queue is bound to the handler's topics: a message on another topic never reaches it."""
        plugin = RecorderPlugin(("a.#",))
        harness = ConsumerHarness(plugin)
        handler: Recorder = harness.handler  # type: ignore[assignment]
        harness.start()
        self.assertEqual(plugin.built[0].component.topics, ())  # type: ignore[union-attr]
        self.assertEqual(harness.service.topics, ("a.#",))
        self.assertEqual(self.successResultOf(harness.deliver("a.b", {})).outcome, "acked")
        self.failureResultOf(harness.deliver("b.c", {}), MessageReturned)
        self.assertEqual([m.topic for m in handler.got], ["a.b"])
        self.assertEqual([s.message.topic for s in harness.settled], ["a.b"])

    def test_given_topics(self) -> None:
        """Topics given to the harness are the consumer's, as a configuration's topics are."""
        plugin = RecorderPlugin(("a.#",))
        harness = ConsumerHarness(plugin, topics=("b.#",))
        handler: Recorder = harness.handler  # type: ignore[assignment]
        harness.start()
        self.assertEqual(plugin.built[0].component.topics, ("b.#",))  # type: ignore[union-attr]
        self.assertEqual(harness.service.topics, ("b.#",))
        self.assertEqual(self.successResultOf(harness.deliver("b.c", {})).outcome, "acked")
        self.failureResultOf(harness.deliver("a.b", {}), MessageReturned)
        self.assertEqual([m.topic for m in handler.got], ["b.c"])

    def test_every_topic(self) -> None:
        """topics=("#",) binds every topic, whatever the handler declares."""
        harness = ConsumerHarness(RecorderPlugin(("a.#",)), topics=("#",))
        harness.start()
        self.assertEqual(self.successResultOf(harness.deliver("z.y", {})).outcome, "acked")


class BrokenPluginTests(SynchronousTestCase):
    """
    A plugin the configuration would refuse is refused by the harness, with
    the same problem, before it is built.
    """

    def test_option_named_like_own_key(self) -> None:
        """An option named like one of fedhub's own consumer keys is refused, naming it."""
        plugin = RecorderPlugin(options={"queue": Option(str, "x", "where")})
        error = self.assertRaises(ConfigError, ConsumerHarness, plugin, {})
        self.assertEqual(
            [(p.path, p.message) for p in error.problems],
            [("plugin", 'plugin "recorder" is broken: its option "queue" has the name of '
              "one of fedhub's own keys")],
        )
        self.assertEqual(plugin.built, [])

    def test_options_not_options(self) -> None:
        """Options that are not a mapping of fedhub.config.Option are refused as a configuration refuses them."""
        for options, message in [
            ({"x": 3}, 'plugin "recorder" is broken: its option "x" is not a fedhub.config.Option'),
            ([1], 'plugin "recorder" is broken: its options are not a mapping'),
        ]:
            plugin = RecorderPlugin(options=options)
            error = self.assertRaises(ConfigError, ConsumerHarness, plugin, {})
            self.assertEqual([p.message for p in error.problems], [message])
            self.assertEqual(plugin.built, [])


class RedeliveredTests(SynchronousTestCase):
    """
    A test can deliver a message flagged redelivered, as the broker flags a
    message it delivered before.
    """

    def test_not_redelivered_by_default(self) -> None:
        """A delivery is a first one; the flag a message carries is not what the consumer sees."""
        harness = ConsumerHarness(RecorderPlugin(("#",)))
        handler: Recorder = harness.handler  # type: ignore[assignment]
        harness.start()
        self.successResultOf(harness.deliver("a.b", {}))
        self.successResultOf(harness.deliver(Message.create("a.b", {}).evolve(redelivered=True)))
        self.assertEqual([m.redelivered for m in handler.got], [False, False])

    def test_redelivered(self) -> None:
        """deliver(..., redelivered=True) hands the handler a message flagged redelivered, and settles as usual."""
        harness = ConsumerHarness(RecorderPlugin(("#",)))
        handler: Recorder = harness.handler  # type: ignore[assignment]
        harness.start()
        message = Message.create("a.b", {"n": 1})
        settled: Settled = self.successResultOf(harness.deliver(message, redelivered=True))
        self.assertEqual(settled.outcome, "acked")
        self.assertTrue(settled.message.redelivered)
        built = self.successResultOf(harness.deliver("a.c", {"n": 2}, redelivered=True))
        self.assertEqual(built.message.body, {"n": 2})
        self.assertEqual([(m.id, m.redelivered) for m in handler.got][0], (message.id, True))
        self.assertEqual([m.redelivered for m in handler.got], [True, True])
        self.assertEqual(harness.bus.unacked("fedhub.test"), 0)

    def test_redelivered_failure_paths(self) -> None:
        """A redelivered delivery that fails is dropped or retried as any other; its retried copy is a fresh delivery."""
        harness = ConsumerHarness(RecorderPlugin(("#",)), retry_delay=5)
        handler: Recorder = harness.handler  # type: ignore[assignment]
        harness.start()
        handler.fail = Drop("seen")
        dropped = self.successResultOf(harness.deliver("a.b", {}, redelivered=True))
        self.assertEqual((dropped.outcome, dropped.reason), ("dropped", "seen"))
        handler.fail = Retry("later")
        retried = self.successResultOf(harness.deliver("a.b", {}, redelivered=True))
        self.assertEqual(retried.outcome, "retried")
        handler.fail = None
        harness.advance(5)
        self.assertEqual([s.outcome for s in harness.settled], ["dropped", "retried", "acked"])
        # Like RabbitMQ, the copy coming back from the retry queue is a new
        # message to the broker, not a redelivery.
        self.assertEqual([m.redelivered for m in handler.got], [True, True, False])
        self.assertIn("x-death", handler.got[2].headers)

    def test_redelivery_wraps_the_delivery(self) -> None:
        """The redelivered view of a delivery provides IDelivery and passes verdicts and liveness through."""
        original = FakeDelivery(Message.create("a.b", {}).evolve(queue="q"))
        delivery = _Redelivery(original)
        verifyObject(IDelivery, delivery)
        self.assertEqual((delivery.redelivered, delivery.message.redelivered), (True, True))
        self.assertEqual((delivery.message.id, delivery.queue), (original.message.id, "q"))
        self.assertTrue(delivery.live)
        self.assertTrue(delivery.reject(True))
        original.live = False
        self.assertFalse(delivery.live)
        self.assertFalse(delivery.ack())
        self.assertEqual(original.verdicts, [True, None])

    def test_redelivered_refused_publish(self) -> None:
        """A redelivered delivery whose topic no queue takes fails like any other."""
        harness = ConsumerHarness(RecorderPlugin(("a.#",)))
        harness.start()
        self.failureResultOf(harness.deliver("b.c", {}, redelivered=True), MessageReturned)


class HandlerErrorTests(SynchronousTestCase):
    """
    A handler's exception is logged as a failure, which a trial test flushes.
    """

    def test_exception_logged(self) -> None:
        """An exception of the handler is settled by the policy and logged as a failure for flushLoggedErrors."""
        harness = ConsumerHarness(RecorderPlugin(("#",)))
        handler: Recorder = harness.handler  # type: ignore[assignment]
        harness.start()
        handler.fail = ValueError("bad")
        settled = self.successResultOf(harness.deliver("a.b", {}))
        self.assertEqual((settled.outcome, settled.reason), ("retried", "ValueError: bad"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class RealReactorTests(TestCase):
    """
    A handler that uses threads runs under a harness given the real reactor,
    in an asynchronous test.
    """

    def test_advance_refused(self) -> None:
        """advance() with a real reactor fails, saying that time passes by itself then."""
        harness = ConsumerHarness(
            RecorderPlugin(("#",)), reactor=_reactor, hub=HubSettings(state_dir=self.mktemp())
        )
        error = self.assertRaises(TypeError, harness.advance, 1)
        self.assertIn("real reactor", str(error))
        self.assertIn("deferLater", str(error))

    @inlineCallbacks
    def test_thread_handler(self) -> Any:
        """A handler answering from the reactor's thread pool is settled by its thread's result."""
        harness = ConsumerHarness(RecorderPlugin(("#",)), reactor=_reactor)
        handler: Recorder = harness.handler  # type: ignore[assignment]
        handler.work = lambda message: handler.threads.append(threading.get_ident())
        harness.start()
        try:
            settled: Settled = yield harness.deliver("a.b", {"n": 1})
            self.assertEqual(settled.outcome, "acked")
            self.assertEqual(len(handler.threads), 1)
            self.assertNotEqual(handler.threads[0], threading.get_ident())

            def fails(message: Message) -> None:
                raise ValueError("in a thread")

            handler.work = fails
            settled = yield harness.deliver("a.b", {"n": 2})
            self.assertEqual((settled.outcome, settled.reason), ("retried", "ValueError: in a thread"))
            self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        finally:
            yield harness.stop()

    @inlineCallbacks
    def test_retry_comes_back(self) -> Any:
        """With a real reactor a retried message comes back after its retry delay, with no advance()."""
        harness = ConsumerHarness(RecorderPlugin(("#",)), reactor=_reactor, retry_delay=0.01)
        handler: Recorder = harness.handler  # type: ignore[assignment]
        handler.fail = Retry("not yet")
        acked: Deferred[Settled] = Deferred()

        def watch(event: Settled) -> None:
            if event.outcome == "acked" and not acked.called:
                acked.callback(event)

        harness.service.add_observer(watch)
        harness.start()
        try:
            settled: Settled = yield harness.deliver("a.b", {})
            self.assertEqual(settled.outcome, "retried")
            handler.fail = None
            back: Settled = yield acked
            self.assertEqual(back.message.id, settled.message.id)
            self.assertEqual([s.outcome for s in harness.settled], ["retried", "acked"])
        finally:
            yield harness.stop()


class Ticker(Service):
    """
    A producer publishing one message every C{interval} seconds.
    """

    def __init__(self, context: PluginContext) -> None:
        self.context = context
        self.loop = LoopingCall(self.tick)
        self.loop.clock = context.reactor

    def tick(self) -> Deferred[None]:
        return self.context.publisher.publish(
            Message.create(self.context.topic("tick"), {"state_dir": self.context.hub.state_dir}))

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.context.options["interval"], now=False)

    def stopService(self) -> None:
        super().stopService()
        self.loop.stop()


@implementer(IProducerPlugin)
class TickerPlugin:
    name = "ticker"
    description = "ticks"
    options: Mapping[str, Option] = {"interval": Option(float, 10.0, "seconds between ticks")}

    def check_options(self, options: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [("interval", "at least a second")] if options["interval"] < 1 else []

    def build(self, context: PluginContext) -> Ticker:
        return Ticker(context)


class ProducerContextTests(SynchronousTestCase):
    """
    L{producer_context}: what the hub gives a producer plugin.
    """

    def test_publishes_on_the_clock(self) -> None:
        """The built service publishes through the recording publisher, on the fake clock."""
        context = producer_context(TickerPlugin(), {"interval": 5}, name="tick", domain="infra")
        service = TickerPlugin().build(context)
        service.startService()
        self.addCleanup(service.stopService)
        publisher = context.publisher
        assert isinstance(publisher, RecordingPublisher)
        assert isinstance(context.reactor, Clock)
        context.reactor.advance(5)
        context.reactor.advance(5)
        self.assertEqual(len(publisher.published), 2)
        self.assertEqual(publisher.domain, "infra")
        self.assertTrue(publisher.published[0].topic.endswith(".tick"))
        self.assertTrue(os.path.isdir(publisher.published[0].body["state_dir"]))
        self.assertEqual((context.component.kind, context.component.name), ("producer", "tick"))

    def test_options_checked_and_completed(self) -> None:
        """Defaults are filled in; what a configuration refuses is refused, keys together too."""
        self.assertEqual(producer_context(TickerPlugin()).options["interval"], 10.0)
        error = self.assertRaises(ConfigError, producer_context, TickerPlugin(), {"interval": "x"})
        self.assertEqual([p.path for p in error.problems], ["options.interval"])
        error = self.assertRaises(ConfigError, producer_context, TickerPlugin(), {"interval": 0.5})
        self.assertEqual([(p.path, p.message) for p in error.problems],
                         [("options.interval", "at least a second")])


@implementer(IMessageHandler)
class FailingStart:
    """A handler whose C{start()} fails until told otherwise."""

    topics = ("#",)

    def __init__(self) -> None:
        self.broken = True
        self.handled: list[str] = []

    def handle(self, message: Message) -> None:
        self.handled.append(message.topic)

    def start(self) -> None:
        if self.broken:
            raise RuntimeError("no database")

    def stop(self) -> None:
        pass


@implementer(IConsumerPlugin)
class FailingStartPlugin:
    name = "failing-start"
    description = "a start() that fails"
    options: Mapping[str, Option] = {}

    def build(self, context: PluginContext) -> FailingStart:
        return FailingStart()


class NotConsumingTests(SynchronousTestCase):
    """
    A delivery refused because the consumer is not consuming says why,
    instead of blaming the topic.
    """

    def test_not_started(self) -> None:
        """Before L{ConsumerHarness.start}: the error says to call it."""
        harness = ConsumerHarness(FailingStartPlugin())
        failure = self.failureResultOf(harness.deliver("a.b", {}), NotConnected)
        self.assertIn("harness.start()", str(failure.value))

    def test_start_failed(self) -> None:
        """
        While the plugin's C{start()} fails, a delivery fails with
        L{MessageReturned} naming that error; once a later attempt starts
        it, deliveries reach the handler.
        """
        harness = ConsumerHarness(FailingStartPlugin())
        handler: FailingStart = harness.handler  # type: ignore[assignment]
        harness.start()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        failure = self.failureResultOf(harness.deliver("a.b", {}), MessageReturned)
        self.assertIn("start() failed (RuntimeError: no database)", str(failure.value))
        self.assertNotIn("no queue is bound", str(failure.value))
        handler.broken = False
        harness.advance(1)
        settled = self.successResultOf(harness.deliver("a.b", {}))
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(handler.handled, ["a.b"])
        self.successResultOf(harness.stop())

    def test_unbound_topic_unchanged(self) -> None:
        """A consuming consumer's unbound topic still fails as the bus says."""
        harness = ConsumerHarness(FailingStartPlugin(), topics=("org.#",))
        handler: FailingStart = harness.handler  # type: ignore[assignment]
        handler.broken = False
        harness.start()
        failure = self.failureResultOf(harness.deliver("net.x", {}), MessageReturned)
        self.assertNotIn("start()", str(failure.value))
        self.successResultOf(harness.stop())
