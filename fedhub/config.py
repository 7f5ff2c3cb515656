"""
fedhub's configuration: one TOML file, read with C{tomllib} and validated
before anything starts.

L{parse_config} checks everything it can without connecting anywhere and
collects every problem it finds, in file order, into one
L{fedhub.errors.ConfigError}: syntax, unknown keys at every level, types,
missing keys, references between sections (a component's domain and
plugin), broker URLs, TLS settings, readable certificate files, topic
patterns and each plugin's own keys (its L{Option}s).  Each problem names
the key path (C{consumers[2].domain}) and, where it can be found, the line.

Problem texts are safe to print: control characters are escaped, and a
password in a broker URL is shown as C{***}.

The result is a tree of frozen dataclasses: L{Config} holds the
L{HubSettings}, one L{DomainConfig} per security domain and one
L{ComponentConfig} per producer and consumer.  See C{docs/configuration.md}
for the file format.
"""

from __future__ import annotations

import builtins
import codecs
import copy
import difflib
import enum
import json
import math
import os
import re
import tempfile
import tomllib
import unicodedata
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from types import MappingProxyType
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

from fedhub.errors import (
    NO_PLUGINS,
    ConfigError,
    ConfigProblem,
    ConfigUnreadable,
    UnknownPlugin,
    broken_note,
)
from fedhub.logs import LEVELS
from fedhub.topology import QUEUE_TYPE, BindingSpec, ExchangeSpec, QueueSpec, Topology

__all__ = [
    "REQUIRED",
    "Option",
    "HubSettings",
    "DomainConfig",
    "ComponentConfig",
    "Config",
    "PluginLookup",
    "parse_config",
    "load_config",
    "default_config",
    "redact_url",
    "escape_text",
    "format_path",
    "is_valid_name",
    "check_topic_pattern",
    "resolve_endpoint_paths",
    "server_endpoint_problem",
]


class _Required(enum.Enum):
    """
    The type of L{REQUIRED}.
    """

    REQUIRED = "REQUIRED"

    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of an L{Option} that must be given.
REQUIRED: Final = _Required.REQUIRED

#: The schemes a broker URL may have (besides the bare word C{memory}).
BROKER_SCHEMES: Final = ("amqp", "amqps")

#: The broker of the in-process bus.
MEMORY_BROKER: Final = "memory"

#: AMQP short strings (routing keys, queue and exchange names) hold at most 255 bytes.
MAX_NAME_BYTES: Final = 255

#: A configuration file larger than this is refused unread.
MAX_FILE_BYTES: Final = 10 * 1024 * 1024

#: Where the hub keeps its state when the file does not say.
DEFAULT_STATE_DIR: Final = "/var/lib/fedhub"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
#: A consumer's dead-letter queue (group 2) or retry queue, and the queue it belongs to
#: (group 1): see L{fedhub.consumers.runner.consumer_queues}.
_DERIVED_QUEUE = re.compile(r"(.+)\.(?:(dead)|retry\.[0-9]+)")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


# --- safe text -------------------------------------------------------------


