"""
Hand one Bugzilla notification mail on standard input to the hub (for procmail or a Postfix pipe).

The mail is parsed, checked against the copies already handed over (Bugzilla
sends one copy per recipient), turned into a message and handed to the
publisher of the configured C{bugzilla-smtp} producer's domain.  The exit
status follows C{<sysexits.h>}, which procmail and Postfix's C{pipe}
understand:

  - C{0}: accepted (published, or a copy of an event already published);
  - C{75} (C{EX_TEMPFAIL}): not now, the mail must be delivered again later
    (the spool is full or can not be written, the configuration can not be
    read, arguments it can not take, such as a C{--timeout} that is not a
    finite number greater than 0, an unexpected error);
  - C{65} (C{EX_DATAERR}): never acceptable (not Bugzilla mail, malformed,
    too large);
  - C{66} (C{EX_NOINPUT}): the file given with C{--input} can not be opened.

Every failure prints one line with the reason on standard error, and every
warning fedhub logs during the run one line of its own
(C{fedhub inject-mail: warning: ...}), whatever the exit status.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from zope.interface import implementer

from fedhub.cli.runner import positive_float
from fedhub.config import ComponentConfig, Config, load_config
from fedhub.errors import ConfigError, FedhubError
from fedhub.interfaces import IPublisher
from fedhub.message import Message
from fedhub.outbox.spool import spool_directory, write_spool
from fedhub.producers.bugzilla.producer import (
    Accepted,
    BugmailIntake,
    BugzillaSMTPPlugin,
    classify_failure,
    event_publisher_from_options,
)
from fedhub.text import escape_control

EX_OK = 0
#: The input data was incorrect: the mail will never be accepted.
EX_DATAERR = 65
#: The file given with C{--input} can not be opened.
EX_NOINPUT = 66
#: A temporary failure: the mail must be delivered again later.
EX_TEMPFAIL = 75

#: Where the configuration is read from unless C{--config} says otherwise.
DEFAULT_CONFIG = "/etc/fedhub/hub.toml"

#: The plugin whose configuration C{inject-mail} uses.
PLUGIN = BugzillaSMTPPlugin.name

#: The file (in the producer's state directory) recent fingerprints are kept in.
SEEN_FILE = "inject-mail.seen"

_T = TypeVar("_T")


class InjectProblem(FedhubError):
    """
    C{inject-mail} can not do its work; the mail must be retried.

    @ivar reason: Why, one line.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@implementer(IPublisher)
class SpoolPublisher:
    """
    Hands messages to a hub's outbox through the domain's spool directory
    (see L{fedhub.outbox.spool}): a hand-over is done once the message is
    durable on disk, whether or not the hub runs right now.
    """

    def __init__(self, domain: str, directory: str) -> None:
        self.domain = domain
        self.directory = directory

    def publish(self, message: Message) -> Deferred[None]:
        # A short-lived command: writing and fsyncing here, in the only
        # thread, blocks nothing else.
        return maybeDeferred(write_spool, self.directory, message).addCallback(lambda _: None)


def open_publisher(config: Config, producer_name: str) -> IPublisher:
    """
    The publisher C{inject-mail} hands its message to: the spool that feeds
    the durable outbox of the producer's domain.
    """
    producer = next(p for p in config.producers if p.name == producer_name)
    return SpoolPublisher(
        producer.domain, spool_directory(config.hub.state_dir, producer.domain)
    )


#: Seconds an C{inject-mail} waits for the seen file's lock, held by
#: another one handing over a mail, before going on without it.
SEEN_LOCK_WAIT = 10.0


