"""
Parse bugmail in child processes, so the reactor thread need not.

Parsing a mail costs up to about half a second of CPU per megabyte for
hostile input, and the fingerprint of its event a JSON encoding and a hash:
done on the reactor thread, one large mail would stall every other SMTP
session, the AMQP heartbeats and the consumers.  A L{ParserPool} keeps a few
worker processes (L{fedhub.producers.bugzilla.parse_worker}) and hands each
mail to one of them; L{ParserPool.parse} has the signature of
L{fedhub.producers.bugzilla.parser.parse_bugmail} but returns a Deferred, so
it is what L{fedhub.producers.bugzilla.producer.BugmailIntake} takes as its
C{parse}.  L{parse_by_size} sends it only the mails over a size (64 KiB by
default, L{fedhub.producers.bugzilla.producer.DEFAULT_INLINE_MAX}) and
parses the smaller ones, nearly all bugmail, in process: cheaper than a
round trip to a worker, and short enough not to stall the hub.

The rules:

  - one mail at a time per worker; the others wait in a queue of at most
    C{max_queue} mails, and no longer than C{timeout} seconds;
  - the parser's refusals (L{NotBugmail}, L{MalformedBugmail},
    L{BugmailError}) come back as the same exception with the same reason
    and code, so they take the same paths as a refusal in the hub process;
  - everything else that goes wrong (queue too long, a worker that takes
    longer than C{timeout} seconds and is killed, a worker that dies, the
    pool stopping, a worker's unexpected error or broken answer) fails the
    mail with L{ParseUnavailable}, a L{TemporarilyUnavailable}: the sender
    keeps the mail and tries again later (SMTP C{451}), nothing is lost;
  - a dead worker is replaced at once when it died on a mail (that is
    bounded by the mails arriving), otherwise after a delay that doubles
    with every worker that dies without having parsed anything, up to
    C{max_restart_delay}: a worker that can not start at all is retried
    slowly, never in a loop;
  - the events come with their fingerprint, already computed by the worker
    (see L{fedhub.producers.bugzilla.producer.seed_fingerprint});
  - C{stopService} fails the waiting mails, closes the workers' input so
    they exit, kills those still there after C{stop_timeout} seconds, and
    fires once every worker process has ended.

Memory stays bounded: the queue by count (and each mail by the parser's
limit), each answer by L{MAX_RESPONSE_BYTES}, what a worker writes on its
standard error by a fixed amount per worker.

L{PooledBugmailListener} is the SMTP listener with its pool: the
C{bugzilla-smtp} plugin builds one when C{parse_workers} is above 0.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

import fedhub
from fedhub.errors import TemporarilyUnavailable
from fedhub.latch import Latch
from fedhub.logs import HubLogger
from fedhub.producers.bugzilla.parse_worker import (
    FRAME_HEADER,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    REFUSALS,
)
from fedhub.producers.bugzilla.parser import BugEvent, parse_bugmail
from fedhub.producers.bugzilla.producer import (
    DEFAULT_INLINE_MAX,
    IBugmailIntake,
    seed_fingerprint,
)
from fedhub.producers.bugzilla.smtp import BugmailListener, ListenerSettings
from fedhub.text import escape_control

__all__ = [
    "DEFAULT_TIMEOUT",
    "ParseUnavailable",
    "ParserPool",
    "PooledBugmailListener",
    "parse_by_size",
    "worker_command",
    "worker_environment",
]

#: Seconds a mail may wait for a worker, and a worker may take to parse it.
DEFAULT_TIMEOUT = 30.0

#: Bytes of a worker's standard error logged at most, over its life.
_STDERR_LIMIT = 16 * 1024


class ParseUnavailable(TemporarilyUnavailable):
    """
    A mail could not be parsed now, for a reason that has nothing to do with
    the mail itself: the sender should try again later.

    @ivar kind: C{"busy"} (too many mails waiting), C{"timeout"},
        C{"crashed"} (the worker died), C{"stopped"} (the pool is not
        running), C{"error"} (the worker reported an unexpected error) or
        C{"protocol"} (its answer could not be understood).
    """

    def __init__(self, reason: str, kind: str) -> None:
        self.kind = kind
        super().__init__(reason)


def _not_understood() -> Failure:
    """
    The failure of a mail whose worker's answer could not be understood.
    """
    return Failure(ParseUnavailable(
        "the parse worker gave an answer that could not be understood", "protocol"))


def worker_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    The environment of a worker: C{base} (the hub's environment by default)
    with the directory this C{fedhub} package was imported from first on
    C{PYTHONPATH}, so the worker runs the same code as the hub.
    """
    env = dict(os.environ if base is None else base)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fedhub.__file__)))
    previous = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not previous else root + os.pathsep + previous
    return env


