"""
Tests for L{fedhub.amqp.url}: broker URLs into connection settings and
endpoint strings.
"""

from __future__ import annotations

from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from fedhub.amqp.url import (
    DEFAULT_HEARTBEAT,
    EXTERNAL,
    PLAIN,
    AMQPSettings,
    endpoint_description,
    parse_url,
)
from fedhub.errors import ConfigError


class ParseTests(SynchronousTestCase):
    """
    L{parse_url} reads RabbitMQ-style URLs.
    """

    def test_defaults(self) -> None:
        """
        A bare amqp URL means port 5672, the default vhost, guest/guest over
        PLAIN, heartbeat 30 and no TLS.
        """
        settings = parse_url("amqp://broker.example")
        self.assertEqual(settings.host, "broker.example")
        self.assertEqual(settings.port, 5672)
        self.assertEqual(settings.vhost, "/")
        self.assertEqual((settings.username, settings.password), ("guest", "guest"))
        self.assertEqual(settings.heartbeat, DEFAULT_HEARTBEAT)
        self.assertEqual(settings.auth_mechanism, PLAIN)
        self.assertFalse(settings.tls)

    def test_amqps_default_port(self) -> None:
        """
        amqps means TLS and port 5671.
        """
        settings = parse_url("amqps://broker.example")
        self.assertTrue(settings.tls)
        self.assertEqual(settings.port, 5671)

    def test_explicit_port_and_empty_host(self) -> None:
        """
        An explicit port wins; an empty host is localhost.
        """
        self.assertEqual(parse_url("amqp://h:15672").port, 15672)
        self.assertEqual(parse_url("amqp://").host, "localhost")

    def test_credentials_percent_decoded(self) -> None:
        """
        User and password are percent-decoded.
        """
        settings = parse_url("amqp://us%40er:p%3Ass%2Fw@h/")
        self.assertEqual(settings.username, "us@er")
        self.assertEqual(settings.password, "p:ss/w")

    def test_vhost(self) -> None:
        """
        The vhost is the percent-decoded path; an empty path is the default vhost.
        """
        self.assertEqual(parse_url("amqp://h/%2F").vhost, "/")
        self.assertEqual(parse_url("amqp://h/").vhost, "/")
        self.assertEqual(parse_url("amqp://h/infra").vhost, "infra")
        self.assertEqual(parse_url("amqp://h/a%2Fb%20c").vhost, "a/b c")

    def test_vhost_with_raw_slash_refused(self) -> None:
        """
        A second path segment is refused: a '/' in a vhost must be written %2F.
        """
        error = self.assertRaises(ConfigError, parse_url, "amqp://h/a/b")
        self.assertIn("%2F", str(error))

    def test_query_settings(self) -> None:
        """
        heartbeat, connection_name and connection_timeout come from the query.
        """
        settings = parse_url(
            "amqp://h/?heartbeat=5&connection_name=hub%20one&connection_timeout=2.5"
        )
        self.assertEqual(settings.heartbeat, 5)
        self.assertEqual(settings.connection_name, "hub one")
        self.assertEqual(settings.connection_timeout, 2.5)

    def test_heartbeat_zero_refused(self) -> None:
        """
        heartbeat=0 (no heartbeats) is refused with a reason.
        """
        error = self.assertRaises(ConfigError, parse_url, "amqp://h/?heartbeat=0")
        self.assertIn("heartbeat must be at least 1", str(error))

    def test_bad_heartbeats_refused(self) -> None:
        """
        A heartbeat that is not a number or does not fit a short is refused.
        """
        self.assertRaises(ConfigError, parse_url, "amqp://h/?heartbeat=soon")
        self.assertRaises(ConfigError, parse_url, "amqp://h/?heartbeat=70000")
        self.assertRaises(ConfigError, parse_url, "amqp://h/?heartbeat=-3")

    def test_unknown_and_repeated_keys_refused(self) -> None:
        """
        Unknown query keys (typos) and repeated keys are refused, every one named.
        """
        error = self.assertRaises(
            ConfigError, parse_url, "amqp://h/?hearbeat=5&heartbeat=1&heartbeat=2"
        )
        messages = [p.message for p in error.problems]
        self.assertTrue(any("unknown query key 'hearbeat'" in m for m in messages), messages)
        self.assertTrue(any("'heartbeat' is given twice" in m for m in messages), messages)

    def test_problem_key_path(self) -> None:
        """
        Problems name the configuration key the URL came from.
        """
        error = self.assertRaises(
            ConfigError, parse_url, "amqp://h/?heartbeat=0", "domains.infra.broker"
        )
        self.assertEqual([p.path for p in error.problems], ["domains.infra.broker"])

    def test_bad_schemes_and_shapes_refused(self) -> None:
        """
        Other schemes, fragments, whitespace, bad ports and port 0 are refused.
        """
        for url in (
            "http://h/",
            "amqp://h/#frag",
            "amqp://h /",
            "amqp://h:99999/",
            "amqp://h:0/",
            "amqp://h:x/",
        ):
            self.assertRaises(ConfigError, parse_url, url)

    def test_not_a_string(self) -> None:
        """
        Something that is not a string is a configuration error, not a crash.
        """
        self.assertRaises(ConfigError, parse_url, 5672)  # type: ignore[arg-type]

    def test_tls_files(self) -> None:
        """
        cacertfile, certfile, keyfile and server_name_indication set the TLS
        files and name; a client certificate means EXTERNAL login.
        """
        settings = parse_url(
            "amqps://10.0.0.1/?cacertfile=/etc/ca.pem&certfile=/etc/c.pem"
            "&keyfile=/etc/k.pem&server_name_indication=broker.example"
        )
        self.assertEqual(
            (settings.ca, settings.cert, settings.key), ("/etc/ca.pem", "/etc/c.pem", "/etc/k.pem")
        )
        self.assertEqual(settings.verify_hostname, "broker.example")
        self.assertEqual(settings.auth_mechanism, EXTERNAL)

    def test_plain_with_certificate(self) -> None:
        """
        auth_mechanism=plain keeps PLAIN login with a client certificate.
        """
        settings = parse_url("amqps://u:p@h/?certfile=/c.pem&auth_mechanism=plain")
        self.assertEqual(settings.auth_mechanism, PLAIN)

    def test_tls_files_without_tls_refused(self) -> None:
        """
        TLS files on an amqp:// URL are refused: they would silently do nothing.
        """
        error = self.assertRaises(ConfigError, parse_url, "amqp://h/?certfile=/c.pem")
        self.assertIn("not amqps", str(error))

    def test_external_without_certificate_refused(self) -> None:
        """
        EXTERNAL login without a client certificate (or without TLS) is refused.
        """
        self.assertRaises(ConfigError, parse_url, "amqps://h/?auth_mechanism=EXTERNAL")
        self.assertRaises(ConfigError, parse_url, "amqp://h/?auth_mechanism=EXTERNAL")
        self.assertRaises(ConfigError, parse_url, "amqps://h/?auth_mechanism=KERBEROS")

    def test_key_without_certificate_refused(self) -> None:
        """
        A client key without a certificate is refused.
        """
        self.assertRaises(ConfigError, parse_url, "amqps://h/?keyfile=/k.pem")

    def test_no_verification_refused(self) -> None:
        """
        verify=verify_none is refused: fedhub always verifies the broker.
        """
        error = self.assertRaises(ConfigError, parse_url, "amqps://h/?verify=verify_none")
        self.assertIn("always verifies", str(error))
        parse_url("amqps://h/?verify=verify_peer")

    def test_ipv6_host(self) -> None:
        """
        A bracketed IPv6 address is the host, without brackets.
        """
        self.assertEqual(parse_url("amqp://[::1]:5673/").host, "::1")