class SeenFile:
    """
    Fingerprints of recently handed-over events, kept in a small file that
    every C{inject-mail} process shares (under an exclusive C{flock}): at
    most C{max_entries} lines of C{<time> <fingerprint>}, none older than
    C{window} seconds.

    A process that did not find its event keeps the lock until it has
    handed the event over and added it (or given up, L{release}): Bugzilla
    mails each recipient a copy at once, and a mail server runs several
    pipes together, so two copies must not both be found new.  It is best
    effort: when the file can not be used, or stays locked longer than
    L{SEEN_LOCK_WAIT} seconds, nothing is remembered (copies are then
    published again, with the same message id).
    """

    def __init__(
        self,
        path: str,
        window: float,
        max_entries: int,
        now: Callable[[], float] = time.time,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.window = window
        self.max_entries = max_entries
        self.now = now
        self.warn = warn
        self._held: IO[bytes] | None = None
        self._unusable = False

    def _entries(self, f: IO[bytes]) -> list[tuple[float, str]]:
        f.seek(0)
        horizon = self.now() - self.window
        entries: list[tuple[float, str]] = []
        for line in f.read(self.max_entries * 100).splitlines():
            when, _, key = line.decode("ascii", "replace").partition(" ")
            try:
                stamp = float(when)
            except ValueError:
                continue
            if stamp > horizon and key:
                entries.append((stamp, key))
        return entries[-self.max_entries :]

    def _open(self) -> IO[bytes] | None:
        """
        The file, locked: the one held, or opened and locked now; C{None}
        (warned about once) when it can not be.
        """
        held, self._held = self._held, None
        if held is not None:
            return held
        if self._unusable:
            return None
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            f = os.fdopen(fd, "r+b")
        except OSError as e:
            self._give_up(f"can not use {self.path} to recognize copies: {e.strerror or e}")
            return None
        deadline = time.monotonic() + SEEN_LOCK_WAIT
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.close()
                    self._give_up(f"{self.path} stayed locked by another inject-mail for "
                                  f"{SEEN_LOCK_WAIT:g} s; copies are not recognized this time")
                    return None
                time.sleep(0.01)
            except OSError as e:
                f.close()
                self._give_up(f"can not use {self.path} to recognize copies: {e.strerror or e}")
                return None

    def _give_up(self, reason: str) -> None:
        self._unusable = True
        if self.warn is not None:
            self.warn(reason)

    def seen(self, key: str) -> bool:
        """
        Whether C{key} was added within the window.  When it was not, the
        file stays locked until L{add} or L{release}.
        """
        f = self._open()
        if f is None:
            return False
        if any(k == key for _, k in self._entries(f)):
            f.close()
            return True
        self._held = f
        return False

    def release(self) -> None:
        """
        Let the lock L{seen} kept go, without adding anything (the hand-over
        failed).
        """
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def add(self, key: str) -> None:
        """
        Remember C{key}, dropping what is too old or too many.
        """
        f = self._open()
        if f is None:
            return
        with f:
            entries = [e for e in self._entries(f) if e[1] != key]
            entries.append((self.now(), key))
            data = "".join(f"{stamp:.3f} {k}\n" for stamp, k in entries[-self.max_entries :])
            encoded = data.encode("ascii")
            try:
                # Written over the old lines, then cut to length: a write
                # that fails (the disk full) leaves what was remembered,
                # where truncating first would lose all of it.
                f.seek(0)
                f.write(encoded)
                f.flush()
                f.truncate(len(encoded))
            except OSError as e:
                if self.warn is not None:
                    self.warn(f"can not update {self.path}: {e.strerror or e}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub inject-mail}.
    """
    parser.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG,
        help=f"the hub's TOML configuration file (default {DEFAULT_CONFIG}; unlike the other "
        "commands, never the built-in default, so that no mail is taken into a spool no "
        "configured hub reads)",
    )
    parser.add_argument(
        "-p", "--producer", default=None,
        help=f"the name of the {PLUGIN} producer whose settings and domain to use "
        "(default: the only one in the configuration)",
    )
    parser.add_argument(
        "-i", "--input", default="-",
        help="read the mail from this file instead of standard input",
    )
    parser.add_argument(
        "--source", default="stdin", help="where the mail came from, for the hub's logs",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=60.0,
        help="give up (exit 75) when the hand-over takes longer, in seconds (default 60)",
    )


def find_producer(config: Config, name: str | None) -> ComponentConfig:
    """
    The C{bugzilla-smtp} producer called C{name}, or the only one.

    @raise InjectProblem: when there is none, or several and no name.
    """
    producers = [p for p in config.producers if p.plugin == PLUGIN]
    if name is not None:
        for producer in producers:
            if producer.name == name:
                return producer
        raise InjectProblem(f"the configuration has no {PLUGIN} producer named {name!r}")
    if not producers:
        raise InjectProblem(f"the configuration has no {PLUGIN} producer")
    if len(producers) > 1:
        found = ", ".join(p.name for p in producers)
        raise InjectProblem(
            f"name the {PLUGIN} producer to use with --producer (found: {found})"
        )
    return producers[0]


def _read_mail(source: str, limit: int) -> bytes:
    if source == "-":
        if sys.stdin is None:
            # Started with file descriptor 0 closed.
            raise OSError("no standard input")
        stream: IO[bytes] = sys.stdin.buffer
        return stream.read(limit + 1)
    with open(source, "rb") as f:
        return f.read(limit + 1)


def _wait(d: Deferred[_T], timeout: float) -> _T | Failure:
    """
    The result of C{d}; runs the reactor (imported only now) when it has
    not fired yet.
    """
    results: list[_T | Failure] = []
    d.addBoth(results.append)
    if results:
        return results[0]
    from twisted.internet import reactor

    r: Any = reactor
    d.addTimeout(timeout, r)

    def stop(_: object) -> None:
        if r.running:
            r.stop()

    d.addBoth(stop)
    if not results:
        r.run()
    return results[0]


def inject(
    raw: bytes,
    publisher: IPublisher,
    producer: ComponentConfig,
    config: Config,
    *,
    source: str = "stdin",
    seen: SeenFile | None = None,
) -> Deferred[Accepted]:
    """
    Hand one mail over as the C{bugzilla-smtp} producer C{producer} would.

    @return: what L{BugmailIntake.receive} returns.
    """
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    on_event = event_publisher_from_options(
        publisher, config.hub.topic, producer.options, reactor, producer=producer.name
    )
    intake = BugmailIntake(on_event, clock=Clock(), producer=producer.name, dedup=seen)
    d = intake.receive(raw, source)
    close = getattr(on_event.enrich, "close", None)
    if callable(close):
        # The enrichment's web service connections, once the mail is handed over.
        d.addBoth(lambda result: maybeDeferred(close).addBoth(lambda _: result))
    return d


def _fail(reason: str, status: int) -> int:
    print(f"fedhub inject-mail: {escape_control(reason, 300)}", file=sys.stderr)
    return status


def _warn_on_stderr(event: dict[str, Any]) -> None:
    """
    A log observer printing fedhub's warnings and errors (an enrichment
    that fell back to the mail-derived message, say) on standard error, one
    line each: C{inject-mail} has no log of its own, and a mail server or
    procmail keeps what a pipe prints.
    """
    from twisted.logger import LogLevel, formatEvent

    if event.get("log_level") not in (LogLevel.warn, LogLevel.error, LogLevel.critical):
        return
    if not str(event.get("log_namespace", "")).startswith("fedhub"):
        return
    text = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text = f"{text}: {failure.getErrorMessage()}"
    label = "warning" if event["log_level"] is LogLevel.warn else "error"
    print(f"fedhub inject-mail: {label}: {escape_control(text, 300)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """
    Read one mail and hand it over; the exit status says what the sender
    must do (see the module docstring).
    """
    from twisted.logger import ILogObserver, globalLogPublisher

    observer = cast(ILogObserver, implementer(ILogObserver)(_warn_on_stderr))
    globalLogPublisher.addObserver(observer)
    try:
        return _run(args)
    except Exception as e:
        # Any other exit status (a traceback exits 1) makes a mail server
        # bounce the mail: an unforeseen failure must keep it queued.
        return _fail(f"unexpected error: {type(e).__name__}: {e}", EX_TEMPFAIL)
    finally:
        globalLogPublisher.removeObserver(observer)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        first = e.problems[0] if e.problems else None
        return _fail(f"{args.config}: {first or e}", EX_TEMPFAIL)
    except OSError as e:
        return _fail(f"{args.config}: {e.strerror or e}", EX_TEMPFAIL)
    try:
        producer = find_producer(config, args.producer)
    except InjectProblem as e:
        return _fail(e.reason, EX_TEMPFAIL)
    limit = int(producer.options.get("max_message_size") or 1024 * 1024)
    try:
        raw = _read_mail(args.input, limit)
    except OSError as e:
        if args.input != "-":
            # A file named by hand, not a mail server's pipe: retrying the
            # same command would not help.
            return _fail(f"can not read the mail: {args.input}: {e.strerror or e}", EX_NOINPUT)
        return _fail(f"can not read the mail: {e.strerror or e}", EX_TEMPFAIL)
    if len(raw) > limit:
        return _fail(f"the mail is larger than {limit} bytes", EX_DATAERR)
    if not raw.strip():
        return _fail("the mail is empty", EX_DATAERR)
    window = float(producer.options.get("dedup_window") or 0.0)
    seen = None
    if window > 0:
        seen = SeenFile(
            os.path.join(config.hub.state_dir, "components", producer.name, SEEN_FILE),
            window,
            int(producer.options.get("dedup_max_entries") or 10_000),
            warn=lambda text: print(f"fedhub inject-mail: warning: {text}", file=sys.stderr),
        )
    try:
        publisher = open_publisher(config, producer.name)
    except Exception as e:
        return _report(Failure(e))  # type: ignore[no-untyped-call]
    d: Deferred[Any] = inject(raw, publisher, producer, config, source=args.source, seen=seen)
    close = getattr(publisher, "close", None)
    if callable(close):

        def closed(result: object) -> Deferred[Any]:
            closing: Deferred[Any] = maybeDeferred(close)
            return closing.addBoth(lambda _: result)

        d.addBoth(closed)
    try:
        result = _wait(d, args.timeout)
    finally:
        if seen is not None:
            seen.release()
    if isinstance(result, Failure):
        return _report(result)
    return EX_OK


def _report(failure: Failure) -> int:
    error = failure.value
    if error is None:
        return _fail("unknown failure", EX_TEMPFAIL)
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    if isinstance(error, DeferredTimeout):
        return _fail("the hand-over timed out; try again later", EX_TEMPFAIL)
    refusal = classify_failure(error)
    if refusal.kind == "internal":
        return _fail(f"unexpected error: {type(error).__name__}: {error}", EX_TEMPFAIL)
    return _fail(refusal.reason, EX_TEMPFAIL if refusal.temporary else EX_DATAERR)