def worker_command() -> list[str]:
    """
    The command line of a worker: this Python, running
    L{fedhub.producers.bugzilla.parse_worker}, told the hub's process id.
    """
    return [sys.executable, "-m", "fedhub.producers.bugzilla.parse_worker", "--parent", str(os.getpid())]


class _Request:
    """
    One mail to parse, and where its event goes.
    """

    __slots__ = ("raw", "deferred", "timer", "worker", "pool")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.deferred: Deferred[BugEvent] = Deferred(self._cancel)
        self.timer: IDelayedCall | None = None
        self.worker: _Worker | None = None
        self.pool: ParserPool | None = None

    def _cancel(self, _: Deferred[BugEvent]) -> None:
        # Cancelled by whoever waits for it: it leaves the queue.  A worker
        # already parsing it goes on (under its timeout), and its answer is
        # dropped.
        if self.worker is None:
            self.stop_timer()
            if self.pool is not None:
                self.pool._forget(self)

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def settle(self, result: BugEvent | Failure) -> None:
        """
        Fire the Deferred, unless it fired already (cancelled).
        """
        self.stop_timer()
        self.worker = None
        self.raw = b""
        if self.deferred.called:
            return
        if isinstance(result, Failure):
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)


class _WorkerPool(Protocol):
    """
    What a L{_Worker} needs of its pool (L{ParserPool} has it): where it
    reports what its process did.
    """

    def worker_ready(self, worker: _Worker) -> None:
        """C{worker} said it is ready and takes mail: give it the next waiting one."""

    def worker_answered(self, worker: _Worker, request: _Request, response: dict[str, Any]) -> None:
        """C{worker} answered C{request}: settle it (after giving C{worker} its next mail)."""

    def worker_broken(self, worker: _Worker, what: str, request: _Request | None) -> None:
        """C{worker} broke the protocol (C{what} it did) and is killed; C{request} fails."""

    def worker_took_too_long(self, worker: _Worker, request: _Request) -> None:
        """C{worker} took too long on C{request} and is killed; C{request} fails."""

    def worker_start_timeout(self, worker: _Worker) -> None:
        """C{worker} did not say it is ready in time; it is killed next."""

    def worker_ended(
        self, worker: _Worker, reason: Failure, request: _Request | None, told_to_exit: bool
    ) -> None:
        """
        C{worker}'s process ended, for C{reason}, while parsing C{request}
        (or none); C{told_to_exit} when its input was closed (and it was
        not killed).
        """

    def worker_stderr(self, worker: _Worker, line: str) -> None:
        """C{worker} wrote C{line} on its standard error."""

    def worker_stderr_cut(self, worker: _Worker, limit: int) -> None:
        """C{worker} wrote more than C{limit} bytes on its standard error; the rest is dropped."""


# --- a worker's machine ------------------------------------------------------------


class _WorkerInputs(Protocol):
    """
    The inputs of a worker's machine: from the pool (L{started},
    L{dispatched}, L{took_too_long}, L{kill}, L{close_input}), from its
    process (the frames it writes, its end) and from its start timer.
    """

    def started(self) -> None:
        """The process was spawned: it has the pool's timeout to say it is ready."""

    def dispatched(self, request: _Request) -> None:
        """The pool gives it a mail to parse."""

    def took_too_long(self) -> None:
        """The mail it parses took longer than the pool's timeout."""

    def kill(self, why: str) -> None:
        """SIGKILL it, for C{why}; its end follows."""

    def close_input(self) -> None:
        """Close its standard input: it exits once it has answered."""

    def _ready_frame(self, response: dict[str, Any]) -> None:
        """It sent a frame that says it is ready."""

    def _answer_frame(self, response: dict[str, Any]) -> None:
        """It sent any other JSON object."""

    def _bad_frame(self, what: str) -> None:
        """It sent something that is no frame of the protocol (C{what})."""

    def _start_timeout(self) -> None:
        """The start timer fired."""

    def _ended(self, reason: Failure) -> None:
        """Its process ended."""


@dataclass
class _WorkerCore:
    """
    What a worker's states share.
    """

    worker: _Worker
    pool: _WorkerPool
    clock: IReactorTime
    start_timeout: float

    state: str = "starting"
    request: _Request | None = None
    answered: int = 0
    killed: str | None = None
    start_timer: IDelayedCall | None = None
    #: An answer the machine took, for the pool once the machine has moved.
    answer: tuple[_Request, dict[str, Any]] | None = None

    def stop_start_timer(self) -> None:
        if self.start_timer is not None and self.start_timer.active():
            self.start_timer.cancel()
        self.start_timer = None

    def take_request(self) -> _Request | None:
        request, self.request = self.request, None
        return request

    def close_stdin(self) -> None:
        try:
            self.worker.transport.closeStdin()  # type: ignore[union-attr]
        except Exception:
            pass

    def signal_kill(self) -> None:
        try:
            self.worker.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass  # processEnded follows

    def kill(self, why: str) -> None:
        """Kill the process for C{why} (the first reason given stays)."""
        if self.killed is None:
            self.killed = why
        self.state = "ending"
        self.stop_start_timer()
        self.signal_kill()


