"""
A careful XML-RPC client for Twisted.

C{twisted.web.xmlrpc.Proxy} trusts the server too much for a hub that polls
other people's services: it reads responses of any size into memory, its
C{connectTimeout} does not cover a server that accepts the connection and
never answers, and the standard library's unmarshaller expands entities.
L{XMLRPCClient} instead

  - bounds every call with one timeout that covers connecting, sending,
    waiting for the answer and reading it (C{Deferred.addTimeout});
  - counts the response while it streams in and aborts the connection as
    soon as it passes a size cap, without reading the rest;
  - parses the XML as it arrives with a parser that refuses DTDs, entity
    declarations and external references (so no billion laughs, no XXE);
  - verifies HTTPS servers against the platform's trust store or a CA file;
  - maps every failure to an L{XMLRPCError} subclass that carries the URL,
    the method and the facts of the failure, and XML-RPC faults to
    L{XMLRPCFault}.

L{XMLRPCClient.multicall} batches many calls into few requests with
C{system.multicall} (or Koji's C{multiCall}).
"""

from __future__ import annotations

import re
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast
from typing import Protocol as _TypedProtocol
from urllib.parse import urlsplit

from defusedxml.xmlrpc import DefusedExpatParser
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import Attribute, Interface, implementer

from fedhub import __version__
from fedhub.errors import FedhubError
from fedhub.logs import HubLogger
from fedhub.text import escape_control
from fedhub.tlsnames import StrictPolicyForHTTPS

#: The default cap on one response: 32 MiB.
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: The default time one call may take, in seconds, from connecting to the last byte.
DEFAULT_TIMEOUT = 60.0
#: How many calls one multicall request carries by default.
DEFAULT_BATCH_SIZE = 100

USER_AGENT = f"fedhub/{__version__}"


#: An absolute or scheme-relative URL: its scheme, authority and the rest.
_AUTHORITY = re.compile(r"(?s)([A-Za-z][A-Za-z0-9+.-]*:)?//([^/]*)(.*)")


