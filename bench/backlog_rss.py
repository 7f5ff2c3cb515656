"""
Resident memory of one domain's outbox while a large backlog builds up with
the broker gone, and while it drains once the broker is back.

One process runs an L{AMQPBus} and an L{Outbox} for one domain, as the hub
does.  The bus first points at an unused port on 127.0.0.1, so every
connection attempt is refused (the broker is down).  C{--messages} messages
of about 300 bytes of JSON are handed over through L{Outbox.publish} by
C{--concurrency} producers, each waiting for its hand-over to be on disk
before making the next message (like SMTP sessions waiting for C{250}); the
outbox's limits are set high enough to take them all.  Then the bus is
pointed at the broker at 127.0.0.1:5672 (guest/guest), reconnects, and the
outbox drains.  A thread reads C{VmRSS} from C{/proc/self/status} every
C{--sample} seconds through both phases.

The messages go to a temporary lazy queue bound to a topic of this run's own
on C{amq.topic}.  After the drain the queue is consumed to count what was
delivered and find duplicates (by the C{seq} each body carries), then
deleted, also after a failure.  The store lives in a temporary directory
that is deleted at the end.

It prints the RSS baseline (outbox open and idle), the highest sample and
highest minus baseline during the build and during the drain, the build and
drain rates and what the queue received.  It is run by hand and is no test::

    /work/venv/bin/python bench/backlog_rss.py [--messages 1000000]
        [--concurrency 1000] [--window 1000] [--dir DIR] [--sample 1.0]

The disk needs about 1 GB free per million messages for the store (checked
before anything is written); the broker keeps the queue on its own disk
until the check has consumed it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

from common import BROKER_HOST, BROKER_PORT, EXCHANGE, USER_HEADER, body_dict  # noqa: E402

#: Bytes of disk a stored message may take, SQLite's pages and log included.
DISK_PER_MESSAGE = 1000

#: The temporary queue removes itself after this long unused, should the
#: benchmark be killed before it deletes it.
QUEUE_EXPIRES_MS = 2 * 3600 * 1000


# --- memory --------------------------------------------------------------------


def rss_kib() -> int:
    """
    This process's resident set size now, in KiB.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Sample:
    """
    One reading of the sampler.
    """

    at: float
    phase: str
    rss_kib: int
    held: int
    pending: int


