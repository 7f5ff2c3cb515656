"""
A hardened SMTP listener for Bugzilla notification mail.

It is built on C{twisted.mail.smtp.ESMTP} (the only place fedhub imports
C{twisted.mail}) and replaces the parts of it that are unsafe for a listener
facing other machines:

  - line framing: Twisted's line receiver drops a server back to command mode
    after a line longer than 16384 bytes inside C{DATA}, so the rest of the
    body runs as SMTP commands (forged mail injection).  Here a too-long line
    fails the mail, the rest of the mail is read and thrown away, and the
    answer comes at its end; the connection never leaves C{DATA} early;
  - C{STARTTLS}: plaintext pipelined after the command is thrown away, never
    executed after the switch to TLS (the CVE-2011-0411 class), and the
    session starts over;
  - pipelining: while a mail is being handed over, reading stops, so answers
    always come in order and a C{QUIT} can not cut the answer to a mail;
  - temporary failures answer C{451}/C{452}, never C{550}; C{250} comes only
    after the hand-over fired (durable in the outbox);
  - limits: size (C{SIZE} advertised, C{MAIL FROM ... SIZE=n} checked, the
    body counted as it arrives, never buffered beyond the limit), recipients
    per mail, line length, connections overall and per peer, client
    networks, idle, C{DATA} and hand-over timeouts, errors per session;
    no commands are read while replies the client has not read pile up,
    and a connection that does not close when told to is aborted;
  - access: only configured recipients (it never relays), optional
    mandatory TLS, client certificates checked against a CA, and an optional
    shared-secret header (compared in constant time, stripped before
    parsing).

L{BugmailListener} is the service; applications embed it with their own
callback (L{BugmailListener.with_callback}) or publisher
(L{BugmailListener.with_publisher}).  See C{docs/smtp.md}.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.tcp import Server as _TCPServer
from twisted.mail.smtp import COMMAND, DATA, ESMTP, Address, AddressError, SMTPBadRcpt, User
from twisted.python.failure import Failure
from zope.interface import implementer

from fedhub.errors import FedhubError
from fedhub.interfaces import IPublisher
from fedhub.logs import HubLogger
from fedhub.producers.bugzilla.producer import (
    DEFAULT_PACKAGE_PRODUCTS,
    Accepted,
    BugmailIntake,
    Enricher,
    EventCallback,
    EventPublisher,
    IBugmailIntake,
    Quarantine,
    classify_failure,
)
from fedhub.text import escape_control
from fedhub.waiting import with_timeout

__all__ = [
    "DEFAULT_ENDPOINT",
    "BugmailListener",
    "BugmailSMTP",
    "BugmailSMTPFactory",
    "ListenerSettings",
    "SecretMismatch",
    "TLSFilesError",
    "load_tls_options",
    "settings_from_options",
    "strip_secret_header",
]

#: Where the listener binds unless told otherwise: loopback only.
DEFAULT_ENDPOINT = "tcp:8025:interface=127.0.0.1"
#: Commands a mail needs besides one C{RCPT} per recipient: C{EHLO},
#: C{STARTTLS}, C{EHLO} again, C{MAIL} and C{DATA}.
MAIL_COMMANDS = 5
#: Commands a session may send before its first mail and between two, at
#: least (see L{ListenerSettings.max_commands_per_mail}).
DEFAULT_COMMANDS_PER_MAIL = 100

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_VERB = re.compile(rb"[A-Za-z]{1,16}")
_UNPRINTABLE = re.compile(rb"[^\x20-\x7e]")
# A path of the plain form almost every client sends, <local@domain> or
# local@domain, both parts made of atom characters and dots only: what
# twisted.mail's Address makes of it is known without its tokenizer.
_ATOMS = rb"[-A-Za-z0-9!#$%&'*+/=?^_`{|}~.]++"
_PLAIN_PATH = re.compile(rb"<(%s)@(%s)>|(%s)@(%s)" % (_ATOMS, _ATOMS, _ATOMS, _ATOMS))
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----\r?\n.+?\r?\n"
    rb"-----END (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----",
    re.DOTALL,
)


#: What a listener counts (its C{counters}), all there from its start, at 0,
#: so that a metric's first event shows as an increase: C{connections},
#: C{connections_refused_<reason>}, C{mails_<outcome>} of the mails
#: answered 250, C{mails_refused_<kind>} (see
#: L{fedhub.producers.bugzilla.producer.Refusal}, and C{limit} and
#: C{secret}), and the other events.
COUNTERS: tuple[str, ...] = (
    "connections",
    *(f"connections_refused_{reason}" for reason in ("network", "limit", "peer_limit")),
    *(f"mails_{outcome}" for outcome in ("published", "duplicate", "quarantined")),
    *(f"mails_refused_{kind}" for kind in (
        "storage", "unavailable", "content", "rejected", "internal", "limit", "secret")),
    "recipients_refused", "idle_timeouts", "data_timeouts", "delivery_timeouts",
    "error_limit_closes", "command_limit_closes", "session_time_closes",
)


# --- settings -------------------------------------------------------------------


def _normalize_address(address: str) -> str:
    return address.strip().lower()


@dataclass(frozen=True)
class ListenerSettings:
    """
    What the SMTP listener accepts, and its limits.

    @ivar recipients: The addresses mail is accepted for (C{local@domain},
        compared case-insensitively); everything else is refused, so the
        listener never relays.
    @ivar hostname: The name it greets with.
    @ivar allowed_networks: Client networks that may connect (given as
        strings such as C{"192.0.2.0/24"} or as C{ipaddress} networks; kept
        parsed); empty: any.  Connections over UNIX sockets are always
        allowed.
    @ivar max_message_size: The largest mail in bytes (advertised as C{SIZE}).
    @ivar max_recipients: Recipients per mail at most.
    @ivar max_line_length: The longest line of a mail in bytes, CRLF included
        (RFC 5321 asks for at least 1000).
    @ivar max_command_length: The longest command line, CRLF included.
    @ivar max_connections: Connections at once at most; a session whose
        mail is being handed over keeps its place until the hand-over ends,
        even when its connection is gone.
    @ivar max_connections_per_peer: Connections at once from one address
        (an IPv4 address and its IPv4-mapped IPv6 form are one address).
    @ivar max_errors: Refused commands in one session before it is closed.
    @ivar max_commands_per_mail: Commands a session may send before its
        first mail and between two mails (a mail handed over, published or
        a duplicate, starts the count again; a refused one, answered C{4xx}
        or C{5xx}, does not, nor does one quarantined, though answered
        C{250}); one more closes it.  Commands that are answered but move
        no mail forward (C{NOOP}, C{RSET}, C{HELO}, a refused C{RCPT}, a
        refused or quarantined mail) would otherwise hold a connection slot
        for ever.
        C{None} (the default): L{DEFAULT_COMMANDS_PER_MAIL}, or
        C{max_recipients} + L{MAIL_COMMANDS} when that is more.
    @ivar max_session_time: Seconds a session may last: past them it is
        closed at once, unless a mail's data is coming in or being handed
        over, and then right after that mail's answer (at its next command
        when the mail was refused at the end of its data).
    @ivar idle_timeout: Seconds a client may stay silent.
    @ivar data_timeout: Seconds a client may take to send one mail.
    @ivar delivery_timeout: Seconds to wait for the hand-over of a mail
        before answering C{451} (the mail may still be published; the retry
        is then recognized as a duplicate).
    @ivar tls_certificate: The server certificate (PEM; intermediate
        certificates may follow it) offered with C{STARTTLS}; C{None}: no TLS.
    @ivar tls_key: Its private key (PEM); C{None}: in C{tls_certificate}.
    @ivar tls_client_ca: A CA bundle; when set, clients must present a
        certificate it signed, and TLS is required.
    @ivar tls_required: Refuse C{MAIL} before C{STARTTLS}.
    @ivar secret_header: The header that must carry the shared secret.
    @ivar secret: The shared secret (bytes), or C{None}.
    @ivar secret_file: A file holding the shared secret, read when the
        listener starts (surrounding white space is ignored).
    """

    recipients: frozenset[str]
    hostname: str = "localhost"
    allowed_networks: tuple[Network | str, ...] = ()
    max_message_size: int = 1024 * 1024
    max_recipients: int = 10
    max_line_length: int = 10_000
    max_command_length: int = 2048
    max_connections: int = 20
    max_connections_per_peer: int = 5
    max_errors: int = 20
    max_commands_per_mail: int | None = None
    max_session_time: float = 3600.0
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    delivery_timeout: float = 120.0
    tls_certificate: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_required: bool = False
    secret_header: str = "X-Fedhub-Secret"
    secret: bytes | None = field(default=None, repr=False)
    secret_file: str | None = None

    def __post_init__(self) -> None:
        recipients = frozenset(_normalize_address(a) for a in self.recipients)
        if not recipients:
            raise ValueError("at least one recipient address is needed")
        for address in recipients:
            local, at, domain = address.rpartition("@")
            if not (at and local and domain):
                raise ValueError(f"{address!r} is not an address of the form local@domain")
        object.__setattr__(self, "recipients", recipients)
        object.__setattr__(
            self,
            "allowed_networks",
            tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks),
        )
        for name in (
            "max_message_size",
            "max_recipients",
            "max_connections",
            "max_connections_per_peer",
            "max_errors",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_commands_per_mail is None:
            object.__setattr__(self, "max_commands_per_mail",
                               max(DEFAULT_COMMANDS_PER_MAIL, self.max_recipients + MAIL_COMMANDS))
        elif self.max_commands_per_mail < self.max_recipients + MAIL_COMMANDS:
            raise ValueError(
                f"max_commands_per_mail must be at least max_recipients + {MAIL_COMMANDS}"
                f" ({self.max_recipients + MAIL_COMMANDS}): a mail to every recipient needs"
                " that many (EHLO, STARTTLS, EHLO again, MAIL, one RCPT each, DATA)"
            )
        if self.max_line_length < 100 or self.max_command_length < 100:
            raise ValueError("line length limits must be at least 100 bytes")
        for name in ("max_session_time", "idle_timeout", "data_timeout", "delivery_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0")
        if self.tls_key is not None and self.tls_certificate is None:
            raise ValueError("tls_key needs tls_certificate")
        if (self.tls_client_ca or self.tls_required) and self.tls_certificate is None:
            raise ValueError("tls_client_ca and tls_required need tls_certificate")
        try:
            self.hostname.encode("idna")
        except UnicodeError:
            raise ValueError(f"{self.hostname!r} is not a host name") from None
        if not self.hostname or any(c.isspace() for c in self.hostname):
            raise ValueError(f"{self.hostname!r} is not a host name")
        if not re.fullmatch(r"[!-9;-~]{1,64}", self.secret_header):
            raise ValueError(f"{self.secret_header!r} is not a header name")

    @property
    def networks(self) -> tuple[Network, ...]:
        """
        The allowed client networks, parsed.
        """
        return tuple(n for n in self.allowed_networks if not isinstance(n, str))

    @property
    def domains(self) -> frozenset[str]:
        """
        The domains of the accepted addresses.
        """
        return frozenset(a.rpartition("@")[2] for a in self.recipients)

    @property
    def requires_tls(self) -> bool:
        """
        Whether C{MAIL} is refused before C{STARTTLS}.
        """
        return self.tls_required or self.tls_client_ca is not None


def settings_from_options(options: Mapping[str, Any]) -> ListenerSettings:
    """
    The listener settings from the C{bugzilla-smtp} plugin's options.
    """
    keys = (
        "hostname",
        "max_message_size",
        "max_recipients",
        "max_line_length",
        "max_connections",
        "max_connections_per_peer",
        "max_errors",
        "max_commands_per_mail",
        "max_session_time",
        "idle_timeout",
        "data_timeout",
        "delivery_timeout",
        "tls_certificate",
        "tls_key",
        "tls_client_ca",
        "tls_required",
        "secret_file",
        "secret_header",
    )
    given = {key: options[key] for key in keys if options.get(key) is not None}
    return ListenerSettings(
        recipients=frozenset(options["recipients"]),
        allowed_networks=tuple(options.get("allowed_networks") or ()),
        **given,
    )


# --- TLS ----------------------------------------------------------------------------


class TLSFilesError(FedhubError):
    """
    The listener's certificate, key or client CA files could not be used.

    @ivar path: The file concerned.
    @ivar reason: What is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFilesError(path, e.strerror or str(e)) from None


