"""
Tests for L{fedhub.hub}: the service tree built from a configuration, on the
in-process bus.
"""

from __future__ import annotations

import errno
import io
import os
import json
import signal
import smtplib
import socket
import urllib.request
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.config import Option, parse_config
from fedhub.consumers.log import LogHandler, LogPlugin, format_line
from fedhub.errors import DeadLetter, Drop
from fedhub.hub import Hub, SequentialMultiService
from fedhub.interfaces import IConsumerPlugin, IMessageHandler, IPublisher
from fedhub.message import Message
from fedhub.plugins import PluginContext
from fedhub.tap import GracefulStop, Options, StartingHangups, makeService
from tests.processes import reap, reaped

ROOT = Path(__file__).resolve().parent.parent


@implementer(IMessageHandler)
class RecordingHandler:
    """
    A handler that records messages and fails as told by the body's C{fail} key.
    """

    def __init__(self, topics: tuple[str, ...]) -> None:
        self.topics = topics
        self.seen: list[Message] = []
        self.started = False
        self.stopped = False
        self.arrived: Deferred[None] | None = None

    def handle(self, message: Message) -> None:
        self.seen.append(message)
        if self.arrived is not None and not self.arrived.called:
            self.arrived.callback(None)
        fail = message.body.get("fail")
        if fail == "drop":
            raise Drop("told to")
        if fail == "dead":
            raise DeadLetter("told to")
        if fail == "crash":
            raise RuntimeError("plugin bug")

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def reopen(self) -> None:
        self.reopened = getattr(self, "reopened", 0) + 1


@implementer(IConsumerPlugin)
class RecordingPlugin:
    """
    A consumer plugin whose handlers the test can reach.
    """

    name = "recording"
    description = "records messages"
    options: Mapping[str, Option] = {}

    def __init__(self) -> None:
        self.handlers: dict[str, RecordingHandler] = {}

    def build(self, context: PluginContext) -> RecordingHandler:
        assert context.component is not None
        handler = RecordingHandler(context.component.topics)
        self.handlers[context.name] = handler
        return handler


CONFIG = """
[hub]
state_dir = "{state}"

[domains.one]
broker = "memory"

[domains.two]
broker = "memory"

[[consumers]]
name = "a"
plugin = "recording"
domain = "one"
topics = ["org.fedoraproject.dev.test.#"]

[[consumers]]
name = "b"
plugin = "recording"
domain = "one"
topics = ["#"]

[[consumers]]
name = "c"
plugin = "recording"
domain = "two"
topics = ["#"]
"""


