"""
Tests for L{fedhub.amqp.tls}: CA bundles, client identities and verified TLS
client options, checked with real TLS handshakes over an in-memory pump.

The certificates are made in the test run with C{cryptography}.
"""

from __future__ import annotations

import os
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from fedhub.amqp.tls import (
    ExplainedTLSOptions,
    RenewableTLSOptions,
    client_tls_options,
    load_certificates,
    load_client_identity,
    parse_certificates,
)
from fedhub.amqp.transport import TLSFailed, _attempt_error
from fedhub.errors import ConfigError
from tests.broker import Authority, Key



def make_ca(common_name: str) -> tuple[Key, x509.Certificate]:
    """
    A self-signed CA (the test PKI of L{tests.broker}).
    """
    authority = Authority.create(common_name)
    return authority.key, authority.certificate


def make_leaf(
    ca: tuple[Key, x509.Certificate],
    common_name: str,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    client: bool = False,
    expired: bool = False,
) -> tuple[Key, x509.Certificate]:
    """
    A server (or client) certificate signed by C{ca}.
    """
    ca_key, ca_cert = ca
    return Authority(common_name, ca_key, ca_cert).issue(
        common_name, server=not client, dns=dns, ips=ips, expired=expired
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


class _Peer(Protocol):
    """
    One side of a test connection: says something, keeps what it hears and
    how the connection ended.
    """

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost = reason


def handshake(client_creator: Any, server_options: Any) -> tuple[_Peer, _Peer, Any]:
    """
    Connect a TLS client and server in memory and pump until quiet.

    @return: the client and server application protocols, and the server's
        TLS protocol.
    """
    client_peer, server_peer = _Peer(b"from client"), _Peer(b"from server")
    # TLS transports gather small writes until the clock's next turn.
    clock = Clock()
    server_tls = TLSMemoryBIOFactory(
        server_options, False, Factory.forProtocol(lambda: server_peer), clock
    ).buildProtocol(None)
    client_tls = TLSMemoryBIOFactory(
        client_creator, True, Factory.forProtocol(lambda: client_peer), clock
    ).buildProtocol(None)
    _, _, pump = connectedServerAndClient(lambda: server_tls, lambda: client_tls, clock=clock)
    pump.flush()
    return client_peer, server_peer, server_tls


class Files(SynchronousTestCase):
    """
    Base: write PEM files into a temporary directory.
    """

    def write(self, name: str, *parts: bytes) -> str:
        path = str(self.mktemp()) + "-" + name
        with open(path, "wb") as f:
            f.write(b"".join(parts))
        return path


class LoadCertificatesTests(Files):
    """
    L{load_certificates} reads every certificate of a bundle.
    """

    def test_every_certificate_of_a_bundle(self) -> None:
        """
        All certificates are loaded, in order, where Certificate.loadPEM keeps
        only the first.
        """
        cas = [make_ca(f"CA {n}")[1] for n in range(3)]
        bundle = b"# a comment, as Debian's bundle has\n".join(cert_pem(c) for c in cas)
        path = self.write("bundle.pem", b"leading text\n", bundle, b"trailing\n")
        loaded = load_certificates(path)
        self.assertEqual(
            [c.getSubject().commonName for c in loaded], [b"CA 0", b"CA 1", b"CA 2"]
        )
        # The pitfall this guards against:
        self.assertEqual(Certificate.loadPEM(bundle).getSubject().commonName, b"CA 0")

    def test_no_certificate(self) -> None:
        """
        A file without a certificate is a configuration error naming it.
        """
        path = self.write("empty.pem", b"nothing here\n")
        error = self.assertRaises(ConfigError, load_certificates, path)
        self.assertIn(path, str(error))
        self.assertEqual(error.problems[0].path, "ca")

    def test_broken_certificate(self) -> None:
        """
        A corrupt certificate block is a configuration error naming its position.
        """
        good = cert_pem(make_ca("good")[1])
        broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        error = self.assertRaises(ConfigError, parse_certificates, good + broken, "b.pem")
        self.assertIn("certificate 2", str(error))

    def test_missing_file(self) -> None:
        """
        An unreadable file is a configuration error, not an OSError.
        """
        error = self.assertRaises(ConfigError, load_certificates, "/nonexistent/ca.pem")
        self.assertIn("/nonexistent/ca.pem", str(error))


class ClientIdentityTests(Files):
    """
    L{load_client_identity} loads a client certificate, chain and key.
    """

    def setUp(self) -> None:
        self.ca = make_ca("client CA")
        self.key, self.cert = make_leaf(self.ca, "hub", client=True)

    def test_separate_files(self) -> None:
        """
        Certificate and key in two files.
        """
        identity = load_client_identity(
            self.write("c.pem", cert_pem(self.cert)), self.write("k.pem", key_pem(self.key))
        )
        self.assertEqual(identity.certificate.getSubject().commonName, b"hub")
        self.assertEqual(identity.chain, ())

    def test_one_file_with_chain(self) -> None:
        """
        Certificate, intermediate and key in one file: the rest of the
        certificates become the chain.
        """
        path = self.write("all.pem", cert_pem(self.cert), cert_pem(self.ca[1]), key_pem(self.key))
        identity = load_client_identity(path)
        self.assertEqual([c.getSubject().commonName for c in identity.chain], [b"client CA"])

    def test_mismatched_key(self) -> None:
        """
        A key that does not belong to the certificate is refused.
        """
        other = ec.generate_private_key(ec.SECP256R1())
        error = self.assertRaises(
            ConfigError,
            load_client_identity,
            self.write("c.pem", cert_pem(self.cert)),
            self.write("k.pem", key_pem(other)),
        )
        self.assertIn("does not match", str(error))
        self.assertEqual(error.problems[0].path, "key")

    def test_encrypted_key(self) -> None:
        """
        An encrypted key is refused (the hub can not ask for a passphrase).
        """
        error = self.assertRaises(
            ConfigError,
            load_client_identity,
            self.write("c.pem", cert_pem(self.cert)),
            self.write("k.pem", key_pem(self.key, b"secret")),
        )
        self.assertIn("encrypted", str(error))

    def test_no_key(self) -> None:
        """
        A certificate file without a key, and no key file, is refused.
        """
        error = self.assertRaises(
            ConfigError, load_client_identity, self.write("c.pem", cert_pem(self.cert))
        )
        self.assertIn("no PEM private key", str(error))


class ClientOptionsTests(Files):
    """
    L{client_tls_options} verifies the broker, or refuses to be built.
    """

    def setUp(self) -> None:
        self.other_ca = make_ca("Other CA")
        self.broker_ca = make_ca("Broker CA")
        self.bundle = self.write(
            "bundle.pem", cert_pem(self.other_ca[1]), cert_pem(self.broker_ca[1])
        )
        key, cert = make_leaf(
            self.broker_ca, "broker", dns=("broker.example",), ips=("127.0.0.1",)
        )
        self.server = PrivateCertificate.loadPEM(cert_pem(cert) + key_pem(key))

    def server_options(self, **extra: Any) -> CertificateOptions:
        return CertificateOptions(
            privateKey=self.server.privateKey.original,
            certificate=self.server.original,
            **extra,
        )

    def assertHandshakeFails(self, client: _Peer, server: _Peer) -> None:
        self.assertIsNotNone(client.lost)
        self.assertNotEqual(server.received, b"from client")

    def test_verified_by_second_ca_of_bundle(self) -> None:
        """
        A broker whose CA is the second of the bundle is trusted, and data flows.
        """
        options = client_tls_options("broker.example", self.bundle)
        client, server, _ = handshake(options, self.server_options())
        self.assertEqual(server.received, b"from client")
        self.assertEqual(client.received, b"from server")
        self.assertIsNone(client.lost)

    def test_ip_address_name(self) -> None:
        """
        An IP address is checked against the certificate's IP addresses.
        """
        client, server, _ = handshake(
            client_tls_options("127.0.0.1", self.bundle), self.server_options()
        )
        self.assertEqual(server.received, b"from client")

    def test_wrong_name_refused(self) -> None:
        """
        A certificate for another name fails the handshake.
        """
        client, server, _ = handshake(
            client_tls_options("elsewhere.example", self.bundle), self.server_options()
        )
        self.assertHandshakeFails(client, server)

    def test_untrusted_ca_refused(self) -> None:
        """
        A broker certificate from a CA outside the bundle fails the handshake.
        """
        only_other = self.write("other.pem", cert_pem(self.other_ca[1]))
        client, server, _ = handshake(
            client_tls_options("broker.example", only_other), self.server_options()
        )
        self.assertHandshakeFails(client, server)

    def refusal(self, options: ExplainedTLSOptions, client: _Peer) -> TLSFailed:
        """
        What the bus makes of a handshake that failed: a L{TLSFailed} about
        a certificate.
        """
        assert client.lost is not None
        error = _attempt_error(client.lost, options)
        assert isinstance(error, TLSFailed), error
        self.assertTrue(error.certificate)
        return error

    def test_untrusted_ca_explained(self) -> None:
        """
        Why the broker's certificate did not verify is added to OpenSSL's
        bare "certificate verify failed": here, its CA is not trusted.
        """
        only_other = self.write("other.pem", cert_pem(self.other_ca[1]))
        options = client_tls_options("broker.example", only_other)
        client, server, _ = handshake(options, self.server_options())
        self.assertHandshakeFails(client, server)
        self.assertEqual(
            self.refusal(options, client).details,
            "certificate verify failed: unable to get local issuer certificate"
            " (depth 0, CN=broker,O=fedhub tests)",
        )

    def test_expired_certificate_explained(self) -> None:
        """
        An expired broker certificate is refused, and named as expired.
        """
        key, cert = make_leaf(self.broker_ca, "broker", dns=("broker.example",), expired=True)
        expired = PrivateCertificate.loadPEM(cert_pem(cert) + key_pem(key))
        options = client_tls_options("broker.example", self.bundle)
        client, server, _ = handshake(
            options,
            CertificateOptions(privateKey=expired.privateKey.original, certificate=expired.original),
        )
        self.assertHandshakeFails(client, server)
        self.assertIn(
            "certificate verify failed: certificate has expired (depth 0, CN=broker,O=fedhub tests)",
            self.refusal(options, client).details,
        )

    def test_explanation_is_the_last_connections(self) -> None:
        """
        The explanation is about the chain of the last connection: none
        after a connection whose chain verified, none before any connection.
        """
        options = client_tls_options("broker.example", self.bundle)
        self.assertIsNone(options.explain_refusal())
        rogue = make_ca("Rogue CA")
        key, cert = make_leaf(rogue, "rogue", dns=("broker.example",))
        rogue_server = PrivateCertificate.loadPEM(cert_pem(cert) + key_pem(key))
        client, server, _ = handshake(
            options,
            CertificateOptions(
                privateKey=rogue_server.privateKey.original, certificate=rogue_server.original
            ),
        )
        self.assertHandshakeFails(client, server)
        self.assertEqual(
            options.explain_refusal(),
            "unable to get local issuer certificate (depth 0, CN=rogue,O=fedhub tests)",
        )
        client, server, _ = handshake(options, self.server_options())
        self.assertEqual(server.received, b"from client")
        self.assertIsNone(options.explain_refusal())

    def test_name_mismatch_not_explained_as_chain(self) -> None:
        """
        A certificate whose chain verifies but whose name does not match is
        refused for its name, with no chain explanation added.
        """
        options = client_tls_options("elsewhere.example", self.bundle)
        client, server, _ = handshake(options, self.server_options())
        self.assertHandshakeFails(client, server)
        self.assertIsNone(options.explain_refusal())
        error = self.refusal(options, client)
        self.assertEqual(
            error.details,
            "the broker's certificate is not for the name 'elsewhere.example' (server_hostname, "
            "or the broker URL's host)",
        )

    def test_certificate_without_names_refused(self) -> None:
        """
        A certificate the trusted CA signed with no subjectAltName at all
        (a client certificate, say) does not pass for the broker: Twisted's
        own check only logs that case and lets the handshake go on.
        """
        key, cert = make_leaf(self.broker_ca, "broker.example")
        self.assertRaises(x509.ExtensionNotFound, cert.extensions.get_extension_for_class,
                          x509.SubjectAlternativeName)
        nameless = PrivateCertificate.loadPEM(cert_pem(cert) + key_pem(key))
        options = client_tls_options("broker.example", self.bundle)
        client, server, _ = handshake(options, CertificateOptions(
            privateKey=nameless.privateKey.original, certificate=nameless.original))
        self.assertHandshakeFails(client, server)
        error = self.refusal(options, client)
        self.assertIn("the broker's certificate names no host", error.details)
        self.assertIn("subjectAltName", error.details)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_certificate_presented(self) -> None:
        """
        With a client certificate, a broker that requires one sees it.
        """
        client_ca = make_ca("Client CA")
        key, cert = make_leaf(client_ca, "hub.example", client=True)
        options = client_tls_options(
            "broker.example",
            self.bundle,
            self.write("c.pem", cert_pem(cert)),
            self.write("k.pem", key_pem(key)),
        )
        server_options = self.server_options(
            verify=True, caCerts=[Certificate.loadPEM(cert_pem(client_ca[1])).original],
            requireCertificate=True,
        )
        client, server, server_tls = handshake(options, server_options)
        self.assertEqual(server.received, b"from client")
        peer = Certificate.peerFromTransport(server_tls)
        self.assertEqual(peer.getSubject().commonName, b"hub.example")

    def test_renewed_client_certificate_used(self) -> None:
        """
        Renewable options read the files again once they change, so a
        renewed client certificate is presented from the next connection on;
        files that can not be used then are reported, and the options read
        before stay in use until the files change again.
        """
        client_ca = make_ca("Client CA")
        server_options = self.server_options(
            verify=True, caCerts=[Certificate.loadPEM(cert_pem(client_ca[1])).original],
            requireCertificate=True,
        )

        def write(path: str, data: bytes, when: int) -> None:
            with open(path, "wb") as f:
                f.write(data)
            os.utime(path, (when, when))

        def presented(options: Any) -> bytes:
            client, server, server_tls = handshake(options, server_options)
            self.assertEqual(server.received, b"from client")
            return cast(bytes, Certificate.peerFromTransport(server_tls).getSubject().commonName)

        old_key, old_cert = make_leaf(client_ca, "hub-2025", client=True)
        cert_file, key_file = self.write("c.pem", cert_pem(old_cert)), self.write("k.pem", key_pem(old_key))
        changes: list[ConfigError | None] = []
        renewable = RenewableTLSOptions("broker.example", self.bundle, cert_file, key_file,
                                        on_change=changes.append)
        self.assertEqual(presented(renewable.current()), b"hub-2025")
        self.assertEqual(changes, [])
        new_key, new_cert = make_leaf(client_ca, "hub-2026", client=True)
        # The certificate first: for a moment it does not match the key.
        write(cert_file, cert_pem(new_cert), 1_000_000_000)
        self.assertEqual(presented(renewable.current()), b"hub-2025")
        (error,) = changes
        self.assertIn("does not match", str(error))
        self.assertEqual(presented(renewable.current()), b"hub-2025")
        self.assertEqual(len(changes), 1)
        write(key_file, key_pem(new_key), 1_000_000_001)
        self.assertEqual(presented(renewable.current()), b"hub-2026")
        self.assertEqual(changes[1:], [None])

    def test_missing_client_certificate_refused_by_broker(self) -> None:
        """
        Without a client certificate, such a broker refuses the handshake
        (showing the previous test's server really checks).
        """
        client_ca = make_ca("Client CA")
        server_options = self.server_options(
            verify=True, caCerts=[Certificate.loadPEM(cert_pem(client_ca[1])).original],
            requireCertificate=True,
        )
        client, server, _ = handshake(client_tls_options("broker.example", self.bundle),
                                      server_options)
        self.assertNotEqual(server.received, b"from client")

    def test_no_ca_refused(self) -> None:
        """
        Without a CA bundle no options are built: the broker could not be verified.
        """
        error = self.assertRaises(ConfigError, client_tls_options, "broker.example", None)
        self.assertIn("without verification is refused", str(error))

    def test_no_hostname_refused(self) -> None:
        """
        Without a name to check, no options are built.
        """
        self.assertRaises(ConfigError, client_tls_options, "", self.bundle)

    def test_key_without_certificate_refused(self) -> None:
        """
        A client key alone is refused.
        """
        self.assertRaises(
            ConfigError, client_tls_options, "broker.example", self.bundle, None, "/k.pem"
        )


class BusTLSFilesTests(Files):
    """
    A bus reports unusable TLS files by their place in the configuration.
    """

    def test_problems_name_the_domain(self) -> None:
        """
        The broker commands and the API start a bus directly: its refusal
        names the domain's keys (C{domains.infra.key}), as C{fedhub
        check-config} does, not a bare C{key}.
        """
        from fedhub.amqp.transport import AMQPBus
        from fedhub.amqp.url import AMQPSettings

        ca = make_ca("Broker CA")
        key, cert = make_leaf(ca, "hub", client=True)
        settings = AMQPSettings(
            host="broker.example", tls=True, ca=self.write("ca.pem", b"not a certificate"),
            cert=self.write("c.pem", cert_pem(cert)),
            key=self.write("k.pem", key_pem(key, password=b"secret")),
        )
        bus = AMQPBus("infra", settings, reactor=Clock())
        with self.assertRaises(ConfigError) as raised:
            bus.startService()
        self.assertEqual([p.path for p in raised.exception.problems],
                         ["domains.infra.ca", "domains.infra.key"])
        self.assertIn("encrypted", raised.exception.problems[1].message)
        self.assertFalse(bus.running)


    def test_renewed_files_unusable_named_in_one_line(self) -> None:
        """
        Files that changed while the bus runs and can not be used (a new
        certificate written before its key) are logged as one line naming
        the domain's key, as at start, and not as the multi-line text of
        the configuration error.
        """
        from twisted.internet.error import ConnectionRefusedError
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
        from zope.interface import provider

        from fedhub.amqp.transport import AMQPBus
        from fedhub.amqp.url import AMQPSettings

        ca = make_ca("Broker CA")
        key, cert = make_leaf(ca, "hub", client=True)
        cert_path = self.write("c.pem", cert_pem(cert))
        key_path = self.write("k.pem", key_pem(key))
        settings = AMQPSettings(
            host="broker.example", tls=True, ca=self.write("ca.pem", cert_pem(ca[1])),
            cert=cert_path, key=key_path,
        )
        events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if "TLS files" in event.get("log_format", ""):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        reactor = MemoryReactorClock()
        bus = AMQPBus("infra", settings, reactor=reactor, reconnect_initial=1.0,
                      reconnect_max=1.0)
        bus.startService()
        self.addCleanup(bus.stopService)
        # A renewed certificate, its key not written yet.
        _, renewed = make_leaf(ca, "hub", client=True)
        with open(cert_path, "wb") as f:
            f.write(cert_pem(renewed))
        # The first attempt fails; the next one looks at the files.
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        reactor.advance(2.0)
        self.assertEqual(len(reactor.tcpClients), 2)
        [event] = events
        text = formatEvent(event)
        self.assertNotIn("\\n", text)
        self.assertNotIn("\n", text)
        self.assertIn(
            f"(domains.infra.key: the private key in {key_path!r} does not match the certificate)",
            text,
        )


class ExpiryWarningTests(Files):
    """
    Client certificates that expired or end soon are warned about.
    """

    def test_expired_soon_and_fine(self) -> None:
        """An expired certificate, one ending within 30 days, and one that does not."""
        from datetime import timedelta

        from fedhub.amqp.tls import expiry_warning

        ca = make_ca("Client CA")
        _, expired = make_leaf(ca, "hub", client=True, expired=True)
        path = self.write("old.pem", cert_pem(expired))
        warning = expiry_warning(path)
        assert warning is not None
        self.assertIn("expired on", warning)
        self.assertIn("the broker refuses it", warning)
        _, current = make_leaf(ca, "hub", client=True)
        path = self.write("new.pem", cert_pem(current))
        ends = current.not_valid_after_utc
        self.assertIsNone(expiry_warning(path, now=ends - timedelta(days=60)))
        soon = expiry_warning(path, now=ends - timedelta(days=10, hours=1))
        assert soon is not None
        self.assertIn("in 10 day(s)", soon)
        self.assertIsNone(expiry_warning(os.path.join(self.mktemp(), "missing.pem")))


class ExposedKeyWarningTests(Files):
    """
    A client key every user can read is warned about.
    """

    def test_key_file(self) -> None:
        """A separate key file readable by others is named with its mode; 0600 and 0640 are not."""
        from fedhub.amqp.tls import exposed_key_warning

        key, cert = make_leaf(make_ca("Client CA"), "hub", client=True)
        cert_path = self.write("hub.pem", cert_pem(cert))
        key_path = self.write("hub.key", key_pem(key))
        os.chmod(cert_path, 0o644)
        os.chmod(key_path, 0o604)
        self.assertEqual(
            exposed_key_warning(cert_path, key_path),
            f"the private key in {key_path!r} can be read by every user (mode 0604): "
            "anyone on the machine can log in as the hub; chmod o-r it",
        )
        for mode in (0o600, 0o640):
            os.chmod(key_path, mode)
            self.assertIsNone(exposed_key_warning(cert_path, key_path))

    def test_key_in_certificate_file(self) -> None:
        """Without a key file, the certificate file holds the key and is the one looked at."""
        from fedhub.amqp.tls import exposed_key_warning

        key, cert = make_leaf(make_ca("Client CA"), "hub", client=True)
        both = self.write("hub.pem", cert_pem(cert), key_pem(key))
        os.chmod(both, 0o644)
        warning = exposed_key_warning(both)
        assert warning is not None
        self.assertIn(repr(both), warning)
        os.chmod(both, 0o600)
        self.assertIsNone(exposed_key_warning(both))

    def test_missing_file(self) -> None:
        """A file that is not there is left to the other checks."""
        from fedhub.amqp.tls import exposed_key_warning

        self.assertIsNone(exposed_key_warning(self.mktemp() + "-none.pem"))
