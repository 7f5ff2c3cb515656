"""
The polling producer framework: a service that asks a source for news at an
interval, hands the resulting messages over and remembers where it got to.

A L{PollingService} drives one L{IPollSource}.  What it guarantees:

  - B{containment}: a failed poll (any exception, a timeout, a malformed
    answer) is logged and counted, and polling goes on; C{LoopingCall} and
    C{TimerService} would stop for good after one failure, so neither is used;
  - B{no overlap}: the next poll is scheduled only after the previous one has
    finished (published and saved), never on a fixed beat;
  - B{backoff}: after a failure the next poll waits a capped exponential,
    jittered delay; a success resets it.  Successful polls run every
    C{interval} seconds with some jitter, or at once while the source reports
    it has more to catch up on;
  - B{cursor}: the position in the source is a JSON value kept in
    C{<state_dir>/cursor.json}.  It is written atomically (temporary file,
    C{fsync}, rename, C{fsync} of the directory), in a thread so the reactor
    never waits on the disk, and only after every message of the poll has been
    handed over: every C{publish} Deferred fired.  A process that dies between
    poll and hand-over starts again from the old cursor: no gap, and at most
    one poll's messages twice (with the same message ids when the source
    derives them from the events, as fedhub's sources do);
  - B{pushback}: when the publisher says L{TemporarilyUnavailable}, the cursor
    stays and the poller backs off.  A message the publisher refuses for good
    (L{PublishError}, L{MessageError}) is logged, counted as dropped and does
    not block the ones after it;
  - B{status}: L{PollingService.status} gives counters and times for a status
    page.

On its first start (no cursor file), the service asks the source for its
initial cursor and saves it before the first poll, so a restart never jumps
ahead over events that happened in between.
"""

from __future__ import annotations

import json
import os
import random as _random
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from fedhub.errors import FedhubError, MessageError, PublishError, TemporarilyUnavailable
from fedhub.files import fsync_directory, replace_durably
from fedhub.interfaces import IPublisher
from fedhub.logs import HubLogger
from fedhub.message import Message
from fedhub.text import escape_control

_T = TypeVar("_T")

#: The name of the cursor file in a component's state directory.
CURSOR_FILE = "cursor.json"
#: The version of the cursor file's envelope.
CURSOR_VERSION = 1
#: Seconds past "now" that a source's time cursor may reach.  A row dated
#: further ahead (a broken clock, a corrupt row) is still published, but
#: does not move the cursor past every row still to come.
FUTURE_MARGIN = 600.0

#: Seconds a service's clock may be ahead of this host's when a poller
#: first starts from it.  A start further ahead (a clock set to 2100) would
#: be the floor below which nothing is published, for good: the first start
#: fails instead, and is tried again.  Clocks an hour or so apart are taken
#: as they are.
START_SKEW_LIMIT = 86400.0

#: Seconds during which a failure like the last one logged is logged again
#: at debug level only, even with successful polls between them: a service
#: that fails every other poll logs its failure, and that polling works
#: again, once in this time, not at every poll.
FLAP_LOG_INTERVAL = 600.0


class CursorError(FedhubError):
    """
    The cursor file exists but can not be used.  The poller does not start
    over from "now" (that would skip events): it keeps retrying and reports
    the error until an operator repairs or removes the file.

    @ivar path: The cursor file.
    @ivar reason: What is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cursor file {path}: {reason}")


class ForeignCursor(FedhubError):
    """
    Raised by a source's C{poll} for a saved cursor that is valid JSON but
    not one it wrote (a cursor file copied from another poller, a producer
    whose C{plugin} changed, a file edited by hand): it can not tell where
    it got to.  The service reports it as the L{CursorError} of its file.

    @ivar reason: What is wrong with the cursor.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def require_fields(cursor: Any, what: str, fields: Mapping[str, type | tuple[type, ...]]) -> None:
    """
    Check that C{cursor} is a JSON object with C{fields} of the given types,
    as a source's C{poll} expects of the cursors it writes.

    @param what: The kind of poller, for the error (C{"a Koji poller's"}).
    @raise ForeignCursor: when it is not.
    """
    if not isinstance(cursor, dict):
        raise ForeignCursor(f"holds {type(cursor).__name__}, not {what} cursor")
    for name, kind in fields.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = cursor.get(name)
        # JSON's true and false are no numbers here.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ForeignCursor(f"is not {what} cursor: its {name!r} is "
                                f"{escape_control(repr(value), 60)}")


