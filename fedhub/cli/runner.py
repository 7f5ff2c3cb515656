"""
What the broker commands share: the common options, reading the
configuration, running one command on the reactor, Ctrl-C, and turning
errors into one line on standard error and an exit status.

Exit statuses follow C{<sysexits.h>}:

  - C{0}: done;
  - C{1}: some records named on the command line were not found;
  - C{64} (C{EX_USAGE}): the options do not make sense together;
  - C{65} (C{EX_DATAERR}): bad input (a body that is not a JSON object, a
    bad line in a file, with its number);
  - C{66} (C{EX_NOINPUT}): an input file can not be opened;
  - C{69} (C{EX_UNAVAILABLE}): the broker refused: a message was returned
    (no queue is bound for its topic) or nacked, its body is larger than the
    broker's C{max_message_size}, an exchange or queue does not exist (404),
    an argument is refused (406);
  - C{70} (C{EX_SOFTWARE}): an unexpected error (a bug);
  - C{73} (C{EX_CANTCREAT}), C{74} (C{EX_IOERR}): an output file can not be
    created or written;
  - C{75} (C{EX_TEMPFAIL}): try again later: the broker is unreachable or
    the connection was lost, the outbox is in use;
  - C{77} (C{EX_NOPERM}): the broker refused the login, or its
    permissions forbid the publish (403);
  - C{78} (C{EX_CONFIG}): the configuration can not be read or is invalid,
    or names no usable domain, or a certificate was refused in the TLS
    handshake with the broker (on either side);
  - C{130}/C{143}: a command that publishes was interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from fedhub.api import (
    DEFAULT_CONFIG_PATH,
    DomainError,
    choose_domain,
    connect_bus,
    load,
)
from fedhub.config import Config, DomainConfig
from fedhub.errors import (
    AccessRefused,
    ChannelError,
    ConfigError,
    DecodeError,
    FedhubError,
    MessageError,
    MessageNacked,
    MessageReturned,
    PublishError,
    TemporarilyUnavailable,
    TLSFailed,
)
from fedhub.logs import allow_level
from fedhub.text import escape_control
from fedhub.waiting import with_timeout

EX_OK = 0
#: Some of the records named were not found.
EX_NOTFOUND = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
#: The shell's status for a command ended by a signal: 128 + its number.
SIGNAL_BASE = 128


class CommandError(FedhubError):
    """
    A command can not go on; the reason is printed and the process exits
    with C{status}.

    @ivar reason: Why, one line.
    @ivar status: The exit status.
    """

    def __init__(self, reason: str, status: int) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


def add_config_arguments(
    parser: argparse.ArgumentParser, *, inner: bool = False, domain: bool = True
) -> None:
    """
    C{--config} and C{--domain}.

    @param inner: Add them to a sub-command's parser whose parent has them
        too: given there they win, and not given they leave the parent's
        value alone (argparse would otherwise put back the default).
    @param domain: Add C{--domain} (not for a command whose domain follows
        from another argument).
    """
    default = argparse.SUPPRESS if inner else None
    parser.add_argument(
        "-c", "--config", default=default, metavar="FILE",
        help=f"the hub's TOML configuration (default {DEFAULT_CONFIG_PATH} if it exists, "
        "else the built-in default)",
    )
    if domain:
        parser.add_argument(
            "-d", "--domain", default=default,
            help="the domain to use (default: the only one in the configuration)",
        )


def add_broker_arguments(
    parser: argparse.ArgumentParser, timeout_help: str, *, inner: bool = False, domain: bool = True
) -> None:
    """
    C{--config}, C{--domain}, C{--timeout} and C{--verbose}; C{inner} and
    C{domain} as for L{add_config_arguments}.
    """
    add_config_arguments(parser, inner=inner, domain=domain)
    parser.add_argument(
        "-t", "--timeout", type=positive_float, default=argparse.SUPPRESS if inner else 30.0,
        metavar="SECONDS", help=timeout_help + " (default 30)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS if inner else False,
        help="log what the connection does on standard error",
    )


def positive_float(text: str) -> float:
    """
    An argument type: a number greater than 0.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, not {text}")
    return value


