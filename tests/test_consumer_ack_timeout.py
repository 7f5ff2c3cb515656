"""
RabbitMQ's consumer acknowledgement timeout: a consumer that holds a
delivery longer than the broker's C{consumer_timeout} has its channel closed
with C{406 PRECONDITION_FAILED} ("delivery acknowledgement on channel N timed
out"), and every delivery unacknowledged on that channel goes back to the
queue.  The consumer must open a new channel, consume again and handle the
message once more (flagged redelivered), and its late acknowledgement of the
old delivery must not reach the new channel.

L{AckTimeoutHubTests} runs a whole hub against a private node (L{tests.broker})
whose C{consumer_timeout} is one second.  RabbitMQ 3.10 checks that timeout
only when a channel "ticks", every C{rabbit.channel_tick_interval}
milliseconds (60000 by default, and no C{rabbitmq.conf} key): the node's
C{advanced.config} sets it to 100 ms.  The node's C{channel_max} is the
number of channels the hub opens (publishing, declaring, two consumers), so
that the consumer's new channel gets the number of the one the broker closed:
delivery tags count from 1 again on it, and a stale acknowledgement sent
there would settle (or fail on) a different delivery.

L{StaleAckTests} pins the same rule on a scripted broker, without RabbitMQ.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.amqp.transport import AMQPBus
from fedhub.config import Option, parse_config
from fedhub.consumers.runner import TRANSIENT_REQUEUE_DELAY, ConsumerService, Settled
from fedhub.hub import Hub
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.message import Message
from fedhub.plugins import PluginContext
from tests.broker import PrivateBrokerCase, User, reactor, report, wait_until
from tests.test_amqp_bus import BusCase, Recorder
from tests.test_consumer_runner import ScriptedHandler, component

CONSUMER_TIMEOUT_MS = 3000
"""
The node's C{consumer_timeout}: long enough that an acknowledgement the hub
wrote at once reaches the broker within it on a machine busy with other
tests (with 1 s, the other consumer's acknowledged delivery once timed out
together with the held one).
"""

TICK_MS = 100
"""The node's C{rabbit.channel_tick_interval}: how often the timeout is checked."""

HUB_CHANNELS = 4
"""Channels the hub opens: publishing, declaring, and one per consumer (two)."""

CLOSED_CHANNEL = "The broker closed channel {channel}: {code} {text}"
"""The log line of the protocol for a channel the broker closed."""

CONFIG = """
[hub]
state_dir = "{state}"

[domains.bus]
broker = "{url}"
heartbeat = 10

[[consumers]]
name = "slow"
plugin = "holding"
domain = "bus"
topics = ["fedhub.acktimeout.slow.#"]
drain_timeout = 1

[[consumers]]
name = "fast"
plugin = "holding"
domain = "bus"
topics = ["fedhub.acktimeout.fast.#"]
drain_timeout = 1
"""


@implementer(IMessageHandler)
class HoldingHandler:
    """
    A handler that records every call and, for messages whose body says
    C{"hold": true}, returns a Deferred that the test fires when it likes.

    @ivar calls: C{(message id, redelivered)} of every call, in order.
    @ivar called_at: The monotonic time of every call, in the same order.
    @ivar held: The unfired Deferreds of held messages, by message id, one per
        call.
    """

    def __init__(self, topics: tuple[str, ...]) -> None:
        self.topics = topics
        self.calls: list[tuple[str, bool]] = []
        self.called_at: list[float] = []
        self.held: dict[str, list[Deferred[None]]] = {}

    def handle(self, message: Message) -> Deferred[None] | None:
        self.calls.append((message.id, message.redelivered))
        self.called_at.append(time.monotonic())
        if message.body.get("hold") is True:
            d: Deferred[None] = Deferred()
            self.held.setdefault(message.id, []).append(d)
            return d
        return None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        # Anything still held is let go, so that stopping does not wait for
        # the drain timeout.
        for waiting in self.held.values():
            for d in waiting:
                if not d.called:
                    d.callback(None)


