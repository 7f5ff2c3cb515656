"""
A local micro-benchmark of the outbox: durable hand-over throughput with
fsync, through to confirm and delete, on a fake bus that confirms at once.

No broker is involved: it measures what the outbox itself costs (encoding,
SQLite with C{synchronous=FULL} on the store's thread, group commit, the
window, batched deletes) on this machine's disk.

Two runs:

  - C{live}: C{--concurrency} producers each hand over their next message
    when the previous one is on disk (like SMTP sessions waiting for their
    C{250}); the clock stops when every message is confirmed and deleted.
  - C{backlog}: C{--messages} are written to a store first; the clock runs
    from C{startService} of a new outbox until all are confirmed and deleted
    (the restart-after-an-outage case, where messages are read back from
    disk).

Usage::

    python bench/outbox_bench.py [--messages 50000] [--concurrency 500]
                                 [--window 1000] [--dir /path/on/the/disk]
                                 [--runs live,backlog]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from fedhub.interfaces import IBus
from fedhub.message import Message
from fedhub.outbox import Outbox, Store, SynchronousExecutor
from fedhub.outbox.store import encode


@implementer(IBus)
class InstantBus:
    """
    A bus whose broker confirms every message at once.
    """

    def __init__(self) -> None:
        self.domain = "bench"
        self.exchange = "amq.topic"
        self.connected = True
        self.published = 0

    def declare(self, topology: Any) -> Deferred[None]:
        return succeed(None)

    def publish(self, message: Message, exchange: str | None = None, routing_key: str | None = None) -> Deferred[None]:
        self.published += 1
        return succeed(None)

    def subscribe(self, queue: str, on_delivery: Any, prefetch: int) -> Deferred[Any]:
        raise NotImplementedError("the benchmark bus does not deliver")


def make_messages(count: int) -> list[Message]:
    """
    Messages about the size of a Bugzilla update (about 700 bytes stored).
    """
    return [
        Message.create(
            "org.fedoraproject.prod.bugzilla.bug.update",
            {
                "bug": {
                    "id": 100000 + n,
                    "summary": "kernel panics on resume from suspend with the new driver " * 3,
                    "product": "Fedora",
                    "component": "kernel",
                    "status": "NEW",
                },
                "event": {
                    "who": "jdoe@example.org",
                    "changes": [{"field": "status", "added": "NEW", "removed": "ASSIGNED"}],
                },
            },
            headers={"fedora_messaging_user_jdoe": True},
        )
        for n in range(count)
    ]


async def _until(reactor: Any, condition: Any) -> None:
    while not condition():
        await task.deferLater(reactor, 0.001, lambda: None)


async def live(reactor: Any, args: argparse.Namespace, directory: str) -> None:
    messages = make_messages(args.messages)
    # The benchmark holds every message at once, which a hub never does:
    # keep the collector from walking them over and over.
    gc.freeze()
    bus = InstantBus()
    outbox = Outbox(
        "bench",
        directory,
        bus,
        reactor,
        window=args.window,
        max_messages=args.messages + 1,
        max_waiting=max(10_000, args.concurrency),
    )
    confirmed = [0]
    outbox.add_observer(lambda event, message_id: confirmed.__setitem__(0, confirmed[0] + 1))
    outbox.startService()
    await _until(reactor, lambda: outbox.store.is_open)
    pending = iter(messages)
    latencies: list[float] = []
    handed = Deferred[None]()
    remaining = [len(messages)]
    errors: list[Any] = []

    def next_one() -> None:
        message = next(pending, None)
        if message is None:
            return
        began = time.perf_counter()

        def done(result: object) -> None:
            latencies.append(time.perf_counter() - began)
            remaining[0] -= 1
            if remaining[0] == 0:
                handed.callback(None)
            else:
                next_one()

        def failed(failure: Any) -> None:
            errors.append(failure)
            remaining[0] -= 1
            if remaining[0] == 0:
                handed.callback(None)

        outbox.publish(message).addCallbacks(done, failed)

    start = time.perf_counter()
    cpu_start = time.process_time()
    thread_start = time.thread_time()
    for _ in range(min(args.concurrency, len(messages))):
        next_one()
    await handed
    handed_at = time.perf_counter() - start
    await _until(reactor, lambda: confirmed[0] >= len(messages) and outbox.store.pending_count == 0)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    reactor_cpu = time.thread_time() - thread_start
    transactions = outbox.store.transactions
    await outbox.stopService()
    if errors:
        print(f"  {len(errors)} hand-overs failed: {errors[0].getErrorMessage()}")
    latencies.sort()
    print(
        f"live:    {len(messages)} messages, {args.concurrency} producers, window {args.window}\n"
        f"  all handed over in {handed_at:.2f}s ({len(messages) / handed_at:,.0f} msg/s)\n"
        f"  confirmed and deleted in {elapsed:.2f}s ({len(messages) / elapsed:,.0f} msg/s end to end)\n"
        f"  {transactions} transactions ({2 * len(messages) / transactions:.1f} inserts+deletes each)\n"
        f"  hand-over latency p50 {statistics.median(latencies) * 1000:.2f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.2f} ms\n"
        f"  CPU per message: {cpu / len(messages) * 1e6:.0f} us in all, "
        f"{reactor_cpu / len(messages) * 1e6:.0f} us in the reactor thread"
    )


async def backlog(reactor: Any, args: argparse.Namespace, directory: str) -> None:
    messages = make_messages(args.messages)
    store = Store(directory, SynchronousExecutor())
    store.open()
    store.commit([(m.id, time.time(), encode(m)) for m in messages])
    store.close()
    count = len(messages)
    del messages
    gc.collect()
    gc.freeze()
    bus = InstantBus()
    outbox = Outbox("bench", directory, bus, reactor, window=args.window)
    start = time.perf_counter()
    cpu_start = time.process_time()
    thread_start = time.thread_time()
    outbox.startService()
    await _until(reactor, lambda: outbox.store.is_open and outbox.store.pending_count == 0)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    reactor_cpu = time.thread_time() - thread_start
    transactions = outbox.store.transactions
    await outbox.stopService()
    print(
        f"backlog: {count} messages read back from disk, window {args.window}\n"
        f"  confirmed and deleted in {elapsed:.2f}s ({count / elapsed:,.0f} msg/s), "
        f"{transactions} transactions\n"
        f"  CPU per message: {cpu / count * 1e6:.0f} us in all, "
        f"{reactor_cpu / count * 1e6:.0f} us in the reactor thread"
    )


async def main(reactor: Any, args: argparse.Namespace) -> None:
    runs = {"live": live, "backlog": backlog}
    for name in args.runs.split(","):
        run = runs[name.strip()]
        directory = tempfile.mkdtemp(prefix="outbox-bench-", dir=args.dir)
        try:
            await run(reactor, args, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--dir", default=None, help="where to put the store (default: the temp dir)")
    parser.add_argument("--runs", default="live,backlog", help="which runs, comma-separated")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
