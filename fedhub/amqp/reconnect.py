"""
Keeping one prepared connection to a broker: L{Reconnector}.

The reconnector connects, prepares the new connection (for the AMQP
transport: log in, open the publish channel, declare the remembered topology
and resume the subscriptions), and after a failure or a loss waits with
capped exponential backoff and jitter (L{backoff}) before the next attempt.

A connection whose preparation fails (or takes longer than C{setup_timeout})
is dropped by the reconnector itself, and from then on nothing that
connection does (in particular closing late) reaches the current one:
Twisted's C{ClientService} leaves such a connection open, and its late close
knocks a healthy session back to reconnecting.  Why an attempt failed is
named by the owner's C{explain} (the AMQP transport names failed TLS
handshakes and refused logins).

The reconnector is a typed automat machine.  Its inputs come from several
places: the owner (L{Reconnector.start}, L{Reconnector.stop}), the running
attempt (prepared, or failed), the retry timer, and every connection it made
(gone).  The states, by the names L{Reconnector.state} gives them::

    idle ──start──▶ connecting ──prepared──▶ connected
                      ▲    │                   │
               timer  │    │ failed            │ current one lost
                      │    ▼                   │
                     waiting ◀─────────────────┘

    stop: idle ──▶ stopped
          connecting ──▶ stopping (the attempt is cancelled)
          waiting ──▶ stopping (the timer is cancelled)
          connected ──▶ stopping (the connection is closed)
          stopping ──every connection it made is gone──▶ stopped ──start──▶ connecting
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fedhub.amqp.protocol import map_error
from fedhub.errors import NotConnected
from fedhub.logs import HubLogger
from fedhub.text import escape_control


def backoff(
    initial: float = 1.0,
    maximum: float = 60.0,
    factor: float = 2.0,
    rand: Callable[[], float] = random.random,
) -> Callable[[int], float]:
    """
    A retry policy: capped exponential backoff with "equal jitter".

    @return: a function of the attempt number (1 for the first retry) giving
        a delay between half and all of C{min(maximum, initial * factor **
        (attempt - 1))}, so that many hubs that lost the same broker do not
        all come back in the same second.
    """

    def delay(attempt: int) -> float:
        try:
            base = min(maximum, initial * factor ** max(0, attempt - 1))
        except OverflowError:
            base = maximum
        return base * (0.5 + 0.5 * rand())

    return delay


class Connection(Protocol):
    """
    What the L{Reconnector} needs of a connection (L{AMQPClient
    <fedhub.amqp.protocol.AMQPClient>} has it).
    """

    def when_lost(self) -> Deferred[BaseException]:
        """A Deferred firing with the reason once the connection is gone."""

    def abort(self, why: str) -> None:
        """Drop the connection now."""

    def close_connection(self, timeout: float = 5.0) -> Deferred[None]:
        """Close cleanly; fire once the connection is gone."""


# --- the machine ------------------------------------------------------------------


class _Inputs(Protocol):
    """
    The inputs of the reconnector's machine.  None of them returns a value
    (L{Reconnector.stop} hands out its Deferred itself), so any of them may
    come in while the machine is busy with another (a connection that is
    gone as soon as it is aborted, an C{on_lost} that stops the reconnector):
    automat then runs it right after.
    """

    def start(self) -> None:
        """Start connecting (again, after a stop)."""

    def stop(self) -> None:
        """Stop connecting and close the current connection."""

    def _prepared(self, connection: Any, result: Any) -> None:
        """The attempt made a connection and prepared it; C{result} is C{prepare}'s."""

    def _failed(self, failure: Failure) -> None:
        """The attempt failed (or was cancelled)."""

    def _retry(self) -> None:
        """The wait before the next attempt is over."""

    def _current_lost(self, reason: BaseException) -> None:
        """The current connection (the one reported ready) is gone."""

    def _other_lost(self) -> None:
        """A connection that is not the current one is gone."""

    def _all_gone(self) -> None:
        """While stopping: no attempt runs and every connection made is gone."""