class SettingsTests(SynchronousTestCase):
    """
    L{AMQPSettings} keeps secrets out of logs and checks changes.
    """

    def test_password_hidden(self) -> None:
        """
        Neither repr nor safe_url show the password.
        """
        settings = parse_url("amqp://alice:s3cret@h/vh")
        self.assertNotIn("s3cret", repr(settings))
        self.assertNotIn("s3cret", settings.safe_url())
        self.assertEqual(settings.safe_url(), "amqp://alice@h:5672/vh")

    def test_with_changes_checked(self) -> None:
        """
        with_changes applies changes and refuses unusable ones.
        """
        settings = parse_url("amqp://h/")
        self.assertEqual(settings.with_changes(heartbeat=7).heartbeat, 7)
        self.assertRaises(ConfigError, settings.with_changes, heartbeat=0)
        self.assertRaises(ConfigError, settings.with_changes, cert="/c.pem")

    def test_direct_construction_defaults(self) -> None:
        """
        Settings built directly are the same as a bare URL's.
        """
        self.assertEqual(AMQPSettings(host="h"), parse_url("amqp://h"))


class EndpointTests(SynchronousTestCase):
    """
    L{endpoint_description} builds a tcp: endpoint string.
    """

    def connect(self, settings: AMQPSettings) -> tuple[str, int, float]:
        reactor = MemoryReactor()
        endpoint = clientFromString(reactor, endpoint_description(settings))
        endpoint.connect(Factory.forProtocol(Protocol))
        host, port, _factory, timeout, _bind = reactor.tcpClients[0]
        return host, port, timeout

    def test_host_port_timeout(self) -> None:
        """
        The string connects to the host and port with the connection timeout,
        rounded up to whole seconds.
        """
        settings = parse_url("amqp://broker.example:5999/?connection_timeout=2.5")
        self.assertEqual(
            endpoint_description(settings), "tcp:host=broker.example:port=5999:timeout=3"
        )
        self.assertEqual(self.connect(settings), ("broker.example", 5999, 3))

    def test_ipv6_escaped(self) -> None:
        """
        The colons of an IPv6 address are escaped, so the string parses back.
        """
        settings = parse_url("amqp://[::1]:5673/")
        self.assertEqual(self.connect(settings)[:2], ("::1", 5673))
