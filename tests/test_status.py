"""
Tests for L{fedhub.status}: the status server's resources, its metrics and
its live feed, on real outboxes, buses and consumer runners driven by a fake
clock; and the service on a real socket in front of a real hub.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
import socket
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import treq
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.config import ComponentConfig, DomainConfig, parse_config
from fedhub.consumers.log import LogPlugin
from fedhub.consumers.runner import ConsumerService
from fedhub.errors import DeadLetter, Halt
from fedhub.hub import DomainRuntime, Hub
from fedhub.interfaces import IMessageHandler
from fedhub.logs import log_level, set_log_level
from fedhub.message import Message
from fedhub.outbox import Outbox
from fedhub.outbox.store import SynchronousExecutor
from fedhub.status import CONTENT_SECURITY_POLICY, HubMonitor, RecentMessages, StatusService, readiness
from fedhub.status.metrics import NOT_CONNECTED_YET, Activity
from fedhub.status.web import Assets, LiveFeed, build_resource, dumps_json
from tests.test_amqp_bus import BusCase

HOSTILE_TOPIC = "org.example.dev.<img/src=x/onerror=alert(1)>.\"'&\x1b[31m"
HOSTILE_SUMMARY = "</td><script>alert('x')</script>&amp; \"q\" \x07\u2028end"


@implementer(IMessageHandler)
class ScriptedHandler:
    """
    A handler steered by the message body: C{halt} raises L{Halt}, C{dead}
    raises L{DeadLetter}, C{delay} answers after that many clock seconds.
    """

    topics = ("#",)

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.reopened = 0

    def handle(self, message: Message) -> Any:
        if message.body.get("halt"):
            raise Halt("told to halt")
        if message.body.get("dead"):
            raise DeadLetter("told to dead-letter")
        delay = message.body.get("delay")
        if delay:
            return deferLater(self.clock, float(delay), lambda: None)
        return None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def reopen(self) -> None:
        self.reopened += 1


class FakePoller(Service):
    """
    A producer with a poller's C{status()}.
    """

    def __init__(self, last_error: str = "connection refused") -> None:
        self.last_success = 90.0
        self.info: dict[str, Any] = {
            "name": "koji",
            "source": "https://koji.example/kojihub",
            "state": "waiting",
            "polls": 7,
            "errors": 2,
            "consecutive_errors": 1,
            "published": 30,
            "dropped": 1,
            "lag": 12.5,
            "last_error": {"time": "1970-01-01T00:01:40+00:00", "error": last_error},
        }

    def status(self) -> dict[str, Any]:
        return dict(self.info)


class FakeListener(Service):
    """
    A producer with the SMTP listener's C{counters}.
    """

    port = None

    def __init__(self) -> None:
        self.counters = {
            "connections": 9,
            "connections_refused_network": 2,
            "mails_published": 5,
            "mails_duplicate": 1,
            "mails_refused_content": 3,
            "mails_refused_limit": 1,
            "recipients_refused": 4,
        }


class FakePool:
    """
    The parse workers of an SMTP listener, as the metrics read them.
    """

    workers = 2
    ready_workers = 1
    queued = 3

    def __init__(self) -> None:
        self.counters = {"parsed": 40, "refused": 2, "busy": 0, "timeouts": 1, "crashes": 1, "restarts": 1}


class PooledListener(FakeListener):
    """
    An SMTP listener with parse workers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = FakePool()


class BrokenProducer(Service):
    """
    A producer whose status can not be read.
    """

    def status(self) -> dict[str, Any]:
        raise RuntimeError("broken status")


@dataclass
class FakeHub:
    """
    What the status server reads of a hub, built from real components.
    """

    domains: dict[str, DomainRuntime] = field(default_factory=dict)
    consumers: dict[str, ConsumerService] = field(default_factory=dict)
    producers: dict[str, Any] = field(default_factory=dict)
    start_failures: dict[str, str] = field(default_factory=dict)


@dataclass
class AMQPLikeStats:
    connections: int = 0
    undecodable: int = 0


class AMQPLikeBus:
    """
    The parts of an AMQP bus the status server reads.
    """

    exchange = "amq.topic"

    def __init__(self, connected: bool, error: BaseException | None, connections: int) -> None:
        self.connected = connected
        self.blocked = False
        self.last_error = error
        self.stats = AMQPLikeStats(connections)


class World:
    """
    One memory domain C{one} with its outbox and a consumer C{a} on C{#},
    all on a fake clock, plus a status monitor and recent list.
    """

    def __init__(self, case: SynchronousTestCase, producers: dict[str, Any] | None = None,
                 consumer_name: str = "a") -> None:
        self.case = case
        self.clock = Clock()
        self.bus = MemoryBus("one", clock=self.clock)
        self.outbox = Outbox(
            "one", case.mktemp(), self.bus, self.clock,
            executor=SynchronousExecutor(), random=random.Random(0),
        )
        self.handler = ScriptedHandler(self.clock)
        component = ComponentConfig(
            kind="consumer", index=0, name=consumer_name, plugin="scripted", domain="one",
            options={}, topics=("#",), retry_delay=1.0, max_retries=1,
        )
        self.consumer = ConsumerService(component, self.handler, self.bus, self.clock)
        self.hub = FakeHub(
            {"one": DomainRuntime(DomainConfig(name="one", broker="memory"), self.bus, self.outbox)},
            {consumer_name: self.consumer},
            producers or {},
        )
        self.monitor = HubMonitor(self.hub, self.clock)
        self.recent = RecentMessages(100)
        self.monitor.add_listener(self.recent)
        self.assets = Assets.load()
        self.feed = LiveFeed(self.recent, self.view, self.clock, max_streams=2, interval=2.0, batch_delay=0.2)
        self.resource = build_resource(self.hub, self.monitor, self.recent, self.clock, self.assets, self.feed)
        self.http = StubTreq(self.resource)
        self.started = False

    def view(self) -> dict[str, Any]:
        from fedhub.status.web import status_view

        return status_view(self.hub, self.monitor, self.clock.seconds())

    def start(self) -> None:
        self.bus.startService()
        self.outbox.startService()
        self.consumer.startService()
        self.monitor.attach()
        self.started = True
        self.turn()
        self.case.addCleanup(self.stop)

    def stop(self) -> None:
        self.feed.close()
        self.monitor.detach()
        self.consumer.stopService()
        self.turn()
        self.outbox.stopService()
        self.turn()
        self.bus.stopService()
        self.turn()

    def turn(self) -> None:
        for _ in range(20):
            self.clock.advance(0)

    def publish(self, topic: str = "org.example.dev.thing.done", **body: Any) -> Message:
        message = Message.create(topic, body)
        self.case.successResultOf(self.outbox.publish(message))
        self.turn()
        return message

    def get(
        self, path: str, headers: dict[bytes, list[bytes]] | None = None, host: str = "localhost"
    ) -> tuple[Any, bytes]:
        response = self.case.successResultOf(
            self.http.get(f"http://{host}{path}", headers=Headers(headers or {}))
        )
        body = self.case.successResultOf(response.content())
        return response, body

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """
        Scrape C{/metrics} and parse it: by sample name, by sorted labels.
        """
        response, body = self.get("/metrics")
        self.case.assertEqual(response.code, 200)
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return samples


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