class HubTests(TestCase):
    """
    A hub of two memory domains and three consumers.
    """

    def setUp(self) -> None:
        self.plugin = RecordingPlugin()
        lookup = {"recording": self.plugin, "log": LogPlugin()}
        state = os.path.abspath(self.mktemp())
        config = parse_config(
            CONFIG.format(state=state), "test", find_plugin=lambda kind, name: lookup.get(name)
        )
        self.hub = Hub(config, reactor, find_consumer=lambda name: lookup[name])  # type: ignore[arg-type]
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.hub.startService()
        self.addCleanup(self.hub.stopService)

    @inlineCallbacks
    def publish_and_wait(self, consumer: str, message: Message, domain: str = "one") -> Any:
        handler = self.plugin.handlers[consumer]
        handler.arrived = Deferred()
        yield self.hub.domains[domain].publisher.publish(message)
        timeout = reactor.callLater(5, handler.arrived.cancel)
        yield handler.arrived
        timeout.cancel()

    def test_publisher_per_domain(self) -> None:
        """Every domain has a publisher providing IPublisher for that domain."""
        for name, runtime in self.hub.domains.items():
            verifyObject(IPublisher, runtime.publisher)
            self.assertEqual(runtime.publisher.domain, name)

    @inlineCallbacks
    def test_routing_by_topic(self) -> None:
        """A message reaches the consumers of its domain whose topics match, and no others."""
        yield self.publish_and_wait("b", Message.create("other.topic", {"n": 1}))
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([m.body["n"] for m in self.plugin.handlers["b"].seen], [1])
        self.assertEqual(self.plugin.handlers["a"].seen, [])
        self.assertEqual(self.plugin.handlers["c"].seen, [])
        yield self.publish_and_wait("a", Message.create("org.fedoraproject.dev.test.x", {"n": 2}))
        self.assertEqual([m.body["n"] for m in self.plugin.handlers["a"].seen], [2])
        self.assertEqual(self.plugin.handlers["a"].seen[0].queue, "fedhub.a")

    @inlineCallbacks
    def test_failure_contained(self) -> None:
        """A crashing plugin's message goes to its first retry queue and the next message is still handled."""
        yield self.publish_and_wait("c", Message.create("t", {"fail": "crash"}), domain="two")
        yield self.publish_and_wait("c", Message.create("t", {"n": 2}), domain="two")
        yield deferLater(reactor, 0.05, lambda: None)
        consumer = self.hub.consumers["c"]
        self.assertEqual(consumer.stats["failed"], 1)
        self.assertEqual(consumer.stats["retried"], 1)
        self.assertEqual(consumer.stats["acked"], 1)
        bus = self.hub.domains["two"].bus
        self.assertEqual(bus.queue_depth("fedhub.c.retry.1"), 1)  # type: ignore[attr-defined]
        self.assertEqual(bus.queue_depth("fedhub.c"), 0)  # type: ignore[attr-defined]
        failures = [e for e in self.events if e.get("log_failure") is not None and e.get("consumer") == "c"]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_verdicts(self) -> None:
        """Drop acknowledges; DeadLetter moves the message to the dead-letter queue."""
        yield self.publish_and_wait("c", Message.create("t", {"fail": "drop"}), domain="two")
        yield self.publish_and_wait("c", Message.create("t", {"fail": "dead"}), domain="two")
        yield deferLater(reactor, 0.05, lambda: None)
        stats = self.hub.consumers["c"].stats
        self.assertEqual((stats["dropped"], stats["dead_lettered"]), (1, 1))
        self.assertEqual(self.hub.domains["two"].bus.queue_depth("fedhub.c.dead"), 1)  # type: ignore[attr-defined]

    def test_reopen_files(self) -> None:
        """reopen_files() (SIGHUP) calls reopen() on every handler that has one."""
        self.hub.reopen_files()
        self.assertEqual([getattr(h, "reopened", 0) for h in self.plugin.handlers.values()], [1, 1, 1])

    def test_reopen_failure_names_the_consumer(self) -> None:
        """A reopen() that fails is logged as an error naming the consumer; the others still reopen."""
        first = next(iter(self.plugin.handlers.values()))

        def broken() -> None:
            raise OSError("read-only file system")

        first.reopen = broken  # type: ignore[attr-defined]
        self.hub.reopen_files()
        self.assertEqual([getattr(h, "reopened", 0) for h in self.plugin.handlers.values()][1:], [1, 1])
        [failed] = [e for e in self.events if "Reopening files" in e.get("log_format", "")]
        self.assertEqual(failed["log_level"], LogLevel.error)
        name = next(n for n, s in self.hub.consumers.items() if s.handler is first)
        self.assertEqual(failed["component"], f"consumer {name}")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_memory_warning(self) -> None:
        """Starting a memory domain logs that its messages do not leave the process."""
        texts = [e.get("log_format", "") for e in self.events if e.get("domain") == "one"]
        self.assertTrue(any("do not leave this process" in t for t in texts), texts)

    @inlineCallbacks
    def test_stop_calls_handler_stop(self) -> None:
        """Stopping the hub stops every handler after it was started."""
        yield deferLater(reactor, 0.05, lambda: None)
        yield self.hub.stopService()
        for handler in self.plugin.handlers.values():
            self.assertTrue(handler.started)
            self.assertTrue(handler.stopped)


class Step(Service):
    """
    A service that records when it stops and stops only when told.
    """

    def __init__(self, name: str, order: list[str]) -> None:
        self.setName(name)
        self.order = order
        self.release: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.order.append(self.name)
        return self.release


class SequentialStopTests(SynchronousTestCase):
    """
    L{SequentialMultiService} stops children one after the other.
    """

    def test_reverse_order_one_at_a_time(self) -> None:
        """The last child stops first, and the next only after it finished."""
        order: list[str] = []
        parent = SequentialMultiService()
        first, second = Step("first", order), Step("second", order)
        first.setServiceParent(parent)
        second.setServiceParent(parent)
        parent.startService()
        stopped = parent.stopService()
        self.assertEqual(order, ["second"])
        second.release.callback(None)
        self.assertEqual(order, ["second", "first"])
        self.assertNoResult(stopped)
        first.release.callback(None)
        self.successResultOf(stopped)


