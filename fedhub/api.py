"""
Publishing from Python programs that are not the hub: confirmed publishes to
a configured domain's broker.

For Twisted programs::

    from fedhub import api
    from fedhub.message import Message

    d = api.publish(Message.create("org.example.prod.scm.push", {"repo": "x"}))
    # ... fires with None once the broker confirmed the message
    d = api.close(timeout=10)  # at the end: disconnect, waiting at most 10 s

For everything else (an SCM hook, a cron script, a WSGI application)::

    api.publish_sync(Message.create("org.example.prod.scm.push", {"repo": "x"}))

L{publish} opens one connection per domain on first use (through
L{fedhub.amqp.transport.AMQPBus}) and keeps it for later publishes until
L{close}.  Every message is published persistently, with C{mandatory} set, and
the Deferred fires only on the broker's confirm: it fails with
L{fedhub.errors.MessageReturned} when no queue is bound for the topic, with
L{fedhub.errors.MessageNacked} when the broker refuses it, with
L{fedhub.amqp.transport.PublishRefused} when the broker's permissions forbid
the exchange or topic (403), with L{fedhub.amqp.transport.MessageTooLarge} when
the body is larger than the broker takes (its C{max_message_size}), with
L{fedhub.errors.NotFound} when the exchange does not exist, with
L{fedhub.errors.AccessRefused} when the login is refused, and with
L{fedhub.errors.NotConnected} when no connection could be made in time (its
C{reason} says why).  There is no outbox here: a caller that must
not lose a message keeps it until the Deferred fires, and may publish it
again with the same id on a temporary failure (consumers recognize copies by
id).

L{publish_sync} runs the same code in a reactor that it starts in a daemon
thread on first use.  Twisted's reactor can run only once per process, so:

  - do not call L{publish_sync} in a process that runs (or ran) the reactor
    in its main thread; use L{publish} there;
  - after L{publish_sync} started it, the reactor keeps running in its thread
    until the process exits (its connections are closed at exit);
  - a child forked after that has no reactor thread: L{publish_sync} there
    raises C{RuntimeError} at once (a child that runs a new program, or a
    process that forks before its first call, is not affected).

Domains with C{broker = "memory"} live inside the hub process; nothing outside
it can reach them, so they are refused with L{DomainError}.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.defer import (
    Deferred,
    DeferredList,
    TimeoutError as DeferredTimeout,
    fail,
    maybeDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from fedhub.config import Config, DomainConfig, default_config, load_config
from fedhub.errors import (
    AccessRefused,
    FedhubError,
    NotConnected,
    TemporarilyUnavailable,
    TLSFailed,
)
from fedhub.message import Message
from fedhub.text import escape_control
from fedhub.waiting import with_timeout

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Client",
    "DomainError",
    "choose_domain",
    "close",
    "close_sync",
    "connect_bus",
    "load",
    "publish",
    "publish_sync",
    "with_timeout",
]

_T = TypeVar("_T")

#: The configuration read when none is named, if it exists; otherwise the
#: built-in default (L{fedhub.config.default_config}) is used.
DEFAULT_CONFIG_PATH = "/etc/fedhub/hub.toml"

#: Seconds to wait, by default, for a connection and for a confirm.
DEFAULT_TIMEOUT = 30.0


class DomainError(FedhubError):
    """
    A domain of the configuration can not be used as asked: it does not
    exist, none was named where several exist, or it has no broker that
    another process could reach.

    @ivar domain: The domain asked for, or C{None}.
    @ivar reason: Why, one line.
    @ivar known: The domains the configuration has.
    """

    def __init__(self, domain: str | None, reason: str, known: list[str]) -> None:
        self.domain = domain
        self.reason = reason
        self.known = sorted(known)
        super().__init__(reason)


def load(path: str | None = None) -> Config:
    """
    Read a configuration: the file at C{path}, or without one
    L{DEFAULT_CONFIG_PATH} when it exists, else the built-in default.

    @raise fedhub.errors.ConfigError: when it can not be read or is invalid.
    """
    if path is None:
        try:
            os.lstat(DEFAULT_CONFIG_PATH)
        except FileNotFoundError:
            return default_config()
        except OSError:
            pass  # there, but not to be looked at: reading it says why
        # A link to nothing, or a file that can not be read, is an error to
        # report, not a missing file to replace by the built-in default.
        path = DEFAULT_CONFIG_PATH
    return load_config(path)


def choose_domain(
    config: Config,
    name: str | None,
    *,
    need_broker: bool = True,
    how: str = "pass its name as the domain argument",
) -> DomainConfig:
    """
    The domain called C{name}, or the only one when C{name} is C{None}.

    @param need_broker: Refuse a domain on the in-process bus (C{broker =
        "memory"}), which only the hub's own process can reach.
    @param how: How the caller names a domain, for the error when several
        exist and none was named (the command line says C{--domain}).
    @raise DomainError: when there is no such domain, several and no name,
        or (with C{need_broker}) an in-process one.
    """
    known = list(config.domains)
    shown = ", ".join(sorted(known)) or "none"
    if name is None:
        if len(known) != 1:
            raise DomainError(
                None, f"name a domain: {how} (the configuration has: {shown})", known
            )
        name = known[0]
    domain = config.domains.get(name)
    if domain is None:
        raise DomainError(
            name, f"the configuration has no domain {escape_control(name)!r} (it has: {shown})", known
        )
    if need_broker and domain.is_memory:
        raise DomainError(
            name,
            f'domain {name!r} uses the in-process bus (broker = "memory"): its messages never '
            "leave the hub's process, so no other process can publish to it or follow it; "
            "configure an amqp:// or amqps:// broker for it",
            known,
        )
    return domain


def _bad_timeout(timeout: float | None) -> ValueError | None:
    """
    The error for a C{timeout} that is given and not a positive number of
    seconds, else C{None}.
    """
    if timeout is None or timeout > 0:
        return None
    return ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


class _WaitedEnough(Exception):
    """
    Closing takes longer than its caller wants to wait.
    """


def _at_most(d: Deferred[None], timeout: float | None, clock: IReactorTime) -> Deferred[None]:
    """
    A Deferred firing with C{None} when C{d} fires, or after C{timeout}
    seconds if that comes first (never, when C{None}); C{d} goes on.
    """
    if timeout is None:
        return d

    def waited_enough(failure: Failure) -> None:
        failure.trap(_WaitedEnough)

    return with_timeout(d, timeout, clock, _WaitedEnough).addErrback(waited_enough)


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


async def connect_bus(bus: Any, clock: IReactorTime, timeout: float) -> None:
    """
    Start an L{fedhub.amqp.transport.AMQPBus} (unless it runs already) and
    wait until it is connected.

    @raise AccessRefused: at once when the broker refuses the login or the
        virtual host.
    @raise TLSFailed: at once when a certificate was refused in the TLS
        handshake, on either side: waiting does not fix that.
    @raise NotConnected: when no connection was made within C{timeout}
        seconds; its C{reason} names the broker and the last error.
    """
    if not bus.running:
        bus.startService()
    if bus.connected:
        return
    connected: Deferred[None] = bus.when_connected()
    # Fails with NotConnected if the bus stops first; nobody else waits on it.
    connected.addErrback(lambda _: None)
    deadline = clock.seconds() + timeout
    while not bus.connected:
        error = bus.last_error
        if isinstance(error, AccessRefused):
            raise AccessRefused(error.reply_code, error.reply_text)
        if isinstance(error, TLSFailed) and error.certificate:
            raise TLSFailed(
                f"{error.details} (connecting to {bus.settings.safe_url()}, domain {bus.domain})",
                certificate=True,
            )
        left = deadline - clock.seconds()
        if left <= 0:
            why = "no answer"
            if isinstance(error, DeferredTimeout):
                # The TCP connection was made but the login never completed
                # (a firewall that swallows the traffic, or not a broker).
                why = "connected, but the broker did not answer the AMQP handshake"
            elif error is not None:
                why = escape_control(str(error) or type(error).__name__, 200)
            raise NotConnected(
                f"could not connect to {bus.settings.safe_url()} (domain {bus.domain}) "
                f"within {timeout:g} s: {why}"
            )
        await _sleep(clock, min(0.05, left))


class Client:
    """
    Confirmed publishing to the brokers of one configuration: one connection
    per domain, opened on first use and kept until L{close}.

    @ivar config: The configuration.
    @ivar timeout: Seconds to wait for a connection, and for each confirm.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        bus_options: dict[str, Any] | None = None,
    ) -> None:
        """
        @param reactor: Connects and keeps time.
        @param bus_options: More keyword arguments for each
            L{fedhub.amqp.transport.AMQPBus}.
        """
        self.config = config
        self.timeout = timeout
        self._reactor = reactor
        self._bus_options = dict(bus_options or {})
        self._buses: dict[str, Any] = {}
        self._closing: Deferred[None] | None = None

    def bus(self, domain: str | None = None) -> Deferred[Any]:
        """
        The connected bus of a domain (L{choose_domain} picks it).

        @return: a Deferred firing with the bus once it is connected, or
            failing with L{DomainError}, L{fedhub.errors.ConfigError} (unusable
            TLS settings), L{AccessRefused} or L{NotConnected}.
        """
        if self._closing is not None:
            return fail(NotConnected("the client is closed"))
        try:
            chosen = choose_domain(self.config, domain)
        except DomainError as e:
            return fail(e)
        bus = self._buses.get(chosen.name)
        if bus is None:
            from fedhub.amqp.transport import AMQPBus

            # The connection outlives this call and serves later ones, which
            # may wait longer: a short first timeout must not make it drop
            # slow confirms or handshakes for them.  Each call is bounded by
            # its own timeout (see publish).
            deadline = max(self.timeout, DEFAULT_TIMEOUT)
            options = {
                "confirm_timeout": deadline,
                "reconnect_initial": 0.25,
                "reconnect_max": 5.0,
                "setup_timeout": deadline,
            }
            options.update(self._bus_options)
            try:
                bus = AMQPBus.from_domain(chosen, self._reactor, **options)
                bus.startService()
            except Exception as e:
                return fail(e)
            self._buses[chosen.name] = bus
        connected = Deferred.fromCoroutine(connect_bus(bus, self._reactor, self.timeout))
        return connected.addCallback(lambda _: bus)

    def publish(self, message: Message, domain: str | None = None) -> Deferred[None]:
        """
        Publish one message and wait for the broker's confirm (see the module
        docstring for the failures).
        """
        if not isinstance(message, Message):
            return fail(TypeError(f"expected a Message, not {type(message).__name__}"))
        timeout = self.timeout
        deadline = self._reactor.seconds() + timeout

        def send(bus: Any) -> Deferred[None]:
            # Connecting is bounded by connect_bus (its NotConnected says
            # why); the confirm gets what is left of this call's timeout.
            left = max(deadline - self._reactor.seconds(), 0.001)
            return with_timeout(
                bus.publish(message),
                left,
                self._reactor,
                lambda: TemporarilyUnavailable(
                    f"message {message.id} was not confirmed within {timeout:g} s", message.id
                ),
            )

        return self.bus(domain).addCallback(send)

    def close(self, timeout: float | None = None) -> Deferred[None]:
        """
        Close every connection.  Each one first waits for the confirms of the
        messages already sent (at most its confirm timeout: the client's
        C{timeout} when the connection opened, or L{DEFAULT_TIMEOUT} if longer),
        then closes (a few more seconds at most); the connections close at
        the same time.  Messages not sent yet fail at once with
        L{NotConnected}, and so do those whose confirm had not come when
        their connection closed.  Later calls of L{publish} fail with
        L{NotConnected}.

        @param timeout: Seconds to wait at most, for all the connections
            together; C{None} to wait for them however long that takes.  When
            it passes, the Deferred fires all the same and the connections go
            on closing (and failing their publishes) in the background.
        @return: a Deferred firing with C{None}; failing with C{ValueError}
            (and closing nothing) when C{timeout} is not a positive number of
            seconds.
        """
        error = _bad_timeout(timeout)
        if error is not None:
            return fail(error)
        if self._closing is None:
            buses, self._buses = list(self._buses.values()), {}
            self._closing = self._close(buses)
        waiter: Deferred[None] = Deferred()

        def closed(result: object) -> object:
            waiter.callback(None)
            return result

        self._closing.addBoth(closed)
        return _at_most(waiter, timeout, self._reactor)

    @staticmethod
    def _close(buses: list[Any]) -> Deferred[None]:
        """
        Stop every bus at once; fires when the last has stopped, whether
        its stop succeeded or not.
        """
        stops = [maybeDeferred(bus.stopService) for bus in buses]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)