@implementer(IConsumerPlugin)
class HoldingPlugin:
    """
    Builds L{HoldingHandler}s and keeps them by consumer name.
    """

    name = "holding"
    description = "holds messages until the test lets them go"
    options: Mapping[str, Option] = {}

    def __init__(self) -> None:
        self.handlers: dict[str, HoldingHandler] = {}

    def build(self, context: PluginContext) -> HoldingHandler:
        assert context.component is not None
        handler = HoldingHandler(context.component.topics)
        self.handlers[context.name] = handler
        return handler


def consumer_channel(service: ConsumerService) -> int | None:
    """
    The number of the channel a consumer currently consumes on, or C{None}
    between channels.
    """
    subscription = cast(Any, service)._subscription
    consumer = getattr(subscription, "consumer", None)
    if consumer is None or consumer.channel is None:
        return None
    return int(consumer.channel.id)


class AckTimeoutHubTests(PrivateBrokerCase):
    """
    A hub whose plugin holds a message past the broker's consumer timeout.
    """

    timeout = 120
    tls = False
    users = (User("hub", "hub-secret", permissions={"/": (".*", ".*", ".*")}),)
    extra_config = (
        f"consumer_timeout = {CONSUMER_TIMEOUT_MS}",
        f"channel_max = {HUB_CHANNELS}",
    )
    advanced_config = f"[{{rabbit, [{{channel_tick_interval, {TICK_MS}}}]}}]."

    async def start_hub(self, slow_keys: str = "") -> tuple[Hub, HoldingPlugin, list[dict[str, Any]]]:
        """
        Start a hub with consumers C{slow} and C{fast} on one domain; return
        it, its plugin and the log events it emits.

        @param slow_keys: More configuration lines for consumer C{slow}.
        """
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        plugin = HoldingPlugin()
        verifyObject(IConsumerPlugin, plugin)
        state = os.path.abspath(self.mktemp())
        url = self.broker.url(user="hub", password="hub-secret")
        text = CONFIG.format(state=state, url=url)
        slow_topics = 'topics = ["fedhub.acktimeout.slow.#"]\n'
        text = text.replace(slow_topics, slow_topics + slow_keys)
        config = parse_config(
            text,
            "test",
            find_plugin=lambda kind, name: plugin if name == "holding" else None,
        )
        hub = Hub(config, reactor(), find_consumer=lambda name: plugin)
        hub.startService()
        self.addCleanup(hub.stopService)
        await wait_until(
            lambda: all(service.consuming for service in hub.consumers.values()),
            30,
            "both consumers to consume",
        )
        return hub, plugin, events

    def settled_log(self, hub: Hub) -> dict[str, list[Settled]]:
        """
        Collect what becomes of every delivery, by consumer name.
        """
        log: dict[str, list[Settled]] = {}
        for name, service in hub.consumers.items():
            log[name] = []
            service.add_observer(log[name].append)
        return log

    async def publish(self, hub: Hub, topic: str, body: dict[str, Any]) -> Message:
        message = Message.create(f"fedhub.acktimeout.{topic}", body)
        await hub.domains["bus"].publisher.publish(message)
        return message

    async def queue_counts(self) -> dict[str, tuple[int, int]]:
        """
        The broker's ready and unacknowledged message counts by queue.
        """
        out = await self.broker.ctl(
            "list_queues", "-p", "/", "--no-table-headers", "name", "messages_ready",
            "messages_unacknowledged", reactor=reactor(),
        )
        counts = {}
        for line in out.decode().splitlines():
            fields = line.split()
            if len(fields) == 3:
                counts[fields[0]] = (int(fields[1]), int(fields[2]))
        return counts

    async def test_held_past_timeout(self) -> None:
        """A message held past consumer_timeout comes back redelivered on a new channel; the stale ack is dropped; the hub, the other consumer and later messages are unaffected."""
        hub, plugin, events = await self.start_hub()
        settled = self.settled_log(hub)
        slow, fast = plugin.handlers["slow"], plugin.handlers["fast"]
        bus = cast(AMQPBus, hub.domains["bus"].bus)
        first_channel = consumer_channel(hub.consumers["slow"])
        self.assertIsNotNone(first_channel)

        def acked(name: str, message: Message, redelivered: bool = False) -> Callable[[], int]:
            return lambda: sum(
                1
                for s in settled[name]
                if s.message.id == message.id
                and s.message.redelivered is redelivered
                and s.outcome == "acked"
            )

        held = await self.publish(hub, "slow.held", {"hold": True})
        await wait_until(lambda: held.id in slow.held, 10, "the slow consumer to take the message")
        # The other consumer of the connection works while one holds a message.
        quick = await self.publish(hub, "fast.quick", {"n": 1})
        await wait_until(acked("fast", quick), 10, "the fast consumer to handle its message")

        # The broker times the delivery out, closes the channel and puts the
        # message back; the consumer consumes again and gets it redelivered.
        await wait_until(
            lambda: len(slow.held.get(held.id, [])) == 2,
            30,
            "the held message to come back after the consumer timeout",
        )
        self.assertEqual(slow.calls, [(held.id, False), (held.id, True)])
        closes = [e for e in events if e.get("log_format") == CLOSED_CHANNEL]
        self.assertEqual(len(closes), 1, closes)
        self.assertEqual(closes[0]["code"], 406)
        self.assertIn("delivery acknowledgement", closes[0]["text"])
        self.assertIn("timed out", closes[0]["text"])
        self.assertEqual(closes[0]["channel"], first_channel)
        warnings = [
            e for e in events
            if e.get("log_level") == LogLevel.warn and e.get("queue") == "fedhub.slow"
            and "consuming again" in e.get("log_format", "")
        ]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("406", warnings[0]["error"])
        # The node's channel_max makes the new channel reuse the closed one's
        # number: the case where a stale acknowledgement does harm.  (The
        # copy can be handed over just before the subscription records its
        # new consumer.)
        await wait_until(
            lambda: consumer_channel(hub.consumers["slow"]) is not None, 10, "the new consumer"
        )
        self.assertEqual(
            consumer_channel(hub.consumers["slow"]),
            first_channel,
            f"the hub no longer opens {HUB_CHANNELS} channels: adjust HUB_CHANNELS",
        )

        stale, copy = slow.held[held.id]
        acks_before = bus.stats.acked
        # The plugin finishes the first delivery late: its acknowledgement
        # (delivery tag 1 of the closed channel) must not go out, since tag 1
        # of the new channel is the copy the plugin still works on.  Then
        # the copy is finished and acknowledged.
        stale.callback(None)
        self.assertEqual(bus.stats.acked, acks_before)
        copy.callback(None)
        self.assertEqual(bus.stats.acked, acks_before + 1)
        await wait_until(acked("slow", held, redelivered=True), 10, "the copy to be settled")

        # Later messages reach both consumers, on the same connection.
        later = await self.publish(hub, "slow.later", {"n": 2})
        other = await self.publish(hub, "fast.other", {"n": 3})
        await wait_until(acked("slow", later), 10, "the slow consumer to handle a later message")
        await wait_until(acked("fast", other), 10, "the fast consumer to handle a later message")
        self.assertEqual(slow.calls[2:], [(later.id, False)])
        self.assertEqual(fast.calls, [(quick.id, False), (other.id, False)])

        # The broker agrees: nothing waits and nothing is unacknowledged, so
        # the copy's acknowledgement landed and nothing else was settled.
        counts = await self.queue_counts()
        self.assertEqual(counts["fedhub.slow"], (0, 0))
        self.assertEqual(counts["fedhub.fast"], (0, 0))
        # The new channel was never closed: the only closure is the timeout.
        self.assertEqual(len([e for e in events if e.get("log_format") == CLOSED_CHANNEL]), 1)
        self.assertEqual(consumer_channel(hub.consumers["slow"]), first_channel)

        # The hub kept running on its one connection.
        self.assertTrue(hub.running)
        self.assertTrue(all(service.running for service in hub))
        self.assertTrue(bus.connected)
        self.assertEqual((bus.stats.connections, bus.stats.connection_losses), (1, 0))
        for name in ("slow", "fast"):
            service = hub.consumers[name]
            self.assertTrue(service.consuming, name)
            self.assertFalse(service.halted, name)
            self.assertEqual(service.stats["failed"], 0, name)
        self.assertEqual(hub.consumers["slow"].stats["consumed"], 3)
        self.assertEqual(hub.consumers["fast"].stats["consumed"], 2)
        report("seconds from delivery to redelivery", slow.called_at[1] - slow.called_at[0])


    async def test_always_too_slow(self) -> None:
        """A handler always slower than consumer_timeout: after max_deliveries deliveries without a verdict, the next one is dead-lettered with the reason and the queue is empty."""
        hub, plugin, events = await self.start_hub("max_deliveries = 2\n")
        settled = self.settled_log(hub)
        slow = plugin.handlers["slow"]
        held = await self.publish(hub, "slow.stuck", {"hold": True})
        await wait_until(
            lambda: any(s.outcome == "dead_lettered" for s in settled["slow"]),
            30,
            "the message to be dead-lettered after its deliveries",
        )
        self.assertEqual(slow.calls, [(held.id, False), (held.id, True)])
        (dead,) = [s for s in settled["slow"] if s.outcome == "dead_lettered"]
        self.assertEqual(dead.message.id, held.id)
        self.assertIn("delivered 3 times without a verdict", dead.reason or "")
        counts = await self.queue_counts()
        self.assertEqual(counts["fedhub.slow"], (0, 0))
        self.assertEqual(counts["fedhub.slow.dead"], (1, 0))
        # The handler's late results change nothing: their acks are dropped.
        for waiting in slow.held[held.id]:
            waiting.callback(None)
        self.assertEqual(hub.consumers["slow"].stats["unsettled"], 2)
        self.assertEqual(hub.consumers["slow"].stats["acked"], 0)
        self.assertEqual((await self.queue_counts())["fedhub.slow.dead"], (1, 0))
        self.assertTrue(cast(AMQPBus, hub.domains["bus"].bus).connected)


