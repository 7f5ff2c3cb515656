"""
The C{webhook} consumer: HTTP C{POST} each message to a URL, with treq.

The request body is the serialized message (one JSON object, as
L{fedhub.message.dump_line} writes it) with C{Content-Type:
application/json}, plus the headers C{X-Fedhub-Topic},
C{X-Fedhub-Message-Id} and C{User-Agent: fedhub/<version>}, any static
C{headers} from the configuration, and C{Authorization} read from
C{authorization_file} when one is configured (secrets stay out of the
configuration file and out of logs).

C{https} URLs are always verified: against the system's trusted CAs, or
against the CA bundle in C{ca} (every certificate of the bundle is
trusted), with the host name checked and TLS 1.2 at least.  There is no
option to turn verification off.

Verdicts, by the answer:

  - C{2xx}: acknowledged;
  - C{408}, C{429} and C{5xx}: L{Retry}, asking for the server's
    C{Retry-After} seconds when it gives them as a number (the wait is
    then the first retry queue's at least as long, at most the longest);
  - any other status (other C{4xx}, a redirect, C{1xx}, C{600} or more):
    L{DeadLetter} with the status and the start of the answer's body:
    sending the same request again would not help;
  - no complete answer within C{timeout} seconds (request and body), a
    refused or broken connection, a DNS or TLS failure: L{Retry}; so is a
    C{2xx} whose body the connection cut off, since the server may have
    failed after sending its status line.

The answer's body is read whole, so the connection can be reused, and its
first 64 KiB kept for the verdict's reason.  A connection kept for reuse
that the server closed meanwhile fails before any answer: the request is
then sent once more at once on a new connection (a duplicate is possible if
the server did take the first one; X-Fedhub-Message-Id tells).  Reasons
and logs show the URL without its query string, which often carries a token,
and a redirect's target without its user, password, query string and
fragment.  What the server sends (its status phrase, the start of its
answer, errors quoting it) is shown with the URL's query string and values
and the Authorization header's value and credentials replaced by C{***}
(those of at least L{MIN_SECRET_LENGTH} characters): a server may echo the
request it found wrong, and the reasons end up in logs and in dead-lettered
messages' headers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote_plus, unquote_plus, urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

import fedhub
from fedhub.config import Option
from fedhub.errors import ConfigError, ConfigProblem, DeadLetter, Retry
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.logs import HubLogger
from fedhub.message import Message, dump_line
from fedhub.plugins import PluginContext
from fedhub.text import escape_control
from fedhub.xmlrpc import (
    closed_before_answer,
    display_url,
    parse_retry_after,
    quiet_pool,
    shown_location,
)

__all__ = ["WebhookPlugin", "WebhookHandler", "verdict_for_status", "load_ca_bundle"]

#: At most this much of an answer's body is read.
MAX_RESPONSE_BYTES = 64 * 1024

#: Statuses outside 5xx that are worth trying again.
RETRY_STATUSES = frozenset({408, 429})

#: Headers fedhub sets itself; the configuration can not replace them.
RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "x-fedhub-topic", "x-fedhub-message-id",
     "authorization", "transfer-encoding", "connection"}
)

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)

#: Secrets shorter than this are not hidden from what a server sends back:
#: they would blank out ordinary words.
MIN_SECRET_LENGTH = 4


def verdict_for_status(status: int, phrase: str, excerpt: str, url: str,
                       retry_after: float | None = None,
                       location: str | None = None) -> Retry | DeadLetter | None:
    """
    The verdict for an HTTP answer: C{None} for success, else the L{Retry}
    or L{DeadLetter} to raise.

    @param location: Where a redirect points (escaped), named in its reason:
        the URL to configure instead.
    """
    if 200 <= status < 300:
        return None
    reason = f"HTTP {status} {phrase} from {url}"
    if excerpt:
        reason += f": {excerpt}"
    if 500 <= status < 600 or status in RETRY_STATUSES:
        return Retry(reason, retry_after)
    if 300 <= status < 400:
        to = f" to {location}" if location else ""
        return DeadLetter(reason + f" (redirects{to} are not followed)")
    return DeadLetter(reason)


def url_secrets(url: str, authorization: bytes | None) -> tuple[str, ...]:
    """
    The secrets a server's answer might repeat: the URL's query string and
    its values (as written and decoded), and the Authorization header's
    value and its credentials (after the scheme); longest first, none
    shorter than L{MIN_SECRET_LENGTH}.
    """
    query = urlsplit(url).query
    found = {query, unquote_plus(query)}
    for _, value in parse_qsl(query, keep_blank_values=True):
        found.add(value)
        found.add(quote_plus(value))
    if authorization is not None:
        text = authorization.decode("latin-1")
        found.add(text)
        found.add(text.partition(" ")[2].strip())
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True))


def hide_secrets(text: str, secrets: tuple[str, ...]) -> str:
    """
    C{text} with every occurrence of each of C{secrets} replaced by C{***}.
    """
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def load_ca_bundle(data: bytes) -> Any:
    """
    A trust root made of every certificate in a PEM bundle (Twisted's
    C{Certificate.loadPEM} alone keeps only the first).

    @raise ValueError: when the bundle holds no certificate or a broken one.
    """
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ValueError("no PEM certificate in the file")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ValueError(f"a certificate can not be read: {e}") from None
    return trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """
    Verifies servers against a trust root (or the platform's), TLS 1.2 at
    least.
    """

    def __init__(self, trust_root: Any) -> None:
        self.trust_root = trust_root

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        from twisted.internet.ssl import TLSVersion, optionsForClientTLS

        from fedhub.tlsnames import StrictNames

        name = hostname.decode("ascii")
        return StrictNames(
            optionsForClientTLS(
                name,
                trustRoot=self.trust_root,
                extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
            ),
            name,
        )


class _BodyReader(Protocol):
    """
    Reads an answer's body, keeping its first L{MAX_RESPONSE_BYTES}; the
    rest is read and discarded, so the connection stays usable (the
    request's timeout bounds the time spent).  Cancelling closes the
    connection.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        #: Why the body ended when it did not end as its framing said.
        self.broken: str | None = None
        self.done: Deferred[bytes] = Deferred(lambda d: self.abort())

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        room = MAX_RESPONSE_BYTES - len(self.data)
        if room > 0:
            self.data += data[:room]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            # Complete (ResponseDone, or PotentialDataLoss: an answer
            # without a length, ended by closing), or broken: whatever
            # arrived is enough for a verdict, which the status decides,
            # unless it is a success that may not have been one.
            if not reason.check(ResponseDone, PotentialDataLoss):
                self.broken = _describe(reason)
            self.done.callback(bytes(self.data))


@implementer(IMessageHandler)
class WebhookHandler:
    """
    Posts each message to one URL.

    @ivar posted: How many requests got an answer.
    """

    log = HubLogger()

    def __init__(
        self,
        name: str,
        topics: tuple[str, ...],
        reactor: Any,
        url: str,
        *,
        timeout: float = 30.0,
        ca: str | None = None,
        headers: Mapping[str, str] | None = None,
        authorization_file: str | None = None,
        max_connections: int = 2,
    ) -> None:
        self.name = name
        self.topics = topics
        self.reactor = reactor
        self.url = url
        self.shown_url = display_url(url)
        self.timeout = timeout
        self.ca = ca
        self.headers = dict(headers or {})
        self.authorization_file = authorization_file
        self.max_connections = max_connections
        self.posted = 0
        self._client: Any = None
        self._pool: Any = None
        self._authorization: bytes | None = None
        self._secrets = url_secrets(url, None)

    def start(self) -> None:
        """
        Read the CA bundle and the authorization file, and make the
        connection pool.

        @raise ConfigError: when either file can not be used.
        """
        from treq.client import HTTPClient
        from twisted.internet.ssl import platformTrust
        from twisted.web.client import Agent

        trust_root: Any = platformTrust()  # type: ignore[no-untyped-call]
        if self.ca is not None:
            try:
                with open(self.ca, "rb") as f:
                    trust_root = load_ca_bundle(f.read())
            except (OSError, ValueError) as e:
                reason = e.strerror if isinstance(e, OSError) else str(e)
                raise ConfigError([ConfigProblem(f"{self.name}.ca", f"{self.ca}: {reason}")]) from None
        if self.authorization_file is not None:
            try:
                with open(self.authorization_file, "rb") as f:
                    secret = f.read().strip()
            except OSError as e:
                raise ConfigError(
                    [ConfigProblem(f"{self.name}.authorization_file", str(e.strerror))]
                ) from None
            if not secret or b"\n" in secret or b"\r" in secret or b"\x00" in secret:
                raise ConfigError([ConfigProblem(
                    f"{self.name}.authorization_file",
                    "must hold one non-empty line (the Authorization header's value)",
                )])
            self._authorization = secret
        self._secrets = url_secrets(self.url, self._authorization)
        self._pool = quiet_pool(self.reactor)
        self._pool.maxPersistentPerHost = self.max_connections
        self._pool.retryAutomatically = False
        agent = Agent(  # type: ignore[no-untyped-call]
            self.reactor,
            contextFactory=_TLSPolicy(trust_root),
            connectTimeout=self.timeout,
            pool=self._pool,
        )
        self._client = HTTPClient(agent)

    def stop(self) -> Deferred[None] | None:
        """
        Close the connections kept for reuse.
        """
        if self._pool is None:
            return None
        pool, self._pool = self._pool, None
        closed: Deferred[None] = pool.closeCachedConnections()
        return closed

    def request_headers(self, message: Message) -> dict[bytes, list[bytes]]:
        """
        The headers of the request for C{message}.
        """
        headers: dict[bytes, list[bytes]] = {
            name.encode("latin-1"): [value.encode("latin-1")] for name, value in self.headers.items()
        }
        headers[b"Content-Type"] = [b"application/json"]
        headers[b"User-Agent"] = [f"fedhub/{fedhub.__version__}".encode("ascii")]
        # The topic has no whitespace or control characters (the model
        # checks); the id is not checked, so it is escaped.
        headers[b"X-Fedhub-Topic"] = [message.topic.encode("utf-8")]
        headers[b"X-Fedhub-Message-Id"] = [escape_control(message.id).encode("utf-8")]
        if self._authorization is not None:
            headers[b"Authorization"] = [self._authorization]
        return headers

    def handle(self, message: Message) -> Deferred[None]:
        """
        Post C{message}; the Deferred fires on a 2xx answer and fails with
        the verdict otherwise.
        """
        if self._client is None:
            raise Retry("the webhook consumer is not started")
        body = dump_line(message).encode("utf-8")
        headers = self.request_headers(message)
        timed_out: list[bool] = []

        def read(response: Any) -> Deferred[tuple[Any, bytes, str | None]]:
            reader = _BodyReader()
            response.deliverBody(reader)
            return reader.done.addCallback(lambda data: (response, data, reader.broken))

        def post() -> Deferred[tuple[Any, bytes, str | None]]:
            sent: Deferred[Any] = self._client.post(
                self.url, data=body, headers=headers, allow_redirects=False, unbuffered=True
            )
            return sent.addCallback(read)

        def again(failure: Failure) -> Any:
            # A kept-alive connection the server closed meanwhile fails
            # before any answer: try once more on a new connection.
            if not timed_out and closed_before_answer(failure):
                self.log.debug(
                    "Consumer {consumer}: connection to {url} closed before an answer to "
                    "{msg_id}; trying once more",
                    consumer=self.name,
                    url=self.shown_url,
                    msg_id=message.id,
                )
                return post()
            return failure

        d = post()
        d.addErrback(again)

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self.reactor.callLater(self.timeout, expire)

        def finish(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(finish)
        done: Deferred[None] = d.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(message,),
            errbackArgs=(message, timed_out),
        )
        return done

    def _answered(self, result: tuple[Any, bytes, str | None], message: Message) -> None:
        response, data, broken = result
        self.posted += 1
        status = int(response.code)
        # The server's words may quote the request, token and all.
        phrase = escape_control(
            hide_secrets(bytes(response.phrase or b"").decode("latin-1"), self._secrets), 80)
        excerpt = escape_control(
            hide_secrets(data.decode("utf-8", "replace"), self._secrets).strip(), 300)
        retry_after = parse_retry_after(
            (response.headers.getRawHeaders(b"Retry-After") or [None])[0]
        )
        location = (response.headers.getRawHeaders(b"Location") or [None])[0]
        verdict = verdict_for_status(
            status, phrase, excerpt, self.shown_url, retry_after,
            None if location is None else escape_control(
                hide_secrets(shown_location(bytes(location).decode("latin-1")), self._secrets),
                300),
        )
        if verdict is None and broken is not None:
            verdict = Retry(f"HTTP {status} {phrase} from {self.shown_url}, but the answer was "
                            f"cut off: {hide_secrets(broken, self._secrets)}")
        fields = {
            "consumer": self.name,
            "msg_id": message.id,
            "topic": message.topic,
            "url": self.shown_url,
            "status": status,
        }
        if verdict is None:
            self.log.debug("Consumer {consumer} posted {msg_id} ({topic}) to {url}: {status}",
                           **fields)
            return
        # The reason names the status and the URL already.
        self.log.warn("Consumer {consumer} posted {msg_id} ({topic}): {reason}",
                      reason=verdict.reason, **fields)
        raise verdict

    def _failed(self, failure: Failure, message: Message, timed_out: list[bool]) -> None:
        if isinstance(failure.value, (Retry, DeadLetter)):
            failure.raiseException()
        if timed_out or isinstance(failure.value, CancelledError):
            reason = f"no answer from {self.shown_url} within {self.timeout:g} s"
        else:
            reason = (f"request to {self.shown_url} failed: "
                      f"{hide_secrets(_describe(failure), self._secrets)}")
        self.log.warn(
            "Consumer {consumer} could not post {msg_id} ({topic}): {reason}",
            consumer=self.name,
            msg_id=message.id,
            topic=message.topic,
            reason=reason,
        )
        raise Retry(reason)


def _describe(failure: Failure) -> str:
    """
    A short text for a connection failure, including the reasons wrapped in
    Twisted's C{ResponseFailed} / C{RequestTransmissionFailed}.
    """
    error = failure.value
    inner = getattr(error, "reasons", None)
    if inner:
        parts = [_describe(f) if isinstance(f, Failure) else str(f) for f in inner]
        return f"{type(error).__name__}: " + "; ".join(parts)
    return escape_control(f"{type(error).__name__}: {error}", 300)


# --- options ----------------------------------------------------------------


def _check_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user or password; use authorization_file"
    if parts.fragment:
        return "must not have a #fragment"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return "holds whitespace or control characters"
    return None


def _check_headers(value: dict[str, Any]) -> str | None:
    for name, item in value.items():
        if not _TOKEN.fullmatch(name):
            return f"{name!r} is not a valid header name"
        if name.lower() in RESERVED_HEADERS:
            return f"{name!r} is set by fedhub and can not be configured"
        if not isinstance(item, str):
            return f"the value of {name!r} must be a string"
        if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in item):
            return f"the value of {name!r} holds control characters"
        try:
            item.encode("latin-1")
        except UnicodeEncodeError:
            return f"the value of {name!r} must be Latin-1 text"
    return None


def _check_positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


@implementer(IPlugin, IConsumerPlugin)
class WebhookPlugin:
    """
    The plugin that builds L{WebhookHandler}s.
    """

    name = "webhook"
    description = "HTTP POST each message (its serialized JSON) to a URL; HTTPS always verified."
    options: Mapping[str, Option] = {
        "url": Option(str, help="http:// or https:// URL to post to", check=_check_url),
        "timeout": Option(float, 30.0, "seconds for the whole request and answer",
                          _check_positive),
        "ca": Option(str, None, "CA bundle (PEM) that verifies the server; default the "
                     "system's trusted CAs", path=True),
        "headers": Option(dict, {}, "extra request headers (names and string values)",
                          check=_check_headers),
        "authorization_file": Option(str, None, "file holding the Authorization header's "
                                     "value", path=True),
        "max_connections": Option(int, 2, "connections kept open for reuse", _check_positive),
    }

    def build(self, context: PluginContext) -> WebhookHandler:
        """
        Build a handler; files are read and connections made from its
        C{start}.

        @raise ConfigError: for a C{ca} with an C{http://} URL, where it
            would be silently ignored.
        """
        options = context.options
        url = str(options["url"])
        where = context.component.path if context.component is not None else "options"
        if options.get("ca") is not None and urlsplit(url).scheme != "https":
            raise ConfigError([ConfigProblem(f"{where}.ca", "is only used with an https:// url")])
        topics: tuple[str, ...] = ("#",)
        if context.component is not None and context.component.topics:
            topics = tuple(context.component.topics)
        return WebhookHandler(
            context.name,
            topics,
            context.reactor,
            url,
            timeout=float(options.get("timeout", 30.0)),
            ca=options.get("ca"),
            headers=options.get("headers") or {},
            authorization_file=options.get("authorization_file"),
            max_connections=int(options.get("max_connections", 2)),
        )