# --- module-level functions ------------------------------------------------

#: Clients made by L{publish}: one per (configuration, reactor).
_clients: list[tuple[Config, Any, Client]] = []
#: Configurations read by L{publish} and L{publish_sync}, by path (C{None}:
#: the default one).
_configs: dict[str | None, Config] = {}
#: Held while reading a configuration: threads calling L{publish_sync} at once
#: must share one L{Config}, since a client (and its connections) is kept per
#: configuration object.
_configs_lock = threading.Lock()


def _config(path: str | None) -> Config:
    with _configs_lock:
        config = _configs.get(path)
        if config is None:
            config = _configs[path] = load(path)
        return config


def _client(config: Config, reactor: Any, timeout: float) -> Client:
    for known, known_reactor, client in _clients:
        if known is config and known_reactor is reactor:
            client.timeout = timeout
            return client
    client = Client(config, reactor, timeout=timeout)
    _clients.append((config, reactor, client))
    return client


def publish(
    message: Message,
    domain: str | None = None,
    *,
    config: Config | None = None,
    reactor: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Deferred[None]:
    """
    Publish one message to a domain's broker and wait for its confirm.

    The connection is opened on first use and kept for later calls with the
    same configuration and reactor, until L{close}.

    @param domain: The domain; C{None} for the only one of the configuration.
    @param config: The configuration; C{None} reads L{DEFAULT_CONFIG_PATH}
        (or uses the built-in default when it does not exist) once.
    @param reactor: The reactor; C{None} for the global one.
    @param timeout: Seconds to wait for the connection, and for the confirm.
    @return: a Deferred firing with C{None} on the confirm; see the module
        docstring for its failures (and C{ValueError} for a timeout that is
        not a positive number of seconds).
    """
    if not timeout > 0:
        return fail(ValueError(f"timeout must be a positive number of seconds, not {timeout!r}"))
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if config is None:
        try:
            config = _config(None)
        except FedhubError as e:
            return fail(e)
    return _client(config, reactor, timeout).publish(message, domain)


def close(timeout: float | None = None, *, reactor: Any = None) -> Deferred[None]:
    """
    Close every connection L{publish} opened, as L{Client.close} does: after
    the confirms of the messages already sent (each connection waits at most
    its confirm timeout, L{publish}'s C{timeout} when it connected or
    L{DEFAULT_TIMEOUT} if longer, then a few seconds to close), the
    connections closing at the same time.  Later calls of L{publish} connect again.

    @param timeout: Seconds to wait at most, for all the connections
        together; C{None} to wait however long their limits allow.  When it
        passes, the Deferred fires all the same and the connections go on
        closing in the background (L{close_sync} waits 10 s by default).
    @param reactor: Keeps time for C{timeout}; C{None} for the global
        reactor.  Connections opened with any reactor are closed.
    @return: a Deferred firing with C{None}; failing with C{ValueError} (and
        closing nothing) when C{timeout} is not a positive number of seconds.
    """
    error = _bad_timeout(timeout)
    if error is not None:
        return fail(error)
    if timeout is not None and reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    clients = [client for _, _, client in _clients]
    del _clients[:]

    closing = DeferredList([client.close() for client in clients], consumeErrors=True)
    return _at_most(closing.addCallback(lambda _: None), timeout, reactor)


# --- the blocking wrapper ----------------------------------------------------

_lock = threading.Lock()
_thread: threading.Thread | None = None
#: The process that started L{_thread}: a child forked later has the reactor's
#: state and its parent's sockets, but not the thread.
_thread_pid: int | None = None


def _running_reactor() -> Any:
    """
    The global reactor, running in a thread other than the caller's: started
    in a daemon thread on the first call.

    @raise RuntimeError: when called in the reactor's own thread, when the
        reactor ran and stopped before (it can not run twice), or in a child
        forked after the reactor thread started.
    """
    global _thread, _thread_pid
    from twisted.internet import reactor as global_reactor
    from twisted.python import threadable

    reactor = cast(Any, global_reactor)
    with _lock:
        if _forked():
            raise RuntimeError(
                "publish_sync can not be used in a process forked after it started the "
                "reactor thread (the thread does not survive a fork, and the connections "
                "belong to the parent); publish from the parent, fork before the first "
                "call, or start a new program (exec) in the child"
            )
        if reactor.running:
            if threadable.isInIOThread():  # type: ignore[no-untyped-call]
                raise RuntimeError(
                    "publish_sync was called in the reactor's thread, where it would wait "
                    "forever; use fedhub.api.publish there"
                )
            return reactor
        if _thread is not None or getattr(reactor, "_startedBefore", False):
            raise RuntimeError(
                "the Twisted reactor of this process has stopped and can not run again"
            )
        started = threading.Event()
        reactor.callWhenRunning(started.set)
        thread = threading.Thread(
            target=reactor.run,
            kwargs={"installSignalHandlers": False},
            name="fedhub-reactor",
            daemon=True,
        )
        thread.start()
        if not started.wait(30):
            raise RuntimeError("the Twisted reactor did not start within 30 s")
        _thread = thread
        _thread_pid = os.getpid()
        atexit.register(_shutdown)
        return reactor


def _forked() -> bool:
    """
    Whether this process is a child forked after L{publish_sync} started the
    reactor thread in its parent.
    """
    return _thread_pid is not None and _thread_pid != os.getpid()


def _call(reactor: Any, fn: Callable[[], Deferred[_T]], timeout: float) -> _T:
    """
    Run C{fn} in the reactor's thread and wait (at most C{timeout} seconds
    plus a margin) for its Deferred.
    """
    results: queue.Queue[object] = queue.Queue()

    def start() -> None:
        try:
            d = fn()
        except BaseException as e:  # noqa: B036 - handed to the waiting thread
            results.put(Failure(e))  # type: ignore[no-untyped-call]
            return
        d.addBoth(results.put)

    reactor.callFromThread(start)
    try:
        outcome = results.get(timeout=timeout + 10.0)
    except queue.Empty:
        raise TemporarilyUnavailable(f"no answer from the reactor thread within {timeout:g} s") from None
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return cast(_T, outcome)


def publish_sync(
    message: Message,
    domain: str | None = None,
    *,
    config_path: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """
    Publish one message and block until the broker confirmed it, for
    programs that do not run Twisted.  Safe to call from several threads.

    The first call starts Twisted's reactor in a daemon thread (see the module
    docstring for what that means for the rest of the process); the
    connection is kept for later calls and closed when the process exits.

    @param domain: The domain; C{None} for the only one of the configuration.
    @param config_path: The configuration file; C{None} for
        L{DEFAULT_CONFIG_PATH} or the built-in default.
    @param timeout: Seconds the whole call may take: connecting, publishing
        and the confirm.  When it passes, the message may still arrive; to
        try again, publish the same message (same id).
    @raise fedhub.errors.FedhubError: what L{publish} fails with; on the
        timeout, L{TemporarilyUnavailable}.
    @raise RuntimeError: when the reactor can not be used from here (its own
        thread, a reactor that stopped, a child forked after the first call).
    @raise ValueError: when C{timeout} is not a positive number of seconds.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    config = _config(config_path)
    reactor = _running_reactor()

    def run() -> Deferred[None]:
        # publish bounds the whole call by the timeout.
        return publish(message, domain, config=config, reactor=reactor, timeout=timeout)

    _call(reactor, run, timeout)


def close_sync(timeout: float = 10.0) -> None:
    """
    Close the connections L{publish_sync} opened, waiting at most
    C{timeout} seconds.  Later calls of L{publish_sync} connect again.
    """
    if _thread is None or _forked():
        return
    from twisted.internet import reactor as global_reactor

    reactor = cast(Any, global_reactor)
    if not reactor.running:
        return
    try:
        _call(
            reactor,
            lambda: with_timeout(close(), timeout, reactor, lambda: TemporarilyUnavailable("close")),
            timeout,
        )
    except FedhubError:
        pass


def _shutdown() -> None:
    """
    At exit: close the connections, then stop the reactor thread.
    """
    if _forked():
        # Both belong to the parent, which closes them itself.
        return
    from twisted.internet import reactor as global_reactor

    reactor = cast(Any, global_reactor)
    close_sync(5.0)
    if reactor.running:
        reactor.callFromThread(reactor.stop)
    thread = _thread
    if thread is not None:
        thread.join(5.0)
