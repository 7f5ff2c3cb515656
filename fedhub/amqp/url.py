"""
Broker addresses: C{amqp://} and C{amqps://} URLs turned into connection settings.

The URL follows RabbitMQ's URI scheme::

    amqp[s]://[user[:password]@]host[:port][/vhost][?key=value&...]

  - the port defaults to 5672 (C{amqp}) or 5671 (C{amqps});
  - the vhost is percent-decoded (C{%2F} is C{/}); an empty or missing path
    means the default vhost C{/};
  - user and password (percent-decoded) are for C{PLAIN} login; without them
    C{guest}/C{guest} is used, unless a client certificate is configured, in
    which case the login is C{EXTERNAL} (the certificate's identity);
  - query keys: C{heartbeat} (seconds, at least 1; default 30),
    C{connection_name}, C{connection_timeout} (seconds, default 10),
    C{cacertfile}, C{certfile}, C{keyfile} (TLS files; C{amqps} only),
    C{server_name_indication} (the name the broker's certificate must carry,
    default the host) and C{auth_mechanism} (C{PLAIN} or C{EXTERNAL}).
    Unknown keys are refused, so a typo never goes unnoticed, and so is
    C{verify=verify_none}: fedhub never connects without verifying the broker.

Connections are made with a plain C{tcp:} endpoint string from
L{endpoint_description}; for C{amqps} the transport wraps that endpoint with
C{wrapClientTLS} and the options of L{fedhub.amqp.tls}, because the C{tls:}
endpoint string reads CA files with C{Certificate.loadPEM}, which keeps only
the first certificate of a bundle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from twisted.internet.endpoints import quoteStringArgument

from fedhub.config import MAX_CONNECTION_TIMEOUT
from fedhub.errors import ConfigError, ConfigProblem

PLAIN = "PLAIN"
"""Login with user name and password."""

EXTERNAL = "EXTERNAL"
"""Login with the identity of the TLS client certificate."""

DEFAULT_PORT = 5672
"""The port of C{amqp://} URLs without one."""

DEFAULT_TLS_PORT = 5671
"""The port of C{amqps://} URLs without one."""

DEFAULT_HEARTBEAT = 30
"""Seconds between heartbeats when the URL does not say."""

MAX_HEARTBEAT = 65535
"""The largest heartbeat AMQP can express (an unsigned short)."""

DEFAULT_CONNECTION_TIMEOUT = 10.0
"""Seconds a TCP connection attempt may take when the URL does not say."""

DEFAULT_VHOST = "/"
"""RabbitMQ's default virtual host."""

QUERY_KEYS = frozenset(
    {
        "heartbeat",
        "connection_name",
        "connection_timeout",
        "cacertfile",
        "certfile",
        "keyfile",
        "server_name_indication",
        "auth_mechanism",
        "verify",
    }
)
"""The query keys L{parse_url} understands."""


@dataclass(frozen=True)
class AMQPSettings:
    """
    Everything needed to reach and log in to one broker.

    @ivar host: The broker's host name or IP address.
    @ivar port: Its TCP port.
    @ivar vhost: The virtual host to open.
    @ivar tls: Whether to speak TLS (C{amqps}).
    @ivar username: The C{PLAIN} login name.
    @ivar password: The C{PLAIN} password (never shown by C{repr}).
    @ivar heartbeat: Requested heartbeat interval in seconds, at least 1.
    @ivar connection_name: A name shown by the broker's management tools.
    @ivar connection_timeout: Seconds a TCP connection attempt may take.
    @ivar ca: Path of a PEM bundle of the CAs that may sign the broker's certificate.
    @ivar cert: Path of the PEM client certificate (and maybe its chain and key).
    @ivar key: Path of the PEM private key of C{cert}, when it is not in C{cert}.
    @ivar server_hostname: The name the broker's certificate must carry, when
        it is not C{host}.
    @ivar mechanism: C{PLAIN}, C{EXTERNAL}, or C{None} to choose by whether a
        client certificate is configured.
    """

    host: str = "localhost"
    port: int = DEFAULT_PORT
    vhost: str = DEFAULT_VHOST
    tls: bool = False
    username: str = "guest"
    password: str = field(default="guest", repr=False)
    heartbeat: int = DEFAULT_HEARTBEAT
    connection_name: str | None = None
    connection_timeout: float = DEFAULT_CONNECTION_TIMEOUT
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_hostname: str | None = None
    mechanism: Literal["PLAIN", "EXTERNAL"] | None = None

    @property
    def auth_mechanism(self) -> str:
        """
        The SASL mechanism to log in with: C{EXTERNAL} when a client
        certificate is configured, C{PLAIN} otherwise, unless set explicitly.
        """
        if self.mechanism is not None:
            return self.mechanism
        return EXTERNAL if self.cert else PLAIN

    @property
    def verify_hostname(self) -> str:
        """
        The name the broker's certificate is checked against.
        """
        return self.server_hostname or self.host

    def safe_url(self) -> str:
        """
        The URL of these settings without the password, for logs.
        """
        scheme = "amqps" if self.tls else "amqp"
        user = "" if self.auth_mechanism == EXTERNAL else quote(self.username, safe="") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}/{quote(self.vhost, safe='')}"

    def with_changes(self, **changes: object) -> AMQPSettings:
        """
        A copy with some fields changed, checked like L{parse_url}'s result.

        @raise ConfigError: when the result is not a usable configuration.
        """
        updated = replace(self, **changes)  # type: ignore[arg-type]
        problems = check_settings(updated)
        if problems:
            raise ConfigError(problems)
        return updated