@dataclass
class _Core:
    """
    What the reconnector's states share: its configuration, the connections
    it made, and the counters L{Reconnector} shows.
    """

    connect: Callable[[], Deferred[Any]]
    prepare: Callable[[Any], Deferred[Any]]
    on_ready: Callable[[Any, Any], None]
    on_lost: Callable[[Any, BaseException], None]
    retry_delay: Callable[[int], float]
    clock: IReactorTime
    setup_timeout: float
    close_timeout: float
    describe: str
    explain: Callable[[Failure], BaseException]
    log: Logger

    state: str = "idle"
    failures: int = 0
    last_error: BaseException | None = None
    current: Any = None
    attempt: Deferred[Any] | None = None
    retry_call: IDelayedCall | None = None
    live: set[Any] = field(default_factory=set)
    stop_waiters: list[Deferred[None]] = field(default_factory=list)

    def wait_for_stop(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.stop_waiters.append(waiter)
        return waiter

    def finish_stopping(self) -> None:
        waiters, self.stop_waiters = self.stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def watch(self, connection: Any, inputs: _Inputs) -> None:
        """
        Watch a new connection until it is gone.  Only the current one's loss
        moves the machine: a late close of a connection that is not current
        (abandoned while set up, or already replaced) must not touch the
        current one.
        """
        self.live.add(connection)

        def gone(reason: BaseException) -> None:
            # Forget it at once, not when the machine gets to the input: an
            # attempt that sees it gone must not report it prepared.
            self.live.discard(connection)
            if connection is self.current:
                inputs._current_lost(reason)
            else:
                inputs._other_lost()

        connection.when_lost().addCallback(gone)

    async def connect_and_prepare(self, inputs: _Inputs) -> tuple[Any, Any]:
        """One attempt: the prepared connection and what C{prepare} gave."""
        connection = await self.connect()
        self.watch(connection, inputs)
        try:
            preparing = self.prepare(connection)
            preparing.addTimeout(self.setup_timeout, self.clock)
            result = await preparing
        except BaseException:
            # Close it here: nobody else will, and it must not linger.
            connection.abort("setting the connection up failed")
            raise
        if connection not in self.live:
            raise NotConnected("the connection was lost while it was set up")
        return connection, result

    def retry_later(self, inputs: _Inputs, delay: float) -> None:
        self.state = "waiting"
        self.retry_call = self.clock.callLater(delay, inputs._retry)

    def check_gone(self, inputs: _Inputs) -> None:
        """While stopping with no attempt running: stopped once nothing is live."""
        if not self.live:
            inputs._all_gone()


def _build() -> Callable[[_Core], _Inputs]:
    builder = TypeMachineBuilder(_Inputs, _Core)
    idle = builder.state("idle")
    connecting = builder.state("connecting")
    connected = builder.state("connected")
    waiting = builder.state("waiting")
    # Both are "stopping" to the outside: first the attempt ends...
    cancelling = builder.state("stopping: cancelling")
    # ...then every connection made is gone.
    closing = builder.state("stopping: closing")
    stopped = builder.state("stopped")

    def begin(inputs: _Inputs, core: _Core) -> None:
        core.retry_call = None
        core.state = "connecting"
        # Whatever the attempt reports, even at once, automat runs after this.
        attempt = Deferred.fromCoroutine(core.connect_and_prepare(inputs))
        attempt.addCallbacks(lambda prepared: inputs._prepared(*prepared), inputs._failed)
        attempt.addErrback(lambda f: core.log.failure("Keeping the broker connection failed", f))
        core.attempt = attempt

    @idle.upon(_Inputs.start).to(connecting)
    @stopped.upon(_Inputs.start).to(connecting)
    def start(inputs: _Inputs, core: _Core) -> None:
        core.failures = 0
        begin(inputs, core)

    @waiting.upon(_Inputs._retry).to(connecting)
    def retry(inputs: _Inputs, core: _Core) -> None:
        begin(inputs, core)

    for running in (connecting, connected, waiting, cancelling, closing):
        running.upon(_Inputs.start).loop().returns(None)

    @connecting.upon(_Inputs._prepared).to(connected)
    def prepared(inputs: _Inputs, core: _Core, connection: Any, result: Any) -> None:
        core.attempt = None
        core.state = "connected"
        core.current = connection
        core.failures = 0
        core.last_error = None
        try:
            core.on_ready(connection, result)
        except Exception:
            core.log.failure("Starting to use the broker connection failed")
            connection.abort("internal error")

    @connecting.upon(_Inputs._failed).to(waiting)
    def failed(inputs: _Inputs, core: _Core, failure: Failure) -> None:
        core.attempt = None
        core.failures += 1
        delay = core.retry_delay(core.failures)
        error = failure.value
        if isinstance(error, DeferredTimeout):
            # Connected, but the AMQP handshake (or declaring, consuming)
            # did not finish within setup_timeout: a broker that hangs.
            core.last_error = NotConnected(
                f"the broker did not finish setting the connection up within "
                f"{core.setup_timeout:g} s"
            )
            text = str(core.last_error)
        elif isinstance(error, CancelledError):
            text = "took too long"
            core.last_error = error
        else:
            core.last_error = core.explain(failure)
            text = escape_control(str(core.last_error) or type(error).__name__, 300)
        core.log.warn(
            "Connecting to {broker} failed ({error}); attempt {attempt}, next in {delay:.1f} s",
            broker=core.describe,
            error=text,
            attempt=core.failures,
            delay=delay,
        )
        core.retry_later(inputs, delay)

    def report_lost(core: _Core, reason: BaseException) -> None:
        connection, core.current = core.current, None
        try:
            core.on_lost(connection, reason)
        except Exception:
            core.log.failure("Handling the loss of the broker connection failed")

    @connected.upon(_Inputs._current_lost).to(waiting)
    def lost(inputs: _Inputs, core: _Core, reason: BaseException) -> None:
        report_lost(core, reason)
        core.failures = 1
        # Why it is not connected, until an attempt says more (an attempt
        # to a broker that hangs takes up to setup_timeout to fail).
        core.last_error = core.explain(Failure(reason))
        delay = core.retry_delay(1)
        core.log.warn(
            "Lost the connection to {broker}; reconnecting in {delay:.1f} s",
            broker=core.describe,
            delay=delay,
        )
        core.retry_later(inputs, delay)

    for unmoved in (connecting, connected, waiting, cancelling):
        unmoved.upon(_Inputs._other_lost).loop().returns(None)

    # -- stopping --

    @idle.upon(_Inputs.stop).to(stopped)
    @stopped.upon(_Inputs.stop).loop()
    def stop_now(inputs: _Inputs, core: _Core) -> None:
        core.state = "stopped"
        core.finish_stopping()

    @connecting.upon(_Inputs.stop).to(cancelling)
    def cancel_attempt(inputs: _Inputs, core: _Core) -> None:
        core.state = "stopping"
        if core.attempt is not None:
            core.attempt.cancel()

    @waiting.upon(_Inputs.stop).to(closing)
    def cancel_retry(inputs: _Inputs, core: _Core) -> None:
        core.state = "stopping"
        if core.retry_call is not None:
            core.retry_call.cancel()
            core.retry_call = None
        core.check_gone(inputs)

    @connected.upon(_Inputs.stop).to(closing)
    def close_current(inputs: _Inputs, core: _Core) -> None:
        core.state = "stopping"
        core.current.close_connection(core.close_timeout).addErrback(
            lambda f: core.log.failure("Closing the broker connection failed", f)
        )
        core.check_gone(inputs)

    cancelling.upon(_Inputs.stop).loop().returns(None)
    closing.upon(_Inputs.stop).loop().returns(None)

    @cancelling.upon(_Inputs._prepared).to(closing)
    def prepared_too_late(inputs: _Inputs, core: _Core, connection: Any, result: Any) -> None:
        core.attempt = None
        connection.abort("stopping")
        core.check_gone(inputs)

    @cancelling.upon(_Inputs._failed).to(closing)
    def attempt_ended(inputs: _Inputs, core: _Core, failure: Failure) -> None:
        core.attempt = None
        core.check_gone(inputs)

    @closing.upon(_Inputs._current_lost).loop()
    def closed(inputs: _Inputs, core: _Core, reason: BaseException) -> None:
        report_lost(core, reason)
        core.check_gone(inputs)

    @closing.upon(_Inputs._other_lost).loop()
    def other_closed(inputs: _Inputs, core: _Core) -> None:
        core.check_gone(inputs)

    @closing.upon(_Inputs._all_gone).to(stopped)
    def all_gone(inputs: _Inputs, core: _Core) -> None:
        core.state = "stopped"
        core.finish_stopping()

    # Each loss checks, so a second check may come after the first stopped.
    stopped.upon(_Inputs._all_gone).loop().returns(None)

    return builder.build()


_Machine = _build()


class Reconnector:
    """
    Keeps one prepared connection, reconnecting with backoff.

    States: C{idle} (never started), C{connecting} (connecting or
    preparing), C{connected}, C{waiting} (for the next attempt), C{stopping}
    and C{stopped}.  Every connection it made is watched until it is gone;
    only the current one's loss moves the state, so a connection abandoned
    after a failed preparation may close whenever it likes.
    """

    log = HubLogger()

    def __init__(
        self,
        connect: Callable[[], Deferred[Any]],
        prepare: Callable[[Any], Deferred[Any]],
        on_ready: Callable[[Any, Any], None],
        on_lost: Callable[[Any, BaseException], None],
        retry_delay: Callable[[int], float],
        clock: IReactorTime,
        setup_timeout: float = 30.0,
        close_timeout: float = 5.0,
        describe: str = "the broker",
        explain: Callable[[Failure], BaseException] = map_error,
        domain: str | None = None,
    ) -> None:
        """
        @param connect: Makes a new connection (a L{Connection}); a Deferred
            firing with it once the transport is connected.
        @param prepare: Makes a new connection usable; a failure (or taking
            longer than C{setup_timeout}) rejects it.
        @param on_ready: Called with the connection and C{prepare}'s result
            once it is usable.
        @param on_lost: Called with the connection and the reason when a
            connection that was reported ready is gone.
        @param retry_delay: Seconds to wait before retry number C{n} (1-based).
        @param clock: Schedules the retries and the C{setup_timeout}.
        @param setup_timeout: Seconds C{prepare} may take.
        @param close_timeout: Seconds a clean close may take on L{stop}.
        @param describe: The broker, as the log names it.
        @param explain: Why an attempt failed, from what it failed with: the
            L{last_error}.  By default L{map_error
            <fedhub.amqp.protocol.map_error>}'s name for it.
        @param domain: The domain the connection is for, given to every event
            logged (the C{domain} field of the JSON log).
        """
        self._core = _Core(
            connect,
            prepare,
            on_ready,
            on_lost,
            retry_delay,
            clock,
            setup_timeout,
            close_timeout,
            describe,
            explain,
            self.log if domain is None else cast(HubLogger, self.log).bound(domain=domain),
        )
        self._machine = _Machine(self._core)

    @property
    def state(self) -> str:
        """The current state's name."""
        return self._core.state

    @property
    def failures(self) -> int:
        """Failed attempts since the last successful one."""
        return self._core.failures

    @property
    def last_error(self) -> BaseException | None:
        """
        Why the last attempt failed, or why the connection was lost until the
        next attempt ends (as C{explain} names it); C{None} since the last
        successful attempt.
        """
        return self._core.last_error

    @property
    def current(self) -> Any:
        """The connection reported ready and not yet gone, or C{None}."""
        return self._core.current

    def start(self) -> None:
        """
        Start connecting (again, after a stop); nothing while running.
        """
        self._machine.start()

    def stop(self) -> Deferred[None]:
        """
        Stop connecting and close the current connection.

        @return: a Deferred firing once every connection this reconnector
            made is gone.
        """
        waited = self._core.wait_for_stop()
        self._machine.stop()
        return waited