class TagCollector(HTMLParser):
    """
    Every start tag of a document with its attributes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


class FakeStreamRequest:
    """
    The parts of a Twisted request an event stream uses, recording writes and
    the producer it is given.
    """

    def __init__(
        self, last_event_id: str | None = None, after: str | None = None, epoch: str | None = None
    ) -> None:
        self.method = b"GET"
        self.headers: dict[bytes, bytes] = {}
        self.request_headers = {b"last-event-id": last_event_id.encode("latin-1")} if last_event_id else {}
        self.args = {b"after": [after.encode()]} if after is not None else {}
        if epoch is not None:
            self.args[b"epoch"] = [epoch.encode()]
        self.code = 200
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self._finish_waiters: list[Deferred[None]] = []

    def getHeader(self, name: bytes) -> bytes | None:
        return self.request_headers.get(name.lower())

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def write(self, data: bytes) -> None:
        assert not self.finished, "write after finish"
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._finish_waiters.append(d)
        return d

    def finish(self) -> None:
        self.finished = True
        waiters, self._finish_waiters = self._finish_waiters, []
        for d in waiters:
            d.callback(None)

    def lose(self) -> None:
        """The client went away."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        if self.producer is not None:
            self.producer.stopProducing()
        waiters, self._finish_waiters = self._finish_waiters, []
        for d in waiters:
            d.errback(Failure(ConnectionDone()))

    def events(self) -> list[tuple[str | None, str, Any]]:
        """
        The events written so far: (id, kind, data).
        """
        found = []
        for block in b"".join(self.written).decode("ascii").split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if ": " in line:
                    key, value = line.split(": ", 1)
                    fields[key] = value
            if "event" in fields:
                found.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
        return found


class LiveTests(SynchronousTestCase):
    """
    C{/live}.
    """

    def test_live(self) -> None:
        """/live answers 200 ok whatever the hub's state."""
        world = World(self)
        response, body = world.get("/live")
        self.assertEqual((response.code, body), (200, b"ok\n"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])

    def test_other_host_names_refused(self) -> None:
        """A request naming another host (a DNS-rebinding page) gets 421 and no status."""
        world = World(self)
        for path in ("/live", "/ready", "/", "/status.json", "/static/status.js"):
            response, body = world.get(path, host="attacker.example")
            self.assertEqual(response.code, 421, path)
            self.assertNotIn(b"fedhub", body)
        response, _ = world.get("/ready", host="127.0.0.1:8070")
        self.assertIn(response.code, (200, 503))

    def test_head(self) -> None:
        """
        HEAD is answered like GET, with its headers and the length of its
        body but no body, and without logging anything (a load balancer
        probing with HEAD must not fill the log).
        """
        world = World(self)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for path in ("/live", "/ready", "/metrics", "/status.json", "/recent.json", "/"):
            response = self.successResultOf(world.http.head(f"http://localhost{path}"))
            got, body = world.get(path)
            self.assertEqual(response.code, got.code, path)
            self.assertEqual(self.successResultOf(response.content()), b"", path)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                             got.headers.getRawHeaders(b"content-type"), path)
            if path in ("/live", "/ready", "/recent.json"):
                self.assertEqual(response.headers.getRawHeaders(b"content-length"),
                                 [str(len(body)).encode()], path)
        eaten = [e for e in events if "eat it" in str(e.get("log_format") or e.get("format") or "")]
        self.assertEqual(eaten, [])

    def test_post_refused(self) -> None:
        """Other methods are refused with 405."""
        world = World(self)
        response = self.successResultOf(world.http.post("http://localhost/ready", data=b"x"))
        self.assertEqual(response.code, 405)

    def test_unknown_path(self) -> None:
        """An unknown path is 404."""
        world = World(self)
        response, _ = world.get("/nope")
        self.assertEqual(response.code, 404)