def positive_int(text: str) -> int:
    """
    An argument type: an integer of at least 1.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def read_config(path: str | None) -> Config:
    """
    The configuration (see L{fedhub.api.load}).

    @raise CommandError: with C{EX_CONFIG}, naming the first problem.
    """
    try:
        return load(path)
    except ConfigError as e:
        first = e.problems[0] if e.problems else e
        more = f" (and {len(e.problems) - 1} more; see fedhub check-config)" if len(e.problems) > 1 else ""
        source = e.source or path or DEFAULT_CONFIG_PATH
        raise CommandError(f"{source}: {first}{more}", EX_CONFIG) from None


def names_or_all(args: argparse.Namespace, what: str) -> list[str] | None:
    """
    The names an action acting on stored messages was given (its C{ids}),
    or C{None} for C{--all}.

    @param what: How the names are written in the usage error (C{"ID"}).
    @raise CommandError: with C{EX_USAGE} when it has both or neither.
    """
    if bool(args.ids) == bool(args.all):
        raise CommandError(f"{args.action}: name the messages ({what} ...) or give --all", EX_USAGE)
    return None if args.all else list(args.ids)


def domain_of(config: Config, name: str | None, *, need_broker: bool = True) -> DomainConfig:
    """
    The domain a command works on (see L{fedhub.api.choose_domain}).

    @raise CommandError: with C{EX_CONFIG}.
    """
    try:
        return choose_domain(config, name, need_broker=need_broker, how="use --domain")
    except DomainError as e:
        raise CommandError(e.reason, EX_CONFIG) from None


#: RabbitMQ's text for a connection to a vhost it does not have (530).
_NO_VHOST = re.compile(r"\bvhost\b.*\bnot found\b")


def status_of(error: BaseException) -> tuple[int, str]:
    """
    The exit status and the one-line reason for an error.
    """
    if isinstance(error, CommandError):
        return error.status, error.reason
    if isinstance(error, DecodeError):
        return EX_DATAERR, str(error)
    if isinstance(error, MessageReturned):
        return EX_UNAVAILABLE, f"returned by the broker: {error.reason}"
    if isinstance(error, MessageNacked):
        return EX_UNAVAILABLE, error.reason
    if isinstance(error, AccessRefused):
        if error.reply_code == 530 and _NO_VHOST.search(error.reply_text):
            # Not a permission: the configuration names a vhost the broker
            # does not have.
            return EX_CONFIG, f"the broker has no such virtual host: {error}"
        return EX_NOPERM, f"the broker refused access: {error}"
    if isinstance(error, ChannelError):
        return EX_UNAVAILABLE, f"the broker refused: {error}"
    if isinstance(error, TLSFailed) and error.certificate:
        return EX_CONFIG, str(error)
    if isinstance(error, TemporarilyUnavailable):
        return EX_TEMPFAIL, error.reason
    if isinstance(error, PublishError):
        # For example the transport's PublishRefused: the broker's
        # permissions forbid the exchange or the topic (403); or its
        # MessageTooLarge, which the broker refuses whatever the permissions.
        if getattr(error, "reply_code", None) == 403:
            return EX_NOPERM, error.reason
        return EX_UNAVAILABLE, error.reason
    if isinstance(error, MessageError):
        return EX_DATAERR, str(error)
    if isinstance(error, ConfigError):
        first = error.problems[0] if error.problems else error
        return EX_CONFIG, str(first)
    if isinstance(error, DomainError):
        return EX_CONFIG, error.reason
    if isinstance(error, OSError) and getattr(error, "standard_output", False):
        return EX_IOERR, f"can not write standard output: {error.strerror or error}"
    return EX_SOFTWARE, f"unexpected error: {type(error).__name__}: {error}"


def aligned(rows: Sequence[tuple[str, ...]], widths: Sequence[int] | None = None) -> list[str]:
    """
    Table rows as text lines: every column but the last padded to its
    widest cell (or to C{widths}, when given), two spaces between columns.
    """
    if widths is None:
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
        for row in rows
    ]


def fail(command: str, reason: str, status: int, stream: TextIO | None = None) -> int:
    """
    Print C{fedhub <command>: <reason>} as one safe line on standard error
    and return C{status}.
    """
    print(f"fedhub {command}: {escape_control(reason, 1000)}", file=stream or sys.stderr)
    return status


class LogToStderr:
    """
    Shows fedhub's and Twisted's log events on standard error while
    installed.
    """

    def __init__(self, level: LogLevel) -> None:
        self.level = level
        self.observer: ILogObserver = FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(defaultLogLevel=level)],
        )
        self.installed = False

    def install(self) -> None:
        """
        Start showing events.
        """
        if not self.installed:
            allow_level(self.level)
            globalLogPublisher.addObserver(self.observer)
            self.installed = True

    def remove(self) -> None:
        """
        Stop showing events.
        """
        if self.installed:
            globalLogPublisher.removeObserver(self.observer)
            self.installed = False


class Runtime:
    """
    What a running command gets: the reactor, and whether (and by which
    signal) it was asked to stop.

    @ivar reactor: The running reactor.
    @ivar signal: The first SIGINT or SIGTERM received, or C{None}.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.signal: int | None = None
        self._waiters: list[Deferred[int]] = []
        self.log: LogToStderr | None = None

    def show_log(self, level: LogLevel) -> None:
        """
        Show log events of at least C{level} on standard error from now on
        (unless a lower level is shown already).
        """
        if self.log is None:
            self.log = LogToStderr(level)
            self.log.install()

    @property
    def interrupted(self) -> bool:
        """
        Whether the command was asked to stop.
        """
        return self.signal is not None

    def when_interrupted(self) -> Deferred[int]:
        """
        A Deferred firing with the signal number once one arrives.
        """
        d: Deferred[int] = Deferred()
        if self.signal is not None:
            d.callback(self.signal)
        else:
            self._waiters.append(d)
        return d

    def interrupt(self, signum: int) -> None:
        """
        Record a stop request and tell whoever waits for one.
        """
        if self.signal is not None:
            return
        self.signal = signum
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(signum)


