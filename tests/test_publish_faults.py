"""
Faults on the reliable publish path: an L{Outbox} publishing through an
L{AMQPBus} to a private RabbitMQ node (L{tests.broker}), while the broker is
killed, the hub is killed, the broker raises a disk alarm, the broker
refuses messages, or the outbox's own disk is full.

"Lost" always means: a message whose hand-over succeeded (its Deferred
fired) that is not in the broker's queue afterwards; the queue is drained
and the distinct message ids counted.  Without RabbitMQ installed the tests
are skipped, except in CI (C{CI=true}).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fedhub.amqp.transport import AMQPBus, PublishRefused, _refuses
from fedhub.amqp.url import parse_url
from fedhub.errors import AccessRefused, NotFound, TemporarilyUnavailable
from fedhub.message import Message
from fedhub.outbox import CONFIRMED, REJECTED, RETURNED, Outbox
from fedhub.topology import BindingSpec, QueueSpec, Topology
from tests.broker import (
    PrivateBrokerCase,
    User,
    free_port,
    reactor,
    report,
    sleep,
    wait_until,
)

FAULTS = "/faults"
OTHER = "/other"
ALL = (".*", ".*", ".*")
FORBIDDEN_EXCHANGE = "fedhub.forbidden"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HUB_SCRIPT = """
import sys
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from fedhub.amqp.transport import AMQPBus
from fedhub.amqp.url import parse_url
from fedhub.message import Message
from fedhub.outbox import Outbox

state, url, run, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
bus = AMQPBus("hubkill", parse_url(url), reactor=reactor, reconnect_initial=0.2,
              reconnect_max=1.0)
outbox = Outbox("hubkill", state, bus, reactor)

async def main():
    bus.startService()
    outbox.startService()
    handovers = []
    for n in range(count):
        message = Message.create(f"fedhubtest.{run}.kill", {"n": n}, id=f"{run}-{n}")
        handovers.append(outbox.publish(message))
    await gatherResults(handovers)
    print(f"durable {count}", flush=True)

def run_main():
    d = Deferred.fromCoroutine(main())
    d.addErrback(lambda f: (print(f.getTraceback(), file=sys.stderr, flush=True),
                            reactor.stop()))

