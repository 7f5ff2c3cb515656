"""
A private RabbitMQ node for integration tests that the shared broker can not
serve: TLS with client certificates, several vhosts and users, and faults
(kill -9, SIGSTOP, restarts, resource alarms) that must never touch the shared
node at 127.0.0.1:5672.  It also holds what tests on that shared node
need: L{require_shared_broker}, L{start_live_bus} and L{delete_declared}.

L{PrivateBroker} starts C{rabbitmq-server} with C{HOME} and every
C{RABBITMQ_*} path inside a temporary directory, on free ports picked at run
time and bound to 127.0.0.1 only.  A test certificate authority (L{TestPKI})
is made in the run with C{cryptography}: a server certificate for
C{localhost}/127.0.0.1, client certificates whose common name is the user
name (RabbitMQ's C{EXTERNAL} login takes the user from it), and a rogue CA
that nobody trusts.  Vhosts, users and permissions are loaded from a
definitions file when the node boots, which saves a dozen CLI calls.

Starting a node takes several seconds, so test classes start one in
C{setUpClass} (L{PrivateBrokerCase}) and share it.  The node is always
stopped: by the class cleanup, and as a last resort when the Python process
exits.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from fedhub.amqp.transport import AMQPBus
from fedhub.amqp.url import parse_url

SBIN = "/usr/lib/rabbitmq/bin"
SERVER = os.path.join(SBIN, "rabbitmq-server")
CTL = os.path.join(SBIN, "rabbitmqctl")

SHARED_PORTS = frozenset({5672, 5671, 4369, 25672, 15672})
"""Ports of the shared node and epmd: never handed out to a private node."""


def require_shared_broker(case: TestCase) -> None:
    """
    Skip C{case} when nothing listens on the shared broker's port
    (127.0.0.1:5672), except in CI (C{CI=true}), where that fails it.
    """
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1.0):
            return
    except OSError:
        pass
    if os.environ.get("CI") == "true":
        case.fail("no RabbitMQ at 127.0.0.1:5672 (CI requires one)")
    raise SkipTest("no RabbitMQ at 127.0.0.1:5672")


async def start_live_bus(
    case: TestCase,
    domain: str,
    timeout: float,
    *,
    label: str | None = None,
    heartbeat: int = 10,
    **options: Any,
) -> AMQPBus:
    """
    Start an L{AMQPBus} for C{domain} on the shared broker (guest/guest, vhost
    C{/}) and wait until it is connected, failing after C{timeout} seconds;
    C{case}'s cleanup stops it.

    It reconnects quickly (C{reconnect_initial} 0.2 s, C{reconnect_max} 1 s)
    unless C{options} say otherwise; its connection is named
    C{fedhub-<label>-<random>}, C{label} being the domain unless given, so a
    test can find it on the broker.
    """
    name = f"fedhub-{label or domain}-{uuid.uuid4().hex}"
    options.setdefault("reconnect_initial", 0.2)
    options.setdefault("reconnect_max", 1.0)
    bus = AMQPBus(
        domain,
        parse_url(
            f"amqp://guest:guest@127.0.0.1:5672/?connection_name={name}&heartbeat={heartbeat}"
        ),
        reactor=_reactor(),
        **options,
    )
    bus.startService()
    case.addCleanup(bus.stopService)
    connected = bus.when_connected()
    connected.addTimeout(timeout, _reactor())
    await connected
    return bus


def delete_declared(queues: Iterable[str], exchanges: Iterable[str], port: int = 5672) -> None:
    """
    Delete queues and exchanges a test declared on a broker at
    127.0.0.1 (guest/guest), those that are gone already included; blocking,
    so tests on the reactor run it in a thread.
    """
    import pika

    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            host="127.0.0.1",
            port=port,
            credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=2,
        )
    )
    try:
        # Deleting what does not exist is no error in RabbitMQ 3.x.
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in exchanges:
            if exchange and not exchange.startswith("amq."):
                channel.exchange_delete(exchange)
    finally:
        connection.close()


class BrokerError(Exception):
    """
    The private node could not be started, reached or controlled.
    """


def broker_available() -> bool:
    """
    Whether the RabbitMQ server scripts are installed.
    """
    return os.access(SERVER, os.X_OK) and os.access(CTL, os.X_OK)


def require_broker() -> None:
    """
    Skip the caller when RabbitMQ is not installed, except in CI (C{CI=true}),
    where a missing broker is a failure.
    """
    if broker_available():
        return
    if os.environ.get("CI") == "true":
        raise BrokerError(f"{SERVER} is missing; CI requires RabbitMQ")
    raise SkipTest(f"{SERVER} is not installed")


def free_port(below: int = 65536) -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below and port not in SHARED_PORTS:
            return port
    raise BrokerError("no free port found")


# --- certificates -------------------------------------------------------------


Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhub tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Authority:
    """
    A certificate authority made for one test run.

    @ivar name: Its common name.
    @ivar key: Its private key.
    @ivar certificate: Its self-signed certificate.
    """

    name: str
    key: Key
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        """
        A new self-signed CA, valid from yesterday for 30 days.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        expired: bool = False,
    ) -> tuple[Key, x509.Certificate]:
        """
        A leaf certificate signed by this CA: for a server (with the given
        names) or a client (its common name is the login); valid from
        yesterday for 30 days, or C{expired} yesterday.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc) - (timedelta(days=31) if expired else timedelta(0))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


@dataclass(frozen=True)
class Identity:
    """
    The files of one certificate: its PEM certificate and its PEM key.
    """

    cert: str
    key: str


@dataclass(frozen=True)
class TestPKI:
    """
    The certificates of one test run, as files.

    @ivar ca: The CA bundle the broker and its clients trust.
    @ivar rogue_ca: A CA nobody trusts (a client that trusts only it can not
        verify the broker).
    @ivar server: The broker's certificate: C{localhost} and 127.0.0.1.
    @ivar clients: A client certificate per user name, signed by the CA.
    @ivar rogue_clients: The same user names, signed by the rogue CA.
    """

    ca: str
    rogue_ca: str
    server: Identity
    clients: dict[str, Identity]
    rogue_clients: dict[str, Identity]

    @classmethod
    def create(cls, directory: str, users: Iterable[str]) -> TestPKI:
        """
        Make a CA, a rogue CA, the server certificate and client certificates
        for C{users} in C{directory}.
        """
        os.makedirs(directory, exist_ok=True)

        def write(name: str, data: bytes) -> str:
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            return path

        def identity(name: str, key: Key, cert: x509.Certificate) -> Identity:
            return Identity(write(f"{name}.crt", _cert_pem(cert)), write(f"{name}.key", _key_pem(key)))

        ca = Authority.create("fedhub test CA")
        rogue = Authority.create("fedhub rogue CA")
        server_key, server_cert = ca.issue(
            "localhost", server=True, dns=["localhost"], ips=["127.0.0.1"]
        )
        clients = {}
        rogue_clients = {}
        for user in users:
            clients[user] = identity(f"client-{user}", *ca.issue(user))
            rogue_clients[user] = identity(f"rogue-{user}", *rogue.issue(user))
        return cls(
            ca=write("ca.crt", _cert_pem(ca.certificate)),
            rogue_ca=write("rogue-ca.crt", _cert_pem(rogue.certificate)),
            server=identity("server", server_key, server_cert),
            clients=clients,
            rogue_clients=rogue_clients,
        )


# --- definitions ----------------------------------------------------------------


def password_hash(password: str) -> str:
    """
    RabbitMQ's C{rabbit_password_hashing_sha256} hash of a password: a 4-byte
    salt followed by SHA-256 of salt and password, base64-encoded.
    """
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass(frozen=True)
class User:
    """
    A broker user.

    @ivar name: The login (and the client certificate's common name).
    @ivar password: For C{PLAIN} login; C{None} for a certificate-only user.
    @ivar permissions: C{(configure, write, read)} regular expressions by vhost.
    @ivar tags: Management tags, e.g. C{administrator}.
    """

    name: str
    password: str | None = None
    permissions: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


def definitions(
    users: Sequence[User],
    vhosts: Sequence[str],
    exchanges: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """
    A RabbitMQ definitions document for the node to load when it boots.

    @param exchanges: Durable topic exchanges to create, as C{(vhost, name)}.
    """
    return {
        "users": [
            {
                "name": user.name,
                "password_hash": password_hash(user.password) if user.password is not None else "",
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": list(user.tags),
            }
            for user in users
        ],
        "vhosts": [{"name": vhost} for vhost in vhosts],
        "permissions": [
            {"user": user.name, "vhost": vhost, "configure": c, "write": w, "read": r}
            for user in users
            for vhost, (c, w, r) in user.permissions.items()
        ],
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": "topic",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for vhost, name in exchanges
        ],
    }


# --- the node ---------------------------------------------------------------------


class _Collect(ProcessProtocol):
    """
    Collects a child's output and its exit status.
    """

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.done: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.done.callback(-1 if code is None else int(code))


_LIVE: set[PrivateBroker] = set()


@atexit.register
def _kill_leftovers() -> None:
    """
    The last resort: no private node outlives the test process.
    """
    for broker in list(_LIVE):
        broker.kill9()
        broker.cleanup()


class PrivateBroker:
    """
    One private RabbitMQ node.

    @ivar name: The Erlang node name (C{fedhubtest...@localhost}).
    @ivar port: The plain AMQP port.
    @ivar tls_port: The AMQPS port, or C{None} without TLS.
    @ivar directory: Where everything of the node lives.
    @ivar pki: The test certificates (with TLS).
    @ivar users: The users the node knows.
    @ivar extra_config: More lines for its C{rabbitmq.conf}.
    @ivar advanced_config: The text of its C{advanced.config} (Erlang terms,
        for settings C{rabbitmq.conf} has no key for, such as
        C{rabbit.channel_tick_interval}), or C{None} for none.
    """

    def __init__(
        self,
        users: Sequence[User],
        vhosts: Sequence[str] = ("/",),
        *,
        exchanges: Sequence[tuple[str, str]] = (),
        tls: bool = True,
        extra_config: Sequence[str] = (),
        advanced_config: str | None = None,
        directory: str | None = None,
    ) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="fedhub-broker-")
        self._own_directory = directory is None
        self.name = f"fedhubtest{uuid.uuid4().hex[:10]}@localhost"
        self.users = list(users)
        self.vhosts = list(vhosts)
        self.exchanges = list(exchanges)
        self.tls = tls
        self.extra_config = list(extra_config)
        self.advanced_config = advanced_config
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        # rabbitmqctl takes its own distribution port 10000 above the node's.
        self.dist_port = free_port(below=55000)
        self.pki: TestPKI | None = None
        self.pid_file = os.path.join(self.directory, "node.pid")
        self.log_file = os.path.join(self.directory, "server.out")
        self._process: subprocess.Popen[bytes] | None = None

    # -- setup ------------------------------------------------------------------

    def _write_files(self) -> None:
        d = self.directory
        for sub in ("home", "mnesia", "log"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            "log.console = false",
            "log.file.level = info",
            f"load_definitions = {os.path.join(d, 'definitions.json')}",
            "auth_mechanisms.1 = EXTERNAL",
            "auth_mechanisms.2 = PLAIN",
        ]
        if self.tls:
            self.pki = TestPKI.create(os.path.join(d, "pki"), [u.name for u in self.users])
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self.pki.ca}",
                f"ssl_options.certfile = {self.pki.server.cert}",
                f"ssl_options.keyfile = {self.pki.server.key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
                "ssl_options.versions.1 = tlsv1.3",
                "ssl_options.versions.2 = tlsv1.2",
                "ssl_cert_login_from = common_name",
            ]
        lines += self.extra_config
        with open(os.path.join(d, "rabbitmq.conf"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(d, "enabled_plugins"), "w") as f:
            f.write("[rabbitmq_auth_mechanism_ssl].\n" if self.tls else "[].\n")
        with open(os.path.join(d, "definitions.json"), "w") as f:
            json.dump(definitions(self.users, self.vhosts, self.exchanges), f)
        if self.advanced_config is not None:
            with open(os.path.join(d, "advanced.config"), "w") as f:
                f.write(self.advanced_config.rstrip() + "\n")

    def env(self) -> dict[str, str]:
        """
        The environment of the node and of C{rabbitmqctl} talking to it.
        """
        d = self.directory
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("HOME", "NOTIFY_SOCKET")
        }
        env.update(
            HOME=os.path.join(d, "home"),
            RABBITMQ_CONF_ENV_FILE="/dev/null",
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=os.path.join(d, "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(d, "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(d, "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=os.path.join(d, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(d, "log"),
            RABBITMQ_PID_FILE=self.pid_file,
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    # -- running ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the node's processes exist (it may be frozen)."""
        process = self._process
        return process is not None and process.poll() is None

    @property
    def pid(self) -> int | None:
        """
        The OS process id of the running node's Erlang VM (from its pid
        file), or C{None} when it is not running or has not written it yet.
        """
        if not self.running:
            return None
        try:
            with open(self.pid_file) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def launch(self) -> None:
        """
        Start the node's process; returns at once.  The server script runs
        the Erlang VM as its child and waits for it; both are in a new
        process group, so that L{kill9} takes every process of the node.
        """
        if self.running:
            raise BrokerError("the node is running already")
        if not os.path.exists(os.path.join(self.directory, "rabbitmq.conf")):
            self._write_files()
        if os.path.exists(self.pid_file):
            os.unlink(self.pid_file)
        with open(self.log_file, "ab") as out:
            self._process = subprocess.Popen(
                [SERVER],
                env=self.env(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.add(self)

    def _ctl_argv(self, args: Sequence[str]) -> list[str]:
        return [CTL, "-q", "-n", self.name, *args]

    def ctl_blocking(self, *args: str, timeout: float = 60.0) -> bytes:
        """
        Run C{rabbitmqctl} against this node, blocking (for class setup and
        cleanup, never while a test's reactor runs).

        @raise BrokerError: when it fails or takes longer than C{timeout}.
        """
        try:
            done = subprocess.run(
                self._ctl_argv(args),
                env=self.env(),
                cwd=self.directory,
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} took longer than {timeout} s") from None
        if done.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):"
                f" {done.stderr.decode(errors='replace')[-2000:]}"
            )
        return done.stdout

    def ctl(self, *args: str, reactor: Any = None, timeout: float = 60.0) -> Deferred[bytes]:
        """
        Run C{rabbitmqctl} against this node without blocking the reactor.

        @return: a Deferred firing with its output; it fails with
            L{BrokerError} on a non-zero exit or after C{timeout} seconds
            (the command is killed then).
        """
        return Deferred.fromCoroutine(self._ctl(args, reactor or _reactor(), timeout))

    async def _ctl(self, args: Sequence[str], reactor: Any, timeout: float) -> bytes:
        collect = _Collect()
        argv = self._ctl_argv(args)
        process = cast(IReactorProcess, reactor).spawnProcess(
            collect, argv[0], argv, env=self.env(), path=self.directory
        )

        def too_long() -> None:
            try:
                process.signalProcess("KILL")
            except Exception:
                pass

        call = cast(IReactorTime, reactor).callLater(timeout, too_long)
        try:
            code = await collect.done
        finally:
            if call.active():
                call.cancel()
        if code != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} failed ({code}):"
                f" {bytes(collect.err).decode(errors='replace')[-2000:]}"
            )
        return bytes(collect.out)

    def _wait_args(self, timeout: float) -> tuple[str, ...]:
        return ("wait", "--timeout", str(int(timeout)), self.pid_file)

    def start(self, timeout: float = 120.0) -> None:
        """
        Start the node and block until it takes connections (class setup).
        The node is killed again when it does not come up.
        """
        self.launch()
        try:
            self.ctl_blocking(*self._wait_args(timeout), timeout=timeout + 30)
            self._check_listening(time.monotonic() + 30)
        except BaseException:
            self.kill9()
            raise

    def _listening(self) -> bool:
        for port in (self.port, self.tls_port):
            if port is None:
                continue
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    pass
            except OSError:
                return False
        return True

    def _check_listening(self, deadline: float) -> None:
        while not self._listening():
            if time.monotonic() > deadline:
                raise BrokerError(f"node {self.name} booted but does not listen; see {self.log_file}")
            if not self.running:
                raise BrokerError(f"node {self.name} exited; see {self.log_file}")
            time.sleep(0.1)

    def wait_ready(self, reactor: Any = None, timeout: float = 120.0) -> Deferred[None]:
        """
        Wait without blocking until the node (launched) takes connections.
        """
        return Deferred.fromCoroutine(self._wait_ready(reactor or _reactor(), timeout))

    async def _wait_ready(self, reactor: Any, timeout: float) -> None:
        await self._ctl(self._wait_args(timeout), reactor, timeout + 30)
        deadline = time.monotonic() + 30
        while not self._listening():
            if time.monotonic() > deadline or not self.running:
                raise BrokerError(f"node {self.name} does not listen; see {self.log_file}")
            await deferLater(reactor, 0.05, lambda: None)

    def restart(self, reactor: Any = None, timeout: float = 120.0) -> Deferred[None]:
        """
        Start the node again (after L{kill9} or L{stop}, or stop it first)
        with the same data and ports, and wait until it takes connections.
        """
        return Deferred.fromCoroutine(self._restart(reactor or _reactor(), timeout))

    async def _restart(self, reactor: Any, timeout: float) -> None:
        if self.running:
            await self.stop_async(reactor)
        self.launch()
        await self._wait_ready(reactor, timeout)

    def kill9(self) -> None:
        """
        SIGKILL the node (its process group, so helpers go too) and reap it.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            for sig in (signal.SIGKILL,):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise BrokerError(f"node {self.name} survived SIGKILL") from None
        self._process = None
        _LIVE.discard(self)

    def sigstop(self) -> None:
        """
        Freeze the node (C{kill -STOP}): it keeps its sockets and answers nothing.
        """
        pid = self.pid
        if pid is None:
            raise BrokerError("the node is not running")
        os.kill(pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        """
        Let a frozen node run again (C{kill -CONT}); harmless when it runs.
        """
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> None:
        """
        Stop the node cleanly, blocking; kill it when that fails or takes too
        long.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                self.sigcont()
                self.ctl_blocking("stop", timeout=timeout)
                process.wait(timeout=timeout)
            except (BrokerError, subprocess.TimeoutExpired, OSError):
                pass
        self.kill9()

    async def stop_async(self, reactor: Any = None, timeout: float = 30.0) -> None:
        """
        Stop the node cleanly without blocking the reactor; kill it when that
        fails or takes too long.
        """
        reactor = reactor or _reactor()
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                self.sigcont()
                await self._ctl(("stop",), reactor, timeout)
            except (BrokerError, OSError):
                pass
            deadline = time.monotonic() + timeout
            while process.poll() is None and time.monotonic() < deadline:
                await deferLater(reactor, 0.05, lambda: None)
        self.kill9()

    def cleanup(self) -> None:
        """
        Remove the node's directory (once it is stopped).
        """
        if self.running:
            self.kill9()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- addresses ---------------------------------------------------------------

    def url(self, vhost: str = "/", user: str | None = None, password: str | None = None) -> str:
        """
        A plain C{amqp://} URL of this node.
        """
        from urllib.parse import quote

        auth = ""
        if user is not None:
            auth = quote(user, safe="")
            if password is not None:
                auth += ":" + quote(password, safe="")
            auth += "@"
        return f"amqp://{auth}127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def tls_url(self, vhost: str = "/", host: str = "localhost") -> str:
        """
        An C{amqps://} URL of this node (no credentials: certificate login).
        """
        from urllib.parse import quote

        if self.tls_port is None:
            raise BrokerError("the node has no TLS listener")
        return f"amqps://{host}:{self.tls_port}/{quote(vhost, safe='')}"


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def reactor() -> Any:
    """
    The global reactor (the one trial runs tests with).
    """
    return _reactor()


