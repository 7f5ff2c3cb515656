"""
Tests for L{fedhub.api} as programs without Twisted use it: several threads
at once, a forked child, a broker that accepts connections but never speaks
AMQP.  Nothing here needs a broker.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from fedhub import api
from fedhub.config import Config, default_config, load_config
from fedhub.errors import NotConnected, TemporarilyUnavailable
from fedhub.message import Message
from tests.test_api import FakeBus
from tests.test_cli_publish import ROOT, write_config


class ConfigCacheTests(SynchronousTestCase):
    """
    The configurations L{api.publish_sync} reads, cached by path.
    """

    def test_one_load_for_concurrent_callers(self) -> None:
        """Threads asking for the same path at once share one configuration (so one connection)."""
        path = write_config(Path(self.mktemp()).absolute())
        self.patch(api, "_configs", {})
        real_load = api.load
        loads: list[str | None] = []
        seen: dict[str, Config] = {}
        other_done = threading.Event()

        def other() -> None:
            seen["other"] = api._config(path)
            other_done.set()

        def slow_load(name: str | None = None) -> Config:
            loads.append(name)
            if len(loads) == 1:
                # A second caller arrives while the first is still reading.
                second = threading.Thread(target=other)
                second.start()
                other_done.wait(0.5)
                self.addCleanup(second.join)
            return real_load(name)

        self.patch(api, "load", slow_load)
        first = api._config(path)
        other_done.wait(10)
        self.assertEqual(loads, [path])
        self.assertIs(seen["other"], first)


class HandshakeTimeoutTests(SynchronousTestCase):
    """
    A broker that accepts the TCP connection but never answers.
    """

    def test_reason_names_handshake(self) -> None:
        """NotConnected says the broker did not answer the AMQP handshake, not a bare timeout tuple."""
        bus = FakeBus()
        bus.last_error = DeferredTimeout(1.5, "Deferred")
        clock = Clock()
        d = Deferred.fromCoroutine(api.connect_bus(bus, clock, 1.0))
        clock.pump([0.05] * 25)
        reason = self.failureResultOf(d, NotConnected).value.reason
        self.assertIn("did not answer the AMQP handshake", reason)
        self.assertNotIn("'Deferred'", reason)
        self.assertEqual(clock.getDelayedCalls(), [])


FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from fedhub.api import publish_sync
    from fedhub.errors import NotConnected
    from fedhub.message import Message

    path = sys.argv[1]
    try:
        # Starts the reactor thread; nothing listens on port 1.
        publish_sync(Message.create("a.b", {}), config_path=path, timeout=0.2)
    except NotConnected:
        pass
    pid = os.fork()
    if pid == 0:
        try:
            publish_sync(Message.create("a.b", {}), config_path=path, timeout=0.2)
        except Exception as e:
            print("child", type(e).__name__, e, flush=True)
        sys.exit(0)
    os.waitpid(pid, 0)
    try:
        publish_sync(Message.create("a.b", {}), config_path=path, timeout=0.2)
    except NotConnected:
        print("parent NotConnected", flush=True)
    """
)


class ForkTests(SynchronousTestCase):
    """
    L{api.publish_sync} in a child forked after it started the reactor thread.
    """

    def test_child_refused_clearly(self) -> None:
        """The child gets RuntimeError at once (its reactor thread did not survive the fork); the parent still works."""
        path = write_config(Path(self.mktemp()).absolute(), broker="amqp://guest:guest@127.0.0.1:1/%2F")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run(
            [sys.executable, "-c", FORK_SCRIPT, path],
            env=env, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 2, done.stdout)
        self.assertTrue(lines[0].startswith("child RuntimeError "), lines[0])
        self.assertIn("fork", lines[0])
        self.assertEqual(lines[1], "parent NotConnected")
        self.assertEqual(done.stderr, "")


class ConfirmingBus(FakeBus):
    """
    A connected bus whose confirms never come.
    """

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.connected = True
        self.published: list[Message] = []

    def publish(self, message: Message) -> Deferred[None]:
        self.published.append(message)
        return Deferred()


class ClientTimeoutTests(SynchronousTestCase):
    """
    The timeout of each publish, whatever the timeout the connection was
    opened with.
    """

    def test_confirm_bounded_by_call_timeout(self) -> None:
        """A publish fails with TemporarilyUnavailable once its own timeout passed without a confirm."""
        config = load_config(write_config(Path(self.mktemp()).absolute()))
        clock = Clock()
        client = api.Client(config, clock, timeout=2)
        bus = ConfirmingBus()
        client._buses["test"] = bus
        message = Message.create("org.example.dev.a", {})
        d = client.publish(message)
        self.assertEqual(bus.published, [message])
        clock.advance(2)
        failure = self.failureResultOf(d, TemporarilyUnavailable)
        self.assertEqual(failure.value.message_id, message.id)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_short_first_timeout_not_kept(self) -> None:
        """A short timeout on the first call does not become the connection's confirm and handshake deadline."""
        config = load_config(write_config(Path(self.mktemp()).absolute(), broker="amqp://guest:guest@127.0.0.1:1/%2F"))
        reactor = MemoryReactorClock()
        client = api.Client(config, reactor, timeout=0.5)
        d = client.bus()
        bus = client._buses["test"]
        self.assertEqual(bus.confirm_timeout, api.DEFAULT_TIMEOUT)
        self.assertEqual(bus.setup_timeout, api.DEFAULT_TIMEOUT)
        reactor.advance(0.5)
        self.failureResultOf(d, NotConnected)
        self.successResultOf(client.close())


