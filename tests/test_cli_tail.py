"""
Tests for C{fedhub tail} (L{fedhub.cli.tail}): filters, output formats and
the delivery handler without a broker; then the command as a subprocess
against the shared RabbitMQ (a missing broker fails under C{CI=true}, skips
elsewhere).
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import json
import signal
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.amqp.codec import FieldValue
from fedhub.cli import tail
from fedhub.cli.main import build_parser
from fedhub.cli.runner import CommandError
from fedhub.cli.tail import Filter, Follower, format_json, format_pretty, format_terse, tail_topology
from fedhub.errors import MessageReturned
from fedhub.interfaces import IDelivery
from fedhub.message import Message, from_amqp, iter_loads
from fedhub.topology import BindingSpec, QueueSpec
from tests.test_amqp_bus import LiveCase
from tests.test_cli_publish import CLIProcess, spawn, write_config

WHEN = datetime(2026, 11, 28, 6, 0, 0, tzinfo=timezone.utc)


def make(topic: str = "org.example.prod.a.b", body: dict[str, Any] | None = None, **headers: Any) -> Message:
    return Message.create(topic, body if body is not None else {"x": 1}, headers=headers, sent_at=WHEN)


@implementer(IDelivery)
class FakeDelivery:
    """
    A delivery that remembers its verdict.
    """

    def __init__(self, message: Message) -> None:
        self.message = message
        self.redelivered = False
        self.queue = "q"
        self.acked = False
        self.live = True

    def ack(self) -> None:
        self.acked = True

    def reject(self, requeue: bool) -> None:
        raise AssertionError("tail never rejects")


class FilterTests(SynchronousTestCase):
    """
    Which messages are shown.
    """

    def test_everything_by_default(self) -> None:
        """No filter shows everything."""
        self.assertTrue(Filter().accepts(make()))

    def test_exclude(self) -> None:
        """A message matching an exclusion pattern is not shown."""
        accept = Filter(exclude=("org.example.*.a.#",))
        self.assertFalse(accept.accepts(make("org.example.prod.a.b")))
        self.assertTrue(accept.accepts(make("org.example.prod.c.b")))

    def test_users_and_packages(self) -> None:
        """--user and --package match fedora-messaging's headers: any of each, both kinds."""
        accept = Filter(users=("jdoe", "ann"), packages=("kernel",))
        self.assertTrue(accept.accepts(make(fedora_messaging_user_ann=True, fedora_messaging_rpm_kernel=True)))
        self.assertFalse(accept.accepts(make(fedora_messaging_user_ann=True)))
        self.assertFalse(accept.accepts(make(fedora_messaging_user_bob=True, fedora_messaging_rpm_kernel=True)))
        self.assertFalse(accept.accepts(make(fedora_messaging_user_jdoe=False, fedora_messaging_rpm_kernel=True)))

    def test_patterns_checked(self) -> None:
        """An invalid pattern is a usage error (64)."""
        e = self.assertRaises(CommandError, tail.check_patterns, "--topic", ["a..b"])
        self.assertEqual(e.status, 64)
        self.assertEqual(tail.check_patterns("--topic", ["a.*", "#"]), ("a.*", "#"))


