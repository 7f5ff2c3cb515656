"""
Tests for L{fedhub.amqp.reconnect}: the L{Reconnector} machine and the
L{backoff} policy, on a fake clock with fake connections (no broker).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from fedhub.amqp import transport
from fedhub.amqp.reconnect import Connection, Reconnector, backoff
from fedhub.errors import NotConnected


class FakeConnection:
    """
    A connection for the reconnector: lost on demand.

    @ivar close_now: Whether a clean close loses it at once; otherwise
        L{closing} fires (or fails) when the test says.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.aborted = False
        self.why: str | None = None
        self.closed = False
        self.lost = False
        self.close_now = True
        self.closing: Deferred[None] = Deferred()
        self._waiters: list[Deferred[BaseException]] = []

    def when_lost(self) -> Deferred[BaseException]:
        d: Deferred[BaseException] = Deferred()
        self._waiters.append(d)
        return d

    def abort(self, why: str) -> None:
        self.aborted = True
        self.why = why

    def close_connection(self, timeout: float = 5.0) -> Deferred[None]:
        self.closed = True
        self.close_timeout = timeout
        if self.close_now:
            self.lose()
            return succeed(None)
        return self.closing

    def lose(self, reason: BaseException | None = None) -> None:
        if not self.lost:
            self.lost = True
            for d in self._waiters:
                d.callback(reason or ConnectionLost())


