"""
Integration tests of L{fedhub.amqp.transport.AMQPBus} against a private
RabbitMQ node (L{tests.broker}) with TLS, two vhosts and certificate-only
users: certificate login per domain, refused TLS setups, refused vhosts,
a frozen broker, forced closes and a broker restart.

The node is started once for the module's test class.  Without RabbitMQ
installed the tests are skipped, except in CI (C{CI=true}).  The last class
needs no broker: it pins how a failed TLS handshake is recognised.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from typing import Any

from OpenSSL import SSL
from service_identity.exceptions import DNSMismatch, VerificationError
from service_identity.hazmat import DNS_ID
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from fedhub.amqp.transport import AMQPBus, TLSFailed, _attempt_error, _tls_failure
from fedhub.config import DomainConfig, parse_config
from fedhub.errors import AccessRefused, NotConnected
from fedhub.message import Message
from fedhub.topology import BindingSpec, QueueSpec, Topology
from tests.broker import PrivateBrokerCase, User, reactor, report, wait_until
from tests.test_cli_publish import run_cli

INFRA = "/infra"
COMMUNITY = "/community"
ALL = (".*", ".*", ".*")


class Collector:
    """
    An on_delivery that keeps and acknowledges every delivery.
    """

    def __init__(self) -> None:
        self.deliveries: list[Any] = []

    def __call__(self, delivery: Any) -> None:
        self.deliveries.append(delivery)
        delivery.ack()

    @property
    def ids(self) -> list[str]:
        return [d.message.id for d in self.deliveries]


class ReconnectLog:
    """
    Records the reconnector's "Connecting ... failed" events of one domain.
    """

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.failures: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if (
                "next in" in event.get("log_format", "")
                and f"(domain {domain})" in str(event.get("broker", ""))
            ):
                self.failures.append(event)

        self.observer = observe

    @property
    def errors(self) -> list[str]:
        return [str(e.get("error")) for e in self.failures]


class PrivateTLSTests(PrivateBrokerCase):
    """
    The bus over TLS with certificate login, on a private node.
    """

    timeout = 90
    vhosts = (INFRA, COMMUNITY)
    users = (
        User("infra-hub", permissions={INFRA: ALL}),
        User("community-hub", permissions={COMMUNITY: ALL}),
        User("operator", "operator-secret", permissions={INFRA: ALL, COMMUNITY: ALL}),
    )

    def domain(self, name: str, user: str, vhost: str, **changes: Any) -> DomainConfig:
        """
        The configuration of a domain that logs in to C{vhost} with the
        client certificate of C{user}.
        """
        broker = self.broker
        assert broker.pki is not None
        identity = broker.pki.clients[user]
        values: dict[str, Any] = dict(
            name=name,
            broker=broker.tls_url(vhost),
            ca=broker.pki.ca,
            cert=identity.cert,
            key=identity.key,
            heartbeat=10,
            connection_name=f"fedhub-test-{name}-{uuid.uuid4().hex[:8]}",
            connection_timeout=5.0,
        )
        values.update(changes)
        return DomainConfig(**values)

    def start_bus(self, domain: DomainConfig, **options: Any) -> AMQPBus:
        """
        Start the bus of a domain; it is stopped after the test.
        """
        options.setdefault("reconnect_initial", 0.2)
        options.setdefault("reconnect_max", 1.0)
        options.setdefault("setup_timeout", 10.0)
        bus = AMQPBus.from_domain(domain, reactor(), **options)
        bus.startService()
        self.addCleanup(bus.stopService)
        return bus

    async def connected(self, bus: AMQPBus, timeout: float = 20.0) -> None:
        waiting = bus.when_connected()
        waiting.addTimeout(timeout, reactor())
        await waiting

    def watch_reconnects(self, domain: str) -> ReconnectLog:
        record = ReconnectLog(domain)
        globalLogPublisher.addObserver(record.observer)
        self.addCleanup(globalLogPublisher.removeObserver, record.observer)
        return record

    async def queue(self, bus: AMQPBus, pattern: str, **arguments: Any) -> str:
        name = f"fedhub.test.private.{uuid.uuid4().hex}"
        await bus.declare(
            Topology(
                queues=(QueueSpec(name, arguments=arguments),),
                bindings=(BindingSpec(name, "amq.topic", pattern),) if pattern else (),
            )
        )
        return name

    async def round_trip(self, bus: AMQPBus, collector: Collector, topic: str) -> Message:
        """
        Publish one message on C{topic} and wait until C{collector} got it.
        """
        message = Message.create(topic, {"n": uuid.uuid4().hex})
        sent = bus.publish(message)
        sent.addTimeout(20, reactor())
        await sent
        await wait_until(lambda: message.id in collector.ids, 20, f"delivery of {topic}")
        return message

    async def refused(self, bus: AMQPBus, log: ReconnectLog) -> str:
        """
        Wait until the bus failed to connect twice; it must never have been
        connected, and the failure is a typed TLS one, logged.  Returns what
        OpenSSL or service-identity said.
        """
        await wait_until(lambda: len(log.failures) >= 2 or bus.connected, 20, "a refusal")
        self.assertFalse(bus.connected)
        self.assertEqual(bus.stats.connections, 0)
        error = bus.last_error
        self.assertIsInstance(error, TLSFailed)
        assert isinstance(error, TLSFailed)
        self.assertIn(error.details, log.errors[0])
        return error.details

    # -- certificate login ----------------------------------------------------

    async def test_external_login_per_domain(self) -> None:
        """
        Each domain logs in with its own certificate (EXTERNAL) to its own
        vhost, built from a parsed configuration, and a message makes the
        round trip through the broker on both.
        """
        broker = self.broker
        assert broker.pki is not None
        pki = broker.pki
        text = f"""