@dataclass
class Sampler:
    """
    Reads the RSS (and what the outbox holds) every C{interval} seconds on a
    thread of its own, so a busy reactor does not skip samples.

    @ivar phase: The label given to the next samples.
    """

    interval: float
    outbox: Any = None
    phase: str = "idle"
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> Sample:
        outbox = self.outbox
        # Reading a few integers of another thread's objects: good enough
        # for a report, and no lock is taken on the reactor's side.
        held = outbox.held() if outbox is not None else 0
        pending = outbox.store.pending_count if outbox is not None else 0
        reading = Sample(time.monotonic(), self.phase, rss_kib(), held, pending)
        self.samples.append(reading)
        return reading

    def start(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def of(self, phase: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == phase]


# --- the broker's side -----------------------------------------------------------


def unused_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on (it was free a moment
    ago; connections to it are refused).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((BROKER_HOST, 0))
        port: int = probe.getsockname()[1]
    return port


class Queue:
    """
    The temporary queue the drained messages land in, through pika.
    """

    def __init__(self) -> None:
        import pika

        self._pika = pika
        suffix = uuid.uuid4().hex[:10]
        self.name = f"fedhub.bench.backlog-rss.{suffix}"
        self.topic = f"org.fedoraproject.bench.backlogrss{suffix}.bug.update"
        self.declared = False

    def _connect(self) -> Any:
        pika = self._pika
        return pika.BlockingConnection(
            pika.ConnectionParameters(
                BROKER_HOST,
                BROKER_PORT,
                credentials=pika.PlainCredentials("guest", "guest"),
                heartbeat=600,
            )
        )

    def declare(self) -> None:
        connection = self._connect()
        try:
            channel = connection.channel()
            channel.queue_declare(
                self.name,
                durable=True,
                arguments={"x-queue-mode": "lazy", "x-expires": QUEUE_EXPIRES_MS},
            )
            self.declared = True
            channel.queue_bind(self.name, EXCHANGE, self.topic)
        finally:
            connection.close()

    def check(self, expected: int) -> dict[str, int]:
        """
        Consume everything in the queue: how many messages, how many of the
        C{expected} sequence numbers came, how many came more than once.
        """
        seen = bytearray(expected)
        delivered = duplicates = strangers = 0
        connection = self._connect()
        try:
            channel = connection.channel()
            depth = channel.queue_declare(self.name, passive=True).method.message_count
            channel.basic_qos(prefetch_count=2000)
            unacked = 0
            for method, _properties, body in channel.consume(self.name, inactivity_timeout=10):
                if method is None:
                    break
                delivered += 1
                seq = json.loads(body).get("seq")
                if isinstance(seq, int) and 0 <= seq < expected:
                    if seen[seq]:
                        duplicates += 1
                    seen[seq] = 1
                else:
                    strangers += 1
                unacked += 1
                if unacked >= 1000:
                    channel.basic_ack(method.delivery_tag, multiple=True)
                    unacked = 0
                if delivered >= depth:
                    break
            if unacked:
                channel.basic_ack(method.delivery_tag, multiple=True)
            channel.cancel()
        finally:
            connection.close()
        return {
            "depth": depth,
            "delivered": delivered,
            "distinct": sum(seen),
            "duplicates": duplicates,
            "strangers": strangers,
        }

    def delete(self) -> None:
        if not self.declared:
            return
        connection = self._connect()
        try:
            connection.channel().queue_delete(self.name)
        finally:
            connection.close()


# --- the hub's side --------------------------------------------------------------


class SwitchableEndpoint:
    """
    A client endpoint that connects to C{down_port} (refused) until
    L{switch} is called, then to the broker.
    """

    def __init__(self, reactor: Any, down_port: int) -> None:
        self._reactor = reactor
        self.port = down_port
        self.attempts = 0

    def switch(self) -> None:
        self.port = BROKER_PORT

    def connect(self, factory: Any) -> Any:
        from twisted.internet.endpoints import TCP4ClientEndpoint

        self.attempts += 1
        return TCP4ClientEndpoint(self._reactor, BROKER_HOST, self.port, timeout=5).connect(factory)


async def run(reactor: Any, args: argparse.Namespace, queue: Queue, directory: str) -> dict[str, Any]:
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    from fedhub.amqp.transport import AMQPBus
    from fedhub.amqp.url import parse_url
    from fedhub.errors import TemporarilyUnavailable
    from fedhub.message import Message
    from fedhub.outbox import Outbox

    async def sleep(seconds: float) -> None:
        await task.deferLater(reactor, seconds, lambda: None)

    down = unused_port()
    endpoint = SwitchableEndpoint(reactor, down)
    bus = AMQPBus(
        "bench",
        parse_url(f"amqp://guest:guest@{BROKER_HOST}:{down}/%2F"),
        reactor=reactor,
        exchange=EXCHANGE,
        max_in_flight=args.window,
        reconnect_initial=0.5,
        reconnect_max=args.retry_max,
        endpoint=endpoint,
    )
    outbox = Outbox(
        "bench",
        directory,
        bus,
        reactor,
        window=args.window,
        max_messages=args.messages + args.concurrency + 1,
        max_bytes=args.messages * DISK_PER_MESSAGE * 4,
        max_waiting=max(10_000, args.concurrency),
        retry_max=args.retry_max,
    )
    confirmed = [0]

    def observe(event: str, message_id: str) -> None:
        if event == "confirmed":
            confirmed[0] += 1

    outbox.add_observer(observe)
    sampler = Sampler(args.sample, outbox)
    bus.startService()
    outbox.startService()
    while not outbox.store.is_open:
        await sleep(0.01)
    # Settle: let the first refused connections and the first pause happen.
    await sleep(2.0)
    gc.collect()
    baseline = [sampler.sample().rss_kib for _ in range(3)]
    sampler.samples.clear()
    sampler.phase = "build"
    sampler.start()

    # -- build: everything handed over while the broker is unreachable
    total = args.messages
    next_seq = [0]
    accepted = [0]
    refused = [0]
    built: Deferred[None] = Deferred()
    user_headers = {USER_HEADER: True}

    def hand_over(message: Message | None = None) -> None:
        if message is None:
            seq = next_seq[0]
            if seq >= total:
                return
            next_seq[0] = seq + 1
            message = Message.create(queue.topic, body_dict(seq), headers=user_headers)

        def done(_: object) -> None:
            accepted[0] += 1
            if accepted[0] == total:
                built.callback(None)
            else:
                hand_over()

        def failed(failure: Any) -> None:
            if not failure.check(TemporarilyUnavailable):
                print(f"hand-over failed for good: {failure.getErrorMessage()}", file=sys.stderr)
                reactor.stop()
                return
            refused[0] += 1
            reactor.callLater(0.01, hand_over, message)

        outbox.publish(message).addCallbacks(done, failed)

    build_started = time.monotonic()
    cpu_started = time.process_time()
    for _ in range(min(args.concurrency, total)):
        hand_over()
    await built
    build_seconds = time.monotonic() - build_started
    build_cpu = time.process_time() - cpu_started
    if bus.connected or confirmed[0]:
        raise RuntimeError("the bus connected during the build: is the down port in use?")

    # -- drain: the broker is back
    sampler.phase = "drain"
    drain_started = time.monotonic()
    cpu_started = time.process_time()
    endpoint.switch()
    await bus.when_connected()
    connected_after = time.monotonic() - drain_started
    first_confirm = None
    while confirmed[0] < total or outbox.store.pending_count:
        if first_confirm is None and confirmed[0]:
            first_confirm = time.monotonic() - drain_started
        await sleep(0.05)
    drain_seconds = time.monotonic() - drain_started
    drain_cpu = time.process_time() - cpu_started
    sampler.stop()
    stats = outbox.stats()
    published = bus.stats.published
    await outbox.stopService()
    await bus.stopService()
    return {
        "baseline_kib": max(baseline),
        "sampler": sampler,
        "build_seconds": build_seconds,
        "build_cpu": build_cpu,
        "refused": refused[0],
        "drain_seconds": drain_seconds,
        "drain_cpu": drain_cpu,
        "connected_after": connected_after,
        "first_confirm": first_confirm or 0.0,
        "confirmed": confirmed[0],
        "published": published,
        "transactions": stats.transactions,
        "down_attempts": endpoint.attempts,
    }


def report(args: argparse.Namespace, result: dict[str, Any], check: dict[str, int]) -> None:
    sampler: Sampler = result["sampler"]
    base = result["baseline_kib"]
    n = args.messages
    print(f"backlog RSS: {n:,} messages, {args.concurrency} producers, window {args.window}")
    print(f"  baseline RSS (outbox open, idle): {base / 1024:.1f} MiB")
    for phase, seconds, cpu in (
        ("build", result["build_seconds"], result["build_cpu"]),
        ("drain", result["drain_seconds"], result["drain_cpu"]),
    ):
        samples = sampler.of(phase)
        top = max((s.rss_kib for s in samples), default=base)
        held = max((s.held for s in samples), default=0)
        last = samples[-1].rss_kib if samples else base
        print(
            f"  {phase}: {n / seconds:,.0f} msg/s ({seconds:.1f} s, {cpu / n * 1e6:.0f} us CPU per message);"
            f" RSS max {top / 1024:.1f} MiB, max - baseline {(top - base) / 1024:+.1f} MiB,"
            f" at the end {last / 1024:.1f} MiB; {len(samples)} samples; at most {held} messages held"
        )
    print(
        f"  build: {result['refused']} hand-overs refused for a while (limits), "
        f"{result['down_attempts']} refused connection attempts"
    )
    print(
        f"  drain: connected after {result['connected_after']:.1f} s, first confirm after "
        f"{result['first_confirm']:.1f} s; {result['published']:,} published, "
        f"{result['confirmed']:,} confirmed; {result['transactions']} transactions in all"
    )
    print(
        f"  queue: {check['delivered']:,} delivered, {check['distinct']:,} distinct, "
        f"{check['duplicates']} duplicates (window {args.window}), {check['strangers']} unknown"
    )
    ok = check["distinct"] == n and check["duplicates"] <= args.window and not check["strangers"]
    print(f"  delivery: {'OK' if ok else 'FAILED'}")
    if args.samples:
        with open(args.samples, "w") as out:
            for s in sampler.samples:
                out.write(f"{s.at:.2f} {s.phase} {s.rss_kib} {s.held} {s.pending}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--retry-max", type=float, default=2.0, help="longest reconnect/resend delay")
    parser.add_argument("--dir", default=None, help="where to put the store (default: the temp dir)")
    parser.add_argument("--samples", help="write every sample to this file")
    args = parser.parse_args()

    parent = args.dir or tempfile.gettempdir()
    usage = shutil.disk_usage(parent)
    need = args.messages * DISK_PER_MESSAGE * 2
    print(
        f"disk at {parent}: {usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB;"
        f" the store needs about {need / 2**30:.1f} GiB",
        flush=True,
    )
    if usage.free < need + 2 * 2**30:
        sys.exit("not enough free disk space; use --dir or fewer --messages")

    from twisted.internet import task
    from twisted.internet.defer import Deferred
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    # Start logging as a hub does: Twisted otherwise keeps early events in
    # memory, and refused connections make many.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )

    queue = Queue()
    directory = tempfile.mkdtemp(prefix="fedhub-backlog-rss-", dir=args.dir)
    outcome: dict[str, Any] = {}
    try:
        queue.declare()

        async def go(reactor: Any) -> None:
            outcome.update(await run(reactor, args, queue, directory))

        try:
            task.react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
        except SystemExit as e:
            if e.code:
                raise
        shutil.rmtree(directory, ignore_errors=True)
        check = queue.check(args.messages)
        report(args, outcome, check)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        queue.delete()


if __name__ == "__main__":
    main()