class ReadyTests(SynchronousTestCase):
    """
    C{/ready} follows the buses and the consumers.
    """

    def ready(self, world: World) -> tuple[int, dict[str, Any]]:
        response, body = world.get("/ready")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(body)

    def test_not_ready_before_start(self) -> None:
        """Before anything runs the hub is not ready, and the body says why."""
        world = World(self)
        code, body = self.ready(world)
        self.assertEqual(code, 503)
        self.assertFalse(body["ready"])
        self.assertEqual(body["domains"]["one"]["connected"], False)
        self.assertEqual(body["domains"]["one"]["transport"], "memory")
        self.assertEqual(
            body["consumers"]["a"],
            {"ready": False, "domain": "one", "consuming": False, "halted": False,
             "error": "domain one is not connected"},
        )
        # A memory bus has no attempts to tell of.
        self.assertIsNone(body["domains"]["one"]["error"])

    def test_ready_once_running(self) -> None:
        """With the bus connected and the consumer consuming the answer is 200."""
        world = World(self)
        world.start()
        code, body = self.ready(world)
        self.assertEqual(code, 200)
        self.assertEqual(body["ready"], True)
        self.assertEqual(body["domains"]["one"]["ready"], True)
        self.assertEqual(body["consumers"]["a"]["consuming"], True)

    def test_halted_consumer(self) -> None:
        """A consumer halted by its handler makes the hub not ready."""
        world = World(self)
        world.start()
        world.publish(halt=True)
        code, body = self.ready(world)
        self.assertEqual(code, 503)
        self.assertEqual(body["consumers"]["a"]["halted"], True)
        # It says why: the message it halted on, and the handler's reason.
        error = body["consumers"]["a"]["error"]
        self.assertTrue(error.startswith("halted on ") and error.endswith(": told to halt"), error)
        self.assertEqual(body["domains"]["one"]["ready"], True)

    def test_bus_down_and_back(self) -> None:
        """
        A stopped bus turns the answer to 503, its consumer not consuming;
        started again, its domain is ready and the consumer's subscription
        consumes again, and the answer is 200.
        """
        world = World(self)
        world.start()
        self.assertEqual(self.ready(world)[0], 200)
        world.bus.stopService()
        code, body = self.ready(world)
        self.assertEqual(code, 503)
        self.assertEqual(body["domains"]["one"]["connected"], False)
        self.assertEqual(body["consumers"]["a"]["consuming"], False)
        world.bus.startService()
        code, body = self.ready(world)
        self.assertEqual(body["domains"]["one"]["ready"], True)
        self.assertEqual(body["consumers"]["a"]["consuming"], True)
        self.assertEqual(code, 200)

    def test_producer_that_did_not_start(self) -> None:
        """
        A producer whose start failed (the hub runs without it) makes the
        answer 503, with the error in the details and the status page's
        headline; one that runs is ready.
        """
        good, bad = Service(), Service()
        good.setName("producer:good")
        bad.setName("producer:mail")
        world = World(self, producers={"good": good, "mail": bad})
        world.start()
        good.startService()
        code, body = self.ready(world)
        self.assertEqual(code, 200)
        self.assertEqual(body["producers"]["good"], {"ready": True, "running": True, "error": None})
        self.assertEqual(body["producers"]["mail"], {"ready": True, "running": False, "error": None})
        bad.startService()
        world.hub.start_failures["producer:mail"] = "TLSFilesError: /x/key.pem: holds no\x1b PEM certificate"
        code, body = self.ready(world)
        self.assertEqual(code, 503)
        self.assertEqual(body["producers"]["mail"]["ready"], False)
        # Marked running by its start, which then raised: not running.
        self.assertEqual(body["producers"]["mail"]["running"], False)
        running = world.metrics()["fedhub_producer_running"]
        self.assertEqual(running[labels(producer="mail")], 0.0)
        self.assertEqual(running[labels(producer="good")], 1.0)
        self.assertEqual(body["producers"]["mail"]["error"],
                         "TLSFilesError: /x/key.pem: holds no\\x1b PEM certificate")
        self.assertIn("producer mail did not start", world.view()["headline"])
        del world.hub.start_failures["producer:mail"]
        self.assertEqual(self.ready(world)[0], 200)
        # A service that started but could not listen says so itself.
        bad.start_error = "could not listen on tcp:8025: Address already in use"  # type: ignore[attr-defined]
        code, body = self.ready(world)
        self.assertEqual(code, 503)
        self.assertEqual(body["producers"]["mail"]["error"],
                         "could not listen on tcp:8025: Address already in use")
        # Running as a service, but not listening: not running, anywhere.
        self.assertEqual(body["producers"]["mail"]["running"], False)
        self.assertEqual(world.metrics()["fedhub_producer_running"][labels(producer="mail")], 0.0)
        [row] = [r for section in world.view()["sections"] if section["id"] == "producers"
                 for r in section["rows"] if r[0][0] == "mail"]
        self.assertEqual(row[2], ["stopped", "bad"])
        self.assertEqual(row[4][0], "could not listen on tcp:8025: Address already in use")
        bad.start_error = None  # type: ignore[attr-defined]
        self.assertEqual(self.ready(world)[0], 200)

    def test_publishing_refused(self) -> None:
        """
        A domain whose broker refuses its publishes (403: they go to the
        failed area) is not ready while the refusal holds; the body and the
        headline say so.
        """
        world = World(self)
        world.start()
        self.assertEqual(self.ready(world)[0], 200)
        world.bus.publish_refused = "403 ACCESS_REFUSED - write access to exchange\x1b"  # type: ignore[attr-defined]
        code, body = self.ready(world)
        self.assertEqual(code, 503)
        self.assertEqual(body["domains"]["one"]["ready"], False)
        self.assertEqual(body["domains"]["one"]["publish_refused"],
                         "403 ACCESS_REFUSED - write access to exchange\\x1b")
        self.assertIn("the broker refuses publishing in domain one", world.view()["headline"])
        world.bus.publish_refused = None  # type: ignore[attr-defined]
        self.assertEqual(self.ready(world)[0], 200)

    def test_outbox_that_can_not_open(self) -> None:
        """
        A domain whose outbox can not be opened (here its directory is a
        file) refuses every hand-over: /ready answers 503 with why, naming
        the store; once it opens, the domain is ready again.
        """
        world = World(self)
        directory = world.outbox.store.directory
        with open(directory, "w") as f:
            f.write("not a directory")
        world.start()
        code, body = self.ready(world)
        self.assertEqual(code, 503)
        one = body["domains"]["one"]
        self.assertEqual((one["ready"], one["connected"]), (False, True))
        self.assertTrue(one["outbox_error"].startswith(
            f"the outbox of domain one can not open {directory}/outbox.sqlite3: "), one)
        self.assertEqual(world.view()["headline"], "Not ready: the outbox of domain one can not be used")
        os.remove(directory)
        for _ in range(100):
            world.clock.advance(1)
            if world.outbox.store.is_open:
                break
        code, body = self.ready(world)
        self.assertEqual(code, 200)
        self.assertIsNone(body["domains"]["one"]["outbox_error"])
        self.flushLoggedErrors()

    def test_consumer_start_error_shown(self) -> None:
        """A consumer waiting to try its start again says why in /ready."""
        world = World(self)
        world.start()
        world.consumer.start_error = "AccessRefused: 403 ACCESS_REFUSED\x1b"
        self.assertEqual(self.ready(world)[1]["consumers"]["a"]["error"],
                         "AccessRefused: 403 ACCESS_REFUSED\\x1b")

    def test_consumer_queue_gone_shown(self) -> None:
        """A consumer whose broker does not let it consume (its queue deleted) says why in /ready."""
        world = World(self)
        world.start()
        subscription: Any = world.consumer._subscription
        subscription.last_error = "404 NOT_FOUND - no queue 'fedhub.a'"
        code, body = self.ready(world)
        self.assertEqual(body["consumers"]["a"]["error"], "404 NOT_FOUND - no queue 'fedhub.a'")
        subscription.last_error = None
        self.assertIsNone(self.ready(world)[1]["consumers"]["a"]["error"])

    def test_connection_error_shown(self) -> None:
        """A bus's last connection error is in the details, control characters escaped."""
        bus = AMQPLikeBus(False, ConnectionRefusedError("refused\r\nX-Forged: yes"), 0)
        hub = FakeHub({"two": DomainRuntime(DomainConfig(name="two", broker="amqp://h/"), bus, object())})
        check = readiness(hub)  # type: ignore[arg-type]
        self.assertFalse(check.ready)
        self.assertEqual(check.domains["two"]["transport"], "amqp")
        self.assertEqual(check.domains["two"]["blocked"], False)
        self.assertEqual(check.domains["two"]["error"], "refused\\r\\nX-Forged: yes")

    def test_first_attempt_pending_shown(self) -> None:
        """
        A domain not connected yet, with no failed attempt (the first one
        waits for a broker that may hang), says so instead of a null error.
        """
        bus = AMQPLikeBus(False, None, 0)
        hub = FakeHub({"two": DomainRuntime(DomainConfig(name="two", broker="amqp://h/"), bus, object())})
        check = readiness(hub)  # type: ignore[arg-type]
        self.assertFalse(check.ready)
        self.assertEqual(check.domains["two"]["error"], NOT_CONNECTED_YET)
        bus.connected = True
        self.assertIsNone(readiness(hub).domains["two"]["error"])  # type: ignore[arg-type]

    def test_empty_hub_ready(self) -> None:
        """A hub with nothing to wait for is ready."""
        self.assertTrue(readiness(FakeHub()).ready)  # type: ignore[arg-type]