[hub]
state_dir = "{os.path.abspath(self.mktemp())}"

[domains.infra]
broker = "{broker.tls_url(INFRA)}"
ca = "{pki.ca}"
cert = "{pki.clients['infra-hub'].cert}"
key = "{pki.clients['infra-hub'].key}"
auth_mechanism = "EXTERNAL"
heartbeat = 10

[domains.community]
broker = "{broker.tls_url(COMMUNITY)}"
ca = "{pki.ca}"
cert = "{pki.clients['community-hub'].cert}"
key = "{pki.clients['community-hub'].key}"
"""
        config = parse_config(text)
        for name in ("infra", "community"):
            bus = self.start_bus(config.domains[name])
            self.assertEqual(bus.settings.auth_mechanism, "EXTERNAL")
            await self.connected(bus)
            run = uuid.uuid4().hex
            queue = await self.queue(bus, f"fedhubtest.{run}.#")
            collector = Collector()
            await bus.subscribe(queue, collector, 10)
            message = await self.round_trip(bus, collector, f"fedhubtest.{run}.{name}")
            received = collector.deliveries[0].message
            self.assertEqual(received, message.evolve(queue=queue))
        listing = await broker.ctl("list_connections", "user", "vhost", "ssl", "auth_mechanism")
        rows = {tuple(line.split(b"\t")) for line in listing.splitlines()[1:]}
        self.assertEqual(
            rows,
            {
                (b"infra-hub", INFRA.encode(), b"true", b"EXTERNAL"),
                (b"community-hub", COMMUNITY.encode(), b"true", b"EXTERNAL"),
            },
        )

    # -- refused TLS -------------------------------------------------------------

    async def test_wrong_server_name_refused(self) -> None:
        """
        A broker certificate that does not carry the expected name is refused:
        the bus never connects and logs why.
        """
        log = self.watch_reconnects("wrong-name")
        bus = self.start_bus(
            self.domain("wrong-name", "infra-hub", INFRA, server_hostname="wrong.example")
        )
        error = await self.refused(bus, log)
        self.assertIn("wrong.example", error)

    async def test_untrusted_ca_refused(self) -> None:
        """
        A client that trusts only another CA can not verify the broker and
        never connects.
        """
        log = self.watch_reconnects("rogue-trust")
        assert self.broker.pki is not None
        bus = self.start_bus(
            self.domain("rogue-trust", "infra-hub", INFRA, ca=self.broker.pki.rogue_ca)
        )
        error = await self.refused(bus, log)
        # OpenSSL's bare "certificate verify failed" is explained.
        self.assertRegex(
            error,
            r"^certificate verify failed: (unable to get local issuer certificate"
            r"|self-signed certificate in certificate chain) \(depth \d, CN=",
        )
        self.assertTrue(bus.last_error.certificate)  # type: ignore[union-attr]

    async def test_publish_command_refused_certificate(self) -> None:
        """
        C{fedhub publish} to a broker whose certificate does not verify exits
        at once with C{EX_CONFIG} and says why, instead of retrying until its
        timeout and exiting as if the broker were away.
        """
        assert self.broker.pki is not None
        identity = self.broker.pki.clients["infra-hub"]
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write(
                f"""
[hub]
state_dir = "{os.path.abspath(self.mktemp())}"