reactor.callWhenRunning(run_main)
reactor.run()
"""
"""A hub reduced to its outbox, run in a subprocess so that it can be killed."""


def rss_bytes() -> int:
    """
    The resident memory of this process now.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Collector:
    """
    An on_delivery that keeps every delivered message id and acknowledges.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, delivery: Any) -> None:
        self.ids.append(delivery.message.id)
        delivery.ack()


class _Child(ProcessProtocol):
    """
    A subprocess whose output is watched for a line.
    """

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class PublishFaultTests(PrivateBrokerCase):
    """
    The outbox and the bus against a broker (and a disk) that fail.
    """

    timeout = 120
    tls = False
    vhosts = (FAULTS, OTHER)
    exchanges = ((FAULTS, FORBIDDEN_EXCHANGE),)
    users = (
        User("hub", "hub-secret", permissions={FAULTS: ALL, OTHER: ALL}),
        User(
            "limited",
            "limited-secret",
            permissions={FAULTS: (".*", "^(amq\\.topic|fedhub\\.test\\..*)$", ".*")},
        ),
    )

    # -- building blocks ---------------------------------------------------------

    def url(self, vhost: str = FAULTS, user: str = "hub", heartbeat: int = 10) -> str:
        password = {"hub": "hub-secret", "limited": "limited-secret"}[user]
        return f"{self.broker.url(vhost, user, password)}?heartbeat={heartbeat}"

    def make_bus(
        self, domain: str, url: str | None = None, **options: Any
    ) -> AMQPBus:
        """
        A bus (not started) that reconnects quickly; stopped after the test.
        """
        options.setdefault("reconnect_initial", 0.1)
        options.setdefault("reconnect_max", 0.5)
        bus = AMQPBus(domain, parse_url(url or self.url()), reactor=reactor(), **options)
        self.addCleanup(lambda: bus.stopService() if bus.running else None)
        return bus

    def make_outbox(self, domain: str, bus: AMQPBus, directory: str, **options: Any) -> Outbox:
        """
        A started outbox on C{directory} publishing through C{bus}, which
        is started too; both stop after the test (outbox first).
        """
        options.setdefault("retry_initial", 0.05)
        options.setdefault("retry_max", 0.5)
        outbox = Outbox(domain, directory, bus, reactor(), **options)
        if not bus.running:
            bus.startService()
        outbox.startService()
        self.addCleanup(lambda: outbox.stopService() if outbox.running else None)
        return outbox

    async def connected(self, bus: AMQPBus, timeout: float = 30.0) -> None:
        waiting = bus.when_connected()
        waiting.addTimeout(timeout, reactor())
        await waiting

    async def bound_queue(self, bus: AMQPBus, pattern: str) -> str:
        """
        Declare a durable queue bound to C{pattern} on amq.topic.
        """
        name = f"fedhub.test.faults.{uuid.uuid4().hex}"
        await bus.declare(
            Topology(
                queues=(QueueSpec(name),),
                bindings=(BindingSpec(name, "amq.topic", pattern),),
            )
        )
        return name

    async def queue_depth(self, bus: AMQPBus, queue: str) -> int:
        session = bus._session
        assert session is not None
        reply = await session.run_declaring(
            lambda channel: channel.queue_declare(queue=queue, passive=True)
        )
        return int(reply.message_count)

    async def drain(
        self, bus: AMQPBus, queue: str, expected: Iterable[str], timeout: float = 60.0
    ) -> list[str]:
        """
        Consume the whole queue; return every delivered id (duplicates
        included).  Fails naming how many of C{expected} never came.
        """
        wanted = set(expected)
        collector = Collector()
        subscription = await bus.subscribe(queue, collector, 1000)
        deadline = time.monotonic() + timeout
        try:
            while True:
                seen = set(collector.ids)
                if wanted <= seen and await self.queue_depth(bus, queue) == 0:
                    count = len(collector.ids)
                    await sleep(0.3)
                    if len(collector.ids) == count:
                        break
                    continue
                if time.monotonic() > deadline:
                    missing = wanted - seen
                    self.fail(
                        f"{len(missing)} of {len(wanted)} messages never arrived"
                        f" (e.g. {sorted(missing)[:3]})"
                    )
                await sleep(0.1)
        finally:
            await subscription.cancel()
        return collector.ids

    async def hand_over(
        self, outbox: Outbox, messages: list[Message], batch: int = 500
    ) -> list[str]:
        """
        Hand messages over in batches, each awaited; return the ids of those
        taken (all of them, or the test fails).
        """
        taken: list[str] = []
        for start in range(0, len(messages), batch):
            chunk = messages[start : start + batch]
            await gatherResults([outbox.publish(m) for m in chunk])
            taken.extend(m.id for m in chunk)
        return taken

    # -- the broker killed -------------------------------------------------------

    async def test_broker_killed_mid_burst(self) -> None:
        """
        The broker is SIGKILLed at message 5,000 of a 10,000-message burst
        and restarted: every message handed over is in the queue afterwards,
        duplicates stay within the confirm window, and new messages are
        confirmed promptly once the broker is back.
        """
        window = 1000
        bus = self.make_bus("burst", max_in_flight=window)
        outbox = self.make_outbox("burst", bus, self.mktemp(), window=window)
        await self.connected(bus)
        run = uuid.uuid4().hex
        queue = await self.bound_queue(bus, f"fedhubtest.{run}.#")
        messages = [Message.create(f"fedhubtest.{run}.burst", {"n": n}) for n in range(10_000)]

        handed: list[Deferred[None]] = []
        for n, message in enumerate(messages, 1):
            handed.append(outbox.publish(message))
            if n % 250 == 0:
                # Let the reactor write, publish and take confirms meanwhile.
                await DeferredList(handed[-250:])
            if n == 5000:
                # Hand-overs complete on fsync, before the broker's confirms:
                # on a loaded machine all 5,000 can be on disk before the
                # first confirm comes.  Kill once one has, so that the kill
                # falls between confirmed and unconfirmed messages.
                await wait_until(
                    lambda: bus.stats.confirmed > 0, 30, "a first confirm", interval=0.001
                )
                confirmed_before = bus.stats.confirmed
                self.broker.kill9()
        results = await DeferredList(handed, consumeErrors=True)
        taken = [m.id for m, (ok, _) in zip(messages, results) if ok]
        self.assertEqual(len(taken), len(messages))
        # The kill came mid-burst: some of the first 5,000 not confirmed yet.
        self.assertLess(confirmed_before, 5000)

        await self.broker.restart()
        back = time.monotonic()
        confirmed: set[str] = set()
        fresh = [Message.create(f"fedhubtest.{run}.after", {"n": n}) for n in range(100)]
        fresh_ids = {m.id for m in fresh}

        def observe(event: str, message_id: str) -> None:
            if event == CONFIRMED and message_id in fresh_ids:
                confirmed.add(message_id)

        outbox.add_observer(observe)
        taken += await self.hand_over(outbox, fresh)
        await wait_until(lambda: len(confirmed) == 100, 30, "confirms of 100 new messages")
        report("100 new messages confirmed after the restart (s)", time.monotonic() - back)

        delivered = await self.drain(bus, queue, taken)
        self.assertEqual(set(delivered), set(taken))
        duplicates = len(delivered) - len(set(delivered))
        self.assertLessEqual(duplicates, window)
        report("confirmed when the broker was killed", confirmed_before)
        report("duplicates after the kill", duplicates)
        self.assertEqual(outbox.stats().depth, 0)

    # -- the hub killed ------------------------------------------------------------

    async def test_hub_killed_with_unconfirmed_outbox(self) -> None:
        """
        A hub SIGKILLed with 5,000 unconfirmed messages in its outbox (its
        broker unreachable) publishes every one of them after a restart on
        the same state directory.
        """
        state = os.path.abspath(self.mktemp())
        run = uuid.uuid4().hex
        count = 5000
        dead = f"amqp://hub:hub-secret@127.0.0.1:{free_port()}/%2Ffaults?heartbeat=10"
        child = _Child()
        env = dict(os.environ, PYTHONPATH=REPO)
        process = reactor().spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-c", HUB_SCRIPT, state, dead, run, str(count)],
            env=env,
            path=REPO,
        )
        self.addCleanup(lambda: child.ended if process.pid is not None else None)
        self.addCleanup(lambda: process.signalProcess("KILL") if process.pid else None)
        await wait_until(
            lambda: b"durable" in child.out or child.ended.called,
            60,
            "the hub to hand 5,000 messages over",
        )
        self.assertEqual(bytes(child.out).strip(), f"durable {count}".encode(), child.err.decode())
        process.signalProcess("KILL")
        await child.ended

        bus = self.make_bus("hubkill")
        bus.startService()
        await self.connected(bus)
        queue = await self.bound_queue(bus, f"fedhubtest.{run}.#")
        outbox = self.make_outbox("hubkill", bus, state)
        expected = [f"{run}-{n}" for n in range(count)]
        delivered = await self.drain(bus, queue, expected)
        self.assertEqual(set(delivered), set(expected))
        await wait_until(lambda: outbox.stats().depth == 0, 20, "the outbox to empty")

    # -- a resource alarm ------------------------------------------------------------

    async def test_disk_alarm_blocks_then_drains(self) -> None:
        """
        While the broker's disk alarm lasts, publishes wait (no confirms,
        nothing sent), the outbox keeps taking messages with flat memory, and
        everything is delivered once the alarm clears.
        """
        bus = self.make_bus("alarm")
        outbox = self.make_outbox(
            "alarm", bus, self.mktemp(), window=200, read_batch=200
        )
        await self.connected(bus)
        run = uuid.uuid4().hex
        queue = await self.bound_queue(bus, f"fedhubtest.{run}.#")
        filler = "x" * 1024
        taken: list[str] = []
        producing = True

        async def produce() -> None:
            n = 0
            while producing:
                batch = [
                    Message.create(f"fedhubtest.{run}.alarm", {"n": n + i, "pad": filler})
                    for i in range(20)
                ]
                n += 20
                taken.extend(await self.hand_over(outbox, batch))
                await sleep(0.05)

        producer = Deferred.fromCoroutine(produce())
        try:
            await wait_until(lambda: bus.stats.confirmed >= 100, 20, "confirms before the alarm")
            await self.broker.ctl("set_disk_free_limit", "1000GB")
            try:
                await wait_until(lambda: bus.blocked, 20, "connection.blocked")
                # Messages the broker read before it blocked are still confirmed.
                await sleep(1.0)
                confirmed = bus.stats.confirmed
                published = bus.stats.published
                depth = outbox.stats().depth
                baseline = peak = rss_bytes()
                for _ in range(16):
                    await sleep(0.5)
                    peak = max(peak, rss_bytes())
                    self.assertTrue(bus.blocked)
                    self.assertEqual(bus.stats.confirmed, confirmed)
                    self.assertEqual(bus.stats.published, published)
                self.assertGreater(outbox.stats().depth, depth + 200)
                self.assertLess(peak - baseline, 40 * 1024 * 1024)
                report("messages taken during the alarm", outbox.stats().depth - depth)
                report("RSS growth during the alarm (KiB)", (peak - baseline) // 1024)
            finally:
                await self.broker.ctl("set_disk_free_limit", "50MB")
            await wait_until(lambda: not bus.blocked, 20, "connection.unblocked")
        finally:
            producing = False
            await producer
        delivered = await self.drain(bus, queue, taken)
        self.assertEqual(set(delivered), set(taken))
        self.assertEqual(outbox.stats().depth, 0)

    # -- refused messages ------------------------------------------------------------

    async def test_refused_messages_kept_aside_without_retries(self) -> None:
        """
        Unroutable messages and messages to an exchange the user may not
        write to go to the outbox's failed area with the broker's reason,
        each sent once; another domain publishes meanwhile, unaffected.
        """
        run = uuid.uuid4().hex
        unroutable_bus = self.make_bus("unroutable")
        unroutable = self.make_outbox("unroutable", unroutable_bus, self.mktemp())
        forbidden_bus = self.make_bus(
            "forbidden", self.url(user="limited"), exchange=FORBIDDEN_EXCHANGE
        )
        forbidden = self.make_outbox("forbidden", forbidden_bus, self.mktemp())
        other_bus = self.make_bus("other", self.url(OTHER))
        other = self.make_outbox("other", other_bus, self.mktemp())
        for bus in (unroutable_bus, forbidden_bus, other_bus):
            await self.connected(bus)
        queue = await self.bound_queue(other_bus, f"fedhubtest.{run}.other.#")

        count = 50
        await self.hand_over(
            unroutable, [Message.create(f"fedhubtest.{run}.nobody", {"n": n}) for n in range(count)]
        )
        await self.hand_over(
            forbidden, [Message.create(f"fedhubtest.{run}.denied", {"n": n}) for n in range(count)]
        )
        others = [Message.create(f"fedhubtest.{run}.other.ok", {"n": n}) for n in range(count)]
        await self.hand_over(other, others)

        await wait_until(
            lambda: unroutable.stats().failed == count and forbidden.stats().failed == count,
            30,
            "both outboxes to set the refused messages aside",
        )
        delivered = await self.drain(other_bus, queue, [m.id for m in others])
        self.assertEqual(sorted(delivered), sorted(m.id for m in others))

        # Nothing is tried again: the attempt counters stand still.
        attempts = (unroutable_bus.stats.published, forbidden.stats().published)
        await sleep(2.0)
        self.assertEqual((unroutable_bus.stats.published, forbidden.stats().published), attempts)
        self.assertEqual(unroutable_bus.stats.published, count)
        self.assertEqual(forbidden.stats().published, count)
        self.assertLessEqual(forbidden_bus.stats.published, count)
        self.assertEqual(other.stats().failed, 0)

        returned = await unroutable.failed(limit=1000)
        self.assertEqual(len(returned), count)
        self.assertEqual({r.kind for r in returned}, {RETURNED})
        self.assertIn("312", returned[0].reason)
        self.assertIn("NO_ROUTE", returned[0].reason)
        refused = await forbidden.failed(limit=1000)
        self.assertEqual(len(refused), count)
        self.assertEqual({r.kind for r in refused}, {REJECTED})
        self.assertIn("403", refused[0].reason)
        self.assertIn(f"access to exchange '{FORBIDDEN_EXCHANGE}' in vhost", refused[0].reason)
        self.assertEqual(forbidden.stats().depth, 0)

    async def test_forbidden_exchange_fails_typed(self) -> None:
        """
        On the bus itself, a publish the permissions forbid fails with
        PublishRefused (final), not NotConnected (which means "send again").
        """
        bus = self.make_bus("typed", self.url(user="limited"), exchange=FORBIDDEN_EXCHANGE)
        bus.startService()
        await self.connected(bus)
        failures = await DeferredList(
            [bus.publish(Message.create("fedhubtest.typed", {"n": n})) for n in range(3)],
            consumeErrors=True,
        )
        for ok, outcome in failures:
            self.assertFalse(ok)
            assert isinstance(outcome, Failure)
            error = outcome.value
            self.assertIsInstance(error, PublishRefused)
            assert isinstance(error, PublishRefused)
            self.assertEqual((error.exchange, error.reply_code), (FORBIDDEN_EXCHANGE, 403))
        # The connection and a publish channel remain usable.
        queue = await self.bound_queue(bus, "fedhubtest.typed.ok")
        await bus.publish(Message.create("fedhubtest.typed.ok", {}), exchange="amq.topic")
        self.assertEqual(await self.queue_depth(bus, queue), 1)

    # -- the outbox's own disk full ------------------------------------------------------

    async def test_outbox_disk_full(self) -> None:
        """
        On a full disk, hand-overs fail with TemporarilyUnavailable and
        nothing already taken is lost; hand-overs are taken again once space
        returns, and everything taken is published.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", directory],
            capture_output=True,
        )
        if mounted.returncode != 0:
            if os.environ.get("CI") == "true":
                self.fail(f"can not mount a tmpfs: {mounted.stderr.decode(errors='replace')}")
            raise SkipTest(f"can not mount a tmpfs: {mounted.stderr.decode(errors='replace')}")
        self.addCleanup(subprocess.run, ["umount", "-l", directory], capture_output=True)
        run = uuid.uuid4().hex
        store = os.path.join(directory, "outbox")
        unreachable = f"amqp://hub:hub-secret@127.0.0.1:{free_port()}/%2Ffaults?heartbeat=10"
        offline_bus = self.make_bus("diskfull", unreachable)
        outbox = self.make_outbox("diskfull", offline_bus, store)

        def message(n: int) -> Message:
            return Message.create(f"fedhubtest.{run}.disk", {"n": n, "pad": "y" * 200})

        taken = await self.hand_over(outbox, [message(n) for n in range(100)])
        filler = os.path.join(directory, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)

        refused: list[str] = []
        reasons: set[str] = set()
        n = 100
        while not refused and n < 5000:
            m = message(n)
            n += 1
            try:
                await outbox.publish(m)
            except TemporarilyUnavailable as e:
                refused.append(m.id)
                reasons.add(e.reason)
            else:
                taken.append(m.id)
        self.assertTrue(refused, "no hand-over was refused on a full disk")
        report("hand-overs taken before the disk was full", len(taken))
        self.assertTrue(any("full" in r for r in reasons), reasons)

        os.unlink(filler)
        resumed: list[str] = []

        async def try_again() -> bool:
            m = message(n + len(resumed) + 1000)
            try:
                await outbox.publish(m)
            except TemporarilyUnavailable:
                return False
            resumed.append(m.id)
            return True

        deadline = time.monotonic() + 20
        while not await try_again():
            self.assertLess(time.monotonic(), deadline, "hand-overs were not taken again")
            await sleep(0.1)
        taken += resumed
        await outbox.stopService()
        await offline_bus.stopService()

        bus = self.make_bus("diskfull")
        bus.startService()
        await self.connected(bus)
        queue = await self.bound_queue(bus, f"fedhubtest.{run}.#")
        self.make_outbox("diskfull", bus, store)
        delivered = await self.drain(bus, queue, taken)
        self.assertEqual(set(delivered), set(taken))
        self.assertFalse(set(refused) & set(delivered))