class FormatTests(SynchronousTestCase):
    """
    The three output formats.
    """

    hostile = make("org.example.prod.evil", {"summary": "ok\x1b]0;pwned\x07\nFAKE LINE\u2028\x9b31m"},
                   fedora_messaging_user_x="\x1b[2J")

    def test_terse(self) -> None:
        """terse is the log consumer's line: time, topic, summary, and one line only."""
        line = format_terse(make(body={"summary": "built foo"}))
        self.assertEqual(line, "2026-11-28T06:00:00+00:00 org.example.prod.a.b built foo\n")

    def test_pretty(self) -> None:
        """pretty shows the topic, id, managed and extra headers and the indented body."""
        message = make(body={"a": [1, 2]}, fedora_messaging_rpm_kernel=True)
        text = format_pretty(message)
        self.assertTrue(text.startswith("org.example.prod.a.b\n"))
        self.assertIn(f"  id:        {message.id}\n", text)
        self.assertIn("    fedora_messaging_rpm_kernel: true\n", text)
        self.assertIn('      "a": [\n', text)
        self.assertTrue(text.endswith("}\n\n"))

    def test_json_round_trips(self) -> None:
        """json is one serialized line that reads back as the same message."""
        for message in (make(fedora_messaging_user_jdoe=True), self.hostile):
            line = format_json(message)
            self.assertEqual(line.count("\n"), 1)
            self.assertEqual(list(iter_loads([line])), [message])

    def test_control_characters_escaped(self) -> None:
        """No format lets a message put control characters on the terminal."""
        for formatter in (format_terse, format_pretty, format_json):
            text = formatter(self.hostile)
            for char in ("\x1b", "\x07", "\x9b", "\u2028"):
                self.assertNotIn(char, text, formatter.__name__)
        self.assertEqual(format_terse(self.hostile).count("\n"), 1)

    def test_lone_surrogates(self) -> None:
        """terse and pretty print as UTF-8 a message whose header name was not UTF-8 or whose body holds a lone surrogate."""
        odd = from_amqp(
            "org.example.prod.odd",
            {"headers": {"\udcffname": "v\ud800", "fedora_messaging_user_jdoe": True}},
            b'{"text": "a\\ud800b", "summary": "s\\udfff"}',
        )
        no_summary = from_amqp("org.example.prod.odd", {}, b'{"text": "a\\ud800b"}')
        for message in (odd, no_summary):
            for formatter in (format_terse, format_pretty):
                text = formatter(message)
                text.encode("utf-8")
                self.assertIn("\\ud", text, formatter.__name__)
        pretty = format_pretty(odd)
        self.assertIn('    \\udcffname: "v\\ud800"\n', pretty)
        self.assertIn('      "text": "a\\ud800b"\n', pretty)
        self.assertIn(" s\\udfff\n", format_terse(odd))

    def test_pretty_any_header_value(self) -> None:
        """pretty shows header values JSON has no form for (bytes, times beyond year 9999) instead of failing."""
        message = from_amqp(
            "org.example.prod.odd",
            {"headers": {"raw": b"\xff\xfe", "far": FieldValue("T", 2**62)}},
            b"{}",
        )
        text = format_pretty(message)
        text.encode("utf-8")
        self.assertIn("    far: ", text)
        self.assertIn("    raw: ", text)


class FollowerTests(SynchronousTestCase):
    """
    The delivery handler.
    """

    def test_count(self) -> None:
        """Shown messages are counted and acknowledged; it is done after the count."""
        shown: list[Message] = []
        follower = Follower(shown.append, Filter(exclude=("skip.#",)), count=2)
        deliveries = [FakeDelivery(make(t)) for t in ("a.b", "skip.me", "c.d", "e.f")]
        for delivery in deliveries[:3]:
            follower(delivery)
        self.assertEqual([m.topic for m in shown], ["a.b", "c.d"])
        self.assertEqual([d.acked for d in deliveries[:3]], [True, True, True])
        self.assertEqual(self.successResultOf(follower.done), 0)
        follower(deliveries[3])
        self.assertEqual((len(shown), deliveries[3].acked), (2, False))

    def test_closed_pipe(self) -> None:
        """A reader that went away ends the tail with 0; the message is not acknowledged."""

        def show(message: Message) -> None:
            raise BrokenPipeError()

        follower = Follower(show, Filter())
        delivery = FakeDelivery(make())
        follower(delivery)
        self.assertEqual((self.successResultOf(follower.done), follower.pipe_closed, delivery.acked),
                         (0, True, False))

    def test_output_error(self) -> None:
        """A CommandError from the output ends the command with it."""

        def show(message: Message) -> None:
            raise CommandError("disk full", 74)

        follower = Follower(show, Filter())
        follower(FakeDelivery(make()))
        self.assertEqual(self.failureResultOf(follower.done, CommandError).value.status, 74)

    def test_unexpected_output_error(self) -> None:
        """Any other error from the output ends the command with one line and 70, instead of leaving it waiting."""

        def show(message: Message) -> None:
            raise TypeError("FieldValue can not be serialized")

        follower = Follower(show, Filter(), count=1)
        delivery = FakeDelivery(make())
        follower(delivery)
        error = self.failureResultOf(follower.done, CommandError).value
        self.assertEqual(error.status, 70)
        self.assertIn(delivery.message.id, error.reason)
        self.assertIn("TypeError: FieldValue can not be serialized", error.reason)
        self.assertFalse(delivery.acked)

    def test_json_unserializable_header(self) -> None:
        """tail --format json given a message it can not serialize ends with one line, not a hang."""
        # No AMQP value is without a serialized form; a set stands for a bug.
        message = from_amqp("org.example.prod.odd", {"headers": {"odd": {1, 2}}}, b"{}")
        out = io.StringIO()

        def show(shown: Message) -> None:
            out.write(format_json(shown))

        follower = Follower(show, Filter(), count=1)
        follower(FakeDelivery(message))
        error = self.failureResultOf(follower.done, CommandError).value
        self.assertIn(message.id, error.reason)
        self.assertEqual(out.getvalue(), "")

    def test_topology(self) -> None:
        """The queue is temporary (exclusive, auto-delete, not durable), bounded and bound for each pattern."""
        topology = tail_topology("fedhub.tail.x", "amq.topic", ("a.#", "b.*"))
        self.assertEqual(topology.queues, (QueueSpec(
            "fedhub.tail.x", durable=False, exclusive=True, auto_delete=True,
            arguments={"x-max-length": 100_000, "x-overflow": "drop-head"}),))
        small = tail_topology("fedhub.tail.x", "amq.topic", ("#",), max_backlog=5)
        self.assertEqual(small.queues[0].arguments["x-max-length"], 5)
        self.assertEqual(topology.bindings, (BindingSpec("fedhub.tail.x", "amq.topic", "a.#"),
                                             BindingSpec("fedhub.tail.x", "amq.topic", "b.*")))


