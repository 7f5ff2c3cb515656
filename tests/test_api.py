"""
Tests for L{fedhub.api}: choosing a domain, the non-cancelling timeout and
connection wait on a fake clock; then L{fedhub.api.publish} in this process
and L{fedhub.api.publish_sync} in a subprocess (its reactor can run only once
per process) against the shared RabbitMQ (a missing broker fails under
C{CI=true}, skips elsewhere).
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from fedhub import api
from fedhub.amqp.url import parse_url
from fedhub.config import load_config
from fedhub.errors import (
    AccessRefused,
    ConfigError,
    MessageReturned,
    NotConnected,
    PublishError,
    TemporarilyUnavailable,
    TLSFailed,
)
from fedhub.message import Message
from tests.test_amqp_bus import Collector, LiveCase
from tests.test_cli_publish import BROKER_URL, ROOT, write_config


class ChooseDomainTests(SynchronousTestCase):
    """
    Which domain a publish goes to.
    """

    def config(self, more: str = "", broker: str = BROKER_URL) -> Any:
        return load_config(write_config(Path(self.mktemp()).absolute(), broker=broker, more=more))

    def test_only_one(self) -> None:
        """Without a name, the only domain."""
        self.assertEqual(api.choose_domain(self.config(), None).name, "test")

    def test_several(self) -> None:
        """Several domains and no name: an error listing them."""
        config = self.config(more=f'[domains.other]\nbroker = "{BROKER_URL}"\n')
        e = self.assertRaises(api.DomainError, api.choose_domain, config, None)
        self.assertEqual(e.known, ["other", "test"])
        self.assertIn("other, test", e.reason)
        self.assertEqual(api.choose_domain(config, "other").name, "other")

    def test_several_named_as_the_caller_names_them(self) -> None:
        """
        The error for several domains and no name says how to name one as
        the caller does: a program calling L{api.publish} has no
        C{--domain} option.
        """
        config = self.config(more=f'[domains.other]\nbroker = "{BROKER_URL}"\n')
        e = self.assertRaises(api.DomainError, api.choose_domain, config, None)
        self.assertNotIn("--domain", e.reason)
        self.assertIn("domain argument", e.reason)
        failure = self.failureResultOf(
            api.Client(config, Clock()).publish(Message.create("a.b", {})), api.DomainError
        )
        self.assertIn("domain argument", failure.value.reason)
        e = self.assertRaises(
            api.DomainError, api.choose_domain, config, None, how="use --domain"
        )
        self.assertIn("use --domain", e.reason)

    def test_unknown(self) -> None:
        """An unknown name: an error naming it."""
        e = self.assertRaises(api.DomainError, api.choose_domain, self.config(), "nope")
        self.assertEqual(e.domain, "nope")

    def test_memory_refused(self) -> None:
        """An in-process domain is refused unless the caller needs no broker."""
        config = self.config(broker="memory")
        e = self.assertRaises(api.DomainError, api.choose_domain, config, None)
        self.assertIn('broker = "memory"', e.reason)
        self.assertEqual(api.choose_domain(config, None, need_broker=False).name, "test")

    def test_default_configuration(self) -> None:
        """Without a path: the system file when it exists, else the built-in default."""
        self.patch(api, "DEFAULT_CONFIG_PATH", str(Path(self.mktemp()) / "missing.toml"))
        self.assertEqual(list(api.load(None).domains), ["default"])
        path = write_config(Path(self.mktemp()).absolute())
        self.patch(api, "DEFAULT_CONFIG_PATH", path)
        self.assertEqual(list(api.load(None).domains), ["test"])
        # A link to nothing is a broken system file, not a missing one: an
        # error, not the built-in default (a command would act on another
        # hub's state).
        dangling = Path(self.mktemp())
        dangling.symlink_to(Path(self.mktemp()) / "gone.toml")
        self.patch(api, "DEFAULT_CONFIG_PATH", str(dangling))
        self.assertRaises(ConfigError, api.load, None)


class WithTimeoutTests(SynchronousTestCase):
    """
    L{api.with_timeout} never cancels what it waits for.
    """

    def test_result(self) -> None:
        """A result in time passes through and the timer is gone."""
        clock = Clock()
        inner: Deferred[int] = Deferred()
        d = api.with_timeout(inner, 5, clock, lambda: NotConnected("late"))
        inner.callback(3)
        self.assertEqual(self.successResultOf(d), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """No result in time: the error; the inner Deferred is not cancelled and may fire later."""
        clock = Clock()
        inner: Deferred[int] = Deferred()
        d = api.with_timeout(inner, 5, clock, lambda: NotConnected("late"))
        clock.advance(5)
        self.failureResultOf(d, NotConnected)
        self.assertFalse(inner.called)
        inner.callback(1)
        self.assertIsNone(self.successResultOf(inner))


class FakeBus:
    """
    What L{api.connect_bus} looks at.
    """

    domain = "test"
    settings = parse_url("amqp://guest:secret@broker.example:5672/")

    def __init__(self) -> None:
        self.running = False
        self.connected = False
        self.last_error: BaseException | None = None
        self.waiters: list[Deferred[None]] = []

    def startService(self) -> None:
        self.running = True

    def when_connected(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d


class ConnectBusTests(SynchronousTestCase):
    """
    Waiting for a connection.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = FakeBus()

    def connect(self, timeout: float = 3.0) -> Deferred[None]:
        return Deferred.fromCoroutine(api.connect_bus(self.bus, self.clock, timeout))

    def test_connects(self) -> None:
        """It starts the bus and fires once it is connected."""
        d = self.connect()
        self.assertTrue(self.bus.running)
        self.clock.advance(1)
        self.assertNoResult(d)
        self.bus.connected = True
        self.clock.advance(0.05)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_access_refused_at_once(self) -> None:
        """A refused login fails at once, not after the timeout."""
        d = self.connect(timeout=60)
        self.bus.last_error = AccessRefused(403, "ACCESS_REFUSED - login refused")
        self.clock.advance(0.05)
        self.failureResultOf(d, AccessRefused)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_certificate_refused_at_once(self) -> None:
        """
        A certificate refused in the TLS handshake fails at once, naming the
        broker (no password); a handshake cut short waits as any other
        failure.
        """
        d = self.connect(timeout=60)
        self.bus.last_error = TLSFailed("tlsv1 alert unknown ca", certificate=True)
        self.clock.advance(0.05)
        error = self.failureResultOf(d, TLSFailed).value
        self.assertTrue(error.certificate)
        self.assertEqual(
            error.reason,
            "the TLS handshake with the broker failed: tlsv1 alert unknown ca"
            " (connecting to amqp://guest@broker.example:5672/%2F, domain test)",
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.bus.last_error = TLSFailed("unexpected eof while reading")
        d = self.connect(timeout=1)
        self.clock.advance(0.5)
        self.assertNoResult(d)
        self.clock.pump([0.05] * 15)
        self.assertIn("unexpected eof", self.failureResultOf(d, NotConnected).value.reason)

    def test_timeout(self) -> None:
        """No connection in time: NotConnected naming the broker (no password) and the last error."""
        d = self.connect(timeout=1)
        self.bus.last_error = ConnectionRefusedError("connection refused")
        self.clock.pump([0.05] * 25)
        reason = self.failureResultOf(d, NotConnected).value.reason
        self.assertIn("amqp://guest@broker.example:5672", reason)
        self.assertIn("connection refused", reason)
        self.assertNotIn("secret", reason)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClientTests(SynchronousTestCase):
    """
    What L{api.Client} refuses before connecting.
    """

    def test_refusals(self) -> None:
        """Not a Message, an in-process domain, a closed client: each fails without connecting."""
        config = load_config(write_config(Path(self.mktemp()).absolute(), broker="memory"))
        client = api.Client(config, Clock())
        message = Message.create("org.example.dev.a", {})
        self.failureResultOf(client.publish({"topic": "x"}, None), TypeError)  # type: ignore[arg-type]
        self.failureResultOf(client.publish(message), api.DomainError)
        self.successResultOf(client.close())
        self.failureResultOf(client.publish(message), NotConnected)


class DocumentedErrorsTests(SynchronousTestCase):
    """
    The exceptions a publish fails with are all documented.
    """

    def test_final_refusals_documented(self) -> None:
        """Every final publish refusal of the AMQP transport is named in the module's docstring and docs/cli.md's table."""
        from fedhub.amqp import transport

        refusals = sorted(
            name for name, value in vars(transport).items()
            if isinstance(value, type) and issubclass(value, PublishError)
            and not issubclass(value, TemporarilyUnavailable)
            and value.__module__ == transport.__name__
        )
        self.assertIn("MessageTooLarge", refusals)
        docstring = " ".join((api.__doc__ or "").split())
        table = (ROOT / "docs" / "cli.md").read_text()
        for name in refusals:
            self.assertIn(f"fedhub.amqp.transport.{name}", docstring)
            self.assertIn(f"| `{name}` (`fedhub.amqp.transport`) |", table)


SYNC_SCRIPT = textwrap.dedent(
    """
    import sys
    from fedhub.api import publish_sync
    from fedhub.errors import MessageReturned
    from fedhub.message import Message

    config, prefix = sys.argv[1], sys.argv[2]
    for n in range(2):
        message = Message.create(prefix + ".sync", {"n": n})
        publish_sync(message, config_path=config, timeout=20)
        print("confirmed", message.id, flush=True)
    try:
        publish_sync(Message.create(prefix + "x.nobody", {}), config_path=config, timeout=20)
    except MessageReturned as e:
        print("returned", e.reply_code, flush=True)
    """
)


class LiveAPITests(LiveCase):
    """
    Publishing through the shared RabbitMQ.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.directory = Path(self.mktemp()).absolute()
        self.config = load_config(write_config(self.directory))
        self.prefix = f"fedhubtest.api.{uuid.uuid4().hex}"
        self.addCleanup(api.close)

    async def consumer(self) -> Collector:
        bus = await self.start_bus()
        queue = await self.queue(bus, f"{self.prefix}.#")
        collector = Collector()
        await bus.subscribe(queue, collector, 100)
        return collector

    async def test_publish(self) -> None:
        """publish confirms, reuses one connection per domain, and reports a returned message."""
        collector = await self.consumer()
        first = Message.create(f"{self.prefix}.a", {"n": 1})
        second = Message.create(f"{self.prefix}.b", {"n": 2})
        await api.publish(first, config=self.config)
        await api.publish(second, "test", config=self.config)
        clients = [client for config, _, client in api._clients if config is self.config]
        self.assertEqual(len(clients), 1)
        self.assertEqual(list(clients[0]._buses), ["test"])
        self.assertEqual(clients[0]._buses["test"].stats.connections, 1)
        try:
            await api.publish(Message.create(f"{self.prefix}x.nobody", {}), config=self.config)
        except MessageReturned as e:
            self.assertEqual(e.reply_code, 312)
        else:
            self.fail("not returned")
        await self.wait_for(lambda: len(collector.deliveries) == 2, "both messages")
        self.assertEqual(collector.ids, [first.id, second.id])
        await api.close()
        self.assertEqual(api._clients, [])

    async def test_publish_unreachable(self) -> None:
        """A broker that can not be reached: NotConnected after the timeout."""
        config = load_config(write_config(self.directory / "closed", broker="amqp://guest:guest@127.0.0.1:1/"))
        try:
            await api.publish(Message.create("a.b", {}), config=config, timeout=0.5)
        except TemporarilyUnavailable as e:
            self.assertIn("could not connect", e.reason)
        else:
            self.fail("published to a closed port")

    async def test_sync_in_reactor_thread(self) -> None:
        """publish_sync in the reactor's own thread refuses instead of waiting forever."""
        from twisted.internet import reactor

        # Resume inside the running reactor (a test method starts before it runs).
        await deferLater(reactor, 0, lambda: None)
        self.assertTrue(reactor.running)
        path = write_config(self.directory / "sync")
        self.assertRaises(RuntimeError, api.publish_sync, Message.create("a.b", {}), config_path=path)

    async def test_publish_sync(self) -> None:
        """publish_sync, in a program without Twisted, blocks until each confirm and raises refusals."""
        collector = await self.consumer()
        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutputAndValue

        path = write_config(self.directory / "sync")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", SYNC_SCRIPT, path, self.prefix], env=env, reactor=reactor
        )
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual([line.split()[0] for line in lines], ["confirmed", "confirmed", "returned"])
        self.assertEqual(lines[2], "returned 312")
        await self.wait_for(lambda: len(collector.deliveries) == 2, "both messages")
        self.assertEqual(collector.ids, [line.split()[1] for line in lines[:2]])
