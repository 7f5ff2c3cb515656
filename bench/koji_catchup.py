"""
How fast the Koji poller catches up with a hub 10,000 events ahead, and what
an idle poll costs.

A fake Koji hub (the one the tests use) runs in a child process on a
loopback port, holding 10,000 events of builds, tags, untags and repos.  A
Koji poller starts from before the first of them (C{backfill_from_event})
and polls until it has caught up, publishing into a counting publisher and
saving its cursor to disk as in production.  Then it polls the idle hub a
number of times.  CPU figures are the poller's process only.

Run:  python bench/koji_catchup.py [--events N] [--idle-polls N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def build_hub(events: int, step: float) -> tuple[Any, int]:
    """
    A fake hub with C{events} events after its recorded starting point, its
    clock moving C{step} seconds per change.
    """
    from tests.fakes_xmlrpc import REPO_READY, FakeKoji

    koji = FakeKoji(step=step)
    first = koji.last_event + 1
    i = 0
    while koji.last_event - first + 1 < events:
        build, _ = koji.start_build(f"pkg{i % 700}", "1.0", f"{i}.fc42")
        koji.finish_build(build)
        koji.tag_build(build, "f24")
        if i % 5 == 0:
            koji.untag_build(build, "f24")
        if i % 20 == 0:
            koji.repo_state(koji.new_repo("f24"), REPO_READY)
        if i % 7 == 0:
            koji.set_task_state(koji.scratch_build(f"tasks/{i}/pkg-1.0-{i}.src.rpm"), 2)
        i += 1
    return koji, first


def serve(events: int, step: float) -> None:
    """
    The child: serve a fake hub and print its URL and first event.
    """
    from twisted.internet import reactor as _reactor

    from tests.fakes_xmlrpc import listen

    reactor: Any = _reactor

    koji, first = build_hub(events, step)
    _, url = listen(koji.server, reactor)
    print(json.dumps({"url": url, "first_event": first,
                      "last_event": koji.last_event, "builds": len(koji.builds),
                      "tag_rows": len(koji.tag_listing), "repos": len(koji.repos),
                      "span": koji.now - koji.events[0][1]}), flush=True)
    reactor.run()


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(events: int, idle_polls: int, step: float) -> None:
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--events", str(events),
                              "--step", str(step)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        hub = json.loads(child.stdout.readline())
        bench(hub, idle_polls)
    finally:
        child.terminate()
        child.wait()


def bench(hub: dict[str, Any], idle_polls: int) -> None:
    from twisted.internet import defer, task
    from twisted.internet import reactor as _reactor
    from zope.interface import implementer

    from fedhub.interfaces import IPublisher
    from fedhub.producers.koji import KojiSettings, KojiSource
    from fedhub.producers.poller import PollingService
    from fedhub.xmlrpc import XMLRPCClient

    reactor: Any = _reactor

    @implementer(IPublisher)
    class Counter:
        domain = "bench"

        def __init__(self) -> None:
            self.count = 0
            self.bytes = 0

        def publish(self, message: Any) -> defer.Deferred[None]:
            self.count += 1
            self.bytes += len(message.body_bytes)
            return defer.succeed(None)

    print(f"fake hub: {hub['last_event'] - hub['first_event'] + 1} events, {hub['builds']} builds, "
          f"{hub['tag_rows']} tag rows, {hub['repos']} repos, {hub['span'] / 3600:.1f} h of "
          "hub time")
    client = XMLRPCClient(hub["url"], reactor, multicall_method="multiCall", timeout=60.0)
    settings = KojiSettings.for_hub(hub["url"], backfill_from_event=hub["first_event"] - 1,
                                    tasks="scratch")
    source = KojiSource("bench", client, settings, lambda s: "org.example.bench." + s)
    publisher = Counter()
    state = tempfile.mkdtemp(prefix="fedhub-bench-")
    service = PollingService("bench", source, publisher, reactor, state, interval=3600.0)
    polls: list[Any] = []
    original = source.poll

    def record(result: Any) -> Any:
        polls.append(result)
        return result

    def counting_poll(cursor: Any) -> Any:
        return original(cursor).addCallback(record)

    source.poll = counting_poll  # type: ignore[method-assign]

    @defer.inlineCallbacks
    def main() -> Any:
        wall, used, calls = time.perf_counter(), cpu(), client.calls
        service.startService()
        while not polls or polls[-1].more or service.status()["state"] != "waiting":
            yield task.deferLater(reactor, 0.005, lambda: None)
        wall, used = time.perf_counter() - wall, cpu() - used
        print(f"catch-up: {publisher.count} messages in {len(polls)} polls, "
              f"{client.calls - calls} HTTP requests, {client.bytes_received / 1e6:.1f} MB read")
        print(f"  wall {wall:.2f} s, poller CPU {used:.2f} s, "
              f"{publisher.count / wall:.0f} msg/s, {1e3 * used / publisher.count:.3f} ms CPU/msg")
        cursor = service.cursor
        yield service.stopService()
        # Idle polls: the hub has nothing new.
        idle_client = XMLRPCClient(hub["url"], reactor, multicall_method="multiCall")
        idle = KojiSource("bench", idle_client, settings, lambda s: "org.example.bench." + s)
        yield idle.poll(cursor)  # warm the connection
        calls, read = idle_client.calls, idle_client.bytes_received
        wall, used = time.perf_counter(), cpu()
        for _ in range(idle_polls):
            result = yield idle.poll(cursor)
            assert not result.messages
        wall, used = time.perf_counter() - wall, cpu() - used
        n = idle_polls
        print(f"idle poll: {(idle_client.calls - calls) / n:.1f} HTTP requests, "
              f"{(idle_client.bytes_received - read) / n / 1e3:.1f} kB read, "
              f"wall {1e3 * wall / n:.2f} ms, poller CPU {1e3 * used / n:.2f} ms")
        yield idle.close()

    def done(result: Any) -> None:
        if hasattr(result, "printTraceback"):
            result.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: main().addBoth(done))
    reactor.run()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--idle-polls", type=int, default=50)
    parser.add_argument("--step", type=float, default=5.0,
                        help="seconds of hub time per change (default 5: one build about "
                             "every 15 s; smaller is a busier hub)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    args = parse()
    if args.serve:
        serve(args.events, args.step)
    else:
        run(args.events, args.idle_polls, args.step)