class StaleAckTests(BusCase):
    """
    Acknowledging a delivery whose channel the broker closed, on a scripted
    broker.
    """

    def subscribe(self) -> tuple[Recorder, str, int]:
        recorder = Recorder()
        d = self.bus.subscribe("hub.q", recorder, 1)
        self.broker.pump()
        self.successResultOf(d)
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        return recorder, tag, self.broker.consumers[tag]

    def time_out(self, channel: int) -> None:
        """
        Close a consumer's channel the way RabbitMQ does when a delivery was
        held past its consumer timeout.
        """
        self.broker.send(
            self.broker.frame(
                channel,
                "channel.close",
                reply_code=406,
                reply_text=f"PRECONDITION_FAILED - delivery acknowledgement on channel"
                f" {channel} timed out. Timeout value used: 1000 ms",
            )
        )

    def test_stale_ack_on_reused_channel_number(self) -> None:
        """After a 406 closes the channel and the new one gets its number, the old delivery's ack sends nothing; the new delivery's does."""
        recorder, tag, channel = self.subscribe()
        # As if the broker had negotiated as many channels as are open: the
        # next channel takes the first free number, the one closed below.
        self.broker.client.channel_max = channel
        self.broker.deliver(tag, 1, b"{}")
        (old,) = recorder.deliveries
        self.time_out(channel)
        consumes = self.broker.methods("basic.consume")
        self.assertEqual(len(consumes), 2)
        new_channel, _, consume = consumes[1]
        self.assertEqual(new_channel, channel)
        self.assertEqual(self.broker.methods("basic.qos")[-1][0], new_channel)
        self.broker.deliver(consume["consumer_tag"], 1, b"{}", redelivered=True)
        new = recorder.deliveries[1]
        self.assertTrue(new.redelivered)
        self.assertIs(old.ack(), False)
        self.assertIs(old.reject(True), False)
        self.broker.pump()
        self.assertEqual(self.broker.methods("basic.ack", "basic.reject", "basic.nack"), [])
        self.assertIs(new.ack(), True)
        self.assertIs(new.ack(), False)
        self.broker.pump()
        self.assertEqual(
            self.broker.methods("basic.ack"),
            [(channel, "basic.ack", {"delivery_tag": 1, "multiple": False})],
        )
        self.assertEqual(self.bus.stats.acked, 1)
        self.assertTrue(self.bus.connected)

    def test_stale_reject_after_timeout(self) -> None:
        """A delivery of a timed-out channel can not be rejected either: nothing is sent, on any channel."""
        recorder, tag, channel = self.subscribe()
        self.broker.client.channel_max = channel
        self.broker.deliver(tag, 1, b"{}")
        self.time_out(channel)
        self.assertEqual(self.broker.methods("basic.consume")[-1][0], channel)
        self.assertIs(recorder.deliveries[0].reject(False), False)
        self.broker.pump()
        self.assertEqual(self.broker.methods("basic.ack", "basic.reject", "basic.nack"), [])
        self.assertEqual(self.bus.stats.rejected, 0)

    def test_timeouts_in_a_row(self) -> None:
        """Each timeout of a consumer that consumed again since is followed by consuming again at once."""
        _, _, channel = self.subscribe()
        for count in (2, 3, 4):
            self.time_out(channel)
            consumes = self.broker.methods("basic.consume")
            self.assertEqual(len(consumes), count)
            channel = consumes[-1][0]
        self.assertTrue(self.bus.connected)

    def test_ack_on_a_closing_channel(self) -> None:
        """
        Once a subscription is cancelled (its channel.close written, the
        close-ok not yet read), an acknowledgement writes nothing and says
        so, whether it is decided during a read (here: when the confirm of
        a publish arrives) or outside one.
        """
        recorder = Recorder()
        d = self.bus.subscribe("hub.q", recorder, 10)
        self.broker.pump()
        subscription = self.successResultOf(d)
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        channel = self.broker.consumers[tag]
        self.broker.deliver(tag, 1, b"{}")
        self.broker.deliver(tag, 2, b"{}")
        first, second = recorder.deliveries
        _, published = self.publish()
        subscription.cancel()
        answers: list[bool] = []
        published.addCallback(lambda _: answers.append(first.ack()))
        self.broker.ack(1)
        self.assertEqual(answers, [False])
        self.assertIs(second.ack(), False)
        self.broker.pump()
        self.assertEqual([m for m in self.broker.methods("basic.ack") if m[0] == channel], [])
        self.assertEqual(self.bus.stats.acked, 0)