def _certificates(data: bytes, path: str) -> list[Any]:
    from cryptography import x509

    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise TLSFilesError(path, "holds no PEM certificate")
    try:
        # Every block on its own: Twisted's Certificate.loadPEM of a bundle
        # keeps only the first certificate.
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise TLSFilesError(path, f"not a valid certificate: {e}") from None


def _private_key(data: bytes, path: str) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    match = _PEM_PRIVATE_KEY.search(data)
    if match is None:
        raise TLSFilesError(path, "holds no PEM private key")
    try:
        return load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError) as e:
        raise TLSFilesError(path, f"holds no usable private key (encrypted keys are not supported): {e}") from None


def read_secret(settings: ListenerSettings) -> bytes | None:
    """
    The shared secret mail must carry: the settings' own, or what the secret
    file holds, surrounding white space left out; C{None} for none.

    @raise OSError: when the file can not be read.
    @raise ValueError: when it holds nothing.
    """
    if settings.secret is not None or settings.secret_file is None:
        return settings.secret
    with open(settings.secret_file, "rb") as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError(f"the secret file {settings.secret_file} is empty")
    return secret


#: The C{bugzilla-smtp} options naming TLS files, in the order a file named
#: by several is blamed on.
_TLS_KEYS = ("tls_certificate", "tls_key", "tls_client_ca")


def file_problems(settings: ListenerSettings) -> list[tuple[str, str]]:
    """
    Read the files the listener reads when it starts (L{load_tls_options},
    L{read_secret}) and say what it would refuse, before anything starts.

    @return: C{(option, what is wrong)} pairs, the option one of the
        C{bugzilla-smtp} plugin's.
    """
    problems: list[tuple[str, str]] = []
    try:
        load_tls_options(settings)
    except TLSFilesError as e:
        key = next((k for k in _TLS_KEYS if getattr(settings, k) == e.path), _TLS_KEYS[0])
        problems.append((key, str(e)))
    try:
        read_secret(settings)
    except (OSError, ValueError) as e:
        problems.append(("secret_file", str(e)))
    return problems