def sleep(seconds: float) -> Deferred[None]:
    """
    A Deferred firing after C{seconds} on the global reactor.
    """
    return deferLater(_reactor(), seconds, lambda: None)


def report(what: str, value: object) -> None:
    """
    Show a measured value (a duration, a count) when C{FEDHUB_TEST_TIMINGS}
    is set.  The tests bound such values generously; they are not
    benchmarks, but the numbers are worth seeing now and then.
    """
    if os.environ.get("FEDHUB_TEST_TIMINGS"):
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"\n[measured] {what}: {shown}", file=sys.stderr)


async def wait_until(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> None:
    """
    Poll C{condition} until it is true.

    @raise AssertionError: naming C{what} when C{timeout} seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(interval)


class PrivateBrokerCase(TestCase):
    """
    A test case whose class shares one private node, started in
    C{setUpClass} and stopped by the class cleanup, whatever happens.

    Subclasses set L{users}, L{vhosts}, L{exchanges}, L{tls},
    L{extra_config} and L{advanced_config}.

    @cvar broker: The running node.
    """

    users: ClassVar[Sequence[User]] = ()
    vhosts: ClassVar[Sequence[str]] = ("/",)
    exchanges: ClassVar[Sequence[tuple[str, str]]] = ()
    tls: ClassVar[bool] = True
    extra_config: ClassVar[Sequence[str]] = ()
    advanced_config: ClassVar[str | None] = None
    broker: ClassVar[PrivateBroker]

    @classmethod
    def setUpClass(cls) -> None:
        """
        Start the class's node (pytest calls this; the node is stopped by
        the class cleanup).
        """
        broker = cls._start_node()
        cls.addClassCleanup(broker.cleanup)
        cls.addClassCleanup(broker.stop)

    @classmethod
    def _start_node(cls) -> PrivateBroker:
        require_broker()
        broker = PrivateBroker(
            cls.users,
            cls.vhosts,
            exchanges=cls.exchanges,
            tls=cls.tls,
            extra_config=cls.extra_config,
            advanced_config=cls.advanced_config,
        )
        try:
            broker.start()
        except BaseException:
            broker.cleanup()
            raise
        cls.broker = broker
        return broker

    def setUp(self) -> Deferred[None] | None:  # type: ignore[override]
        """
        Make sure the node runs and is not frozen: a test that failed half
        way may have left it stopped or killed.  (Trial's runner does not
        call C{setUpClass}: under it the node starts here, once, and stops
        when the process exits.)
        """
        if "broker" not in type(self).__dict__:
            type(self)._start_node()
        broker = self.broker
        if broker.running:
            broker.sigcont()
            return None
        return broker.restart()
