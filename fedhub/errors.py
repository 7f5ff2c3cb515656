"""
The exception hierarchy of fedhub.

Every error fedhub raises on purpose derives from L{FedhubError}.  Errors carry
the facts that explain them as attributes, so callers and log observers can act
on them without parsing messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class FedhubError(Exception):
    """
    Base class of every error fedhub raises on purpose.
    """


# --- messages -----------------------------------------------------------


class MessageError(FedhubError):
    """
    A message is not valid: it can never be published or handled as it is.
    """


class DecodeError(MessageError):
    """
    Bytes or a serialized record could not be turned into a L{fedhub.message.Message}.

    @ivar reason: A short human-readable reason.
    @ivar line: The 1-based line of a serialized file, when known.
    """

    def __init__(self, reason: str, line: int | None = None) -> None:
        self.reason = reason
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{reason}")


class SchemaValidationError(MessageError):
    """
    A message body does not satisfy the JSON schema registered for its name.

    @ivar schema: The schema name the message claims.
    @ivar reason: What the validator said.
    @ivar path: The JSON path to the offending element of the body.
    """

    def __init__(self, schema: str, reason: str, path: str = "$") -> None:
        self.schema = schema
        self.reason = reason
        self.path = path
        super().__init__(f"body does not match schema {schema!r} at {path}: {reason}")


# --- configuration ------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """
    One problem found in a configuration.

    @ivar path: The key path, for example C{consumers[2].domain}.
    @ivar message: What is wrong with it.
    @ivar line: The 1-based line in the file where the key is, when known.
    """

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path}: {self.message}{where}"


class ConfigError(FedhubError):
    """
    A configuration is not valid; nothing may be started from it.

    @ivar problems: Every problem found, in file order.
    @ivar source: The file the configuration came from, if any.
    @ivar partial: What of the configuration was valid (a
        L{fedhub.config.Config} of the valid domains and components), when
        its C{[hub]} table was; C{None} otherwise.  C{fedhub check-config}
        checks it further, so that every problem is reported at once.
    @ivar defined_domains: The names of every domain the file defines,
        valid or not, with L{partial}.
    """

    partial: Any = None
    defined_domains: frozenset[str] = frozenset()

    def __init__(self, problems: list[ConfigProblem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{head}{len(self.problems)} configuration problem(s):\n{lines}")


class ConfigUnreadable(ConfigError):
    """
    The configuration file could not be read as text at all (missing,
    unreadable, too large, not UTF-8), so nothing of it was checked.
    """


class UnknownPlugin(FedhubError):
    """
    No installed plugin has the requested name.

    @ivar kind: C{"consumer"} or C{"producer"}.
    @ivar name: The name that was asked for.
    @ivar known: The names that are installed.
    @ivar broken: The plugin modules that could not be imported, each as
        C{"<file>: <error>"}: the plugin asked for may be in one of them.
    """

    def __init__(
        self, kind: str, name: str, known: list[str], broken: Sequence[str] = ()
    ) -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        self.broken = list(broken)
        super().__init__(
            f"unknown {kind} plugin {name!r} (installed: {', '.join(self.known) or NO_PLUGINS})"
            + broken_note(self.broken)
        )


def broken_note(broken: Sequence[str]) -> str:
    """
    What an unknown plugin's error adds about plugin modules that could not
    be imported (the plugin may be in one of them); empty when there are
    none.
    """
    if not broken:
        return ""
    return f"; {len(broken)} plugin module(s) could not be imported: " + "; ".join(broken)


#: What an unknown plugin's error says when no plugin at all is found, not
#: even fedhub's own: the usual cause is an editable install.
NO_PLUGINS = (
    "none; not even fedhub's own are found, as after `pip install -e` without "
    "`--config-settings editable_mode=compat`"
)


# --- publishing ---------------------------------------------------------


class PublishError(FedhubError):
    """
    A message could not be handed over or was not accepted by the broker.

    @ivar message_id: The id of the message concerned, when known.
    """

    def __init__(self, reason: str, message_id: str | None = None) -> None:
        self.reason = reason
        self.message_id = message_id
        super().__init__(reason)


class TemporarilyUnavailable(PublishError):
    """
    The message can not be taken now but may be later (outbox full, disk full,
    broker unreachable past the backlog limit).  Producers answer with a
    temporary failure: SMTP C{451}/C{452}, a poller keeps its cursor.
    """


class MessageReturned(PublishError):
    """
    The broker returned a C{mandatory} message: no queue is bound for its topic.

    @ivar reply_code: The AMQP reply code (C{312} NO_ROUTE).
    """

    def __init__(self, reason: str, message_id: str | None = None, reply_code: int = 312) -> None:
        self.reply_code = reply_code
        super().__init__(reason, message_id)


class MessageNacked(PublishError):
    """
    The broker refused responsibility for a message (C{basic.nack}).
    """


class NotConnected(TemporarilyUnavailable):
    """
    The transport has no usable broker connection right now.
    """


class TLSFailed(NotConnected):
    """
    The TLS handshake with the broker failed, before any AMQP: the broker's
    certificate was not accepted (a CA not trusted, a name not matching) or
    the broker refused the client's (missing, or signed by a CA it does not
    trust).  Retrying only helps once a certificate or the configuration is
    fixed.

    @ivar details: What OpenSSL or service-identity said, and for a broker
        certificate that did not verify, why.
    @ivar certificate: Whether a certificate was refused, on either side (as
        opposed to a handshake cut short, which a restarting broker may do).
    """

    def __init__(self, details: str, certificate: bool = False) -> None:
        self.details = details
        self.certificate = certificate
        super().__init__(f"the TLS handshake with the broker failed: {details}")


# --- consumers: verdicts a plugin may raise -----------------------------


class Verdict(FedhubError):
    """
    Base of the exceptions a consumer plugin raises to decide what happens to
    the message it was handling, instead of the default failure policy.

    @ivar reason: Why, for logs and the dead-letter record.
    """

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(reason or type(self).__name__)


class Retry(Verdict):
    """
    Handle the message again later, through the consumer's retry queues; once
    its C{max_retries} are used up, dead-letter it instead.

    The queues wait fixed times: C{retry_delay}, doubling from one retry to
    the next, at most C{max_retry_delay}.  Without C{delay} the message takes
    the next one (the backoff); with it, the first not yet used that waits at
    least C{delay} seconds, else the longest (so the wait is rounded up to a
    queue's, and cut to the longest one's).
    """

    def __init__(self, reason: str = "", delay: float | None = None) -> None:
        self.delay = delay
        super().__init__(reason)


class Drop(Verdict):
    """
    Acknowledge the message without handling it; it is gone.
    """


class DeadLetter(Verdict):
    """
    Move the message to the consumer's dead-letter queue now, with the reason.
    """


class Halt(Verdict):
    """
    Stop this consumer: the message is returned to its queue and the consumer
    consumes nothing more until the hub restarts.  Other consumers go on.
    The consumer's other calls in progress finish first (within its
    C{drain_timeout}), so their messages are settled once.
    """


class NotHandled(Verdict):
    """
    The handler gives the message back without handling it: it goes back to
    its queue at once, no retry counted.  For a handler that drops a call
    the consumer abandoned (see L{fedhub.interfaces.IMessageHandler}'s
    optional C{abandon}) or will not begin one while the consumer stops; a
    message given back over and over is dead-lettered after the consumer's
    C{max_deliveries}.
    """


# --- broker -------------------------------------------------------------


class ChannelError(FedhubError):
    """
    The broker closed a channel or connection with an error reply.

    @ivar reply_code: The AMQP reply code (403, 404, 406, ...).
    @ivar reply_text: The broker's text.
    """

    def __init__(self, reply_code: int, reply_text: str) -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        super().__init__(f"{reply_code} {reply_text}")


class AccessRefused(ChannelError):
    """
    C{403 ACCESS_REFUSED}: the credentials may not do this.
    """


class NotFound(ChannelError):
    """
    C{404 NOT_FOUND}: the exchange or queue does not exist.
    """


class PreconditionFailed(ChannelError):
    """
    C{406 PRECONDITION_FAILED}: for example a queue declared again with other
    arguments, or an acknowledgement timeout.
    """