class LogConsumerTests(SynchronousTestCase):
    """
    The built-in C{log} consumer.
    """

    def test_interfaces(self) -> None:
        """The plugin and its handler provide their interfaces."""
        verifyObject(IConsumerPlugin, LogPlugin())
        verifyObject(IMessageHandler, LogHandler("log"))

    def test_line(self) -> None:
        """The line holds time, topic and the summary, with control characters escaped."""
        message = Message.create(
            "a.b", {"summary": "evil\nline\x1b[31m"},
            sent_at=Message.create("x", {}).sent_at,
        )
        line = format_line(message)
        assert message.sent_at is not None
        self.assertTrue(line.startswith(message.sent_at.isoformat() + " a.b "))
        self.assertNotIn("\n", line)
        self.assertNotIn("\x1b", line)
        self.assertIn("evil\\nline\\x1b[31m", line)

    def test_logs_one_event(self) -> None:
        """Handling a message emits one info event with the stable field names."""
        events: list[dict[str, Any]] = []
        handler = LogHandler("log")
        handler.log = Logger(observer=events.append, source=handler)  # type: ignore[misc]
        message = Message.create("a.b", {"x": 1})
        handler.handle(message)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["msg_id"], message.id)
        self.assertEqual(events[0]["topic"], "a.b")
        self.assertEqual(events[0]["consumer"], "log")
        self.assertEqual(events[0]["line"], format_line(message))


class TapTests(SynchronousTestCase):
    """
    The twistd glue.
    """

    def test_default(self) -> None:
        """With no --config the hub runs the built-in default: one memory domain and the log consumer."""
        import tempfile

        # The default's state directory (and the lock the hub takes there)
        # in this test's own temporary directory, not the machine's.
        private = os.path.abspath(self.mktemp())
        os.makedirs(private)
        self.patch(tempfile, "tempdir", private)
        options = Options()
        options.parseOptions([])
        service = makeService(options)
        self.assertTrue(os.path.exists(os.path.join(private, f"fedhub-{os.getuid()}", "hub.lock")))
        assert isinstance(service, Hub)
        self.assertEqual(list(service.domains), ["default"])
        self.assertTrue(service.domains["default"].config.is_memory)
        self.assertEqual(list(service.consumers), ["log"])
        self.assertEqual(list(service.producers), ["bugzilla-mail"])

    def build(self, path: str | Path) -> Hub:
        """
        The hub twistd builds from the configuration at C{path}, its state
        lock released again so that the test can build another.
        """
        options = Options()
        options.parseOptions(["--config", str(path)])
        service = makeService(options)
        assert isinstance(service, Hub)
        service.getServiceNamed("state-lock").release()  # type: ignore[attr-defined]
        return service

    def build_refused(self, path: str | Path) -> str:
        """
        What twistd prints when building the hub from the configuration at
        C{path} fails: it exits with status 1.
        """
        options = Options()
        options.parseOptions(["--config", str(path)])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertEqual(error.code, 1)
        return stderr.getvalue()

    def test_world_readable_password_warned(self) -> None:
        """
        A configuration file that holds a broker password and every user
        can read is warned about when the hub is built (the password not
        shown); readable by its group only, it is not.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "hub.toml")
        with open(path, "w") as f:
            f.write(f'[hub]\nstate_dir = "{directory}"\n[domains.d]\n'
                    'broker = "amqp://hub:s3cret@127.0.0.1:1/"\n')
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for mode, warned in ((0o644, True), (0o640, False)):
            os.chmod(path, mode)
            del events[:]
            self.build(path)
            texts = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
            found = [t for t in texts if "broker password" in t]
            self.assertEqual(len(found), 1 if warned else 0, texts)
            if warned:
                self.assertIn("every user can read it (mode 0644)", found[0])
            self.assertNotIn("s3cret", "".join(texts))

    def test_overlapping_bridges_warned(self) -> None:
        """The hub logs a warning, when it is built, about two bridges that forward the same topics."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "hub.toml")
        bridge = ('[[consumers]]\nname = "{name}"\nplugin = "bridge"\ndomain = "a"\n'
                  'to_domain = "b"\nallow = ["org.example.#"]\n')
        with open(path, "w") as f:
            f.write(f'[hub]\nstate_dir = "{directory}"\n[domains.a]\nbroker = "memory"\n'
                    '[domains.b]\nbroker = "memory"\n'
                    + bridge.format(name="one") + bridge.format(name="two"))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.build(path)
        texts = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(texts, [
            "consumers[0] and consumers[1] both forward messages such as 'org.example' from "
            "domain 'a' to 'b': the target gets each of them twice; give each topic to one bridge"])

    def refused(self, path: str | Path) -> str:
        """
        What twistd prints when its options refuse the configuration at
        C{path}: it exits with status 1 and no usage text.
        """
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--config", str(path)])
        self.assertEqual(error.code, 1)
        text = stderr.getvalue()
        self.assertTrue(text.startswith("twistd fedhub: "), text)
        self.assertNotIn("Usage", text)
        return text

    def test_bad_config_refused(self) -> None:
        """A configuration with problems is refused naming every problem and its line; nothing is built."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[hub]\nbogus = 1\n[[consumers]]\nname = "x"\nplugin = "log"\ndomain = "nowhere"\n')
        error = self.refused(path)
        self.assertIn("hub.bogus", error)
        self.assertIn('unknown domain "nowhere"', error)


    def test_unusable_tls_file_refused(self) -> None:
        """A TLS domain whose CA file holds no certificate is a usage error naming the domain's key, not a failure at start."""
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "ca.pem").write_text("not a certificate\n")
        path = directory / "hub.toml"
        path.write_text('[domains.a]\nbroker = "amqps://broker.example/"\nca = "ca.pem"\n')
        error = self.refused(path)
        self.assertIn("domains.a.ca: ", error)
        self.assertIn("holds no PEM certificate", error)
        self.assertIn("(line 3)", error)


    def test_unusable_smtp_tls_file_refused(self) -> None:
        """
        An SMTP listener whose certificate file holds no certificate stops
        twistd before anything starts, naming the producer's key; the hub
        does not run without its listener.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "cert.pem").write_text("not a certificate\n")
        path = directory / "hub.toml"
        path.write_text('[domains.a]\nbroker = "memory"\n[[producers]]\nname = "mail"\n'
                        'plugin = "bugzilla-smtp"\ndomain = "a"\nrecipients = ["bugs@hub.example"]\n'
                        'tls_certificate = "cert.pem"\n')
        error = self.refused(path)
        self.assertIn("producers[0].tls_certificate: ", error)
        self.assertIn("holds no PEM certificate", error)

    def test_plugin_refusal_names_the_component(self) -> None:
        """A component its plugin refuses to build stops twistd with one message naming the component's key."""
        path = Path(self.mktemp())
        path.write_text('[domains.a]\nbroker = "memory"\n[[consumers]]\nname = "b"\nplugin = "bridge"\n'
                        'domain = "a"\ntopics = ["#"]\nto_domain = "nowhere"\nallow = ["#"]\n')
        error = self.build_refused(path)
        self.assertIn("consumers[0].to_domain", error)
        self.assertTrue(error.startswith("twistd fedhub: "), error)

    def test_plugin_refusal_names_the_line(self) -> None:
        """
        A component its plugin refuses to build is named with its line in
        the file, as C{fedhub check-config} names it, and twistd prints
        nothing else: no traceback.
        """
        path = Path(self.mktemp())
        path.write_text('[domains.a]\nbroker = "memory"\n\n[[consumers]]\nname = "b"\nplugin = "bridge"\n'
                        'domain = "a"\ntopics = ["#"]\nto_domain = "nowhere"\nallow = ["#"]\n')
        lines = self.build_refused(path).splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[1].strip().startswith("consumers[0].to_domain: "), lines)
        self.assertTrue(lines[1].endswith("(line 9)"), lines)