@dataclass(frozen=True)
class PollResult:
    """
    What one poll of a source found.

    @ivar messages: The messages to publish, in order.
    @ivar cursor: The position after these messages (a JSON value); saved once
        all of them have been handed over.
    @ivar more: The source knows there is more to fetch right away (it is
        catching up): poll again without waiting for the interval.
    @ivar lag: How far behind the source the new cursor is, in seconds, when
        the source can tell.
    """

    messages: Sequence[Message]
    cursor: Any
    more: bool = False
    lag: float | None = None


class IPollSource(Interface):
    """
    Something a L{PollingService} polls: it turns a cursor into messages and
    a new cursor, and never changes the cursor it was given.
    """

    description = Attribute("str: what is polled, for logs (no secrets)")

    def initial_cursor():  # type: ignore[no-untyped-def]
        """
        Where to start when there is no saved cursor.

        @return: a Deferred firing with a JSON value.
        """

    def poll(cursor):  # type: ignore[no-untyped-def]
        """
        Fetch what happened after C{cursor}.

        @return: a Deferred firing with a L{PollResult}; it may be cancelled
            (the service is stopping).
        """

    def close():  # type: ignore[no-untyped-def]
        """
        Release connections; called once when the service stops.

        @return: a Deferred, or C{None}.
        """


class CursorStore:
    """
    One JSON cursor in a file, written atomically.  Its methods block: call
    them in a thread.

    @ivar path: The file.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> tuple[bool, Any]:
        """
        Read the cursor.

        @return: C{(False, None)} when there is no file, else C{(True, cursor)}.
        @raise CursorError: when the file can not be read or is not a cursor.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return False, None
        except OSError as e:
            raise CursorError(self.path, f"can not be read: {e.strerror}") from None
        try:
            record = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise CursorError(self.path, f"is not valid JSON: {e}") from None
        if not isinstance(record, dict) or record.get("version") != CURSOR_VERSION or "cursor" not in record:
            raise CursorError(self.path, f"is not a version {CURSOR_VERSION} cursor record")
        return True, record["cursor"]

    def save(self, cursor: Any) -> None:
        """
        Replace the cursor: write a temporary file, flush it to disk, rename
        it over the old one, and flush the directory so the rename survives
        a crash too.

        @raise CursorError: when it can not be written.
        """
        directory = os.path.dirname(self.path) or "."
        try:
            payload = json.dumps(
                {"version": CURSOR_VERSION, "cursor": cursor}, sort_keys=True, separators=(",", ":")
            ).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise CursorError(self.path, f"cursor is not JSON-serializable: {e}") from None
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            replace_durably(self.path, payload, ".tmp")
            fsync_directory(directory)
        except OSError as e:
            raise CursorError(self.path, f"can not be written: {e.strerror or e}") from None


def thread_runner(reactor: Any) -> Callable[..., Deferred[Any]]:
    """
    Run blocking functions in C{reactor}'s thread pool; on a reactor without
    threads, which is a test's fake clock, at once (L{run_inline}).
    """
    from twisted.internet.threads import deferToThreadPool

    if not IReactorThreads.providedBy(reactor):
        return run_inline

    def run(f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def run_inline(f: Callable[..., _T], *args: Any) -> Deferred[_T]:
    """
    Run a function at once and wrap its result in a Deferred: for tests with
    a fake clock, where there is no thread pool.
    """
    return maybeDeferred(f, *args)


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, timezone.utc).replace(microsecond=0).isoformat()


def _describe(failure: Failure) -> str:
    value = failure.value
    return escape_control(f"{type(value).__name__}: {value}", 500)


def _retry_after(error: BaseException | None, depth: int = 0) -> float | None:
    """
    The delay a service asked for with C{Retry-After}, found on the error
    or what it was raised from (an API wrapping the client's errors).
    """
    if error is None or depth > 4:
        return None
    asked = getattr(error, "retry_after", None)
    if isinstance(asked, (int, float)) and not isinstance(asked, bool):
        return float(asked)
    return _retry_after(error.__cause__ or error.__context__, depth + 1)