class ReconnectorTests(SynchronousTestCase):
    """
    L{Reconnector} keeps one prepared connection.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.connections: list[FakeConnection] = []
        self.preparing: list[Deferred[Any]] = []
        self.events: list[tuple[str, str]] = []
        self.connect_results: list[Deferred[Any]] = []
        self.reconnector = self.make()
        self.logged: list[LogEvent] = []
        observer = cast(ILogObserver, self.logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def make(self, **kwargs: Any) -> Reconnector:
        """A reconnector on the fakes; C{kwargs} replace its arguments."""
        arguments: dict[str, Any] = dict(
            connect=self.connect,
            prepare=self.prepare,
            on_ready=self.on_ready,
            on_lost=self.on_lost,
            retry_delay=backoff(1.0, 8.0, rand=lambda: 1.0),
            clock=self.clock,
            setup_timeout=30.0,
            close_timeout=7.0,
            describe="the test broker",
        )
        arguments.update(kwargs)
        return Reconnector(**arguments)

    def on_ready(self, connection: Any, result: Any) -> None:
        self.events.append(("ready", connection.name))

    def on_lost(self, connection: Any, reason: BaseException) -> None:
        self.events.append(("lost", connection.name))

    def warnings(self) -> list[str]:
        """The texts of the warnings the reconnector logged."""
        return [
            formatEvent(e)
            for e in self.logged
            if e.get("log_level") == LogLevel.warn
            and e.get("log_namespace") == "fedhub.amqp.reconnect.Reconnector"
        ]

    def connect(self) -> Deferred[Any]:
        if self.connect_results:
            return self.connect_results.pop(0)
        connection = FakeConnection(f"c{len(self.connections) + 1}")
        self.connections.append(connection)
        return succeed(connection)

    def prepare(self, connection: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.preparing.append(d)
        return d

    def test_late_close_of_rejected_connection(self) -> None:
        """
        A connection whose preparation failed is aborted by the reconnector;
        when it closes late, after a healthy connection took over, the healthy
        one stays current and nothing reconnects.
        """
        self.reconnector.start()
        self.preparing[0].errback(RuntimeError("declare failed"))
        first = self.connections[0]
        self.assertTrue(first.aborted)
        self.assertEqual(self.reconnector.state, "waiting")
        self.clock.advance(1.0)
        self.preparing[1].callback(None)
        second = self.connections[1]
        self.assertEqual(self.reconnector.state, "connected")
        first.lose()
        self.assertEqual(self.reconnector.state, "connected")
        self.assertIs(self.reconnector.current, second)
        self.assertEqual(self.events, [("ready", "c2")])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        second.lose()
        self.assertEqual(self.events, [("ready", "c2"), ("lost", "c2")])
        self.assertEqual(self.reconnector.state, "waiting")

    def test_backoff_grows_and_resets(self) -> None:
        """
        Failed attempts wait 1, 2, 4, 8, 8 seconds; a success resets the count.
        """
        delays = []
        self.reconnector.start()
        for _ in range(5):
            self.preparing[-1].errback(RuntimeError("no"))
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 8.0])
        self.preparing[-1].callback(None)
        self.assertEqual(self.reconnector.failures, 0)

    def test_setup_timeout(self) -> None:
        """
        A preparation that takes longer than setup_timeout rejects the
        connection, which is aborted.
        """
        self.reconnector.start()
        self.clock.advance(30.0)
        self.assertTrue(self.connections[0].aborted)
        self.assertEqual(self.reconnector.state, "waiting")

    def test_stop_while_connected(self) -> None:
        """
        stop() closes the current connection and fires once it is gone, with
        no reconnect.
        """
        self.reconnector.start()
        self.preparing[0].callback(None)
        stopped = self.reconnector.stop()
        self.assertTrue(self.connections[0].closed)
        self.successResultOf(stopped)
        self.assertEqual(self.reconnector.state, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_while_preparing(self) -> None:
        """
        stop() while a connection is set up aborts it and waits until it is gone.
        """
        self.reconnector.start()
        stopped = self.reconnector.stop()
        self.assertTrue(self.connections[0].aborted)
        self.assertNoResult(stopped)
        self.connections[0].lose()
        self.successResultOf(stopped)
        self.assertEqual(self.events, [])

    def test_stop_while_waiting(self) -> None:
        """
        stop() between attempts cancels the next attempt.
        """
        self.reconnector.start()
        self.preparing[0].errback(RuntimeError("no"))
        self.connections[0].lose()
        self.successResultOf(self.reconnector.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.reconnector.start()
        self.assertEqual(len(self.connections), 2)

    def test_lost_while_preparing(self) -> None:
        """
        A connection lost while it is set up is not reported ready even if
        the preparation then succeeds.
        """
        self.reconnector.start()
        self.connections[0].lose()
        self.preparing[0].callback(None)
        self.assertEqual(self.events, [])
        self.assertEqual(self.reconnector.state, "waiting")

    def test_backoff_jitter_and_cap(self) -> None:
        """
        The delay is between half and all of the capped exponential value.
        """
        low = backoff(1.0, 60.0, rand=lambda: 0.0)
        high = backoff(1.0, 60.0, rand=lambda: 1.0)
        self.assertEqual((low(1), high(1)), (0.5, 1.0))
        self.assertEqual((low(3), high(3)), (2.0, 4.0))
        self.assertEqual(high(100), 60.0)
        self.assertEqual(high(10**6), 60.0)


    # -- starting and connecting ------------------------------------------------

    def test_states(self) -> None:
        """The state names follow idle, connecting, connected, waiting, stopping, stopped."""
        seen = [self.reconnector.state]
        self.reconnector.start()
        seen.append(self.reconnector.state)
        self.preparing[0].callback(None)
        seen.append(self.reconnector.state)
        self.connections[0].lose()
        seen.append(self.reconnector.state)
        self.clock.advance(1.0)
        self.preparing[1].callback(None)
        self.connections[1].close_now = False
        stopped = self.reconnector.stop()
        seen.append(self.reconnector.state)
        self.connections[1].lose()
        seen.append(self.reconnector.state)
        self.successResultOf(stopped)
        self.assertEqual(
            seen, ["idle", "connecting", "connected", "waiting", "stopping", "stopped"]
        )

    def test_start_while_running_does_nothing(self) -> None:
        """start() while connecting, connected or waiting makes no second connection."""
        self.reconnector.start()
        self.reconnector.start()
        self.assertEqual(len(self.connections), 1)
        self.preparing[0].callback(None)
        self.reconnector.start()
        self.assertEqual((len(self.connections), self.reconnector.state), (1, "connected"))
        self.connections[0].lose()
        self.reconnector.start()
        self.assertEqual((len(self.connections), self.reconnector.state), (1, "waiting"))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_start_while_stopping_does_nothing(self) -> None:
        """start() while stopping neither connects nor cancels the stop."""
        self.reconnector.start()
        self.preparing[0].callback(None)
        self.connections[0].close_now = False
        stopped = self.reconnector.stop()
        self.reconnector.start()
        self.assertEqual((len(self.connections), self.reconnector.state), (1, "stopping"))
        self.connections[0].lose()
        self.successResultOf(stopped)
        self.assertEqual(self.reconnector.state, "stopped")

    def test_ready_reports_connection_and_result(self) -> None:
        """on_ready gets the connection and what prepare gave; it becomes current."""
        results: list[tuple[Any, Any]] = []
        self.reconnector = self.make(on_ready=lambda c, r: results.append((c, r)))
        self.reconnector.start()
        self.preparing[0].callback("session")
        self.assertEqual(results, [(self.connections[0], "session")])
        self.assertIs(self.reconnector.current, self.connections[0])

    def test_connect_fails(self) -> None:
        """
        A connect that fails counts as a failed attempt: logged with the
        error and the next delay, remembered in last_error, retried.
        """
        self.connect_results = [fail(ConnectionRefusedError("nobody home"))]
        self.reconnector.start()
        self.assertEqual(self.reconnector.state, "waiting")
        self.assertEqual(self.reconnector.failures, 1)
        self.assertIsInstance(self.reconnector.last_error, ConnectionRefusedError)
        (event,) = [e for e in self.logged if e.get("log_level") == LogLevel.warn]
        self.assertEqual(
            event["log_format"],
            "Connecting to {broker} failed ({error}); attempt {attempt}, next in {delay:.1f} s",
        )
        self.assertEqual(
            (event["broker"], event["attempt"], event["delay"]), ("the test broker", 1, 1.0)
        )
        self.assertIn("nobody home", event["error"])
        self.clock.advance(1.0)
        self.assertEqual((len(self.connections), self.reconnector.state), (1, "connecting"))
        self.preparing[0].callback(None)
        self.assertEqual((self.reconnector.failures, self.reconnector.last_error), (0, None))

    def test_connect_raises(self) -> None:
        """A connect that raises instead of failing its Deferred is a failed attempt too."""

        def broken() -> Deferred[Any]:
            raise RuntimeError("no endpoint")

        self.reconnector = self.make(connect=broken)
        self.reconnector.start()
        self.assertEqual(self.reconnector.state, "waiting")
        self.assertEqual(str(self.reconnector.last_error), "no endpoint")

    def test_error_text_is_escaped(self) -> None:
        """The error in the warning has its control characters escaped."""
        self.connect_results = [fail(RuntimeError("bad\nline\x1b[31m"))]
        self.reconnector.start()
        (event,) = [e for e in self.logged if e.get("log_level") == LogLevel.warn]
        self.assertNotIn("\n", event["error"])
        self.assertNotIn("\x1b", event["error"])

    def test_error_without_text_is_named_by_type(self) -> None:
        """An error with no text is named by its type in the warning."""
        self.connect_results = [fail(RuntimeError())]
        self.reconnector.start()
        self.assertEqual(
            self.warnings(),
            ["Connecting to the test broker failed (RuntimeError); attempt 1, next in 1.0 s"],
        )

    def test_cancelled_attempt_took_too_long(self) -> None:
        """An attempt cancelled from outside (not by stop) took too long."""
        connecting: Deferred[Any] = Deferred()
        self.connect_results = [connecting]
        self.reconnector.start()
        connecting.cancel()
        self.assertEqual(self.reconnector.state, "waiting")
        self.assertIsInstance(self.reconnector.last_error, CancelledError)
        self.assertEqual(
            self.warnings(),
            ["Connecting to the test broker failed (took too long); attempt 1, next in 1.0 s"],
        )

    def test_explain_names_the_error(self) -> None:
        """last_error is what explain makes of the failure."""
        named = NotConnected("named")
        seen: list[Failure] = []

        def explain(failure: Failure) -> BaseException:
            seen.append(failure)
            return named

        self.reconnector = self.make(explain=explain)
        self.connect_results = [fail(ConnectionRefusedError())]
        self.reconnector.start()
        self.assertIs(self.reconnector.last_error, named)
        self.assertIsInstance(seen[0].value, ConnectionRefusedError)
        self.assertIn("(named)", self.warnings()[0])

    def test_prepare_fails(self) -> None:
        """A failed preparation aborts the connection, which stays watched."""
        self.reconnector.start()
        self.preparing[0].errback(RuntimeError("declare failed"))
        self.assertEqual(self.connections[0].why, "setting the connection up failed")
        self.assertEqual(str(self.reconnector.last_error), "declare failed")
        self.assertEqual(self.reconnector.state, "waiting")
        stopped = self.reconnector.stop()
        self.assertNoResult(stopped)
        self.connections[0].lose()
        self.successResultOf(stopped)

    def test_prepare_raises(self) -> None:
        """A prepare that raises instead of failing its Deferred rejects and aborts the connection."""

        def broken(connection: Any) -> Deferred[Any]:
            raise RuntimeError("broken")

        self.reconnector = self.make(prepare=broken)
        self.reconnector.start()
        self.assertTrue(self.connections[0].aborted)
        self.assertEqual(self.reconnector.state, "waiting")

    def test_setup_timeout_logged(self) -> None:
        """A preparation that times out is logged as a failed attempt and retried."""
        self.reconnector.start()
        self.clock.advance(30.0)
        self.assertEqual(self.warnings(), [
            "Connecting to the test broker failed (the broker did not finish setting the "
            "connection up within 30 s); attempt 1, next in 1.0 s"
        ])
        self.assertEqual(str(self.reconnector.last_error),
                         "the broker did not finish setting the connection up within 30 s")
        self.assertEqual(self.reconnector.failures, 1)
        self.connections[0].lose()
        self.clock.advance(1.0)
        self.preparing[1].callback(None)
        self.assertEqual(self.events, [("ready", "c2")])

    def test_all_at_once(self) -> None:
        """
        A connect and a prepare that both succeed at once leave it connected,
        and a stop then still fires once the connection is gone.
        """
        self.reconnector = self.make(prepare=lambda connection: succeed("now"))
        self.reconnector.start()
        self.assertEqual(self.reconnector.state, "connected")
        self.assertEqual(self.events, [("ready", "c1")])
        self.successResultOf(self.reconnector.stop())
        self.assertEqual(self.reconnector.state, "stopped")

    def test_fails_at_once(self) -> None:
        """A connection lost while it was prepared, all at once, is a failed attempt."""

        def prepare(connection: Any) -> Deferred[Any]:
            connection.lose()
            return succeed(None)

        self.reconnector = self.make(prepare=prepare)
        self.reconnector.start()
        self.assertEqual(self.reconnector.state, "waiting")
        self.assertIsInstance(self.reconnector.last_error, NotConnected)
        self.assertEqual(self.events, [])
        self.successResultOf(self.reconnector.stop())

    # -- losing ------------------------------------------------------------------

    def test_loss_logged_and_retried_after_first_delay(self) -> None:
        """The loss of the current connection is logged and retried after the first delay."""
        self.reconnector.start()
        self.preparing[0].errback(RuntimeError("no"))
        self.connections[0].lose()
        self.clock.advance(1.0)
        self.preparing[1].errback(RuntimeError("no"))
        self.clock.advance(2.0)
        self.preparing[2].callback(None)
        self.logged.clear()
        self.connections[2].lose()
        self.assertEqual(
            self.warnings(), ["Lost the connection to the test broker; reconnecting in 1.0 s"]
        )
        self.assertEqual((self.reconnector.failures, self.reconnector.current), (1, None))
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 1.0)

    def test_loss_is_the_last_error(self) -> None:
        """
        Once the current connection is lost, last_error says why until the
        next attempt ends: the status page names the reason while an
        attempt to a broker that hangs takes its time.
        """
        self.reconnector.start()
        self.preparing[0].callback(None)
        self.assertIsNone(self.reconnector.last_error)
        self.connections[0].lose(ConnectionLost("missed heartbeats"))
        self.assertIsInstance(self.reconnector.last_error, ConnectionLost)
        self.assertIn("missed heartbeats", str(self.reconnector.last_error))
        self.clock.advance(1.0)
        self.assertEqual(self.reconnector.state, "connecting")
        self.assertIn("missed heartbeats", str(self.reconnector.last_error))
        self.preparing[1].callback(None)
        self.assertIsNone(self.reconnector.last_error)

    def test_on_ready_raises(self) -> None:
        """
        An on_ready that raises is logged and its connection aborted; its
        loss is then reported like any other.
        """

        def on_ready(connection: Any, result: Any) -> None:
            raise RuntimeError("plugin bug")

        self.reconnector = self.make(on_ready=on_ready)
        self.reconnector.start()
        self.preparing[0].callback(None)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.connections[0].why, "internal error")
        self.assertEqual(self.reconnector.state, "connected")
        self.connections[0].lose()
        self.assertEqual(self.events, [("lost", "c1")])
        self.assertEqual(self.reconnector.state, "waiting")

    def test_on_ready_raises_and_abort_loses_at_once(self) -> None:
        """When the abort after a failed on_ready loses the connection at once, it reconnects."""

        def on_ready(connection: Any, result: Any) -> None:
            raise RuntimeError("plugin bug")

        self.reconnector = self.make(on_ready=on_ready)
        self.reconnector.start()
        self.connections[0].abort = lambda why: self.connections[0].lose()  # type: ignore[method-assign]
        self.preparing[0].callback(None)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.events, [("lost", "c1")])
        self.assertEqual(self.reconnector.state, "waiting")
        self.assertIsNone(self.reconnector.current)

    def test_domain_on_every_event(self) -> None:
        """
        Given its domain, every event the reconnector logs carries it (the
        JSON log's C{domain} field), so that the connection of one domain is
        told from another's on a hub with several; the logger's namespace
        stays the reconnector's.
        """
        self.reconnector = self.make(domain="infra")
        self.reconnector.start()
        self.preparing[0].errback(RuntimeError("no"))
        self.connections[0].lose()
        self.clock.advance(1.0)
        self.preparing[1].callback(None)
        self.connections[1].lose()
        ours = [e for e in self.logged
                if e.get("log_namespace") == "fedhub.amqp.reconnect.Reconnector"]
        self.assertGreaterEqual(len(ours), 2)
        self.assertEqual({e.get("domain") for e in ours}, {"infra"})
        self.successResultOf(self.reconnector.stop())

    def test_on_lost_raises(self) -> None:
        """An on_lost that raises is logged; reconnecting goes on."""

        def on_lost(connection: Any, reason: BaseException) -> None:
            raise RuntimeError("plugin bug")

        self.reconnector = self.make(on_lost=on_lost)
        self.reconnector.start()
        self.preparing[0].callback(None)
        self.connections[0].lose()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.reconnector.state, "waiting")
        self.clock.advance(1.0)
        self.assertEqual(len(self.connections), 2)

    def test_on_lost_gets_the_reason(self) -> None:
        """on_lost gets the connection and the reason it is gone."""
        reasons: list[tuple[Any, BaseException]] = []
        self.reconnector = self.make(on_lost=lambda c, r: reasons.append((c, r)))
        self.reconnector.start()
        self.preparing[0].callback(None)
        why = ConnectionLost("reset")
        self.connections[0].lose(why)
        self.assertEqual(reasons, [(self.connections[0], why)])

    # -- stopping ----------------------------------------------------------------

    def test_stop_before_start(self) -> None:
        """stop() before start() fires at once; start() then connects."""
        self.successResultOf(self.reconnector.stop())
        self.assertEqual(self.reconnector.state, "stopped")
        self.successResultOf(self.reconnector.stop())
        self.reconnector.start()
        self.assertEqual((len(self.connections), self.reconnector.state), (1, "connecting"))

    def test_stop_while_connecting(self) -> None:
        """stop() before the transport is connected cancels the connect and fires at once."""
        cancelled: list[Deferred[Any]] = []
        self.connect_results = [Deferred(cancelled.append)]
        self.reconnector.start()
        self.successResultOf(self.reconnector.stop())
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(self.reconnector.state, "stopped")
        self.assertEqual(self.warnings(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_twice(self) -> None:
        """A second stop() while stopping fires together with the first."""
        self.reconnector.start()
        first = self.reconnector.stop()
        second = self.reconnector.stop()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.connections[0].lose()
        self.successResultOf(first)
        self.successResultOf(second)

    def test_stop_closes_with_close_timeout(self) -> None:
        """
        stop() while connected closes with close_timeout, reports the loss,
        and fires once the connection is gone.
        """
        self.reconnector.start()
        self.preparing[0].callback(None)
        connection = self.connections[0]
        connection.close_now = False
        stopped = self.reconnector.stop()
        self.assertEqual(connection.close_timeout, 7.0)
        self.assertNoResult(stopped)
        self.assertIs(self.reconnector.current, connection)
        connection.lose()
        self.successResultOf(stopped)
        self.assertEqual(self.events, [("ready", "c1"), ("lost", "c1")])
        self.assertIsNone(self.reconnector.current)
        self.assertEqual(self.warnings(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_close_fails(self) -> None:
        """A clean close that fails is logged; the stop still waits for the loss."""
        self.reconnector.start()
        self.preparing[0].callback(None)
        connection = self.connections[0]
        connection.close_now = False
        stopped = self.reconnector.stop()
        connection.closing.errback(RuntimeError("close timed out"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNoResult(stopped)
        connection.lose()
        self.successResultOf(stopped)

    def test_stop_waits_for_abandoned_connections(self) -> None:
        """stop() fires only once a connection abandoned earlier is gone too."""
        self.reconnector.start()
        self.preparing[0].errback(RuntimeError("no"))
        self.clock.advance(1.0)
        self.preparing[1].callback(None)
        stopped = self.reconnector.stop()
        self.assertTrue(self.connections[1].lost)
        self.assertNoResult(stopped)
        self.assertEqual(self.reconnector.state, "stopping")
        self.connections[0].lose()
        self.successResultOf(stopped)
        self.assertEqual(self.events, [("ready", "c2"), ("lost", "c2")])

    def test_stop_while_preparing_succeeds_anyway(self) -> None:
        """
        A preparation that still succeeds when stop() cancels it is not
        reported ready: its connection is aborted.
        """
        self.reconnector = self.make(
            prepare=lambda connection: Deferred(lambda d: d.callback("late"))
        )
        self.reconnector.start()
        stopped = self.reconnector.stop()
        self.assertEqual(self.connections[0].why, "stopping")
        self.assertEqual(self.events, [])
        self.assertNoResult(stopped)
        self.connections[0].lose()
        self.successResultOf(stopped)
        self.assertEqual(self.reconnector.state, "stopped")

    def test_stop_while_preparing_lost_at_once(self) -> None:
        """A connection lost as its preparation is cancelled lets the stop fire at once."""

        def prepare(connection: Any) -> Deferred[Any]:
            def cancel(d: Deferred[Any]) -> None:
                connection.lose()
                d.callback(None)

            return Deferred(cancel)

        self.reconnector = self.make(prepare=prepare)
        self.reconnector.start()
        self.successResultOf(self.reconnector.stop())
        self.assertEqual(self.reconnector.state, "stopped")
        self.assertEqual((self.events, self.warnings()), ([], []))

    def test_stop_from_on_ready(self) -> None:
        """on_ready may stop the reconnector: the new connection is closed."""
        stops: list[Deferred[None]] = []
        self.reconnector = self.make(on_ready=lambda c, r: stops.append(self.reconnector.stop()))
        self.reconnector.start()
        self.preparing[0].callback(None)
        self.successResultOf(stops[0])
        self.assertTrue(self.connections[0].closed)
        self.assertEqual(self.reconnector.state, "stopped")

    def test_stop_from_on_lost(self) -> None:
        """on_lost may stop the reconnector: no retry stays scheduled."""
        stops: list[Deferred[None]] = []
        self.reconnector = self.make(on_lost=lambda c, r: stops.append(self.reconnector.stop()))
        self.reconnector.start()
        self.preparing[0].callback(None)
        self.connections[0].lose()
        self.successResultOf(stops[0])
        self.assertEqual(self.reconnector.state, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restart_from_stop_waiter(self) -> None:
        """What waits for the stop may start it again."""
        self.reconnector.start()
        self.preparing[0].callback(None)
        self.reconnector.stop().addCallback(lambda _: self.reconnector.start())
        self.assertEqual((len(self.connections), self.reconnector.state), (2, "connecting"))

    def test_restart_after_stop_resets_failures(self) -> None:
        """start() after a stop connects again, counting failures from zero."""
        self.reconnector.start()
        self.preparing[0].errback(RuntimeError("no"))
        self.connections[0].lose()
        self.successResultOf(self.reconnector.stop())
        self.reconnector.start()
        self.assertEqual(self.reconnector.failures, 0)
        self.preparing[1].errback(RuntimeError("no"))
        self.assertEqual(self.reconnector.failures, 1)
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 1.0)


class ReexportTests(SynchronousTestCase):
    """
    The transport module still offers the reconnector under its old names.
    """

    def test_transport_reexports(self) -> None:
        """fedhub.amqp.transport.Reconnector and backoff are the reconnect module's."""
        self.assertIs(transport.Reconnector, Reconnector)
        self.assertIs(transport.backoff, backoff)

    def test_fake_is_a_connection(self) -> None:
        """The fake connection has what the Connection protocol asks for."""
        connection: Connection = FakeConnection("c")
        self.assertTrue(callable(connection.when_lost))