class AMQPConsumerReadyTests(BusCase):
    """
    C{/ready} follows whether a consumer on an AMQP bus (a scripted broker)
    consumes, not only whether it subscribed once.
    """

    def setUp(self) -> None:
        super().setUp()
        component = ComponentConfig(
            kind="consumer", index=0, name="a", plugin="scripted", domain="infra",
            options={}, topics=("#",),
        )
        self.consumer = ConsumerService(component, ScriptedHandler(self.clock), self.bus, self.clock)
        hub = FakeHub(
            {"infra": DomainRuntime(DomainConfig(name="infra", broker="amqp://h/"), self.bus, object())},
            {"a": self.consumer},
        )
        monitor = HubMonitor(hub, self.clock)
        recent = RecentMessages(100)
        feed = LiveFeed(recent, lambda: {}, self.clock, max_streams=1, interval=2.0, batch_delay=0.2)
        self.addCleanup(feed.close)
        resource = build_resource(hub, monitor, recent, self.clock, Assets.load(), feed)  # type: ignore[arg-type]
        self.http = StubTreq(resource)
        self.consumer.startService()
        self.broker.pump()

    def ready(self) -> tuple[int, dict[str, Any]]:
        response = self.successResultOf(self.http.get("http://localhost/ready"))
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_not_ready_until_consuming_again(self) -> None:
        """
        After a reconnect whose consume fails (its queue is gone) the bus is
        connected but the consumer does not consume: C{/ready} says 503 until
        it consumes again, then 200.
        """
        self.assertEqual(self.ready()[0], 200)
        gone = {("basic.consume", "fedhub.a"): (404, "NOT_FOUND - no queue")}
        self.endpoint.configure = lambda broker: broker.failures.update(gone)
        self.lose()
        self.reconnect()
        code, body = self.ready()
        self.assertTrue(self.bus.connected)
        self.assertEqual(code, 503)
        self.assertEqual(body["consumers"]["a"]["consuming"], False)
        self.assertEqual(body["consumers"]["a"]["halted"], False)
        # Steps that do not match the backoff delays, and one long jump.
        for _ in range(3):
            self.clock.advance(10.0)
            self.broker.pump()
            self.assertEqual(self.ready()[0], 503)
        del self.broker.failures[("basic.consume", "fedhub.a")]
        self.clock.advance(60.0)
        self.broker.pump()
        self.assertEqual(self.ready()[0], 200)
        self.assertEqual(len(self.endpoint.brokers), 2)

    def test_not_ready_after_broker_cancel(self) -> None:
        """
        While a consumer the broker cancelled waits to consume again,
        C{/ready} says 503.
        """
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        self.broker.failures[("basic.consume", "fedhub.a")] = (404, "NOT_FOUND - no queue")
        self.broker.send(self.broker.frame(self.broker.consumers[tag], "basic.cancel", consumer_tag=tag))
        self.assertEqual(self.ready()[0], 503)
        del self.broker.failures[("basic.consume", "fedhub.a")]
        self.clock.advance(2.0)
        self.broker.pump()
        self.assertEqual(self.ready()[0], 200)