class PollingService(Service):
    """
    Polls one L{IPollSource} and publishes what it finds; see the module
    docstring for the guarantees.

    @ivar polls: Polls completed successfully.
    @ivar errors: Polls that failed.
    @ivar published: Messages handed over.
    @ivar dropped: Messages the publisher refused for good.

    Blocking work (reading and writing the cursor) runs through
    C{run_in_thread}: by default in C{reactor}'s thread pool, or at once
    when C{reactor} has no threads (a L{twisted.internet.task.Clock} in a
    test).
    """

    log = HubLogger()

    def __init__(
        self,
        name: str,
        source: IPollSource,
        publisher: IPublisher,
        reactor: Any,
        state_dir: str,
        *,
        interval: float = 60.0,
        jitter: float = 0.1,
        backoff: float | None = None,
        max_backoff: float = 600.0,
        publish_window: int = 100,
        stop_timeout: float = 30.0,
        random: Callable[[], float] = _random.random,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be within [0, 1)")
        if publish_window < 1:
            raise ValueError("publish_window must be at least 1")
        self.name = name
        self.source = source
        self.publisher = publisher
        self.interval = interval
        self.jitter = jitter
        self.backoff = min(interval, 5.0) if backoff is None else backoff
        self.max_backoff = max(max_backoff, self.backoff)
        self.publish_window = publish_window
        self.stop_timeout = stop_timeout
        self.store = CursorStore(os.path.join(state_dir, CURSOR_FILE))
        self.polls = 0
        self.errors = 0
        self.published = 0
        self.dropped = 0
        self.consecutive_errors = 0
        self.last_poll: float | None = None
        self.last_success: float | None = None
        self.last_error: tuple[float, str] | None = None
        # The last failure logged above debug level, when, and whether the
        # failures since the last success include one so logged.
        self._logged_error: tuple[float, str] | None = None
        self._run_logged = False
        self.lag: float | None = None
        self._reactor = reactor
        self._random = random
        self._thread = run_in_thread if run_in_thread is not None else thread_runner(reactor)
        self._cursor_loaded = False
        self._cursor: Any = None
        self._phase = "stopped"
        self._next: IDelayedCall | None = None
        self._cycle_d: Deferred[Any] | None = None
        self._fetch_d: Deferred[Any] | None = None

    # --- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)  # type: ignore[no-untyped-call]
        self.log.info("Polling {source} every {interval:g} s", producer=self.name,
                      source=self.source.description, interval=self.interval)
        if self._cycle_d is None:
            self._schedule(0)
        # Otherwise a poll from before a stop that gave up waiting is still
        # handing over: it schedules the next one when it ends, so polls
        # never overlap.

    def stopService(self) -> Deferred[None]:
        """
        Stop polling: cancel the next poll, cancel a fetch in progress, and
        wait (at most C{stop_timeout} seconds) for a hand-over or cursor
        write in progress to finish.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._fetch_d is not None:
            self._fetch_d.cancel()
        waiting: Deferred[Any] = succeed(None)
        if self._cycle_d is not None:
            waiting = Deferred()
            cycle = self._cycle_d
            cycle.addBoth(lambda _: None if waiting.called else waiting.callback(None))
            waiting.addTimeout(self.stop_timeout, self._reactor, onTimeoutCancel=self._stop_timed_out)
        done: Deferred[None] = Deferred()

        def close(_: object) -> Deferred[Any]:
            self._phase = "stopped"
            return maybeDeferred(self.source.close)

        def closed(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("Closing {source} failed", result, producer=self.name,
                                 source=self.source.description)
            done.callback(None)

        waiting.addBoth(close).addBoth(closed)
        return done

    def _stop_timed_out(self, result: object, timeout: float) -> None:
        self.log.warn(
            "Stopped without waiting any longer for a hand-over in progress ({timeout:g} s); "
            "its messages will be polled and published again",
            producer=self.name, timeout=timeout,
        )

    # --- scheduling -------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        self._phase = "waiting" if self.consecutive_errors == 0 else "backing off"
        self._next = self._reactor.callLater(delay, self._run)

    def _poll_delay(self) -> float:
        spread = self.interval * self.jitter
        return max(0.0, self.interval + spread * (2 * self._random() - 1))

    def _backoff_delay(self) -> float:
        exponent = min(self.consecutive_errors - 1, 62)
        delay = min(self.max_backoff, self.backoff * (2**exponent))
        # "Equal jitter": never less than half the delay, never in lockstep
        # with other pollers of the same failing service.
        return float(delay / 2 + (delay / 2) * self._random())

    def _run(self) -> None:
        self._next = None
        self.last_poll = self._reactor.seconds()
        d = self._cycle()
        self._cycle_d = d
        d.addBoth(self._after_cycle)

    def _after_cycle(self, result: PollResult | Failure) -> None:
        self._cycle_d = None
        self._fetch_d = None
        if isinstance(result, Failure):
            if isinstance(result.value, CancelledError) and not self.running:
                return
            self.errors += 1
            self.consecutive_errors += 1
            now = self._reactor.seconds()
            described = _describe(result)
            if self.consecutive_errors == 1:
                # Quiet when it failed like this a moment ago, successes in
                # between (the service flaps)...
                logged = self._logged_error
                repeated = (logged is not None and logged[1] == described
                            and now - logged[0] < FLAP_LOG_INTERVAL)
            else:
                # ...but not once it fails twice in a row: logged then, and
                # its end too.
                repeated = self._run_logged and self.last_error is not None and (
                    self.last_error[1] == described
                )
            self.last_error = (now, described)
            delay = self._backoff_delay()
            asked = _retry_after(result.value)
            if asked is not None and asked > delay:
                # The service said when to come back (Retry-After).
                delay = asked
            if not repeated:
                self._logged_error = (now, described)
                self._run_logged = True
            if repeated:
                # Logged when it began; the status page and the metrics
                # count the polls that fail since.
                self.log.debug(
                    "Poll of {source} failed again ({count} in a row): {error}; next poll in "
                    "{delay:.1f} s", producer=self.name, source=self.source.description,
                    count=self.consecutive_errors, error=described, delay=delay,
                )
            elif isinstance(result.value, TemporarilyUnavailable):
                self.log.warn(
                    "Publisher can not take messages now ({error}); keeping the cursor, "
                    "next poll in {delay:.1f} s",
                    producer=self.name, error=_describe(result), delay=delay,
                )
            elif isinstance(result.value, FedhubError):
                self.log.error(
                    "Poll of {source} failed: {error}; next poll in {delay:.1f} s",
                    producer=self.name, source=self.source.description,
                    error=_describe(result), delay=delay,
                )
            else:
                self.log.failure(
                    "Poll of {source} failed unexpectedly; next poll in {delay:.1f} s",
                    result, producer=self.name, source=self.source.description, delay=delay,
                )
            self._schedule(delay)
            return
        self.polls += 1
        if self._run_logged:
            self.log.info(
                "Poll of {source} works again after {count} failed poll(s)",
                producer=self.name, source=self.source.description, count=self.consecutive_errors,
            )
            self._run_logged = False
        self.consecutive_errors = 0
        self.last_success = self._reactor.seconds()
        self.lag = result.lag
        self._schedule(0 if result.more else self._poll_delay())

    # --- one poll ---------------------------------------------------------

    def _fetch(self, f: Callable[..., Deferred[_T]], *args: Any) -> Deferred[_T]:
        d = maybeDeferred(f, *args)
        self._fetch_d = d
        return d

    @inlineCallbacks
    def _cycle(self) -> Generator[Deferred[Any], Any, PollResult]:
        if not self._cursor_loaded:
            self._phase = "loading"
            found, cursor = yield self._thread(self.store.load)
            if not found:
                self._phase = "fetching"
                cursor = yield self._fetch(self.source.initial_cursor)
                self._fetch_d = None
                self._phase = "saving"
                yield self._thread(self.store.save, cursor)
                self.log.info("First start: polling {source} from {cursor}",
                              producer=self.name, source=self.source.description,
                              cursor=_summary(cursor))
            self._cursor = cursor
            self._cursor_loaded = True
        self._phase = "fetching"
        try:
            result: PollResult = yield self._fetch(self.source.poll, self._cursor)
        except ForeignCursor as e:
            # As for a file that is no JSON: reported and retried until an
            # operator repairs or removes it, never "start over from now".
            raise CursorError(self.store.path, f"{e.reason}; remove the file to start "
                                               "from now") from None
        self._fetch_d = None
        if not self.running:
            raise CancelledError()
        self._phase = "publishing"
        yield self._publish_all(result.messages)
        self._phase = "saving"
        yield self._thread(self.store.save, result.cursor)
        self._cursor = result.cursor
        if result.messages:
            self.log.debug("Published {count} messages from {source}", producer=self.name,
                           count=len(result.messages), source=self.source.description)
        return result

    def _publish_all(self, messages: Sequence[Message]) -> Deferred[None]:
        """
        Hand C{messages} over in order, at most C{publish_window} at a time.

        @return: a Deferred firing when every one of them has been handed over
            (or dropped for good), or failing with the first temporary
            failure; no more are handed over after one.
        """
        done: Deferred[None] = Deferred()
        queue = iter(messages)
        state = {"in_flight": 0, "pumping": False, "exhausted": False}
        first_failure: list[Failure] = []

        def landed(result: object, message: Message) -> None:
            state["in_flight"] -= 1
            if isinstance(result, Failure):
                if isinstance(result.value, TemporarilyUnavailable) or not isinstance(
                    result.value, (PublishError, MessageError)
                ):
                    if not first_failure:
                        first_failure.append(result)
                else:
                    self.dropped += 1
                    self.log.error(
                        "Dropped message {msg_id} ({topic}): the publisher refused it for good: "
                        "{error}",
                        producer=self.name, msg_id=message.id, topic=message.topic,
                        error=_describe(result),
                    )
            else:
                self.published += 1
            if not state["pumping"]:
                pump()

        def pump() -> None:
            state["pumping"] = True
            try:
                while not first_failure and state["in_flight"] < self.publish_window:
                    message = next(queue, None)
                    if message is None:
                        state["exhausted"] = True
                        break
                    state["in_flight"] += 1
                    d = maybeDeferred(self.publisher.publish, message)
                    d.addBoth(landed, message)
            finally:
                state["pumping"] = False
            if state["in_flight"] == 0 and not done.called:
                if first_failure:
                    done.errback(first_failure[0])
                elif state["exhausted"]:
                    done.callback(None)

        pump()
        return done

    # --- status -----------------------------------------------------------

    @property
    def cursor(self) -> Any:
        """
        The last saved cursor (C{None} before the first load).
        """
        return self._cursor

    def status(self) -> dict[str, Any]:
        """
        Counters and times for a status page: state, polls, errors, published,
        dropped, last poll/success/error, lag and the time of the next poll.
        """
        next_in: float | None = None
        if self._next is not None and self._next.active():
            next_in = max(0.0, self._next.getTime() - self._reactor.seconds())
        return {
            "name": self.name,
            "source": self.source.description,
            "running": bool(self.running),
            "state": self._phase,
            "polls": self.polls,
            "errors": self.errors,
            "consecutive_errors": self.consecutive_errors,
            "published": self.published,
            "dropped": self.dropped,
            "last_poll": _iso(self.last_poll),
            "last_success": _iso(self.last_success),
            "last_error": None if self.last_error is None else {
                "time": _iso(self.last_error[0]), "error": self.last_error[1],
            },
            "lag": self.lag,
            "next_poll_in": next_in,
        }


# --- plugin glue shared by the XML-RPC pollers --------------------------


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def http_url(value: str) -> str | None:
    """
    The check of a poller's URL option: an http:// or https:// URL with a host.
    """
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an http:// or https:// URL"
    return None


def _fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be at least 0 and less than 1"


def poller_options(interval: float) -> dict[str, Any]:
    """
    The configuration keys every XML-RPC poller plugin has: its schedule and
    the limits of its client.

    @param interval: The default poll interval of this kind of poller.
    """
    from fedhub.config import Option
    from fedhub.xmlrpc import DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT

    return {
        "interval": Option(float, interval, "Seconds between polls when nothing is pending.",
                           check=_positive),
        "jitter": Option(float, 0.1, "Spread of the interval, as a fraction of it.",
                         check=_fraction),
        "max_backoff": Option(float, 600.0, "Longest wait after failed polls, in seconds.",
                              check=_positive),
        "timeout": Option(float, DEFAULT_TIMEOUT,
                          "Seconds one XML-RPC request may take, connecting to last byte.",
                          check=_positive),
        "max_response_bytes": Option(int, DEFAULT_MAX_RESPONSE_BYTES,
                                     "Largest XML-RPC response accepted, in bytes.",
                                     check=_positive),
        "ca_file": Option(str, None, "PEM bundle of the CAs that verify the HTTPS server "
                          "(default: the system's trust store).", path=True),
    }


def client_settings(options: Any) -> dict[str, Any]:
    """
    The L{fedhub.xmlrpc.XMLRPCClient} keyword arguments of a poller's options.
    """
    return {
        "timeout": float(options.get("timeout", 60.0)),
        "max_response_bytes": int(options.get("max_response_bytes", 32 * 1024 * 1024)),
        "ca_file": options.get("ca_file"),
    }


def polling_service(context: Any, source: IPollSource) -> PollingService:
    """
    The service that polls C{source} for a plugin's C{build}, scheduled by
    the options of L{poller_options}, its cursor in the component's state
    directory.

    @param context: a L{fedhub.plugins.PluginContext}.
    """
    options = context.options
    return PollingService(
        context.name,
        source,
        context.publisher,
        context.reactor,
        context.state_dir,
        interval=float(options.get("interval", 60.0)),
        jitter=float(options.get("jitter", 0.1)),
        max_backoff=float(options.get("max_backoff", 600.0)),
    )


def _summary(cursor: Any, limit: int = 200) -> str:
    """
    A short rendering of a cursor for logs.
    """
    try:
        text = json.dumps(cursor, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(cursor)
    return escape_control(text, limit)