def escape_text(text: str) -> str:
    """
    Escape control and formatting characters (newlines, escape sequences,
    bidirectional overrides, ...) so that C{text} prints as one harmless line.
    """
    out = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            code = ord(char)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def _quote(text: str) -> str:
    """
    C{text} in double quotes, escaped so it prints safely and unambiguously.
    """
    return '"' + escape_text(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _queue_arguments_key(arguments: Mapping[str, Any]) -> str:
    """
    A queue's arguments as the broker compares two declarations of it: as
    JSON, which tells 10000.0 from 10000 and true from 1 as the broker does
    (a double is not an integer), without C{x-queue-type} when it is
    C{"classic"}: RabbitMQ takes a classic queue declared with that argument
    and one declared without it as the same queue (a quorum or stream queue
    not so).  That holds where a queue declared without a type is classic,
    as it is unless the virtual host or the node names another default
    queue type, which the configuration does not know.
    """
    if arguments.get(QUEUE_TYPE) == "classic":
        arguments = {key: value for key, value in arguments.items() if key != QUEUE_TYPE}
    return json.dumps(dict(arguments), sort_keys=True)


def redact_url(url: str) -> str:
    """
    A broker URL fit for logs and messages: a password is replaced by C{***}.

    Everything between the user name and the last C{@} is treated as the
    password, so a URL that does not even parse still shows no secret.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    at = rest.rfind("@")
    if at < 0:
        return url
    user, colon, _password = rest[:at].partition(":")
    if not colon:
        return url
    return f"{head}{sep}{user}:***{rest[at:]}"


def format_path(path: tuple[str | int, ...]) -> str:
    """
    Render a key path: C{("consumers", 2, "domain")} becomes
    C{consumers[2].domain}; keys that are not bare TOML keys are quoted.
    """
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.fullmatch(part) else _quote(part)
            out += f".{text}" if out else text
    return out


def is_valid_name(name: str) -> bool:
    """
    Whether C{name} may name a domain or component: letters, digits, C{.},
    C{_} and C{-}, starting with a letter or digit, at most 100 characters.
    Such a name is safe in queue names and as a directory name.
    """
    return _NAME.fullmatch(name) is not None


def check_topic_pattern(pattern: str) -> str | None:
    """
    Check a topic or topic pattern (AMQP topic exchange syntax).

    @return: C{None} when it is valid, otherwise what is wrong with it.
    """
    if not pattern:
        return "a topic pattern can not be empty"
    size = len(pattern.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"topic pattern is {size} bytes long; at most {MAX_NAME_BYTES} are allowed"
    if any(unicodedata.category(c)[0] in "CZ" for c in pattern):
        return f"topic pattern {_quote(pattern)} contains whitespace or control characters"
    words = pattern.split(".")
    if "" in words:
        return f"empty word in topic pattern {_quote(pattern)}"
    for word in words:
        if word not in ("*", "#") and ("*" in word or "#" in word):
            return f'"*" and "#" must stand alone as words in topic pattern {_quote(pattern)}'
    return None


# --- the configuration model ----------------------------------------------


@dataclass(frozen=True)
class Option:
    """
    One configuration key of a plugin (or of fedhub itself).

    @ivar type: The TOML value types allowed: C{str}, C{int}, C{float},
        C{bool}, C{list}, C{dict} (and C{datetime}, C{date}, C{time}), or a
        tuple of them.  An integer is accepted (and converted) where only
        C{float} is asked for; a boolean is never taken for a number.
    @ivar default: The value when the key is absent, or L{REQUIRED}.
    @ivar help: One line for documentation and C{check-config}.
    @ivar check: Called with a value of the right type; returns a text saying
        what is wrong with it, or C{None} when it is fine.
    @ivar items: For lists, the type every element must have.
    @ivar path: The value names a file that must be readable; a relative
        path is taken relative to the configuration file's directory.
    @ivar directory: The value names a directory the plugin writes in (and
        creates when missing), so it or its nearest existing parent must be
        a directory it can write to; a relative path is taken relative to
        the configuration file's directory.  An empty value stays empty.
    @ivar endpoint: The value is a server endpoint string; relative paths in
        it are taken relative to the configuration file's directory (see
        L{resolve_endpoint_paths}).
    """

    type: builtins.type | tuple[builtins.type, ...]
    default: Any = REQUIRED
    help: str = ""
    check: Callable[[Any], str | None] | None = None
    items: builtins.type | None = None
    path: bool = False
    directory: bool = False
    endpoint: bool = False

    @property
    def required(self) -> bool:
        """
        Whether the key must be given.
        """
        return self.default is REQUIRED


@dataclass(frozen=True)
class HubSettings:
    """
    The C{[hub]} table: settings of the whole process.

    @ivar topic_prefix: The first words of every topic fedhub builds.
    @ivar environment: The deployment (C{dev}, C{stg}, C{prod}); the word
        after the prefix.
    @ivar state_dir: Where the outbox, poller cursors and plugin state live.
    @ivar status: The endpoint string of the HTTP status server, or C{None}
        for none.
    @ivar log_level: The least important log events written: C{debug},
        C{info}, C{warn}, C{error} or C{critical}.
    """

    topic_prefix: str = "org.fedoraproject"
    environment: str = "dev"
    state_dir: str = DEFAULT_STATE_DIR
    status: str | None = None
    log_level: str = "info"

    def topic(self, suffix: str) -> str:
        """
        A full topic: C{<topic_prefix>.<environment>.<suffix>}.
        """
        return f"{self.topic_prefix}.{self.environment}.{suffix}"


@dataclass(frozen=True)
class DomainConfig:
    """
    One C{[domains.<name>]} table: a security domain and its broker.

    @ivar name: The domain's name.
    @ivar broker: C{"memory"} for the in-process bus, or an C{amqp://} or
        C{amqps://} URL; it may hold a password, so show L{display_broker}
        instead (the field is left out of C{repr}).
    @ivar exchange: The exchange messages are published to.
    @ivar ca: The CA bundle that verifies the broker (required for C{amqps}).
    @ivar cert: The client certificate (PEM), with L{key}.
    @ivar key: The client certificate's private key (PEM).
    @ivar server_hostname: The name the broker's certificate must carry, when
        it is not the URL's host (for example when the URL has an address).
    @ivar auth_mechanism: C{"PLAIN"} (the URL's user and password) or
        C{"EXTERNAL"} (the client certificate's identity); C{None} chooses
        C{EXTERNAL} when a client certificate is set, C{PLAIN} otherwise.
    @ivar heartbeat: The AMQP heartbeat, in seconds (never 0).
    @ivar connection_name: Shown by the broker for this connection.
    @ivar connection_timeout: Seconds to wait for a connection to be set up.
    @ivar confirm_window: At most this many published messages wait for
        their publisher confirm at once.
    @ivar reconnect_delay: Seconds before the first attempt to reach the
        broker again after losing it (or failing to reach it); each next
        attempt waits twice as long, up to L{reconnect_max_delay}, both
        with jitter (half to all of the delay).
    @ivar reconnect_max_delay: The longest wait between two attempts.
    @ivar outbox_max_messages: The outbox takes no more messages beyond this
        many (producers are told to retry later).
    @ivar outbox_max_bytes: Likewise, in bytes of stored messages.
    @ivar passive_declares: Only check that exchanges and queues exist
        (for brokers where the hub may not declare them).
    """

    name: str
    broker: str = field(repr=False)
    exchange: str = "amq.topic"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_hostname: str | None = None
    auth_mechanism: str | None = None
    heartbeat: int = 30
    connection_name: str | None = None
    connection_timeout: float = 10.0
    confirm_window: int = 1000
    reconnect_delay: float = 1.0
    reconnect_max_delay: float = 60.0
    outbox_max_messages: int = 100_000
    outbox_max_bytes: int = 1024 * 1024 * 1024
    passive_declares: bool = False
    topology: Topology = field(default_factory=Topology)

    @property
    def is_memory(self) -> bool:
        """
        Whether this domain runs on the in-process bus.
        """
        return self.broker == MEMORY_BROKER

    @property
    def display_broker(self) -> str:
        """
        The broker URL with any password replaced by C{***}.
        """
        return redact_url(self.broker)

    @property
    def tls(self) -> bool:
        """
        Whether the broker is reached over TLS (C{amqps}).
        """
        return not self.is_memory and urlsplit(self.broker).scheme == "amqps"

    @property
    def host(self) -> str | None:
        """
        The broker's host name, C{None} for the in-process bus.
        """
        return None if self.is_memory else urlsplit(self.broker).hostname

    @property
    def port(self) -> int | None:
        """
        The broker's port (5672, or 5671 with TLS, unless the URL says),
        C{None} for the in-process bus.
        """
        if self.is_memory:
            return None
        return urlsplit(self.broker).port or (5671 if self.tls else 5672)

    @property
    def vhost(self) -> str:
        """
        The virtual host: the URL's path, percent-decoded (C{/%2Finfra} is
        C{/infra}); C{/} when the URL has none.
        """
        if self.is_memory:
            return "/"
        return unquote(urlsplit(self.broker).path[1:]) or "/"

    @property
    def username(self) -> str | None:
        """
        The user name in the URL (percent-decoded), if any.
        """
        if self.is_memory:
            return None
        name = urlsplit(self.broker).username
        return None if name is None else unquote(name)

    @property
    def password(self) -> str | None:
        """
        The password in the URL (percent-decoded), if any.  Never log it.
        """
        if self.is_memory:
            return None
        secret = urlsplit(self.broker).password
        return None if secret is None else unquote(secret)


#: The default C{blocking_warning} of a consumer, in seconds: far beyond
#: what a call into a plugin that does no blocking work takes, short enough
#: that the operator hears of one that stalls the hub noticeably.
DEFAULT_BLOCKING_WARNING: Final = 0.5


@dataclass(frozen=True)
class ComponentConfig:
    """
    One C{[[producers]]} or C{[[consumers]]} table.

    @ivar kind: C{"producer"} or C{"consumer"}.
    @ivar index: Its 0-based position among the tables of its kind.
    @ivar name: Its name, unique among all producers and consumers.
    @ivar plugin: The name of the plugin that builds it.
    @ivar domain: The name of the domain it publishes to or consumes from.
    @ivar options: The plugin's own keys, with the plugin's defaults applied
        (read-only).
    @ivar topics: A consumer's topic patterns; empty when the file gives none.
    @ivar queue: A consumer's queue name (default C{fedhub.<name>}).
    @ivar concurrency: How many messages a consumer handles at once.
    @ivar prefetch: How many messages the broker may hand the consumer
        unacknowledged, at least C{concurrency}; 0 leaves it to the
        consumer (see L{fedhub.consumers.runner.ConsumerService}).
    @ivar on_error: What an exception that is no verdict does to a message:
        C{retry}, C{dead-letter}, C{drop} or C{halt}.
    @ivar retry_delay: Seconds before the first retry; each next one waits
        twice as long, up to C{max_retry_delay}.
    @ivar max_retry_delay: The longest wait between retries.
    @ivar max_retries: Retries before a message is dead-lettered.
    @ivar drain_timeout: How long stopping waits for messages in hand.
    @ivar max_deliveries: Deliveries of one message, without a verdict that
        reached the broker, after which it is dead-lettered (0: no limit).
    @ivar blocking_warning: Seconds one call into the plugin may hold the
        event loop before it is counted and logged
        (L{fedhub.consumers.blocking}).
    """

    kind: str
    index: int
    name: str
    plugin: str
    domain: str
    options: Mapping[str, Any] = field(hash=False)
    topics: tuple[str, ...] = ()
    queue: str | None = None
    concurrency: int = 1
    prefetch: int = 0
    on_error: str = "retry"
    retry_delay: float = 10.0
    max_retry_delay: float = 3600.0
    max_retries: int = 5
    drain_timeout: float = 30.0
    max_deliveries: int = 10
    blocking_warning: float = DEFAULT_BLOCKING_WARNING
    queue_arguments: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def path(self) -> str:
        """
        Its key path in the file, for example C{consumers[2]}.
        """
        return f"{self.kind}s[{self.index}]"


@dataclass(frozen=True)
class Config:
    """
    A whole, valid configuration.

    @ivar hub: The C{[hub]} settings.
    @ivar domains: The domains by name (read-only).
    @ivar producers: The producers, in file order.
    @ivar consumers: The consumers, in file order.
    @ivar source: Where it was read from, if anywhere.
    """

    hub: HubSettings
    domains: Mapping[str, DomainConfig] = field(hash=False)
    producers: tuple[ComponentConfig, ...]
    consumers: tuple[ComponentConfig, ...]
    source: str | None = None

    @property
    def components(self) -> tuple[ComponentConfig, ...]:
        """
        Every producer, then every consumer.
        """
        return self.producers + self.consumers


#: How L{parse_config} finds a plugin: called with C{("consumer" | "producer",
#: name)}, returns the plugin or raises L{UnknownPlugin}.
PluginLookup = Callable[[str, str], Any]


# --- fedhub's own keys -------------------------------------------------------


def _positive(value: int | float) -> str | None:
    return None if value > 0 else "must be greater than 0"


#: The longest a connection attempt may be given, in seconds.  RabbitMQ's
#: URI spec and pika take this setting in milliseconds; a larger value is
#: most likely milliseconds meant as seconds.
MAX_CONNECTION_TIMEOUT: Final = 3600.0

#: The longest a retry may wait, in seconds (7 days).  A retry queue's
#: message TTL holds the delay in milliseconds, and the broker refuses a
#: TTL past its own limit only when the queue is declared, after the check
#: said the file was fine; no retry is worth holding a message longer.
MAX_RETRY_DELAY: Final = 7 * 24 * 3600.0

#: The longest wait between two attempts to reach a broker, in seconds.
MAX_RECONNECT_DELAY: Final = 3600.0

#: The largest C{blocking_warning}, in seconds: a call that holds the event
#: loop a minute has stalled the whole hub (and the broker may have dropped
#: its connections, at two heartbeat intervals) long before the warning.
MAX_BLOCKING_WARNING: Final = 60.0


def _seconds_up_to(limit: float) -> Callable[[float], str | None]:
    """
    The check of a number of seconds greater than 0 and at most C{limit}
    (a larger one is most likely milliseconds meant as seconds).
    """

    def check(value: float) -> str | None:
        if not value > 0:
            return "must be greater than 0"
        if value > limit:
            return f"is in seconds and at most {limit:g}"
        return None

    return check


_connection_timeout = _seconds_up_to(MAX_CONNECTION_TIMEOUT)
_reconnect_delay = _seconds_up_to(MAX_RECONNECT_DELAY)
_blocking_warning = _seconds_up_to(MAX_BLOCKING_WARNING)


def _retry_delay(value: float) -> str | None:
    if not value > 0:
        return "must be greater than 0"
    if value > MAX_RETRY_DELAY:
        return f"must be at most {MAX_RETRY_DELAY:g} seconds (7 days)"
    return None


def _heartbeat(value: int) -> str | None:
    if value <= 0:
        return (
            f"must be at least 1 second; {value} is refused "
            "(0 would turn heartbeats off and a dead broker would go unnoticed)"
        )
    if value > 65535:
        return "must be at most 65535 seconds"
    return None


def _prefix(value: str) -> str | None:
    words = value.split(".")
    if (
        "" in words
        or any(word in ("*", "#") or "*" in word or "#" in word for word in words)
        or any(unicodedata.category(c)[0] in "CZ" for c in value)
    ):
        return (
            "must be dot-separated words, with no empty word, wildcard, whitespace "
            "or control character"
        )
    if len(value.encode("utf-8", "surrogatepass")) > 200:
        return "is too long: topics are at most 255 bytes"
    return None


def _environment(value: str) -> str | None:
    if "." in value or not is_valid_name(value):
        return "must be one word of letters, digits, _ and - (for example dev, stg or prod)"
    return None


def _mechanism(value: str) -> str | None:
    return None if value in ("PLAIN", "EXTERNAL") else 'must be "PLAIN" or "EXTERNAL"'


def _not_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _log_level(value: str) -> str | None:
    if value in LEVELS:
        return None
    return f"must be one of {', '.join(LEVELS)} (not {_quote(value)})"


def _short_string(value: str) -> str | None:
    if not value:
        return "must not be empty"
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long; at most {MAX_NAME_BYTES} are allowed"
    if any(unicodedata.category(c)[0] == "C" for c in value):
        return "must not contain control characters"
    return None


def _queue_name(value: str) -> str | None:
    error = _short_string(value)
    if error is None and value.startswith("amq."):
        return 'names starting with "amq." are reserved by the broker'
    return error


def _error_policy(value: str) -> str | None:
    policies = ("retry", "dead-letter", "drop", "halt")
    return None if value in policies else f"must be one of {', '.join(policies)}"


def _retries(value: int) -> str | None:
    return None if 1 <= value <= 50 else "must be between 1 and 50"


def _prefetch(value: int) -> str | None:
    # basic.qos carries prefetch-count as a 16-bit number.
    return None if 0 <= value <= 65535 else "must be between 0 (the consumer's choice) and 65535"


def _deliveries(value: int) -> str | None:
    return None if 0 <= value <= 1000 else "must be between 0 (no limit) and 1000"


def _component_name(value: str) -> str | None:
    if is_valid_name(value):
        return None
    return (
        "must be 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit "
        f"(not {_quote(value)})"
    )


_HUB_OPTIONS: Final[Mapping[str, Option]] = MappingProxyType(
    {
        "topic_prefix": Option(str, "org.fedoraproject", "first words of every topic", _prefix),
        "environment": Option(str, "dev", "deployment name, the topic word after the prefix",
                              _environment),
        "state_dir": Option(str, DEFAULT_STATE_DIR, "outbox, cursors and plugin state",
                            _not_empty),
        "status": Option(str, None, "endpoint string of the HTTP status server", _not_empty,
                         endpoint=True),
        "log_level": Option(str, "info", "least important log events written", _log_level),
    }
)

_DOMAIN_OPTIONS: Final[Mapping[str, Option]] = MappingProxyType(
    {
        "broker": Option(str, REQUIRED, '"memory", or an amqp:// or amqps:// URL'),
        "exchange": Option(str, "amq.topic", "exchange messages are published to", _short_string),
        "ca": Option(str, None, "CA bundle that verifies the broker", path=True),
        "cert": Option(str, None, "client certificate (PEM)", path=True),
        "key": Option(str, None, "private key of the client certificate (PEM)", path=True),
        "server_hostname": Option(str, None, "name the broker's certificate must carry",
                                  _not_empty),
        "auth_mechanism": Option(str, None, "PLAIN or EXTERNAL", _mechanism),
        "heartbeat": Option(int, 30, "AMQP heartbeat in seconds", _heartbeat),
        "connection_name": Option(str, None, "connection name shown by the broker",
                                  _short_string),
        "connection_timeout": Option(float, 10.0, "seconds to set up a connection",
                                     _connection_timeout),
        "confirm_window": Option(int, 1000, "unconfirmed messages at most", _positive),
        "reconnect_delay": Option(float, 1.0, "seconds before the first attempt to reconnect",
                                  _reconnect_delay),
        "reconnect_max_delay": Option(float, 60.0, "longest wait between attempts to reconnect",
                                      _reconnect_delay),
        "outbox_max_messages": Option(int, 100_000, "outbox limit in messages", _positive),
        "outbox_max_bytes": Option(int, 1024 * 1024 * 1024, "outbox limit in bytes", _positive),
        "passive_declares": Option(bool, False, "only check that queues and exchanges exist"),
        "topology": Option(dict, None, "exchanges, queues and bindings declared at start"),
    }
)

_EXCHANGE_OPTIONS: Final[Mapping[str, Option]] = MappingProxyType(
    {
        "name": Option(str, REQUIRED, "exchange name", _short_string),
        "type": Option(str, "topic", "topic, direct, fanout or headers",
                       lambda v: None if v in ("topic", "direct", "fanout", "headers")
                       else "must be topic, direct, fanout or headers"),
        "durable": Option(bool, True, "survives a broker restart"),
    }
)

_QUEUE_OPTIONS: Final[Mapping[str, Option]] = MappingProxyType(
    {
        "name": Option(str, REQUIRED, "queue name", _short_string),
        "durable": Option(bool, True, "survives a broker restart"),
        "arguments": Option(dict, None, 'broker arguments, such as "x-queue-type"'),
    }
)

_BINDING_OPTIONS: Final[Mapping[str, Option]] = MappingProxyType(
    {
        "queue": Option(str, REQUIRED, "queue name", _short_string),
        "exchange": Option(str, REQUIRED, "exchange name", _short_string),
        "routing_key": Option(str, "#", "routing pattern"),
    }
)

_COMPONENT_OPTIONS: Final[Mapping[str, Option]] = MappingProxyType(
    {
        "name": Option(str, REQUIRED, "unique name", _component_name),
        "plugin": Option(str, REQUIRED, "plugin that builds it", _not_empty),
        "domain": Option(str, REQUIRED, "domain it belongs to", _not_empty),
    }
)

_CONSUMER_OPTIONS: Final[Mapping[str, Option]] = MappingProxyType(
    {
        **_COMPONENT_OPTIONS,
        "topics": Option(list, None, "topic patterns to bind"),
        "queue": Option(str, None, "queue name (default fedhub.<name>)", _queue_name),
        "concurrency": Option(int, 1, "messages handled at once", _positive),
        "prefetch": Option(int, 0, "messages held unacknowledged, at least concurrency "
                           "(0: the consumer's choice)", _prefetch),
        "on_error": Option(str, "retry", "what an exception does: retry, dead-letter, drop or halt",
                           _error_policy),
        "retry_delay": Option(float, 10.0, "seconds before the first retry", _retry_delay),
        "max_retry_delay": Option(float, 3600.0, "longest wait between retries", _retry_delay),
        "max_retries": Option(int, 5, "retries before a message is dead-lettered", _retries),
        "drain_timeout": Option(float, 30.0, "seconds stopping waits for messages in hand",
                                _positive),
        "max_deliveries": Option(int, 10, "deliveries of one message without a verdict before it "
                                 "is dead-lettered (0: no limit)", _deliveries),
        "blocking_warning": Option(float, DEFAULT_BLOCKING_WARNING, "seconds one call into the plugin may hold the "
                                   "event loop before a warning", _blocking_warning),
        "queue_arguments": Option(dict, None, 'broker arguments of its queues, such as '
                                  '"x-queue-type"'),
    }
)

_TOP_KEYS: Final = ("hub", "domains", "producers", "consumers")


# --- where keys are --------------------------------------------------------

_Path = tuple[str | int, ...]

_ESCAPES: Final = {'"': '"', "\\": "\\", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                   "t": "\t", "e": "\x1b"}


def _read_string(line: str, pos: int) -> tuple[str | None, int]:
    """
    Read a one-line TOML string starting at C{line[pos]} (a quote).

    @return: the decoded text (C{None} when unterminated) and the position
        after it.
    """
    quote = line[pos]
    i = pos + 1
    out: list[str] = []
    while i < len(line):
        char = line[i]
        if char == quote:
            return "".join(out), i + 1
        if char == "\\" and quote == '"' and i + 1 < len(line):
            code = line[i + 1]
            if code in ("u", "U"):
                width = 4 if code == "u" else 8
                try:
                    out.append(chr(int(line[i + 2 : i + 2 + width], 16)))
                except ValueError:
                    return None, len(line)
                i += 2 + width
                continue
            out.append(_ESCAPES.get(code, code))
            i += 2
            continue
        out.append(char)
        i += 1
    return None, len(line)


def _read_key(line: str, pos: int) -> tuple[list[str] | None, int]:
    """
    Read a (dotted, possibly quoted) TOML key starting at C{line[pos]}.
    """
    parts: list[str] = []
    while True:
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if pos >= len(line):
            return None, pos
        if line[pos] in "\"'":
            text, pos = _read_string(line, pos)
            if text is None:
                return None, pos
            parts.append(text)
        else:
            match = _BARE_KEY.match(line, pos)
            if match is None:
                return None, pos
            parts.append(match.group())
            pos = match.end()
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if pos < len(line) and line[pos] == ".":
            pos += 1
            continue
        return parts, pos


def _skip_value(line: str, pos: int, pending: str | None, depth: int) -> tuple[str | None, int]:
    """
    Scan (the rest of) a line of a value, following multi-line strings and
    arrays that go on to the next lines.

    @return: the multi-line string delimiter still open, if any, and the
        bracket depth at the end of the line.
    """
    i = pos
    while i < len(line):
        if pending is not None:
            end = line.find(pending, i)
            while end > 0 and pending == '"""' and _escaped(line, end):
                end = line.find(pending, end + 1)
            if end < 0:
                return pending, depth
            i = end + 3
            while i < len(line) and line[i] == pending[0]:
                i += 1
            pending = None
            continue
        char = line[i]
        if char == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            pending = line[i : i + 3]
            i += 3
            continue
        if char in "\"'":
            _, i = _read_string(line, i)
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        i += 1
    return pending, depth


def _escaped(line: str, pos: int) -> bool:
    backslashes = 0
    while pos - backslashes - 1 >= 0 and line[pos - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


#: How deep L{_LineIndex} records keys; deeper ones get the line of their
#: ancestor at this depth.
_INDEXED_DEPTH = 32

#: The most parts a dotted key (or a table name) may have; no
#: configuration needs more than a few.
MAX_KEY_PARTS = 64


class _LineIndex:
    """
    The 1-based line of each key of a TOML text, found by scanning it
    (C{tomllib} keeps no positions).  Best effort: table headers, arrays of
    tables, dotted and quoted keys, multi-line strings and arrays are
    followed; keys inside inline tables are given their table's line.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[_Path, int] = {}
        #: The most parts of a dotted key or table name, and its line.
        self.deepest = (0, 0)
        self._scan(text)

    def line_of(self, path: _Path) -> int | None:
        """
        The line of C{path}, or of its nearest ancestor that has one.
        """
        path = path[:_INDEXED_DEPTH]
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None

    def _record(self, path: _Path, line: int, start: int = 1) -> None:
        # Each prefix is a tuple of its own: past the depth any configuration
        # has, a long dotted key would cost memory in the square of its parts.
        for end in range(start, min(len(path), _INDEXED_DEPTH) + 1):
            self._lines.setdefault(path[:end], line)

    def _scan(self, text: str) -> None:
        counts: dict[tuple[str, ...], int] = {}
        table: _Path = ()
        pending: str | None = None
        depth = 0
        for number, line in enumerate(text.splitlines(), 1):
            if pending is not None or depth > 0:
                pending, depth = _skip_value(line, 0, pending, depth)
                continue
            i = len(line) - len(line.lstrip(" \t"))
            if i >= len(line) or line[i] == "#":
                continue
            if line[i] == "[":
                array = line.startswith("[[", i)
                keys, _ = _read_key(line, i + (2 if array else 1))
                if keys is None:
                    continue
                if len(keys) > self.deepest[0]:
                    self.deepest = (len(keys), number)
                raw = tuple(keys[:_INDEXED_DEPTH])
                if array:
                    counts[raw] = counts.get(raw, 0) + 1
                table = self._resolve(raw, counts)
                self._record(table, number)
                continue
            keys, j = _read_key(line, i)
            if keys is None or j >= len(line) or line[j] != "=":
                continue
            if len(keys) > self.deepest[0]:
                self.deepest = (len(keys), number)
            self._record(table + tuple(keys), number, len(table) + 1)
            pending, depth = _skip_value(line, j + 1, None, 0)

    @staticmethod
    def _resolve(raw: tuple[str, ...], counts: Mapping[tuple[str, ...], int]) -> _Path:
        resolved: list[str | int] = []
        for end in range(1, len(raw) + 1):
            resolved.append(raw[end - 1])
            if raw[:end] in counts:
                resolved.append(counts[raw[:end]] - 1)
        return tuple(resolved)


# --- validation ------------------------------------------------------------

_TYPE_NAMES: Final[Mapping[type, str]] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "an array",
    dict: "a table",
    datetime: "a date-time",
    date: "a date",
    time: "a time",
}


def _describe(value: object) -> str:
    for kind, name in _TYPE_NAMES.items():
        if _is_a(value, kind):
            return name
    return type(value).__name__


def _is_a(value: object, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, float)
    if kind is date:
        return isinstance(value, date) and not isinstance(value, datetime)
    return isinstance(value, kind)


def _types(option: Option) -> tuple[type, ...]:
    return option.type if isinstance(option.type, tuple) else (option.type,)


def _expected(kinds: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def _coerce(value: object, kinds: tuple[type, ...]) -> tuple[object, bool]:
    """
    C{value} as one of C{kinds} (an integer becomes a float where only a
    float is wanted), and whether it fits.
    """
    if any(_is_a(value, kind) for kind in kinds):
        return value, True
    if float in kinds and _is_a(value, int):
        return float(value), True  # type: ignore[arg-type]
    return value, False


def _not_finite(value: object) -> bool:
    """
    Whether C{value} is a float that is infinite or not a number.
    """
    return isinstance(value, float) and not math.isfinite(value)


class _Validator:
    """
    One run of validation over one parsed file; collects problems.
    """

    def __init__(
        self,
        text: str,
        find_plugin: PluginLookup,
        base_dir: str | None,
        index: _LineIndex | None = None,
    ) -> None:
        self._index = index if index is not None else _LineIndex(text)
        self._find_plugin = find_plugin
        self._base_dir = base_dir
        self._problems: list[ConfigProblem] = []

    @property
    def problems(self) -> list[ConfigProblem]:
        """
        Every problem found, in file order (those without a line last).
        """
        order = sorted(
            enumerate(self._problems),
            key=lambda item: (item[1].line is None, item[1].line or 0, item[0]),
        )
        return [problem for _, problem in order]

    def report(self, path: _Path, message: str) -> None:
        """
        Record one problem at C{path}.
        """
        self._problems.append(
            ConfigProblem(format_path(path), escape_text(message), self._index.line_of(path))
        )

    def resolve(self, path: str) -> str:
        """
        A path from the file, relative ones taken from the file's directory.
        """
        if self._base_dir is not None and not os.path.isabs(path):
            return os.path.join(self._base_dir, path)
        return path

    # generic tables

    def table(self, value: object, path: _Path) -> Mapping[str, Any] | None:
        """
        C{value} when it is a table; otherwise report it and return C{None}.
        """
        if isinstance(value, dict):
            return value
        self.report(path, f"expected a table, not {_describe(value)}")
        return None

    def unknown_keys(
        self, table: Mapping[str, Any], path: _Path, known: Collection[str], what: str = ""
    ) -> None:
        """
        Report each key of C{table} that is not in C{known}.
        """
        for key in table:
            if key in known:
                continue
            message = f"unknown key{what}"
            close = difflib.get_close_matches(key, sorted(known), n=1)
            if close:
                message += f" (did you mean {_quote(close[0])}?)"
            self.report(path + (key,), message)

    def values(
        self, table: Mapping[str, Any], path: _Path, schema: Mapping[str, Option]
    ) -> tuple[dict[str, Any], bool]:
        """
        Check the keys of C{schema} in C{table}; unknown keys are left to
        L{unknown_keys}.

        @return: the valid values with defaults applied, and whether every
            key was valid.
        """
        result: dict[str, Any] = {}
        ok = True
        for key, option in schema.items():
            if key not in table:
                if option.required:
                    self.report(path + (key,), "required key is missing")
                    ok = False
                else:
                    result[key] = copy.deepcopy(option.default)
                continue
            value = self.value(table[key], path + (key,), option)
            if value is REQUIRED:
                ok = False
            else:
                result[key] = value
        return result, ok

    def value(self, value: object, path: _Path, option: Option) -> Any:
        """
        Check one value against its option.

        @return: the value (converted, paths resolved), or L{REQUIRED} when it
            is not valid.
        """
        kinds = _types(option)
        value, fits = _coerce(value, kinds)
        if not fits:
            self.report(path, f"expected {_expected(kinds)}, not {_describe(value)}")
            return REQUIRED
        if _not_finite(value):
            # TOML spells inf and nan, and turns a number too large for a
            # float into inf: as seconds or limits they would only fail (or
            # wait forever) once the hub runs.
            self.report(path, f"must be a finite number, not {value}")
            return REQUIRED
        if option.items is not None and isinstance(value, list):
            items = []
            all_fit = True
            for position, item in enumerate(value):
                item, fits = _coerce(item, (option.items,))
                if not fits:
                    self.report(
                        path + (position,),
                        f"expected {_expected((option.items,))}, not {_describe(item)}",
                    )
                    all_fit = False
                elif _not_finite(item):
                    self.report(path + (position,), f"must be a finite number, not {item}")
                    all_fit = False
                items.append(item)
            if not all_fit:
                return REQUIRED
            value = items
        if option.path and isinstance(value, str):
            value = self.resolve(value)
            error = _unreadable(value)
            if error is not None:
                self.report(path, error)
                return REQUIRED
        if option.endpoint and isinstance(value, str):
            value = resolve_endpoint_paths(value, self._base_dir)
        if option.directory and isinstance(value, str) and value:
            value = self.resolve(value)
            error = _unwritable_directory(value)
            if error is not None:
                self.report(path, error)
                return REQUIRED
        if option.check is not None:
            try:
                error = option.check(value)
            except Exception as e:
                error = f"could not be checked: {type(e).__name__}: {e}"
            if error is not None:
                self.report(path, str(error))
                return REQUIRED
        return value

    # sections

    def hub(self, data: Mapping[str, Any]) -> HubSettings | None:
        """
        The C{[hub]} table.
        """
        table = self.table(data.get("hub", {}), ("hub",))
        if table is None:
            return None
        values, ok = self.values(table, ("hub",), _HUB_OPTIONS)
        self.unknown_keys(table, ("hub",), _HUB_OPTIONS)
        if "status" in values and values["status"] is not None:
            error = server_endpoint_problem(values["status"])
            if error is not None:
                self.report(("hub", "status"), error)
                ok = False
        if ok:
            values["state_dir"] = self.resolve(values["state_dir"])
            return HubSettings(**values)
        return None

    def domains(self, data: Mapping[str, Any]) -> tuple[dict[str, DomainConfig], set[str]]:
        """
        The C{[domains.*]} tables.

        @return: the valid domains, and the names of every domain the file
            defines (valid or not), so that references are only reported
            when they name none.
        """
        if "domains" not in data:
            self.report(("domains",), "at least one domain is required, such as "
                        '[domains.default] with broker = "memory"')
            return {}, set()
        table = self.table(data["domains"], ("domains",))
        if table is None:
            return {}, set()
        if not table:
            self.report(("domains",), "at least one domain is required")
        domains: dict[str, DomainConfig] = {}
        for name, value in table.items():
            domain = self.domain(name, value, ("domains", name))
            if domain is not None:
                domains[name] = domain
        return domains, set(table)

    def domain(self, name: str, value: object, path: _Path) -> DomainConfig | None:
        """
        One C{[domains.<name>]} table.
        """
        table = self.table(value, path)
        if table is None:
            return None
        ok = True
        if not is_valid_name(name):
            self.report(path, "domain names may use only letters, digits, '.', '_' and '-', "
                        "starting with a letter or digit")
            ok = False
        values, valid = self.values(table, path, _DOMAIN_OPTIONS)
        ok = ok and valid
        self.unknown_keys(table, path, _DOMAIN_OPTIONS)
        scheme = None
        if "broker" in values:
            scheme = self.broker(values["broker"], path + ("broker",))
            ok = ok and scheme is not None
        if scheme == "amqps" and "ca" not in table:
            self.report(path + ("ca",), "required with an amqps broker: without a CA the "
                        "broker's certificate is not verified, and fedhub refuses to connect "
                        "unverified")
            ok = False
        elif scheme is not None and scheme != "amqps":
            for key in ("ca", "cert", "key", "server_hostname"):
                if key in table:
                    self.report(path + (key,), "only used with an amqps broker")
                    ok = False
        if "cert" in table and "key" not in table:
            self.report(path + ("key",), 'required when "cert" is set')
            ok = False
        if "key" in table and "cert" not in table:
            self.report(path + ("cert",), 'required when "key" is set')
            ok = False
        if values.get("auth_mechanism") == "EXTERNAL" and "cert" not in table:
            self.report(path + ("auth_mechanism",), 'EXTERNAL needs a client certificate '
                        '("cert" and "key")')
            ok = False
        if scheme == MEMORY_BROKER and "auth_mechanism" in table:
            self.report(path + ("auth_mechanism",), "not used with the memory broker")
            ok = False
        delay, longest = values.get("reconnect_delay"), values.get("reconnect_max_delay")
        if delay is not None and longest is not None and delay > longest:
            if "reconnect_max_delay" in table:
                self.report(path + ("reconnect_max_delay",),
                            f"must be at least reconnect_delay ({delay:g})")
            else:
                self.report(path + ("reconnect_delay",),
                            f"must be at most reconnect_max_delay ({longest:g}, its default)")
            ok = False
        topology = self.topology(values.pop("topology", None), path + ("topology",))
        if topology is None:
            ok = False
        else:
            values["topology"] = topology
        return DomainConfig(name=name, **values) if ok else None

    def arguments(self, value: object, path: _Path) -> dict[str, Any]:
        """
        Broker arguments of a queue: names starting with C{x-}, scalar values.
        """
        if value is None:
            return {}
        result: dict[str, Any] = {}
        for key, item in cast(Mapping[str, Any], value).items():
            if not key.startswith("x-"):
                self.report(path + (key,), 'broker arguments start with "x-"')
            elif isinstance(item, (dict, list)):
                self.report(path + (key,), f"expected a string, number or boolean, not {_describe(item)}")
            else:
                result[key] = item
        return result

    def topology(self, value: object, path: _Path) -> Topology | None:
        """
        A domain's C{topology} table: arrays of C{exchanges}, C{queues} and
        C{bindings} tables.
        """
        if value is None:
            return Topology()
        table = cast(Mapping[str, Any], value)
        kinds = {"exchanges": _EXCHANGE_OPTIONS, "queues": _QUEUE_OPTIONS, "bindings": _BINDING_OPTIONS}
        self.unknown_keys(table, path, kinds)
        ok = True
        built: dict[str, list[Any]] = {kind: [] for kind in kinds}
        for kind, schema in kinds.items():
            entries = table.get(kind, [])
            if not isinstance(entries, list):
                self.report(path + (kind,), f"expected an array of tables, not {_describe(entries)}")
                ok = False
                continue
            for index, entry in enumerate(entries):
                where = path + (kind, index)
                entry_table = self.table(entry, where)
                if entry_table is None:
                    ok = False
                    continue
                values, valid = self.values(entry_table, where, schema)
                self.unknown_keys(entry_table, where, schema)
                if not valid:
                    ok = False
                    continue
                if kind == "exchanges":
                    built[kind].append(ExchangeSpec(values["name"], values["type"], values["durable"]))
                elif kind == "queues":
                    arguments = self.arguments(values.get("arguments"), where + ("arguments",))
                    built[kind].append(QueueSpec(values["name"], values["durable"], arguments=arguments))
                else:
                    error = check_topic_pattern(values["routing_key"]) if values["routing_key"] else None
                    if error is not None:
                        self.report(where + ("routing_key",), error)
                        ok = False
                        continue
                    built[kind].append(
                        BindingSpec(values["queue"], values["exchange"], values["routing_key"])
                    )
        if not ok:
            return None
        return Topology(tuple(built["exchanges"]), tuple(built["queues"]), tuple(built["bindings"]))

    def broker(self, url: str, path: _Path) -> str | None:
        """
        Check a broker URL.

        @return: its scheme (C{memory}, C{amqp} or C{amqps}), or C{None} when
            it is not valid.
        """
        if url == MEMORY_BROKER:
            return MEMORY_BROKER
        shown = _quote(redact_url(url))
        if "://" not in url:
            self.report(path, f'{shown} is not a broker: use "memory", amqp://... or amqps://...')
            return None
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            self.report(path, f"{shown} is not a valid URL (is its port a number?)")
            return None
        scheme = parts.scheme.lower()
        if scheme not in BROKER_SCHEMES:
            self.report(path, f"unsupported scheme {_quote(scheme)} in {shown}: "
                        'use "memory", amqp:// or amqps://')
            return None
        ok = True
        if not parts.hostname:
            self.report(path, f"{shown} names no host")
            ok = False
        if port == 0:
            self.report(path, f"{shown} has port 0")
            ok = False
        if parts.query or parts.fragment:
            self.report(path, f"{shown}: query parameters are not supported; "
                        "use the domain's keys (heartbeat, connection_name, ...)")
            ok = False
        if "/" in parts.path[1:]:
            self.report(path, f"{shown}: the virtual host must be one path segment; "
                        "write a slash in it as %2F")
            ok = False
        return scheme if ok else None

    def components(
        self,
        data: Mapping[str, Any],
        domains: Collection[str],
    ) -> tuple[list[ComponentConfig], list[ComponentConfig], bool]:
        """
        The C{[[producers]]} and C{[[consumers]]} tables.
        """
        built: dict[str, list[ComponentConfig]] = {"producer": [], "consumer": []}
        names: dict[str, _Path] = {}
        queues: dict[tuple[str, str], _Path] = {}
        ok = True
        for kind in ("producer", "consumer"):
            key = f"{kind}s"
            if key not in data:
                continue
            tables = data[key]
            if not isinstance(tables, list):
                self.report((key,), f"expected an array of tables ([[{key}]]), "
                            f"not {_describe(tables)}")
                ok = False
                continue
            for index, value in enumerate(tables):
                path: _Path = (key, index)
                component = self.component(kind, index, value, path, domains)
                if component is None:
                    ok = False
                if not isinstance(value, dict):
                    continue
                # Names and queues are compared even when the rest of the
                # table is wrong, so that every clash is reported at once.
                name = value.get("name")
                if isinstance(name, str):
                    if name in names:
                        self.report(path + ("name",), f"duplicate name {_quote(name)} "
                                    f"(also {format_path(names[name])})")
                        ok = False
                        continue
                    names[name] = path
                domain = value.get("domain")
                queue = value.get("queue", f"fedhub.{name}" if isinstance(name, str) else None)
                if kind == "consumer" and isinstance(domain, str) and isinstance(queue, str):
                    if (domain, queue) in queues:
                        self.report(path + ("queue",), f"queue {_quote(queue)} is already "
                                    f"used by {format_path(queues[domain, queue])} in domain "
                                    f"{_quote(domain)}")
                        ok = False
                        continue
                    queues[domain, queue] = path
                if component is not None:
                    built[kind].append(component)
        # A consumer's queue may not be one of another's own queues either:
        # its dead-letter queue (<queue>.dead) or a retry queue
        # (<queue>.retry.N), declared with other arguments (the broker would
        # refuse one of the two declarations).
        for (domain, queue), path in queues.items():
            match = _DERIVED_QUEUE.fullmatch(queue)
            if match is not None and (domain, match.group(1)) in queues:
                owner = format_path(queues[domain, match.group(1)])
                self.report(path + ("queue",), f"queue {_quote(queue)} is a queue of {owner} "
                            f"(its {'dead letters' if match.group(2) else 'retries'}) in domain "
                            f"{_quote(domain)}")
                ok = False
        return built["producer"], built["consumer"], ok

    def consumers_own_topology(
        self, domains: Mapping[str, DomainConfig], consumers: Sequence[ComponentConfig]
    ) -> bool:
        """
        Whether no domain's C{topology} declares a queue or an exchange of a
        consumer's own (see L{fedhub.consumers.runner}) otherwise than the
        hub declares it: the broker would refuse one of the two declarations
        when the hub starts (406).  Declaring one the same way (a consumer's
        dead-letter exchange, say, to bind a queue of the topology to it) is
        fine, and so are bindings to a consumer's queue.  A queue's
        C{x-queue-type} C{"classic"} and no C{x-queue-type} are the same
        way, as they are to the broker (L{_queue_arguments_key}).
        """
        from fedhub.consumers.runner import consumer_queues, consumer_topology

        ok = True
        for name, domain in domains.items():
            queues: dict[str, tuple[str, QueueSpec]] = {}
            exchanges: dict[str, tuple[str, ExchangeSpec]] = {}
            for consumer in consumers:
                if consumer.domain != name:
                    continue
                own = consumer_topology(consumer)
                queue, dead, back = consumer_queues(consumer)
                roles = {queue: "the queue", dead: "the dead-letter queue"}
                for spec in own.queues:
                    role = roles.get(spec.name) or f"retry queue {spec.name.rpartition('.')[2]}"
                    queues[spec.name] = (f"{role} of {consumer.path}", spec)
                roles = {dead: "the dead-letter exchange", back: "the return exchange"}
                for ex in own.exchanges:
                    role = roles.get(ex.name) or f"retry exchange {ex.name.rpartition('.')[2]}"
                    exchanges[ex.name] = (f"{role} of {consumer.path}", ex)
            for index, declared in enumerate(domain.topology.queues):
                if declared.name not in queues:
                    continue
                role, spec = queues[declared.name]
                shown = json.dumps(dict(spec.arguments), sort_keys=True)
                if (declared.durable, _queue_arguments_key(declared.arguments)) != (
                    spec.durable, _queue_arguments_key(spec.arguments)
                ):
                    self.report(
                        ("domains", name, "topology", "queues", index, "name"),
                        f"queue {_quote(declared.name)} is {role}, which the hub declares "
                        f"itself, durable, with the arguments {shown}; declare it the same "
                        "way or leave it out (its arguments come from the consumer's "
                        "queue_arguments)",
                    )
                    ok = False
            for index, declared_exchange in enumerate(domain.topology.exchanges):
                if declared_exchange.name not in exchanges:
                    continue
                role, ex = exchanges[declared_exchange.name]
                if (declared_exchange.type, declared_exchange.durable) != (ex.type, ex.durable):
                    self.report(
                        ("domains", name, "topology", "exchanges", index, "name"),
                        f"exchange {_quote(declared_exchange.name)} is {role}, which the hub "
                        f"declares itself as a durable {ex.type} exchange; declare it the "
                        "same way or leave it out",
                    )
                    ok = False
        return ok

    def component(
        self, kind: str, index: int, value: object, path: _Path, domains: Collection[str]
    ) -> ComponentConfig | None:
        """
        One producer or consumer table.
        """
        table = self.table(value, path)
        if table is None:
            return None
        schema = _CONSUMER_OPTIONS if kind == "consumer" else _COMPONENT_OPTIONS
        values, ok = self.values(table, path, schema)
        if "domain" in values and values["domain"] not in domains:
            self.report(path + ("domain",), f"unknown domain {_quote(values['domain'])}")
            ok = False
        topics = values.get("topics")
        raw_topics = table.get("topics")
        if isinstance(raw_topics, list):
            if not raw_topics:
                self.report(path + ("topics",), "must name at least one topic pattern")
                ok = False
            for position, pattern in enumerate(raw_topics):
                if isinstance(pattern, str):
                    error = check_topic_pattern(pattern)
                else:
                    error = f"expected a string, not {_describe(pattern)}"
                if error is not None:
                    self.report(path + ("topics", position), error)
                    ok = False
        plugin = None
        if "plugin" in values:
            plugin = self.plugin(kind, values["plugin"], path + ("plugin",))
        rest = {key: item for key, item in table.items() if key not in schema}
        options: dict[str, Any] = {}
        if plugin is None:
            ok = False
        else:
            plugin_schema = self.plugin_schema(plugin, values["plugin"], path + ("plugin",))
            if plugin_schema is None:
                ok = False
            else:
                options, valid = self.values(rest, path, plugin_schema)
                ok = ok and valid
                self.unknown_keys(rest, path, [*schema, *plugin_schema],
                                  f" for plugin {_quote(values['plugin'])}")
                ok = self.plugin_keys_together(plugin, options, path, valid) and ok
        prefetch = values.get("prefetch")
        if prefetch and isinstance(values.get("concurrency"), int) and prefetch < values["concurrency"]:
            self.report(path + ("prefetch",), f"must be 0 or at least concurrency "
                        f"({values['concurrency']}): a consumer handles only messages it holds")
            ok = False
        if not ok:
            return None
        extra: dict[str, Any] = {}
        if kind == "consumer":
            extra = {
                "topics": tuple(topics or ()),
                "queue": values["queue"] or f"fedhub.{values['name']}",
                "concurrency": values["concurrency"],
                "prefetch": values["prefetch"],
                "on_error": values["on_error"],
                "retry_delay": float(values["retry_delay"]),
                "max_retry_delay": float(values["max_retry_delay"]),
                "max_retries": values["max_retries"],
                "drain_timeout": float(values["drain_timeout"]),
                "max_deliveries": values["max_deliveries"],
                "blocking_warning": float(values["blocking_warning"]),
                "queue_arguments": MappingProxyType(
                    self.arguments(values.get("queue_arguments"), path + ("queue_arguments",))
                ),
            }
        return ComponentConfig(
            kind=kind,
            index=index,
            name=values["name"],
            plugin=values["plugin"],
            domain=values["domain"],
            options=MappingProxyType(options),
            **extra,
        )

    def plugin(self, kind: str, name: str, path: _Path) -> Any:
        """
        Look up a plugin, reporting an unknown one with the installed names.
        """
        try:
            return self._find_plugin(kind, name)
        except UnknownPlugin as e:
            installed = ", ".join(_quote(known) for known in e.known) or NO_PLUGINS
            self.report(
                path,
                f"unknown {kind} plugin {_quote(name)} (installed: {installed})"
                + broken_note(getattr(e, "broken", ())),
            )
            return None

    def plugin_keys_together(
        self, plugin: Any, options: Mapping[str, Any], path: _Path, valid: bool
    ) -> bool:
        """
        Ask a plugin with an optional C{check_options(options)} about its
        keys taken together (one of two needed, say): it returns C{(key,
        what is wrong)} pairs, reported at the key like any other problem.
        It is asked even when some keys were refused (C{valid} false), so
        its problems come with the others; an error it raises then is taken
        for a consequence of those.  Whether it found nothing.
        """
        check = getattr(plugin, "check_options", None)
        if check is None:
            return True
        try:
            found = list(check(MappingProxyType(options)))
        except Exception as e:
            if not valid:
                return False
            self.report(path, f"plugin {_quote(str(getattr(plugin, 'name', '?')))} could not check "
                              f"its keys: {type(e).__name__}: {e}")
            return False
        for key, message in found:
            self.report(path + (str(key),), str(message))
        return not found

    def plugin_schema(self, plugin: Any, name: str, path: _Path) -> Mapping[str, Option] | None:
        """
        The options a plugin declares, when they are well-formed.
        """
        schema = getattr(plugin, "options", {})
        if not isinstance(schema, Mapping):
            self.report(path, f"plugin {_quote(name)} is broken: its options are not a mapping")
            return None
        for key, option in schema.items():
            if not isinstance(key, str) or not isinstance(option, Option):
                self.report(path, f"plugin {_quote(name)} is broken: its option "
                            f"{_quote(str(key))} is not a fedhub.config.Option")
                return None
            if key in _CONSUMER_OPTIONS:
                self.report(path, f"plugin {_quote(name)} is broken: its option "
                            f"{_quote(key)} has the name of one of fedhub's own keys")
                return None
        return schema


def _unreadable(path: str) -> str | None:
    """
    Why the file at C{path} can not be read, or C{None} when it can.
    """
    if not os.access(path, os.R_OK):
        try:
            os.stat(path)
        except OSError as e:
            return f"can not read {_quote(path)}: {e.strerror}"
        return f"can not read {_quote(path)}: permission denied"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"can not read {_quote(path)}: {e.strerror}"
    return None


def _unwritable_directory(path: str) -> str | None:
    """
    Why no directory can be written at C{path} (it, or the nearest parent
    that exists, is no directory or can not be written), or C{None}.
    """
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        if existing == os.path.abspath(path):
            return f"{_quote(path)} is not a directory"
        return f"can not create {_quote(path)}: {_quote(existing)} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"can not write in {_quote(existing)}: permission denied"
    return None


#: The parameters of server endpoint strings that name files, by endpoint
#: type; C{None} stands for the first positional argument (a C{unix:}
#: socket's path).
_ENDPOINT_PATHS: Final[Mapping[str, frozenset[str | None]]] = MappingProxyType({
    "unix": frozenset({None, "address"}),
    "ssl": frozenset({"privateKey", "certKey", "extraCertChain", "caCertsDir", "dhParameters"}),
})
_ENDPOINT_ESCAPE = re.compile(r"([:=\\])")


def _endpoint_split(text: str, separator: str, most: int = -1) -> list[str]:
    """
    C{text} split at every C{separator} not escaped by a backslash (at the
    first C{most} when not -1), as Twisted splits endpoint strings, the
    escapes left in.
    """
    parts: list[str] = []
    start = index = 0
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == separator and most != len(parts):
            parts.append(text[start:index])
            start = index + 1
        index += 1
    parts.append(text[start:])
    return parts


def _endpoint_unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)


def resolve_endpoint_paths(description: str, base_dir: str | None) -> str:
    """
    C{description}, a server endpoint string, with its relative file paths
    (a C{unix:} socket's, C{ssl:}'s C{privateKey}, C{certKey},
    C{extraCertChain}, C{caCertsDir} and C{dhParameters}) made relative to
    C{base_dir}, as every other path of a configuration file is; Twisted
    would otherwise take them from the working directory of whatever process
    reads them.  Anything else, and every string when C{base_dir} is
    C{None}, is returned as it is.
    """
    if base_dir is None:
        return description
    parts = _endpoint_split(description, ":")
    keys = _ENDPOINT_PATHS.get(_endpoint_unescape(parts[0]))
    if keys is None:
        return description
    out = [parts[0]]
    positional = 0
    for part in parts[1:]:
        key, value, named = part, part, False
        pair = _endpoint_split(part, "=", 1)
        if len(pair) == 2:
            (key, value), named = pair, True
        else:
            positional += 1
        name = _endpoint_unescape(key) if named else (None if positional == 1 else "")
        path = _endpoint_unescape(value)
        if name in keys and path and not os.path.isabs(path):
            value = _ENDPOINT_ESCAPE.sub(r"\\\1", os.path.join(base_dir, path))
            part = f"{key}={value}" if named else value
        out.append(part)
    return ":".join(out)


def server_endpoint_problem(description: str) -> str | None:
    """
    Why C{description} is not a server endpoint string, or C{None}: the
    check of every key that names an endpoint to listen on (plugins' too).
    """
    from twisted.internet.endpoints import serverFromString

    try:
        # Parsing needs no reactor; endpoints only keep it for later.
        endpoint = serverFromString(cast(Any, None), description)  # type: ignore[no-untyped-call]
    except Exception as e:
        return f"not a valid endpoint string ({type(e).__name__}: {e})"
    # Parsing takes any integer as a TCP port; an impossible one would only
    # fail when the hub binds it, after the check said the file was fine.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"not a valid endpoint string (port {port} is not within 0..65535)"
    return None


def _default_lookup() -> PluginLookup:
    """
    A lookup of installed plugins (see L{fedhub.plugins}) that discovers them
    once per call of L{parse_config}.
    """
    from fedhub import plugins

    found: dict[str, Mapping[str, Any]] = {}

    def lookup(kind: str, name: str) -> Any:
        if kind not in found:
            found[kind] = plugins.plugins_of_kind(kind)
        installed = found[kind]
        if name not in installed:
            raise UnknownPlugin(kind, name, list(installed), plugins.broken_modules())
        return installed[name]

    return lookup


# --- entry points ----------------------------------------------------------


def check_options(
    schema: Mapping[str, Option], table: Mapping[str, Any], path: str = "options",
    plugin: Any = None,
) -> Mapping[str, Any]:
    """
    Check a plugin's own keys outside a configuration file (for example in
    a plugin's tests) exactly as a configuration would check them.

    @param schema: The plugin's C{options}.
    @param table: The keys to check.
    @param path: The key path problems are reported under.
    @param plugin: The plugin, when its C{check_options} (keys taken
        together) is to be asked as well, as a configuration asks it.
    @return: The values with defaults applied (read-only).
    @raise ConfigError: naming every problem.
    """
    validator = _Validator("", _default_lookup(), None)
    values, ok = validator.values(dict(table), (path,), schema)
    validator.unknown_keys(table, (path,), list(schema))
    if plugin is not None:
        ok = validator.plugin_keys_together(plugin, values, (path,), ok) and ok
    if validator.problems or not ok:
        raise ConfigError(validator.problems or [ConfigProblem(path, "invalid options")])
    return MappingProxyType(values)


def check_plugin(plugin: Any, path: str = "plugin") -> Mapping[str, Option]:
    """
    Check a plugin's declaration of its own keys (its C{options}) as a
    configuration naming it would: outside a configuration file, for
    example in a plugin's tests.

    @param plugin: The plugin.
    @param path: The key path problems are reported under.
    @return: Its C{options}.
    @raise ConfigError: when a configuration naming it would be refused.
    """
    validator = _Validator("", _default_lookup(), None)
    schema = validator.plugin_schema(plugin, str(getattr(plugin, "name", "?")), (path,))
    if schema is None:
        raise ConfigError(validator.problems)
    return schema


def parse_config(
    text: str,
    source: str | None = None,
    *,
    find_plugin: PluginLookup | None = None,
    base_dir: str | None = None,
) -> Config:
    """
    Parse and validate a configuration.

    @param text: The TOML text.
    @param source: Where it came from, for messages.
    @param find_plugin: How to find plugins: called with C{(kind, name)},
        returns the plugin or raises L{UnknownPlugin}.  The default looks
        among the installed ones (L{fedhub.plugins}).
    @param base_dir: The directory relative paths in the file are relative
        to; when C{None} they are left as written (relative to the working
        directory).
    @raise ConfigError: listing every problem found, in file order.
    """
    shown_source = escape_text(source) if source is not None else None
    index = _LineIndex(text)
    if index.deepest[0] > MAX_KEY_PARTS:
        # tomllib takes memory in the square of a dotted key's parts: a
        # 30 KB key of 15,000 parts takes about 1 GB.
        parts, line = index.deepest
        raise ConfigError(
            [ConfigProblem("toml", f"a key of {parts} dotted parts (line {line}); "
                                   f"at most {MAX_KEY_PARTS} are allowed")],
            shown_source,
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_problem(str(e))], shown_source) from None
    except RecursionError:
        raise ConfigError([ConfigProblem("toml", "values are nested too deeply")],
                          shown_source) from None
    validator = _Validator(text, find_plugin or _default_lookup(), base_dir, index)
    validator.unknown_keys(data, (), _TOP_KEYS)
    hub = validator.hub(data)
    domains, domain_names = validator.domains(data)
    producers, consumers, components_ok = validator.components(data, domain_names)
    if not validator.consumers_own_topology(domains, consumers):
        components_ok = False
    problems = validator.problems
    if problems or hub is None or not components_ok:
        error = ConfigError(problems, shown_source)
        if hub is not None:
            error.partial = Config(
                hub=hub,
                domains=MappingProxyType(domains),
                producers=tuple(producers),
                consumers=tuple(consumers),
                source=source,
            )
            error.defined_domains = frozenset(domain_names)
        raise error
    return Config(
        hub=hub,
        domains=MappingProxyType(domains),
        producers=tuple(producers),
        consumers=tuple(consumers),
        source=source,
    )


#: One part of a key path as problems name it: a bare key, a quoted one,
#: or an array index.
_PATH_PART = re.compile(r'([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|\[(\d+)\]')


def _split_path(path: str) -> _Path | None:
    """
    The parts of a key path as L{format_path} writes it
    (C{consumers[2].domain}), or C{None} when it is not one.
    """
    parts: list[str | int] = []
    pos = 0
    while pos < len(path):
        if parts and path[pos] == ".":
            pos += 1
        match = _PATH_PART.match(path, pos)
        if match is None:
            return None
        key, quoted, index = match.groups()
        if index is not None:
            parts.append(int(index))
        elif quoted is not None:
            parts.append(quoted.replace('\\"', '"').replace("\\\\", "\\"))
        else:
            parts.append(key)
        pos = match.end()
    return tuple(parts)


def locate_problems_in(path: str, problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """
    C{problems} located in the configuration file at C{path} (see
    L{locate_problems}); as they are when it can not be read as text.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return locate_problems(f.read(), problems)
    except (OSError, UnicodeDecodeError):
        return problems


def locate_problems(text: str, problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """
    C{problems} with the line of their key path in C{text} filled in where
    they have none (problems a plugin reports when it is built, say).
    """
    index = _LineIndex(text)
    located = []
    for problem in problems:
        if problem.line is None:
            parts = _split_path(problem.path)
            line = index.line_of(parts) if parts else None
            if line is not None:
                problem = replace(problem, line=line)
        located.append(problem)
    return located


def _syntax_problem(message: str) -> ConfigProblem:
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match is None:
        return ConfigProblem("toml", escape_text(f"invalid TOML: {message}"))
    text = message[: match.start()]
    return ConfigProblem(
        "toml",
        escape_text(f"invalid TOML: {text} (column {match.group(2)})"),
        int(match.group(1)),
    )


def exposed_password(config: Config) -> str | None:
    """
    A warning when the configuration file holds a broker password and every
    user of the machine can read it; C{None} otherwise (a file readable by
    its group, as C{root:fedhub} mode C{0640}, is left alone).
    """
    if config.source is None or not any(d.password for d in config.domains.values()):
        return None
    try:
        mode = os.stat(config.source).st_mode
    except OSError:
        return None
    if not mode & 0o004:
        return None
    return (
        f"{escape_text(config.source)} holds a broker password and every user can read it "
        f"(mode {mode & 0o7777:04o}): chmod o-r it, or keep the password out of it "
        "(a client certificate and EXTERNAL login)"
    )


def load_config(path: str, *, find_plugin: PluginLookup | None = None) -> Config:
    """
    Read a configuration file and validate it (see L{parse_config}).
    Relative paths in it are relative to the file's directory.

    @raise ConfigError: when the file can not be read, is not UTF-8, or is
        not a valid configuration.
    """
    shown = escape_text(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigUnreadable([ConfigProblem("file", f"can not read it: {e.strerror}")],
                               shown) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigUnreadable([ConfigProblem("file", f"larger than {MAX_FILE_BYTES} bytes")], shown)
    if data.startswith(codecs.BOM_UTF8):
        # Some editors start a UTF-8 file with a byte order mark, which
        # TOML parsers refuse as a stray character.
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigUnreadable(
            [ConfigProblem("file", f"not valid UTF-8 (byte {e.start}: {e.reason})", line)], shown
        ) from None
    base_dir = os.path.dirname(os.path.abspath(path))
    return parse_config(text, path, find_plugin=find_plugin, base_dir=base_dir)


#: The configuration used when none is given: an in-process bus and a
#: consumer that logs every message.
DEFAULT_CONFIG_TEXT: Final = """\
[hub]
status = "tcp:8070:interface=127.0.0.1"

[domains.default]
broker = "memory"

[[producers]]
name = "bugzilla-mail"
plugin = "bugzilla-smtp"
domain = "default"
listen = "tcp:8025:interface=127.0.0.1"
recipients = ["bugzilla@localhost"]

[[consumers]]
name = "log"
plugin = "log"
domain = "default"
topics = ["#"]
"""


def default_state_dir() -> str:
    """
    The state directory of the built-in default: C{fedhub-<uid>} in the
    system's temporary directory, so users on one machine do not collide.
    """
    user = str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return os.path.join(tempfile.gettempdir(), f"fedhub-{user}")


def default_config(*, find_plugin: PluginLookup | None = None) -> Config:
    """
    The built-in configuration: one in-process domain C{default}, an SMTP
    listener for Bugzilla mail to C{bugzilla@localhost} on
    C{127.0.0.1:8025}, one consumer C{log} that logs every message, and the
    status page on C{127.0.0.1:8070}; state in a per-user temporary
    directory (L{default_state_dir}).

    @raise ConfigError: when the C{log} plugin is not installed.
    """
    config = parse_config(DEFAULT_CONFIG_TEXT, "<built-in default>", find_plugin=find_plugin)
    return replace(config, hub=replace(config.hub, state_dir=default_state_dir()))