class PublishChannelClosedTests(BusCase):
    """
    A consumer's retry copy on a publish channel the broker closes because
    of another publish, on a scripted broker.
    """

    def test_original_goes_back_not_dead(self) -> None:
        """
        The broker closes the shared publish channel (403 on another
        exchange) while a retry copy waits for its confirm: the copy fails
        for a passing reason, and the original goes back to its queue after
        a pause instead of being rejected to the dead-letter queue.
        """
        service = ConsumerService(
            component(), ScriptedHandler(RuntimeError("flaky")), self.bus, self.clock,
            retry_delay=1.0, max_retries=3,
        )
        service.startService()
        self.broker.pump()
        self.assertTrue(service.consuming)
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        channel = self.broker.consumers[tag]
        self.broker.deliver(tag, 1, b"{}", routing_key="t.x")
        self.assertEqual(self.broker.published[-1][1], "fedhub.c.retry.1")
        self.broker.refuse_publish("forbidden")
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.broker.methods("basic.reject", "basic.nack"), [])
        self.clock.advance(TRANSIENT_REQUEUE_DELAY)
        self.broker.pump()
        self.assertEqual(
            self.broker.methods("basic.reject", "basic.nack"),
            [(channel, "basic.nack", {"delivery_tag": 1, "multiple": False, "requeue": True})],
        )
        self.assertEqual((service.stats["requeued"], service.stats["rejected"]), (1, 0))
