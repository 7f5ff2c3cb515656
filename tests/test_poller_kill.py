"""
A polling producer in a real hub process killed with SIGKILL in the middle
of its work: the hub started again on the same state directory publishes
every event with no gap, and no more duplicates than one poll's messages
plus the confirm window.

The Koji hub is L{tests.fakes_xmlrpc.FakeKoji} served on this test's reactor
over a loopback socket; the fedhub hub is a C{twistd -n fedhub} process
(L{tests.test_smtp_faults.Hub}) publishing to the shared RabbitMQ, into a
queue of this test's own.  Waiting is done on the reactor, never blocking
it, so the fake Koji hub keeps answering, and always for a condition, never
for a fixed time: a loaded machine only makes it slower.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase

from tests.fakes_xmlrpc import FakeKoji, listen
from tests.test_smtp_faults import BROKER_HOST, BROKER_PORT, Broker, Hub

#: Unconfirmed messages the hub may have when it is killed.
CONFIRM_WINDOW = 10

#: At most this many events (so tag messages) per poll.
EVENT_STEP = 5

#: Seconds between two tag events of the fake Koji hub.
TAG_EVERY = 0.02

#: Seconds any one wait may take before the test fails.
GUARD = 60.0

#: Seconds between two looks while waiting.
POLL = 0.05


class KilledPollerTests(TestCase):
    """
    The Koji poller of a hub killed with SIGKILL while events keep coming.
    """

    #: More than every wait of the test at its longest.
    timeout = 8 * GUARD

    async def wait_for(self, condition: Callable[[], bool], what: str | Callable[[], str],
                       hub: Hub | None = None) -> None:
        deadline = reactor.seconds() + GUARD
        while True:
            if hub is not None and hub.process.poll() is not None:
                self.fail(f"the hub exited ({hub.process.returncode}):\n{hub.output()[-5000:]}")
            if condition():
                return
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what() if callable(what) else what}")
            await deferLater(reactor, POLL, lambda: None)

    def write_config(self, path: Path, state: Path, environment: str, hub_url: str) -> None:
        path.write_text(
            f"""\
[hub]
topic_prefix = "org.example"
environment = "{environment}"
state_dir = "{state}"

[domains.builds]
broker = "amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"
confirm_window = {CONFIRM_WINDOW}

[[producers]]
name = "koji"
plugin = "koji"
domain = "builds"
hub_url = "{hub_url}"
interval = 0.05
jitter = 0.0
builds = false
tasks = "none"
repos = false
event_step = {EVENT_STEP}
timeout = 10.0
""",
            "utf-8",
        )

    async def test_sigkill_while_polling_leaves_no_gap(self) -> None:
        """Killed mid-poll and started again, the hub publishes every tag event, duplicates bounded."""
        broker = Broker()
        self.addCleanup(broker.close)
        environment = f"pollkill{uuid.uuid4().hex[:10]}"
        queue = f"fedhub.test.poller-kill.{environment}"
        broker.channel.queue_declare(queue, durable=True)
        self.addCleanup(lambda: broker.channel.queue_delete(queue) if broker.connection.is_open else None)
        broker.channel.queue_bind(queue, "amq.topic", f"org.example.{environment}.buildsys.#")

        koji = FakeKoji(step=0.001)
        port, url = listen(koji.server, reactor)
        self.addCleanup(port.stopListening)
        builds = [koji.import_build("pkg", "1.0", str(n)) for n in range(2000)]
        tags = ("f24", "f31-updates-pending")
        tagged: list[tuple[int, str]] = []

        def tag_one() -> None:
            build = builds[len(tagged) // len(tags)]
            tag = tags[len(tagged) % len(tags)]
            koji.tag_build(build, tag)
            tagged.append((build, tag))

        directory = Path(self.mktemp()).resolve()
        state = directory / "state"
        state.mkdir(parents=True)
        config = directory / "hub.toml"
        self.write_config(config, state, environment, url)

        first = Hub(config, directory / "first.log")
        self.addCleanup(first.kill)
        # The poller starts at the hub's current event: events come once it has its cursor.
        cursor = state / "components" / "koji" / "cursor.json"
        await self.wait_for(cursor.exists, "the first cursor", first)
        ticker = LoopingCall(tag_one)
        ticker.start(TAG_EVERY)
        self.addCleanup(lambda: ticker.stop() if ticker.running else None)

        await self.wait_for(lambda: broker.depth(queue) >= 40, "40 published tags", first)
        # Killed wherever it is: polling, handing over, publishing or idle.
        first.kill()
        self.assertEqual(first.process.returncode, -signal.SIGKILL)
        killed_at = len(tagged)
        # Events come while no hub runs, however slowly the ticker goes.
        await self.wait_for(lambda: len(tagged) >= killed_at + EVENT_STEP, "tags while down")

        second = Hub(config, directory / "second.log")
        self.addCleanup(second.kill)
        await self.wait_for(lambda: len(tagged) >= killed_at + 60, "more tag events", second)
        ticker.stop()

        published: list[tuple[int, str]] = []
        ids: Counter[str] = Counter()

        def take() -> None:
            """Take every message the queue holds now."""
            while True:
                method, properties, body = broker.channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return
                message = json.loads(body)
                published.append((message["build_id"], message["tag"]))
                ids[properties.message_id] += 1

        def all_published() -> bool:
            # Not the queue's depth: duplicates would make it reach the
            # number of events while the last of them are still to come.
            take()
            return set(tagged) <= set(published)

        def unpublished() -> str:
            return f"the last {len(set(tagged) - set(published))} of {len(tagged)} tag events"

        await self.wait_for(all_published, unpublished, second)
        second.process.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: second.process.poll() is not None, "the hub to stop")
        self.assertEqual(second.process.returncode, 0, second.output()[-5000:])
        # The hub is gone, after the confirms of what it published: the rest
        # of its messages (late duplicates, if any) are in the queue.
        take()

        missing = set(tagged) - set(published)
        self.assertEqual(missing, set(), f"{len(missing)} tag events never published")
        self.assertEqual(set(published) - set(tagged), set())
        duplicates = len(published) - len(set(published))
        # A message published twice keeps its id; the copies are the poll in
        # progress at the kill and the unconfirmed ones.
        self.assertEqual(len(published) - sum(1 for _ in ids), duplicates)
        self.assertLessEqual(duplicates, CONFIRM_WINDOW + EVENT_STEP)