def check_settings(settings: AMQPSettings, key: str = "url") -> list[ConfigProblem]:
    """
    Every reason the settings can not be used, as configuration problems
    under the key path C{key}.
    """
    problems: list[ConfigProblem] = []

    def problem(message: str) -> None:
        problems.append(ConfigProblem(key, message))

    if not settings.host:
        problem("the broker host is empty")
    if not 0 < settings.port < 65536:
        problem(f"port {settings.port} is not within 1..65535")
    if isinstance(settings.heartbeat, bool) or not isinstance(settings.heartbeat, int):
        problem(f"heartbeat must be a whole number of seconds, not {settings.heartbeat!r}")
    elif settings.heartbeat <= 0:
        problem(
            "heartbeat must be at least 1 second: without heartbeats a frozen broker"
            " goes unnoticed"
        )
    elif settings.heartbeat > MAX_HEARTBEAT:
        problem(f"heartbeat must be at most {MAX_HEARTBEAT} seconds")
    if not settings.connection_timeout > 0:
        problem("connection_timeout must be a positive number of seconds")
    if settings.mechanism not in (None, PLAIN, EXTERNAL):
        problem(f"auth_mechanism must be PLAIN or EXTERNAL, not {settings.mechanism!r}")
    if not settings.tls:
        for name in ("ca", "cert", "key", "server_hostname"):
            if getattr(settings, name):
                problem(f"{name} is set but the URL is not amqps://: TLS settings need TLS")
        if settings.auth_mechanism == EXTERNAL:
            problem("EXTERNAL login needs a TLS client certificate (an amqps:// URL)")
    else:
        if settings.key and not settings.cert:
            problem("a client key is set without a client certificate")
        if settings.auth_mechanism == EXTERNAL and not settings.cert:
            problem("EXTERNAL login needs a client certificate (certfile)")
    if settings.connection_name is not None and len(settings.connection_name.encode()) > 1000:
        problem("connection_name is longer than 1000 bytes")
    return problems