class MetricsTests(SynchronousTestCase):
    """
    C{/metrics}: Prometheus text read from the hub at scrape time.
    """

    def test_domain_and_consumer_counters(self) -> None:
        """Published, confirmed and consumer outcomes are counted per domain and consumer."""
        world = World(self)
        world.start()
        world.publish()
        world.publish(dead=True)
        world.clock.advance(5)
        m = world.metrics()
        one = labels(domain="one")
        a = labels(consumer="a", domain="one")
        self.assertEqual(m["fedhub_outbox_published_total"][one], 2)
        self.assertEqual(m["fedhub_outbox_confirmed_total"][one], 2)
        self.assertEqual(m["fedhub_outbox_returned_total"][one], 0)
        self.assertEqual(m["fedhub_outbox_nacked_total"][one], 0)
        self.assertEqual(m["fedhub_outbox_depth_messages"][one], 0)
        self.assertEqual(m["fedhub_consumer_consumed_total"][a], 2)
        self.assertEqual(m["fedhub_consumer_acked_total"][a], 1)
        self.assertEqual(m["fedhub_consumer_dead_lettered_total"][a], 1)
        self.assertEqual(m["fedhub_consumer_retried_total"][a], 0)
        self.assertEqual(m["fedhub_consumer_in_flight"][a], 0)
        self.assertEqual(m["fedhub_consumer_consuming"][a], 1)
        self.assertEqual(m["fedhub_bus_connected"][one], 1)
        self.assertEqual(m["fedhub_bus_reconnects_total"][one], 0)
        self.assertEqual(m["fedhub_ready"][()], 1)
        self.assertEqual(m["fedhub_last_message_age_seconds"][labels(domain="one", direction="published")], 5)
        self.assertEqual(m["fedhub_last_message_age_seconds"][labels(domain="one", direction="consumed")], 5)

    def test_handling_time(self) -> None:
        """Handler calls are timed into the histogram and counted in flight while they run."""
        world = World(self)
        world.start()
        world.publish(delay=0.3)
        world.publish(delay=0.3)
        a = labels(consumer="a")
        m = world.metrics()
        self.assertEqual(m["fedhub_consumer_in_flight"][labels(consumer="a", domain="one")], 1)
        self.assertEqual(m["fedhub_consumer_waiting"][labels(consumer="a", domain="one")], 1)
        self.assertEqual(m["fedhub_consumer_handling_seconds_count"][a], 0)
        world.clock.advance(0.3)
        world.turn()
        m = world.metrics()
        # The first call ended; the second message is handled now.
        self.assertEqual(m["fedhub_consumer_in_flight"][labels(consumer="a", domain="one")], 1)
        self.assertEqual(m["fedhub_consumer_waiting"][labels(consumer="a", domain="one")], 0)
        self.assertEqual(m["fedhub_consumer_handling_seconds_count"][a], 1)
        world.clock.advance(0.3)
        world.turn()
        m = world.metrics()
        self.assertEqual(m["fedhub_consumer_in_flight"][labels(consumer="a", domain="one")], 0)
        self.assertEqual(m["fedhub_consumer_handling_seconds_count"][a], 2)
        self.assertAlmostEqual(m["fedhub_consumer_handling_seconds_sum"][a], 0.6)
        self.assertEqual(m["fedhub_consumer_handling_seconds_bucket"][labels(consumer="a", le="0.25")], 0)
        self.assertEqual(m["fedhub_consumer_handling_seconds_bucket"][labels(consumer="a", le="0.5")], 2)

    def test_outbox_backlog(self) -> None:
        """With the bus down the outbox depth and the oldest message's age grow."""
        world = World(self)
        world.start()
        world.bus.stopService()
        world.publish()
        world.clock.advance(7)
        m = world.metrics()
        one = labels(domain="one")
        self.assertEqual(m["fedhub_outbox_depth_messages"][one], 1)
        self.assertEqual(m["fedhub_outbox_oldest_age_seconds"][one], 7)
        self.assertEqual(m["fedhub_outbox_paused"][one], 1)
        self.assertEqual(m["fedhub_bus_connected"][one], 0)
        self.assertEqual(m["fedhub_ready"][()], 0)
        # Cancel the outbox's retry timer before the clock is dropped.
        world.bus.startService()
        world.clock.advance(20)
        world.turn()
        self.assertEqual(world.metrics()["fedhub_outbox_depth_messages"][one], 0)

    def test_pollers_and_mail(self) -> None:
        """Pollers report polls, errors and lag; SMTP listeners mails by outcome and reason."""
        world = World(self, producers={"koji": FakePoller(), "mail": FakeListener()})
        world.start()
        world.clock.advance(100)
        m = world.metrics()
        koji = labels(producer="koji")
        self.assertEqual(m["fedhub_poller_polls_total"][koji], 7)
        self.assertEqual(m["fedhub_poller_errors_total"][koji], 2)
        self.assertEqual(m["fedhub_poller_lag_seconds"][koji], 12.5)
        self.assertEqual(m["fedhub_poller_consecutive_errors"][koji], 1)
        self.assertEqual(m["fedhub_poller_last_success_age_seconds"][koji], 10)
        self.assertEqual(m["fedhub_smtp_mails_accepted_total"][labels(producer="mail", outcome="published")], 5)
        self.assertEqual(m["fedhub_smtp_mails_accepted_total"][labels(producer="mail", outcome="quarantined")], 0)
        self.assertEqual(m["fedhub_smtp_mails_refused_total"][labels(producer="mail", reason="content")], 3)
        self.assertEqual(m["fedhub_smtp_mails_refused_total"][labels(producer="mail", reason="limit")], 1)
        self.assertEqual(m["fedhub_smtp_connections_total"][labels(producer="mail")], 9)
        self.assertEqual(
            m["fedhub_smtp_connections_refused_total"][labels(producer="mail", reason="network")], 2
        )
        self.assertEqual(
            m["fedhub_smtp_events_total"][labels(producer="mail", event="recipients_refused")], 4
        )

    def test_parse_workers(self) -> None:
        """An SMTP listener's parse workers report how many run, the mails waiting and their events; a listener without them reports none."""
        world = World(self, producers={"mail": PooledListener(), "plain": FakeListener()})
        world.start()
        m = world.metrics()
        mail = labels(producer="mail")
        self.assertEqual(m["fedhub_smtp_parse_workers"][mail], 2)
        self.assertEqual(m["fedhub_smtp_parse_workers_ready"][mail], 1)
        self.assertEqual(m["fedhub_smtp_parse_queued"][mail], 3)
        self.assertEqual(m["fedhub_smtp_parse_events_total"][labels(producer="mail", event="parsed")], 40)
        self.assertEqual(m["fedhub_smtp_parse_events_total"][labels(producer="mail", event="crashes")], 1)
        self.assertNotIn(labels(producer="plain"), m["fedhub_smtp_parse_workers"])
        self.assertEqual(m["fedhub_smtp_mails_accepted_total"][labels(producer="plain", outcome="published")], 5)

    def test_reconnects(self) -> None:
        """Reconnects are the bus's connections after its first."""
        bus = AMQPLikeBus(True, None, 3)
        hub = FakeHub({"two": DomainRuntime(DomainConfig(name="two", broker="amqp://h/"), bus, object())})
        monitor = HubMonitor(hub, Clock())
        text = monitor.render()[0].decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        self.assertEqual(samples[("fedhub_bus_reconnects_total", labels(domain="two"))], 2)
        self.assertEqual(samples[("fedhub_bus_blocked", labels(domain="two"))], 0)

    def test_undecodable(self) -> None:
        """
        Deliveries the bus rejected as no valid message (from a publisher
        elsewhere), which no consumer ever sees, are counted by domain.
        """
        bus = AMQPLikeBus(True, None, 1)
        bus.stats.undecodable = 4
        hub = FakeHub({"two": DomainRuntime(DomainConfig(name="two", broker="amqp://h/"), bus, object())})
        monitor = HubMonitor(hub, Clock())
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(monitor.render()[0].decode())
            for s in f.samples
        }
        self.assertEqual(samples[("fedhub_bus_undecodable_total", labels(domain="two"))], 4)

    def test_undecodable_absent_without_count(self) -> None:
        """A bus that does not count them (the memory bus) has no such sample."""
        world = World(self)
        world.start()
        self.assertNotIn("fedhub_bus_undecodable_total", world.metrics())

    def test_failing_component_left_out(self) -> None:
        """A producer whose numbers can not be read is logged; the scrape goes on."""
        world = World(self, producers={"broken": BrokenProducer()})
        world.start()
        m = world.metrics()
        self.assertEqual(m["fedhub_bus_connected"][labels(domain="one")], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_openmetrics(self) -> None:
        """A scraper asking for OpenMetrics gets it."""
        world = World(self)
        response, body = world.get("/metrics", {b"accept": [b"application/openmetrics-text; version=1.0.0"]})
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
        )
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_own_registry(self) -> None:
        """Each monitor has its own registry; the global one gets nothing."""
        first, second = World(self), World(self)
        self.assertIsNot(first.monitor.registry, second.monitor.registry)
        self.assertIsNone(REGISTRY.get_sample_value("fedhub_ready"))
        self.assertEqual(first.monitor.registry.get_sample_value("fedhub_ready"), 0)