def load_tls_options(settings: ListenerSettings) -> Any:
    """
    The server-side TLS context factory for C{STARTTLS} (TLS 1.2 or newer),
    requiring client certificates when a client CA is configured.  Reads
    files: call it when the listener starts.

    @return: a C{CertificateOptions}, or C{None} without a certificate.
    @raise TLSFilesError: when a file is missing or invalid.
    """
    if settings.tls_certificate is None:
        return None
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    cert_path = settings.tls_certificate
    cert_data = _read(cert_path)
    chain = _certificates(cert_data, cert_path)
    key_path = settings.tls_key or cert_path
    key = _private_key(_read(key_path) if settings.tls_key else cert_data, key_path)
    ca_certs: list[Any] = []
    if settings.tls_client_ca is not None:
        from OpenSSL.crypto import X509

        # The trust store still wants pyOpenSSL's certificate objects.
        ca_certs = [
            X509.from_cryptography(c)
            for c in _certificates(_read(settings.tls_client_ca), settings.tls_client_ca)
        ]
    try:
        options = CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=TLSVersion.TLSv1_2,
            verify=bool(ca_certs),
            caCerts=ca_certs or None,
            requireCertificate=bool(ca_certs),
        )
        # Build the context now, so a key that does not match the
        # certificate fails the start instead of the first handshake.
        options.getContext()
    except Exception as e:
        raise TLSFilesError(key_path, f"certificate and key do not work together: {e}") from None
    return options


# --- the shared secret ---------------------------------------------------------------


class SecretMismatch(FedhubError):
    """
    A mail lacks the shared-secret header, or carries a wrong secret.

    @ivar reason: C{"missing"} or C{"wrong"}.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"shared secret {reason}")


def strip_secret_header(raw: bytes, name: str, secret: bytes) -> bytes:
    """
    Check and remove the shared-secret header of a mail.

    Every occurrence of the header (folded lines included) in the top-level
    header block must carry C{secret} (compared with C{hmac.compare_digest});
    all of them are removed.

    @return: the mail without the header.
    @raise SecretMismatch: when it is missing or any occurrence is wrong.
    """
    target = name.lower().encode("ascii")
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        head, rest = raw, b""
    else:
        head, rest = raw[: end + 2], raw[end + 2 :]
    kept: list[bytes] = []
    values: list[bytes] = []
    in_secret = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if in_secret:
                values[-1] += line
            else:
                kept.append(line)
            continue
        label, colon, value = line.partition(b":")
        in_secret = bool(colon) and label.strip().lower() == target
        if in_secret:
            values.append(value)
        else:
            kept.append(line)
    if not values:
        raise SecretMismatch("missing")
    # Compare every occurrence, so the time taken does not depend on which
    # one is wrong.
    good = [hmac.compare_digest(v.strip(), secret) for v in values]
    if not all(good):
        raise SecretMismatch("wrong")
    return b"\r\n".join(kept) + rest


# --- the protocol -------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """
    The SMTP envelope of one mail, for logs.

    @ivar peer: The client, C{host:port}.
    @ivar helo: What it said in C{HELO}/C{EHLO}.
    @ivar sender: The C{MAIL FROM} address.
    @ivar recipients: The accepted C{RCPT TO} addresses.
    @ivar tls: Whether the mail came over TLS.
    """

    peer: str
    helo: str
    sender: str
    recipients: tuple[str, ...]
    tls: bool


def _text(data: bytes, limit: int = 200) -> str:
    return escape_control(data.decode("utf-8", "replace"), limit)


def _reply_text(text: str) -> bytes:
    """
    Text from anywhere made fit for an SMTP reply: one line of printable
    ASCII.
    """
    clean = escape_control(text, 200).encode("ascii", "backslashreplace")
    if _UNPRINTABLE.search(clean) is None:
        return clean
    return _UNPRINTABLE.sub(b"?", clean)


def _address_refusal(error: AddressError) -> bytes:
    """
    The text of the 553 for an address that could not be parsed: Twisted's
    error lists every token of the address, so a long one would make a reply
    line far over the 512 octets RFC 5321 allows (section 4.5.3.1.5).
    """
    return _reply_text(str(error))


def _parse_address(path: bytes, default_domain: bytes) -> Address:
    """
    C{Address(path, default_domain)}: for a plain path, the address it
    gives made without parsing the path again.

    @raise AddressError: as C{Address} does.
    """
    plain = _PLAIN_PATH.fullmatch(path)
    if plain is None:
        return Address(path, default_domain)  # type: ignore[no-untyped-call]
    local, domain = plain.group(1, 2) if plain.group(1) is not None else plain.group(3, 4)
    address: Address = Address.__new__(Address)
    address.addrstr = path
    address.local = local
    address.domain = domain
    return address


def _normal_host(host: str) -> str:
    """
    One form for each peer address: an IPv4-mapped IPv6 address (how a
    dual-stack listener sees an IPv4 client) becomes the IPv4 address, so
    per-peer limits and network checks treat both forms alike.
    """
    if ":" not in host:
        return host
    address, percent, zone = host.partition("%")
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError:
        return host
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed) + percent + zone


def _normal_network(network: Network) -> Network:
    """
    An IPv4-mapped IPv6 network as the IPv4 network it stands for, to
    match peers in the form L{_normal_host} gives them.
    """
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.network_address.ipv4_mapped is not None
    ):
        return ipaddress.IPv4Network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96)
        )
    return network


def _peer_host(address: IAddress) -> str:
    host = getattr(address, "host", None)
    if isinstance(host, str):
        return _normal_host(host)
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return "unix:" + name.decode("utf-8", "replace")
    if isinstance(name, str):
        return "unix:" + name
    return "unix"


def _peer_label(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        host = _normal_host(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _peer_host(address)


def _write(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, but sent at once when the transport is a
    plain TCP connection with nothing waiting to be sent.

    A reply written the usual way waits in the transport's buffer for the
    next round of the reactor, which registers the socket for writing, is
    told it is writable, sends, and unregisters it again: for one short
    reply to a client that waits for it, several times the cost of sending
    it.  Nothing is ever sent ahead of what is waiting, so replies keep
    their order; what the socket does not take (a full send buffer, an
    error) goes the usual way, where Twisted buffers it, retries and
    notices errors as it always does.  TLS connections and other
    transports always go the usual way.

    This reads the state of Twisted's TCP transport (its buffers and
    flags), which is not public: should a Twisted release no longer have
    it, every reply goes the usual way (and C{tests/test_smtp_writes.py}
    fails, to say the shortcut is gone).
    """
    if transport.__class__ is _TCPServer:
        try:
            idle = (
                not transport.TLS
                and transport.connected
                and not transport.disconnecting
                and not transport._writeDisconnected
                and not transport._tempDataBuffer
                and transport.offset == len(transport.dataBuffer)
            )
        except AttributeError:
            idle = False
        if idle:
            try:
                sent = transport.socket.send(data)
            except OSError:
                sent = 0
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)


