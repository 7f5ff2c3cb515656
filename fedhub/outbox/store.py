"""
The durable on-disk store behind an outbox.

One store holds the messages of one domain in an SQLite database in WAL mode
with C{synchronous=FULL}, so a transaction is on disk (fsync'd) when its
commit returns.  The database has two tables:

  - C{pending}: messages handed over and not yet confirmed by the broker, in
    hand-over order (an C{AUTOINCREMENT} sequence that is never reused);
  - C{failed}: messages the broker returned or refused, with the reason, when
    it happened and how often; kept until an operator retries or drops them.

Every database call runs on one dedicated thread (an L{Executor}), so disk
I/O never blocks the reactor; the store's methods return Deferreds and its
counters are read and written in the reactor thread only.  The database is
opened with an exclusive lock: a second process (or a second store in the same
process) can not open the same outbox while it is in use, so two hubs never
drain one outbox.

A message is stored in the form it is published in (L{encode}): its topic,
id and queue, its AMQP properties encoded as they go on the wire (headers
included), then its body bytes as they go on the wire.  Reading a backlog
back to publish it therefore slices each record and decodes neither the body
nor (mostly) the headers, and validates nothing that was valid when it was
handed over (L{decode_for_publish}); publishing it encodes nothing again.

The store knows nothing about brokers; L{fedhub.outbox.outbox.Outbox} decides
what to write.  It writes in batches: L{Store.commit} inserts, deletes and
moves many rows in one transaction, so they share one fsync.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import struct
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from fedhub.amqp.codec import FrameError
from fedhub.amqp.frames import decode_properties
from fedhub.errors import DecodeError, FedhubError, MessageError
from fedhub.message import (
    BASE_SCHEMA,
    INFO,
    MANAGED_HEADERS,
    PRIORITY_HEADER,
    SCHEMA_HEADER,
    SENT_AT_HEADER,
    SEVERITY_HEADER,
    FrozenDict,
    FrozenList,
    Message,
    from_amqp,
    iter_loads,
    parse_sent_at,
)

_T = TypeVar("_T")

#: The file name of the database inside a store's directory.
DATABASE_NAME = "outbox.sqlite3"

#: The longest path of a database file, in bytes, that the store is used
#: with: SQLite's default build opens paths of at most 512 bytes with the
#: suffix of its log ("-wal") and a final NUL, 504 for the file itself in
#: practice; a little under that, to be safe.
MAX_DATABASE_PATH = 500

#: The layout version written to the database.  A store of layout 1 (whose
#: records are the serialized form) or 2 (the publish form) is upgraded to it
#: when opened; a store refuses any other.  Older code refuses a newer
#: layout, whose records it can not read.
SCHEMA_VERSION = 3

#: Pages of write-ahead log after which a commit copies the log into the
#: database (SQLite's default is 1000): most pages an outbox writes hold
#: messages deleted again soon, and a page rewritten several times between
#: two checkpoints is copied once.
CHECKPOINT_PAGES = 8000

#: Room kept free on the outbox's file system for writing down confirms:
#: SQLite needs space in its log to delete rows, so a backlog that filled
#: the disk could otherwise never be deleted once the broker confirms it.
#: Hand-overs that would leave less free are refused (as on a full disk).
#: At most 1/RESERVE_SHARE of the file system.
RESERVE_BYTES = 16 * 1024 * 1024
RESERVE_SHARE = 8

#: Below this many times the reserve free, every commit is followed by a
#: checkpoint that copies the log into the database and empties it, so the
#: log never holds the room the reserve keeps.
LOW_SPACE_FACTOR = 4

#: Older layouts a store upgrades in place when it opens.
UPGRADABLE_VERSIONS = ("1", "2")

#: The version an empty store is left with: its tables are those of every
#: layout.
OLDEST_VERSION = UPGRADABLE_VERSIONS[0]

#: Records of the failed area retried or dropped per transaction at most:
#: a transaction holds the database for its whole length, and the hub's
#: own commits wait for it.
FAILED_BATCH = 2000

#: Why a message is in the failed area.
RETURNED = "returned"
NACKED = "nacked"
REJECTED = "rejected"
UNREADABLE = "unreadable"
FAILURE_KINDS = (RETURNED, NACKED, REJECTED, UNREADABLE)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS pending (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL,
        created REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        data BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS failed (
        seq INTEGER PRIMARY KEY,
        message_id TEXT NOT NULL,
        created REAL NOT NULL,
        failed_at REAL NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        data BLOB NOT NULL
    )
    """,
)


