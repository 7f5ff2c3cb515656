"""
Client TLS that checks the server's name strictly.

Twisted's client options (C{optionsForClientTLS}, and the HTTPS policies
built on it) check the name in the server's certificate with
service-identity, from OpenSSL's verify callback.  Only a name that does not
match (C{VerificationError}) fails the handshake there: a certificate with
no C{subjectAltName} at all makes service-identity raise
C{CertificateError}, which Twisted logs as a critical error and otherwise
ignores, so the handshake succeeds whatever the name.  Every certificate the
trusted CAs signed without names (client certificates usually have none)
would then pass for any server.

L{StrictNames} wraps such options and puts its own callback in place of
Twisted's: any failure to show that the certificate names the host fails the
handshake, with the reason (C{VerificationError} or C{CertificateError})
given to the TLS protocol, which reports it as the connection's loss.
L{StrictPolicyForHTTPS} does the same for an HTTPS policy's connections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from fedhub.text import is_ip_address

__all__ = ["StrictNames", "StrictPolicyForHTTPS"]


def _verify_callback(
    tls_protocol: Any, hostname: str
) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
    """
    OpenSSL's verify callback for one connection: the chain as OpenSSL
    judged it, and the leaf certificate's names checked against
    C{hostname}, every error failing the handshake.
    """
    check = verify_certificate_ip_address if is_ip_address(hostname) else verify_certificate_hostname
    # The protocol holds the connection, which holds this callback: the
    # reference is dropped once used, as Twisted's own callback does.
    protocol: list[Any] = [tls_protocol]

    def verify(connection: SSL.Connection, certificate: Any, error: int, depth: int, ok: int) -> bool:
        if depth != 0 or not ok:
            return bool(ok)
        try:
            check(certificate.to_cryptography(), hostname)
        except Exception as e:
            if protocol:
                protocol.pop().failVerification(Failure(e))
            return False
        protocol.clear()
        return True

    return verify


@implementer(IOpenSSLClientConnectionCreator)
class StrictNames:
    """
    Client TLS options whose server certificate must name C{hostname} (a
    DNS name or an IP address), whatever else the options wrapped check.
    """

    def __init__(self, options: IOpenSSLClientConnectionCreator, hostname: str) -> None:
        self._options = options
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _verify_callback(tlsProtocol, self._hostname),
        )
        return connection


@implementer(IPolicyForHTTPS)
class StrictPolicyForHTTPS:
    """
    An HTTPS policy whose connections check the server's name with
    L{StrictNames}, on top of what C{policy} checks.
    """

    def __init__(self, policy: IPolicyForHTTPS) -> None:
        self._policy = policy

    def creatorForNetloc(self, hostname: bytes, port: int) -> StrictNames:
        return StrictNames(self._policy.creatorForNetloc(hostname, port), hostname.decode("ascii"))