[domains.infra]
broker = "{self.broker.tls_url(INFRA)}"
ca = "{self.broker.pki.rogue_ca}"
cert = "{identity.cert}"
key = "{identity.key}"
"""
            )
        process = await run_cli(
            "publish", "--config", config, "--timeout", "60", "--topic", "org.example.dev.tls",
            "--body", "{}",
        )
        self.assertEqual(process.ended.result, 78, process.stderr)
        self.assertRegex(
            process.stderr,
            r"^fedhub publish: the TLS handshake with the broker failed: certificate verify failed: "
            r"(unable to get local issuer certificate|self-signed certificate in certificate chain)"
            r" \(depth \d, CN=[^)]*\) \(connecting to amqps://",
        )
        # One line, and not the timeout's "could not connect ... within 60 s".
        self.assertEqual(process.stderr.count("\n"), 1, process.stderr)
        self.assertNotIn("within", process.stderr)

    async def test_missing_client_certificate_refused(self) -> None:
        """
        The broker requires a client certificate: a client without one (even
        with a valid password) never connects.
        """
        log = self.watch_reconnects("no-cert")
        domain = self.domain(
            "no-cert",
            "operator",
            INFRA,
            broker=self.broker.tls_url(INFRA).replace("amqps://", "amqps://operator:operator-secret@"),
            cert=None,
            key=None,
        )
        bus = self.start_bus(domain)
        self.assertEqual(bus.settings.auth_mechanism, "PLAIN")
        error = await self.refused(bus, log)
        self.assertIn("certificate required", error)

    async def test_rogue_client_certificate_refused(self) -> None:
        """
        A client certificate for a known user but signed by a CA the broker
        does not trust is refused.
        """
        log = self.watch_reconnects("rogue-cert")
        assert self.broker.pki is not None
        rogue = self.broker.pki.rogue_clients["infra-hub"]
        bus = self.start_bus(
            self.domain("rogue-cert", "infra-hub", INFRA, cert=rogue.cert, key=rogue.key)
        )
        error = await self.refused(bus, log)
        self.assertIn("unknown ca", error)
        # The line names the file the broker refused.
        self.assertIn(f"the broker refused the client certificate {rogue.cert!r}", error)

    # -- refused vhost ---------------------------------------------------------------

    async def test_other_domains_vhost_refused_with_backoff(self) -> None:
        """
        The community certificate can not open the infra vhost: the error is
        typed (AccessRefused) and the bus retries with growing delays, not
        in a hot loop.
        """
        log = self.watch_reconnects("intruder")
        bus = self.start_bus(
            self.domain("intruder", "community-hub", INFRA),
            reconnect_initial=0.25,
            reconnect_max=2.0,
            rand=lambda: 1.0,
        )
        await wait_until(lambda: len(log.failures) >= 4 or bus.connected, 30, "four refusals")
        self.assertFalse(bus.connected)
        self.assertIsInstance(bus.last_error, AccessRefused)
        assert isinstance(bus.last_error, AccessRefused)
        self.assertEqual(bus.last_error.reply_code, 530)
        self.assertIn("community-hub", bus.last_error.reply_text)
        self.assertTrue(all("access to vhost" in error for error in log.errors), log.errors)
        # Each retry waits longer (no jitter here), up to the cap...
        first = log.failures[:4]
        self.assertEqual([float(e["delay"]) for e in first], [0.25, 0.5, 1.0, 2.0])
        self.assertEqual([int(e["attempt"]) for e in first], [1, 2, 3, 4])
        # ...and really waits: the fourth refusal came 1.75 s or more after
        # the first, where a hot loop would have made dozens of attempts.
        spent = float(first[3]["log_time"]) - float(first[0]["log_time"])
        self.assertGreaterEqual(spent, 0.25 + 0.5 + 1.0)
        report("four refused attempts spread over (s)", spent)

    # -- a frozen broker, closes and restarts ------------------------------------------

    async def test_frozen_broker_detected_and_recovered(self) -> None:
        """
        A frozen broker (SIGSTOP) is noticed by heartbeats within three
        intervals; once it runs again the bus reconnects and works.
        """
        heartbeat = 2
        bus = self.start_bus(self.domain("frozen", "infra-hub", INFRA, heartbeat=heartbeat))
        await self.connected(bus)
        run = uuid.uuid4().hex
        queue = await self.queue(bus, f"fedhubtest.{run}.#")
        collector = Collector()
        await bus.subscribe(queue, collector, 10)
        self.broker.sigstop()
        frozen_at = reactor().seconds()
        try:
            await wait_until(lambda: not bus.connected, 3 * heartbeat + 2, "the loss")
            noticed = reactor().seconds() - frozen_at
        finally:
            self.broker.sigcont()
        self.assertLessEqual(noticed, 3 * heartbeat + 2)
        report("frozen broker noticed after (s)", noticed)
        self.assertEqual(bus.stats.connection_losses, 1)
        await self.connected(bus, timeout=30)
        await self.round_trip(bus, collector, f"fedhubtest.{run}.thawed")

    async def test_forced_close_and_restart(self) -> None:
        """
        After the broker closes every connection, and after a broker restart,
        the bus reconnects, declares its queue again and publishing and
        consuming resume by themselves.
        """
        bus = self.start_bus(self.domain("restart", "infra-hub", INFRA))
        await self.connected(bus)
        run = uuid.uuid4().hex
        queue = await self.queue(bus, f"fedhubtest.{run}.#")
        collector = Collector()
        await bus.subscribe(queue, collector, 10)
        await self.round_trip(bus, collector, f"fedhubtest.{run}.before")

        await self.broker.ctl("close_all_connections", "--global", "fedhub test: forced close")
        await wait_until(lambda: bus.stats.connection_losses == 1, 20, "the forced close")
        await self.connected(bus)
        await self.round_trip(bus, collector, f"fedhubtest.{run}.after-close")

        await self.broker.restart()
        await wait_until(lambda: bus.stats.connection_losses == 2, 20, "the loss by restart")
        await self.connected(bus, timeout=30)
        await self.round_trip(bus, collector, f"fedhubtest.{run}.after-restart")
        self.assertEqual(bus.stats.connections, 3)
        self.assertEqual(len(collector.deliveries), 3)

    async def test_dead_letter_over_tls(self) -> None:
        """
        A rejected message is dead-lettered; its x-death header is decoded
        from a TLS connection too.
        """
        bus = self.start_bus(self.domain("dlx", "community-hub", COMMUNITY))
        await self.connected(bus)
        dead = await self.queue(bus, "")
        work = await self.queue(
            bus, "", **{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead}
        )
        rejected: list[Any] = []

        def reject(delivery: Any) -> None:
            rejected.append(delivery)
            delivery.reject(requeue=False)

        await bus.subscribe(work, reject, 5)
        message = Message.create("fedhubtest.dl", {"n": 1})
        await bus.publish(message, exchange="", routing_key=work)
        dead_letters = Collector()
        await bus.subscribe(dead, dead_letters, 5)
        await wait_until(lambda: dead_letters.deliveries != [], 20, "the dead letter")
        received = dead_letters.deliveries[0].message
        self.assertEqual(received.id, message.id)
        (death,) = received.headers["x-death"]
        self.assertEqual((death["queue"], death["reason"], death["count"]), (work, "rejected", 1))
        self.assertIsInstance(death["time"], datetime)



class TLSFailureTests(SynchronousTestCase):
    """
    How a failed TLS handshake is recognised inside what a connection
    attempt raised; needs no broker.
    """

    def raised_over(self, cause: BaseException) -> BaseException:
        """
        The error the protocol raises "from None" while C{cause} is handled.
        """
        try:
            try:
                raise cause
            except BaseException:
                raise NotConnected("the connection is closed") from None
        except NotConnected as e:
            return e

    def test_openssl_error(self) -> None:
        """
        An OpenSSL error, even wrapped, becomes TLSFailed with its reasons.
        """
        error = self.raised_over(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        found = _tls_failure(Failure(error))
        assert found is not None
        self.assertIsInstance(found, NotConnected)
        self.assertEqual(found.details, "certificate verify failed")

    def test_name_mismatch(self) -> None:
        """
        A service-identity mismatch becomes TLSFailed naming the name.
        """
        mismatch = DNSMismatch(mismatched_id=DNS_ID("wrong.example"))
        found = _tls_failure(VerificationError(errors=[mismatch]))
        assert found is not None
        self.assertIn("wrong.example", found.details)

    def test_broker_alert_names_client_certificate(self) -> None:
        """
        An alert by which the broker refused the client certificate names
        its file; the hub's own refusal of the broker's certificate, and an
        alert when the domain has no client certificate, do not.
        """
        alert = Failure(self.raised_over(SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])))
        self.assertEqual(
            str(_attempt_error(alert, None, "/etc/fedhub/infra/hub.pem")),
            "the TLS handshake with the broker failed: tlsv1 alert unknown ca (the broker"
            " refused the client certificate '/etc/fedhub/infra/hub.pem')",
        )
        self.assertEqual(
            str(_attempt_error(alert)), "the TLS handshake with the broker failed: tlsv1 alert unknown ca"
        )
        ours = Failure(self.raised_over(SSL.Error([("SSL routines", "", "certificate verify failed")])))
        self.assertNotIn("hub.pem", str(_attempt_error(ours, None, "/etc/fedhub/infra/hub.pem")))
        cut = Failure(self.raised_over(SSL.Error([("SSL routines", "", "unexpected eof while reading")])))
        self.assertNotIn("hub.pem", str(_attempt_error(cut, None, "/etc/fedhub/infra/hub.pem")))

    def test_other_errors(self) -> None:
        """
        Errors that are not about TLS are left alone.
        """
        self.assertIsNone(_tls_failure(self.raised_over(ConnectionRefusedError())))
        self.assertIsNone(_tls_failure(NotConnected("the connection is closed")))
