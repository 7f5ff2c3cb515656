"""
The C{bridge} consumer: forward messages from its own domain to another one,
the only way a message crosses between security domains.

A bridge consumes in its domain like any consumer and republishes through
the publisher (the outbox) of the domain named C{to_domain}.  Its plugin sets
C{crosses_domains = True}, so the hub hands it the other domains'
publishers; no other plugin gets them.

What is forwarded: only messages whose topic matches one of the C{allow}
patterns (AMQP C{*}/C{#} syntax); the consumer's C{topics} decide what
reaches its queue, C{allow} decides what may leave, so a broad binding can
not widen what crosses.  Everything else is dropped (acknowledged, logged).

The forwarded message keeps its id, topic, body, schema, severity, priority,
send time and headers, with two changes: the loop header
C{fedhub_bridged_from} gets this domain's name appended (a list of the
domains the message left, oldest first), and the broker's dead-lettering
bookkeeping of this domain (C{x-death}, C{x-first-death-*},
C{x-last-death-*}) and a dead-letter reason are removed, since they describe
queues of the domain it left and would count as retries in the other; so are
C{CC} and C{BCC}, with which RabbitMQ routes a message to further topics
(the allow-list checks the topic only).

Loop protection: a message whose C{fedhub_bridged_from} already names the
target domain or this one has been there, and is dropped.  So two bridges
in opposite directions (A to B, B to A) carry each message once.

Verdicts: not allowed or a loop is L{Drop}; a message the target can never
take (L{MessageError}, L{PublishError}) is L{DeadLetter}.  While the
target's publisher says L{TemporarilyUnavailable} (its outbox full, its disk
full), the message is held and handed over again, after 1 s, then doubling
up to 30 s, for at most C{hold} seconds (600 by default): the consumer takes
no more meanwhile (at its concurrency; it is C{long_running}, so unless its
C{prefetch} says otherwise it holds no more unacknowledged either), so the
backlog stays in this domain's queue, where the broker keeps it, instead of
running through the retry queues into the dead-letter queue.  Past C{hold}
(or when the hub stops) it is a L{Retry}.

A held message whose call the consumer abandons (its channel closed: the
broker delivers it again, and the new delivery is forwarded) is handed over
no more: its wait is cancelled and its call fails with L{NotHandled}.  A
hand-over the target has already begun on is left to end; if the target
takes the message, it crosses twice (at least once, as always), and if not,
it is not held again.  The consumer notices a closed channel within a
second (it looks every second while calls are in progress, and whenever a
delivery waits to be handed to the handler).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from fedhub.config import Option, check_topic_pattern
from fedhub.consumers.runner import DEAD_LETTER_REASON_HEADER
from fedhub.errors import (
    ConfigError,
    ConfigProblem,
    DeadLetter,
    Drop,
    MessageError,
    NotHandled,
    PublishError,
    Retry,
    TemporarilyUnavailable,
)
from fedhub.interfaces import IConsumerPlugin, IMessageHandler, IPublisher
from fedhub.logs import HubLogger
from fedhub.message import Message
from fedhub.plugins import PluginContext
from fedhub.text import escape_control
from fedhub.topology import topic_matches

__all__ = ["BridgePlugin", "BridgeHandler", "BRIDGED_FROM_HEADER", "bridged_from"]

#: Seconds a message is held, by default, while the target can not take it.
DEFAULT_HOLD = 600.0

#: The longest wait between two hand-overs of a held message.
HOLD_MAX_DELAY = 30.0

#: The loop header: the domains a message was forwarded from, oldest first.
BRIDGED_FROM_HEADER = "fedhub_bridged_from"

#: Headers about the queues of the domain a message leaves, and RabbitMQ's
#: sender-selected routing headers: published as they are, C{CC} and
#: C{BCC} would route the copy in the target domain to the topics they
#: list as well, past the allow-list.
_LOCAL_HEADERS = ("x-death", DEAD_LETTER_REASON_HEADER, "CC", "BCC")
_LOCAL_PREFIXES = ("x-first-death-", "x-last-death-")


class _Call:
    """
    One call of L{BridgeHandler.handle} that has not ended: what C{abandon}
    and C{stop} need to end its hold.

    @ivar message: The message the call was made with.
    @ivar waiting: The wait before the next hand-over, while there is one.
    @ivar abandoned: Whether the consumer abandoned the call.
    """

    def __init__(self, message: Message) -> None:
        self.message = message
        self.waiting: Deferred[None] | None = None
        self.abandoned = False


def bridged_from(message: Message) -> tuple[str, ...]:
    """
    The domains a message was forwarded from, by its loop header.  A header
    that is a single string counts as one domain; anything not a string is
    ignored.
    """
    value = message.headers.get(BRIDGED_FROM_HEADER)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(item for item in value if isinstance(item, str))
    return ()


@implementer(IMessageHandler)
class BridgeHandler:
    """
    Forwards allowed messages to another domain's publisher.

    @ivar forwarded: How many messages were handed to the target.
    """

    log = HubLogger()

    def __init__(
        self,
        name: str,
        domain: str,
        topics: tuple[str, ...],
        allow: tuple[str, ...],
        to_domain: str,
        target: IPublisher,
        clock: IReactorTime | None = None,
        hold: float = DEFAULT_HOLD,
    ) -> None:
        self.name = name
        self.domain = domain
        self.topics = topics
        self.allow = allow
        self.to_domain = to_domain
        self.target = target
        self.clock = clock
        self.hold = hold if clock is not None else 0.0
        self.forwarded = 0
        # The calls not yet ended, by the identity of their message (which
        # the consumer passes to abandon()).
        self._calls: dict[int, _Call] = {}
        self._stopping = False

    @property
    def long_running(self) -> bool:
        """
        Whether a message may stay in hand for long: up to C{hold} seconds
        while the target can not take it.  The consumer then holds only the
        messages in hand (see L{fedhub.consumers.runner.prefetch_for}), and
        the backlog stays in the queue: waiting in the hub behind held
        messages, each would wait up to C{hold} seconds per message ahead
        of it, unacknowledged, towards the broker's C{consumer_timeout}.
        """
        return self.hold > 0

    def start(self) -> None:
        """
        Take messages again after a stop.
        """
        self._stopping = False

    def drain(self) -> None:
        """
        The consumer is stopping with messages in hand: stop holding them,
        so that they are settled (as L{Retry}s) within its drain timeout.
        """
        self.stop()

    def stop(self) -> None:
        """
        Stop holding messages: those waiting become L{Retry}s at once.
        """
        self._stopping = True
        for call in list(self._calls.values()):
            if call.waiting is not None:
                call.waiting.cancel()

    def abandon(self, message: Message) -> None:
        """
        The consumer forgot the call for C{message}: its channel closed, and
        the broker delivers it again, to be forwarded by that delivery.  If
        the message is held (waiting for its next hand-over), the wait is
        cancelled and the call fails with L{NotHandled}; a hand-over in
        progress is left to end (the target may have taken the message),
        but the message is not held again after it.  Nothing for a message
        whose call has ended or was abandoned already.
        """
        call = self._calls.get(id(message))
        if call is None or call.message is not message or call.abandoned:
            return
        call.abandoned = True
        if call.waiting is not None:
            call.waiting.cancel()

    def forwarded_copy(self, message: Message) -> Message:
        """
        The message as it goes to the target domain: this domain added to its
        loop header, this domain's queue bookkeeping removed.
        """
        headers = {
            name: value
            for name, value in message.headers.items()
            if name not in _LOCAL_HEADERS and not name.startswith(_LOCAL_PREFIXES)
        }
        headers[BRIDGED_FROM_HEADER] = [*bridged_from(message), self.domain]
        return message.evolve(headers=headers, queue=None, redelivered=False)

    def handle(self, message: Message) -> Deferred[None]:
        """
        Forward C{message}, or decide why not.
        """
        passed = bridged_from(message)
        if self.to_domain in passed or self.domain in passed:
            raise Drop(
                f"loop: already passed {', '.join(escape_control(d) for d in passed)}; "
                f"not forwarding from {self.domain} to {self.to_domain} again"
            )
        if not any(topic_matches(pattern, message.topic) for pattern in self.allow):
            raise Drop(f"topic {escape_control(message.topic)} is not allowed to {self.to_domain}")
        try:
            copy = self.forwarded_copy(message)
        except MessageError as e:
            raise DeadLetter(f"can not forward to {self.to_domain}: {e}") from None
        call = _Call(message)
        key = id(message)
        self._calls[key] = call

        def ended(result: object) -> object:
            # Only this call's own entry: the same message object may be
            # handed over by a later call too.
            if self._calls.get(key) is call:
                del self._calls[key]
            return result

        d = self._hand_over(
            copy, call, self.clock.seconds() + self.hold if self.clock else 0.0, 1.0
        )
        d.addBoth(ended)
        d.addCallbacks(self._sent, self._refused, callbackArgs=(message,), errbackArgs=(message,))
        return d

    def _hand_over(self, copy: Message, call: _Call, until: float, delay: float) -> Deferred[None]:
        """
        Hand C{copy} to the target; while it can not take it now, try again
        after C{delay} (doubling up to L{HOLD_MAX_DELAY}) until C{until},
        unless the call is abandoned or the consumer stops.
        """
        d = self.target.publish(copy)
        if self.clock is None or self.hold <= 0:
            return d
        d.addErrback(self._again, copy, call, until, delay)
        return d

    def _again(
        self, failure: Failure, copy: Message, call: _Call, until: float, delay: float
    ) -> Any:
        clock = self.clock
        assert clock is not None
        if not failure.check(TemporarilyUnavailable):  # type: ignore[no-untyped-call]
            return failure
        if call.abandoned:
            # Its new delivery is forwarded: held again, this one would
            # cross too.
            raise NotHandled("abandoned while held for the target")
        if self._stopping or clock.seconds() + delay > until:
            return failure
        waiting: Deferred[None] = deferLater(clock, delay, lambda: None)
        call.waiting = waiting

        def waited(result: object) -> object:
            call.waiting = None
            return result

        def stopped(cancelled: Failure) -> Failure:
            cancelled.trap(CancelledError)  # type: ignore[no-untyped-call]
            if call.abandoned:
                return Failure(NotHandled("abandoned while held for the target"))
            # The hub stops: the message is a Retry, as past the hold.
            return failure

        def go(_: object) -> Deferred[None]:
            return self._hand_over(copy, call, until, min(delay * 2, HOLD_MAX_DELAY))

        waiting.addBoth(waited)
        waiting.addErrback(stopped)
        waiting.addCallback(go)
        return waiting

    def _sent(self, _: object, message: Message) -> None:
        self.forwarded += 1
        self.log.info(
            "Consumer {consumer} forwarded {msg_id} ({topic}) from {domain} to {to_domain}",
            consumer=self.name,
            msg_id=message.id,
            topic=message.topic,
            domain=self.domain,
            to_domain=self.to_domain,
        )

    def _refused(self, failure: Failure, message: Message) -> Any:
        error = failure.value
        if isinstance(error, TemporarilyUnavailable):
            raise Retry(f"{self.to_domain} can not take it now: {error}")
        if isinstance(error, (MessageError, PublishError)):
            raise DeadLetter(f"{self.to_domain} refused it: {error}")
        return failure


def _check_allow(value: list[str]) -> str | None:
    if not value:
        return "needs at least one topic pattern"
    problems = [
        f"[{index}]: {problem}"
        for index, problem in enumerate(check_topic_pattern(pattern) for pattern in value)
        if problem is not None
    ]
    return "; ".join(problems) or None


def _check_hold(value: float) -> str | None:
    return None if 0 <= value <= 3600 else "must be from 0 to 3600 seconds"


def _check_domain(value: str) -> str | None:
    return None if value else "can not be empty"


@implementer(IPlugin, IConsumerPlugin)
class BridgePlugin:
    """
    The plugin that builds L{BridgeHandler}s.  It crosses domains: the hub
    gives it the publishers of the other domains.
    """

    name = "bridge"
    description = "Forward messages whose topics are allowed to another domain, once."
    crosses_domains = True
    options: Mapping[str, Option] = {
        "to_domain": Option(str, help="the domain messages are forwarded to", check=_check_domain),
        "allow": Option(list, help="topic patterns that may be forwarded", check=_check_allow,
                        items=str),
        "hold": Option(float, DEFAULT_HOLD,
                       "seconds a message waits for the target domain to take it (0: retry at once)",
                       check=_check_hold),
    }

    def build(self, context: PluginContext) -> BridgeHandler:
        """
        Build a handler bound to the target domain's publisher.

        @raise ConfigError: when C{to_domain} is this domain or no known
            domain.
        """
        to_domain = str(context.options["to_domain"])
        where = f"{context.component.path}.to_domain" if context.component else "to_domain"
        if to_domain == context.domain:
            raise ConfigError(
                [ConfigProblem(where, f"{to_domain!r} is the bridge's own domain")]
            )
        target = context.peer_publishers.get(to_domain)
        if target is None:
            known = ", ".join(sorted(context.peer_publishers)) or "none"
            raise ConfigError(
                [ConfigProblem(where, f"unknown domain {to_domain!r} (other domains: {known})")]
            )
        topics = tuple(context.options["allow"])
        if context.component is not None and context.component.topics:
            topics = tuple(context.component.topics)
        return BridgeHandler(
            context.name, context.domain, topics, tuple(context.options["allow"]), to_domain, target,
            clock=context.reactor, hold=float(context.options.get("hold", DEFAULT_HOLD)),
        )
