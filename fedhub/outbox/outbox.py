"""
The outbox: the reliable publish path of one domain.

Producers hand messages to an L{Outbox}; its L{Outbox.publish} fires once the
message is on disk.  The outbox then publishes pending messages through the
domain's bus in hand-over order, with at most C{window} waiting for their
publisher confirm, and deletes a message only after its confirm.  Messages
the broker returns or refuses go to the store's failed area, are counted and
wait for an operator; they are never retried by themselves.  When the bus is
gone the outbox backs off (capped exponential, with jitter), keeps taking
messages up to its limits, and sends again, in order, once the bus is back.

Hand-overs that arrive while a transaction is being written wait for the next
one, and deletions of confirmed messages ride along: under load, many
messages share one fsync.  Memory holds at most the window, a batch of
committed messages ready to send and the hand-overs waiting for the disk; a
larger backlog stays on disk and is read back a batch at a time, in the form
it is published in, so that reading it back costs little more than the I/O.

See C{docs/outbox.md} for the design and its reasons.
"""

from __future__ import annotations

import heapq
import random as _random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure as TwistedFailure
from zope.interface import implementer

from fedhub.errors import (
    ChannelError,
    DecodeError,
    MessageError,
    MessageNacked,
    MessageReturned,
    PublishError,
    TemporarilyUnavailable,
)
from fedhub.interfaces import IBus, IPublisher
from fedhub.logs import HubLogger
from fedhub.message import Message
from fedhub.text import escape_control
from fedhub.outbox.store import (
    NACKED,
    REJECTED,
    RETURNED,
    UNREADABLE,
    CommitResult,
    Executor,
    FailedPage,
    FailedRecord,
    Failure,
    Store,
    StoreError,
    StoredRow,
    Summary,
    ThreadExecutor,
    decode_for_publish,
    encode,
)

#: Events an observer hears about, with the message id.
CONFIRMED = "confirmed"
OBSERVED_EVENTS = (CONFIRMED, RETURNED, NACKED, REJECTED)

#: An observer: called with an event name and a message id.
Observer = Callable[[str, str], object]

#: Reasons recorded in the failed area are cut to this many characters.
_MAX_REASON = 1000


class _DelayedCall(Protocol):
    def cancel(self) -> None:
        """Cancel the call."""

    def active(self) -> bool:
        """Whether it is still to run."""


class _Reactor(Protocol):
    """
    What the outbox needs of a reactor: time and timers.
    """

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> _DelayedCall:
        """Call something later."""

    def seconds(self) -> float:
        """The current time."""


class _Bus(Protocol):
    """
    The part of L{IBus} the outbox uses, typed.
    """

    connected: bool
    #: Only read when the bus has C{call_after_confirms} (L{AMQPBus}).
    confirming: bool

    def publish(self, message: Message) -> Deferred[None]:
        """Publish one message; fires on its confirm."""


def _error(failure: TwistedFailure) -> BaseException:
    """
    The exception a failure carries.
    """
    return cast(BaseException, failure.value)


class _Entry:
    """
    A committed message the outbox holds in memory: ready to send, waiting
    to be sent again, or waiting for its confirm.

    While it is sent, it is what a bus with C{publish_to} (L{AMQPBus})
    reports the publish's outcome to, in place of a Deferred per message.
    """

    __slots__ = ("seq", "message", "size", "created", "outbox", "generation")

    def __init__(self, outbox: Outbox, seq: int, message: Message, size: int, created: float) -> None:
        self.outbox = outbox
        self.seq = seq
        self.message = message
        self.size = size
        self.created = created
        self.generation = 0

    def callback(self, result: None) -> None:
        """The bus reports the message confirmed."""
        self.outbox._outcome(result, self, self.generation)

    def errback(self, error: BaseException) -> None:
        """The bus reports the message failed."""
        self.outbox._outcome(TwistedFailure(error), self, self.generation)


class _Handover:
    """
    A message handed over and not yet on disk.
    """

    __slots__ = ("message", "data", "created", "deferred")

    def __init__(self, message: Message, data: bytes, created: float, deferred: Deferred[None]) -> None:
        self.message = message
        self.data = data
        self.created = created
        self.deferred = deferred


@dataclass(frozen=True)
class OutboxStats:
    """
    Numbers about one outbox, for the status page and metrics.  Counters
    count since the service started.

    @ivar domain: The domain.
    @ivar accepted: Hand-overs written to disk.
    @ivar published: Messages given to the bus, resends included.
    @ivar confirmed: Messages the broker confirmed (then deleted).
    @ivar returned: Messages the broker returned as unroutable.
    @ivar nacked: Messages the broker refused (C{basic.nack}).
    @ivar rejected: Messages the bus refused as invalid.
    @ivar depth: Messages on disk waiting for their confirm.
    @ivar depth_bytes: Their stored size.
    @ivar waiting_for_disk: Hand-overs not yet written.
    @ivar in_flight: Messages published and not yet confirmed.
    @ivar failed: Messages in the failed area.
    @ivar failed_bytes: Their stored size.
    @ivar oldest_age: Seconds since the oldest waiting message was handed
        over, or C{None} when none waits (or it is not known yet).
    @ivar held: Messages held in memory (sending, ready to send, waiting for
        the disk).
    @ivar paused: Whether sending is paused, waiting for the bus.
    @ivar transactions: Store transactions written.
    """

    domain: str
    accepted: int
    published: int
    confirmed: int
    returned: int
    nacked: int
    rejected: int
    depth: int
    depth_bytes: int
    waiting_for_disk: int
    in_flight: int
    failed: int
    failed_bytes: int
    oldest_age: float | None
    held: int
    paused: bool
    transactions: int


