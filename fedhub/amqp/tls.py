"""
TLS client options for broker connections.

fedhub refuses to connect to a broker it can not verify: every TLS
connection checks the broker's certificate against a configured CA bundle and
its name with service-identity, and speaks TLS 1.2 or newer.

Two Twisted traps are avoided here:

  - C{Certificate.loadPEM} of a CA bundle silently keeps only the first
    certificate, so L{load_certificates} parses every PEM block itself;
  - C{CertificateOptions} without a trust root does not verify the server at
    all, so options are only ever built with C{optionsForClientTLS} and an
    explicit trust root.

Everything here reads files: call it when a service starts or a
configuration is checked, never from a constructor (L{RenewableTLSOptions}
reads them again before a connection when they changed: small files, read
rarely).
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)

from fedhub.errors import ConfigError, ConfigProblem
from fedhub.tlsnames import StrictNames

MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2
"""The oldest TLS version fedhub speaks to a broker."""

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----\r?\n.+?\r?\n"
    rb"-----END (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----",
    re.DOTALL,
)


def in_domain(domain: str, error: ConfigError) -> list[ConfigProblem]:
    """
    The problems of C{error}, which name the bare key of the file concerned
    (C{ca}, C{key}; C{url} for the broker's name), named by their place in
    the configuration instead (C{domains.<domain>.key}), their text cut to
    500 characters: the same message from C{fedhub check-config}, C{twistd
    fedhub} and the broker commands.
    """
    from fedhub.config import format_path
    from fedhub.text import escape_control

    return [
        replace(
            problem,
            path=format_path(("domains", domain, "broker" if problem.path == "url" else problem.path)),
            message=escape_control(problem.message, 500),
        )
        for problem in error.problems
    ]


#: Days before its end a client certificate is warned about.
EXPIRY_WARNING_DAYS = 30


def expiry_warning(cert_path: str, now: datetime | None = None) -> str | None:
    """
    A warning when the client certificate of C{cert_path} (its first) has
    expired, or ends within L{EXPIRY_WARNING_DAYS}: the broker refuses an
    expired one with a bare "certificate expired" alert.  C{None} otherwise,
    and when the file can not be read (the other checks report that).
    """
    try:
        with open(cert_path, "rb") as f:
            leaf = parse_certificates(f.read(), cert_path, "cert")[0]
        ends = leaf.original.to_cryptography().not_valid_after_utc
    except (OSError, ConfigError, ValueError):
        return None
    now = now or datetime.now(timezone.utc)
    when = ends.strftime("%Y-%m-%d %H:%M UTC")
    if ends <= now:
        return f"the client certificate in {cert_path!r} expired on {when}: the broker refuses it"
    left = ends - now
    if left <= timedelta(days=EXPIRY_WARNING_DAYS):
        return (f"the client certificate in {cert_path!r} expires on {when}, in {left.days} "
                "day(s): renew it (the hub reads renewed files at its next connection)")
    return None


def exposed_key_warning(cert_path: str, key_path: str | None = None) -> str | None:
    """
    A warning when every user of the machine can read the client's private
    key: C{key_path}, or C{cert_path} when the key is in it.  C{None}
    otherwise, and when the file can not be looked at (the other checks
    report that).  A file readable by its group, as C{root:fedhub} mode
    C{0640}, is left alone, as for a configuration file holding a password.
    """
    path = key_path or cert_path
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not mode & 0o004:
        return None
    return (f"the private key in {path!r} can be read by every user (mode {mode & 0o7777:04o}): "
            "anyone on the machine can log in as the hub; chmod o-r it")


def _problem(key: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(key, message)])


def _read(path: str, key: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _problem(key, f"can not read the {what} {path!r}: {e.strerror or e}") from None


def parse_certificates(pem: bytes, source: str = "<bytes>", key: str = "ca") -> list[Certificate]:
    """
    Every certificate of a PEM text, in order.

    @param source: Where the text came from, for error messages.
    @raise ConfigError: when a block is not a valid certificate, or there is none.
    """
    certificates = []
    for number, match in enumerate(_PEM_CERTIFICATE.finditer(pem), 1):
        try:
            certificates.append(Certificate.loadPEM(match.group(0)))
        except (crypto.Error, ValueError) as e:
            raise _problem(
                key, f"certificate {number} of {source!r} is not a valid certificate: {e}"
            ) from None
    if not certificates:
        raise _problem(key, f"{source!r} holds no PEM certificate")
    return certificates


def load_certificates(path: str, key: str = "ca") -> list[Certificate]:
    """
    Every certificate of a PEM file, such as a CA bundle.

    @param key: The configuration key path naming the file, for errors.
    @raise ConfigError: when the file can not be read, holds no certificate
        or a broken one.
    """
    return parse_certificates(_read(path, key, "certificate file"), path, key)


@dataclass(frozen=True)
class ClientIdentity:
    """
    A TLS client certificate with its private key.

    @ivar certificate: The client certificate and its key.
    @ivar chain: Intermediate certificates sent along with it.
    """

    certificate: PrivateCertificate
    chain: tuple[Certificate, ...] = ()


def load_client_identity(cert_path: str, key_path: str | None = None) -> ClientIdentity:
    """
    Load a client certificate, its chain and its private key.

    @param cert_path: A PEM file: the client certificate first, then any
        intermediate certificates, and the key too when C{key_path} is not given.
    @param key_path: A PEM file holding the (unencrypted) private key.
    @raise ConfigError: when a file can not be read, a certificate or the key
        is missing or invalid, or the key does not belong to the certificate.
    """
    cert_pem = _read(cert_path, "cert", "client certificate")
    certificates = parse_certificates(cert_pem, cert_path, "cert")
    key_source = key_path or cert_path
    key_pem = _read(key_path, "key", "client key") if key_path else cert_pem
    key_name = "key" if key_path else "cert"
    match = _PEM_PRIVATE_KEY.search(key_pem)
    if match is None:
        raise _problem(key_name, f"{key_source!r} holds no PEM private key")
    if b"ENCRYPTED" in match.group(0).split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in (
        match.group(0)
    ):
        raise _problem(key_name, f"the private key in {key_source!r} is encrypted")
    try:
        key_pair = KeyPair.load(match.group(0), crypto.FILETYPE_PEM)
    except (crypto.Error, ValueError) as e:
        raise _problem(key_name, f"{key_source!r} holds no valid private key: {e}") from None
    leaf = certificates[0]
    # The same check OpenSSL makes when the context is built, made now so that
    # a wrong key is a configuration error and not a failure at connect time.
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    try:
        context.use_certificate(leaf.original)
        context.use_privatekey(key_pair.original)
        context.check_privatekey()
    except SSL.Error:
        raise _problem(
            key_name, f"the private key in {key_source!r} does not match the certificate"
        ) from None
    return ClientIdentity(
        PrivateCertificate.fromCertificateAndKeyPair(leaf, key_pair),  # type: ignore[no-untyped-call]
        tuple(certificates[1:]),
    )


@implementer(IOpenSSLClientConnectionCreator)
class ExplainedTLSOptions:
    """
    Client TLS options that can say why the broker's certificate did not
    verify, where OpenSSL's error for such a handshake says only
    "certificate verify failed".

    Verification is left to the options wrapped.  For the explanation, the
    chain the broker sent in the last connection made is verified again
    against the same trusted CAs (L{explain_refusal}); connection attempts
    of one bus are made one after the other.
    """

    def __init__(self, options: IOpenSSLClientConnectionCreator, roots: list[Certificate]) -> None:
        self._options = options
        self._roots = roots
        self._last: weakref.ref[SSL.Connection] | None = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        self._last = weakref.ref(connection)
        return connection

    def explain_refusal(self) -> str | None:
        """
        Why the certificate chain the broker sent in the last connection does
        not verify, for example C{"certificate has expired (depth 0,
        CN=broker.example)"}; C{None} when there was no connection or chain,
        or the chain verifies (its name is checked apart).
        """
        connection = self._last() if self._last is not None else None
        if connection is None:
            return None
        try:
            chain = connection.get_peer_cert_chain()
            if not chain:
                return None
            store = crypto.X509Store()
            for root in self._roots:
                store.add_cert(root.original)
            crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
        except crypto.X509StoreContextError as e:
            _, depth, message = e.errors
            try:
                subject = e.certificate.to_cryptography().subject.rfc4514_string()
            except Exception:
                subject = "an unreadable certificate"
            return f"{message} (depth {depth}, {subject or 'no subject'})"
        except Exception:
            return None
        return None


def client_tls_options(
    hostname: str,
    ca: str | None,
    cert: str | None = None,
    key: str | None = None,
) -> ExplainedTLSOptions:
    """
    Options for a verified TLS connection to a broker.

    @param hostname: The name (or IP address) the broker's certificate must
        carry; checked with service-identity.
    @param ca: A PEM file of every CA that may sign the broker's certificate;
        all of its certificates are trusted.  Required: fedhub does not fall
        back to the system store silently.  (To use it, name the system bundle,
        e.g. C{/etc/ssl/certs/ca-certificates.crt}.)
    @param cert: The client certificate file, for certificate login.
    @param key: Its private key file, when the key is not in C{cert}.
    @raise ConfigError: when the configuration would not verify the broker or
        a file is unusable.
    """
    if not hostname:
        raise _problem("url", "TLS needs the broker's host name to verify its certificate")
    if not ca:
        raise _problem(
            "ca",
            "TLS needs a CA bundle to verify the broker's certificate; a connection"
            " without verification is refused",
        )
    if key and not cert:
        raise _problem("key", "a client key is set without a client certificate")
    # Both the CA bundle and the client identity are read, so that their
    # problems are reported together.
    problems: list[ConfigProblem] = []
    roots: list[Certificate] = []
    identity = None
    try:
        roots = load_certificates(ca, "ca")
    except ConfigError as e:
        problems += e.problems
    if cert:
        try:
            identity = load_client_identity(cert, key)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    extra: dict[str, object] = {"raiseMinimumTo": MINIMUM_TLS_VERSION}
    if identity is not None and identity.chain:
        extra["extraCertChain"] = [c.original for c in identity.chain]
    return ExplainedTLSOptions(
        StrictNames(
            optionsForClientTLS(
                hostname,
                trustRoot=trustRootFromCertificates(roots),  # type: ignore[no-untyped-call]
                clientCertificate=identity.certificate if identity else None,
                extraCertificateOptions=extra,
            ),
            hostname,
        ),
        roots,
    )


class RenewableTLSOptions:
    """
    The client TLS options of a broker connection, read again when one of
    their files changes: a renewed client certificate (or CA bundle) is
    used from the next connection on, without restarting the hub.

    The files are looked at (C{stat}) before each connection attempt and
    read only when their inode, size or modification time changed.  Files
    that can not be used then (half written, a key not matching the new
    certificate yet) are reported once, and the options read before stay in
    use until the files change again.

    @ivar options: The options in use.
    """

    def __init__(
        self,
        hostname: str,
        ca: str | None,
        cert: str | None = None,
        key: str | None = None,
        *,
        on_change: Callable[[ConfigError | None], None] = lambda error: None,
    ) -> None:
        """
        Read the files.

        @param on_change: Called after the files changed and were read again:
            with C{None}, or with the error that made them unusable.
        @raise ConfigError: when they are unusable now (see
            L{client_tls_options}).
        """
        self._args = (hostname, ca, cert, key)
        self._paths = tuple(path for path in (ca, cert, key) if path)
        self._on_change = on_change
        self._stamp = self._stamps()
        self.options = client_tls_options(hostname, ca, cert, key)

    def _stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                info = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(stamps)

    def current(self) -> ExplainedTLSOptions:
        """
        The options for the next connection: read again if a file changed.
        """
        stamp = self._stamps()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.options = client_tls_options(*self._args)
            except ConfigError as e:
                self._on_change(e)
            else:
                self._on_change(None)
        return self.options