class SignalReactor:
    """
    The parts of a reactor L{GracefulStop} uses, run at once: it is
    running, and C{stop} fires the I{after shutdown} triggers.
    """

    def __init__(self) -> None:
        self.after_shutdown: list[Any] = []
        self.stopped = 0

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        assert (phase, event) == ("after", "shutdown")
        self.after_shutdown.append(f)

    def stop(self) -> None:
        self.stopped += 1
        for f in self.after_shutdown:
            f()


class GracefulStopTests(SynchronousTestCase):
    """
    L{GracefulStop}: what SIGTERM, SIGINT and SIGHUP do in each part of the
    hub's life.
    """

    def setUp(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.reactor = SignalReactor()
        self.hangups: list[None] = []
        self.stop = GracefulStop(self.reactor, on_hangup=lambda: self.hangups.append(None))

    def test_running(self) -> None:
        """While the hub runs, SIGHUP reopens files and SIGTERM stops the reactor once."""
        self.stop.startService()
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # type: ignore[operator]
        self.assertEqual(len(self.hangups), 1)
        self.assertEqual(signal.getsignal(signal.SIGTERM), self.stop._received)
        self.assertEqual(signal.getsignal(signal.SIGINT), self.stop._received)

    def test_hangup_while_starting_reopens_once_running(self) -> None:
        """
        SIGHUPs that arrive while the hub starts are counted, not fatal,
        and reopen the files once, when the hub handles SIGHUP itself.
        """
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        starting = StartingHangups()
        starting.hold()
        held = signal.getsignal(signal.SIGHUP)
        self.assertNotIn(held, (signal.SIG_DFL, signal.SIG_IGN))
        assert callable(held)
        held(signal.SIGHUP, None)
        held(signal.SIGHUP, None)
        self.assertEqual(self.hangups, [])
        stop = GracefulStop(self.reactor, on_hangup=lambda: self.hangups.append(None), starting=starting)
        stop.startService()
        self.assertEqual(len(self.hangups), 1)
        self.assertEqual(signal.getsignal(signal.SIGHUP), stop._hangup)
        self.assertEqual(starting.take(), 0)
        stop._hangup(signal.SIGHUP, None)
        self.assertEqual(len(self.hangups), 2)

    def test_no_hangup_while_starting(self) -> None:
        """Without a SIGHUP during start-up, nothing is reopened when the hub runs."""
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        starting = StartingHangups()
        starting.hold()
        GracefulStop(self.reactor, on_hangup=lambda: self.hangups.append(None), starting=starting).startService()
        self.assertEqual(self.hangups, [])

    def test_hold_leaves_a_handler_alone(self) -> None:
        """A SIGHUP handler someone installed is not replaced; an ignored SIGHUP is counted too."""
        def mine(signum: int, frame: object) -> None:
            pass

        starting = StartingHangups()
        signal.signal(signal.SIGHUP, mine)
        starting.hold()
        self.assertIs(signal.getsignal(signal.SIGHUP), mine)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        starting.hold()
        held = signal.getsignal(signal.SIGHUP)
        assert callable(held)
        held(signal.SIGHUP, None)
        self.assertEqual(starting.take(), 1)

    def test_options_hold_hangups(self) -> None:
        """Making the hub's options (twistd's first call into fedhub) holds SIGHUP."""
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        Options()
        self.assertNotIn(signal.getsignal(signal.SIGHUP), (signal.SIG_DFL, signal.SIG_IGN))

    def test_ignored_once_stopped(self) -> None:
        """
        Once the reactor has stopped, SIGTERM, SIGINT and SIGHUP are ignored
        (not left to the handlers Python puts back while the process exits,
        which would kill it): a second signal never turns a clean stop into
        an exit by the signal.
        """
        self.stop.startService()
        self.stop._received(signal.SIGTERM, None)
        self.assertEqual(self.reactor.stopped, 1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.assertEqual(signal.getsignal(signum), signal.SIG_IGN)


class TwistdTests(SynchronousTestCase):
    """
    C{twistd -n fedhub} as an operator runs it.
    """

    def state_dir(self) -> Path:
        """
        A new directory for a hub's state, its configuration and its
        process's working directory.
        """
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        return state

    def twistd(self, state: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """
        Start C{twistd -n --pidfile= fedhub ARGS} in C{state}, its output
        and errors read as text from C{stdout}.
        """
        twistd = Path(sys.executable).parent / "twistd"
        return subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "fedhub", *args],
            cwd=str(state),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def test_signal_after_the_stop_ignored(self) -> None:
        """
        A second SIGTERM that arrives once the hub has stopped, while its
        process exits, leaves the exit status 0: it does not kill the
        process.
        """
        state = self.state_dir()
        config = state / "hub.toml"
        config.write_text(f'[hub]\nstate_dir = "{state}"\n[domains.a]\nbroker = "memory"\n')
        process = self.twistd(state, "--config", str(config))
        output: list[str] = []

        def read_until(marker: str) -> bool:
            assert process.stdout is not None
            for line in process.stdout:
                output.append(line)
                if marker in line:
                    return True
            return False

        with reaped(process):
            self.assertTrue(read_until("SIGTERM or SIGINT stops it"), "".join(output))
            process.send_signal(signal.SIGTERM)
            self.assertTrue(read_until("Server Shut Down"), "".join(output))
            # Signal it again and again until it has exited: one of them
            # arrives while the interpreter shuts down.  (send_signal
            # signals no process once this one's exit was collected.)
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                process.send_signal(signal.SIGTERM)
                time.sleep(0.001)
            rest, _ = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 0, "".join(output) + rest)

    def test_hangup_while_starting(self) -> None:
        """
        SIGHUPs sent from the moment twistd hands over to fedhub until the
        hub is ready neither kill it nor keep it from becoming ready; the
        files are reopened once it runs.
        """
        state = self.state_dir()
        socket_path = state / "status.sock"
        # A FIFO for a configuration file: opening it for writing succeeds
        # once the hub opens it for reading, that is while it reads its
        # configuration, after fedhub's options are made; and the hub waits
        # there until the text is written.
        config = state / "hub.toml"
        os.mkfifo(config)
        process = self.twistd(state, "--config", str(config))
        hangups = 0

        def hang_up() -> None:
            nonlocal hangups
            process.send_signal(signal.SIGHUP)
            hangups += 1
            time.sleep(0.002)

        def ready() -> bool:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(10)
                try:
                    client.connect(str(socket_path))
                    client.sendall(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    answer = client.recv(64)
                except OSError:
                    return False
            return answer.split(b" ")[1:2] == [b"200"]

        try:
            deadline = time.monotonic() + 60
            writer = None
            while writer is None and process.poll() is None and time.monotonic() < deadline:
                try:
                    writer = os.open(config, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as e:
                    self.assertEqual(e.errno, errno.ENXIO)
                    time.sleep(0.001)
            self.assertIsNotNone(writer, "the hub never read its configuration")
            assert writer is not None
            for _ in range(3):
                hang_up()
            self.assertIsNone(process.poll(), "a SIGHUP while reading the configuration ended the hub")
            os.set_blocking(writer, True)
            os.write(writer, (
                f'[hub]\nstate_dir = "{state}"\nstatus = "unix:{socket_path}"\n'
                '[domains.d]\nbroker = "memory"\n'
                '[[consumers]]\nname = "rec"\nplugin = "record"\ndomain = "d"\ntopics = ["#"]\n'
                f'path = "{state / "rec.jsonl"}"\nfollow_rotation = false\n'
            ).encode())
            os.close(writer)
            # Through building the hub, starting its services and the
            # reactor taking over: signalled all along.
            while process.poll() is None and time.monotonic() < deadline:
                hang_up()
                if ready():
                    break
            self.assertIsNone(process.poll(), "a SIGHUP while starting ended the hub")
            self.assertTrue(ready(), "the hub did not become ready")
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=60)
        finally:
            reap(process)
        self.assertEqual(process.returncode, 0, output)
        lines = output.splitlines()
        running = next(i for i, line in enumerate(lines) if "SIGTERM or SIGINT stops it" in line)
        self.assertIn("Received SIGHUP while starting: reopening files now", lines[running + 1], output)
        self.assertIn("Consumer rec reopens", lines[running + 2], output)
        self.assertGreater(hangups, 3)

    def test_runs_until_signalled(self) -> None:
        """The default hub starts, logs a mailed bugmail as one line, and exits 0 on SIGTERM."""
        state = self.state_dir()
        process = self.twistd(state, env=dict(os.environ, TMPDIR=str(state)))
        output: list[str] = []

        def read_until(marker: str) -> bool:
            assert process.stdout is not None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = process.stdout.readline()
                if not line:
                    return False
                output.append(line)
                if marker in line:
                    return True
            return False

        with reaped(process):
            self.assertTrue(read_until("SIGTERM or SIGINT stops it"), "".join(output))
            self.assertTrue(any("do not leave this process" in line for line in output), "".join(output))
            mail = (ROOT / "tests" / "data" / "bugzilla" / "04_changed_status_resolution_with_comment.eml").read_bytes()
            with smtplib.SMTP("127.0.0.1", 8025, timeout=30) as client:
                client.sendmail("bugzilla-daemon@kernel.org", ["bugzilla@localhost"], mail)
            # The log consumer's line for the message.
            self.assertTrue(read_until("bugzilla.bug.update"), "".join(output))
            with urllib.request.urlopen("http://127.0.0.1:8070/ready", timeout=30) as answer:
                self.assertEqual(json.loads(answer.read())["ready"], True)
            process.send_signal(signal.SIGTERM)
            rest, _ = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 0, "".join(output) + rest)
        self.assertIn("Server Shut Down", rest)
        everything = output + rest.splitlines()
        logged = [line for line in everything if "bugzilla.bug.update" in line]
        self.assertEqual(len(logged), 1, "".join(output) + rest)
        self.assertIn("LogHandler#info", logged[0])
        self.assertIn("Kernel Panic and crash", logged[0])
        # The default log level is info: no line per SMTP connection or publication.
        self.assertEqual([line for line in everything if "#debug]" in line], [])