class StoreError(FedhubError):
    """
    The outbox store could not do what was asked.

    @ivar path: The database file concerned.
    @ivar reason: What went wrong, as SQLite or the OS said it.
    @ivar disk_full: C{True} when the disk (or the file system quota) is full:
        the condition may clear by itself once space is freed.
    @ivar locked: C{True} when another process or store holds the database.
    """

    def __init__(self, path: str, reason: str, *, disk_full: bool = False, locked: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.disk_full = disk_full
        self.locked = locked
        super().__init__(f"{path}: {reason}")


# --- executors ----------------------------------------------------------


class Executor(Protocol):
    """
    Runs blocking calls in order, one at a time, and reports their results
    in the reactor thread.
    """

    def start(self) -> None:
        """
        Get ready to run calls.
        """

    def stop(self) -> None:
        """
        Stop after the calls submitted so far; no more may be submitted.
        """

    def submit(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run C{fn(*args)} after every call submitted before it.

        @return: a Deferred firing, in the reactor thread, with its result
            or its exception.
        """


class _ThreadReactor(Protocol):
    """
    What L{ThreadExecutor} needs of a reactor.
    """

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        """Run a call in the reactor thread."""

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> Any:
        """Call something at a phase of a reactor event."""

    def removeSystemEventTrigger(self, triggerID: Any) -> None:
        """Undo L{addSystemEventTrigger}."""


class ThreadExecutor:
    """
    Runs calls on one dedicated thread (a Twisted thread pool of size one).

    The thread is started by L{start} and joined by L{stop}; should a service
    never be stopped, the reactor's shutdown stops it so it can not keep the
    process alive.

    @ivar name: The thread's name, shown by debuggers.
    """

    def __init__(self, reactor: _ThreadReactor, name: str = "fedhub-outbox") -> None:
        self.name = name
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._trigger: Any = None

    def start(self) -> None:
        """
        Start the thread, unless it runs already.
        """
        if self._pool is not None:
            return
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=self.name)
        self._pool.start()
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)

    def _shutdown(self) -> None:
        self._trigger = None
        self.stop()

    def stop(self) -> None:
        """
        Finish the calls submitted so far and join the thread.
        """
        pool, self._pool = self._pool, None
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        if pool is not None:
            pool.stop()

    def submit(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run C{fn(*args)} on the thread.
        """
        if self._pool is None:
            return fail(StoreError(self.name, "the store's thread is not running"))
        return deferToThreadPool(self._reactor, self._pool, fn, *args)  # type: ignore[arg-type]


class SynchronousExecutor:
    """
    Runs every call at once, in the calling thread.

    For command-line tools that have nothing else to do while the disk works,
    and for tests.  It blocks, so a running hub never uses it.
    """

    def start(self) -> None:
        """
        Nothing to start.
        """

    def stop(self) -> None:
        """
        Nothing to stop.
        """

    def submit(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Call C{fn(*args)} now.
        """
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: B036 - reported through the Deferred
            return fail(e)
        return succeed(result)


# --- records ------------------------------------------------------------


class StoredRow(NamedTuple):
    """
    One pending message as stored.  A named tuple: a backlog is read back a
    few thousand rows at a time, and a tuple is the cheapest record to make.

    @ivar seq: Its place in the outbox; larger means handed over later.
    @ivar created: When it was handed over (POSIX time).
    @ivar attempts: How often it went to the failed area before.
    @ivar data: The message in its stored form (see L{encode}).
    """

    seq: int
    created: float
    attempts: int
    data: bytes

    def message(self) -> Message:
        """
        Decode the stored message.

        @raise fedhub.errors.DecodeError: when the row does not hold one.
        """
        return decode(self.data)


@dataclass(frozen=True, slots=True)
class FailedRecord:
    """
    One message in the failed area.

    @ivar seq: Its sequence number when it failed; names it for
        L{Store.retry_failed} and L{Store.drop_failed}.
    @ivar message_id: The message's id.
    @ivar created: When it was handed over (POSIX time).
    @ivar failed_at: When it last failed (POSIX time).
    @ivar kind: One of L{FAILURE_KINDS}.
    @ivar reason: What the broker (or the decoder) said.
    @ivar attempts: How often it has failed so far.
    @ivar data: The message in its stored form (see L{encode}).
    """

    seq: int
    message_id: str
    created: float
    failed_at: float
    kind: str
    reason: str
    attempts: int
    data: bytes

    def message(self) -> Message:
        """
        Decode the stored message.

        @raise fedhub.errors.DecodeError: when the row does not hold one.
        """
        return decode(self.data)


@dataclass(frozen=True, slots=True)
class FailedPage:
    """
    One page of the failed area (see L{Store.failed_page}).

    @ivar records: Its records, oldest failure first.
    @ivar next_after: The C{after_seq} that reads the next page, or C{None}
        when no record follows this page.
    """

    records: list[FailedRecord]
    next_after: int | None


@dataclass(frozen=True, slots=True)
class Failure:
    """
    An instruction to move a pending message to the failed area.

    @ivar seq: The pending message's sequence number.
    @ivar kind: One of L{FAILURE_KINDS}.
    @ivar reason: Why.
    @ivar failed_at: When (POSIX time).
    """

    seq: int
    kind: str
    reason: str
    failed_at: float


@dataclass(frozen=True, slots=True)
class CommitResult:
    """
    What one L{Store.commit} transaction did.

    @ivar first_seq: The sequence number of the first inserted row; the
        others follow without gaps.  0 when nothing was inserted.
    @ivar inserted: How many rows were inserted.
    @ivar deleted: How many pending rows were deleted.
    @ivar moved: How many pending rows were moved to the failed area.
    """

    first_seq: int
    inserted: int
    deleted: int
    moved: int


@dataclass(frozen=True, slots=True)
class Summary:
    """
    The state of a store as found when it was opened.

    @ivar pending: Pending messages.
    @ivar pending_bytes: Their stored size.
    @ivar failed: Messages in the failed area.
    @ivar failed_bytes: Their stored size.
    @ivar oldest_created: When the first pending message was handed over,
        or C{None} when there is none.
    """

    pending: int
    pending_bytes: int
    failed: int
    failed_bytes: int
    oldest_created: float | None


# --- the stored form of a message --------------------------------------


#: The first byte of a record in the AMQP form (layout 3, see L{encode}).
AMQP_FORM = b"\x03"

#: The first byte of a record in the publish form of layout 2: the topic,
#: id and queue as a JSON array, the wire headers as a JSON object, the
#: body, separated by newlines.  A record of layout 1 is one line of
#: fedora-messaging's serialized form and starts with C{"{"}.  Stores of
#: both layouts are upgraded in place; their rows are read as they are.
PUBLISH_FORM = b"\x02"

#: The lengths that follow L{AMQP_FORM}: of the topic, the id and the queue
#: (L{_NO_QUEUE} for none) in UTF-8, and of the encoded properties.
_LENGTHS = struct.Struct("!HHHI")
_NO_QUEUE = 0xFFFF

#: Decodes the metadata of a record of layout 2 (no hooks: the C scanner
#: does all the work).
_DECODER = json.JSONDecoder()


def encode(message: Message) -> bytes:
    """
    The stored form of a message (the AMQP form): the byte L{AMQP_FORM};
    the lengths of the next four parts (L{_LENGTHS}); the topic, the id and
    the queue in UTF-8; the AMQP properties exactly as published
    (L{Message.encoded_properties}: the property flags, then content type
    and encoding, the headers table, delivery mode, priority and message
    id); the body exactly as it goes on the wire.

    Publishing the message again needs no encoding and no decoding of its
    body or its headers, and no validation: see L{decode_for_publish}.

    @raise fedhub.errors.MessageError: when the message can not be encoded
        for AMQP (so it could never be published).
    """
    properties = message.encoded_properties()
    queue = message.queue
    try:
        topic = message.topic.encode("utf-8")
        message_id = message.id.encode("utf-8")
        name = b"" if queue is None else queue.encode("utf-8")
        head = _LENGTHS.pack(
            len(topic), len(message_id), _NO_QUEUE if queue is None else len(name), len(properties)
        )
    except (UnicodeEncodeError, struct.error) as e:
        raise MessageError(f"message {message.id} can not be stored: {e}") from None
    return b"".join((AMQP_FORM, head, topic, message_id, name, properties, message.body_bytes))


def _parts(data: bytes) -> tuple[str, str, str | None, bytes, bytes, int]:
    """
    The topic, id, queue, encoded properties and body of a record in the
    AMQP form, and how many bytes of the properties come before the id
    (the last property): what the messages of a burst share.

    @raise DecodeError: when the record is not one.
    """
    try:
        topic_size, id_size, queue_size, properties_size = _LENGTHS.unpack_from(data, 1)
    except struct.error:
        raise DecodeError("stored record is cut short") from None
    pos = 1 + _LENGTHS.size
    queue_end = pos + topic_size + id_size + (0 if queue_size == _NO_QUEUE else queue_size)
    end = queue_end + properties_size
    if end > len(data) or not id_size:
        raise DecodeError("stored record is cut short" if id_size else "stored record has no id")
    try:
        topic = data[pos : pos + topic_size].decode("utf-8")
        pos += topic_size
        message_id = data[pos : pos + id_size].decode("utf-8")
        queue = None if queue_size == _NO_QUEUE else data[pos + id_size : queue_end].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"stored names are not valid UTF-8: {e.reason}") from None
    properties = data[queue_end:end]
    # The id is the last property, as encode_properties wrote it.
    if not properties.endswith(bytes((id_size,)) + data[pos : pos + id_size]):
        raise DecodeError("stored properties do not end with the message's id")
    return topic, message_id, queue, properties, data[end:], properties_size - 1 - id_size


def _decoded_properties(encoded: bytes) -> dict[str, Any]:
    try:
        return decode_properties(encoded)
    except FrameError as e:
        raise DecodeError(f"stored properties are damaged: {e}") from None


def _json(text: bytes, what: str) -> Any:
    try:
        return _DECODER.decode(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DecodeError(f"stored {what} are not valid UTF-8: {e.reason}") from None
    except RecursionError:
        raise DecodeError(f"stored {what} are nested too deeply") from None
    except ValueError as e:
        raise DecodeError(f"stored {what} are not valid JSON: {e}") from None


def _split(data: bytes) -> tuple[str, str, str | None, bytes, bytes]:
    """
    The topic, id, queue, headers (as stored) and body of a record in the
    publish form.

    @raise DecodeError: when the record is not one.
    """
    first = data.find(b"\n")
    second = data.find(b"\n", first + 1) if first > 0 else -1
    if second < 0:
        raise DecodeError("stored record does not have its three parts")
    head = _json(data[1:first], "names")
    if head.__class__ is not list or len(head) != 3:
        raise DecodeError("stored names are not a topic, an id and a queue")
    topic, message_id, queue = head
    if topic.__class__ is not str or message_id.__class__ is not str or not message_id:
        raise DecodeError("stored record has no topic or id")
    if queue is not None and queue.__class__ is not str:
        raise DecodeError("stored queue is not a string")
    return topic, message_id, queue, data[first + 1 : second], data[second + 1 :]


def decode(data: bytes) -> Message:
    """
    Decode a stored message (see L{encode}) completely: the body is decoded
    and everything validated, as for a message from the broker.  Records of
    layouts 1 and 2 are read too.

    @raise fedhub.errors.DecodeError: when C{data} is not one.
    """
    form = data[:1]
    if form == AMQP_FORM:
        topic, message_id, queue, properties, body, _ = _parts(data)
        return from_amqp(topic, _decoded_properties(properties), body, queue=queue)
    if form == PUBLISH_FORM:
        topic, message_id, queue, headers, body = _split(data)
        return from_amqp(
            topic, {"message_id": message_id, "headers": _json(headers, "headers")}, body, queue=queue
        )
    for message in iter_loads((data,)):
        return message
    raise DecodeError("stored record is empty")


def _frozen(value: Any) -> Any:
    """
    A stored header value (decoded from the JSON of a layout 2 record or
    the AMQP table of a layout 3 one), frozen like a message's headers.
    """
    if value.__class__ is list:
        return FrozenList(_frozen(item) for item in value)
    if value.__class__ is dict:
        frozen = FrozenDict()
        for key, item in value.items():
            dict.__setitem__(frozen, key, _frozen(item))
        return frozen
    return value


class _Headers:
    """
    Stored wire headers decoded: the wire headers, the extra headers and
    the fields the message model keeps apart.  Immutable, so messages with
    the same stored headers share one.
    """

    __slots__ = ("wire", "extra", "schema", "severity", "priority", "sent_at", "fields")

    def __init__(self, raw: object) -> None:
        if raw.__class__ is not dict:
            raise DecodeError("stored headers are not an object")
        assert isinstance(raw, dict)
        wire = FrozenDict()
        extra = FrozenDict()
        for name, value in raw.items():
            value = _frozen(value)
            dict.__setitem__(wire, name, value)
            if name not in MANAGED_HEADERS:
                dict.__setitem__(extra, name, value)
        sent_at = raw.get(SENT_AT_HEADER)
        severity = raw.get(SEVERITY_HEADER, INFO)
        priority = raw.get(PRIORITY_HEADER, 0)
        schema = raw.get(SCHEMA_HEADER, BASE_SCHEMA)
        if sent_at is not None and sent_at.__class__ is not str:
            raise DecodeError("stored sent-at header is not a string")
        if severity.__class__ is not int or priority.__class__ is not int or schema.__class__ is not str:
            raise DecodeError("stored headers have managed values of the wrong types")
        self.wire = wire
        self.extra = extra
        self.schema = schema
        self.severity = severity
        self.priority = priority
        self.sent_at = None if sent_at is None else parse_sent_at(sent_at)
        #: The fields of a message these headers make (see L{_stored_message}).
        self.fields = {
            "headers": extra,
            "severity": severity,
            "priority": priority,
            "sent_at": self.sent_at,
            "schema": schema,
            "redelivered": False,
            "_wire": wire,
        }


#: Stored headers decoded lately, by their stored bytes (the JSON text of a
#: record of layout 2, the properties up to the id of one of layout 3): most
#: messages of a burst have the same headers, down to the sent-at second.
_headers_cache: dict[bytes, _Headers] = {}
_HEADERS_CACHE_SIZE = 256


#: Stored headers longer than this are decoded every time, so the cache
#: stays small whatever size of headers messages carry.
_HEADERS_CACHED_BYTES = 4096


def _cached_headers(key: bytes, decode: Callable[[bytes], object], stored: bytes) -> _Headers:
    """
    The decoded headers of a stored record whose shared part is C{key}:
    kept from an earlier record, or C{decode(stored)}.
    """
    headers = _headers_cache.get(key)
    if headers is None:
        headers = _Headers(decode(stored))
        if len(key) <= _HEADERS_CACHED_BYTES:
            if len(_headers_cache) >= _HEADERS_CACHE_SIZE:
                _headers_cache.clear()
            _headers_cache[key] = headers
    return headers


class StoredMessage(Message):
    """
    A message read back from the store to be published.

    The outbox stored it from a valid L{Message}, so it is not validated
    again, and its body is decoded from the stored bytes only when something
    reads C{body} (a bus that publishes needs the bytes alone).  In every
    other way it is the message that was handed over: equal to it, with the
    same id, headers, sent-at and body bytes.  Build it with
    L{decode_for_publish}.
    """

    @property  # type: ignore[misc]
    def body(self) -> Mapping[str, Any]:  # type: ignore[override]
        """
        The body, decoded on first use.

        @raise fedhub.errors.DecodeError: when the stored bytes are not a
            JSON object (a store damaged on disk).
        """
        values = self.__dict__
        body = values.get("body")
        if body is None:
            body = from_amqp(self.topic, {"message_id": self.id}, self.body_bytes).body
            values["body"] = body
        return cast(Mapping[str, Any], body)

    @body.setter
    def body(self, value: Mapping[str, Any]) -> None:
        # For the dataclass machinery (dataclasses.replace builds a new one
        # through __init__, which sets every field).
        self.__dict__["body"] = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _COMPARED)

    __hash__ = Message.__hash__


#: The fields of a message that equality compares, and all of its fields.
_COMPARED = tuple(f.name for f in fields(Message) if f.compare)
_FIELDS = frozenset(f.name for f in fields(Message))

#: The fields L{decode_for_publish} sets (C{body} is decoded on first use).
_SET_FIELDS = frozenset(
    {"topic", "body", "headers", "id", "severity", "priority", "sent_at", "schema", "queue",
     "redelivered", "_body_bytes"}
)


def _stored_message(
    topic: str, message_id: str, queue: str | None, headers: _Headers, body: bytes
) -> StoredMessage:
    """
    A L{StoredMessage} of fields known to be valid (see
    L{Message._from_checked}), built with as little work as a message read
    back for every publish allows: the fields its headers make are shared
    by the messages of a burst and copied in one go.
    """
    message = _new(StoredMessage)
    fields = message.__dict__
    fields.update(headers.fields)
    fields["topic"] = topic
    fields["id"] = message_id
    fields["queue"] = queue
    fields["_body_bytes"] = body
    return message


_new = object.__new__


def _properties_headers(properties: bytes) -> object:
    return _decoded_properties(properties).get("headers")


def _stored_headers(text: bytes) -> object:
    return _json(text, "headers")


def _amqp_form_message(data: bytes) -> StoredMessage:
    topic, message_id, queue, properties, body, shared = _parts(data)
    headers = _cached_headers(properties[:shared], _properties_headers, properties)
    message = _stored_message(topic, message_id, queue, headers, body)
    message.__dict__["_properties"] = properties
    return message


def _publish_form_message(data: bytes) -> StoredMessage:
    topic, message_id, queue, text, body = _split(data)
    headers = _cached_headers(text, _stored_headers, text)
    return _stored_message(topic, message_id, queue, headers, body)


def _fast_path_works() -> bool:
    """
    Whether the shortcuts around the message model fit it: it has the
    fields L{StoredMessage} sets, and a stored message publishes and
    compares exactly like its original.
    Otherwise (the model changed) stored messages are decoded completely,
    which is slower but right.
    """
    if _FIELDS != _SET_FIELDS:
        return False
    try:
        samples = [
            Message(
                "org.example.outbox.check",
                {"a": [1, {"b": None}], "c": "\u00e9"},
                headers={"x_user": True, "x_list": [1, {"y": [2]}]},
                id="outbox-check",
                priority=3,
                sent_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
                schema="outbox.check",
                queue="q",
            ),
            Message("org.example.outbox.check", {}, id="outbox-check-2", sent_at=None),
        ]
        for original in samples:
            stored = _amqp_form_message(encode(original))
            if not (
                stored == original
                and original == stored
                and stored.body_bytes == original.body_bytes
                and stored.amqp_properties() == original.amqp_properties()
                and stored.encoded_properties() == original.encoded_properties()
                and stored.to_serialized() == original.to_serialized()
                and stored.evolve(priority=4) == original.evolve(priority=4)
                and hash(stored) == hash(original)
            ):
                return False
        return True
    except Exception:
        return False
    finally:
        _headers_cache.clear()


_FAST = False
_FAST = _fast_path_works()


def decode_for_publish(data: bytes) -> Message:
    """
    A stored message, ready to publish: for a record in the AMQP form (or
    the publish form of layout 2) a L{StoredMessage}, which costs slicing
    the record (and decoding the headers, unless the previous messages had
    the same) and no validation; records of layout 1 are decoded completely
    (L{decode}).

    @raise fedhub.errors.DecodeError: when C{data} is not a stored message.
    """
    if _FAST:
        form = data[:1]
        if form == AMQP_FORM:
            return _amqp_form_message(data)
        if form == PUBLISH_FORM:
            return _publish_form_message(data)
    return decode(data)


# --- the database, used on the store's thread only ----------------------


def _is_empty_file(path: str) -> bool:
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return False


def _orphaned_log(path: str) -> int:
    """
    The size of the write-ahead log of the database C{path} when the
    database file itself is missing, else 0.
    """
    if os.path.lexists(path):
        return 0
    try:
        return os.stat(path + "-wal").st_size
    except FileNotFoundError:
        return 0


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            return True
        return "database or disk is full" in str(error)
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return False


def _is_locked(error: BaseException) -> bool:
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return True
        return "database is locked" in str(error)
    return False


#: Rows inserted by one statement at most: 3 parameters each stay within
#: SQLite's oldest limit of 999 parameters per statement.
_INSERT_CHUNK = 300


def _insert_pending(conn: sqlite3.Connection, rows: Sequence[tuple[str, float, bytes]]) -> None:
    """
    Insert pending rows in order, many per statement.

    Each statement executed gives up Python's global lock while SQLite
    works and must take it back afterwards, which waits for the reactor
    thread when it is busy: a transaction of a few statements is written
    much sooner than one of a statement per row.
    """
    for start in range(0, len(rows), _INSERT_CHUNK):
        chunk = rows[start : start + _INSERT_CHUNK]
        sql = "INSERT INTO pending (message_id, created, data) VALUES " + ",".join(
            ["(?, ?, ?)"] * len(chunk)
        )
        conn.execute(sql, [value for row in chunk for value in row])


def _ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """
    Sequence numbers as runs of consecutive ones, C{(first, last)} each, so
    that confirmed messages, which mostly come in order, are deleted a run
    per statement (see L{_insert_pending} for why that matters).
    """
    ranges: list[tuple[int, int]] = []
    first = last = None
    for seq in sorted(set(seqs)):
        if last is not None and seq == last + 1:
            last = seq
            continue
        if first is not None and last is not None:
            ranges.append((first, last))
        first = last = seq
    if first is not None and last is not None:
        ranges.append((first, last))
    return ranges


class _Database:
    """
    The SQLite connection and the blocking operations on it.  Every method
    runs on the store's thread.
    """

    def __init__(self, directory: str, lock_timeout: float) -> None:
        self.directory = directory
        self.path = os.path.join(directory, DATABASE_NAME)
        self.lock_timeout = lock_timeout
        self.conn: sqlite3.Connection | None = None
        # Whether the connection commits with fsync (it opens so).
        self.durable = True
        # The layout version the store says (see commit and close).
        self.schema = str(SCHEMA_VERSION)
        # The database's page size, read when it opens.
        self.page_size = 4096

    def _error(self, error: BaseException) -> StoreError:
        if _is_locked(error):
            return StoreError(
                self.path, "the outbox is in use by another process or service", locked=True
            )
        return StoreError(self.path, str(error) or type(error).__name__, disk_full=_is_disk_full(error))

    def _connection(self) -> sqlite3.Connection:
        if self.conn is None:
            raise StoreError(self.path, "the store is not open")
        return self.conn

    def _rollback(self) -> None:
        conn = self.conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _write(self, work: Callable[[sqlite3.Connection], _T], durable: bool = True) -> _T:
        """
        Run C{work} in one write transaction and commit it.

        @param durable: Whether the commit waits for fsync (C{synchronous}
            C{FULL}).  Otherwise (C{NORMAL}) it is in the log, which survives
            the death of the process but not a power loss, until the next
            durable commit or checkpoint fsyncs the log with it.
        """
        conn = self._connection()
        try:
            if durable != self.durable:
                conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
                self.durable = durable
            conn.execute("BEGIN IMMEDIATE")
            result = work(conn)
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            self._rollback()
            raise self._error(e) from e
        except BaseException:
            self._rollback()
            raise
        return result

    def open(self) -> Summary:
        if self.conn is not None:
            return self._summary(self.conn)
        conn: sqlite3.Connection | None = None
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            log_size = _orphaned_log(self.path)
            if log_size:
                # Its log may hold every message committed since the last
                # checkpoint (all of them, for a store that never had
                # one).  SQLite would make a new database and start a new
                # log over the old one.
                raise StoreError(
                    self.path,
                    f"the file is missing but its log {self.path}-wal ({log_size} bytes) is "
                    "there and may hold messages: put the file back, or move the -wal file "
                    "aside too to start with an empty outbox",
                )
            if _is_empty_file(self.path):
                # The store writes its tables as it creates the file, so an
                # empty one was cut short by something else; SQLite would
                # take it for a new store and drop its log with the messages
                # in it.
                raise StoreError(
                    self.path,
                    "the file is empty: it was truncated or damaged; move it aside, with its "
                    "-wal file if there is one, to start with an empty outbox",
                )
            conn = sqlite3.connect(
                self.path,
                timeout=self.lock_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            # Exclusive before the first access: WAL then keeps its index in
            # this process's memory, and nobody else can open the file.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(self.path, f"could not switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA journal_size_limit=67108864")
            conn.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
            # Deleted rows are still zeroed where that costs no extra write,
            # but pages freed whole are not written over (see docs/outbox.md).
            conn.execute("PRAGMA secure_delete=FAST")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
                self.schema = str(SCHEMA_VERSION)
            elif row[0] in UPGRADABLE_VERSIONS:
                # The tables are the same; records of every form are read.
                # The version is raised with the first record of this
                # layout written (see commit), not by opening: an older
                # fedhub can still open the store until then.
                self.schema = row[0]
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(
                    self.path, f"unknown outbox layout version {row[0]} (this fedhub knows {SCHEMA_VERSION})"
                )
            else:
                self.schema = row[0]
            conn.execute("COMMIT")
            summary = self._summary(conn)
            self.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        except BaseException as e:
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            if isinstance(e, (sqlite3.Error, OSError)):
                error = self._error(e)
                hint = None if error.locked or error.disk_full else self._why_not_open()
                if hint is not None:
                    error = StoreError(self.path, f"{error.reason} ({hint})")
                raise error from e
            raise
        self.conn = conn
        self.durable = True
        return summary

    def _why_not_open(self) -> str | None:
        """
        What keeps the database from being opened, when the file system
        tells: SQLite says "disk I/O error" for a file it may not write, and
        "unable to open database file" for a directory.
        """
        path = self.path
        effective = os.access in os.supports_effective_ids
        if os.path.isdir(path):
            return "it is a directory, not a database file"
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK, effective_ids=effective):
            return "this user may not read and write it"
        if not os.access(self.directory, os.W_OK | os.X_OK, effective_ids=effective):
            return f"this user may not write its directory {self.directory}, where its log goes"
        return None

    def _summary(self, conn: sqlite3.Connection) -> Summary:
        pending, pending_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM pending"
        ).fetchone()
        failed, failed_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM failed"
        ).fetchone()
        oldest = conn.execute("SELECT created FROM pending ORDER BY seq LIMIT 1").fetchone()
        return Summary(
            pending=pending,
            pending_bytes=pending_bytes,
            failed=failed,
            failed_bytes=failed_bytes,
            oldest_created=None if oldest is None else oldest[0],
        )

    def commit(
        self,
        inserts: Sequence[tuple[str, float, bytes]],
        deletes: Sequence[int],
        failures: Sequence[Failure],
    ) -> tuple[CommitResult, int, int | None]:
        """
        @return: the result, the bytes moved to the failed area and, when a
            delete found fewer rows than asked, the pending bytes recounted.
        """

        def work(conn: sqlite3.Connection) -> tuple[CommitResult, int, int | None]:
            first = 0
            if inserts:
                if self.schema != str(SCHEMA_VERSION):
                    # The first record of this layout in a store of an
                    # earlier one: from now on only this fedhub reads it.
                    conn.execute(
                        "UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),)
                    )
                _insert_pending(conn, inserts)
                # One writer holds the database, so the rows of one
                # transaction get consecutive numbers.
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                first = last - len(inserts) + 1
            moved = 0
            moved_bytes = 0
            for failure in failures:
                row = conn.execute(
                    "SELECT length(data) FROM pending WHERE seq = ?", (failure.seq,)
                ).fetchone()
                if row is None:
                    continue
                conn.execute(
                    "INSERT INTO failed (seq, message_id, created, failed_at, kind, reason,"
                    " attempts, data) SELECT seq, message_id, created, ?, ?, ?, attempts + 1,"
                    " data FROM pending WHERE seq = ?",
                    (failure.failed_at, failure.kind, failure.reason, failure.seq),
                )
                conn.execute("DELETE FROM pending WHERE seq = ?", (failure.seq,))
                moved += 1
                moved_bytes += row[0]
            deleted = 0
            recount: int | None = None
            if deletes:
                cursor = conn.executemany(
                    "DELETE FROM pending WHERE seq BETWEEN ? AND ?", _ranges(deletes)
                )
                deleted = cursor.rowcount
                if deleted != len(deletes):
                    recount = conn.execute(
                        "SELECT coalesce(sum(length(data)), 0) FROM pending"
                    ).fetchone()[0]
            return CommitResult(first, len(inserts), deleted, moved), moved_bytes, recount

        space = self._space()
        if inserts and space is not None:
            free, reserve = space
            size = sum(len(row[2]) for row in inserts if isinstance(row[2], bytes))
            if free - size < reserve:
                raise StoreError(
                    self.path,
                    f"less than {reserve} bytes would be left free on its disk, which are kept "
                    "for writing down confirms",
                    disk_full=True,
                )
        # Deleting confirmed messages need not wait for the disk: should the
        # deletion be lost with power, the messages are published again.
        durable = bool(inserts or failures)
        try:
            outcome = self._write(work, durable=durable)
        except StoreError as e:
            if not e.disk_full:
                raise
            # The log may hold the room: copy it into the database, empty
            # it, and try once more.
            self._checkpoint()
            outcome = self._write(work, durable=durable)
        if inserts:
            self.schema = str(SCHEMA_VERSION)
        if space is not None and space[0] < LOW_SPACE_FACTOR * space[1]:
            self._checkpoint()
        return outcome

    def _space(self) -> tuple[int, int] | None:
        """
        The bytes free for the store, on its file system and in the pages
        of its database that deletions freed (new rows take those first),
        and the reserve kept (see L{RESERVE_BYTES}); or C{None} when that
        can not be told.
        """
        conn = self._connection()
        try:
            st = os.statvfs(self.directory)
            free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
        except (OSError, sqlite3.Error):
            return None
        free = st.f_bavail * st.f_frsize + free_pages * self.page_size
        return free, min(RESERVE_BYTES, st.f_blocks * st.f_frsize // RESERVE_SHARE)

    def _checkpoint(self) -> None:
        """
        Copy the log into the database and empty it, if it can be done.
        """
        conn = self.conn
        if conn is None:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass

    def load(self, after_seq: int, limit: int) -> list[StoredRow]:
        conn = self._connection()
        try:
            rows = conn.execute(
                "SELECT seq, created, attempts, data FROM pending WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from e
        return list(map(StoredRow._make, rows))

    def failed(self, after_seq: int, limit: int) -> list[FailedRecord]:
        conn = self._connection()
        try:
            rows = conn.execute(
                "SELECT seq, message_id, created, failed_at, kind, reason, attempts, data"
                " FROM failed WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from e
        return [
            FailedRecord(seq, message_id, created, failed_at, kind, reason, attempts, bytes(data))
            for seq, message_id, created, failed_at, kind, reason, attempts, data in rows
        ]

    def failed_page(self, after_seq: int, limit: int, max_bytes: int) -> FailedPage:
        conn = self._connection()
        try:
            # The sizes first, and one more than the page holds: whether a
            # record follows is known without reading any data beyond the
            # page.
            sizes = conn.execute(
                "SELECT seq, length(data) FROM failed WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit + 1),
            ).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from e
        taken = 0
        total = 0
        for _, size in sizes[:limit]:
            if taken and total + size > max_bytes:
                break
            taken += 1
            total += size
        if not taken:
            return FailedPage([], None)
        records = self.failed(after_seq, taken)
        if taken == len(sizes):
            return FailedPage(records, None)
        return FailedPage(records, records[-1].seq if records else sizes[taken - 1][0])

    def failed_batch(
        self, action: str, seqs: Sequence[int] | None, after: int, upto: int | None, limit: int, now: float
    ) -> tuple[int, int, int, int]:
        """
        Retry or drop one batch of the failed area, in one transaction.

        @param action: C{"retry"} (move back to the end of the pending
            messages, handed over at C{now}) or C{"drop"}.
        @param seqs: The records of this batch (those gone are ignored), or
            C{None} for the next C{limit} records after C{after} up to
            C{upto}.
        @param upto: The last record for C{seqs=None}; C{None} on the first
            batch, which takes the largest in the failed area then, so that
            what fails again meanwhile (with a new, larger number) is not
            taken again.
        @return: how many records were acted on, their stored size, the
            last sequence number this batch looked at and C{upto}.
        """

        def work(conn: sqlite3.Connection) -> tuple[int, int, int, int]:
            last = upto
            if seqs is None:
                if last is None:
                    last = conn.execute("SELECT coalesce(max(seq), 0) FROM failed").fetchone()[0]
                rows = conn.execute(
                    "SELECT seq, length(data) FROM failed WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                    (after, last, limit),
                ).fetchall()
                # An empty batch looked at everything up to the end.
                reached = rows[-1][0] if rows else last
            else:
                rows = []
                for seq in seqs:
                    row = conn.execute("SELECT seq, length(data) FROM failed WHERE seq = ?", (seq,)).fetchone()
                    if row is not None:
                        rows.append((row[0], row[1]))
                reached = max(seqs, default=after)
                last = 0 if last is None else last
            if action == "retry":
                conn.executemany(
                    "INSERT INTO pending (message_id, created, attempts, data)"
                    " SELECT message_id, ?, attempts, data FROM failed WHERE seq = ?",
                    [(now, seq) for seq, _ in rows],
                )
            conn.executemany("DELETE FROM failed WHERE seq = ?", [(seq,) for seq, _ in rows])
            return len(rows), sum(size for _, size in rows), reached, last

        return self._write(work)

    def close(self) -> None:
        if self.conn is not None and self.schema != OLDEST_VERSION:
            self._mark_empty()
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as e:
                raise self._error(e) from e

    def _mark_empty(self) -> None:
        """
        An empty store is the same in every layout: say the oldest, so that
        an older fedhub can open it again (a downgrade after draining).
        """

        def work(conn: sqlite3.Connection) -> None:
            pending, failed = conn.execute(
                "SELECT (SELECT count(*) FROM pending), (SELECT count(*) FROM failed)"
            ).fetchone()
            if pending == 0 and failed == 0:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (OLDEST_VERSION,))

        try:
            self._write(work, durable=True)
        except StoreError:
            # Only a downgrade would have used it.
            return
        self.schema = OLDEST_VERSION


# --- the store ----------------------------------------------------------


class Store:
    """
    The durable store of one domain's outbox, in C{<directory>/outbox.sqlite3}.

    Every method that touches the disk returns a Deferred and runs on the
    executor's thread, in call order.  The counters (L{pending_count} and
    friends) describe committed state, are kept in memory and cost nothing to
    read; they are valid once L{open} has fired.

    @ivar directory: The directory holding the database.
    @ivar path: The database file.
    @ivar pending_count: Pending messages.
    @ivar pending_bytes: Their stored size, in bytes.
    @ivar failed_count: Messages in the failed area.
    @ivar failed_bytes: Their stored size, in bytes.
    @ivar transactions: How many L{commit} transactions have succeeded.
    @ivar commit_hook: When set, called in the reactor thread with the
        L{CommitResult} of every successful L{commit}.
    """

    def __init__(
        self, directory: str, executor: Executor, *, lock_timeout: float = 1.0
    ) -> None:
        """
        @param directory: Where the database lives; created on L{open}.
        @param executor: Runs the blocking calls; the store starts it in
            L{open} and stops it in L{close}.
        @param lock_timeout: How long L{open} waits for another holder of the
            database to let go before it fails.
        """
        self.directory = directory
        self._db = _Database(directory, lock_timeout)
        self.path = self._db.path
        self._executor = executor
        self._started = False
        # While a close runs: the opens and closes waiting for it to end.
        self._after_close: list[Callable[[], object]] | None = None
        self.is_open = False
        self.pending_count = 0
        self.pending_bytes = 0
        self.failed_count = 0
        self.failed_bytes = 0
        self.transactions = 0
        self.commit_hook: Callable[[CommitResult], None] | None = None

    def open(self) -> Deferred[Summary]:
        """
        Create or open the database, and count what it holds.

        @return: a Deferred firing with a L{Summary}, or failing with
            L{StoreError} (C{locked} set when another holder has it).
            Called while a L{close} is under way, it opens once the close
            is done (and its executor stopped), then starts the executor
            again.
        """
        if self._after_close is not None:
            waiting: Deferred[Summary] = Deferred()
            self._after_close.append(lambda: self.open().chainDeferred(waiting))
            return waiting
        if not self._started:
            self._executor.start()
            self._started = True
        d = self._executor.submit(self._db.open)

        def opened(summary: Summary) -> Summary:
            self.is_open = True
            self.pending_count = summary.pending
            self.pending_bytes = summary.pending_bytes
            self.failed_count = summary.failed
            self.failed_bytes = summary.failed_bytes
            return summary

        return d.addCallback(opened)

    def commit(
        self,
        inserts: Sequence[tuple[str, float, bytes]],
        deletes: Sequence[tuple[int, int]] = (),
        failures: Sequence[Failure] = (),
    ) -> Deferred[CommitResult]:
        """
        In one transaction: append new pending messages, delete confirmed
        ones and move failed ones to the failed area.  It fires once the
        transaction is on disk.

        @param inserts: C{(message_id, created, data)} for each new message,
            in order; see L{encode} for C{data}.
        @param deletes: C{(seq, size)} of each pending message to delete,
            C{size} being the length of its data as stored.
        @param failures: The pending messages to move to the failed area.
        @return: a Deferred firing with a L{CommitResult}, or failing with
            L{StoreError} (C{disk_full} set when the disk is full); then
            nothing of it was written.
        """
        delete_seqs = [seq for seq, _ in deletes]
        delete_bytes = sum(size for _, size in deletes)
        d = self._executor.submit(self._db.commit, list(inserts), delete_seqs, list(failures))

        def committed(outcome: tuple[CommitResult, int, int | None]) -> CommitResult:
            result, moved_bytes, recount = outcome
            self.pending_count += result.inserted - result.deleted - result.moved
            self.failed_count += result.moved
            self.failed_bytes += moved_bytes
            if recount is not None:
                self.pending_bytes = recount
            else:
                self.pending_bytes += sum(len(row[2]) for row in inserts) - delete_bytes - moved_bytes
            self.transactions += 1
            if self.commit_hook is not None:
                self.commit_hook(result)
            return result

        return d.addCallback(committed)

    def load(self, after_seq: int, limit: int) -> Deferred[list[StoredRow]]:
        """
        Read pending messages back, oldest first.

        @param after_seq: Only those with a larger sequence number.
        @param limit: At most this many.
        """
        return self._executor.submit(self._db.load, after_seq, limit)

    def failed(self, after_seq: int = 0, limit: int = 100) -> Deferred[list[FailedRecord]]:
        """
        List the failed area, oldest failure first, a page at a time.

        @param after_seq: Only records with a larger sequence number (the
            last C{seq} of the previous page).
        @param limit: At most this many.
        """
        return self._executor.submit(self._db.failed, after_seq, limit)

    def failed_page(self, after_seq: int, limit: int, max_bytes: int) -> Deferred[FailedPage]:
        """
        One page of the failed area, oldest failure first, bounded in
        records and in bytes: what a reader holds at a time however large
        the failed area.

        @param after_seq: Only records with a larger sequence number (the
            C{next_after} of the previous page; 0 for the first).
        @param limit: At most this many records.
        @param max_bytes: At most this many bytes of stored messages (the
            C{data} of the records), but at least one record, however large.
        """
        return self._executor.submit(self._db.failed_page, after_seq, limit, max_bytes)

    def retry_failed(
        self, seqs: Iterable[int] | None = None, now: float = 0.0, *, batch: int = FAILED_BATCH
    ) -> Deferred[int]:
        """
        Move messages from the failed area back to the end of the pending
        ones, to be published again.

        They are moved in transactions of at most C{batch} records, each
        its own call on the executor: the commits submitted meanwhile run
        between them instead of waiting for the whole failed area.  Should
        one fail (or the store close meanwhile), the records of the
        batches before it are pending and the others still failed; none is
        lost or moved twice.

        @param seqs: The records to retry (by L{FailedRecord.seq}); C{None}
            retries every one up to the largest sequence number in the
            failed area when the first batch runs (so not those that fail
            again meanwhile, which come back with a larger one).  Unknown
            ones are ignored.
        @param now: The time they count as handed over again.
        @param batch: At most this many records per transaction.
        @return: a Deferred firing with how many were moved, or failing
            with L{StoreError} (saying how many were moved before).
        """
        return self._failed_batches("retry", seqs, now, batch)

    def drop_failed(self, seqs: Iterable[int] | None = None, *, batch: int = FAILED_BATCH) -> Deferred[int]:
        """
        Delete messages from the failed area for good, in transactions of
        at most C{batch} records as L{retry_failed} moves them.

        @param seqs: The records to drop; C{None} drops every one up to
            the largest sequence number in the failed area when the first
            batch runs.
        @return: a Deferred firing with how many were dropped, or failing
            with L{StoreError} (saying how many were dropped before).
        """
        return self._failed_batches("drop", seqs, 0.0, batch)

    @inlineCallbacks
    def _failed_batches(
        self, action: str, seqs: Iterable[int] | None, now: float, batch: int
    ) -> Generator[Deferred[Any], Any, int]:
        """
        Retry or drop records of the failed area a batch at a time (see
        L{_Database.failed_batch}), keeping the counters up to date after
        each.
        """
        chosen = None if seqs is None else sorted(set(seqs))
        batch = max(1, batch)
        total = 0
        after = 0
        upto: int | None = None
        position = 0
        while True:
            chunk = None
            if chosen is not None:
                chunk = chosen[position : position + batch]
                position += batch
            try:
                outcome: tuple[int, int, int, int] = yield self._executor.submit(
                    self._db.failed_batch, action, chunk, after, upto, batch, now
                )
            except StoreError as e:
                if not total:
                    raise
                done = "moved back to pending" if action == "retry" else "dropped"
                raise StoreError(
                    e.path, f"{e.reason} (after {total} of the messages were {done})",
                    disk_full=e.disk_full, locked=e.locked,
                ) from e
            count, size, after, upto = outcome
            self.failed_count -= count
            self.failed_bytes -= size
            if action == "retry":
                self.pending_count += count
                self.pending_bytes += size
            total += count
            if chosen is None:
                if count < batch:
                    return total
            elif position >= len(chosen):
                return total

    def close(self) -> Deferred[None]:
        """
        Close the database after every call submitted before, then stop the
        executor.  Called while another close is under way, it waits for
        that one and for an L{open} asked for meanwhile.
        """
        if self._after_close is not None:
            # One close at a time: a second one must not stop the executor
            # of an open queued behind the first.
            closed: Deferred[None] = Deferred()
            self._after_close.append(lambda: self.close().chainDeferred(closed))
            return closed
        if not self._started:
            return succeed(None)
        self._after_close = []
        d = self._executor.submit(self._db.close)

        def stop(result: object) -> object:
            self.is_open = False
            self._started = False
            self._executor.stop()
            waiting, self._after_close = self._after_close or [], None
            for call in waiting:
                call()
            return result

        return d.addBoth(stop)
