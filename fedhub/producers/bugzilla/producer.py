"""
From Bugzilla notification mail to fedhub messages.

The pieces, each usable on its own:

  - L{build_body} and L{build_message} turn a parsed L{BugEvent} into a
    L{Message} on C{<prefix>.<env>.bugzilla.bug.new} or C{.bug.update}, with
    the body schema L{MAIL_SCHEMA} (shipped as C{mail_schema.json} and
    registered in L{fedhub.schema.registry} when this module is imported),
    the human summary in the C{fedhub_summary} header and
    C{fedora_messaging_user_*}/C{..._rpm_*} headers;
  - L{event_fingerprint}: Bugzilla sends one mail per recipient for one
    change, with different C{To}, C{Message-ID} and reason headers; the
    fingerprint hashes the message body, which leaves those out, so every
    copy has the same one.  The message id is derived from it too, so copies
    that slip through (after a restart, through C{fedhub inject-mail}) carry
    the same C{message_id} and consumers can drop them;
  - L{Deduplicator}: a bounded, time-windowed set of fingerprints;
  - L{Quarantine}: a bounded directory for mail that is never acceptable;
  - L{EventPublisher}: the callback that builds a message (optionally
    enriched: see L{fedhub.producers.bugzilla.enrich}, which turns it into a
    C{bugzilla2fedmsg.messageV1} body from Bugzilla's web service) and hands
    it to an L{IPublisher};
  - L{BugmailIntake}: parse, de-duplicate, hand over; what the SMTP listener
    and C{fedhub inject-mail} feed raw mail to;
  - L{classify_failure}: what a failed hand-over means for the sender
    (retry later, or never);
  - L{BugzillaSMTPPlugin}: the C{bugzilla-smtp} producer plugin.

Nothing here imports C{twisted.mail}: the SMTP server lives in
L{fedhub.producers.bugzilla.smtp}, which the plugin imports when it builds
the listener.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, Protocol, cast

from twisted.application.service import IService
from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from fedhub.config import Option, server_endpoint_problem
from fedhub.errors import (
    ConfigError,
    ConfigProblem,
    FedhubError,
    MessageError,
    PublishError,
    TemporarilyUnavailable,
)
from fedhub.files import fsync_directory, replace_durably
from fedhub.interfaces import IProducerPlugin, IPublisher
from fedhub.logs import HubLogger
from fedhub.message import Message, uuid_text
from fedhub.plugins import PluginContext
from fedhub.producers.bugzilla.enrich import Enriched, enrich_options, enricher_from_options
from fedhub.producers.bugzilla.fingerprint import (
    RECIPIENT_HEADERS,
    RECIPIENT_KEYS,
    body_of,
    fingerprint_of,
)
from fedhub.producers.bugzilla.parser import (
    INTERNAL_ERROR,
    BugEvent,
    BugmailError,
    parse_bugmail,
)
from fedhub.producers.poller import thread_runner
from fedhub.schema import SchemaRegistry, registry
from fedhub.text import SUMMARY_HEADER, escape_control

__all__ = [
    "MAIL_SCHEMA",
    "RECIPIENT_HEADERS",
    "RECIPIENT_KEYS",
    "TOPIC_NEW",
    "TOPIC_UPDATE",
    "Accepted",
    "BugmailIntake",
    "BugzillaSMTPPlugin",
    "Deduplicator",
    "Enricher",
    "Enriched",
    "EventCallback",
    "EventPublisher",
    "IBugmailIntake",
    "Quarantine",
    "Refusal",
    "SeenSet",
    "build_body",
    "build_message",
    "classify_failure",
    "event_fingerprint",
    "event_publisher_from_options",
    "load_mail_schema",
    "message_id_for",
    "seed_fingerprint",
]

#: The schema name of message bodies built from bugmail.
MAIL_SCHEMA = "fedhub.bugzilla.mail.v1"

#: Topic suffix of a newly filed bug.
TOPIC_NEW = "bugzilla.bug.new"
#: Topic suffix of every other bug event.
TOPIC_UPDATE = "bugzilla.bug.update"

#: Products whose components are package names: their messages get a
#: C{fedora_messaging_rpm_<component>} header.
DEFAULT_PACKAGE_PRODUCTS = ("Fedora", "Fedora EPEL")

#: The longest summary put in the C{fedhub_summary} header.
SUMMARY_LIMIT = 300

# Message ids derived from fingerprints live in this UUID namespace.
_ID_NAMESPACE = uuid.UUID("6f1c3b2e-5d0a-4e7b-9a41-2c8f0d3e7b15")
_ID_NAMESPACE_BYTES = _ID_NAMESPACE.bytes

# Logins and package names that may become part of a header name.
_LOGIN = re.compile(r"[a-z0-9._%+@-]{1,200}")
_PACKAGE = re.compile(r"[A-Za-z0-9._+-]{1,200}")

# A TemporarilyUnavailable whose reason says this is about storage.
_STORAGE_REASON = re.compile(r"\b(full|disk|no space|storage|quota)\b", re.IGNORECASE)

#: What an embedding application passes to get each event: it receives the
#: parsed event and the raw mail and returns a Deferred that fires once the
#: event is safely handed on (its result, a L{Message} or a message id string,
#: is only used for logging), or fails with L{TemporarilyUnavailable} (the
#: sender retries) or another exception.
EventCallback = Callable[[BugEvent, bytes], "Deferred[Any]"]



#: An optional look-up of more data about a bug (e.g. from Bugzilla's
#: REST or XML-RPC API).  A dictionary lands in the mail-derived body's
#: C{enrichment} key; an L{Enriched} replaces the body and its schema;
#: C{None} or a failure publishes the mail-derived message.
Enricher = Callable[[BugEvent], "Deferred[dict[str, Any] | Enriched | None]"]


# --- the schema -------------------------------------------------------------


def load_mail_schema() -> dict[str, Any]:
    """
    The JSON schema of L{MAIL_SCHEMA}, read from the package's
    C{mail_schema.json}.
    """
    text = resources.files(__package__).joinpath("mail_schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _inline_definitions(schema: Mapping[str, Any]) -> dict[str, Any]:
    """
    A copy of a draft-07 schema with every C{{"$ref": "#/definitions/X"}}
    replaced by the definition it names.

    The constraints are the same (in draft 7, keywords beside C{$ref} are
    ignored), but C{jsonschema} checks a body against it in about 60 % of
    the time, as it no longer resolves a reference on every use; checking
    is the largest single cost of a mail's hand-over.  References to
    anything else, and definitions nested deeper than 16 levels (a
    recursive schema), are left as they are; the C{definitions} stay, so
    those still resolve.
    """
    definitions = schema.get("definitions")
    if not isinstance(definitions, Mapping):
        definitions = {}
    prefix = "#/definitions/"

    def inline(node: Any, depth: int) -> Any:
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(prefix) and depth < 16:
                name = ref[len(prefix):]
                if "/" not in name and "~" not in name and name in definitions:
                    return inline(definitions[name], depth + 1)
            return {key: inline(value, depth) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value, depth) for value in node]
        return node

    return {
        key: value if key == "definitions" else inline(value, 0)
        for key, value in schema.items()
    }


def register_mail_schema(target: SchemaRegistry = registry) -> None:
    """
    Register L{MAIL_SCHEMA} (done for the process-wide registry on import),
    with its definitions inlined (see L{_inline_definitions}).
    """
    target.register(MAIL_SCHEMA, _inline_definitions(load_mail_schema()))


register_mail_schema()


# --- events to messages -----------------------------------------------------


def build_body(event: BugEvent) -> dict[str, Any]:
    """
    The message body for an event: L{BugEvent.to_json} without the parts
    that differ per recipient (L{RECIPIENT_KEYS}, L{RECIPIENT_HEADERS}).
    """
    return dict(_body_and_fingerprint(event)[0])


def _body_and_fingerprint(event: BugEvent) -> tuple[dict[str, Any], str]:
    """
    The event's body (not to be changed) and its fingerprint, computed once
    per event: the intake needs the fingerprint to de-duplicate, the message
    both.  They are kept in the event's own C{__dict__} (a frozen dataclass
    compares and hashes its fields only), so they go with the event.
    """
    cached = event.__dict__.get("_fedhub_body")
    if cached is not None:
        return cast(tuple[dict[str, Any], str], cached)
    body = body_of(event.to_json())
    fingerprint = fingerprint_of(body)
    event.__dict__["_fedhub_body"] = (body, fingerprint)
    return body, fingerprint


def seed_fingerprint(
    event: BugEvent, fingerprint: str, data: Mapping[str, Any] | None = None
) -> None:
    """
    Give C{event} a fingerprint computed elsewhere (by a parse worker, see
    L{fedhub.producers.bugzilla.workers}), so L{event_fingerprint} and
    L{build_message} do not compute it again: the body is made from the
    event (or from C{data}, its L{BugEvent.to_json}, when the caller has
    it) but not encoded nor hashed.

    @param fingerprint: What L{event_fingerprint} would return for C{event};
        the caller vouches for it.
    @param data: C{event.to_json()}, or something equal to it; the body
        shares its lists and objects, so it must not be changed afterwards.
    """
    body = body_of(event.to_json() if data is None else data)
    event.__dict__["_fedhub_body"] = (body, fingerprint)


def event_fingerprint(event: BugEvent) -> str:
    """
    A hex SHA-256 of the event's message body: the same for every copy of
    one event Bugzilla mails to different recipients, different for events
    that differ in anything else (the change time included, so setting and
    clearing the same flag twice are separate events).
    """
    return _body_and_fingerprint(event)[1]


def message_id_for(fingerprint: str) -> str:
    """
    The message id of the event with this fingerprint: a name-based UUID,
    so every copy of one event is published with the same id.
    """
    # uuid.uuid5(_ID_NAMESPACE, fingerprint), without the UUID object.
    return uuid_text(hashlib.sha1(_ID_NAMESPACE_BYTES + fingerprint.encode("utf-8")).digest(), 5)


def _headers(event: BugEvent, package_products: tuple[str, ...]) -> dict[str, Any]:
    headers: dict[str, Any] = {
        SUMMARY_HEADER: escape_control(event.summary_line(), SUMMARY_LIMIT),
    }
    for login in (event.who, event.assignee):
        if login and _LOGIN.fullmatch(login.lower()):
            headers[f"fedora_messaging_user_{login.lower()}"] = True
    if event.product in package_products and _PACKAGE.fullmatch(event.component):
        headers[f"fedora_messaging_rpm_{event.component}"] = True
    return headers


def build_message(
    event: BugEvent,
    topic: Callable[[str], str],
    *,
    enrichment: Mapping[str, Any] | None = None,
    package_products: tuple[str, ...] = DEFAULT_PACKAGE_PRODUCTS,
    body: Mapping[str, Any] | None = None,
    schema: str = MAIL_SCHEMA,
) -> Message:
    """
    The message for an event.

    @param topic: Turns a suffix (L{TOPIC_NEW}, L{TOPIC_UPDATE}) into a full
        topic, e.g. L{fedhub.config.HubSettings.topic}.
    @param enrichment: Put in the body's C{enrichment} key when given.
    @param package_products: Products whose components are package names.
    @param body: A body to publish instead of the mail-derived one (an
        L{Enriched} body), with its C{schema}; the id stays the mail's.
    @raise MessageError: when the message is not valid (e.g. too long a topic).
    """
    mail_body, fingerprint = _body_and_fingerprint(event)
    message_id = message_id_for(fingerprint)
    if body is None:
        body = mail_body
        schema = MAIL_SCHEMA
        if enrichment is not None:
            body = {**mail_body, "enrichment": dict(enrichment)}
    suffix = TOPIC_NEW if event.event_type == "new" else TOPIC_UPDATE
    return Message.create(
        topic(suffix),
        body,
        headers=_headers(event, package_products),
        schema=schema,
        id=message_id,
    )


class EventPublisher:
    """
    The L{EventCallback} that publishes: it builds the message for an event
    (enriched when an L{Enricher} is given), checks it against its schema and
    hands it to a publisher.  It fires with the published L{Message}.
    """

    log = HubLogger()

    def __init__(
        self,
        publisher: IPublisher,
        topic: Callable[[str], str],
        *,
        enrich: Enricher | None = None,
        producer: str = "bugzilla-smtp",
        package_products: tuple[str, ...] = DEFAULT_PACKAGE_PRODUCTS,
        schemas: SchemaRegistry = registry,
    ) -> None:
        self.publisher = publisher
        self.topic = topic
        self.enrich = enrich
        self.producer = producer
        self.package_products = package_products
        self.schemas = schemas

    def __call__(self, event: BugEvent, raw: bytes) -> Deferred[Message]:
        if self.enrich is None:
            # Without enrichment nothing waits before the hand-over.
            try:
                message = self._build(None, event)
            except Exception:
                return fail(Failure())  # type: ignore[no-untyped-call]
            return self._publish(message)
        d: Deferred[Any] = self._enrichment(event)
        d.addCallback(self._build, event)
        d.addCallback(self._publish)
        return d

    def _enrichment(self, event: BugEvent) -> Deferred[dict[str, Any] | Enriched | None]:
        enrich = self.enrich
        if enrich is None:
            return succeed(None)

        def checked(result: object) -> dict[str, Any] | Enriched | None:
            if result is None or isinstance(result, (dict, Enriched)):
                return result
            self.log.warn(
                "The enricher returned a {kind} for bug {bug_id}, not a dict; publishing without it",
                kind=type(result).__name__,
                bug_id=event.bug_id,
                producer=self.producer,
            )
            return None

        def failed(failure: Failure) -> None:
            self.log.failure(
                "Enriching bug {bug_id} failed; publishing without enrichment",
                failure,
                bug_id=event.bug_id,
                producer=self.producer,
            )
            return None

        d: Deferred[Any] = maybeDeferred(enrich, event)
        result: Deferred[dict[str, Any] | Enriched | None] = d.addCallbacks(checked, failed)
        return result

    def _build(self, enrichment: dict[str, Any] | Enriched | None, event: BugEvent) -> Message:
        if isinstance(enrichment, Enriched):
            try:
                message = build_message(event, self.topic, package_products=self.package_products,
                                        body=enrichment.body, schema=enrichment.schema)
                self.schemas.validate(message)
                return message
            except MessageError as e:
                self.log.error(
                    "The enriched message for bug {bug_id} is not valid ({error}); publishing "
                    "the mail-derived message",
                    bug_id=event.bug_id, error=escape_control(str(e), 300),
                    producer=self.producer)
            enrichment = None
        message = build_message(
            event, self.topic, enrichment=enrichment, package_products=self.package_products
        )
        self.schemas.validate(message)
        return message

    def _publish(self, message: Message) -> Deferred[Message]:
        d = self.publisher.publish(message)

        def published(_: object) -> Message:
            # The SMTP listener logs each mail it takes, with the message id.
            self.log.debug(
                "Published {topic} {msg_id}",
                topic=message.topic,
                msg_id=message.id,
                producer=self.producer,
                domain=self.publisher.domain,
            )
            return message

        done: Deferred[Message] = d.addCallback(published)
        return done


# --- de-duplication -----------------------------------------------------------


class SeenSet(Protocol):
    """
    What L{BugmailIntake} remembers handed-over events in.
    """

    def seen(self, key: str) -> bool:
        """
        Whether C{key} was added recently.
        """

    def add(self, key: str) -> None:
        """
        Remember C{key}.
        """


class Deduplicator:
    """
    A set of keys remembered for C{window} seconds, holding at most
    C{max_entries} (the oldest go first when it is full).
    """

    def __init__(self, window: float, max_entries: int, clock: IReactorTime) -> None:
        if window < 0:
            raise ValueError(f"window must not be negative, not {window!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries!r}")
        self.window = window
        self.max_entries = max_entries
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._seen)

    def _expire(self) -> None:
        horizon = self.clock.seconds() - self.window
        seen = self._seen
        while seen:
            key, when = next(iter(seen.items()))
            if when > horizon:
                break
            del seen[key]

    def seen(self, key: str) -> bool:
        """
        Whether C{key} was added less than C{window} seconds ago.
        """
        self._expire()
        return key in self._seen

    def add(self, key: str) -> None:
        """
        Remember C{key} from now on.
        """
        self._expire()
        if key in self._seen:
            del self._seen[key]
        self._seen[key] = self.clock.seconds()
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)


# --- quarantine ---------------------------------------------------------------


class Quarantine:
    """
    A directory that keeps mail which can never be published, for a human
    to look at: each mail as C{<time>-<id>.eml} with a C{.json} note saying
    why.  It holds at most C{max_files} mails and C{max_bytes} bytes of mail;
    beyond that L{save} refuses.

    The directory is created (mode 0700) and counted on first use, not in
    the constructor, and counted again whenever a mail would pass a limit:
    mail removed from it makes room without a restart, at the cost of one
    directory listing per mail refused as long as it stays full.

    Its disk work blocks: L{keep} runs it through C{run_in_thread} (by
    default in C{clock}'s thread pool, or at once when C{clock} has no
    threads, as a L{twisted.internet.task.Clock} in a test), one mail at a
    time.
    """

    log = HubLogger()

    def __init__(
        self,
        directory: str,
        max_files: int,
        max_bytes: int,
        clock: IReactorTime,
        *,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.directory = directory
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.clock = clock
        self._thread = run_in_thread if run_in_thread is not None else thread_runner(clock)
        # One mail at a time: the counts are only ever touched by one thread.
        self._lock = DeferredLock()
        self._count: int | None = None
        self._bytes = 0

    def _scan(self) -> None:
        created = not os.path.isdir(self.directory)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if created:
            fsync_directory(os.path.dirname(os.path.abspath(self.directory)))
        count = size = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(".eml") and entry.is_file(follow_symlinks=False):
                    count += 1
                    size += entry.stat(follow_symlinks=False).st_size
        self._count, self._bytes = count, size

    def _full(self, size: int) -> bool:
        count = self._count or 0
        return count + 1 > self.max_files or self._bytes + size > self.max_bytes

    def keep(self, raw: bytes, reason: str, code: str, source: str) -> Deferred[str | None]:
        """
        Keep one mail: L{save} through C{run_in_thread}, after any other
        mail's.

        @return: a Deferred firing with the path it was saved under once it
            is on disk, or with C{None} when the quarantine is full; failing
            with the L{OSError} when it could not be written.
        """
        now = self.clock.seconds()
        return self._lock.run(self._thread, self.save, raw, reason, code, source, now)

    def save(
        self, raw: bytes, reason: str, code: str, source: str, received_at: float | None = None
    ) -> str | None:
        """
        Keep one mail and its note, each written to a temporary name,
        synced, and renamed into place, then the directory synced: once it
        returns a path, the mail survives a crash.  It blocks; L{keep} runs
        it in a thread.

        @param received_at: When the mail came, for the note and the file
            name; by default C{clock}'s time now.
        @return: the path it was saved under, or C{None} when the quarantine
            is full.
        @raise OSError: when it could not be written; nothing of it is left
            then.
        """
        size = len(raw)
        if self._count is None or self._full(size):
            self._scan()
        if self._full(size):
            return None
        now = self.clock.seconds() if received_at is None else received_at
        stem = f"{int(now * 1000):015d}-{uuid.uuid4().hex}"
        path = os.path.join(self.directory, stem + ".eml")
        note = {"reason": reason, "code": code, "source": source, "received_at": now}
        written: list[str] = []
        try:
            for target, data in (
                (os.path.join(self.directory, stem + ".json"), json.dumps(note).encode("utf-8")),
                (path, raw),
            ):
                replace_durably(target, data, ".part", private=True)
                written.append(target)
            fsync_directory(self.directory)
        except BaseException:
            for target in written:
                try:
                    os.unlink(target)
                except OSError:
                    pass
            raise
        self._count = (self._count or 0) + 1
        self._bytes += size
        return path


# --- outcomes -------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """
    A mail was taken: the sender may forget it.

    @ivar outcome: C{"published"}; C{"duplicate"} (a copy of an event already
        handed over); or C{"quarantined"} (never acceptable, kept for a human).
    @ivar event: The parsed event, C{None} when quarantined unparsed.
    @ivar fingerprint: The event's L{event_fingerprint}, when parsed.
    @ivar message_id: The id of the published message, when known.
    @ivar detail: A short text for logs (the quarantine path, the reason).
    """

    outcome: Literal["published", "duplicate", "quarantined"]
    event: BugEvent | None = None
    fingerprint: str | None = None
    message_id: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Refusal:
    """
    What a failed hand-over means for the sender of the mail.

    @ivar temporary: C{True}: try again later (SMTP 4xx, exit status 75).
        C{False}: never send this again (SMTP 5xx, exit status 65).
    @ivar kind: C{"storage"} (temporary: the outbox or disk is full),
        C{"unavailable"} (temporary: anything else that may pass),
        C{"content"} (permanent: not bugmail, malformed, an invalid message),
        C{"rejected"} (permanent: the publisher will never take it), or
        C{"internal"} (temporary: an unexpected error, logged).
    @ivar reason: A human reason, one line, safe to show to the sender.
    """

    temporary: bool
    kind: Literal["storage", "unavailable", "content", "rejected", "internal"]
    reason: str


def _is_storage_shortage(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "disk_full", False) or getattr(current, "insufficient_storage", False):
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    reason = getattr(error, "reason", None)
    return isinstance(reason, str) and _STORAGE_REASON.search(reason) is not None


def classify_failure(error: BaseException) -> Refusal:
    """
    Decide what a failed hand-over of a mail means for its sender.

    L{TemporarilyUnavailable} is temporary (storage when it, its cause, or
    its reason says the outbox or disk is full); mail that is not bugmail,
    malformed mail and invalid messages are permanent, except a mail the
    parser failed on unexpectedly (C{internal_error}: a bug); other
    L{PublishError}s are permanent (the publisher says it never will take
    the message); anything else is an unexpected error and temporary, so no
    mail is lost to a bug.
    """
    if isinstance(error, TemporarilyUnavailable):
        kind: Literal["storage", "unavailable"] = (
            "storage" if _is_storage_shortage(error) else "unavailable"
        )
        return Refusal(True, kind, escape_control(error.reason or "try again later", 200))
    if isinstance(error, BugmailError):
        if error.code == INTERNAL_ERROR:
            # The parser failed, not the mail: kept by its sender, which
            # tries again (a fixed hub takes it), never bounced.
            return Refusal(True, "internal", "local error in processing")
        return Refusal(False, "content", escape_control(error.reason, 200))
    if isinstance(error, MessageError):
        return Refusal(False, "content", escape_control(str(error), 200))
    if isinstance(error, PublishError):
        return Refusal(False, "rejected", escape_control(error.reason, 200))
    return Refusal(True, "internal", "local error in processing")


# --- the intake -------------------------------------------------------------------


class IBugmailIntake(Interface):
    """
    Where a mail receiver (the SMTP listener, C{fedhub inject-mail}) hands
    each complete raw mail.
    """

    producer = Attribute("str: the producer name, for logs")

    def receive(raw, source):  # type: ignore[no-untyped-def]
        """
        Take one mail.

        @param raw: The mail, headers and body, as received.
        @param source: Where it came from (a peer address), for logs.
        @return: a Deferred firing with an L{Accepted} once the mail may be
            forgotten, or failing with the reason it was not taken; see
            L{classify_failure}.
        """


@implementer(IBugmailIntake)
class BugmailIntake:
    """
    Parse a mail, drop copies of events already handed over, and hand the
    event to a callback; keep never-acceptable mail in a L{Quarantine} when
    one is given.

    An event counts as handed over only once the callback's Deferred fired.
    A copy arriving while the first is being handed over waits for it: it is
    a duplicate when that succeeds, and fails with the same failure
    otherwise (the sender retries both).

    @ivar on_event: The L{EventCallback}.
    @ivar dedup: Where handed-over fingerprints are remembered: a
        L{Deduplicator} built from C{dedup_window} and C{dedup_max_entries}
        unless another L{SeenSet} is given (C{fedhub inject-mail} passes one
        kept in a file, as each of its runs is a new process).
    """

    log = HubLogger()

    def __init__(
        self,
        on_event: EventCallback,
        *,
        clock: IReactorTime,
        dedup_window: float = 3600.0,
        dedup_max_entries: int = 10_000,
        quarantine: Quarantine | None = None,
        producer: str = "bugzilla-smtp",
        parse: Callable[[bytes], BugEvent | Deferred[BugEvent]] = parse_bugmail,
        dedup: SeenSet | None = None,
    ) -> None:
        self.on_event = on_event
        self.dedup: SeenSet = (
            dedup if dedup is not None else Deduplicator(dedup_window, dedup_max_entries, clock)
        )
        self.quarantine = quarantine
        self.producer = producer
        self._parse = parse
        self._in_flight: dict[str, list[Deferred[Accepted]]] = {}

    def receive(self, raw: bytes, source: str = "") -> Deferred[Accepted]:
        """
        Take one mail; see L{IBugmailIntake.receive}.
        """
        try:
            parsed = self._parse(raw)
        except BugmailError as e:
            return self._never(raw, e, source)
        except Exception:
            return fail(Failure())  # type: ignore[no-untyped-call]
        if isinstance(parsed, Deferred):
            # Parsed elsewhere (a parse worker): the same paths, later.
            d: Deferred[Accepted] = parsed.addCallbacks(
                self._parsed, self._parse_failed, callbackArgs=(raw, source), errbackArgs=(raw, source)
            )
            return d
        return self._parsed(parsed, raw, source)

    def _parse_failed(self, failure: Failure, raw: bytes, source: str) -> Deferred[Accepted] | Failure:
        error = failure.value
        if isinstance(error, BugmailError):
            return self._never(raw, error, source)
        return failure

    def _parsed(self, event: BugEvent, raw: bytes, source: str) -> Deferred[Accepted]:
        key = event_fingerprint(event)
        if self.dedup.seen(key):
            self.log.info(
                "Bug {bug_id}: a copy of an event already handed over, from {peer}",
                bug_id=event.bug_id,
                peer=escape_control(source),
                producer=self.producer,
                msg_id=message_id_for(key),
            )
            return succeed(Accepted("duplicate", event, key, message_id_for(key), "already handed over"))
        waiting = self._in_flight.get(key)
        if waiting is not None:
            copy: Deferred[Accepted] = Deferred()
            waiting.append(copy)
            return copy
        self._in_flight[key] = []
        d: Deferred[Any] = maybeDeferred(self.on_event, event, raw)
        return d.addBoth(self._handed_over, event, key, raw, source)

    def _handed_over(
        self, result: object, event: BugEvent, key: str, raw: bytes, source: str
    ) -> Accepted | Failure | Deferred[Accepted]:
        waiting = self._in_flight.pop(key, [])
        if isinstance(result, Failure):
            for copy in waiting:
                copy.errback(result)
            error = result.value
            if isinstance(error, MessageError) and not isinstance(error, PublishError):
                return self._never(raw, error, source)
            return result
        self.dedup.add(key)
        if isinstance(result, Message):
            message_id: str | None = result.id
        elif isinstance(result, str):
            message_id = result
        else:
            message_id = None
        accepted = Accepted("published", event, key, message_id)
        for copy in waiting:
            copy.callback(Accepted("duplicate", event, key, message_id, "handed over meanwhile"))
        return accepted

    def _never(self, raw: bytes, error: FedhubError, source: str) -> Deferred[Accepted]:
        """
        A mail that can never be published: quarantine it, or fail with
        C{error}.
        """
        reason = escape_control(getattr(error, "reason", None) or str(error), 200)
        code = getattr(error, "code", None) or type(error).__name__
        quarantine = self.quarantine
        if quarantine is None:
            return fail(error)
        peer = escape_control(source)

        def kept(path: str | None) -> Accepted | Failure:
            if path is None:
                self.log.warn(
                    "The quarantine {directory} is full; refusing a mail from {peer}: {reason}",
                    directory=quarantine.directory,
                    peer=peer,
                    reason=reason,
                    producer=self.producer,
                )
                return Failure(error)
            self.log.warn(
                "Quarantined a mail from {peer} as {path}: {reason}",
                peer=peer,
                path=path,
                reason=reason,
                producer=self.producer,
            )
            return Accepted("quarantined", None, None, None, path)

        def not_kept(failure: Failure) -> Failure:
            self.log.failure(
                "Could not quarantine a refused mail from {peer}",
                failure,
                peer=peer,
                producer=self.producer,
            )
            # Our disk failed, not the mail: the sender keeps it and tries
            # again (452 when the disk is full, as for the outbox).
            unavailable = TemporarilyUnavailable(
                f"the quarantine can not take the mail now: {failure.getErrorMessage()}"
            )
            unavailable.__cause__ = failure.value
            return Failure(unavailable)

        d: Deferred[Accepted] = quarantine.keep(raw, reason, str(code), source).addCallbacks(
            kept, not_kept
        )
        return d


# --- the plugin ---------------------------------------------------------------------


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


#: Mails of at most this many bytes are parsed in the hub process even with
#: parse workers: the parser's worst case is about half a second of CPU per
#: MiB, so such a mail holds the reactor for a few tens of milliseconds at
#: most, and typical bugmail (a few KiB, well under a millisecond) is
#: cheaper to parse than to pass to a worker and back.
DEFAULT_INLINE_MAX = 64 * 1024


def _parse_workers(value: int) -> str | None:
    return None if 0 <= value <= 64 else "must be between 0 and 64 (0: parse in the hub process)"


def _line_length(value: int) -> str | None:
    return None if 100 <= value <= 1_000_000 else "must be between 100 and 1000000"


def _recipients(value: list[str]) -> str | None:
    if not value:
        return "must name at least one address"
    for address in value:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in address):
            return f"{escape_control(address)!r} is not an address of the form local@domain"
    return None


def _networks(value: list[str]) -> str | None:
    for network in value:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            return f"{escape_control(network)!r} is not an IP network such as 192.0.2.0/24"
    return None


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _header_name(value: str) -> str | None:
    if re.fullmatch(r"[!-9;-~]{1,64}", value) is None:
        return "must be a mail header name (printable ASCII without a colon)"
    return None


def event_publisher_from_options(
    publisher: IPublisher,
    topic: Callable[[str], str],
    options: Mapping[str, Any],
    reactor: Any,
    *,
    producer: str = "bugzilla-smtp",
) -> EventPublisher:
    """
    The L{EventPublisher} of a C{bugzilla-smtp} producer's (validated)
    options, enriching from Bugzilla's web service when C{enrich_url} is set
    (see L{fedhub.producers.bugzilla.enrich}); the enricher, when there is
    one, is its C{enrich} and has a C{close()}.  No I/O happens here.

    @param reactor: Used only by the enricher (HTTP and its timeout).
    """
    enrich = enricher_from_options(
        options, reactor, producer=producer,
        delivery_timeout=float(options.get("delivery_timeout") or 120.0),
    )
    return EventPublisher(
        publisher,
        topic,
        enrich=enrich,
        producer=producer,
        package_products=tuple(options.get("package_products") or DEFAULT_PACKAGE_PRODUCTS),
    )


@implementer(IPlugin, IProducerPlugin)
class BugzillaSMTPPlugin:
    """
    The C{bugzilla-smtp} producer: an SMTP listener that takes Bugzilla
    notification mail for configured addresses and publishes each bug event
    once.  See C{docs/smtp.md}.
    """

    name = "bugzilla-smtp"
    description = "Receive Bugzilla notification mail over SMTP and publish bug events."

    def file_problems(self, options: Mapping[str, Any]) -> list[tuple[str, str]]:
        """
        What the listener would refuse of its TLS files and secret file when
        it starts (see L{fedhub.hub.file_problems}).
        """
        from fedhub.producers.bugzilla.smtp import file_problems, settings_from_options

        return file_problems(settings_from_options(options))
    options: Mapping[str, Option] = {
        "listen": Option(str, "tcp:8025:interface=127.0.0.1",
                         "endpoint string the SMTP listener binds", server_endpoint_problem,
                         endpoint=True),
        "recipients": Option(list, help="addresses (local@domain) mail is accepted for",
                             check=_recipients, items=str),
        "hostname": Option(str, "localhost", "the name the listener greets with", _not_empty),
        "allowed_networks": Option(list, [], "client networks allowed to connect (empty: any)",
                                   _networks, items=str),
        "max_message_size": Option(int, 1024 * 1024, "largest mail in bytes (advertised as SIZE)",
                                   _at_least_one),
        "max_recipients": Option(int, 10, "recipients per mail at most", _at_least_one),
        "max_line_length": Option(int, 10_000, "longest line of a mail in bytes, CRLF included",
                                  _line_length),
        "max_connections": Option(int, 20, "connections at once at most", _at_least_one),
        "max_connections_per_peer": Option(int, 5, "connections at once from one address",
                                           _at_least_one),
        "max_errors": Option(int, 20, "refused commands in one session before it is closed",
                             _at_least_one),
        "max_commands_per_mail": Option(int, None, "commands a session may send before its first "
                                        "mail and between two mails taken (answered 250; "
                                        "refused mails do not count as one) before it is "
                                        "closed (default: 100, or max_recipients + 5 when "
                                        "more)",
                                        _at_least_one),
        "max_session_time": Option(float, 3600.0, "seconds a session may last before it is "
                                   "closed (between mails)", _positive),
        "idle_timeout": Option(float, 300.0, "seconds a client may stay silent", _positive),
        "data_timeout": Option(float, 600.0, "seconds a client may take to send one mail",
                               _positive),
        "delivery_timeout": Option(float, 120.0,
                                   "seconds to wait for the hand-over before answering 451",
                                   _positive),
        "tls_certificate": Option(str, None, "server certificate (PEM, chain after it) for "
                                  "STARTTLS", path=True),
        "tls_key": Option(str, None, "private key of the server certificate (PEM)", path=True),
        "tls_client_ca": Option(str, None, "CA bundle: require client certificates it signed",
                                path=True),
        "tls_required": Option(bool, False, "refuse mail before STARTTLS"),
        "secret_file": Option(str, None, "file holding a shared secret mail must carry",
                              path=True),
        "secret_header": Option(str, "X-Fedhub-Secret", "header that carries the shared secret",
                                _header_name),
        "quarantine_dir": Option(str, None, "keep never-acceptable mail here (answer 250) "
                                 "instead of refusing it", directory=True),
        "quarantine_max_files": Option(int, 1000, "mails in the quarantine at most",
                                       _at_least_one),
        "quarantine_max_bytes": Option(int, 100 * 1024 * 1024,
                                       "bytes of mail in the quarantine at most", _at_least_one),
        "dedup_window": Option(float, 3600.0, "seconds copies of one event are recognized",
                               _not_negative),
        "dedup_max_entries": Option(int, 10_000, "events remembered for de-duplication",
                                    _at_least_one),
        "package_products": Option(list, list(DEFAULT_PACKAGE_PRODUCTS),
                                   "products whose components are package names", items=str),
        "parse_workers": Option(int, 1, "worker processes that parse mail over parse_inline_max "
                                "(0: parse every mail in the hub process)", _parse_workers),
        "parse_timeout": Option(float, 30.0, "seconds a mail may wait for a parse worker, and a "
                                "worker may take to parse it, before answering 451", _positive),
        "parse_inline_max": Option(int, DEFAULT_INLINE_MAX, "mails of at most this many bytes are parsed "
                                   "in the hub process even with parse workers (0: none)",
                                   _not_negative),
        "parse_queue_max": Option(int, 100, "mails that may wait for a free parse worker; more are "
                                  "answered 451 at once (0: none waits)", _not_negative),
        "parse_stop_timeout": Option(float, 5.0, "seconds the parse workers get to exit when the hub "
                                     "stops, before they are killed", _positive),
        **enrich_options(),
    }

    def build(self, context: PluginContext) -> IService:
        """
        Build the listener for C{context}; it starts listening in
        C{startService}.  With C{parse_workers} above 0 it is a
        L{fedhub.producers.bugzilla.workers.PooledBugmailListener}, which
        starts its worker processes before it listens and stops them after
        its last session.
        """
        from fedhub.producers.bugzilla.smtp import BugmailListener, settings_from_options

        options = context.options
        publisher = event_publisher_from_options(
            context.publisher, context.hub.topic, options, context.reactor, producer=context.name
        )
        quarantine = None
        if options.get("quarantine_dir"):
            quarantine = Quarantine(
                options["quarantine_dir"],
                int(options.get("quarantine_max_files", 1000)),
                int(options.get("quarantine_max_bytes", 100 * 1024 * 1024)),
                context.reactor,
            )
        workers = int(options.get("parse_workers", 1))
        problem = _parse_workers(workers)
        if problem is not None:
            where = context.component.path if context.component is not None else context.name
            raise ConfigError([ConfigProblem(f"{where}.parse_workers", problem)])
        pool = None
        parse: Callable[[bytes], BugEvent | Deferred[BugEvent]] = parse_bugmail
        if workers > 0:
            from fedhub.producers.bugzilla.workers import ParserPool, parse_by_size

            pool = ParserPool(
                workers,
                reactor=context.reactor,
                timeout=float(options.get("parse_timeout", 30.0)),
                max_queue=int(options.get("parse_queue_max", 100)),
                stop_timeout=float(options.get("parse_stop_timeout", 5.0)),
                producer=context.name,
            )
            parse = parse_by_size(pool, int(options.get("parse_inline_max", DEFAULT_INLINE_MAX)))
        intake = BugmailIntake(
            publisher,
            clock=context.reactor,
            dedup_window=float(options.get("dedup_window", 3600.0)),
            dedup_max_entries=int(options.get("dedup_max_entries", 10_000)),
            quarantine=quarantine,
            producer=context.name,
            parse=parse,
        )
        endpoint = str(options.get("listen", "tcp:8025:interface=127.0.0.1"))
        listener: BugmailListener
        if pool is None:
            listener = BugmailListener(
                endpoint, settings_from_options(options), intake, reactor=context.reactor
            )
        else:
            from fedhub.producers.bugzilla.workers import PooledBugmailListener

            listener = PooledBugmailListener(
                endpoint, settings_from_options(options), intake, pool, reactor=context.reactor
            )
        listener.setName(context.name)  # type: ignore[no-untyped-call]
        close = getattr(publisher.enrich, "close", None)
        if callable(close):
            listener.add_cleanup(close)
        return listener
