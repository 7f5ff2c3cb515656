"""
Tests for the C{bridge} consumer: the allow-list, the loop header, what the
forwarded copy keeps and drops, the verdicts for a target that refuses, and
the checks at build time.

C{ConsumerHarness} builds plugins with no peer publishers, so these tests
run the bridge through L{WithPeers}, a plugin that hands the real bridge
plugin a context with the peers added: the harness, the runner and the
in-process bus are used unchanged.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.config import Option
from fedhub.consumers.bridge import BRIDGED_FROM_HEADER, BridgeHandler, BridgePlugin
from fedhub.consumers.runner import ORPHAN_CHECK_INTERVAL
from fedhub.errors import ConfigError, MessageReturned, NotHandled, Retry, TemporarilyUnavailable
from fedhub.interfaces import IConsumerPlugin, IMessageHandler, IPublisher
from fedhub.message import ERROR, Message
from fedhub.plugins import PluginContext
from fedhub.testing import ConsumerHarness, RecordingPublisher

ALLOWED = "org.example.prod.buildsys.build.state.change"


@implementer(IConsumerPlugin)
class WithPeers:
    """
    Builds another plugin with C{peer_publishers} set, as the hub does for
    plugins that cross domains.
    """

    def __init__(self, plugin: Any, peers: Mapping[str, IPublisher]) -> None:
        self.plugin = plugin
        self.peers = peers
        self.name = plugin.name
        self.description = plugin.description
        self.options: Mapping[str, Option] = plugin.options

    def build(self, context: PluginContext) -> IMessageHandler:
        handler: IMessageHandler = self.plugin.build(
            dataclasses.replace(context, peer_publishers=self.peers)
        )
        return handler


class BridgeTests(SynchronousTestCase):
    """
    A bridge from domain C{infra} to domain C{community}.
    """

    def setUp(self) -> None:
        self.target = RecordingPublisher("community")
        self.harness = self.bridge({"to_domain": "community",
                                    "allow": ["org.example.prod.buildsys.#", "*.*.*.git.push"]})

    def bridge(self, options: Mapping[str, Any], **kwargs: Any) -> ConsumerHarness:
        """
        A started harness running a bridge in domain C{infra}, its queue
        bound to every topic (as with C{topics = ["#"]}) unless given
        C{topics}, so that topics outside its allow-list reach it too.
        """
        harness = ConsumerHarness(
            WithPeers(BridgePlugin(), {"community": self.target, "fas": RecordingPublisher("fas")}),
            options,
            **{"domain": "infra", "topics": ("#",), **kwargs},
        )
        harness.start()
        return harness

    def test_provides(self) -> None:
        """The plugin and its handler provide their interfaces; the plugin crosses domains."""
        verifyObject(IConsumerPlugin, BridgePlugin())
        verifyObject(IMessageHandler, self.harness.handler)
        self.assertIs(BridgePlugin.crosses_domains, True)

    def test_forwards_allowed(self) -> None:
        """An allowed message goes to the target with id, topic, body and headers kept."""
        message = Message.create(
            ALLOWED, {"build": 42, "owner": "jdoe"},
            headers={"fedora_messaging_user_jdoe": True, "custom": [1, "two"]},
            severity=ERROR, priority=3,
        )
        settled = self.successResultOf(self.harness.deliver(message))
        self.assertEqual(settled.outcome, "acked")
        (forwarded,) = self.target.published
        self.assertEqual(forwarded.id, message.id)
        self.assertEqual(forwarded.topic, message.topic)
        self.assertEqual(forwarded.body, message.body)
        self.assertEqual(forwarded.severity, ERROR)
        self.assertEqual(forwarded.priority, 3)
        self.assertEqual(forwarded.sent_at, message.sent_at)
        self.assertEqual(forwarded.schema, message.schema)
        self.assertEqual(forwarded.headers["fedora_messaging_user_jdoe"], True)
        self.assertEqual(forwarded.headers["custom"], [1, "two"])
        self.assertEqual(forwarded.headers[BRIDGED_FROM_HEADER], ["infra"])
        self.assertIsNone(forwarded.queue)
        handler = self.harness.handler
        assert isinstance(handler, BridgeHandler)
        self.assertEqual(handler.forwarded, 1)

    def test_second_pattern(self) -> None:
        """Any pattern of the allow-list lets a topic through; * stands for one word."""
        self.successResultOf(self.harness.deliver("org.example.prod.git.push", {}))
        self.assertEqual(len(self.target.published), 1)
        settled = self.successResultOf(self.harness.deliver("org.example.prod.sub.git.push", {}))
        self.assertEqual(settled.outcome, "dropped")
        self.assertEqual(len(self.target.published), 1)

    def test_not_allowed_dropped(self) -> None:
        """A topic outside the allow-list is dropped, not forwarded."""
        settled = self.successResultOf(self.harness.deliver("org.example.prod.fas.user.new", {}))
        self.assertEqual(settled.outcome, "dropped")
        self.assertIn("not allowed", settled.reason or "")
        self.assertEqual(self.target.published, [])

    def test_loop_through_target_dropped(self) -> None:
        """A message that already left the target domain is not sent back there."""
        message = Message.create(ALLOWED, {}, headers={BRIDGED_FROM_HEADER: ["community"]})
        settled = self.successResultOf(self.harness.deliver(message))
        self.assertEqual(settled.outcome, "dropped")
        self.assertIn("loop", settled.reason or "")
        self.assertEqual(self.target.published, [])

    def test_loop_through_own_domain_dropped(self) -> None:
        """A message that already left this domain once is not forwarded again."""
        message = Message.create(ALLOWED, {}, headers={BRIDGED_FROM_HEADER: ["fas", "infra"]})
        settled = self.successResultOf(self.harness.deliver(message))
        self.assertEqual(settled.outcome, "dropped")
        self.assertEqual(self.target.published, [])

    def test_chain_appends(self) -> None:
        """A message bridged before from elsewhere gets this domain appended."""
        message = Message.create(ALLOWED, {}, headers={BRIDGED_FROM_HEADER: ["fas"]})
        self.assertEqual(self.successResultOf(self.harness.deliver(message)).outcome, "acked")
        self.assertEqual(self.target.published[0].headers[BRIDGED_FROM_HEADER], ["fas", "infra"])

    def test_malformed_loop_header(self) -> None:
        """A loop header that is one string counts; non-string elements are ignored."""
        single = Message.create(ALLOWED, {}, headers={BRIDGED_FROM_HEADER: "community"})
        self.assertEqual(self.successResultOf(self.harness.deliver(single)).outcome, "dropped")
        odd = Message.create(ALLOWED, {}, headers={BRIDGED_FROM_HEADER: [1, {"x": 2}, "fas"]})
        self.assertEqual(self.successResultOf(self.harness.deliver(odd)).outcome, "acked")
        self.assertEqual(self.target.published[0].headers[BRIDGED_FROM_HEADER], ["fas", "infra"])

    def test_two_bridges_carry_once(self) -> None:
        """Bridges A to B and B to A together deliver a message to B once and never back."""
        to_fas = RecordingPublisher("fas")
        back = ConsumerHarness(WithPeers(BridgePlugin(), {"infra": to_fas}),
                               {"to_domain": "infra", "allow": ["#"]}, domain="community")
        back.start()
        self.successResultOf(self.harness.deliver(Message.create(ALLOWED, {"n": 1})))
        (crossed,) = self.target.published
        settled = self.successResultOf(back.deliver(crossed))
        self.assertEqual(settled.outcome, "dropped")
        self.assertEqual(to_fas.published, [])

    def test_local_bookkeeping_removed(self) -> None:
        """x-death and dead-letter headers of this domain's queues do not cross."""
        message = Message.create(ALLOWED, {}, headers={
            "x-death": [{"queue": "fedhub.test.retry.1", "count": 1, "reason": "expired"}],
            "x-first-death-queue": "fedhub.test.retry.1",
            "x-last-death-reason": "expired",
            "fedhub_dead_letter_reason": "old",
            "keep-me": "yes",
        })
        self.successResultOf(self.harness.deliver(message))
        headers = dict(self.target.published[0].headers)
        self.assertEqual(headers, {"keep-me": "yes", BRIDGED_FROM_HEADER: ["infra"]})

    def test_routing_headers_removed(self) -> None:
        """CC and BCC, which would make the target's broker route the copy to topics the allow-list never allowed, do not cross."""
        message = Message.create(ALLOWED, {}, headers={
            "CC": ["org.example.prod.accounts.password.reset"],
            "BCC": ["org.example.prod.accounts.group.add"],
            "cc": "lower case is no routing header",
        })
        self.assertEqual(self.successResultOf(self.harness.deliver(message)).outcome, "acked")
        headers = dict(self.target.published[0].headers)
        self.assertEqual(headers, {"cc": "lower case is no routing header",
                                   BRIDGED_FROM_HEADER: ["infra"]})

    def test_retried_message_forwarded_clean(self) -> None:
        """A message retried in this domain (x-death set by the bus) crosses without x-death."""
        self.harness = self.bridge({"to_domain": "community", "allow": ["org.example.prod.#"],
                                    "hold": 0})
        self.target.refuse_with = TemporarilyUnavailable("outbox full")
        message = Message.create(ALLOWED, {"n": 1})
        self.assertEqual(self.successResultOf(self.harness.deliver(message)).outcome, "retried")
        self.target.refuse_with = None
        self.harness.advance(10.0)
        self.assertEqual([s.outcome for s in self.harness.settled], ["retried", "acked"])
        (forwarded,) = self.target.published
        self.assertEqual(forwarded.id, message.id)
        self.assertNotIn("x-death", forwarded.headers)

    def test_temporarily_unavailable_held_then_forwarded(self) -> None:
        """
        A target that can not take the message now (its outbox full) holds
        it: the hand-over is tried again, after 1 s, then doubling, and once
        the target takes it the message is acknowledged, not retried.
        """
        self.target.refuse_with = TemporarilyUnavailable("the outbox of domain community is full")
        settled = self.harness.deliver(ALLOWED, {})
        for _ in range(1 + 2 + 4):
            self.harness.advance(1)
        self.assertNoResult(settled)
        self.assertEqual(self.target.refused, 4)
        self.target.refuse_with = None
        for _ in range(8):
            self.harness.advance(1)
        self.assertEqual(self.successResultOf(settled).outcome, "acked")
        self.assertEqual(len(self.target.published), 1)

    def test_temporarily_unavailable_past_hold_retries(self) -> None:
        """
        A target that can not take the message for longer than hold makes
        it a retry, naming why; waits are at most 30 s apart.
        """
        self.target.refuse_with = TemporarilyUnavailable("broker gone")
        settled = self.harness.deliver(ALLOWED, {})
        waited = 0
        while not settled.called and waited < 700:
            self.harness.advance(1)
            waited += 1
        # The last hand-over at 571 s: the next would come after the hold.
        self.assertEqual(waited, 571)
        outcome = self.successResultOf(settled)
        self.assertEqual(outcome.outcome, "retried")
        self.assertIn("broker gone", outcome.reason or "")
        # 1, 2, 4, 8, 16, then every 30 s, within the 600 s hold.
        self.assertEqual(self.target.refused, 6 + (600 - 31) // 30)

    def test_stop_ends_the_hold(self) -> None:
        """
        A consumer stopping with a held message settles it at once, as a
        retry, instead of holding the hub's stop until its drain timeout.
        """
        self.target.refuse_with = TemporarilyUnavailable("the outbox of domain community is full")
        settled = self.harness.deliver(ALLOWED, {})
        self.harness.advance(1)
        self.assertNoResult(settled)
        stopped = self.harness.stop()
        self.assertEqual(self.successResultOf(settled).outcome, "retried")
        self.successResultOf(stopped)

    def test_held_backlog_stays_in_the_queue(self) -> None:
        """
        While a message is held, the messages behind it stay in the queue
        instead of waiting unacknowledged in the hub, where each would wait
        up to C{hold} seconds per message ahead of it, past the broker's
        C{consumer_timeout}: a bridge that holds takes only what it
        handles (its prefetch is its concurrency).
        """
        self.target.refuse_with = TemporarilyUnavailable("the outbox of domain community is full")
        first = self.harness.deliver(ALLOWED, {"n": 1})
        second = self.harness.deliver(ALLOWED, {"n": 2})
        self.harness.advance(1)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(self.harness.service.waiting, 0)
        self.assertEqual(self.harness.service.prefetch, 1)
        self.target.refuse_with = None
        self.harness.advance(2)
        self.harness.advance(0)
        self.assertEqual(self.successResultOf(first).outcome, "acked")
        self.assertEqual(self.successResultOf(second).outcome, "acked")

    def test_no_hold_prefetches(self) -> None:
        """
        With hold = 0 a bridge never holds a message, and prefetches as
        any consumer does.
        """
        harness = self.bridge({"to_domain": "community", "allow": ["org.example.prod.#"],
                               "hold": 0})
        self.assertEqual(harness.service.prefetch, 10)

    def test_no_hold_retries_at_once(self) -> None:
        """With hold = 0, a target that can not take the message now makes it a retry at once."""
        harness = self.bridge({"to_domain": "community", "allow": ["org.example.prod.#"],
                               "hold": 0})
        self.target.refuse_with = TemporarilyUnavailable("broker gone")
        settled = self.successResultOf(harness.deliver(ALLOWED, {}))
        self.assertEqual(settled.outcome, "retried")
        self.assertEqual(self.target.refused, 1)

    def test_permanent_refusal_dead_letters(self) -> None:
        """A target that will never take the message dead-letters it."""
        self.target.refuse_with = MessageReturned("no route")
        settled = self.successResultOf(self.harness.deliver(ALLOWED, {}))
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("no route", settled.reason or "")

    def test_slow_target_holds_the_message(self) -> None:
        """The message is acknowledged only once the target took it."""
        self.target.hold = True
        settled = self.harness.deliver(ALLOWED, {})
        self.assertNoResult(settled)
        (_, taken) = self.target.waiting[0]
        taken.callback(None)
        self.assertEqual(self.successResultOf(settled).outcome, "acked")

    def test_binds_allow_list_by_default(self) -> None:
        """Without topics, the consumer's queue is bound for the allow-list only."""
        harness = ConsumerHarness(WithPeers(BridgePlugin(), {"community": self.target}),
                                  {"to_domain": "community", "allow": ["a.b.#"]},
                                  domain="infra", topics=())
        self.assertEqual(harness.handler.topics, ("a.b.#",))

    def test_unknown_domain(self) -> None:
        """An unknown to_domain is a ConfigError naming the key and the known domains."""
        with self.assertRaises(ConfigError) as caught:
            ConsumerHarness(WithPeers(BridgePlugin(), {"community": self.target}),
                            {"to_domain": "nowhere", "allow": ["#"]}, domain="infra")
        (problem,) = caught.exception.problems
        self.assertEqual(problem.path, "consumers[0].to_domain")
        self.assertIn("nowhere", problem.message)
        self.assertIn("community", problem.message)

    def test_without_peers(self) -> None:
        """Built without peer publishers (a hub that does not trust it), the bridge refuses."""
        self.assertRaises(ConfigError, ConsumerHarness, BridgePlugin(),
                          {"to_domain": "community", "allow": ["#"]})

    def test_own_domain(self) -> None:
        """Bridging a domain to itself is a ConfigError."""
        self.assertRaises(ConfigError, ConsumerHarness,
                          WithPeers(BridgePlugin(), {"community": self.target}),
                          {"to_domain": "infra", "allow": ["#"]}, domain="infra")

    def test_bad_allow_list(self) -> None:
        """An empty allow-list or a malformed pattern is refused."""
        for allow in ([], ["a..b"], ["a.b*"], [""]):
            self.assertRaises(ConfigError, ConsumerHarness,
                              WithPeers(BridgePlugin(), {"community": self.target}),
                              {"to_domain": "community", "allow": allow})
        # Every bad pattern is named, by its index.
        error = self.assertRaises(ConfigError, ConsumerHarness,
                                  WithPeers(BridgePlugin(), {"community": self.target}),
                                  {"to_domain": "community", "allow": ["a..b", "ok.#", "c.#x"]})
        (problem,) = error.problems
        self.assertIn('[0]: empty word in topic pattern "a..b"', problem.message)
        self.assertIn('[2]: ', problem.message)
        self.assertIn('"c.#x"', problem.message)


class AbandonTests(SynchronousTestCase):
    """
    A held message whose call the consumer forgets (its channel closed, the
    broker delivers it again) is not forwarded by the old hold.
    """

    def setUp(self) -> None:
        self.target = RecordingPublisher("community")
        self.harness = ConsumerHarness(
            WithPeers(BridgePlugin(), {"community": self.target}),
            {"to_domain": "community", "allow": ["org.example.prod.#"]},
            domain="infra",
        )
        self.harness.start()
        handler = self.harness.handler
        assert isinstance(handler, BridgeHandler)
        self.handler = handler

    def lose_connection(self) -> None:
        """
        The bus of the bridge's domain goes away and comes back: what the
        consumer held goes back to its queue and is delivered again.
        """
        self.harness.bus.stopService()
        self.harness.bus.startService()
        self.harness.advance(0)

    def test_redelivered_while_held_forwarded_once(self) -> None:
        """
        A message held for a full target whose channel closes is forwarded
        once, by its new delivery, when the target recovers.
        """
        self.target.refuse_with = TemporarilyUnavailable("the outbox of domain community is full")
        message = Message.create(ALLOWED, {"n": 1})
        first = self.harness.deliver(message)
        self.harness.advance(1)
        self.assertNoResult(first)
        self.lose_connection()
        settled = self.successResultOf(first)
        self.assertEqual(settled.outcome, "requeued")
        self.assertIn("abandoned", settled.reason or "")
        self.target.refuse_with = None
        for _ in range(60):
            self.harness.advance(1)
        self.assertEqual([m.id for m in self.target.published], [message.id])
        self.assertEqual(self.handler.forwarded, 1)
        self.assertEqual([s.outcome for s in self.harness.settled], ["requeued", "acked"])
        self.assertTrue(self.harness.settled[1].message.redelivered)
        self.assertEqual(self.harness.clock.getDelayedCalls(), [])

    def test_target_recovers_while_connection_down(self) -> None:
        """
        A message held for a full target whose connection stays down (no
        delivery comes, no other call ends) is given up within a second,
        not forwarded when the target recovers first: it crosses once, by
        its new delivery once the connection is back.
        """
        self.target.refuse_with = TemporarilyUnavailable("the outbox of domain community is full")
        message = Message.create(ALLOWED, {"n": 1})
        first = self.harness.deliver(message)
        self.harness.advance(1)
        self.assertNoResult(first)
        self.harness.bus.stopService()
        self.harness.advance(ORPHAN_CHECK_INTERVAL)
        settled = self.successResultOf(first)
        self.assertEqual(settled.outcome, "requeued")
        self.target.refuse_with = None
        for _ in range(60):
            self.harness.advance(1)
        self.assertEqual(self.target.published, [])
        self.harness.bus.startService()
        for _ in range(5):
            self.harness.advance(1)
        self.assertEqual([m.id for m in self.target.published], [message.id])
        self.assertEqual([s.outcome for s in self.harness.settled], ["requeued", "acked"])
        self.assertEqual(self.harness.clock.getDelayedCalls(), [])

    def test_several_held_while_connection_down(self) -> None:
        """
        Several calls held (concurrency 2, another delivery waiting) whose
        connection goes down and stays down are all given up by one look,
        the first of them ending at once without upsetting the second.
        """
        harness = ConsumerHarness(
            WithPeers(BridgePlugin(), {"community": self.target}),
            {"to_domain": "community", "allow": ["org.example.prod.#"]},
            domain="infra", concurrency=2, prefetch=3,
        )
        harness.start()
        self.target.refuse_with = TemporarilyUnavailable("the outbox of domain community is full")
        waiting = [harness.deliver(Message.create(ALLOWED, {"n": n})) for n in range(3)]
        harness.advance(1)
        for one in waiting:
            self.assertNoResult(one)
        harness.bus.stopService()
        harness.advance(ORPHAN_CHECK_INTERVAL)
        self.assertEqual([self.successResultOf(one).outcome for one in waiting], ["requeued"] * 3)
        self.assertEqual(harness.service.in_flight, 0)
        self.assertEqual(self.target.published, [])
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_stop_after_abandon(self) -> None:
        """
        A stop after a held call was abandoned ends the other holds as
        retries and leaves no timer behind.
        """
        self.target.refuse_with = TemporarilyUnavailable("the outbox of domain community is full")
        first = self.harness.deliver(ALLOWED, {"n": 1})
        self.harness.advance(1)
        self.lose_connection()
        self.assertEqual(self.successResultOf(first).outcome, "requeued")
        stopped = self.harness.stop()
        self.successResultOf(stopped)
        self.assertEqual([s.outcome for s in self.harness.settled], ["requeued", "retried"])
        self.assertEqual(self.target.published, [])
        self.assertEqual(self.harness.clock.getDelayedCalls(), [])


class HandlerAbandonTests(SynchronousTestCase):
    """
    L{BridgeHandler.abandon} called directly, as the consumer calls it.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.target = RecordingPublisher("community")
        self.handler = BridgeHandler(
            "test", "infra", ("#",), ("#",), "community", self.target, clock=self.clock
        )

    def test_abandon_held(self) -> None:
        """
        A held call abandoned fails at once with NotHandled, its wait
        cancelled: the message is never handed over again.
        """
        self.target.refuse_with = TemporarilyUnavailable("full")
        message = Message.create(ALLOWED, {})
        d = self.handler.handle(message)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.handler.abandon(message)
        failure = self.failureResultOf(d, NotHandled)
        self.assertIn("abandoned", failure.value.reason)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.target.refuse_with = None
        self.clock.advance(60)
        self.assertEqual(self.target.published, [])
        self.assertEqual(self.target.refused, 1)
        self.assertEqual(self.handler._calls, {})

    def test_abandon_another_message(self) -> None:
        """
        Abandoning a message that is not held (never handled, a copy with
        the same id, one already forwarded) does nothing; neither does
        abandoning a held one twice.
        """
        self.target.refuse_with = TemporarilyUnavailable("full")
        message = Message.create(ALLOWED, {})
        held = self.handler.handle(message)
        self.handler.abandon(Message.create(ALLOWED, {}))
        self.handler.abandon(message.evolve(redelivered=True))
        self.assertNoResult(held)
        self.target.refuse_with = None
        forwarded = Message.create(ALLOWED, {"n": 2})
        self.successResultOf(self.handler.handle(forwarded))
        self.handler.abandon(forwarded)
        self.assertNoResult(held)
        self.handler.abandon(message)
        self.handler.abandon(message)
        self.failureResultOf(held, NotHandled)
        self.assertEqual([m.id for m in self.target.published], [forwarded.id])

    def test_abandon_during_hand_over(self) -> None:
        """
        A call whose message the target is taking when abandoned is left
        alone: once the target took it, it is forwarded.
        """
        self.target.hold = True
        message = Message.create(ALLOWED, {})
        d = self.handler.handle(message)
        self.handler.abandon(message)
        self.assertNoResult(d)
        (_, taken) = self.target.waiting[0]
        taken.callback(None)
        self.successResultOf(d)
        self.assertEqual(self.handler.forwarded, 1)
        self.assertEqual(len(self.target.published), 1)
        self.assertEqual(self.handler._calls, {})

    def test_abandon_during_hand_over_then_refused(self) -> None:
        """
        A hand-over in progress when the call was abandoned that the target
        then can not take is not held again: NotHandled, no timer.
        """
        self.target.hold = True
        message = Message.create(ALLOWED, {})
        d = self.handler.handle(message)
        self.handler.abandon(message)
        (_, taken) = self.target.waiting[0]
        taken.errback(TemporarilyUnavailable("full"))
        self.failureResultOf(d, NotHandled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.handler._calls, {})

    def test_abandon_one_of_two(self) -> None:
        """
        Abandoning one held call leaves another held, and a stop still makes
        that one a retry.
        """
        self.target.refuse_with = TemporarilyUnavailable("full")
        gone, kept = Message.create(ALLOWED, {"n": 1}), Message.create(ALLOWED, {"n": 2})
        first, second = self.handler.handle(gone), self.handler.handle(kept)
        self.handler.abandon(gone)
        self.failureResultOf(first, NotHandled)
        self.assertNoResult(second)
        self.handler.stop()
        self.failureResultOf(second, Retry)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.handler._calls, {})