class TimeoutValueTests(SynchronousTestCase):
    """
    A timeout that is not a positive number of seconds.
    """

    def test_refused_clearly(self) -> None:
        """publish and publish_sync refuse a timeout of 0, a negative one or NaN with a ValueError naming it."""
        message = Message.create("org.example.dev.a", {"n": 1})
        for bad in (0, -1.0, float("nan")):
            failure = self.failureResultOf(
                api.publish(message, config=default_config(), reactor=Clock(), timeout=bad), ValueError
            )
            self.assertIn("timeout must be a positive number", str(failure.value))
            error = self.assertRaises(ValueError, api.publish_sync, message, timeout=bad)
            self.assertIn(repr(bad), str(error))


class StoppingBus(ConfirmingBus):
    """
    A connected bus whose stop waits (for confirms in flight) until the test
    lets it finish.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stopping: list[Deferred[None]] = []

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.stopping.append(d)
        return d


class CloseTimeoutTests(SynchronousTestCase):
    """
    How long closing waits for the buses to stop (their confirms in flight).
    """

    def client(self, clock: Clock, *buses: StoppingBus) -> api.Client:
        config = load_config(write_config(Path(self.mktemp()).absolute()))
        client = api.Client(config, clock)
        for n, bus in enumerate(buses):
            client._buses[f"d{n}"] = bus
        return client

    def test_client_close_bounded(self) -> None:
        """Client.close(timeout) fires once the timeout passed, though a bus still waits for confirms."""
        clock = Clock()
        bus = StoppingBus()
        client = self.client(clock, bus)
        d = client.close(timeout=5)
        self.assertEqual(len(bus.stopping), 1)
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])
        # The stop finishing later changes nothing.
        bus.stopping[0].callback(None)
        self.assertIsNone(self.successResultOf(d))

    def test_client_close_bounds_all_buses(self) -> None:
        """The timeout bounds the whole close: the buses stop at the same time, each waiting for its confirms."""
        clock = Clock()
        first, second = StoppingBus(), StoppingBus()
        client = self.client(clock, first, second)
        d = client.close(timeout=5)
        self.assertEqual((len(first.stopping), len(second.stopping)), (1, 1))
        clock.advance(3)
        first.stopping[0].callback(None)
        self.assertNoResult(d)
        clock.advance(2)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_client_close_waits_for_every_bus(self) -> None:
        """Without a timeout, close fires once the last bus stopped, whichever order they stop in; a failing stop does not stop it."""
        clock = Clock()
        first, second = StoppingBus(), StoppingBus()
        client = self.client(clock, first, second)
        d = client.close()
        second.stopping[0].callback(None)
        self.assertNoResult(d)
        first.stopping[0].errback(RuntimeError("broken"))
        self.assertIsNone(self.successResultOf(d))

    def test_client_close_in_time(self) -> None:
        """A close that ends before its timeout fires then and leaves no timer."""
        clock = Clock()
        bus = StoppingBus()
        client = self.client(clock, bus)
        d = client.close(timeout=5)
        clock.advance(1)
        bus.stopping[0].callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_client_close_unbounded_by_default(self) -> None:
        """Without a timeout, close waits for the buses' own limits, however long."""
        clock = Clock()
        bus = StoppingBus()
        client = self.client(clock, bus)
        d = client.close()
        clock.advance(3600)
        self.assertNoResult(d)
        bus.stopping[0].callback(None)
        self.assertIsNone(self.successResultOf(d))

    def test_close_again_bounded(self) -> None:
        """A second close with a timeout is bounded too, and both fire once the stop ends."""
        clock = Clock()
        bus = StoppingBus()
        client = self.client(clock, bus)
        unbounded = client.close()
        bounded = client.close(timeout=2)
        self.assertEqual(len(bus.stopping), 1)
        clock.advance(2)
        self.assertIsNone(self.successResultOf(bounded))
        self.assertNoResult(unbounded)
        bus.stopping[0].callback(None)
        self.assertIsNone(self.successResultOf(unbounded))

    def test_module_close_bounded(self) -> None:
        """api.close(timeout, reactor=clock) fires once the timeout passed, over every client."""
        clock = Clock()
        first, second = StoppingBus(), StoppingBus()
        clients = [(object(), clock, self.client(clock, first)), (object(), clock, self.client(clock, second))]
        self.patch(api, "_clients", list(clients))
        d = api.close(timeout=5, reactor=clock)
        self.assertEqual(api._clients, [])
        clock.advance(4)
        self.assertNoResult(d)
        first.stopping[0].callback(None)
        self.assertEqual(len(second.stopping), 1)
        clock.advance(1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bad_timeout_refused(self) -> None:
        """A timeout of 0, a negative one or NaN fails with ValueError naming it, and closes nothing."""
        clock = Clock()
        bus = StoppingBus()
        client = self.client(clock, bus)
        self.patch(api, "_clients", [(object(), clock, client)])
        for bad in (0, -1.0, float("nan")):
            error = self.failureResultOf(client.close(timeout=bad), ValueError).value
            self.assertIn(repr(bad), str(error))
            error = self.failureResultOf(api.close(timeout=bad, reactor=clock), ValueError).value
            self.assertIn(repr(bad), str(error))
        self.assertEqual(bus.stopping, [])
        self.assertEqual(len(api._clients), 1)