def _build_worker() -> Callable[[_WorkerCore], _WorkerInputs]:
    builder = TypeMachineBuilder(_WorkerInputs, _WorkerCore)
    starting = builder.state("starting")
    idle = builder.state("idle")
    busy = builder.state("busy")
    # Input closed: it takes no more mail, but answers the one it has.
    closing_starting = builder.state("closing: starting")
    closing_idle = builder.state("closing: idle")
    closing_busy = builder.state("closing: busy")
    # Killed: its frames are ignored; a mail it still has fails at its end.
    ending_busy = builder.state("ending: busy")
    ending = builder.state("ending")
    ended = builder.state("ended")
    not_killed = (starting, idle, busy, closing_starting, closing_idle, closing_busy)

    # -- starting --

    @starting.upon(_WorkerInputs.started).loop()
    def start_timer(inputs: _WorkerInputs, core: _WorkerCore) -> None:
        core.start_timer = core.clock.callLater(core.start_timeout, inputs._start_timeout)

    @starting.upon(_WorkerInputs._ready_frame).to(idle)
    def ready(inputs: _WorkerInputs, core: _WorkerCore, response: dict[str, Any]) -> None:
        core.stop_start_timer()
        core.state = "idle"
        core.pool.worker_ready(core.worker)

    @closing_starting.upon(_WorkerInputs._ready_frame).to(closing_idle)
    def ready_to_exit(inputs: _WorkerInputs, core: _WorkerCore, response: dict[str, Any]) -> None:
        core.stop_start_timer()

    @starting.upon(_WorkerInputs._start_timeout).to(ending)
    @closing_starting.upon(_WorkerInputs._start_timeout).to(ending)
    def start_too_long(inputs: _WorkerInputs, core: _WorkerCore) -> None:
        core.start_timer = None
        core.pool.worker_start_timeout(core.worker)
        core.kill("start timeout")

    # -- mail --

    @idle.upon(_WorkerInputs.dispatched).to(busy)
    def send(inputs: _WorkerInputs, core: _WorkerCore, request: _Request) -> None:
        core.request = request
        core.state = "busy"
        raw = request.raw
        core.worker.transport.writeSequence([FRAME_HEADER.pack(len(raw)), raw])  # type: ignore[union-attr]

    def take_answer(core: _WorkerCore, response: dict[str, Any]) -> None:
        request = core.take_request()
        assert request is not None
        core.answered += 1
        core.answer = (request, response)

    # Any JSON object from a busy worker is its answer, even one that looks
    # like a ready frame (the pool finds it of no known kind).
    @busy.upon(_WorkerInputs._answer_frame).to(idle)
    @busy.upon(_WorkerInputs._ready_frame).to(idle)
    def answered(inputs: _WorkerInputs, core: _WorkerCore, response: dict[str, Any]) -> None:
        core.state = "idle"
        take_answer(core, response)

    @closing_busy.upon(_WorkerInputs._answer_frame).to(closing_idle)
    @closing_busy.upon(_WorkerInputs._ready_frame).to(closing_idle)
    def answered_last(inputs: _WorkerInputs, core: _WorkerCore, response: dict[str, Any]) -> None:
        take_answer(core, response)

    @busy.upon(_WorkerInputs.took_too_long).to(ending)
    @closing_busy.upon(_WorkerInputs.took_too_long).to(ending)
    @ending_busy.upon(_WorkerInputs.took_too_long).to(ending)
    def too_long(inputs: _WorkerInputs, core: _WorkerCore) -> None:
        request = core.take_request()
        assert request is not None
        core.kill("timeout")
        core.pool.worker_took_too_long(core.worker, request)

    # -- protocol errors: killed, and the mail it has fails --

    def broken(core: _WorkerCore, what: str) -> None:
        request = core.take_request()
        core.kill("protocol")
        core.pool.worker_broken(core.worker, what, request)

    @starting.upon(_WorkerInputs._answer_frame).to(ending)
    @closing_starting.upon(_WorkerInputs._answer_frame).to(ending)
    def not_ready(inputs: _WorkerInputs, core: _WorkerCore, response: dict[str, Any]) -> None:
        broken(core, "did not start with a ready frame")

    @idle.upon(_WorkerInputs._answer_frame).to(ending)
    @idle.upon(_WorkerInputs._ready_frame).to(ending)
    @closing_idle.upon(_WorkerInputs._answer_frame).to(ending)
    @closing_idle.upon(_WorkerInputs._ready_frame).to(ending)
    def unasked(inputs: _WorkerInputs, core: _WorkerCore, response: dict[str, Any]) -> None:
        broken(core, "answered a mail it was not given")

    def bad_frame(inputs: _WorkerInputs, core: _WorkerCore, what: str) -> None:
        broken(core, what)

    for state in not_killed:
        state.upon(_WorkerInputs._bad_frame).to(ending)(bad_frame)

    # -- closing and killing --

    def close(inputs: _WorkerInputs, core: _WorkerCore) -> None:
        core.state = "closing"
        core.close_stdin()

    starting.upon(_WorkerInputs.close_input).to(closing_starting)(close)
    idle.upon(_WorkerInputs.close_input).to(closing_idle)(close)
    busy.upon(_WorkerInputs.close_input).to(closing_busy)(close)
    for state in (closing_starting, closing_idle, closing_busy):
        state.upon(_WorkerInputs.close_input).loop().returns(None)

    @ending_busy.upon(_WorkerInputs.close_input).loop()
    @ending.upon(_WorkerInputs.close_input).loop()
    def close_killed(inputs: _WorkerInputs, core: _WorkerCore) -> None:
        core.close_stdin()

    def kill(inputs: _WorkerInputs, core: _WorkerCore, why: str) -> None:
        core.kill(why)

    for state in (starting, idle, closing_starting, closing_idle):
        state.upon(_WorkerInputs.kill).to(ending)(kill)
    for state in (busy, closing_busy):
        state.upon(_WorkerInputs.kill).to(ending_busy)(kill)

    @ending_busy.upon(_WorkerInputs.kill).loop()
    @ending.upon(_WorkerInputs.kill).loop()
    def kill_again(inputs: _WorkerInputs, core: _WorkerCore, why: str) -> None:
        core.signal_kill()

    for state in (ending_busy, ending):
        state.upon(_WorkerInputs._ready_frame).loop().returns(None)
        state.upon(_WorkerInputs._answer_frame).loop().returns(None)
        state.upon(_WorkerInputs._bad_frame).loop().returns(None)

    # -- the end --

    def end(core: _WorkerCore, reason: Failure, told_to_exit: bool) -> None:
        core.stop_start_timer()
        core.state = "ended"
        core.pool.worker_ended(core.worker, reason, core.take_request(), told_to_exit)

    def process_ended(inputs: _WorkerInputs, core: _WorkerCore, reason: Failure) -> None:
        end(core, reason, False)

    def process_exited(inputs: _WorkerInputs, core: _WorkerCore, reason: Failure) -> None:
        end(core, reason, True)

    for state in (starting, idle, busy, ending_busy, ending):
        state.upon(_WorkerInputs._ended).to(ended)(process_ended)
    for state in (closing_starting, closing_idle, closing_busy):
        state.upon(_WorkerInputs._ended).to(ended)(process_exited)

    return builder.build()