def first_of(*ds: Deferred[Any]) -> Deferred[tuple[int, Any]]:
    """
    A Deferred with the index and result of whichever of C{ds} fires first
    (failing with its failure).  The others are left alone, never
    cancelled, and their later failures are not reported.
    """
    done: Deferred[tuple[int, Any]] = Deferred()

    def fired(result: object, index: int) -> None:
        if done.called:
            return
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback((index, result))

    for index, d in enumerate(ds):
        d.addBoth(fired, index)
    return done


async def with_bus(
    command: str,
    runtime: Runtime,
    domain: DomainConfig,
    timeout: float,
    work: Callable[[Any], Deferred[int]],
    *,
    publishing: bool = False,
    **options: Any,
) -> int:
    """
    Connect to a domain's broker (giving up after C{timeout} seconds), run
    C{work(bus)}, and disconnect.  A SIGINT or SIGTERM while connecting ends
    the command.

    @param publishing: The work publishes: a broker that blocks publishing
        (a resource alarm) for longer than C{timeout} ends the command with
        L{EX_TEMPFAIL}.  The bus itself waits out such an alarm without
        timing its confirms (right for the hub, which has its outbox), so
        the command's time bound is kept here.
    @param options: More keyword arguments for the bus.
    """
    from fedhub.amqp.transport import AMQPBus

    reactor = runtime.reactor
    settings: dict[str, Any] = {
        "confirm_timeout": timeout,
        "reconnect_initial": 0.25,
        "reconnect_max": 2.0,
        "setup_timeout": timeout,
    }
    settings.update(options)
    bus = AMQPBus.from_domain(domain, reactor, **settings)
    try:
        connecting = Deferred.fromCoroutine(connect_bus(bus, reactor, timeout))
        which, _ = await first_of(connecting, runtime.when_interrupted())
        if which == 1:
            connecting.addErrback(lambda _: None)
            return fail(
                command, "interrupted while connecting", interrupted_status(runtime.signal or 2)
            )
        if not publishing:
            return await work(bus)
        working = work(bus)
        watch = _blocked_too_long(bus, reactor, timeout)
        which, result = await first_of(working, watch)
        if which == 1:
            working.addErrback(lambda _: None)
            raise CommandError(
                f"the broker blocks publishing (a resource alarm: memory or disk) for more than "
                f"{timeout:g} s; messages not confirmed may or may not have been taken",
                EX_TEMPFAIL,
            )
        watch.cancel()
        return int(result)
    finally:
        if bus.running:
            stopping = with_timeout(bus.stopService(), timeout + 5.0, reactor, lambda: TimeoutError())
            try:
                await stopping
            except Exception:
                pass