class MonitorTests(SynchronousTestCase):
    """
    Attaching to and detaching from a hub.
    """

    def test_handler_not_wrapped(self) -> None:
        """Attaching leaves the consumer's handler as it is: timing comes from its Settled reports."""
        world = World(self)
        world.monitor.attach()
        self.assertIs(world.consumer.handler, world.handler)
        world.monitor.detach()
        self.assertIs(world.consumer.handler, world.handler)

    def test_attach_twice(self) -> None:
        """Attaching again, or after detaching, never reports a message twice."""
        world = World(self)
        world.start()
        world.monitor.attach()
        world.monitor.detach()
        world.monitor.attach()
        world.publish()
        entries = world.recent.entries()
        self.assertEqual([e["source"] for e in entries], ["outbox", "a"])

    def test_detached_hears_nothing(self) -> None:
        """While detached nothing reaches the listeners."""
        world = World(self)
        world.start()
        world.monitor.detach()
        world.publish()
        self.assertEqual(world.recent.entries(), [])

    def test_listener_failure_contained(self) -> None:
        """A failing listener is logged; the others still hear."""
        world = World(self)

        def broken(activity: Activity) -> None:
            raise ValueError("listener bug")

        world.monitor._listeners.insert(0, broken)
        world.start()
        world.publish()
        self.assertEqual(len(world.recent.entries()), 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_no_work_before_start(self) -> None:
        """Building the service touches neither the hub nor the network."""
        world = World(self)
        memory = MemoryReactorClock()
        service = StatusService(world.hub, "tcp:0:interface=127.0.0.1", memory)
        self.assertEqual(memory.tcpServers, [])
        self.assertIs(world.consumer.handler, world.handler)
        self.assertIsNone(service.port)


class RecentTests(SynchronousTestCase):
    """
    The recent-messages list.
    """

    def activity(self, n: int) -> Activity:
        message = Message.create(f"org.example.dev.n{n}", {"summary": f"number {n}"})
        return Activity(float(n), "one", "a", "acked", message.id, message)

    def test_bounded(self) -> None:
        """Only the newest entries are kept; numbers keep counting."""
        recent = RecentMessages(3)
        for n in range(1, 6):
            recent.add(self.activity(n))
        self.assertEqual([e["id"] for e in recent.entries()], [3, 4, 5])
        self.assertEqual([e["id"] for e in recent.entries(after=4)], [5])
        self.assertEqual(recent.last_id, 5)
        self.assertEqual(recent.entries()[-1]["summary"], "number 5")
        self.assertEqual(recent.entries()[-1]["time"], "1970-01-01T00:00:05+00:00")

    def test_size_checked(self) -> None:
        """A list must hold at least one entry."""
        self.assertRaises(ValueError, RecentMessages, 0)

    def test_outcomes_recorded(self) -> None:
        """Consumer outcomes carry topic, summary and reason; outbox ones the id."""
        world = World(self)
        world.start()
        ok = world.publish("org.example.dev.ok", summary="fine")
        bad = world.publish("org.example.dev.bad", dead=True)
        entries = world.recent.entries()
        self.assertEqual(
            [(e["source"], e["outcome"], e["topic"], e["msg_id"]) for e in entries],
            [
                ("outbox", "confirmed", None, ok.id),
                ("a", "acked", "org.example.dev.ok", ok.id),
                ("outbox", "confirmed", None, bad.id),
                ("a", "dead_lettered", "org.example.dev.bad", bad.id),
            ],
        )
        self.assertEqual(entries[1]["summary"], "fine")
        self.assertEqual(entries[3]["reason"], "told to dead-letter")
        epoch = world.recent.epoch
        response, body = world.get(f"/recent.json?after=2&epoch={epoch}")
        data = json.loads(body)
        self.assertEqual((data["epoch"], data["last"]), (epoch, 4))
        self.assertEqual([e["id"] for e in data["entries"]], [3, 4])
        # Numbers of another process's list start over.
        data = json.loads(world.get("/recent.json?after=2&epoch=other")[1])
        self.assertEqual([e["id"] for e in data["entries"]], [1, 2, 3, 4])


class PageTests(SynchronousTestCase):
    """
    The status page and its JSON never carry markup from the hub.
    """

    def hostile_world(self) -> World:
        world = World(
            self,
            producers={"<b>poll</b>": FakePoller(last_error="<iframe src=//evil>\r\nboom")},
            consumer_name="a<svg onload=alert(1)>",
        )
        world.start()
        world.publish(HOSTILE_TOPIC, summary=HOSTILE_SUMMARY)
        world.publish(HOSTILE_TOPIC, summary=HOSTILE_SUMMARY, dead=True)
        return world

    def test_page_shows_hub(self) -> None:
        """The page lists domains, consumers, producers and recent messages."""
        world = World(self, producers={"koji": FakePoller(), "mail": FakeListener()})
        world.start()
        world.publish("org.example.dev.build.done", summary="build 1 done")
        response, body = world.get("/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        page = body.decode("utf-8")
        for text in ("Ready", "memory (in-process)", "connected", "consuming", "koji",
                     "https://koji.example/kojihub", "connection refused", "SMTP listener",
                     "refused 4 (content 3, limit 1)", "org.example.dev.build.done", "build 1 done",
                     'data-last="2"', f'data-epoch="{world.recent.epoch}"'):
            self.assertIn(text, page)

    def test_not_ready_headline(self) -> None:
        """When not ready the headline names what is wrong."""
        world = World(self)
        page = world.get("/")[1].decode()
        self.assertIn("Not ready: domain one is not connected; consumer a is not consuming", page)
        self.assertIn('class="headline bad"', page)

    def test_hostile_text_escaped(self) -> None:
        """Topics, summaries, names and errors with markup come out as text, not tags."""
        world = self.hostile_world()
        response, body = world.get("/")
        page = body.decode("utf-8")
        parser = TagCollector()
        parser.feed(page)
        tags = [tag for tag, _ in parser.tags]
        self.assertNotIn("img", tags)
        self.assertNotIn("iframe", tags)
        self.assertNotIn("svg", tags)
        self.assertNotIn("b", tags)
        scripts = [dict(attrs) for tag, attrs in parser.tags if tag == "script"]
        self.assertEqual(scripts, [{"src": "static/status.js", "defer": None}])
        for tag, attrs in parser.tags:
            for name, _ in attrs:
                self.assertFalse(name.startswith("on"), (tag, attrs))
        self.assertIn("&lt;img/src=x/onerror=alert(1)&gt;", page)
        self.assertIn("&lt;/td&gt;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;amp;", page)
        self.assertIn("\\x1b[31m", page)
        self.assertNotIn("\x1b", page)
        self.assertNotIn("\u2028", page)
        self.assertIn("&lt;iframe src=//evil&gt;\\r\\nboom", page)

    def test_json_escaped(self) -> None:
        """The JSON answers have no raw markup characters, yet decode to the same text."""
        world = self.hostile_world()
        for path in ("/status.json", "/recent.json", "/ready"):
            body = world.get(path)[1]
            for char in (b"<", b">", b"&"):
                self.assertNotIn(char, body, path)
            json.loads(body)
        data = json.loads(world.get("/recent.json")[1])
        topics = {e["topic"] for e in data["entries"] if e["topic"]}
        self.assertEqual(topics, {HOSTILE_TOPIC.replace("\x1b", "\\x1b")})
        self.assertIn("</td><script>alert('x')</script>", data["entries"][1]["summary"])

    def test_security_headers(self) -> None:
        """Every answer carries the strict policy and forbids sniffing and framing."""
        world = World(self)
        for path in ("/", "/live", "/ready", "/metrics", "/status.json", "/recent.json",
                     "/static/status.js", "/static/status.css"):
            response, _ = world.get(path)
            self.assertEqual(
                response.headers.getRawHeaders(b"content-security-policy"),
                [CONTENT_SECURITY_POLICY.encode()],
                path,
            )
            self.assertEqual(response.headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
            self.assertEqual(response.headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
        self.assertNotIn("unsafe-inline", CONTENT_SECURITY_POLICY)
        self.assertIn("script-src 'self'", CONTENT_SECURITY_POLICY)

    def test_page_has_no_inline_code(self) -> None:
        """The page holds no inline script, style or event handler for the policy to block."""
        page = World(self).get("/")[1].decode()
        parser = TagCollector()
        parser.feed(page)
        for tag, attrs in parser.tags:
            names = dict(attrs)
            self.assertNotIn("style", names, tag)
            if tag == "script":
                self.assertIn("src", names)
        self.assertNotIn("<style", page)

    def test_script_never_parses_html(self) -> None:
        """The page's script puts server text on the page only as text."""
        response, body = World(self).get("/static/status.js")
        self.assertEqual(response.code, 200)
        script = body.decode()
        self.assertIn("textContent", script)
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            self.assertNotIn(sink, script)

    def test_dumps_json(self) -> None:
        """JSON output escapes markup characters and stays ASCII."""
        self.assertEqual(dumps_json({"a": "<&>\u2028é"}), b'{"a":"\\u003c\\u0026\\u003e\\u2028\\u00e9"}')


class EventsTests(SynchronousTestCase):
    """
    The live feed at C{/events}.
    """

    def open(self, world: World, request: FakeStreamRequest) -> None:
        # Past the host check, which the fake request does not go through.
        events = world.resource.root.getChildWithDefault(b"events", request)  # type: ignore[attr-defined]
        from twisted.web.server import NOT_DONE_YET

        result = events.render(request)  # type: ignore[arg-type]
        if request.code == 200:
            self.assertEqual(result, NOT_DONE_YET)

    def test_stream(self) -> None:
        """A stream gets the status at once, then new entries in batches, then status ticks."""
        world = World(self)
        world.start()
        request = FakeStreamRequest(after="0", epoch=world.recent.epoch)
        self.open(world, request)
        self.assertEqual(request.headers[b"content-type"], b"text/event-stream; charset=utf-8")
        self.assertEqual(request.headers[b"content-security-policy"], CONTENT_SECURITY_POLICY.encode())
        self.assertTrue(request.written[0].startswith(b"retry: "))
        self.assertEqual([kind for _, kind, _ in request.events()], ["status"])
        world.publish("org.example.dev.first")
        world.publish("org.example.dev.second")
        self.assertEqual(len(request.events()), 1)
        world.clock.advance(0.2)
        event_id, kind, data = request.events()[-1]
        self.assertEqual((event_id, kind), (f"{world.recent.epoch}-4", "recent"))
        self.assertEqual(data["epoch"], world.recent.epoch)
        self.assertEqual(
            [e["topic"] for e in data["entries"]],
            [None, "org.example.dev.first", None, "org.example.dev.second"],
        )
        world.clock.advance(2)
        self.assertEqual(request.events()[-1][1], "status")
        self.assertEqual(request.events()[-1][2]["ready"], True)

    def test_resume(self) -> None:
        """A client coming back with Last-Event-ID gets only what it missed."""
        world = World(self)
        world.start()
        world.publish("org.example.dev.first")
        world.publish("org.example.dev.second")
        request = FakeStreamRequest(last_event_id=f"{world.recent.epoch}-3", after="0")
        self.open(world, request)
        recent = [data for _, kind, data in request.events() if kind == "recent"]
        self.assertEqual([[e["id"] for e in batch["entries"]] for batch in recent], [[4]])
        request.lose()

    def test_other_epoch(self) -> None:
        """A client whose numbers come from before a restart gets the whole list."""
        world = World(self)
        world.start()
        world.publish("org.example.dev.first")
        for request in (FakeStreamRequest(last_event_id="0123abcd-3"),
                        FakeStreamRequest(after="3", epoch="0123abcd"),
                        FakeStreamRequest(last_event_id="garbage"),
                        FakeStreamRequest(last_event_id=f"{world.recent.epoch}-\u00b2"),
                        FakeStreamRequest(after="9" * 5000, epoch=world.recent.epoch)):
            self.open(world, request)
            recent = [data for _, kind, data in request.events() if kind == "recent"]
            self.assertEqual([[e["id"] for e in batch["entries"]] for batch in recent], [[1, 2]])
            request.lose()

    def test_paused_client(self) -> None:
        """Nothing is written to a client that can not take it; it catches up on resuming."""
        world = World(self)
        world.start()
        request = FakeStreamRequest()
        self.open(world, request)
        request.producer.pauseProducing()
        before = len(request.written)
        world.publish()
        world.clock.advance(5)
        self.assertEqual(len(request.written), before)
        request.producer.resumeProducing()
        recent = [data for _, kind, data in request.events() if kind == "recent"]
        self.assertEqual([e["id"] for e in recent[-1]["entries"]], [1, 2])
        request.lose()

    def test_limit(self) -> None:
        """Beyond the limit of open streams the answer is 503."""
        world = World(self)
        first, second, third = FakeStreamRequest(), FakeStreamRequest(), FakeStreamRequest()
        for request in (first, second, third):
                self.open(world, request)
        self.assertEqual((first.code, second.code, third.code), (200, 200, 503))
        first.lose()
        fourth = FakeStreamRequest()
        self.open(world, fourth)
        self.assertEqual(fourth.code, 200)
        world.feed.close()

    def test_gone_clients_stop_timers(self) -> None:
        """When the last client leaves no timer is left."""
        world = World(self)
        request = FakeStreamRequest()
        self.open(world, request)
        self.assertTrue(world.clock.getDelayedCalls())
        request.lose()
        self.assertEqual(world.feed.streams, [])
        self.assertEqual(world.clock.getDelayedCalls(), [])

    def test_close(self) -> None:
        """Closing the feed ends every stream and refuses new ones."""
        world = World(self)
        request = FakeStreamRequest()
        self.open(world, request)
        world.feed.close()
        self.assertTrue(request.finished)
        self.assertIsNone(request.producer)
        self.assertEqual(world.clock.getDelayedCalls(), [])
        late = FakeStreamRequest()
        self.open(world, late)
        self.assertEqual(late.code, 503)


HUB_CONFIG = """
[hub]
state_dir = "{state}"

[domains.one]
broker = "memory"

[[consumers]]
name = "audit"
plugin = "log"
domain = "one"
topics = ["#"]
"""


class ServiceTests(TestCase):
    """
    L{StatusService} on a real socket in front of a real hub.
    """

    def make_hub(self) -> Hub:
        lookup = {"log": LogPlugin()}
        state = os.path.abspath(self.mktemp())
        config = parse_config(
            HUB_CONFIG.format(state=state), "test",
            find_plugin=lambda kind, name: lookup.get(name),
        )
        return Hub(config, reactor, find_consumer=lambda name: lookup[name])  # type: ignore[arg-type]

    @inlineCallbacks
    def test_serves_hub(self) -> Any:
        """The service listens, answers for the hub and closes its connections when stopped."""
        hub = self.make_hub()
        status = StatusService(hub, "tcp:0:interface=127.0.0.1", reactor)
        status.setServiceParent(hub)
        hub.startService()
        self.addCleanup(hub.stopService)
        port = yield status.when_listening()
        number = port.getHost().port
        base = f"http://127.0.0.1:{number}"
        for _ in range(50):
            response = yield treq.get(f"{base}/ready", persistent=False)
            body = yield response.json()
            if response.code == 200:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(body["ready"], True)
        yield hub.domains["one"].publisher.publish(Message.create("org.example.dev.x", {"summary": "hello"}))
        for _ in range(50):
            response = yield treq.get(f"{base}/recent.json", persistent=False)
            data = yield response.json()
            if any(e["topic"] == "org.example.dev.x" for e in data["entries"]):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIn("hello", [e["summary"] for e in data["entries"]])
        response = yield treq.get(f"{base}/metrics", persistent=False)
        text = yield response.text()
        self.assertIn('fedhub_consumer_acked_total{consumer="audit",domain="one"} 1.0', text)
        yield status.stopService()
        self.assertIsNone(status.port)
        self.assertEqual(type(hub.consumers["audit"].handler).__name__, "LogHandler")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", number), timeout=2).close()

    @inlineCallbacks
    def test_requests_logged_at_debug_only(self) -> Any:
        """
        Each request is logged at debug level: nothing at the default info
        level (health probes come every few seconds), one line at debug.
        """
        self.addCleanup(set_log_level, log_level())
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        status = StatusService(FakeHub(), "tcp:0:interface=127.0.0.1", reactor)
        status.startService()
        self.addCleanup(status.stopService)
        port = yield status.when_listening()
        url = f"http://127.0.0.1:{port.getHost().port}/live"
        found = []
        for level in (LogLevel.info, LogLevel.debug):
            set_log_level(level)
            del events[:]
            response = yield treq.get(url, persistent=False)
            yield response.content()
            for _ in range(50):
                found = [e for e in events if "GET /live" in formatEvent(e)]
                if found or level is LogLevel.info:
                    break
                yield deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(response.code, 200)
            if level is LogLevel.info:
                self.assertEqual(found, [])
        self.assertEqual([e["log_level"] for e in found], [LogLevel.debug])

    @inlineCallbacks
    def test_listen_failure(self) -> Any:
        """A port in use is logged and reported; the service keeps running."""
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        self.addCleanup(blocker.close)
        hub = FakeHub()
        status = StatusService(hub, f"tcp:{blocker.getsockname()[1]}:interface=127.0.0.1", reactor)
        waiting = status.when_listening()
        status.startService()
        with self.assertRaises(Exception):
            yield waiting
        self.assertTrue(status.running)
        self.assertIsNone(status.port)
        self.assertTrue(self.flushLoggedErrors())
        yield status.stopService()


class HostCheckTests(SynchronousTestCase):
    """
    The status server answers only to requests that name it (no DNS rebinding).
    """

    def test_allowed_hosts(self) -> None:
        """
        IP literals, localhost and the machine's names pass, and so does a
        request without Host (an HTTP/1.0 health check; a browser always
        sends one); other names do not.
        """
        from fedhub.status.web import host_allowed

        names = frozenset({"hub1", "hub1.example.org"})
        for host in (b"127.0.0.1:8070", b"127.0.0.1", b"[::1]:8070", b"localhost:8070",
                     b"LOCALHOST", b"hub1:8070", b"hub1.example.org", b"10.1.2.3:80", None):
            self.assertTrue(host_allowed(host, names), host)
        for host in (b"", b"attacker.example:8070", b"hub1.attacker.example",
                     b"127.0.0.1.nip.io", b"[evil]:80"):
            self.assertFalse(host_allowed(host, names), host)


class MetricsDocumentedTests(SynchronousTestCase):
    """
    docs/deployment.md's table of metrics names every metric the hub
    serves, and nothing it does not.
    """

    def test_table_matches(self) -> None:
        world = World(self, producers={"koji": FakePoller(), "mail": PooledListener()})
        # A bus that can be blocked (as the AMQP bus can; the memory bus can not).
        world.bus.blocked = False  # type: ignore[attr-defined]
        # And counts undecodable deliveries, as the AMQP bus does.
        world.bus.stats = AMQPLikeStats(1)  # type: ignore[attr-defined]
        world.start()
        world.publish()
        world.clock.advance(100)
        served = {name for name in world.metrics()}
        # Sample names: a counter's end in _total, a histogram's in
        # _bucket, _count, _sum, _created.
        families = {re.sub(r"_(bucket|count|sum|created)$", "", name) for name in served}
        text = (Path(__file__).parent.parent / "docs" / "deployment.md").read_text()
        table = text[text.index("## Metrics"):]
        documented: set[str] = set()
        for cell in re.findall(r"`(fedhub_[a-z_{},]+)`", table):
            head, _, rest = cell.partition("{")
            if rest:
                alternatives, _, tail = rest.partition("}")
                documented.update(head + a + tail for a in alternatives.split(","))
            else:
                documented.add(cell)
        self.assertEqual(sorted(families - documented), [])
        self.assertEqual(sorted(documented - families), [])