_WorkerMachine = _build_worker()


class _Worker(ProcessProtocol):
    """
    One worker process, from its start to its end.

    Its lifecycle is a typed automat machine; its L{state} names where it
    is::

        starting ──ready frame──▶ idle ──dispatched──▶ busy
                                   ▲                    │
                                   └──────answer────────┘

        close_input: starting, idle, busy ──▶ closing (no more mail; the
            one it has is still answered)
        kill (or a protocol error, or taking too long): ──▶ ending (its
            frames are ignored; a mail it still has fails at its end)
        its process ends: ──▶ ended

    An answer frame where none is due (while starting, or idle) is a
    protocol error: the worker is killed.  What happens reaches the pool
    through L{_WorkerPool}.  An answer reaches it only once the machine is
    idle again, not from an output: automat runs an input that an output
    causes after all the outputs, and the worker must have its next mail
    (an input) before the answered mail's event goes on.
    """

    def __init__(self, pool: _WorkerPool, slot: int, clock: IReactorTime, start_timeout: float) -> None:
        """
        @param pool: Hears what the worker does.
        @param slot: The worker's place in the pool.
        @param clock: Runs its start timer.
        @param start_timeout: Seconds it may take to say it is ready.
        """
        self.pool = pool
        self.slot = slot
        self.pid: int | None = None
        self._core = _WorkerCore(self, pool, clock, start_timeout)
        self._machine = _WorkerMachine(self._core)
        self._buffer = bytearray()
        self._stderr = bytearray()
        self._stderr_logged = 0

    # --- what the pool sees and asks ----------------------------------------

    @property
    def state(self) -> str:
        """
        C{"starting"}, C{"idle"}, C{"busy"}, C{"closing"} (its input is
        closed), C{"ending"} (killed) or C{"ended"}.
        """
        return self._core.state

    @property
    def takes_mail(self) -> bool:
        """Whether it waits for a mail (and its input is open)."""
        return self._core.state == "idle"

    @property
    def request(self) -> _Request | None:
        """The mail it parses, or C{None}."""
        return self._core.request

    @property
    def answered(self) -> int:
        """How many mails it answered."""
        return self._core.answered

    @property
    def killed(self) -> str | None:
        """Why it was killed (the first reason), or C{None}."""
        return self._core.killed

    def started(self) -> None:
        """Its process was spawned: start the start timer."""
        self._machine.started()

    def dispatched(self, request: _Request) -> None:
        """Send it C{request} (it must be idle)."""
        self._machine.dispatched(request)

    def took_too_long(self) -> None:
        """Its mail took too long: kill it; the mail fails."""
        self._machine.took_too_long()

    def kill(self, why: str) -> None:
        """
        SIGKILL the process, for C{why}; its end comes through L{processEnded}.
        """
        self._machine.kill(why)

    def close_input(self) -> None:
        """
        Close its standard input: it exits once it has answered.
        """
        self._machine.close_input()

    # --- its process ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._frames(data)
        elif childFD == 2:
            self._stderr_data(data)

    def _frames(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        # Once it is killed, what it still wrote is not even decoded.
        while len(buffer) >= FRAME_HEADER.size and self._core.killed is None:
            (size,) = FRAME_HEADER.unpack_from(buffer)
            if size > MAX_RESPONSE_BYTES:
                self._machine._bad_frame(f"announced a frame of {size} bytes")
                return
            end = FRAME_HEADER.size + size
            if len(buffer) < end:
                return
            payload = bytes(buffer[FRAME_HEADER.size:end])
            del buffer[:end]
            self._frame(payload)

    def _frame(self, payload: bytes) -> None:
        try:
            response = json.loads(payload)
        except Exception:  # ValueError, or RecursionError for deep nesting
            response = None
        if not isinstance(response, dict):
            self._machine._bad_frame("sent a frame that is not a JSON object")
            return
        if response.get("ready") == 1:
            self._machine._ready_frame(response)
        else:
            self._machine._answer_frame(response)
        answer, self._core.answer = self._core.answer, None
        if answer is not None:
            self.pool.worker_answered(self, *answer)

    def _stderr_data(self, data: bytes) -> None:
        if self._stderr_logged >= _STDERR_LIMIT:
            return
        self._stderr += data
        while b"\n" in self._stderr or len(self._stderr) > 1024:
            line, sep, rest = bytes(self._stderr).partition(b"\n")
            if not sep:
                line, rest = bytes(self._stderr[:1024]), bytes(self._stderr[1024:])
            self._stderr = bytearray(rest)
            self._log_stderr(line)
            if self._stderr_logged >= _STDERR_LIMIT:
                self._stderr = bytearray()
                self.pool.worker_stderr_cut(self, _STDERR_LIMIT)
                return

    def _log_stderr(self, line: bytes) -> None:
        self._stderr_logged += len(line) + 1
        text = escape_control(line.decode("utf-8", "replace").rstrip(), 500)
        if text:
            self.pool.worker_stderr(self, text)

    def processEnded(self, reason: Failure) -> None:
        if self._stderr and self._stderr_logged < _STDERR_LIMIT:
            self._log_stderr(bytes(self._stderr))
        self._stderr = bytearray()
        self._buffer = bytearray()
        self._machine._ended(reason)


class ParserPool(Service):
    """
    A service that parses bugmail in C{workers} child processes; see the
    module's documentation.

    @ivar workers: How many worker processes it keeps.
    @ivar timeout: Seconds a mail may wait in the queue, and a worker may
        take to parse it (it is killed then); also how long a new worker
        may take to start.
    @ivar max_queue: Mails waiting for a worker at most; more fail at once.
    @ivar counters: Events counted: C{parsed}, C{refused} (the parser's
        refusals), C{busy}, C{timeouts}, C{crashes}, C{errors},
        C{restarts}.
    """

    log = HubLogger()

    def __init__(
        self,
        workers: int = 1,
        *,
        reactor: Any = None,
        clock: IReactorTime | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_queue: int = 100,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 5.0,
        restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
        producer: str = "bugzilla-smtp",
    ) -> None:
        """
        @param reactor: Spawns the processes (an C{IReactorProcess}); the
            global reactor when C{None}, looked up in C{startService}.
        @param clock: Runs the timers; the reactor when C{None}.
        @param command: The worker's command line; L{worker_command} when
            C{None}.  Its first element is the program.
        @param env: The worker's environment; L{worker_environment} when
            C{None}.
        """
        if not 1 <= workers <= 64:
            raise ValueError(f"workers must be between 1 and 64, not {workers!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be greater than 0, not {timeout!r}")
        if max_queue < 0:
            raise ValueError(f"max_queue must not be negative, not {max_queue!r}")
        self.workers = workers
        self.timeout = timeout
        self.max_queue = max_queue
        self.stop_timeout = stop_timeout
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.producer = producer
        self._reactor = reactor
        self._clock = clock
        self._command = list(command) if command is not None else None
        self._env = dict(env) if env is not None else None
        self._slots: list[_Worker | None] = [None] * workers
        self._restarts: dict[int, IDelayedCall] = {}
        self._failures = [0] * workers
        self._live: set[_Worker] = set()
        self._queue: deque[_Request] = deque()
        # Set from stopService on; fired once every worker process ended.
        self._stopping: Latch | None = None
        self._kill_timer: IDelayedCall | None = None
        self.counters = {"parsed": 0, "refused": 0, "busy": 0, "timeouts": 0, "crashes": 0,
                         "errors": 0, "restarts": 0}

    # --- what the outside sees ----------------------------------------------

    @property
    def pids(self) -> list[int]:
        """
        The process ids of the worker processes that have not ended yet.
        """
        return sorted(w.pid for w in self._live if w.pid is not None)

    @property
    def ready_workers(self) -> int:
        """
        How many workers have started and take mail (idle or busy).
        """
        return sum(
            1 for w in self._slots
            if w is not None and w.state in ("idle", "busy")
        )

    @property
    def queued(self) -> int:
        """
        How many mails wait for a worker.
        """
        return len(self._queue)

    def parse(self, raw: bytes) -> Deferred[BugEvent]:
        """
        Parse one mail in a worker.

        @return: A Deferred firing with the L{BugEvent} (its fingerprint
            already known), or failing with the parser's L{BugmailError}, or
            with L{ParseUnavailable} when it can not be parsed now.
        """
        if not self.running or self._stopping is not None:
            return fail(ParseUnavailable("the mail parser is not running", "stopped"))
        if len(raw) > MAX_REQUEST_BYTES:
            # The parser refuses it before reading it: the same refusal,
            # without shipping megabytes to a worker.
            return maybeDeferred(parse_bugmail, raw)
        request = _Request(bytes(raw))
        request.pool = self
        worker = self._idle_worker()
        if worker is not None:
            self._dispatch(worker, request)
        elif len(self._queue) >= self.max_queue:
            self.counters["busy"] += 1
            self.log.warn(
                "{count} mails already wait for a parse worker; answering try again later",
                count=len(self._queue), producer=self.producer,
            )
            return fail(ParseUnavailable(
                f"more than {self.max_queue} mails are waiting to be parsed", "busy"))
        else:
            self._queue.append(request)
            request.timer = self.clock.callLater(self.timeout, self._waited_too_long, request)
        return request.deferred

    @property
    def clock(self) -> IReactorTime:
        """
        The timers' clock.
        """
        if self._clock is None:
            self._clock = self.reactor
        return self._clock

    @property
    def reactor(self) -> Any:
        """
        The reactor that spawns the workers.
        """
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # --- starting and stopping ----------------------------------------------

    def startService(self) -> None:
        """
        Start every worker.
        """
        if self._stopping is not None:
            if not self._stopping.fired:
                raise RuntimeError("the ParserPool is still stopping")
            self._stopping = None
            self._failures = [0] * self.workers
        Service.startService(self)  # type: ignore[no-untyped-call]
        for slot in range(self.workers):
            self._spawn(slot)

    def stopService(self) -> Deferred[None]:
        """
        Take no more mails, fail those waiting, let the workers exit (killing
        those still there after C{stop_timeout} seconds); fires once every
        worker process has ended.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._stopping is None:
            self._stopping = Latch()
            for call in self._restarts.values():
                if call.active():
                    call.cancel()
            self._restarts.clear()
            waiting, self._queue = self._queue, deque()
            for request in waiting:
                request.settle(Failure(ParseUnavailable("the mail parser is stopping", "stopped")))
            for worker in list(self._live):
                worker.close_input()
            if self._live:
                self._kill_timer = self.clock.callLater(self.stop_timeout, self._kill_the_rest)
            self._check_stopped()
        return self._stopping.wait()

    def _kill_the_rest(self) -> None:
        self._kill_timer = None
        for worker in list(self._live):
            self.log.warn(
                "Parse worker {pid} did not exit within {timeout}s of being told to; killing it",
                pid=worker.pid, timeout=self.stop_timeout, producer=self.producer,
            )
            worker.kill("stopping")

    def _check_stopped(self) -> None:
        stopping = self._stopping
        if stopping is None or self._live or stopping.fired:
            return
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        stopping.fire()

    # --- workers ------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        if self._stopping is not None:
            return
        worker = _Worker(self, slot, self.clock, self.timeout)
        command = self._command if self._command is not None else worker_command()
        env = self._env if self._env is not None else worker_environment()
        try:
            process = self.reactor.spawnProcess(
                worker, command[0], command, env=env, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except Exception:
            self.log.failure("Could not start a parse worker", producer=self.producer)
            self._failures[slot] += 1
            self._restart_later(slot, self._backoff(slot))
            return
        worker.pid = getattr(process, "pid", None)
        self._slots[slot] = worker
        self._live.add(worker)
        worker.started()
        self.log.debug("Started parse worker {pid}", pid=worker.pid, producer=self.producer)

    def _backoff(self, slot: int) -> float:
        failures = max(1, self._failures[slot])
        return float(min(self.max_restart_delay, self.restart_delay * 2 ** (failures - 1)))

    def _restart_later(self, slot: int, delay: float) -> None:
        if self._stopping is not None or slot in self._restarts:
            return
        self.counters["restarts"] += 1
        self._restarts[slot] = self.clock.callLater(delay, self._spawn, slot)

    def _idle_worker(self) -> _Worker | None:
        for worker in self._slots:
            if worker is not None and worker.takes_mail:
                return worker
        return None

    def _dispatch(self, worker: _Worker, request: _Request) -> None:
        request.stop_timer()
        request.worker = worker
        request.timer = self.clock.callLater(self.timeout, self._took_too_long, worker, request)
        worker.dispatched(request)

    def _next(self, worker: _Worker) -> None:
        """
        C{worker} may be idle: give it the next waiting mail.
        """
        if not worker.takes_mail or not self._queue:
            return
        self._dispatch(worker, self._queue.popleft())

    def _forget(self, request: _Request) -> None:
        try:
            self._queue.remove(request)
        except ValueError:
            pass

    def _waited_too_long(self, request: _Request) -> None:
        request.timer = None
        self._forget(request)
        self.counters["timeouts"] += 1
        self.log.warn(
            "A mail waited {timeout}s for a parse worker; answering try again later",
            timeout=self.timeout, producer=self.producer,
        )
        request.settle(Failure(ParseUnavailable(
            f"no parse worker was free within {self.timeout:g}s", "timeout")))

    def _took_too_long(self, worker: _Worker, request: _Request) -> None:
        request.timer = None
        if worker.request is request:
            worker.took_too_long()

    # --- what the workers report (a _WorkerPool) -------------------------------

    def worker_ready(self, worker: _Worker) -> None:
        self._next(worker)

    def worker_start_timeout(self, worker: _Worker) -> None:
        self.log.error(
            "Parse worker {pid} did not start within {timeout}s; killing it",
            pid=worker.pid, timeout=self.timeout, producer=self.producer,
        )

    def worker_took_too_long(self, worker: _Worker, request: _Request) -> None:
        self.counters["timeouts"] += 1
        self.log.warn(
            "Parse worker {pid} took longer than {timeout}s on a mail of {size} bytes; "
            "killing it and answering try again later",
            pid=worker.pid, timeout=self.timeout, size=len(request.raw), producer=self.producer,
        )
        request.settle(Failure(ParseUnavailable(
            f"parsing the mail took longer than {self.timeout:g}s", "timeout")))

    def worker_broken(self, worker: _Worker, what: str, request: _Request | None) -> None:
        self.counters["errors"] += 1
        self.log.error("Parse worker {pid} {what}; killing it", pid=worker.pid, what=what,
                       producer=self.producer)
        if request is not None:
            request.settle(_not_understood())

    def worker_stderr(self, worker: _Worker, line: str) -> None:
        self.log.warn("Parse worker {pid}: {line}", pid=worker.pid, line=line,
                      producer=self.producer)

    def worker_stderr_cut(self, worker: _Worker, limit: int) -> None:
        self.log.warn(
            "Parse worker {pid} wrote more than {limit} bytes on standard error; "
            "the rest is dropped",
            pid=worker.pid, limit=limit, producer=self.producer,
        )

    def worker_answered(self, worker: _Worker, request: _Request, response: dict[str, Any]) -> None:
        self._failures[worker.slot] = 0
        result = self._result(worker, response)
        # The worker gets its next mail before this one's event goes on, so
        # it parses while the reactor hands the event over.
        self._next(worker)
        request.settle(result)

    def _result(self, worker: _Worker, response: dict[str, Any]) -> BugEvent | Failure:
        if "event" in response:
            data = response["event"]
            fingerprint = response.get("fingerprint")
            try:
                if (not isinstance(fingerprint, str) or len(fingerprint) != 64
                        or fingerprint.strip("0123456789abcdef")):
                    raise ValueError("the fingerprint is not a hex SHA-256")
                event = BugEvent.from_json(data)
            except Exception as e:
                self.counters["errors"] += 1
                self.log.error(
                    "Parse worker {pid} sent an event that could not be read back: {error}",
                    pid=worker.pid, error=escape_control(str(e), 300), producer=self.producer,
                )
                return _not_understood()
            seed_fingerprint(event, fingerprint, data)
            self.counters["parsed"] += 1
            return event
        error = response.get("error")
        if isinstance(error, dict):
            cls = REFUSALS.get(error.get("class"))  # type: ignore[arg-type]
            reason, code = error.get("reason"), error.get("code")
            if cls is not None and isinstance(reason, str) and isinstance(code, str):
                self.counters["refused"] += 1
                return Failure(cls(reason, code))
        unexpected = response.get("unexpected")
        if isinstance(unexpected, dict):
            self.counters["errors"] += 1
            self.log.error(
                "Parse worker {pid} failed on a mail with {error}: {detail}",
                pid=worker.pid,
                error=escape_control(str(unexpected.get("type")), 100),
                detail=escape_control(str(unexpected.get("detail")), 2000),
                producer=self.producer,
            )
            return Failure(ParseUnavailable(
                "an unexpected error while parsing the mail", "error"))
        self.counters["errors"] += 1
        self.log.error("Parse worker {pid} sent an answer of an unknown kind", pid=worker.pid,
                       producer=self.producer)
        return _not_understood()

    def worker_ended(
        self, worker: _Worker, reason: Failure, request: _Request | None, told_to_exit: bool
    ) -> None:
        self._live.discard(worker)
        was_busy = request is not None
        status = escape_control(str(reason.value), 200)
        if request is not None and worker.killed == "stopping":
            request.settle(Failure(ParseUnavailable("the mail parser is stopping", "stopped")))
        elif request is not None:
            self.counters["crashes"] += 1
            self.log.error(
                "Parse worker {pid} ended while parsing a mail of {size} bytes: {status}; "
                "answering try again later",
                pid=worker.pid, size=len(request.raw), status=status, producer=self.producer,
            )
            request.settle(Failure(ParseUnavailable(
                "the parse worker ended while parsing the mail", "crashed")))
        elif worker.killed is not None:
            pass  # killed on purpose, and logged why
        elif told_to_exit and isinstance(reason.value, ProcessDone):
            pass  # told to go, and gone
        else:
            self.counters["crashes"] += 1
            self.log.error("Parse worker {pid} ended: {status}", pid=worker.pid, status=status,
                           producer=self.producer)
        if self._slots[worker.slot] is worker:
            self._slots[worker.slot] = None
            if self._stopping is None:
                if worker.killed == "timeout" or was_busy or worker.answered:
                    delay = 0.0
                else:
                    self._failures[worker.slot] += 1
                    delay = self._backoff(worker.slot)
                self.log.info(
                    "Starting another parse worker in {delay}s",
                    delay=delay, producer=self.producer,
                )
                self._restart_later(worker.slot, delay)
        self._check_stopped()


def parse_by_size(
    pool: ParserPool, inline_max: int = DEFAULT_INLINE_MAX
) -> Callable[[bytes], BugEvent | Deferred[BugEvent]]:
    """
    A C{parse} for L{fedhub.producers.bugzilla.producer.BugmailIntake} that
    parses a mail of at most C{inline_max} bytes at once, in this process,
    and a larger one in one of C{pool}'s workers (0: every mail).
    """

    def parse(raw: bytes) -> BugEvent | Deferred[BugEvent]:
        if len(raw) <= inline_max:
            return parse_bugmail(raw)
        return pool.parse(raw)

    return parse


class PooledBugmailListener(BugmailListener):
    """
    A L{BugmailListener} whose mails are parsed by a L{ParserPool}: the
    pool starts before the listener listens, and stops once the listener
    has answered its last mail and run its cleanups.

    @ivar pool: The L{ParserPool}.
    """

    def __init__(
        self,
        endpoint: str,
        settings: ListenerSettings,
        intake: IBugmailIntake,
        pool: ParserPool,
        *,
        reactor: Any = None,
    ) -> None:
        BugmailListener.__init__(self, endpoint, settings, intake, reactor=reactor)
        self.pool = pool

    def startService(self) -> None:
        """
        Start the pool, then the listener.
        """
        self.pool.startService()
        try:
            BugmailListener.startService(self)
        except BaseException:
            self.pool.stopService().addErrback(
                lambda f: self.log.failure("Stopping the parse workers failed", f))
            raise

    def stopService(self) -> Deferred[None]:
        """
        Stop the listener (its sessions end), then the pool; fires once the
        last worker process has ended.
        """
        d = BugmailListener.stopService(self)

        def pool(result: object) -> Deferred[None]:
            if isinstance(result, Failure):
                self.log.failure("Stopping the SMTP listener failed", result)
            return self.pool.stopService()

        stopped: Deferred[None] = d.addBoth(pool)
        return stopped