@implementer(IPublisher)
class Outbox(Service):
    """
    The durable publisher of one domain: an L{IPublisher} and a service.

    @ivar domain: The domain messages go to.
    @ivar store: The store holding the messages.
    """

    log = HubLogger()

    def __init__(
        self,
        domain: str,
        directory: str,
        bus: IBus,
        reactor: _Reactor,
        *,
        window: int = 1000,
        max_messages: int = 100_000,
        max_bytes: int = 1024 * 1024 * 1024,
        max_waiting: int = 10_000,
        read_batch: int = 2000,
        stop_timeout: float = 10.0,
        retry_initial: float = 0.2,
        retry_max: float = 10.0,
        executor: Executor | None = None,
        store: Store | None = None,
        random: _random.Random | None = None,
    ) -> None:
        """
        @param domain: The domain's name.
        @param directory: Where the store lives (the hub passes
            C{<state_dir>/outbox/<domain>}); nothing is created before
            C{startService}.
        @param bus: The transport messages are published through.
        @param reactor: Provides time and timers.
        @param window: At most this many messages wait for their confirm at
            once.
        @param max_messages: Hand-overs are refused (temporarily) while this
            many messages are waiting.
        @param max_bytes: Hand-overs are refused (temporarily) while the
            stored messages, failed ones included, would take more bytes.
        @param max_waiting: Hand-overs are refused (temporarily) while this
            many wait for the disk.
        @param read_batch: A backlog on disk is read back this many messages
            at a time (once half of them are sent, so that the next batch
            arrives before the window runs dry); it also bounds the committed
            messages kept in memory besides those in flight.
        @param stop_timeout: C{stopService} waits this long for confirms.
        @param retry_initial: The first delay, in seconds, before sending
            again after the bus failed (or before retrying a failed disk).
        @param retry_max: The longest such delay.
        @param executor: Runs the store's disk I/O; default a dedicated
            thread.  Tests pass a synchronous or hand-driven one.
        @param store: The store to use instead of one on C{directory}.
        @param random: The source of the backoff jitter.
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        if read_batch < 2:
            raise ValueError(f"read_batch must be at least 2, not {read_batch}")
        for name, value in (
            ("max_messages", max_messages),
            ("max_bytes", max_bytes),
            ("max_waiting", max_waiting),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, not {value}")
        self.domain = domain
        self._bus = cast(_Bus, bus)
        self._reactor = reactor
        self._window = window
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._max_waiting = max_waiting
        self._read_batch = read_batch
        self._stop_timeout = stop_timeout
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._random = random or _random.Random()
        if store is None:
            if executor is None:
                executor = ThreadExecutor(cast(Any, reactor), name=f"fedhub-outbox-{domain}")
            store = Store(directory, executor)
        self.store = store
        self._observers: list[Observer] = []
        # A bus that settles a confirm covering many messages in one go
        # (AMQPBus) says so: the bookkeeping after each of them then waits
        # for the end, and runs once.
        after_confirms = getattr(bus, "call_after_confirms", None)
        publish_to = getattr(bus, "publish_to", None)
        self._publish_to: Callable[[Message, _Entry], None] | None = (
            publish_to if callable(publish_to) else None
        )
        self._batching = callable(after_confirms)
        if after_confirms is not None and self._batching:
            after_confirms(self._confirms_settled)
        self._reset()

    def _reset(self) -> None:
        """
        Forget everything held in memory; the store is the truth.
        """
        # The store.
        self._opening = False
        self._opened = False
        self._trouble: str | None = None
        self._problem: str | None = None
        self._trouble_call: _DelayedCall | None = None
        self._trouble_attempt = 0
        # Writing.
        self._inserts: list[_Handover] = []
        self._deletes: list[tuple[int, int]] = []
        self._failures: list[Failure] = []
        self._committing = False
        self._flushing = False
        self._flush_again = False
        self._waiting_count = 0
        self._waiting_bytes = 0
        # Sending.
        self._ready: deque[_Entry] = deque()
        self._resend: list[tuple[int, _Entry]] = []
        self._inflight: dict[int, _Entry] = {}
        self._backlog = False
        self._loaded_upto = 0
        # Retries of the failed area under way: each moves its batches to
        # the end of the pending messages, one transaction after the other,
        # and a hand-over committed in between is numbered after them.  It
        # must not be kept in memory then, as that would move the point the
        # backlog is read back from past the batches already moved.
        self._retrying = 0
        self._loading = False
        self._load_call: _DelayedCall | None = None
        # Why the backlog can not be read back (a damaged page, say), until
        # a read works again: hand-overs are still taken meanwhile, but the
        # messages from there on are not published.
        self._load_problem: str | None = None
        # Failed reads back in a row: its own count, since writes that
        # succeed meanwhile say nothing about the pages a read needs.
        self._load_attempt = 0
        # The most rows a read back asks for: halved after a read that
        # failed on what may be one damaged row, so that the rows before it
        # are read and published; doubled again after each full read.
        self._load_cap = self._read_batch
        self._paused = False
        self._probing = False
        self._probe_sent = False
        self._retry_call: _DelayedCall | None = None
        # Waits for the bus to connect while sending is paused (see _pause).
        self._connect_wait: Deferred[None] | None = None
        self._attempt = 0
        self._generation = 0
        self._settled_later = False
        self._pumping = False
        self._pump_again = False
        self._oldest_hint: float | None = None
        # Stopping.
        self._stop_d: Deferred[None] | None = None
        self._stop_call: _DelayedCall | None = None
        self._stop_timed_out = False
        self._closing = False
        self._start_after_stop = False
        # Counters.
        self._accepted = 0
        self._published = 0
        self._confirmed = 0
        self._returned = 0
        self._nacked = 0
        self._rejected = 0

    # --- IPublisher ------------------------------------------------------

    def publish(self, message: Message) -> Deferred[None]:
        """
        Hand a message over.

        @return: a Deferred firing with C{None} once the message is on disk.
            It fails with L{TemporarilyUnavailable} when the outbox is full,
            the disk is full or failing, or the outbox is not running (its
            C{reason} says which); with L{MessageError} when the message can
            not be stored; with L{PublishError} when it is larger than the
            whole outbox.  Cancelling it while the message waits for the next
            transaction withdraws the message (it is never written); once
            that transaction has started, the message is stored and
            published when it commits, even though the Deferred fails with
            C{CancelledError}.
        """
        if not isinstance(message, Message):
            return fail(MessageError(f"only Message objects can be published, not {type(message).__name__}"))
        if not self.running or self._stop_d is not None:
            # Running with a stop under way: started again before it ended.
            state = "is still stopping" if self.running else "is not running"
            return fail(TemporarilyUnavailable(f"the outbox of domain {self.domain} {state}", message.id))
        if self._trouble is not None:
            return fail(TemporarilyUnavailable(self._trouble, message.id))
        store = self.store
        full = self._full_by_count(store.pending_count + self._waiting_count)
        if full is not None:
            return fail(TemporarilyUnavailable(full, message.id))
        try:
            data = encode(message)
        except MessageError as e:
            return fail(e)
        size = len(data)
        if size > self._max_bytes:
            return fail(
                PublishError(
                    f"the message takes {size} bytes, more than the whole outbox of domain "
                    f"{self.domain} may hold ({self._max_bytes})",
                    message.id,
                )
            )
        full = self._full_by_bytes(
            store.pending_bytes + store.failed_bytes + self._waiting_bytes, size
        )
        if full is not None:
            return fail(TemporarilyUnavailable(full, message.id))
        if self._waiting_count >= self._max_waiting:
            return fail(
                TemporarilyUnavailable(
                    f"the outbox of domain {self.domain} is busy: {self._waiting_count} "
                    "hand-overs wait for the disk",
                    message.id,
                )
            )
        d: Deferred[None] = Deferred(self._cancel_handover)
        self._inserts.append(_Handover(message, data, self._reactor.seconds(), d))
        self._waiting_count += 1
        self._waiting_bytes += size
        self._flush()
        return d

    def _cancel_handover(self, d: Deferred[None]) -> None:
        """
        A producer cancelled a hand-over (a timeout, say).  Still queued
        for the next transaction, it is taken out and never written.  Once
        its transaction has started nothing can take it back: it is stored
        and published if the transaction commits, and the Deferred fails
        with C{CancelledError} either way.
        """
        inserts = self._inserts
        for index in range(len(inserts)):
            handover = inserts[index]
            if handover.deferred is d:
                del inserts[index]
                self._waiting_count -= 1
                self._waiting_bytes -= len(handover.data)
                return

    # --- observation -----------------------------------------------------

    def add_observer(self, observer: Observer) -> None:
        """
        Call C{observer(event, message_id)} for every outcome of a publish:
        C{"confirmed"}, C{"returned"}, C{"nacked"} or C{"rejected"}.  It
        runs in the reactor thread and must be quick; what it raises is
        logged and ignored.
        """
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        """
        Stop calling an observer added with L{add_observer}.
        """
        self._observers.remove(observer)

    def _notify(self, event: str, message_id: str) -> None:
        for observer in list(self._observers):
            try:
                observer(event, message_id)
            except Exception:
                self.log.failure(
                    "Outbox observer {observer!r} failed on {event} of {msg_id}",
                    observer=observer,
                    event=event,
                    msg_id=message_id,
                    domain=self.domain,
                )

    @property
    def problem(self) -> str | None:
        """
        Why the store can not be used, from its last failure to open or to
        write (a disk full, a damaged file), until it opens or writes again
        (meanwhile every hand-over is refused); else why its backlog can not
        be read back, until a read works again (meanwhile the messages from
        there on are not published); C{None} when it works.
        """
        return self._problem or self._load_problem

    def stats(self) -> OutboxStats:
        """
        The outbox's numbers now.
        """
        store = self.store
        oldest: float | None = None
        for entry in self._inflight.values():
            if oldest is None or entry.created < oldest:
                oldest = entry.created
        for candidate in (self._resend[0][1] if self._resend else None, self._ready[0] if self._ready else None):
            if candidate is not None and (oldest is None or candidate.created < oldest):
                oldest = candidate.created
        if oldest is None and store.pending_count:
            oldest = self._oldest_hint
        return OutboxStats(
            domain=self.domain,
            accepted=self._accepted,
            published=self._published,
            confirmed=self._confirmed,
            returned=self._returned,
            nacked=self._nacked,
            rejected=self._rejected,
            depth=store.pending_count,
            depth_bytes=store.pending_bytes,
            waiting_for_disk=self._waiting_count,
            in_flight=len(self._inflight),
            failed=store.failed_count,
            failed_bytes=store.failed_bytes,
            oldest_age=None if oldest is None else max(0.0, self._reactor.seconds() - oldest),
            held=self.held(),
            paused=self._paused,
            transactions=store.transactions,
        )

    def held(self) -> int:
        """
        How many messages the outbox holds in memory now: in flight, ready
        to send, to be sent again and waiting for the disk.  Committed ones
        are at most C{window + read_batch}, however large the backlog on
        disk; the hand-overs waiting for the disk at most C{max_waiting}.
        """
        return len(self._inflight) + len(self._ready) + len(self._resend) + self._waiting_count

    # --- the failed area -------------------------------------------------

    def failed(self, after_seq: int = 0, limit: int = 100) -> Deferred[list[FailedRecord]]:
        """
        List the failed area a page at a time (see L{Store.failed}).
        """
        if not self.store.is_open:
            return fail(TemporarilyUnavailable(f"the outbox of domain {self.domain} is not open"))
        return self.store.failed(after_seq, limit)

    def failed_page(self, after_seq: int, limit: int, max_bytes: int) -> Deferred[FailedPage]:
        """
        One page of the failed area, bounded in records and bytes (see
        L{Store.failed_page}).
        """
        if not self.store.is_open:
            return fail(TemporarilyUnavailable(f"the outbox of domain {self.domain} is not open"))
        return self.store.failed_page(after_seq, limit, max_bytes)

    def retry_failed(self, seqs: Iterable[int] | None = None) -> Deferred[int]:
        """
        Move failed messages back to the end of the queue to publish them
        again (all of them when C{seqs} is C{None}).

        @return: a Deferred firing with how many were moved.
        """
        if not self.store.is_open:
            return fail(TemporarilyUnavailable(f"the outbox of domain {self.domain} is not open"))
        d = self.store.retry_failed(seqs, self._reactor.seconds())
        self._retrying += 1

        def ended(result: Any) -> Any:
            self._retrying -= 1
            return result

        d.addBoth(ended)

        def moved(count: int) -> int:
            if count:
                self.log.info(
                    "{count} failed messages of domain {domain} queued again",
                    count=count,
                    domain=self.domain,
                )
                self._backlog = True
                self._pump()
            return count

        def stopped_half_way(failure: TwistedFailure) -> TwistedFailure:
            # The batches before the one that failed may be pending: read
            # them back (a read that finds none ends the backlog again).
            self._backlog = True
            self._pump()
            return failure

        return d.addCallbacks(moved, stopped_half_way)

    def drop_failed(self, seqs: Iterable[int] | None = None) -> Deferred[int]:
        """
        Delete failed messages for good (all of them when C{seqs} is
        C{None}).

        @return: a Deferred firing with how many were dropped.
        """
        if not self.store.is_open:
            return fail(TemporarilyUnavailable(f"the outbox of domain {self.domain} is not open"))
        d = self.store.drop_failed(seqs)

        def dropped(count: int) -> int:
            if count:
                self.log.warn(
                    "{count} failed messages of domain {domain} dropped", count=count, domain=self.domain
                )
            return count

        return d.addCallback(dropped)

    # --- service ---------------------------------------------------------

    def startService(self) -> None:
        """
        Open the store and publish everything it holds.

        Started again while a stop is still under way, the outbox first
        lets the stop finish (closing the store and joining its thread) and
        then opens the store afresh; hand-overs are refused meanwhile.
        """
        Service.startService(self)  # type: ignore[no-untyped-call]
        stop_d = self._stop_d
        if stop_d is not None and not stop_d.called:
            # Opening now would race the close: it would stop the thread
            # the new open runs on and mark the outbox closed after it.
            self._start_after_stop = True
            return
        self._reset()
        self._open()

    def stopService(self) -> Deferred[None]:
        """
        Stop taking messages and stop sending.  The returned Deferred fires
        once every hand-over taken is on disk, the confirms in flight have
        arrived (or C{stop_timeout} passed: those messages stay pending and
        are published again at the next start) and the store is closed.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._stop_d is not None:
            waiter: Deferred[None] = Deferred()

            def stopped(result: object) -> object:
                waiter.callback(None)
                return result

            self._stop_d.addBoth(stopped)
            return waiter
        self._stop_d = Deferred()
        for name in ("_retry_call", "_load_call", "_trouble_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        # One last try at writing what is queued, even after a disk error.
        self._trouble = None
        if self._inflight:
            self._stop_call = self._reactor.callLater(self._stop_timeout, self._stop_timeout_passed)
        d = self._stop_d
        self._check_stop()
        return d

    def _stop_timeout_passed(self) -> None:
        self._stop_call = None
        self._stop_timed_out = True
        self.log.warn(
            "{count} messages of domain {domain} are still waiting for their confirm; they stay "
            "in the outbox and are published again at the next start",
            count=len(self._inflight),
            domain=self.domain,
        )
        self._check_stop()

    def _check_stop(self) -> None:
        """
        Close the store once stopping has nothing left to wait for.
        """
        if self._stop_d is None or self._closing:
            return
        if self._opening or self._committing or self._loading:
            return
        if self._inflight and not self._stop_timed_out:
            return
        if self._opened and (self._inserts or self._deletes or self._failures):
            self._flush()
            return
        if self._inserts:
            # The store never opened: these were never accepted.
            inserts, self._inserts = self._inserts, []
            self._fail_handovers(inserts, f"the outbox of domain {self.domain} is stopping")
        self._closing = True
        if self._stop_call is not None and self._stop_call.active():
            self._stop_call.cancel()
        self._stop_call = None
        stop_d = self._stop_d

        def closed(result: object) -> None:
            if isinstance(result, TwistedFailure):
                self.log.failure(
                    "Closing the outbox store of domain {domain} failed", result, domain=self.domain
                )
            self._opened = False
            stop_d.callback(None)
            if self._start_after_stop:
                # Started again while this stop ran, and not stopped since.
                self._start_after_stop = False
                if self.running:
                    self._reset()
                    self._open()

        self.store.close().addBoth(closed)

    # --- the store -------------------------------------------------------

    def _open(self) -> None:
        self._opening = True
        d = self.store.open()
        d.addCallbacks(self._store_opened, self._store_open_failed)
        d.addErrback(self._bug, "opening the store")

    def _store_opened(self, summary: Summary) -> None:
        self._opening = False
        self._opened = True
        self._trouble_attempt = 0
        self._problem = None
        self._backlog = summary.pending > 0
        self._loaded_upto = 0
        self._oldest_hint = summary.oldest_created
        self.log.info(
            "Outbox of domain {domain} open: {pending} messages to publish, {failed} failed",
            domain=self.domain,
            pending=summary.pending,
            failed=summary.failed,
        )
        self._refuse_over_limits()
        if self._stop_d is not None:
            self._check_stop()
            return
        self._flush()
        self._pump()

    def _refuse_over_limits(self) -> None:
        """
        Hold the hand-overs taken while the store was opening to the limits,
        now that what the store holds is known: they were checked against
        counts of nothing.  From the first one that does not fit on, they
        are refused, so a producer's messages keep their order.
        """
        store = self.store
        count = store.pending_count
        used = store.pending_bytes + store.failed_bytes
        for index, handover in enumerate(self._inserts):
            size = len(handover.data)
            reason = self._full_by_count(count) or self._full_by_bytes(used, size)
            if reason is None:
                count += 1
                used += size
                continue
            refused, self._inserts = self._inserts[index:], self._inserts[:index]
            self._fail_handovers(refused, reason)
            return

    def _full_by_count(self, count: int) -> str | None:
        """
        Why a hand-over is refused with C{count} messages waiting, or
        C{None} when there is room.
        """
        if count >= self._max_messages:
            return (
                f"the outbox of domain {self.domain} is full: {count} messages waiting "
                f"(limit {self._max_messages})"
            )
        return None

    def _full_by_bytes(self, used: int, size: int) -> str | None:
        """
        Why a hand-over of C{size} bytes is refused with C{used} bytes
        stored, or C{None} when there is room.
        """
        if used + size > self._max_bytes:
            return (
                f"the outbox of domain {self.domain} is full: {used} bytes stored "
                f"(limit {self._max_bytes})"
            )
        return None

    def _store_open_failed(self, failure: TwistedFailure) -> None:
        self._opening = False
        if self._stop_d is not None:
            self.log.failure("The outbox store of domain {domain} did not open", failure, domain=self.domain)
            self._check_stop()
            return
        self._set_trouble(failure, [])

    def _trouble_reason(self, error: BaseException) -> str:
        verb = "can not write" if self._opened else "can not open"
        if isinstance(error, StoreError):
            if error.disk_full:
                return f"the disk of the outbox of domain {self.domain} is full"
            if error.locked:
                return f"the outbox of domain {self.domain} is in use by another process"
            return f"the outbox of domain {self.domain} {verb} {error.path}: {error.reason}"
        return f"the outbox of domain {self.domain} {verb}: {error!r}"

    def _set_trouble(self, failure: TwistedFailure, failed: list[_Handover]) -> None:
        """
        The store failed: refuse hand-overs for a while, then try again.

        @param failed: Hand-overs of the failed transaction; they fail, and
            so do those queued for the next one.
        """
        reason = self._trouble_reason(_error(failure))
        delay = self._backoff(self._trouble_attempt)
        self._trouble_attempt += 1
        if self._trouble_attempt == 1:
            if isinstance(failure.value, StoreError):
                self.log.error(
                    "{reason}; refusing messages, trying again in {delay:.1f}s",
                    reason=reason,
                    delay=delay,
                    domain=self.domain,
                )
            else:
                self.log.failure("{reason}", failure, reason=reason, domain=self.domain)
        else:
            self.log.info("{reason}; trying again in {delay:.1f}s", reason=reason, delay=delay, domain=self.domain)
        # Set before failing anyone: a producer retrying at once from its
        # errback must be refused, not start another transaction.
        self._trouble = reason
        self._problem = reason
        if self._trouble_call is not None and self._trouble_call.active():
            self._trouble_call.cancel()
        self._trouble_call = self._reactor.callLater(delay, self._trouble_over)
        queued, self._inserts = self._inserts, []
        self._fail_handovers(failed + queued, reason)

    def _trouble_over(self) -> None:
        self._trouble_call = None
        self._trouble = None
        if not self._opened:
            self._open()
        else:
            self._flush()
            self._pump()

    def _fail_handovers(self, handovers: list[_Handover], reason: str) -> None:
        for handover in handovers:
            self._waiting_count -= 1
            self._waiting_bytes -= len(handover.data)
            if not handover.deferred.called:
                handover.deferred.errback(TemporarilyUnavailable(reason, handover.message.id))

    def _flush(self) -> None:
        """
        Start a transaction with everything queued, unless one is running:
        what comes in meanwhile waits for the next one (group commit).
        """
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            while True:
                self._flush_again = False
                if (
                    not self._committing
                    and self._opened
                    and not self._closing
                    and self._trouble is None
                    and (self._inserts or self._deletes or self._failures)
                ):
                    inserts, self._inserts = self._inserts, []
                    deletes, self._deletes = self._deletes, []
                    failures, self._failures = self._failures, []
                    self._committing = True
                    d = self.store.commit(
                        [(h.message.id, h.created, h.data) for h in inserts], deletes, failures
                    )
                    d.addCallbacks(
                        self._committed,
                        self._commit_failed,
                        callbackArgs=(inserts,),
                        errbackArgs=(inserts, deletes, failures),
                    )
                    d.addErrback(self._bug, "writing to the store")
                if not self._flush_again:
                    break
        finally:
            self._flushing = False

    def _committed(self, result: CommitResult, inserts: list[_Handover]) -> None:
        self._trouble_attempt = 0
        self._problem = None
        count = len(inserts)
        if count:
            for handover in inserts:
                self._waiting_bytes -= len(handover.data)
            self._waiting_count -= count
            self._accepted += count
            if not self._backlog and not self._loading and not self._paused and not self._retrying:
                # Keep them in memory (they were held as hand-overs already)
                # so they need not be read back, as many as the ready queue
                # takes; the rest is read back from disk in its turn.  Not
                # while sending is paused: an outage may last, and then the
                # backlog is best on disk only.
                first = result.first_seq
                ready = self._ready
                keep = min(count, self._read_batch - len(ready))
                for i in range(max(0, keep)):
                    handover = inserts[i]
                    ready.append(
                        _Entry(self, first + i, handover.message, len(handover.data), handover.created)
                    )
                if keep < count:
                    self._backlog = True
                self._loaded_upto = first + max(0, keep) - 1
            else:
                self._backlog = True
            # Still marked as committing: hand-overs made from these
            # callbacks queue up for the next transaction together.  One
            # cancelled during the transaction has had its answer already.
            for handover in inserts:
                if not handover.deferred.called:
                    handover.deferred.callback(None)
        self._committing = False
        self._next_steps()

    def _commit_failed(
        self,
        failure: TwistedFailure,
        inserts: list[_Handover],
        deletes: list[tuple[int, int]],
        failures: list[Failure],
    ) -> None:
        if self._stop_d is not None:
            reason = self._trouble_reason(_error(failure))
            if deletes or failures:
                self.log.warn(
                    "{reason}: the outcome of {count} publishes was not recorded; those messages "
                    "are published again at the next start",
                    reason=reason,
                    count=len(deletes) + len(failures),
                    domain=self.domain,
                )
            queued, self._inserts = self._inserts, []
            self._deletes = []
            self._failures = []
            self._fail_handovers(inserts + queued, reason)
            self._committing = False
            self._check_stop()
            return
        # Keep the bookkeeping for the next attempt; refuse the hand-overs.
        self._deletes[:0] = deletes
        self._failures[:0] = failures
        self._set_trouble(failure, inserts)
        self._committing = False
        # An errback of those hand-overs may have begun a stop, which waited
        # for this transaction.
        self._check_stop()

    # --- sending ---------------------------------------------------------

    def _pump(self) -> None:
        """
        Send what the window allows, and read more from disk when memory runs
        low.  Re-entrant calls (a bus that confirms at once) only ask the
        running loop for another round.
        """
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                self._send_some()
                self._maybe_load()
                if not self._pump_again:
                    break
        finally:
            self._pumping = False

    def _send_some(self) -> None:
        if not self._opened or self._paused or self._stop_d is not None:
            return
        window = self._window
        resend = self._resend
        ready = self._ready
        inflight = self._inflight
        bus = self._bus
        while len(inflight) < window and (resend or ready):
            if self._probing:
                # After a pause one message goes first; the window opens
                # again with its confirm.
                if self._probe_sent:
                    return
                self._probe_sent = True
            if not bus.connected:
                self._pause("the bus is not connected")
                return
            entry = heapq.heappop(resend)[1] if resend else ready.popleft()
            self._send(entry)
            if self._paused:
                return

    def _send(self, entry: _Entry) -> None:
        generation = entry.generation = self._generation
        self._inflight[entry.seq] = entry
        self._published += 1
        publish_to = self._publish_to
        if publish_to is not None:
            # The bus reports to the entry: no Deferred per message.
            try:
                publish_to(entry.message, entry)
            except Exception:
                self._outcome(TwistedFailure(), entry, generation)
            return
        try:
            d = self._bus.publish(entry.message)
        except Exception:
            d = fail()
        # One callback for both outcomes: a publish is the outbox's most
        # frequent event, and each callback added costs.
        d.addBoth(self._outcome, entry, generation)

    def _outcome(self, result: object, entry: _Entry, generation: int) -> None:
        try:
            if isinstance(result, TwistedFailure):
                self._publish_failed(result, entry, generation)
            else:
                self._acked(result, entry)
        except Exception:
            self._bug(TwistedFailure(), "handling a publish outcome")

    def _acked(self, result: object, entry: _Entry) -> None:
        if self._inflight.get(entry.seq) is not entry:
            return
        del self._inflight[entry.seq]
        if self._closing:
            # The stop gave up waiting and the store is closing or closed:
            # the deletion can not be written, so this confirm changes
            # nothing and is neither counted nor reported.
            self.log.debug(
                "Message {msg_id} of domain {domain} was confirmed after the outbox stopped; "
                "it stays in the outbox and is published again at the next start",
                msg_id=escape_control(entry.message.id, 100),
                domain=self.domain,
            )
            return
        self._confirmed += 1
        self._probing = False
        self._attempt = 0
        self._deletes.append((entry.seq, entry.size))
        if self._observers:
            self._notify(CONFIRMED, entry.message.id)
        if self._batching and self._bus.confirming:
            self._settled_later = True
            return
        self._next_steps()

    def _confirms_settled(self) -> None:
        """
        The bus settled every message a confirm covers: write the deletions
        down and send the next messages, once for all of them.
        """
        if self._settled_later:
            self._settled_later = False
            self._next_steps()

    def _next_steps(self) -> None:
        """
        After a commit or a publish outcome: start the next transaction with
        what is queued, send what the window allows, and finish a stop that
        waited for this.
        """
        self._flush()
        self._pump()
        self._check_stop()

    def _publish_failed(self, failure: TwistedFailure, entry: _Entry, generation: int) -> None:
        if self._inflight.get(entry.seq) is not entry:
            return
        del self._inflight[entry.seq]
        error = _error(failure)
        kind: str | None
        if isinstance(error, MessageReturned):
            kind = RETURNED
            reason = f"returned by the broker ({error.reply_code}): {error.reason}"
        elif isinstance(error, MessageNacked):
            kind = NACKED
            reason = f"refused by the broker: {error.reason}"
        elif isinstance(error, MessageError) or (
            isinstance(error, PublishError) and not isinstance(error, TemporarilyUnavailable)
        ):
            kind = REJECTED
            reason = f"refused by the bus: {error}"
        else:
            kind = None
            reason = f"{type(error).__name__}: {error}"
        if self._closing:
            # The stop gave up waiting and the store is closing or closed:
            # the move to the failed area can not be written any more.  The
            # message stays pending, as the stop's warning said; a transient
            # failure (the bus going away after the outbox) tells nothing new.
            if kind is not None:
                self.log.warn(
                    "The outcome of message {msg_id} ({topic}) for domain {domain} arrived after "
                    "the outbox stopped and is not recorded ({reason}); the message stays in the "
                    "outbox and is published again at the next start",
                    msg_id=escape_control(entry.message.id, 100),
                    topic=escape_control(entry.message.topic),
                    domain=self.domain,
                    reason=escape_control(reason[:_MAX_REASON]),
                )
            return
        if kind == RETURNED:
            self._returned += 1
        elif kind == NACKED:
            self._nacked += 1
        elif kind == REJECTED:
            self._rejected += 1
        if kind is None:
            # Transient: the message stays and is sent again, in order.
            heapq.heappush(self._resend, (entry.seq, entry))
            if not self._paused and self._stop_d is None:
                if generation == self._generation:
                    self._pause(reason, failure)
                else:
                    # Sent before a pause that is over: the sending goes on
                    # and takes this one again, as it would at the pause's end.
                    self._pump()
            self._check_stop()
            return
        # The broker answered, so the connection works.
        self._probing = False
        self._attempt = 0
        reason = reason[:_MAX_REASON]
        self.log.warn(
            "Message {msg_id} ({topic}) for domain {domain} moved to the failed area: {reason}",
            msg_id=escape_control(entry.message.id, 100),
            topic=escape_control(entry.message.topic),
            domain=self.domain,
            reason=escape_control(reason),
        )
        self._failures.append(Failure(entry.seq, kind, reason, self._reactor.seconds()))
        if self._observers:
            self._notify(kind, entry.message.id)
        self._next_steps()

    def _pause(self, reason: str, failure: TwistedFailure | None = None) -> None:
        """
        Stop sending; try again after a backoff delay.
        """
        self._generation += 1
        self._paused = True
        self._probing = False
        delay = self._backoff(self._attempt)
        self._attempt += 1
        if self._attempt == 1:
            # The broker's refusals (a missing exchange, say) are not
            # unexpected: the operator reads the broker's reason.
            if failure is not None and not isinstance(failure.value, (PublishError, ChannelError)):
                self.log.failure(
                    "Publishing to domain {domain} failed unexpectedly; retrying in {delay:.1f}s",
                    failure,
                    domain=self.domain,
                    delay=delay,
                )
            else:
                self.log.warn(
                    "Publishing to domain {domain} paused ({reason}); retrying in {delay:.1f}s",
                    domain=self.domain,
                    reason=escape_control(reason),
                    delay=delay,
                )
        else:
            self.log.debug(
                "Publishing to domain {domain} still paused ({reason}); retrying in {delay:.1f}s",
                domain=self.domain,
                reason=escape_control(reason),
                delay=delay,
            )
        self._retry_call = self._reactor.callLater(delay, self._resume)
        if not self._bus.connected:
            self._resume_on_connect()

    def _resume_on_connect(self) -> None:
        """
        End the pause as soon as the bus connects again (a bus that can say
        when: L{fedhub.amqp.transport.AMQPBus.when_connected}), rather than
        at the end of a backoff delay that grew while the broker was away.
        One wait at a time, however long the outage.
        """
        when_connected = getattr(self._bus, "when_connected", None)
        if when_connected is None or self._connect_wait is not None:
            return

        def connected(_: object) -> None:
            self._connect_wait = None
            call = self._retry_call
            if self._paused and self._stop_d is None and call is not None and call.active():
                call.cancel()
                self._resume()

        def gone(_: TwistedFailure) -> None:
            # The bus stopped: the backoff goes on as before.
            self._connect_wait = None

        d: Deferred[None] = when_connected()
        self._connect_wait = d
        d.addCallbacks(connected, gone)

    def _resume(self) -> None:
        self._retry_call = None
        if self._stop_d is not None:
            return
        self._paused = False
        self._probing = True
        self._probe_sent = False
        self._pump()

    def _backoff(self, attempt: int) -> float:
        """
        The delay before retry number C{attempt} (from 0): doubling from
        C{retry_initial} up to C{retry_max}, the upper half of it jittered.
        """
        base = min(self._retry_max, self._retry_initial * (2.0 ** min(attempt, 32)))
        return base / 2 + self._random.random() * base / 2

    # --- reading back ----------------------------------------------------

    def _maybe_load(self) -> None:
        if not self._backlog or self._loading or not self._opened or self._stop_d is not None:
            return
        if self._paused:
            # Nothing is sent until the pause is over; read then.
            return
        if self._load_call is not None:
            return
        have = len(self._ready) + len(self._resend)
        if have > self._read_batch // 2:
            return
        limit = min(self._read_batch - have, self._load_cap)
        self._loading = True
        d = self.store.load(self._loaded_upto, limit)
        d.addCallbacks(self._loaded, self._load_failed, callbackArgs=(limit,), errbackArgs=(limit,))
        d.addErrback(self._bug, "reading the store")

    def _loaded(self, rows: list[StoredRow], limit: int) -> None:
        self._loading = False
        self._load_attempt = 0
        self._load_problem = None
        ready = self._ready
        for row in rows:
            try:
                message = decode_for_publish(row.data)
            except DecodeError as e:
                self.log.error(
                    "Stored message {seq} of domain {domain} is unreadable ({reason}); moved to "
                    "the failed area",
                    seq=row.seq,
                    domain=self.domain,
                    reason=escape_control(str(e)),
                )
                reason = str(e)[:_MAX_REASON]
                self._failures.append(Failure(row.seq, UNREADABLE, reason, self._reactor.seconds()))
                continue
            ready.append(_Entry(self, row.seq, message, len(row.data), row.created))
        if rows:
            self._loaded_upto = rows[-1].seq
        if len(rows) < limit:
            self._backlog = False
        elif self._load_cap < self._read_batch:
            self._load_cap = min(self._read_batch, 2 * self._load_cap)
        # Once the backlog is read, the oldest waiting message is always in
        # memory.  Before, one on disk may be older than all in memory (once
        # these are confirmed and the next read fails, say): it was handed
        # over no earlier than the last one read.
        self._oldest_hint = rows[-1].created if rows and self._backlog else None
        if self._failures:
            self._flush()
        self._pump()
        self._check_stop()

    def _load_failed(self, failure: TwistedFailure, limit: int) -> None:
        self._loading = False
        error = _error(failure)
        if isinstance(error, StoreError) and not error.locked and limit > 1 and self._stop_d is None:
            # A damaged row fails the whole read: read fewer at once, at
            # once, so that those before it are published; down to the row
            # itself, which is then the problem below.
            self._load_cap = limit // 2
            self._pump()
            return
        delay = self._backoff(self._load_attempt)
        self._load_attempt += 1
        if isinstance(error, StoreError):
            # A damaged page fails every read of it: say so on the status
            # page, and log it once.
            self._load_problem = (
                f"the outbox of domain {self.domain} can not read {error.path}: {error.reason}; "
                f"the messages after sequence number {self._loaded_upto} are not published"
            )
            (self.log.error if self._load_attempt == 1 else self.log.info)(
                "{reason}; trying again in {delay:.1f}s",
                reason=self._load_problem,
                delay=delay,
                domain=self.domain,
            )
        else:
            self.log.failure(
                "Reading the outbox of domain {domain} failed; trying again in {delay:.1f}s",
                failure,
                domain=self.domain,
                delay=delay,
            )
        if self._stop_d is None:
            self._load_call = self._reactor.callLater(delay, self._load_again)
        self._check_stop()

    def _load_again(self) -> None:
        self._load_call = None
        self._pump()

    def _bug(self, failure: TwistedFailure, doing: str) -> None:
        self.log.failure(
            "Bug in the outbox of domain {domain} while {doing}", failure, domain=self.domain, doing=doing
        )