def _enhanced(code: int, message: bytes) -> bytes:
    """
    A reply text with an enhanced status code: its own, or a generic one for
    the replies that need one.
    """
    if (code >= 400 or code in (250, 251, 252, 221)) and not _ENHANCED.match(message):
        return b"%d.0.0 %s" % (code // 100, message)
    return message


#: The reply lines every mail gets, by code and text as C{sendCode} is
#: given them, made once (single-line texts without CR or LF).
_FREQUENT_REPLIES: dict[tuple[int, bytes], bytes] = {
    (code, text): b"%3.3d " % (code,) + _enhanced(code, text)
    for code, text in (
        (250, b"Sender address accepted"),
        (250, b"Recipient address accepted"),
        (354, b"End data with <CR><LF>.<CR><LF>"),
        (250, b"2.0.0 OK"),
    )
}


@implementer(IPushProducer)
class BugmailSMTP(ESMTP):
    """
    One SMTP session of the listener.  See the module docstring for what it
    changes in C{twisted.mail.smtp.ESMTP}.

    It is the push producer of its replies: while the transport holds more
    replies than it wants to buffer (a client that sends commands and does
    not read the answers), the session reads no further commands.

    @cvar abort_timeout: Seconds a connection the session closed may take to
        send its last replies and close; then it is aborted, so a client
        that stops reading can not keep its connection slot for ever.
    """

    log = HubLogger()

    abort_timeout: float = 15.0

    def __init__(self, factory: BugmailSMTPFactory, address: IAddress) -> None:
        ESMTP.__init__(self, chal={}, contextFactory=factory.tls_options)  # type: ignore[no-untyped-call]
        self.factory = factory
        self.settings = factory.settings
        self.clock = factory.clock
        self.peer_host = _peer_host(address)
        self.peer = _peer_label(address)
        self.host = self.settings.hostname.encode("idna")
        self._input = bytearray()
        self._skipping = False
        self._processing = False
        self._waiting: Deferred[Any] | None = None
        # Hand-overs of this session that have not ended, answered or not
        # (one answered 451 after the delivery timeout still runs).
        self._hand_overs = 0
        self._closing = False
        # Set once the session has lasted max_session_time.
        self._expired = False
        # The mail so far: pieces of whole lines, each ending with CRLF.
        self._lines: list[bytes] = []
        self._size = 0
        self._data_error: tuple[int, bytes, str] | None = None
        self._envelope: Envelope | None = None
        self._errors = 0
        # Commands since the last mail was handed over (answered 250, and
        # not quarantined), or since the session began.
        self._commands = 0
        self._last_code = 0
        self._idle_call: IDelayedCall | None = None
        self._session_call: IDelayedCall | None = None
        self._data_call: IDelayedCall | None = None
        self._delivery_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._lost = False
        # Set once the session closes the connection itself (see _open).
        self._closed = False
        # Whether the transport asked to stop producing replies for now.
        self._output_paused = False
        self._registered = False

    # -- connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.canStartTLS = ITLSTransport.providedBy(self.transport) and self.ctx is not None
        self._helo = (None, self.peer_host.encode("utf-8", "replace"))
        self._tx.registerProducer(self, True)
        self._registered = True
        self.log.debug("SMTP connection from {peer}", peer=self.peer, producer=self.factory.producer)
        self.sendCode(220, self.host + b" ESMTP ready")
        self._start_idle()
        self._session_call = self.clock.callLater(self.settings.max_session_time,
                                                  self._session_expired)

    def connectionLost(self, reason: object = None) -> None:
        self._lost = True
        for name in ("_idle_call", "_session_call", "_data_call", "_delivery_call", "_abort_call"):
            call: IDelayedCall | None = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self._lines = []
        self._input = bytearray()
        self.mode = COMMAND
        if not self._hand_overs:
            # Otherwise the slot stays taken until the hand-over ends, so a
            # client that leaves right after its mail can not start more
            # hand-overs than max_connections allows.
            self.factory.unregister(self)
        self.log.debug("SMTP connection from {peer} closed", peer=self.peer,
                       producer=self.factory.producer)

    def shutdown(self) -> None:
        """
        Close the session because the listener stops: now when idle, after
        the answer when a mail is being handed over.
        """
        if self._waiting is not None:
            self._closing = True
            return
        self._close(421, b"4.3.2 Service shutting down, try again later")

    @property
    def _tx(self) -> Any:
        """
        The transport, untyped: TCP and TLS transports have more methods
        than C{ITransport} declares.
        """
        return self.transport

    def _open(self) -> bool:
        # The session's own flag too: over TLS, closing sets the TLS layer's
        # disconnecting, not the transport's, and the commands a client sent
        # after the closing reply would still run.
        return (not self._lost and not self._closed and self._tx is not None
                and not self._tx.disconnecting)

    def _close(self, code: int, text: bytes) -> None:
        if not self._open():
            return
        self.sendCode(code, text)
        self._lose()

    def _lose(self) -> None:
        """
        Close the connection once the replies are sent, and abort it when
        that takes longer than C{abort_timeout}: a client that does not read
        (or, over TLS, never finishes the handshake or the close) would
        otherwise keep it open for ever.
        """
        self._closed = True
        if self._registered:
            # A transport does not close while a producer is registered.
            self._registered = False
            self._tx.unregisterProducer()
        self._tx.loseConnection()
        if not self._lost and self._abort_call is None:
            self._abort_call = self.clock.callLater(self.abort_timeout, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if self._lost or self._tx is None:
            return
        self.log.info("SMTP client {peer} did not take its last replies; connection aborted",
                      peer=self.peer, producer=self.factory.producer)
        self._tx.abortConnection()

    # -- flow control of the replies -------------------------------------------------

    def pauseProducing(self) -> None:
        """
        The transport holds too many replies the client has not read: read
        no further commands until it has sent them.
        """
        self._output_paused = True
        if self._open():
            self._tx.pauseProducing()

    def resumeProducing(self) -> None:
        """
        The transport sent the replies it held: read and answer commands
        again, unless a mail is being handed over.
        """
        self._output_paused = False
        if self._waiting is None and self._open():
            self._tx.resumeProducing()
            self._process()

    def stopProducing(self) -> None:
        """
        The connection is gone; L{connectionLost} cleans up.
        """

    # -- timers ---------------------------------------------------------------------

    def _start_idle(self) -> None:
        if self._lost:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.settings.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.settings.idle_timeout, self._idle_timed_out)

    def _stop_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_timed_out(self) -> None:
        self._idle_call = None
        self.factory.counters["idle_timeouts"] += 1
        self.log.info("SMTP client {peer} idle too long; closing", peer=self.peer,
                      producer=self.factory.producer)
        self._lines = []
        self._close(421, b"4.4.2 Idle timeout, closing connection")

    def _session_expired(self) -> None:
        self._session_call = None
        self._expired = True
        self.factory.counters["session_time_closes"] += 1
        self.log.info("SMTP client {peer} kept its session for {seconds}s; closing",
                      peer=self.peer, seconds=self.settings.max_session_time,
                      producer=self.factory.producer)
        if self.mode == COMMAND and self._waiting is None:
            self._close_expired()

    def _close_expired(self) -> None:
        self._lines = []
        self._close(421, b"4.4.2 Session lasted too long, closing connection")

    def _data_timed_out(self) -> None:
        self._data_call = None
        self.factory.counters["data_timeouts"] += 1
        self.log.info("SMTP client {peer} took too long to send a mail; closing", peer=self.peer,
                      producer=self.factory.producer)
        self._lines = []
        self._close(421, b"4.4.2 Timeout receiving the mail, closing connection")

    # -- framing --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._input += data
        self._process()

    def _process(self) -> None:
        """
        Handle every complete line in the buffer, one at a time, until the
        session waits for a hand-over or closes.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while self._waiting is None and not self._output_paused and self._open():
                if not self._next_line():
                    break
        finally:
            self._processing = False

    def _next_line(self) -> bool:
        buffer = self._input
        if self.mode == DATA and not self._skipping and self._data_error is None:
            if self._data_block():
                return True
        limit = self.settings.max_line_length if self.mode == DATA else self.settings.max_command_length
        end = buffer.find(b"\r\n")
        if self._skipping:
            # The rest of a line that was too long: drop it up to its end.
            if end < 0:
                keep = buffer.endswith(b"\r")
                del buffer[: len(buffer) - 1 if keep else len(buffer)]
                return False
            del buffer[: end + 2]
            self._skipping = False
            return True
        if end < 0:
            if len(buffer) >= limit:
                self._line_too_long(limit)
                return True
            return False
        if end > limit - 2:
            del buffer[: end + 2]
            self._line_too_long(limit, complete=True)
            return True
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        self.lineReceived(line)
        return True

    def _data_block(self) -> bool:
        """
        Take every complete line of the mail that is in the buffer in one
        step, when none of them is too long and the mail stays within its
        size: the common case, for which handling line by line costs more
        than the rest of the session.  The end-of-data line and anything
        unusual are left to the line-by-line path (C{False}), which decides
        exactly as it would have for those lines.
        """
        buffer = self._input
        if buffer[:3] == b".\r\n":
            return False
        end = buffer.find(b"\r\n.\r\n")
        cut = end + 2 if end >= 0 else buffer.rfind(b"\r\n") + 2
        if cut < 2:
            return False
        block = bytes(buffer[:cut])
        limit = self.settings.max_line_length - 2
        if cut - 2 > limit and max(map(len, block.split(b"\r\n"))) > limit:
            return False
        if b"\r\n." in block or block[:1] == b".":
            # Undo dot-stuffing: every line starting with a dot loses one.
            block = (b"\r\n" + block).replace(b"\r\n.", b"\r\n")[2:]
        size = self._size + len(block)
        if size > self.settings.max_message_size:
            return False
        del buffer[:cut]
        self._size = size
        self._lines.append(block)
        self._start_idle()
        return True

    def _line_too_long(self, limit: int, complete: bool = False) -> None:
        """
        Refuse a line longer than C{limit}: the mail it is part of, or the
        command.  When its end has not arrived (C{complete} false), what is
        in the buffer is dropped and so is the rest of the line, up to its
        CRLF, when it comes; a complete line was already dropped, and the
        next line is kept.
        """
        if not complete:
            keep = self._input.endswith(b"\r")
            del self._input[: len(self._input) - 1 if keep else len(self._input)]
            self._skipping = True
        self._start_idle()
        if self.mode == DATA:
            # Stay in DATA: the rest of the mail is read and thrown away, and
            # the answer comes at its end.  Never run mail text as commands.
            self._fail_data(500, b"5.5.2 Line too long (limit %d bytes)" % limit,
                            f"a line longer than {limit} bytes")
        else:
            self.sendCode(500, b"5.5.2 Line too long")
            self._count_error()

    def lineReceived(self, line: bytes) -> None:
        self._start_idle()
        if self.mode == DATA:
            self._data_line(line)
        else:
            self._command(line)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """
        Send a reply; single-line replies without an enhanced status code
        (those C{twisted.mail} writes itself) get a generic one.
        """
        self._last_code = code
        line = _FREQUENT_REPLIES.get((code, message))
        if line is None:
            if b"\n" in message:
                ESMTP.sendCode(self, code, message)  # type: ignore[no-untyped-call]
                return
            message = _enhanced(code, message)
            if b"\r" in message:
                ESMTP.sendCode(self, code, message)  # type: ignore[no-untyped-call]
                return
            # One line: what ESMTP.sendCode writes for it, without splitting.
            line = b"%3.3d " % (code,) + message
        self.sendLine(line)  # type: ignore[no-untyped-call]

    def sendLine(self, line: bytes) -> None:
        """
        Write one reply line: see L{_write}.
        """
        _write(self.transport, line + b"\r\n")

    # -- commands ----------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        if self._expired:
            self._close_expired()
            return
        self._commands += 1
        if self._commands > cast(int, self.settings.max_commands_per_mail):
            self.log.info("SMTP client {peer} sent {count} commands without a mail; closing",
                          peer=self.peer, count=self._commands - 1,
                          producer=self.factory.producer)
            self.factory.counters["command_limit_closes"] += 1
            self._close(421, b"4.7.0 Too many commands without a mail, closing connection")
            return
        words = line.split(None, 1)
        if not words or not _VERB.fullmatch(words[0]):
            self.sendCode(500, b"5.5.2 Syntax error")
            self._count_error()
            return
        self._last_code = 0
        try:
            # What ESMTP.state_COMMAND does with the line, on the words
            # split above: the verb's method, given the rest without the
            # white space around it.
            method = self.lookupMethod(words[0]) or self.do_UNKNOWN  # type: ignore[no-untyped-call]
            method(words[1].rstrip() if len(words) == 2 else b"")
        except Exception:
            self.log.failure("SMTP command from {peer} failed", peer=self.peer,
                             producer=self.factory.producer)
            self.sendCode(451, b"4.3.0 Local error in processing")
        # 502: a known command the listener does not offer (VRFY, AUTH),
        # which is no mistake of the client's.
        if self._last_code >= 500 and self._last_code != 502:
            self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.settings.max_errors:
            self.log.info("SMTP client {peer} made {count} errors; closing", peer=self.peer,
                          count=self._errors, producer=self.factory.producer)
            self.factory.counters["error_limit_closes"] += 1
            self._close(421, b"4.7.0 Too many errors, closing connection")

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"SIZE": [b"%d" % self.settings.max_message_size],
            b"8BITMIME": None,
            b"PIPELINING": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        return ext

    def _reset(self) -> None:
        self._from = None
        self._to = []

    def do_HELO(self, rest: bytes) -> None:
        if not rest.strip():
            self.sendCode(501, b"5.5.4 HELO needs a domain or address")
            return
        self._helo = (rest.strip(), self.peer_host.encode("utf-8", "replace"))
        self._reset()
        self.sendLine(b"250 " + self.host)  # type: ignore[no-untyped-call]

    def do_EHLO(self, rest: bytes) -> None:
        if not rest.strip():
            self.sendCode(501, b"5.5.4 EHLO needs a domain or address")
            return
        self._helo = (rest.strip(), self.peer_host.encode("utf-8", "replace"))
        self._reset()
        extensions: bytes = self.listExtensions()  # type: ignore[no-untyped-call]
        self.sendCode(250, self.host + b"\n" + extensions)

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 OK")

    def do_RSET(self, rest: bytes) -> None:
        self._reset()
        self.sendCode(250, b"2.0.0 OK")

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(221, b"See you later")
        self._lose()

    def do_HELP(self, rest: bytes) -> None:
        commands = b"EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP"
        if self.canStartTLS and not self.startedTLS:
            commands += b" STARTTLS"
        self.sendCode(214, b"2.0.0 Commands: " + commands)

    def do_VRFY(self, rest: bytes) -> None:
        self.sendCode(502, b"5.5.1 VRFY is not supported")

    do_EXPN = do_VRFY

    def ext_AUTH(self, rest: bytes) -> None:
        self.sendCode(502, b"5.5.1 AUTH is not supported")

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS:
            self.sendCode(503, b"5.5.1 TLS is already active")
            return
        if not self.canStartTLS:
            self.sendCode(454, b"4.7.0 TLS not available")
            return
        if rest.strip():
            self.sendCode(501, b"5.5.4 STARTTLS takes no parameters")
            return
        # Whatever the client sent after STARTTLS in plaintext must not run
        # as commands of the TLS session (RFC 3207, section 4.2).
        discarded = len(self._input)
        self._input = bytearray()
        self._skipping = False
        if discarded:
            self.log.warn(
                "Discarded {count} bytes {peer} sent after STARTTLS without waiting",
                count=discarded,
                peer=self.peer,
                producer=self.factory.producer,
            )
        self.sendCode(220, b"2.0.0 Ready to start TLS")
        self._tx.startTLS(self.ctx)
        self.startedTLS = True
        # The session starts over: forget everything said before.
        self._helo = (None, self.peer_host.encode("utf-8", "replace"))
        self._reset()

    def _access_refusal(self) -> tuple[int, bytes] | None:
        if self.settings.requires_tls and not self.startedTLS:
            return 530, b"5.7.0 Must issue a STARTTLS command first"
        if self.settings.tls_client_ca is not None:
            certificate = None
            peer_certificate = getattr(self.transport, "getPeerCertificate", None)
            if self.startedTLS and peer_certificate is not None:
                certificate = peer_certificate()
            if certificate is None:
                return 530, b"5.7.0 A client certificate is required"
        return None

    def do_MAIL(self, rest: bytes) -> None:
        refusal = self._access_refusal()
        if refusal is not None:
            self.sendCode(*refusal)
            return
        if self._from is not None:
            self.sendCode(503, b"5.5.1 Sender already given")
            return
        match = self.mail_re.match(rest)
        if match is None:
            self.sendCode(501, b"5.5.4 Syntax: MAIL FROM:<address>")
            return
        problem = self._mail_parameters(match.group("opts") or b"")
        if problem is not None:
            self.sendCode(*problem)
            return
        # ESMTP.do_MAIL from here, with the regular expression matched once
        # and the sender validated without a Deferred when the validation
        # answers at once (it always does here).
        self._to = []
        try:
            address = _parse_address(match.group("path"), self.host)
        except AddressError as e:
            self.sendCode(553, _address_refusal(e))
            return
        self._validate(
            self.validateFrom, (self._helo, address), self._cbFromValidate, self._ebFromValidate
        )

    @staticmethod
    def _validate(
        validate: Callable[..., Any],
        args: tuple[Any, ...],
        callback: Callable[..., object],
        errback: Callable[[Failure], object],
        *extra: Any,
    ) -> None:
        """
        C{validate(*args)}, then C{callback(result, *extra)} or
        C{errback(failure)}: at once when the validation answers at once (it
        always does here), through its Deferred when it returns one.
        """
        try:
            validated = validate(*args)
        except Exception:
            errback(Failure())
            return
        if isinstance(validated, Deferred):
            validated.addCallbacks(callback, errback, callbackArgs=extra)
            return
        callback(validated, *extra)

    def _mail_parameters(self, options: bytes) -> tuple[int, bytes] | None:
        for token in options.split():
            key, _, value = token.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit() or len(value) > 20:
                    return 501, b"5.5.4 Bad SIZE parameter"
                if int(value) > self.settings.max_message_size:
                    return 552, b"5.3.4 Message size exceeds fixed maximum message size"
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return 501, b"5.5.4 Unsupported BODY type"
            else:
                return 555, b"5.5.4 Unsupported MAIL parameter"
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def do_RCPT(self, rest: bytes) -> None:
        if self._from is None:
            self.sendCode(503, b"5.5.1 MAIL first")
            return
        if len(self._to) >= self.settings.max_recipients:
            self.sendCode(452, b"4.5.3 Too many recipients")
            return
        # ESMTP.do_RCPT, with the recipient validated without a Deferred
        # when the validation answers at once (it always does here).
        match = self.rcpt_re.match(rest)
        if match is None:
            self.sendCode(501, b"Syntax error")
            return
        if (match.group("opts") or b"").strip():
            # No extension the listener offers defines RCPT parameters (DSN's
            # NOTIFY and ORCPT among them): refuse them, as MAIL does its
            # unknown ones, rather than accept a request it will not honour.
            self.sendCode(555, b"5.5.4 Unsupported RCPT parameter")
            return
        try:
            user = User(_parse_address(match.group("path"), self.host), self._helo, self,
                        self._from)
        except AddressError as e:
            self.sendCode(553, _address_refusal(e))
            return
        self._validate(self.validateTo, (user,), self._cbToValidate, self._ebToValidate, user)

    def validateTo(self, user: User) -> str:
        address = (user.dest.local + b"@" + user.dest.domain).decode("utf-8", "replace").lower()
        if address in self.settings.recipients:
            return address
        domain = address.rpartition("@")[2]
        self.factory.counters["recipients_refused"] += 1
        self.log.info(
            "Refused recipient {recipient} from {peer}",
            recipient=escape_control(address, 200),
            peer=self.peer,
            producer=self.factory.producer,
        )
        if domain in self.settings.domains:
            raise SMTPBadRcpt(user, 550, "5.1.1 No such recipient here")  # type: ignore[no-untyped-call]
        raise SMTPBadRcpt(user, 550, "5.7.1 Relaying denied")  # type: ignore[no-untyped-call]

    # -- mail data ---------------------------------------------------------------

    def _helo_name(self) -> bytes:
        helo: Any = self._helo
        name = helo[0] if helo else None
        return name if isinstance(name, bytes) else b""

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 MAIL and RCPT first")
            return
        if self._hand_overs:
            # A mail answered 451 after the delivery timeout is still being
            # handed over: one hand-over per session at a time, so the
            # connection limits bound them.  The transaction ends here.
            self._reset()
            self.sendCode(451, b"4.3.0 The previous mail is still being handed over, try again later")
            return
        self._envelope = Envelope(
            peer=self.peer,
            helo=_text(self._helo_name()),
            sender=_text(bytes(self._from)),
            recipients=tuple(str(to) for _, to in self._to),
            tls=bool(self.startedTLS),
        )
        self._reset()
        self.mode = DATA
        self._lines = []
        self._size = 0
        self._data_error = None
        self._data_call = self.clock.callLater(self.settings.data_timeout, self._data_timed_out)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _data_line(self, line: bytes) -> None:
        if line[:1] == b".":
            if len(line) == 1:
                self._end_of_data()
                return
            line = line[1:]
        if self._data_error is not None:
            return
        self._size += len(line) + 2
        if self._size > self.settings.max_message_size:
            self._fail_data(552, b"5.3.4 Message size exceeds fixed maximum message size",
                            f"more than {self.settings.max_message_size} bytes")
            return
        self._lines.append(line + b"\r\n")

    def _fail_data(self, code: int, text: bytes, reason: str) -> None:
        if self._data_error is None:
            self._data_error = (code, text, reason)
        self._lines = []

    def _end_of_data(self) -> None:
        self.mode = COMMAND
        if self._data_call is not None and self._data_call.active():
            self._data_call.cancel()
        self._data_call = None
        envelope = self._envelope
        assert envelope is not None
        self._envelope = None
        lines, self._lines = self._lines, []
        if self._data_error is not None:
            code, text, reason = self._data_error
            self._data_error = None
            self.factory.counters["mails_refused_limit"] += 1
            self.log.info("Refused a mail from {peer}: {reason}", peer=self.peer, reason=reason,
                          producer=self.factory.producer)
            self.sendCode(code, text)
            return
        raw = b"".join(lines)
        del lines
        secret = self.factory.secret
        if secret is not None:
            try:
                raw = strip_secret_header(raw, self.settings.secret_header, secret)
            except SecretMismatch as e:
                self.log.warn("Refused a mail from {peer}: {reason}", peer=self.peer,
                              reason=str(e), producer=self.factory.producer)
                self.factory.counters["mails_refused_secret"] += 1
                self.sendCode(550, b"5.7.1 Not authorized to send mail here")
                return
        self._deliver(raw, envelope)

    def _deliver(self, raw: bytes, envelope: Envelope) -> None:
        self._stop_idle()
        self._tx.pauseProducing()
        d: Deferred[Any] = maybeDeferred(self.factory.intake.receive, raw, envelope.peer)
        self._waiting = d
        self._hand_overs += 1
        self._delivery_call = self.clock.callLater(
            self.settings.delivery_timeout, self._delivery_timed_out, d
        )
        self.factory.track(d)
        d.addBoth(self._delivered, d, envelope)

    def _delivery_timed_out(self, d: Deferred[Any]) -> None:
        self._delivery_call = None
        if self._waiting is not d:
            return
        self.factory.counters["delivery_timeouts"] += 1
        self._waiting = None
        self.log.warn(
            "Handing over a mail from {peer} takes longer than {timeout}s; answered 451",
            peer=self.peer,
            timeout=self.settings.delivery_timeout,
            producer=self.factory.producer,
        )
        self.sendCode(451, b"4.4.1 Timed out handing the mail over, try again later")
        self._after_reply()

    def _delivered(self, result: object, d: Deferred[Any], envelope: Envelope) -> None:
        self._hand_overs -= 1
        try:
            if self._delivery_call is not None and self._delivery_call.active():
                self._delivery_call.cancel()
            self._delivery_call = None
            answered = self._waiting is d
            if answered:
                self._waiting = None
            code, text = self._answer(result, envelope, late=not answered)
            if answered:
                if code == 250 and not (isinstance(result, Accepted)
                                        and result.outcome == "quarantined"):
                    # A mail handed over (published, or a copy of one that
                    # was): the count of commands starts again.  A refused
                    # one (any other answer) does not start it, so a client
                    # can not keep its place by sending mail that is
                    # refused, empty or not; nor does one quarantined,
                    # though answered 250, or junk sent in a loop would be
                    # bounded by the quarantine's limits only.
                    self._commands = 0
                if self._open():
                    self.sendCode(code, text)
                self._after_reply()
        finally:
            if self._lost and not self._hand_overs:
                # The connection went away during the hand-over: its slot
                # is free only now.
                self.factory.unregister(self)

    def _answer(self, result: object, envelope: Envelope, late: bool) -> tuple[int, bytes]:
        log_fields = {"peer": envelope.peer, "producer": self.factory.producer,
                      "recipients": ", ".join(envelope.recipients), "tls": envelope.tls,
                      "late": late}
        counters = self.factory.counters
        if isinstance(result, Accepted):
            if not late:
                counters[f"mails_{result.outcome}"] += 1
            event = result.event
            bug = f" bug {event.bug_id} {event.event_type}" if event is not None else ""
            detail = f" ({escape_control(result.detail, 200)})" if result.detail else ""
            after = " after the timeout" if late else ""
            # One line per mail, so its text is made here once, as the format
            # "Accepted a mail from {peer}: {outcome}{bug}{detail}{after}"
            # would make it, and logged as a format without fields: a text
            # log observer then has no fields to look up and format, which
            # costs more than the rest of the line.  The fields stay in the
            # event for structured observers.
            line = f"Accepted a mail from {envelope.peer}: {result.outcome}{bug}{detail}{after}"
            if "{" in line or "}" in line:
                line = line.replace("{", "{{").replace("}", "}}")
            self.log.info(
                line,
                outcome=result.outcome,
                bug=bug,
                detail=detail,
                after=after,
                msg_id=result.message_id,
                **log_fields,
            )
            text = {"published": b"2.0.0 Ok: published",
                    "duplicate": b"2.0.0 Ok: already published",
                    "quarantined": b"2.0.0 Ok: kept for review"}[result.outcome]
            if result.message_id:
                text += b" as " + _reply_text(result.message_id)
            return 250, text
        if isinstance(result, Failure) and result.value is not None:
            refusal = classify_failure(result.value)
            if not late:
                counters[f"mails_refused_{refusal.kind}"] += 1
            if refusal.kind == "internal":
                self.log.failure("Handing over a mail from {peer} failed", result, **log_fields)
            else:
                self.log.info(
                    "Refused a mail from {peer} ({kind}): {reason}",
                    kind=refusal.kind,
                    reason=refusal.reason,
                    **log_fields,
                )
            reason = _reply_text(refusal.reason)
            if refusal.kind == "storage":
                return 452, b"4.3.1 Insufficient system storage, try again later"
            if refusal.temporary:
                return 451, b"4.3.0 Temporarily unable to take the mail, try again later"
            if refusal.kind == "content":
                return 550, b"5.6.0 " + reason
            return 554, b"5.3.0 " + reason
        self.log.error("The intake answered {result!r} for a mail from {peer}", result=result,
                       **log_fields)
        return 451, b"4.3.0 Local error in processing"

    def _after_reply(self) -> None:
        if not self._open():
            return
        if self._closing:
            self._close(421, b"4.3.2 Service shutting down, try again later")
            return
        if self._expired:
            self._close_expired()
            return
        self._start_idle()
        if self._output_paused:
            # Reading resumes when the transport has sent the replies.
            return
        self._tx.resumeProducing()
        self._process()


# --- the factory -------------------------------------------------------------------------


class _Refusal(Protocol):
    """
    Answers a connection that is not served with one reply, and closes it.
    """

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.reply + b"\r\n")
        self.transport.loseConnection()


class BugmailSMTPFactory(ServerFactory):
    """
    Builds L{BugmailSMTP} sessions, within the connection limits (overall
    and per peer address) and the allowed networks.

    @ivar tls_options: The TLS context factory for C{STARTTLS}, or C{None}.
    @ivar secret: The shared secret mail must carry, or C{None}.
    """

    # The listener logs its own start and stop with the endpoint.
    noisy = False

    log = HubLogger()

    def __init__(
        self,
        settings: ListenerSettings,
        intake: IBugmailIntake,
        clock: IReactorTime,
        *,
        tls_options: Any = None,
        secret: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.clock = clock
        self.tls_options = tls_options
        self.secret = secret
        self.producer: str = getattr(intake, "producer", "bugzilla-smtp")
        self.sessions: set[BugmailSMTP] = set()
        #: Events by name, for metrics (L{COUNTERS}), each there from the
        #: start, at 0.
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._per_peer: Counter[str] = Counter()
        self._pending: set[Deferred[Any]] = set()
        # Peers are matched in the form _normal_host gives them.
        self._networks = tuple(_normal_network(n) for n in settings.networks)

    def _allowed(self, host: str) -> bool:
        """
        Whether C{host} (as L{_peer_host} gives it) is in an allowed network.
        """
        networks = self._networks
        if not networks or host.startswith("unix"):
            return True
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        return any(address in network for network in networks)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        assert addr is not None
        host = _peer_host(addr)
        if not self._allowed(host):
            self.counters["connections_refused_network"] += 1
            self.log.warn("Refused an SMTP connection from {peer}: network not allowed",
                          peer=_peer_label(addr), producer=self.producer)
            return _Refusal(b"554 5.7.1 Access denied")
        if len(self.sessions) >= self.settings.max_connections:
            self.counters["connections_refused_limit"] += 1
            self.log.warn("Refused an SMTP connection from {peer}: {count} connections open",
                          peer=_peer_label(addr), count=len(self.sessions), producer=self.producer)
            return _Refusal(b"421 4.7.0 Too many connections, try again later")
        if self._per_peer[host] >= self.settings.max_connections_per_peer:
            self.counters["connections_refused_peer_limit"] += 1
            self.log.warn("Refused an SMTP connection from {peer}: {count} connections from it",
                          peer=_peer_label(addr), count=self._per_peer[host], producer=self.producer)
            return _Refusal(b"421 4.7.0 Too many connections from your address, try again later")
        session = BugmailSMTP(self, addr)
        self.counters["connections"] += 1
        self.sessions.add(session)
        self._per_peer[host] += 1
        return session

    def unregister(self, session: BugmailSMTP) -> None:
        """
        Forget a closed session and free its slot (called by its
        C{connectionLost}, or when the last hand-over of a session whose
        connection is gone ends; once is enough).
        """
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self._per_peer[session.peer_host] -= 1
        if self._per_peer[session.peer_host] <= 0:
            del self._per_peer[session.peer_host]

    def connections_from(self, host: str) -> int:
        """
        How many sessions hold a slot of C{host} (an IPv4 address and its
        IPv4-mapped IPv6 form are one peer).
        """
        return self._per_peer.get(_normal_host(host), 0)

    def track(self, d: Deferred[Any]) -> None:
        """
        Remember a hand-over in progress until it is done.
        """
        self._pending.add(d)

        def done(result: object) -> object:
            self._pending.discard(d)
            return result

        d.addBoth(done)

    def shutdown(self) -> Deferred[None]:
        """
        Close every session (after the answer for those handing over a mail)
        and fire once no hand-over is in progress, or once
        C{delivery_timeout} seconds have passed: a hand-over that never
        ends (an embedding's callback whose Deferred never fires) must not
        keep the program from stopping.  Its mail was answered C{451} by
        then, so the sender still has it.
        """
        for session in list(self.sessions):
            session.shutdown()
        pending = list(self._pending)
        if not pending:
            return succeed(None)
        waiting: Deferred[Any] = DeferredList(
            [self._settled(d) for d in pending], consumeErrors=True
        )
        timeout = self.settings.delivery_timeout

        def gave_up(failure: Failure) -> None:
            failure.trap(TimeoutError)
            self.log.warn(
                "Stopping with {count} hand-over(s) still unfinished after {timeout}s; their "
                "mails were answered 451",
                count=len([d for d in pending if not d.called]),
                timeout=timeout,
                producer=self.producer,
            )

        bounded: Deferred[Any] = with_timeout(
            waiting, timeout, self.clock, lambda: TimeoutError("hand-overs unfinished")
        )
        return bounded.addCallbacks(lambda _: None, gave_up)

    @staticmethod
    def _settled(d: Deferred[Any]) -> Deferred[None]:
        # A separate Deferred that fires when d does, leaving d's own result
        # to its callbacks.
        settled: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            settled.callback(None)
            return result

        d.addBoth(fire)
        return settled


# --- the service ---------------------------------------------------------------------------


class BugmailListener(Service):
    """
    The SMTP listener as a Twisted service: listens on an endpoint string
    when started, stops listening and waits for mails being handed over when
    stopped.

    @ivar endpoint: The server endpoint string, e.g. L{DEFAULT_ENDPOINT}.
    @ivar settings: Its L{ListenerSettings}.
    @ivar intake: Where complete mails go (an L{IBugmailIntake}).
    @ivar factory: The L{BugmailSMTPFactory} once started, else C{None}.
    @ivar port: The listening port once listening, else C{None}.
    @ivar start_error: Why the last start could not listen (the port is
        taken, say), else C{None}; the hub's C{/ready} reports it.
    """

    log = HubLogger()

    def __init__(
        self,
        endpoint: str,
        settings: ListenerSettings,
        intake: IBugmailIntake,
        *,
        reactor: Any = None,
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.intake = intake
        self._reactor = reactor
        self.factory: BugmailSMTPFactory | None = None
        self.port: IListeningPort | None = None
        self.start_error: str | None = None
        self._listen_failure: Failure | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._waiters: list[Deferred[IListeningPort]] = []
        self._cleanups: list[Callable[[], object]] = []

    def add_cleanup(self, cleanup: Callable[[], object]) -> None:
        """
        Call C{cleanup} (it may return a Deferred) when the service has
        stopped, after the last mail was handed over: to close what the
        hand-over uses, such as the enrichment's web service connections.
        """
        self._cleanups.append(cleanup)

    @classmethod
    def with_callback(
        cls,
        endpoint: str,
        settings: ListenerSettings,
        on_event: EventCallback,
        *,
        reactor: Any = None,
        dedup_window: float = 3600.0,
        dedup_max_entries: int = 10_000,
        quarantine: Quarantine | None = None,
        producer: str = "bugzilla-smtp",
    ) -> BugmailListener:
        """
        A listener that calls C{on_event(event, raw_mail)} once per bug event
        (copies for other recipients are dropped) and answers C{250} when its
        Deferred fires, C{451} when it fails with
        L{fedhub.errors.TemporarilyUnavailable}.
        """
        reactor = _default_reactor(reactor)
        intake = BugmailIntake(
            on_event,
            clock=reactor,
            dedup_window=dedup_window,
            dedup_max_entries=dedup_max_entries,
            quarantine=quarantine,
            producer=producer,
        )
        return cls(endpoint, settings, intake, reactor=reactor)

    @classmethod
    def with_publisher(
        cls,
        endpoint: str,
        settings: ListenerSettings,
        publisher: IPublisher,
        topic: Callable[[str], str],
        *,
        reactor: Any = None,
        enrich: Enricher | None = None,
        package_products: Iterable[str] = DEFAULT_PACKAGE_PRODUCTS,
        dedup_window: float = 3600.0,
        quarantine: Quarantine | None = None,
        producer: str = "bugzilla-smtp",
    ) -> BugmailListener:
        """
        A listener that publishes each bug event as a message through
        C{publisher}, on the topics C{topic("bugzilla.bug.new")} and
        C{topic("bugzilla.bug.update")}.
        """
        on_event = EventPublisher(
            publisher,
            topic,
            enrich=enrich,
            producer=producer,
            package_products=tuple(package_products),
        )
        return cls.with_callback(
            endpoint,
            settings,
            on_event,
            reactor=reactor,
            dedup_window=dedup_window,
            quarantine=quarantine,
            producer=producer,
        )

    def startService(self) -> None:
        """
        Read the TLS files and the secret, and start listening.

        @raise TLSFilesError: when the TLS files can not be used.
        @raise OSError: when the secret file can not be read.
        """
        reactor = _default_reactor(self._reactor)
        self.start_error = None
        self._listen_failure = None
        tls_options = load_tls_options(self.settings)
        secret = read_secret(self.settings)
        self.factory = BugmailSMTPFactory(
            self.settings, self.intake, reactor, tls_options=tls_options, secret=secret
        )
        Service.startService(self)  # type: ignore[no-untyped-call]
        d = serverFromString(reactor, self.endpoint).listen(self.factory)  # type: ignore[no-untyped-call]
        self._listening = d
        d.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        self.log.info(
            "SMTP listener for {recipients} on {address}",
            recipients=", ".join(sorted(self.settings.recipients)),
            address=_peer_label(address),
            producer=self.factory.producer if self.factory else None,
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)

    def _listen_failed(self, failure: Failure) -> None:
        self.start_error = f"could not listen on {self.endpoint}: {failure.getErrorMessage()}"
        self._listen_failure = failure
        self.log.failure("The SMTP listener could not listen on {endpoint}", failure,
                         endpoint=self.endpoint)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    @property
    def counters(self) -> Mapping[str, int]:
        """
        The listener's event counters (see L{BugmailSMTPFactory.counters});
        empty before it starts.
        """
        return self.factory.counters if self.factory is not None else {}

    def when_listening(self) -> Deferred[IListeningPort]:
        """
        A Deferred firing with the listening port once the listener listens,
        or failing when it could not.
        """
        if self.port is not None:
            return succeed(self.port)
        if self._listen_failure is not None:
            return fail(self._listen_failure)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, close every session and wait for the mails being
        handed over.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        stopped: Deferred[Any] = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        factory = self.factory

        def sessions(_: object) -> Deferred[None]:
            if factory is None:
                return succeed(None)
            return factory.shutdown()

        def cleanups(_: object) -> Deferred[Any]:
            done = [maybeDeferred(cleanup) for cleanup in self._cleanups]
            for d in done:
                d.addErrback(lambda f: self.log.failure("Cleaning up the SMTP listener failed", f))
            return DeferredList(done)

        stopped.addCallback(sessions)
        stopped.addCallback(cleanups)
        stopped.addCallback(lambda _: None)
        return stopped


def _default_reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default

        return default
    return reactor