def display_url(url: str) -> str:
    """
    A URL fit for logs, errors and status pages: scheme, host, port and
    path, without its query string (which often carries an API key or a
    token) and fragment.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def shown_location(location: str) -> str:
    """
    Where a redirect points, fit for a reason: without the user and password
    of its authority, its query string and its fragment.
    """
    location = location.split("#", 1)[0].split("?", 1)[0]
    match = _AUTHORITY.fullmatch(location)
    if match is None:
        return location
    scheme, authority, rest = match.groups()
    return f"{scheme or ''}//{authority.rpartition('@')[2]}{rest}"


# --- errors -------------------------------------------------------------


class XMLRPCError(FedhubError):
    """
    An XML-RPC call failed.

    @ivar url: The endpoint called (its text shows it without the query
        string, see L{display_url}).
    @ivar method: The method called.
    @ivar reason: A short human-readable reason.
    """

    def __init__(self, url: str, method: str, reason: str) -> None:
        self.url = url
        self.method = method
        self.reason = reason
        super().__init__(f"{method} at {display_url(url)}: {reason}")


class XMLRPCFault(XMLRPCError):
    """
    The server answered with an XML-RPC fault.

    @ivar fault_code: The fault's C{faultCode}.
    @ivar fault_string: The fault's C{faultString} (control characters escaped).
    """

    def __init__(self, url: str, method: str, fault_code: int, fault_string: str) -> None:
        self.fault_code = fault_code
        self.fault_string = escape_control(str(fault_string), 500)
        super().__init__(url, method, f"fault {fault_code}: {self.fault_string}")


class XMLRPCTimeout(XMLRPCError):
    """
    The call did not complete within its timeout.

    @ivar timeout: The timeout, in seconds.
    """

    def __init__(self, url: str, method: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(url, method, f"no complete answer within {timeout:g} s")


class ResponseTooLarge(XMLRPCError):
    """
    The response passed the size cap; the connection was dropped.

    @ivar limit: The cap, in bytes.
    @ivar received: How many bytes had arrived when the call gave up (or the
        announced C{Content-Length}).
    """

    def __init__(self, url: str, method: str, limit: int, received: int,
                 announced: bool = False) -> None:
        self.limit = limit
        self.received = received
        # How much of a streamed answer had arrived is left out of the text:
        # it differs from call to call, and a repeated failure is known by
        # its text (logged once, not at every poll).
        detail = f" ({received} announced)" if announced else ""
        super().__init__(url, method, f"response larger than {limit} bytes{detail}")


class HTTPStatusError(XMLRPCError):
    """
    The server answered with an HTTP status other than 200.  Redirects are
    not followed (a POST must not silently move), but where one points is
    part of the reason, so the operator can correct the URL.

    @ivar status: The HTTP status code.
    @ivar location: Where a redirect points, as L{shown_location} shows it
        (a server moving C{http} to C{https} keeps the query, which may hold
        the URL's API key) and with control characters escaped; or C{None}.
    @ivar retry_after: The seconds the server's C{Retry-After} asked to wait
        (given in seconds; at most L{MAX_RETRY_AFTER}), or C{None}.
    """

    def __init__(self, url: str, method: str, status: int, phrase: str,
                 location: str | None = None, retry_after: float | None = None) -> None:
        self.status = status
        self.location = None if location is None else escape_control(shown_location(location), 300)
        self.retry_after = retry_after
        reason = f"HTTP {status} {escape_control(phrase, 80)}"
        if self.location is not None:
            reason += f" to {self.location} (redirects are not followed: configure that URL)"
        super().__init__(url, method, reason)


#: A C{Retry-After} longer than this is cut to it.
MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: bytes | None) -> float | None:
    """
    A C{Retry-After} header given in seconds, capped (L{MAX_RETRY_AFTER});
    C{None} for none or an HTTP date (not worth the parsing: the caller's
    backoff applies then).
    """
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():  # bytes: ASCII digits only
        return None
    if len(text) > 9:
        # Past the cap anyway; int() refuses thousands of digits, and the
        # header is the server's to fill.
        return MAX_RETRY_AFTER
    return min(float(int(text)), MAX_RETRY_AFTER)


class BadResponse(XMLRPCError):
    """
    The response is not a well-formed, acceptable XML-RPC answer: truncated,
    not XML, a DTD or entity declaration, an unexpected content encoding.
    """


class TransportError(XMLRPCError):
    """
    The connection failed: refused, reset, closed early, TLS verification failed.
    """


# --- the client role ----------------------------------------------------


@dataclass(frozen=True)
class Call:
    """
    One call of a multicall: a method name and its positional parameters.
    """

    method: str
    params: tuple[Any, ...] = field(default_factory=tuple)


class IXMLRPCCaller(Interface):
    """
    Something that makes XML-RPC calls to one endpoint.
    """

    url = Attribute("str: the endpoint")

    def call(method, *params):  # type: ignore[no-untyped-def]
        """
        Call a method.

        @return: a Deferred firing with the decoded result, or failing with an
            L{XMLRPCError}.
        """

    def multicall(calls, batch_size):  # type: ignore[no-untyped-def]
        """
        Make many calls in few requests.

        @param calls: a sequence of L{Call}.
        @param batch_size: at most this many calls per request.
        @return: a Deferred firing with a list holding, for each call in
            order, its result or the L{XMLRPCFault} it answered with (not
            raised).  A failure of a whole request fails the Deferred.
        """

    def close():  # type: ignore[no-untyped-def]
        """
        Abort calls in progress and close idle connections.

        @return: a Deferred firing when the connections are closed.
        """


class XMLRPCCaller(_TypedProtocol):
    """
    The typed face of L{IXMLRPCCaller}, for annotations.
    """

    url: str

    def call(self, method: str, *params: Any) -> Deferred[Any]: ...

    def multicall(self, calls: Sequence[Call], batch_size: int = ...) -> Deferred[list[Any]]: ...

    def close(self) -> Deferred[None]: ...


def unwrap(result: Any) -> Any:
    """
    The value of one multicall result, raising it when it is a fault.

    @raise XMLRPCFault: when the call answered with a fault.
    """
    if isinstance(result, XMLRPCFault):
        raise result
    return result


# --- values -------------------------------------------------------------


def jsonable(value: Any, times: str = "epoch") -> Any:
    """
    An XML-RPC value made JSON-ready: times (C{dateTime.iso8601} carries no
    zone; it is taken as UTC) become epoch seconds, or ISO 8601 text with a
    C{+00:00} offset when C{times} is C{"iso"}; tuples become lists and
    C{base64} data text.
    """
    if isinstance(value, xmlrpc.client.DateTime):
        value = datetime.strptime(value.value, "%Y%m%dT%H:%M:%S")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        if times == "iso":
            return value.astimezone(timezone.utc).isoformat()
        return float(value.timestamp())
    if isinstance(value, dict):
        return {str(k): jsonable(v, times) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, times) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value


# --- encoding -----------------------------------------------------------


class _Marshaller(xmlrpc.client.Marshaller):
    """
    The standard marshaller, plus C{<i8>} for integers beyond 32 bits (as
    Koji sends and takes them) instead of refusing them.
    """

    dispatch = dict(xmlrpc.client.Marshaller.dispatch)

    def dump_int(self, value: int, write: Any) -> None:
        if -(2**31) <= value < 2**31:
            write(f"<value><int>{value}</int></value>\n")
        elif -(2**63) <= value < 2**63:
            write(f"<value><i8>{value}</i8></value>\n")
        else:
            raise OverflowError("int exceeds XML-RPC limits (64 bits)")

    dispatch[int] = dump_int  # type: ignore[assignment]


def encode_call(method: str, params: Sequence[Any]) -> bytes:
    """
    The XML-RPC request for C{method(*params)}, UTF-8 encoded; C{None} is
    sent as C{<nil/>} and 64-bit integers as C{<i8>}.

    @raise TypeError: for a value XML-RPC can not carry.
    @raise OverflowError: for an integer beyond 64 bits.
    """
    body = _Marshaller("utf-8", allow_none=True).dumps(tuple(params))
    text = (
        "<?xml version='1.0'?>\n<methodCall>\n"
        f"<methodName>{xmlrpc.client.escape(method)}</methodName>\n{body}</methodCall>\n"
    )
    return text.encode("utf-8", "xmlcharrefreplace")


def encode_response(value: Any) -> bytes:
    """
    An XML-RPC response carrying C{value}, encoded like L{encode_call}: what
    a server (or a test double of one) sends.
    """
    body = _Marshaller("utf-8", allow_none=True).dumps((value,))
    text = f"<?xml version='1.0'?>\n<methodResponse>\n{body}</methodResponse>\n"
    return text.encode("utf-8", "xmlcharrefreplace")


# --- plumbing -----------------------------------------------------------

_CONNECTION_DONE = Failure(ConnectionDone())  # type: ignore[no-untyped-call]


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body already in memory, written in one go.

    (C{FileBodyProducer} would schedule its writes on the global reactor's
    cooperator.)
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    """
    Takes a response body nobody wants.  A short one (an error page) is read
    and dropped, so the connection can serve the next call; past C{limit}
    bytes (at once when C{limit} is 0) the connection is dropped instead.
    C{done} fires once the response is settled, so a call never completes
    while its connection is still in use; cancelling it (a timeout, a
    close) drops the connection, so a body that trickles in forever can not
    keep it open.
    """

    def __init__(self, limit: int) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self._drop())
        self._left = limit

    def _drop(self) -> None:
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()

    def connectionMade(self) -> None:
        if self._left <= 0:
            # Nothing of this body is wanted: do not wait for its first byte.
            self._drop()

    def dataReceived(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:
            self._drop()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        if not self.done.called:
            self.done.callback(None)


def _discard(response: IResponse, error: XMLRPCError, limit: int = 64 * 1024) -> Deferred[Any]:
    """
    Drop C{response}'s body (reading at most C{limit} bytes of it), then
    fail with C{error}.
    """
    discard = _Discard(limit)
    response.deliverBody(discard)  # type: ignore[no-untyped-call]

    def fail(_: object) -> Failure:
        return _failure(error)

    return discard.done.addCallback(fail)


def parse_datetime(text: str) -> datetime:
    """
    A C{dateTime.iso8601} value: the form the specification gives
    (C{20261129T04:00:00}), or the ISO 8601 forms servers also send (dashes,
    fractions of a second, C{Z} or an offset).  A time with an offset is
    given in UTC, without it, as XML-RPC times are taken.

    @raise ValueError: when C{text} is no such time.
    """
    text = text.strip()
    try:
        return datetime.strptime(text, "%Y%m%dT%H:%M:%S")
    except ValueError:
        pass
    when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when


class _Unmarshaller(xmlrpc.client.Unmarshaller):
    """
    The standard unmarshaller (built-in types), taking the C{dateTime}
    forms of L{parse_datetime}: one such value would otherwise fail the
    whole answer, at every poll that reads it again.
    """

    dispatch = dict(xmlrpc.client.Unmarshaller.dispatch)

    def end_dateTime(self, data: str) -> None:
        self.append(parse_datetime(data))

    dispatch["dateTime.iso8601"] = end_dateTime  # type: ignore[assignment]

    def close(self) -> tuple[Any, ...]:
        # The standard one builds the fault with Fault(**value): a fault
        # whose value is not a struct, or lacks a member, would be a
        # TypeError about Python's call instead of the server's fault.
        if self._type == "fault" and not self._marks and self._stack:  # type: ignore[attr-defined]
            value = self._stack[0]  # type: ignore[attr-defined]
            if not isinstance(value, dict):
                raise BadFault(f"a fault whose value is not a struct: {value!r}"[:300])
            raise xmlrpc.client.Fault(
                value.get("faultCode", -1), value.get("faultString", "(the fault has no faultString)")
            )
        values: tuple[Any, ...] = super().close()
        return values


class BadFault(ValueError):
    """
    A fault answer that is not one (its value not a struct).
    """


class _ResponseParser(Protocol):
    """
    Streams an XML-RPC response body into a defused parser, counting bytes,
    and fires C{finished} with the decoded value or an L{XMLRPCError}.
    """

    def __init__(self, finished: Deferred[Any], url: str, method: str, limit: int) -> None:
        self._finished = finished
        self._url = url
        self._method = method
        self._limit = limit
        self._received = 0
        self._done = False
        self._unmarshaller = _Unmarshaller(use_builtin_types=True)
        # XML-RPC has no use for a DTD: refusing it also refuses every entity
        # declaration (billion laughs) and external reference (XXE).
        self._parser = DefusedExpatParser(
            self._unmarshaller, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )

    def cancel(self) -> None:
        """
        Stop reading and drop the connection (the call was cancelled).
        """
        self._done = True
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()

    def _fail(self, error: XMLRPCError) -> None:
        self._done = True
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()
        self._finished.errback(_failure(error))

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._fail(ResponseTooLarge(self._url, self._method, self._limit, self._received))
            return
        try:
            self._parser.feed(data)
        except Exception as e:
            self._fail(BadResponse(self._url, self._method, _describe(e)))

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        if self._done:
            return
        self._done = True
        complete = reason.check(ResponseDone, PotentialDataLoss)  # type: ignore[no-untyped-call]
        if not complete:
            why = _describe(cast(BaseException, reason.value))
            self._finished.errback(
                _failure(TransportError(self._url, self._method, f"response cut short: {why}"))
            )
            return
        try:
            self._parser.close()
            values = self._unmarshaller.close()
        except xmlrpc.client.Fault as fault:
            self._finished.errback(
                _failure(XMLRPCFault(self._url, self._method, _fault_code(fault.faultCode),
                                    str(fault.faultString)))
            )
            return
        except Exception as e:
            self._finished.errback(_failure(BadResponse(self._url, self._method, _describe(e))))
            return
        if len(values) != 1:
            self._finished.errback(
                _failure(BadResponse(self._url, self._method,
                                    f"response holds {len(values)} values, not one"))
            )
            return
        self._finished.callback(values[0])


def _describe(error: BaseException) -> str:
    """
    A short, escaped description of an exception for error reasons and logs.
    """
    text = str(error) or type(error).__name__
    if hasattr(error, "reasons"):
        # twisted.web's ResponseFailed and friends wrap a list of failures.
        reasons = getattr(error, "reasons")
        if isinstance(reasons, list) and reasons:
            text = "; ".join(
                str(r.value) or type(r.value).__name__ for r in reasons if isinstance(r, Failure)
            ) or text
    return escape_control(f"{type(error).__name__}: {text}", 300)


def _fault_code(code: object) -> int:
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    try:
        return int(str(code))
    except ValueError:
        return -1


def _split_pem(data: bytes) -> list[bytes]:
    """
    Every certificate of a PEM bundle.  (C{Certificate.loadPEM} of a bundle
    keeps only the first one.)
    """
    begin = b"-----BEGIN CERTIFICATE-----"
    end = b"-----END CERTIFICATE-----"
    blocks = []
    start = data.find(begin)
    while start != -1:
        stop = data.find(end, start)
        if stop == -1:
            break
        blocks.append(data[start : stop + len(end)] + b"\n")
        start = data.find(begin, stop)
    return blocks


#: The most bytes an answer's status line and headers may take (interim
#: C{1xx} answers included).  Twisted's client keeps every header line it is
#: sent: a server sending header lines without end would grow the hub's
#: memory by tens of megabytes a second until the request times out.
MAX_RESPONSE_HEAD = 64 * 1024

#: Takes the client parser's "Ignoring unexpected 1xx response" lines: a
#: server could send thousands of them for one request.
_SILENT = HubLogger(observer=lambda event: None)  # type: ignore[arg-type]


class ResponseHeadTooLarge(Exception):
    """
    An answer's status line and headers are larger than L{MAX_RESPONSE_HEAD}.
    """

    def __init__(self) -> None:
        super().__init__(f"the answer's headers are larger than {MAX_RESPONSE_HEAD} bytes")


class _BoundedClientProtocol(HTTP11ClientProtocol):  # type: ignore[misc]
    """
    Twisted's HTTP/1.1 client connection, with the head of each answer
    bounded (L{MAX_RESPONSE_HEAD}) and interim answers not logged.
    """

    _head = 0

    def request(self, request: Any) -> Any:
        self._head = 0
        sent = super().request(request)
        if self._parser is not None:
            self._parser._log = _SILENT
        return sent

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is not None and parser.state in (STATUS, HEADER):
            self._head += len(data)
            if self._head > MAX_RESPONSE_HEAD:
                try:
                    raise ResponseHeadTooLarge()
                except ResponseHeadTooLarge:
                    # As Twisted does with an answer it can not parse.
                    self._giveUp(Failure())
                return
        super().dataReceived(data)


class _QuietClientFactory(_HTTP11ClientFactory):  # type: ignore[misc]
    """
    Twisted's HTTP client connection factory without its two log lines
    ("Starting factory", "Stopping factory") for every new connection, and
    with the head of answers bounded (L{_BoundedClientProtocol}).
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _BoundedClientProtocol(self._quiescentCallback)


def closed_before_answer(failure: Failure) -> bool:
    """
    Whether a request failed because its connection was closed (by the
    server, or reset) before any answer: a kept connection the server had
    closed meanwhile.  Sending it again on a new connection is then safe.
    Not for TLS failures, timeouts or answers that could not be read.
    """
    error = failure.value
    if not isinstance(error, (ResponseNeverReceived, RequestTransmissionFailed)):
        return False
    reasons = getattr(error, "reasons", None) or []
    return bool(reasons) and all(
        isinstance(r, Failure) and isinstance(r.value, (ConnectionDone, ConnectionLost))
        for r in reasons
    )


class _QuietPool(HTTPConnectionPool):  # type: ignore[misc]
    """
    An C{HTTPConnectionPool} that, once its cached connections were closed
    (the client is closing), closes a connection handed back to it after
    that (its answer was read just before) instead of keeping it.
    """

    closing = False

    def closeCachedConnections(self) -> Any:
        self.closing = True
        return super().closeCachedConnections()

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.closing:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


def quiet_pool(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """
    An C{HTTPConnectionPool} whose connections are made without a log line
    each: a poller whose server closes every connection, or is down, would
    otherwise log two lines per poll beside its own.  A connection handed
    back after the pool's connections were closed is closed too.
    """
    pool = _QuietPool(reactor, persistent=persistent)
    # The factory class is the pool's documented way to make connections,
    # though marked private; only its noise differs.
    pool._factory = _QuietClientFactory
    return pool


def tls_policy(ca_file: str | None) -> StrictPolicyForHTTPS:
    """
    The HTTPS policy for an endpoint: verify the server's certificate and
    host name (strictly: L{fedhub.tlsnames}) against the platform's trust
    store, or against the certificates of C{ca_file} (a PEM bundle) when
    given.

    Reads C{ca_file}: call it outside the reactor's hot path.

    @raise XMLRPCError: when C{ca_file} can not be read or holds no certificate.
    """
    if ca_file is None:
        return StrictPolicyForHTTPS(BrowserLikePolicyForHTTPS())  # type: ignore[no-untyped-call]
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    try:
        with open(ca_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise XMLRPCError(ca_file, "-", f"can not read CA file: {e.strerror}") from None
    blocks = _split_pem(data)
    if not blocks:
        raise XMLRPCError(ca_file, "-", "CA file holds no PEM certificate")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise XMLRPCError(ca_file, "-", f"bad certificate in CA file: {_describe(e)}") from None
    roots = trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
    return StrictPolicyForHTTPS(
        BrowserLikePolicyForHTTPS(trustRoot=roots)  # type: ignore[no-untyped-call]
    )


# --- the client ---------------------------------------------------------


@implementer(IXMLRPCCaller)
class XMLRPCClient:
    """
    XML-RPC over HTTP(S) to one endpoint, with the limits described in the
    module docstring.

    @ivar url: The endpoint.
    @ivar timeout: Seconds one request may take, connecting to last byte.
    @ivar max_response_bytes: The size cap of one response.
    @ivar calls: Requests made so far.
    @ivar failures: Requests that failed, by error class name.
    @ivar bytes_received: Response bytes read so far (capped ones included).
    """

    log = HubLogger()

    def __init__(
        self,
        url: str,
        reactor: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        ca_file: str | None = None,
        headers: Mapping[str, str] | None = None,
        multicall_method: str = "system.multicall",
        persistent: bool = True,
        agent: IAgent | None = None,
    ) -> None:
        if not (url.startswith("http://") or url.startswith("https://")):
            raise XMLRPCError(url, "-", "the URL must start with http:// or https://")
        if timeout <= 0:
            raise XMLRPCError(url, "-", "the timeout must be positive")
        if max_response_bytes <= 0:
            raise XMLRPCError(url, "-", "the response size cap must be positive")
        self.url = url
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.multicall_method = multicall_method
        self.calls = 0
        #: Calls sent again because a kept connection closed before any answer.
        self.resent = 0
        self.failures: dict[str, int] = {}
        self.bytes_received = 0
        self._reactor = reactor
        self._ca_file = ca_file
        self._persistent = persistent
        self._agent = agent
        self._pool: HTTPConnectionPool | None = None
        self._headers = {"User-Agent": USER_AGENT, "Content-Type": "text/xml"}
        self._headers.update(headers or {})
        self._in_flight: set[Deferred[Any]] = set()

    def _get_agent(self) -> IAgent:
        # Built on first use, not in the constructor: it reads the CA file.
        if self._agent is None:
            self._pool = quiet_pool(self._reactor, persistent=self._persistent)
            self._pool.maxPersistentPerHost = 2
            # Servers close idle connections (Apache after 5 s by default);
            # keeping ours much longer only invites a failed reuse.
            self._pool.cachedConnectionTimeout = 30
            self._agent = Agent(  # type: ignore[no-untyped-call]
                self._reactor,
                contextFactory=tls_policy(self._ca_file),
                connectTimeout=self.timeout,
                pool=self._pool,
            )
        return self._agent

    def call(self, method: str, *params: Any) -> Deferred[Any]:
        """
        Call C{method} with positional C{params}.

        @return: a Deferred firing with the decoded result, or failing with
            an L{XMLRPCError} (L{XMLRPCFault} for a fault).
        """
        try:
            payload = encode_call(method, params)
        except (TypeError, OverflowError) as e:
            return _failed(XMLRPCError(self.url, method, f"can not encode the parameters: {e}"))
        try:
            agent = self._get_agent()
        except XMLRPCError as e:
            return _failed(e)
        self.calls += 1
        headers = Headers({k.encode("latin-1"): [v.encode("latin-1")] for k, v in self._headers.items()})

        def request() -> Deferred[IResponse]:
            sent: Deferred[IResponse] = agent.request(
                b"POST", self.url.encode("ascii"), headers, _BytesProducer(payload)
            )
            return sent

        def again(failure: Failure) -> Deferred[IResponse] | Failure:
            # A kept connection the server had closed (an HTTP/1.0 server
            # closes after each answer) fails before any answer: the call
            # did not reach the server, so it goes once more, on a new
            # connection.  (Twisted's pool does this for GET, not POST.)
            if closed_before_answer(failure):
                self.resent += 1
                return request()
            return failure

        d: Deferred[Any] = request()
        d.addErrback(again)
        d.addCallbacks(
            lambda response: self._read(response, method),
            lambda failure: self._transport_failed(failure, method),
        )

        def timed_out(result: Any, timeout: float) -> Any:
            # addTimeout calls this only when the timeout went off, whatever
            # failure the cancellation left behind.
            if isinstance(result, Failure):
                return _failure(XMLRPCTimeout(self.url, method, timeout))
            return result

        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=timed_out)
        self._in_flight.add(d)

        def settle(result: Any) -> Any:
            self._in_flight.discard(d)
            if isinstance(result, Failure):
                name = type(result.value).__name__
                self.failures[name] = self.failures.get(name, 0) + 1
            return result

        d.addBoth(settle)
        return d

    def _transport_failed(self, failure: Failure, method: str) -> Failure:
        if failure.check(XMLRPCError):  # type: ignore[no-untyped-call]
            return failure
        reasons = getattr(failure.value, "reasons", None) or []
        if isinstance(failure.value, CancelledError) or any(
            isinstance(r, Failure) and isinstance(r.value, CancelledError) for r in reasons
        ):
            # The call was cancelled (by close() or a timeout): say so.
            return _failure(CancelledError())
        return _failure(TransportError(self.url, method, _describe(cast(BaseException, failure.value))))

    def _read(self, response: IResponse, method: str) -> Deferred[Any]:
        if response.code != 200:
            location = None
            if 300 <= response.code < 400:
                found = response.headers.getRawHeaders(b"location")
                location = found[-1].decode("latin-1") if found else None
            return _discard(response, HTTPStatusError(
                self.url, method, response.code, response.phrase.decode("latin-1", "replace"),
                location,
                parse_retry_after((response.headers.getRawHeaders(b"retry-after") or [None])[0]),
            ))
        kind = response.headers.getRawHeaders(b"content-type", [b""])[-1]
        if kind.split(b";")[0].strip().lower() == b"text/html":
            # An error page of a proxy or a web server in front of the service.
            return _discard(response, BadResponse(
                self.url, method, "the answer is an HTML page, not XML-RPC (is the URL the "
                "service's XML-RPC endpoint?)"))
        encoding = response.headers.getRawHeaders(b"content-encoding", [b"identity"])[-1]
        if encoding.strip().lower() not in (b"identity", b""):
            return _discard(response, BadResponse(
                self.url, method, f"unexpected content encoding {encoding!r}"))
        length = response.length
        if length is not UNKNOWN_LENGTH and cast(int, length) > self.max_response_bytes:
            return _discard(response, ResponseTooLarge(
                self.url, method, self.max_response_bytes, cast(int, length), announced=True),
                limit=0)
        parser: _ResponseParser | None = None

        def cancel(d: Deferred[Any]) -> None:
            if parser is not None:
                parser.cancel()

        finished: Deferred[Any] = Deferred(cancel)
        parser = _ResponseParser(finished, self.url, method, self.max_response_bytes)
        counted = parser

        def count(result: Any) -> Any:
            self.bytes_received += counted._received
            return result

        finished.addBoth(count)
        response.deliverBody(parser)  # type: ignore[no-untyped-call]
        return finished

    def multicall(self, calls: Sequence[Call], batch_size: int = DEFAULT_BATCH_SIZE) -> Deferred[list[Any]]:
        """
        Make C{calls} in requests of at most C{batch_size} calls each, one
        request after the other.

        @return: a Deferred firing with one entry per call, in order: its
            result, or the L{XMLRPCFault} it answered with.  A failed request
            (timeout, HTTP error, malformed answer) fails the whole Deferred.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        results: list[Any] = []
        batches = [list(calls[i : i + batch_size]) for i in range(0, len(calls), batch_size)]
        current: list[Deferred[Any]] = []

        def cancel(_: Deferred[list[Any]]) -> None:
            batches.clear()
            for d in current:
                d.cancel()

        done: Deferred[list[Any]] = Deferred(cancel)

        def next_batch(_: object = None) -> None:
            current.clear()
            if done.called:
                return
            if not batches:
                done.callback(results)
                return
            batch = batches.pop(0)
            d = self.call(
                self.multicall_method,
                [{"methodName": c.method, "params": list(c.params)} for c in batch],
            )
            current.append(d)
            d.addCallback(collect, batch)
            d.addCallbacks(next_batch, lambda f: None if done.called else done.errback(f))

        def collect(answer: Any, batch: list[Call]) -> None:
            if not isinstance(answer, list) or len(answer) != len(batch):
                raise BadResponse(self.url, self.multicall_method,
                                  f"multicall answered {type(answer).__name__} "
                                  f"for {len(batch)} calls")
            for c, item in zip(batch, answer):
                if isinstance(item, list) and len(item) == 1:
                    results.append(item[0])
                elif isinstance(item, dict) and "faultCode" in item:
                    results.append(XMLRPCFault(self.url, c.method, _fault_code(item["faultCode"]),
                                               str(item.get("faultString", ""))))
                else:
                    raise BadResponse(self.url, c.method,
                                      f"multicall entry is {type(item).__name__}, "
                                      "neither [result] nor a fault")

        next_batch()
        return done

    def close(self) -> Deferred[None]:
        """
        Cancel calls in progress and close idle connections.
        """
        for d in list(self._in_flight):
            d.cancel()
        if self._pool is not None:
            closed: Deferred[None] = self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]
            return closed
        return succeed(None)


def _failure(error: BaseException) -> Failure:
    """
    A Failure of C{error} (typed: Twisted's constructor is not).
    """
    return Failure(error)  # type: ignore[no-untyped-call]


def _failed(error: XMLRPCError) -> Deferred[Any]:
    """
    A Deferred that has already failed with C{error}.
    """
    d: Deferred[Any] = Deferred()
    d.errback(_failure(error))
    return d
