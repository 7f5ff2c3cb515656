"""
Tests for L{fedhub.bus.memory.MemoryBus} across C{stopService} and
C{startService}: subscriptions consume again after a start, as an AMQP bus's
do after it connects again.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from twisted.internet.task import Clock

from fedhub.bus import MemoryBus
from fedhub.consumers.runner import ConsumerService
from fedhub.errors import NotConnected
from fedhub.message import Message
from tests.test_consumer_runner import ScriptedHandler, component
from tests.test_memory_bus import MemoryBusTestsMixin, Recorder, _message


class RestartTests(MemoryBusTestsMixin):
    """
    Subscriptions made before a stop, after the bus starts again.
    """

    def test_subscription_resumes(self) -> None:
        """
        A subscription stops consuming with the bus and consumes again once it
        starts: a message published after the start reaches it.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder(ack=True)
        subscription = self.subscribe(bus, "q", recorder)
        self.assertTrue(subscription.consuming)
        self.successResultOf(bus.stopService())
        self.assertFalse(subscription.consuming)
        bus.startService()
        self.assertTrue(subscription.consuming)
        message = _message(1)
        self.successResultOf(bus.publish(message))
        clock.advance(0)
        self.assertEqual(recorder.ids, [message.id])
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (0, 0))

    def test_ready_messages_delivered_after_start(self) -> None:
        """
        Messages still in the queue when the bus stopped go to the resumed
        subscription after the start, in order, and none while stopped.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder(ack=True)
        self.subscribe(bus, "q", recorder, prefetch=1)
        messages = [_message(n) for n in range(3)]
        for message in messages:
            self.successResultOf(bus.publish(message))
        self.successResultOf(bus.stopService())
        clock.advance(10)
        self.assertEqual(recorder.ids, [])
        self.assertEqual(bus.queue_depth("q"), 3)
        bus.startService()
        clock.advance(0)
        self.assertEqual(recorder.ids, [m.id for m in messages])

    def test_unacked_come_back_redelivered(self) -> None:
        """
        A delivery unacknowledged at the stop is no longer live (a late ack
        changes nothing) and comes back to the resumed subscription, marked
        redelivered; the prefetch limit still holds.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder()
        self.subscribe(bus, "q", recorder, prefetch=1)
        first, second = _message(0), _message(1)
        self.successResultOf(bus.publish(first))
        self.successResultOf(bus.publish(second))
        clock.advance(0)
        held = recorder.deliveries[0]
        self.assertEqual(recorder.ids, [first.id])
        self.successResultOf(bus.stopService())
        self.assertFalse(held.live)
        self.assertIs(held.ack(), False)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (2, 0))
        bus.startService()
        clock.advance(0)
        self.assertEqual(recorder.ids, [first.id, first.id])
        self.assertIs(recorder.deliveries[1].redelivered, True)
        self.assertIs(recorder.deliveries[1].ack(), True)
        clock.advance(0)
        self.assertEqual(recorder.ids, [first.id, first.id, second.id])
        self.assertIs(recorder.deliveries[2].redelivered, False)

    def test_publish_while_stopped(self) -> None:
        """
        A publish while the bus is stopped fails with NotConnected, as on an
        AMQP bus, and is not delivered after the start.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder(ack=True)
        self.subscribe(bus, "q", recorder)
        self.successResultOf(bus.stopService())
        refused = _message(0)
        error = self.failureResultOf(bus.publish(refused), NotConnected).value
        self.assertEqual(error.message_id, refused.id)
        bus.startService()
        clock.advance(0)
        self.assertEqual(recorder.ids, [])
        self.assertEqual(bus.queue_depth("q"), 0)

    def test_cancelled_before_stop_stays_cancelled(self) -> None:
        """
        A subscription cancelled before the stop does not consume after the
        start; the others on its queue do.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        gone, kept = Recorder(ack=True), Recorder(ack=True)
        cancelled = self.subscribe(bus, "q", gone)
        resumed = self.subscribe(bus, "q", kept)
        self.successResultOf(cancelled.cancel())
        self.successResultOf(bus.stopService())
        bus.startService()
        self.assertEqual((cancelled.consuming, resumed.consuming), (False, True))
        messages = [_message(n) for n in range(2)]
        for message in messages:
            self.successResultOf(bus.publish(message))
        clock.advance(0)
        self.assertEqual(gone.ids, [])
        self.assertEqual(kept.ids, [m.id for m in messages])

    def test_cancelled_while_stopped(self) -> None:
        """
        A subscription cancelled while the bus is stopped does not consume
        after the start, and its messages wait for another consumer.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder()
        subscription = self.subscribe(bus, "q", recorder)
        self.successResultOf(bus.publish(_message(0)))
        clock.advance(0)
        self.successResultOf(bus.stopService())
        self.successResultOf(subscription.cancel())
        bus.startService()
        clock.advance(0)
        self.assertFalse(subscription.consuming)
        self.assertEqual(len(recorder.deliveries), 1)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (1, 0))
        again = Recorder(ack=True)
        self.subscribe(bus, "q", again)
        clock.advance(0)
        self.assertEqual([d.redelivered for d in again.deliveries], [True])

    def test_stopped_bus_leaves_no_timers(self) -> None:
        """
        A stop with subscriptions kept for the next start leaves no delayed
        call on the clock, even with messages ready for them.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#", arguments={"x-message-ttl": 5000})
        self.subscribe(bus, "q", Recorder(), prefetch=1)
        for n in range(3):
            self.successResultOf(bus.publish(_message(n)))
        self.successResultOf(bus.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_several_restarts(self) -> None:
        """
        Every start resumes the subscription once: one delivery per message,
        whatever the number of stops and starts before it.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder(ack=True)
        self.subscribe(bus, "q", recorder)
        for _ in range(3):
            self.successResultOf(bus.stopService())
            bus.startService()
        message = _message(0)
        self.successResultOf(bus.publish(message))
        clock.advance(0)
        self.assertEqual(recorder.ids, [message.id])


class ConsumerOnRestartedBusTests(MemoryBusTestsMixin):
    """
    A L{ConsumerService} on a memory bus that stops and starts.
    """

    def flush(self, clock: Clock) -> None:
        for _ in range(10):
            clock.advance(0)

    def consumer(self, bus: MemoryBus, clock: Clock) -> tuple[ConsumerService, ScriptedHandler]:
        handler = ScriptedHandler()
        service = ConsumerService(component(), handler, bus, clock)
        service.startService()
        self.addCleanup(service.stopService)
        self.flush(clock)
        self.assertTrue(service.consuming)
        return service, handler

    def test_bus_restarted_under_running_consumer(self) -> None:
        """
        A consumer that keeps running while its bus stops and starts again
        consumes again after the start, as it does on an AMQP bus.
        """
        bus, clock = self.bus()
        service, handler = self.consumer(bus, clock)
        self.successResultOf(bus.stopService())
        self.assertFalse(service.consuming)
        bus.startService()
        self.flush(clock)
        self.assertTrue(service.consuming)
        message = Message.create("t.x", {"n": 1})
        self.successResultOf(bus.publish(message))
        self.flush(clock)
        self.assertEqual([m.id for m in handler.seen], [message.id])
        self.assertEqual((bus.queue_depth(service.queue), bus.unacked(service.queue)), (0, 0))

    def test_hub_style_restart_subscribes_once(self) -> None:
        """
        Stopping the consumer and then the bus, and starting both again (as
        the hub does), leaves one subscription on the queue: a message is
        handled once.
        """
        bus, clock = self.bus()
        service, handler = self.consumer(bus, clock)
        self.successResultOf(service.stopService())
        self.successResultOf(bus.stopService())
        bus.startService()
        service.startService()
        self.flush(clock)
        self.assertTrue(service.consuming)
        for n in range(4):
            self.successResultOf(bus.publish(Message.create("t.x", {"n": n})))
        self.flush(clock)
        self.assertEqual([m.body["n"] for m in handler.seen], [0, 1, 2, 3])
        self.assertEqual(service.stats["acked"], 4)