def _blocked_too_long(bus: Any, reactor: Any, timeout: float) -> Deferred[None]:
    """
    A Deferred firing once C{bus} has been blocked by its broker for more
    than C{timeout} seconds in a row (checked a few times a second);
    cancelling it stops the watch.
    """
    from twisted.internet.task import LoopingCall

    since: list[float | None] = [None]

    def check() -> None:
        if not bus.blocked:
            since[0] = None
            return
        now = reactor.seconds()
        if since[0] is None:
            since[0] = now
        elif now - since[0] > timeout:
            loop.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    done: Deferred[None] = Deferred(lambda _: loop.stop() if loop.running else None)
    loop.start(min(0.25, timeout / 4), now=True).addCallback(
        lambda _: None if done.called else done.callback(None)
    )
    return done


def interrupted_status(signum: int) -> int:
    """
    The exit status of a command that stopped because of signal C{signum}.
    """
    return SIGNAL_BASE + signum


#: Seconds a command gets to finish after the first SIGINT or SIGTERM before
#: the reactor is stopped under it.
GRACE = 10.0


def run(
    command: str,
    work: Callable[[Runtime], Coroutine[Any, Any, int]],
    *,
    verbose: bool = False,
) -> int:
    """
    Run one command on the global reactor and return its exit status.

    The reactor runs once (this is for the C{fedhub} process, never for a
    library).  The first SIGINT or SIGTERM is handed to the command through
    L{Runtime}; it then has L{GRACE} seconds to finish.  A second signal, or
    the end of the grace period, stops the reactor at once (status
    C{128 + signal}).  An exception from the command is printed as one line
    (see L{status_of}).

    @param work: Called once the reactor runs; returns the exit status.
    @param verbose: Show the log on standard error (otherwise nothing is
        logged there).
    """
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    runtime = Runtime(reactor)
    outcome: list[int | Failure] = []
    if verbose:
        runtime.show_log(LogLevel.debug)

    def finished(result: int | Failure) -> None:
        outcome.append(result)
        if reactor.running:
            reactor.stop()

    def start() -> None:
        d = Deferred.fromCoroutine(work(runtime))
        d.addBoth(finished)

    def abort() -> None:
        if not outcome and reactor.running:
            reactor.stop()

    def on_signal(signum: int) -> None:
        if runtime.signal is None:
            runtime.interrupt(signum)
            reactor.callLater(GRACE, abort)
        else:
            abort()

    def handler(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(on_signal, signum)

    previous: dict[int, Any] = {}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for wanted in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(wanted) is signal.SIG_IGN:
                # Ignored by whoever started the command (a script's
                # `fedhub publish &`, nohup): left so, as Unix commands do.
                continue
            previous[wanted] = signal.signal(wanted, handler)
    try:
        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
        if runtime.log is not None:
            runtime.log.remove()
    if not outcome:
        stopped_by = runtime.signal or int(signal.SIGINT)
        return fail(command, "interrupted", interrupted_status(stopped_by))
    result = outcome[0]
    if isinstance(result, Failure):
        error = result.value
        if error is None:  # pragma: no cover - a Failure always carries its exception
            return fail(command, "unknown failure", EX_SOFTWARE)
        if isinstance(error, BrokenPipeError) and getattr(error, "standard_output", False):
            # Its reader went away (`fedhub dead-letters list | head`):
            # let main() end quietly with 0, as for the other commands.
            raise error
        status, reason = status_of(error)
        if status == EX_SOFTWARE:
            if verbose:
                result.printTraceback(file=sys.stderr)  # type: ignore[no-untyped-call]
        return fail(command, reason, status)
    return result