class UsageTests(SynchronousTestCase):
    """
    Problems found before connecting.
    """

    def test_memory_domain_refused(self) -> None:
        """Following an in-process domain from another process is refused (78)."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        config = write_config(Path(self.mktemp()).absolute(), broker="memory")
        args = build_parser().parse_args(["tail", "-c", config])
        self.assertEqual(args.run(args), 78)
        self.assertIn("in-process bus", stderr.getvalue())

    def test_bad_pattern(self) -> None:
        """An invalid --exclude pattern: 64."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        args = build_parser().parse_args(["tail", "--exclude", "a.b#"])
        self.assertEqual(args.run(args), 64)


class LiveTailTests(LiveCase):
    """
    C{fedhub tail} against the shared RabbitMQ.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(self.directory)
        self.prefix = f"fedhubtest.tail.{uuid.uuid4().hex}"

    async def start_tail(self, *args: str) -> CLIProcess:
        process = spawn("tail", "-c", self.config, *args)
        self.addCleanup(process.kill)
        await self.wait_for(lambda: b"following" in process.err or process.ended.called,
                            "the tail to follow", 30)
        self.assertFalse(process.ended.called, process.stderr)
        return process

    async def publish(self, *messages: Message) -> None:
        bus = await self.start_bus()
        # Something else is bound for every topic of the test, so that the
        # messages the tail is not bound for are not returned.
        await self.queue(bus, f"{self.prefix}.#")
        for message in messages:
            await bus.publish(message)

    async def test_formats(self) -> None:
        """Each format prints the messages of the topic patterns; --count ends it with 0."""
        messages = [
            Message.create(f"{self.prefix}.a", {"summary": f"number {n}\x1b[31m"}, sent_at=WHEN)
            for n in range(3)
        ]
        for form in ("terse", "pretty", "json"):
            process = await self.start_tail("--topic", f"{self.prefix}.#", "--count", "3", "--format", form)
            await self.publish(*messages)
            self.assertEqual(await process.ended, 0, process.stderr)
            out = process.stdout
            self.assertNotIn("\x1b", out)
            if form == "terse":
                self.assertEqual(out.splitlines(), [
                    f"2026-11-28T06:00:00+00:00 {self.prefix}.a number {n}\\x1b[31m" for n in range(3)
                ])
            elif form == "pretty":
                self.assertEqual([line for line in out.splitlines() if line.startswith("  id:")],
                                 [f"  id:        {m.id}" for m in messages])
            else:
                received = list(iter_loads(out.splitlines()))
                self.assertEqual([m.id for m in received], [m.id for m in messages])
                self.assertEqual(received[0].body, messages[0].body)
                self.assertTrue(json.loads(out.splitlines()[0])["queue"].startswith("fedhub.tail."))

    async def test_filters(self) -> None:
        """--topic binds, --exclude, --user and --package filter: only matching messages are shown."""
        p = self.prefix
        wanted = [
            Message.create(f"{p}.build.done", {"n": 1}, headers={
                "fedora_messaging_user_ann": True, "fedora_messaging_rpm_kernel": True}),
            Message.create(f"{p}.build.done", {"n": 2}, headers={
                "fedora_messaging_user_bob": True, "fedora_messaging_rpm_kernel": True}),
        ]
        unwanted = [
            Message.create(f"{p}.other.done", {"n": 3}, headers={
                "fedora_messaging_user_ann": True, "fedora_messaging_rpm_kernel": True}),
            Message.create(f"{p}.build.noisy", {"n": 4}, headers={
                "fedora_messaging_user_ann": True, "fedora_messaging_rpm_kernel": True}),
            Message.create(f"{p}.build.done", {"n": 5}, headers={"fedora_messaging_rpm_kernel": True}),
            Message.create(f"{p}.build.done", {"n": 6}, headers={"fedora_messaging_user_ann": True}),
        ]
        process = await self.start_tail(
            "--topic", f"{p}.build.*", "--exclude", f"{p}.*.noisy", "--user", "ann", "--user", "bob",
            "--package", "kernel", "--count", "2", "--format", "json",
        )
        # The unwanted ones go first: had any been shown, the count would end
        # the tail before the last wanted one.
        await self.publish(*unwanted, wanted[0], wanted[1])
        self.assertEqual(await process.ended, 0, process.stderr)
        self.assertEqual([m.id for m in iter_loads(process.stdout.splitlines())], [m.id for m in wanted])

    async def test_backlog_bounded(self) -> None:
        """A tail that falls behind keeps only the newest --max-backlog messages beyond its prefetch."""
        process = await self.start_tail("--topic", f"{self.prefix}.#", "--max-backlog", "2",
                                        "--count", "102", "--format", "json")
        # Stopped, the tail takes its prefetch (100) into its socket; the
        # rest waits in its queue, which keeps the newest two.
        process.signal(signal.SIGSTOP)
        try:
            messages = [Message.create(f"{self.prefix}.n", {"n": n}) for n in range(150)]
            await self.publish(*messages)
        finally:
            process.signal(signal.SIGCONT)
        self.assertEqual(await process.ended, 0, process.stderr)
        shown = [m.body["n"] for m in iter_loads(process.stdout.splitlines())]
        self.assertEqual(shown, list(range(100)) + [148, 149])

    async def test_sigint(self) -> None:
        """Ctrl-C (SIGINT) ends the tail with 0, and its temporary queue is gone."""
        process = await self.start_tail("--topic", f"{self.prefix}.#")
        process.signal(signal.SIGINT)
        self.assertEqual(await process.ended, 0, process.stderr)
        # The queue was exclusive to the tail's connection: nothing is left
        # bound for the prefix, so a mandatory publish comes back.
        bus = await self.start_bus()
        try:
            await bus.publish(Message.create(f"{self.prefix}.after", {}))
        except MessageReturned:
            pass
        else:
            self.fail("the tail's queue is still bound")

    async def test_unreachable(self) -> None:
        """A broker that can not be reached: 75 after the timeout."""
        config = write_config(self.directory / "closed", broker="amqp://guest:guest@127.0.0.1:1/%2F")
        process = spawn("tail", "-c", config, "--timeout", "1")
        self.assertEqual(await process.ended, 75, process.stderr)
        self.assertIn("could not connect", process.stderr)

    async def test_missing_exchange(self) -> None:
        """Following an exchange that does not exist: 69 with the broker's 404."""
        config = write_config(self.directory / "x", exchange=f"fedhubtest.missing.{uuid.uuid4().hex}")
        process = spawn("tail", "-c", config)
        self.assertEqual(await process.ended, 69, process.stderr)
        self.assertIn("404", process.stderr)