def parse_url(url: str, key: str = "url") -> AMQPSettings:
    """
    Parse an C{amqp://} or C{amqps://} URL.

    @param key: The configuration key path the URL came from, named in errors.
    @raise ConfigError: when the URL is malformed, has unknown or bad query
        keys, or asks for something fedhub refuses (no heartbeat, no
        verification, EXTERNAL login without TLS).
    """
    problems: list[ConfigProblem] = []

    def fail(message: str) -> ConfigError:
        return ConfigError([ConfigProblem(key, message)])

    if not isinstance(url, str):
        raise fail(f"the broker URL must be a string, not {type(url).__name__}")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise fail("the broker URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise fail(f"the broker URL is malformed: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise fail(f"the broker URL must start with amqp:// or amqps://, not {parts.scheme!r}://")
    if parts.fragment:
        raise fail("the broker URL must not have a #fragment")
    tls = scheme == "amqps"

    host = unquote(parts.hostname or "") or "localhost"
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if "/" in path:
        raise fail("the vhost must be one path segment; write a '/' inside it as %2F")
    vhost = unquote(path) or DEFAULT_VHOST

    values: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise fail(f"the broker URL's query is malformed: {e}") from None
    for name, value in pairs:
        if name not in QUERY_KEYS:
            known = ", ".join(sorted(QUERY_KEYS - {"verify"}))
            problems.append(ConfigProblem(key, f"unknown query key {name!r} (known: {known})"))
        elif name in values:
            problems.append(ConfigProblem(key, f"query key {name!r} is given twice"))
        else:
            values[name] = value

    verify = values.pop("verify", "verify_peer")
    if verify != "verify_peer":
        problems.append(
            ConfigProblem(key, f"verify={verify} is refused: fedhub always verifies the broker")
        )

    heartbeat = DEFAULT_HEARTBEAT
    if "heartbeat" in values:
        try:
            heartbeat = int(values.pop("heartbeat"))
        except ValueError:
            problems.append(ConfigProblem(key, "heartbeat must be a whole number of seconds"))
    timeout = DEFAULT_CONNECTION_TIMEOUT
    if "connection_timeout" in values:
        try:
            timeout = float(values.pop("connection_timeout"))
        except ValueError:
            problems.append(ConfigProblem(key, "connection_timeout must be a number of seconds"))
        else:
            # RabbitMQ's URI spec and pika give it in milliseconds past 1000;
            # fedhub takes seconds: a huge value is most likely milliseconds.
            if timeout > MAX_CONNECTION_TIMEOUT:
                problems.append(
                    ConfigProblem(
                        key,
                        f"connection_timeout is in seconds and at most {MAX_CONNECTION_TIMEOUT:g}",
                    )
                )
    mechanism = values.pop("auth_mechanism", None)
    if mechanism is not None:
        mechanism = mechanism.upper()

    settings = AMQPSettings(
        host=host,
        port=port if port is not None else (DEFAULT_TLS_PORT if tls else DEFAULT_PORT),
        vhost=vhost,
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        heartbeat=heartbeat,
        connection_name=values.pop("connection_name", None) or None,
        connection_timeout=timeout,
        ca=values.pop("cacertfile", None) or None,
        cert=values.pop("certfile", None) or None,
        key=values.pop("keyfile", None) or None,
        server_hostname=values.pop("server_name_indication", None) or None,
        mechanism=mechanism,  # type: ignore[arg-type]
    )
    if parts.port == 0:
        problems.append(ConfigProblem(key, "port 0 is not a broker port"))
    problems.extend(check_settings(settings, key))
    if problems:
        raise ConfigError(_unique(problems))
    return settings


def _unique(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen: set[ConfigProblem] = set()
    result = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            result.append(p)
    return result


def endpoint_description(settings: AMQPSettings) -> str:
    """
    The C{clientFromString} description of the TCP connection to the broker.

    For C{amqps} the caller wraps the endpoint built from it with
    C{twisted.internet.endpoints.wrapClientTLS} and L{fedhub.amqp.tls}'s
    options; see the module docstring for why not a C{tls:} string.
    """
    host = quoteStringArgument(settings.host)  # type: ignore[no-untyped-call]
    # The tcp: parser takes whole seconds only.
    timeout = max(1, math.ceil(settings.connection_timeout))
    return f"tcp:host={host}:port={settings.port}:timeout={timeout}"
