"""
The message model and its fedora-messaging wire format.

A L{Message} is an immutable value: topic, JSON-object body, extra headers, id,
severity, priority, sent-at and schema name.  This module maps it exactly to
and from

  - AMQP: routing key, basic properties (C{content_type}, C{content_encoding},
    C{delivery_mode}, C{message_id}, C{priority}, C{headers}) and body bytes,
    as fedora-messaging publishes them; and
  - the serialized form used by files and the command line: one JSON object per
    line with C{topic}, C{body}, C{headers}, C{id}, C{priority} and C{queue}.

Every decoding function raises L{DecodeError} for bad input, never anything else.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, ClassVar, NoReturn, Self

from fedhub.errors import DecodeError, MessageError

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
#: The severities fedora-messaging defines, lowest first.
SEVERITIES = (DEBUG, INFO, WARNING, ERROR)

#: The schema name of a message that names none.
BASE_SCHEMA = "base.message"

#: AMQP routing keys are short strings: at most 255 bytes.
MAX_TOPIC_BYTES = 255

# Header names of the wire format.
SCHEMA_HEADER = "fedora_messaging_schema"
SEVERITY_HEADER = "fedora_messaging_severity"
SENT_AT_HEADER = "sent-at"
PRIORITY_HEADER = "priority"
#: Headers the model manages itself; everything else is an extra header.
MANAGED_HEADERS = frozenset({SCHEMA_HEADER, SEVERITY_HEADER, SENT_AT_HEADER, PRIORITY_HEADER})

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
PERSISTENT = 2

#: The keys of one serialized record.
SERIALIZED_KEYS = frozenset({"topic", "body", "headers", "id", "priority", "queue"})


class FrozenDict(dict):  # type: ignore[type-arg]
    """
    A C{dict} that refuses mutation, so a message body stays as it was built.

    It is still a C{dict}: C{json} serializes it and it compares equal to plain
    dictionaries with the same items.
    """

    __slots__ = ()

    def _readonly(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("message bodies and headers are immutable")

    __setitem__ = __delitem__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]
    __ior__ = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, separators=(",", ":")))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))


class FrozenList(list):  # type: ignore[type-arg]
    """
    A C{list} that refuses mutation; the array counterpart of L{FrozenDict}.
    """

    __slots__ = ()

    def _readonly(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("message bodies and headers are immutable")

    __setitem__ = __delitem__ = _readonly
    append = extend = insert = pop = remove = clear = sort = reverse = _readonly  # type: ignore[assignment]
    __iadd__ = __imul__ = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, separators=(",", ":")))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenList, (list(self),))


def _frozen_list(items: list[Any]) -> FrozenList:
    """
    C{items} as a L{FrozenList}, lists inside it frozen too; objects inside
    it are L{FrozenDict} already (the JSON object hook made them).
    """
    return FrozenList([_frozen_list(i) if i.__class__ is list else i for i in items])


def _frozen_object(items: dict[str, Any]) -> FrozenDict:
    """
    The JSON object hook: a decoded object as a L{FrozenDict}, with the lists
    among its values frozen.  Objects are decoded inside out, so everything
    below is frozen already, except lists directly inside lists, which
    L{_frozen_list} handles.
    """
    for key, value in items.items():
        if value.__class__ is list:
            items[key] = _frozen_list(value)
    return FrozenDict(items)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every message: json.loads() with hooks builds a new
# decoder and scanner on each call, which costs as much as decoding a small
# body.  The C scanner it wraps keeps no state between calls.
# A body without arrays (no "[" anywhere, not even in a string) needs no
# list freezing: its objects are made by FrozenDict itself, with no Python
# call per object.
_decode = json.JSONDecoder(object_hook=_frozen_object, parse_constant=_reject_constant).decode
_decode_without_arrays = json.JSONDecoder(object_hook=FrozenDict, parse_constant=_reject_constant).decode


def _json_text(data: bytes | str) -> str:
    """
    JSON bytes as text, in the Unicode encoding they are in (RFC 8259 allows
    UTF-8, 16 or 32; a message body is UTF-8 and starts with C{"{"}).
    """
    if isinstance(data, str):
        return data
    if data[:1] == b"{":
        return data.decode("utf-8")
    return data.decode(json.detect_encoding(data))


def _json_object(data: bytes | str) -> FrozenDict:
    """
    Decode a JSON document that must be an object, frozen; any failure is a
    L{DecodeError}.  Deep nesting raises C{RecursionError} inside C{json}: that
    is caught here too.
    """
    try:
        text = _json_text(data)
        value = (_decode if "[" in text else _decode_without_arrays)(text)
    except UnicodeDecodeError as e:
        raise DecodeError(f"body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise DecodeError("body is nested too deeply") from None
    except ValueError as e:
        raise DecodeError(f"body is not valid JSON: {e}") from None
    if value.__class__ is not FrozenDict:
        raise DecodeError(f"body is a JSON {_json_kind(value)}, not an object")
    return value


def _json_kind(value: object) -> str:
    """
    What JSON calls the kind of a decoded value, for messages.
    """
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


# One encoder for every message, for the decoder's reason.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


#: The scalar classes a JSON round trip gives back as they are: equal, of
#: the same class.
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


class _NotPlain(Exception):
    """
    A value holds something a JSON round trip would change (a key that is
    not a string, a tuple, a subclass of a JSON type...).
    """


def _frozen_plain(value: Any) -> Any:
    """
    A frozen copy of plain JSON data (C{dict}s with string keys, C{list}s,
    strings, numbers, booleans and C{None}): what decoding its JSON would
    give, without encoding and decoding it.

    @raise _NotPlain: when C{value} holds anything else.
    """
    cls = value.__class__
    if cls is dict or cls is FrozenDict:
        items = {}
        for key, item in value.items():
            if key.__class__ is not str:
                raise _NotPlain()
            items[key] = item if item.__class__ in _JSON_SCALARS else _frozen_plain(item)
        return FrozenDict(items)
    if cls is list or cls is FrozenList:
        return FrozenList(
            [item if item.__class__ in _JSON_SCALARS else _frozen_plain(item) for item in value]
        )
    if cls in _JSON_SCALARS:
        return value
    raise _NotPlain()


def _frozen_body(body: Mapping[str, Any], encoded: bytes) -> FrozenDict:
    """
    The frozen form of a body whose JSON is C{encoded}: the same as decoding
    C{encoded} (L{_json_object}), made without decoding when the body is
    plain JSON data.
    """
    try:
        frozen: FrozenDict = _frozen_plain(body)
        return frozen
    except (_NotPlain, RecursionError):
        return _json_object(encoded)


def _encode_json(value: Mapping[str, Any]) -> bytes:
    """
    Encode a message body as compact UTF-8 JSON, or raise L{MessageError}.
    """
    try:
        return _encode(value).encode("utf-8")
    except RecursionError:
        raise MessageError("body is nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise MessageError(f"body is not JSON-serializable: {e}") from None
    except UnicodeEncodeError as e:
        raise MessageError(f"body holds a string that is not valid Unicode: {e.reason}") from None


#: The second L{utc_now} last gave, and its datetime: the messages of a
#: burst are made within the same second, and a datetime is immutable.
_last_now: tuple[int, datetime] = (0, datetime(1970, 1, 1, tzinfo=timezone.utc))


def utc_now() -> datetime:
    """
    The current time in UTC without microseconds, as the C{sent-at} header has it.
    """
    global _last_now
    second = int(time.time())
    last = _last_now
    if last[0] == second:
        return last[1]
    now = datetime.fromtimestamp(second, timezone.utc)
    _last_now = (second, now)
    return now


def uuid_text(data: bytes, version: int) -> str:
    """
    The text of the RFC 4122 UUID of the given C{version} made of the first
    16 bytes of C{data} (random bytes for version 4, the name's SHA-1 digest
    for version 5), as C{str(uuid.UUID(bytes=..., version=...))} gives it,
    without the C{UUID} object.
    """
    raw = bytearray(data[:16])
    raw[6] = (raw[6] & 0x0F) | (version << 4)
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def new_message_id() -> str:
    """
    A fresh random message id: the text of a version 4 UUID, as
    C{str(uuid.uuid4())} gives it.
    """
    return uuid_text(os.urandom(16), 4)


#: The last sent-at time formatted by L{_sent_at_text} and its text: the
#: messages of a burst are mostly made within the same second.
_last_sent_at: tuple[datetime, str] = (datetime(1970, 1, 1, tzinfo=timezone.utc), "1970-01-01T00:00:00+00:00")


def _sent_at_text(when: datetime) -> str:
    """
    C{when.isoformat()} for a message's sent-at (aware, without microseconds
    already: the constructor drops them), remembering the last one.
    """
    global _last_sent_at
    last, text = _last_sent_at
    # The same instant in the same time zone object is the same text.
    if when == last and when.tzinfo is last.tzinfo:
        return text
    text = when.isoformat()
    _last_sent_at = (when, text)
    return text


def format_sent_at(when: datetime) -> str:
    """
    Format a time for the C{sent-at} header: ISO 8601 with a UTC offset, no microseconds.
    """
    if when.tzinfo is None:
        raise MessageError("sent_at must be timezone-aware")
    return when.replace(microsecond=0).isoformat()


def parse_sent_at(text: str) -> datetime:
    """
    Parse a C{sent-at} header value.  A value without an offset is taken as UTC.

    @raise DecodeError: when C{text} is not an ISO 8601 time.
    """
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise DecodeError(f"sent-at header {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when


#: What a topic must not contain.
_BAD_TOPIC_CHARACTER = re.compile("[\x00\r\n\t ]")


def _check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not topic:
        raise MessageError(f"topic must be a non-empty string, not {topic!r}")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise MessageError("topic is not valid Unicode") from None
    if size > MAX_TOPIC_BYTES:
        raise MessageError(f"topic is {size} bytes long; at most {MAX_TOPIC_BYTES} are allowed")
    if _BAD_TOPIC_CHARACTER.search(topic):
        raise MessageError(f"topic {topic!r} contains whitespace or control characters")
    return topic


def _check_int(name: str, value: object, allowed: Iterable[int] | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"{name} must be an integer, not {value!r}")
    if allowed is not None and value not in allowed:
        raise MessageError(f"{name} must be one of {tuple(allowed)}, not {value!r}")
    return value


@dataclass(frozen=True, eq=True)
class Message:
    """
    One message on the bus.

    Build new messages with L{Message.create} (or the constructor with every
    field); they are validated on construction and immutable afterwards.

    @ivar topic: The full topic, e.g. C{org.fedoraproject.prod.bugzilla.bug.update};
        it is the AMQP routing key.
    @ivar body: The JSON object carried, immutable.
    @ivar headers: Extra headers beyond those the model manages (for example
        C{fedora_messaging_user_jdoe: True}), immutable.
    @ivar id: The message id (a UUID4 string for messages fedhub creates).
    @ivar severity: One of L{SEVERITIES}.
    @ivar priority: The AMQP priority, 0 when unset.
    @ivar sent_at: When it was sent (aware, no microseconds), or C{None} when a
        received message did not say.
    @ivar schema: The registered schema name of the body.
    @ivar queue: The queue a received message arrived on, else C{None}.
    @ivar redelivered: Whether the broker delivered this message before (to
        this or another consumer of the queue); C{False} for new messages.
    """

    topic: str
    body: Mapping[str, Any]
    headers: Mapping[str, Any] = field(default_factory=FrozenDict)
    id: str = field(default_factory=new_message_id)
    severity: int = INFO
    priority: int = 0
    sent_at: datetime | None = field(default_factory=utc_now)
    schema: str = BASE_SCHEMA
    queue: str | None = None
    redelivered: bool = field(default=False, compare=False)
    _body_bytes: bytes = field(default=b"", repr=False, compare=False)

    #: Worked out on first use (L{wire_headers}, L{encoded_properties}) and
    #: then set on the instance; class attributes, not fields, so that a new
    #: message does not carry them and setting them keeps the instance's
    #: attributes in their compact form.
    _wire: ClassVar[dict[str, Any] | None] = None
    _properties: ClassVar[bytes | None] = None

    def __post_init__(self) -> None:
        _check_topic(self.topic)
        if self.body.__class__ is not FrozenDict and not isinstance(self.body, Mapping):
            raise MessageError(f"body must be a JSON object, not {type(self.body).__name__}")
        if self.headers.__class__ is not FrozenDict and not isinstance(self.headers, Mapping):
            raise MessageError(f"headers must be a mapping, not {type(self.headers).__name__}")
        if not isinstance(self.id, str) or not self.id:
            raise MessageError(f"id must be a non-empty string, not {self.id!r}")
        _check_int("severity", self.severity, SEVERITIES)
        _check_int("priority", self.priority)
        if not 0 <= self.priority <= 255:
            raise MessageError(f"priority must be within 0..255, not {self.priority}")
        if self.sent_at is not None:
            if not isinstance(self.sent_at, datetime) or self.sent_at.tzinfo is None:
                raise MessageError("sent_at must be a timezone-aware datetime")
            if self.sent_at.microsecond:
                object.__setattr__(self, "sent_at", self.sent_at.replace(microsecond=0))
        if not isinstance(self.schema, str) or not self.schema:
            raise MessageError(f"schema must be a non-empty string, not {self.schema!r}")
        if self.queue is not None and not isinstance(self.queue, str):
            raise MessageError(f"queue must be a string or None, not {self.queue!r}")
        for name in self.headers:
            if not isinstance(name, str):
                raise MessageError(f"header names must be strings, not {name!r}")
            if name in MANAGED_HEADERS:
                raise MessageError(f"header {name!r} is set from the message's own fields")
        if not self._body_bytes:
            encoded = _encode_json(self.body)
            object.__setattr__(self, "_body_bytes", encoded)
            if not isinstance(self.body, FrozenDict):
                object.__setattr__(self, "body", _frozen_body(self.body, encoded))
        if not isinstance(self.headers, FrozenDict):
            object.__setattr__(self, "headers", _freeze_headers(self.headers))

    def __hash__(self) -> int:
        return hash(self.id)

    @classmethod
    def _from_checked(cls, **fields: Any) -> Self:
        """
        A message made of fields that are known to be valid (decoded and
        checked by the caller), without the constructor's checks: for the
        paths every message takes, a delivery and a message read back from
        the outbox.  Every field the class keeps in its instance must be
        given (a subclass may compute one, as the outbox's decodes C{body}
        on first use); C{_wire} may be given too: the wire headers
        L{wire_headers} would otherwise work out.
        """
        message = object.__new__(cls)
        message.__dict__.update(fields)
        return message

    @classmethod
    def create(
        cls,
        topic: str,
        body: Mapping[str, Any],
        *,
        headers: Mapping[str, Any] | None = None,
        severity: int = INFO,
        priority: int = 0,
        schema: str = BASE_SCHEMA,
        id: str | None = None,
        sent_at: datetime | None = None,
    ) -> Message:
        """
        Build a new message to publish, with a fresh id and the current time
        unless given.

        @raise MessageError: when any field is invalid.
        """
        return cls(
            topic=topic,
            body=body,
            headers=FrozenDict() if headers is None else headers,
            id=id or new_message_id(),
            severity=severity,
            priority=priority,
            sent_at=sent_at or utc_now(),
            schema=schema,
        )

    @property
    def body_bytes(self) -> bytes:
        """
        The body as it goes on the wire: compact UTF-8 JSON.
        """
        return self._body_bytes

    def wire_headers(self) -> dict[str, Any]:
        """
        Every AMQP header of this message: the extra headers plus the managed
        ones.  Worked out once (the message is immutable); each call returns
        a new dictionary.
        """
        wire = self._wire
        if wire is None:
            wire = dict(self.headers)
            wire[SCHEMA_HEADER] = self.schema
            wire[SEVERITY_HEADER] = self.severity
            if self.sent_at is not None:
                wire[SENT_AT_HEADER] = _sent_at_text(self.sent_at)
            wire[PRIORITY_HEADER] = self.priority
            object.__setattr__(self, "_wire", wire)
        return dict(wire)

    def amqp_properties(self) -> dict[str, Any]:
        """
        The AMQP basic properties fedora-messaging sets, by their AMQP field names.
        """
        return {
            "content_type": CONTENT_TYPE,
            "content_encoding": CONTENT_ENCODING,
            "delivery_mode": PERSISTENT,
            "message_id": self.id,
            "priority": self.priority,
            "headers": self.wire_headers(),
        }

    def encoded_properties(self) -> bytes:
        """
        L{amqp_properties} encoded as an AMQP content header carries them
        (L{fedhub.amqp.frames.encode_properties}).  Worked out once; the
        outbox stores them, so a message is encoded once however often it
        is published.

        @raise MessageError: when they can not be encoded (an id longer
            than 255 bytes, a header value out of AMQP's range).
        """
        encoded = self._properties
        if encoded is None:
            encoded = _encode_properties(self)
            object.__setattr__(self, "_properties", encoded)
        return encoded

    def evolve(self, **changes: Any) -> Message:
        """
        A copy with some fields changed (validated like a new message).
        """
        if changes.keys() <= _DELIVERY_CHANGES and self._body_bytes:
            return self._delivered_copy(changes)
        return Message(**self._fields_with(changes))

    def _fields_with(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """
        This message's fields with C{changes} applied, as the constructor
        takes them; the body's JSON bytes are kept unless the body changes.
        """
        fields: dict[str, Any] = {
            "topic": self.topic,
            "body": self.body,
            "headers": self.headers,
            "id": self.id,
            "severity": self.severity,
            "priority": self.priority,
            "sent_at": self.sent_at,
            "schema": self.schema,
            "queue": self.queue,
            "redelivered": self.redelivered,
        }
        fields.update(changes)
        if "body" not in changes:
            fields["_body_bytes"] = self._body_bytes
        return fields

    def _delivered_copy(self, changes: Mapping[str, Any]) -> Message:
        """
        L{evolve} for what a transport changes on every delivery (the
        queue, the redelivered flag, the topic): only the changed fields are
        checked, the others are this message's, which were checked when it
        was made.  The wire headers and the encoded properties, which none
        of them is part of, are kept when worked out already.
        """
        if "topic" in changes:
            _check_topic(changes["topic"])
        queue = changes.get("queue", self.queue)
        if queue is not None and not isinstance(queue, str):
            raise MessageError(f"queue must be a string or None, not {queue!r}")
        fields = self._fields_with(changes)
        if self._wire is not None:
            fields["_wire"] = self._wire
            if self._properties is not None:
                fields["_properties"] = self._properties
        return Message._from_checked(**fields)

    def to_serialized(self) -> dict[str, Any]:
        """
        This message as one serialized record (a JSON-ready dictionary).
        """
        return {
            "topic": self.topic,
            "headers": self.wire_headers(),
            "id": self.id,
            "body": self.body,
            "queue": self.queue,
            "priority": self.priority,
        }


#: The fields L{Message.evolve} changes without checking the others again.
_DELIVERY_CHANGES = frozenset({"queue", "redelivered", "topic"})

#: Header values whose class and equality tell their encodings apart (not
#: floats: 0.0 == -0.0).
_PLAIN_HEADER_VALUES = frozenset({str, int, bool, type(None)})

#: The encoded properties of recent messages up to their id, by what makes
#: them (see L{_properties_key}): most messages of a burst have the same
#: headers, down to the sent-at second, and differ in their id alone, which
#: is the last property set.
_properties_cache: dict[tuple[Any, ...], bytes] = {}
_PROPERTIES_CACHE_SIZE = 256
#: Encodings longer than this are not kept, so the cache stays small
#: whatever size of headers messages carry.
_PROPERTIES_CACHED_BYTES = 4096


def _properties_key(message: Message) -> tuple[Any, ...] | None:
    """
    What makes the encoded properties of a message but for its id: its
    schema, severity, priority, sent-at text and extra headers (their
    names, values and the values' classes, as C{True == 1}), which make
    its wire headers; or C{None} when one is not of a plain class.
    """
    severity = message.severity
    priority = message.priority
    schema = message.schema
    if severity.__class__ is not int or priority.__class__ is not int or schema.__class__ is not str:
        return None
    sent_at = message.sent_at
    key: list[Any] = [schema, severity, priority, None if sent_at is None else _sent_at_text(sent_at)]
    for name, value in message.headers.items():
        if value.__class__ not in _PLAIN_HEADER_VALUES:
            return None
        key += (name, value.__class__, value)
    return tuple(key)


_amqp_encoding: tuple[Any, Any] | None = None


def _amqp() -> tuple[Any, Any]:
    """
    The AMQP encoders and their error, imported on first use: the AMQP
    modules bring txamqp and Twisted, which a process that only makes or
    reads messages does without.
    """
    global _amqp_encoding
    if _amqp_encoding is None:
        from fedhub.amqp.codec import FieldTableError
        from fedhub.amqp.frames import encode_properties

        _amqp_encoding = (FieldTableError, encode_properties)
    return _amqp_encoding


def _encode_properties(message: Message) -> bytes:
    table_error, encode_properties = _amqp_encoding or _amqp()
    message_id = message.id
    try:
        raw_id = message_id.encode("utf-8")
    except UnicodeEncodeError:
        raise MessageError(f"message id {message_id!r} is not encodable as UTF-8") from None
    if len(raw_id) > 255:
        raise MessageError(
            f"message {message_id[:40]}... can not be encoded for AMQP: its id is"
            f" {len(raw_id)} bytes; AMQP's message-id holds at most 255"
        )
    tail = bytes((len(raw_id),)) + raw_id
    key = _properties_key(message)
    if key is not None:
        prefix = _properties_cache.get(key)
        if prefix is not None:
            return prefix + tail
    try:
        encoded: bytes = encode_properties(message.amqp_properties())
    except (table_error, KeyError, TypeError, ValueError) as e:
        raise MessageError(f"message {message_id} can not be encoded for AMQP: {e}") from None
    if key is not None and len(encoded) <= _PROPERTIES_CACHED_BYTES and encoded.endswith(tail):
        if len(_properties_cache) >= _PROPERTIES_CACHE_SIZE:
            _properties_cache.clear()
        _properties_cache[key] = encoded[: len(encoded) - len(tail)]
    return encoded


def _freeze_headers(headers: Mapping[str, Any]) -> FrozenDict:
    frozen = FrozenDict()
    for name, value in headers.items():
        dict.__setitem__(frozen, name, _deep_freeze(value))
    return frozen


#: Header value types that are immutable already.
_SCALARS = frozenset({str, bool, int, float, bytes, type(None), datetime, Decimal})


def _deep_freeze(value: Any) -> Any:
    if value.__class__ in _SCALARS or isinstance(value, FrozenDict | FrozenList):
        return value
    if isinstance(value, Mapping):
        frozen = FrozenDict()
        for key, item in value.items():
            dict.__setitem__(frozen, key, _deep_freeze(item))
        return frozen
    if isinstance(value, (list, tuple)):
        return FrozenList(_deep_freeze(item) for item in value)
    return value


def _split_headers(raw: object) -> tuple[str, int, int, datetime | None, FrozenDict]:
    """
    Split wire headers into (schema, severity, priority, sent_at, extra headers),
    checking the types of the managed ones.
    """
    if raw is None:
        raw = {}
    if raw.__class__ is not dict and not isinstance(raw, Mapping):
        raise DecodeError(f"headers must be a table, not {type(raw).__name__}")
    schema = raw.get(SCHEMA_HEADER, BASE_SCHEMA)
    if not isinstance(schema, str) or not schema:
        raise DecodeError(f"header {SCHEMA_HEADER} must be a non-empty string, not {schema!r}")
    severity = raw.get(SEVERITY_HEADER, INFO)
    if severity.__class__ is not int or severity not in SEVERITIES:
        raise DecodeError(f"header {SEVERITY_HEADER} must be one of {SEVERITIES}, not {severity!r}")
    priority = raw.get(PRIORITY_HEADER, 0)
    if priority is None:
        priority = 0
    if priority.__class__ is not int or not 0 <= priority <= 255:
        raise DecodeError(f"header {PRIORITY_HEADER} must be an integer 0..255, not {priority!r}")
    sent_at_text = raw.get(SENT_AT_HEADER)
    sent_at: datetime | None = None
    if sent_at_text is not None:
        if isinstance(sent_at_text, bytes):
            sent_at_text = sent_at_text.decode("utf-8", "replace")
        if not isinstance(sent_at_text, str):
            raise DecodeError(f"header {SENT_AT_HEADER} must be a string, not {sent_at_text!r}")
        sent_at = parse_sent_at(sent_at_text)
    extra = FrozenDict()
    for name, value in raw.items():
        if name.__class__ is not str and not isinstance(name, str):
            raise DecodeError(f"header name {name!r} is not a string")
        if name not in MANAGED_HEADERS:
            dict.__setitem__(extra, name, _deep_freeze(value))
    return schema, severity, priority, sent_at, extra


def from_amqp(
    routing_key: str,
    properties: Mapping[str, Any],
    body: bytes,
    queue: str | None = None,
    redelivered: bool = False,
) -> Message:
    """
    Build a message from what an AMQP delivery carries.

    @param properties: The basic properties by AMQP field name (C{headers},
        C{message_id}, C{content_encoding}, C{priority}, ...); missing ones are
        treated as fedora-messaging treats them.
    @raise DecodeError: for an invalid topic, body, encoding or header.
    """
    encoding = properties.get("content_encoding") or CONTENT_ENCODING
    if isinstance(encoding, bytes):
        encoding = encoding.decode("ascii", "replace")
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        try:
            text: bytes | str = body.decode(encoding)
        except UnicodeDecodeError as e:
            raise DecodeError(f"body is not valid {encoding[:100]}: {e.reason}") from None
        except (LookupError, ValueError):
            # ValueError: a name no codec can have (a NUL, a lone surrogate).
            raise DecodeError(f"unknown content encoding {encoding[:100]!r}") from None
        body_bytes = None
    else:
        text = body
        body_bytes = body
    decoded = _json_object(text)
    schema, severity, priority, sent_at, extra = _split_headers(properties.get("headers"))
    prop_priority = properties.get("priority")
    if isinstance(prop_priority, int) and not isinstance(prop_priority, bool):
        priority = prop_priority
    message_id = properties.get("message_id")
    if isinstance(message_id, bytes):
        message_id = message_id.decode("utf-8", "replace")
    if not isinstance(message_id, str) or not message_id:
        # Some publishers set no id; give the message one so it can be traced.
        message_id = new_message_id()
    try:
        _check_topic(routing_key)
    except MessageError as e:
        raise DecodeError(str(e)) from None
    if not 0 <= priority <= 255:
        raise DecodeError(f"priority must be within 0..255, not {priority}")
    if queue is not None and not isinstance(queue, str):
        raise DecodeError(f"queue must be a string or None, not {queue!r}")
    if sent_at is not None and sent_at.microsecond:
        sent_at = sent_at.replace(microsecond=0)
    if body_bytes is None:
        try:
            body_bytes = _encode_json(decoded)
        except MessageError as e:
            raise DecodeError(str(e)) from None
    # Every field is checked above or by _split_headers and _json_object,
    # so the message is made without running the constructor's checks again:
    # this is the path of every delivery a consumer gets.
    return Message._from_checked(
        topic=routing_key,
        body=decoded,
        headers=extra,
        id=message_id,
        severity=severity,
        priority=priority,
        sent_at=sent_at,
        schema=schema,
        queue=queue,
        redelivered=bool(redelivered),
        _body_bytes=body_bytes,
    )


def load_message(record: object, line: int | None = None) -> Message:
    """
    Build a message from one serialized record (a decoded JSON object).

    @raise DecodeError: when the record is not a valid serialized message.
    """
    if not isinstance(record, Mapping):
        raise DecodeError(f"record is a JSON {type(record).__name__}, not an object", line)
    unknown = set(record) - SERIALIZED_KEYS
    if unknown:
        raise DecodeError(f"unknown keys in record: {', '.join(sorted(unknown))}", line)
    for key in ("topic", "body"):
        if key not in record:
            raise DecodeError(f"record has no {key!r}", line)
    body = record["body"]
    if not isinstance(body, Mapping):
        raise DecodeError(f"body is a JSON {_json_kind(body)}, not an object", line)
    try:
        schema, severity, priority, sent_at, extra = _split_headers(record.get("headers"))
    except DecodeError as e:
        raise DecodeError(e.reason, line) from None
    if record.get("priority") is not None:
        priority = record["priority"]
    message_id = record.get("id") or new_message_id()
    queue = record.get("queue")
    try:
        body, body_bytes = _loaded_body(body)
        return Message(
            topic=record["topic"],
            body=body,
            headers=extra,
            id=message_id,
            severity=severity,
            priority=priority,
            sent_at=sent_at,
            schema=schema,
            queue=queue,
            _body_bytes=body_bytes,
        )
    except MessageError as e:
        raise DecodeError(str(e), line) from None


def _loaded_body(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], bytes]:
    """
    The frozen body of a serialized record and its wire JSON; the JSON is
    C{b""} when the message's constructor is to encode it and say why it
    can not.

    A body with lone surrogates is one a delivery had (an unpaired
    C{\\uD800} escape in its JSON, which L{from_amqp} accepts), written back
    as the same escapes by L{dump_line}: it is encoded with those escapes
    again, so that what C{fedhub record} wrote loads, and publishes as it
    arrived.
    """
    try:
        text = _encode(body)
    except (RecursionError, TypeError, ValueError):
        return body, b""
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        # Surrogates occur only inside JSON strings, where an escape stands
        # for the same character.
        encoded = escape_surrogates(text).encode("utf-8")
    if body.__class__ is FrozenDict:
        return body, encoded
    return _frozen_body(body, encoded), encoded


def dumps(messages: Message | Iterable[Message]) -> str:
    """
    Serialize messages: one JSON object per line, each line ending in a newline.
    """
    if isinstance(messages, Message):
        messages = [messages]
    return "".join(dump_line(m) for m in messages)


def _header_json(value: object) -> object:
    """
    The JSON form of header values AMQP has and JSON lacks: timestamps (as
    in RabbitMQ's C{x-death}) become ISO 8601 strings, decimals strings and
    byte arrays text.  These forms load back as those strings, not as the
    AMQP types they came as.

    A value held in a L{fedhub.amqp.codec.FieldValue} (a timestamp past the
    year 9999, or a value decoded with its exact wire type) is written as
    its plain value would be; such a timestamp as ISO 8601 text with the
    year in the standard's expanded form (a sign, then five digits or more:
    C{+10000-01-01T00:00:00+00:00}).
    """
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    # A FieldValue exists only once the AMQP codec is loaded; looking it up
    # here keeps serializing free of the AMQP modules otherwise.
    codec = sys.modules.get("fedhub.amqp.codec")
    if codec is not None and isinstance(value, codec.FieldValue):
        wire = value.value
        if value.type == "T" and wire.__class__ is int and wire >= 0:
            return _timestamp_text(wire)
        if value.type == "t":
            return bool(wire)
        return wire
    raise TypeError(f"{type(value).__name__} can not be serialized")


#: The Gregorian calendar repeats every 400 years, which are this many days.
_DAYS_IN_400_YEARS = 146097
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _timestamp_text(seconds: int) -> str:
    """
    ISO 8601 text of an AMQP timestamp (whole seconds since the epoch, UTC),
    years past 9999 included, which C{datetime} can not hold: the date is
    worked out within one 400-year cycle and the cycles added to its year.
    """
    days, second = divmod(seconds, 86400)
    cycles, days = divmod(days, _DAYS_IN_400_YEARS)
    day = _EPOCH + timedelta(days=days, seconds=second)
    year = day.year + 400 * cycles
    # Within one cycle from 1970 the year has four digits: the rest of the
    # text follows them.
    rest = day.isoformat()[4:]
    return f"{year:04d}{rest}" if year <= 9999 else f"+{year}{rest}"


#: A lone surrogate: what a header name that was not UTF-8 on the wire holds
#: (it is decoded with C{surrogateescape}), and what an unpaired C{\\uD800}
#: escape in a body's JSON decodes to.  UTF-8 can not encode one.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape_surrogates(text: str) -> str:
    """
    C{text} with lone surrogates written as C{\\uXXXX} escapes, so that it
    always encodes as UTF-8: inside a JSON string an escape stands for the
    same character; elsewhere it is a visible stand-in.
    """
    if text.isascii():
        return text
    return _SURROGATE.sub(_surrogate_escape, text)


def dump_line(message: Message) -> str:
    """
    Serialize one message as one line, newline included.

    Text is written as it is (not as C{\\uXXXX} escapes), except lone
    surrogates: they are written as escapes, so that the line always encodes
    as UTF-8, and a header name that held them loads back the same; and the
    characters that Python's C{str.splitlines} (which fedora-messaging's
    C{loads} splits a file with) takes for line ends besides those JSON
    escapes anyway: U+0085, U+2028 and U+2029.
    """
    # Both occur only inside JSON strings, where an escape stands for the
    # same character.
    text = json.dumps(
        message.to_serialized(), ensure_ascii=False, sort_keys=True, default=_header_json
    )
    return _LINE_BREAKS.sub(_escape_char, escape_surrogates(text)) + "\n"


#: What C{str.splitlines} takes for a line end that C{json.dumps} leaves raw.
_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")


def _escape_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def iter_loads(lines: Iterable[str | bytes]) -> Iterator[Message]:
    """
    Deserialize messages from lines of the serialized form, lazily; blank lines
    are skipped.

    @raise DecodeError: naming the 1-based line of the first bad record.
    """
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DecodeError(f"not valid UTF-8: {e.reason}", number) from None
        if not line.strip():
            continue
        try:
            record = _decode(line)
        except RecursionError:
            raise DecodeError("record is nested too deeply", number) from None
        except ValueError as e:
            raise DecodeError(f"not valid JSON: {e}", number) from None
        yield load_message(record, number)


def loads(text: str | bytes) -> list[Message]:
    """
    Deserialize every message of a serialized text.

    @raise DecodeError: naming the 1-based line of the first bad record.
    """
    # Split on newlines only: str.splitlines() would also split inside
    # records at characters such as U+0085 or U+2028, which JSON keeps raw.
    if isinstance(text, bytes):
        lines: list[str | bytes] = list(text.split(b"\n"))
    else:
        lines = list(text.split("\n"))
    return list(iter_loads(lines))