class RefusalMatchTests(SynchronousTestCase):
    """
    Which messages a 403 that closed the publish channel is about; needs no
    broker.
    """

    def test_exchange_refusal(self) -> None:
        """
        A write refusal names its exchange: messages to it are refused with
        any routing key, messages to other exchanges are not.
        """
        error = AccessRefused(
            403,
            "ACCESS_REFUSED - access to exchange 'fedhub.forbidden' in vhost '/faults'"
            " refused for user 'limited'",
        )
        self.assertTrue(_refuses(error, "fedhub.forbidden", "a.b"))
        self.assertTrue(_refuses(error, "fedhub.forbidden", "c"))
        self.assertFalse(_refuses(error, "fedhub", "a.b"))
        self.assertFalse(_refuses(error, "amq.topic", "a.b"))

    def test_topic_refusal(self) -> None:
        """
        A topic-permission refusal is about one routing key on one exchange.
        """
        error = AccessRefused(
            403,
            "ACCESS_REFUSED - write access to topic 'org.x.secret' in exchange 'amq.topic'"
            " in vhost '/' refused for user 'u'",
        )
        self.assertTrue(_refuses(error, "amq.topic", "org.x.secret"))
        self.assertFalse(_refuses(error, "amq.topic", "org.x.public"))

    def test_other_codes(self) -> None:
        """
        Only 403 refuses for good; other channel errors say nothing about
        the messages.
        """
        error = NotFound(404, "NOT_FOUND - no exchange 'fedhub.forbidden' in vhost '/faults'")
        self.assertFalse(_refuses(error, "fedhub.forbidden", "a.b"))
