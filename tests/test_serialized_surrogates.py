"""
Tests for messages holding lone surrogates in the serialized form, as a
header name that was not valid UTF-8 on the wire does (it is decoded with
C{surrogateescape}).  The command line's writers (C{fedhub record}, C{fedhub tail --format json}) must
write them as UTF-8 lines that load back to the same message; first without
a broker, then through the commands and the shared RabbitMQ.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli.record import Appender, open_output
from fedhub.cli.tail import format_json
from fedhub.errors import MessageError
from fedhub.message import Message, from_amqp, iter_loads, load_message, loads
from tests.test_amqp_bus import Collector, LiveCase
from tests.test_cli_publish import run_cli, spawn, write_config


def odd_message(topic: str = "org.example.dev.odd.headers") -> Message:
    """
    A message as received from the wire with a header name that was not
    UTF-8.
    """
    return from_amqp(
        topic,
        {"headers": {"\udcffname": "value", "fedora_messaging_user_jdoe": True}},
        '{"text": "d\u00e9j\u00e0 vu", "n": 1}'.encode("utf-8"),
    )


class WriterTests(SynchronousTestCase):
    """
    The command line's writers, without a broker.
    """

    def test_record_appender(self) -> None:
        """fedhub record's writer appends such a message as a UTF-8 line that loads back to it."""
        message = odd_message()
        path = Path(self.mktemp())
        appender = Appender(open_output(str(path)), str(path))
        appender(message)
        appender.close()
        data = path.read_bytes()
        data.decode("utf-8")
        (loaded,) = loads(data)
        self.assertEqual(loaded, message)
        self.assertEqual(appender.written, 1)

    def test_tail_json(self) -> None:
        """fedhub tail --format json prints such a message as text UTF-8 can encode, loading back to it."""
        message = odd_message()
        line = format_json(message)
        (loaded,) = loads(line.encode("utf-8"))
        self.assertEqual(loaded, message)


def odd_body_message(topic: str = "org.example.dev.odd.body") -> Message:
    """
    A message as received from the wire whose body's JSON holds an unpaired
    surrogate escape (valid JSON, and what some encoders write).
    """
    return from_amqp(
        topic,
        {"headers": {"fedora_messaging_user_jdoe": True}},
        b'{"text": "a\\ud800b", "\\udfffkey": ["\\\\\\udc00"]}',
    )


class BodyRoundTripTests(SynchronousTestCase):
    """
    A body holding lone surrogates, written by the writers and read back by
    what C{fedhub replay} and C{fedhub publish --file} read with.
    """

    def test_recorded_line_loads(self) -> None:
        """fedhub record's line of such a message loads back to the same message."""
        message = odd_body_message()
        self.assertEqual(message.body["text"], "a\ud800b")
        path = Path(self.mktemp())
        appender = Appender(open_output(str(path)), str(path))
        appender(message)
        appender.close()
        (loaded,) = loads(path.read_bytes())
        self.assertEqual(loaded, message)
        self.assertEqual(loaded.body["\udfffkey"], ["\\\udc00"])

    def test_loaded_body_publishes_as_received(self) -> None:
        """The loaded message's wire body is UTF-8 JSON that decodes to the body received."""
        message = odd_body_message()
        (loaded,) = loads(format_json(message).encode("utf-8"))
        again = from_amqp(loaded.topic, loaded.amqp_properties(), loaded.body_bytes)
        self.assertEqual(again, message)
        loaded.body_bytes.decode("utf-8")

    def test_loaded_body_frozen(self) -> None:
        """A record decoded elsewhere (plain dictionaries) gives a frozen body, surrogates or not."""
        for text in ("a\ud800b", "plain"):
            record = {"topic": "org.example.dev.a", "body": {"text": text, "list": [1]}}
            message = load_message(record)
            self.assertRaises(TypeError, message.body.__setitem__, "text", "x")
            self.assertRaises((TypeError, AttributeError), message.body["list"].append, 2)
            self.assertEqual(message.body, {"text": text, "list": [1]})

    def test_new_message_still_refused(self) -> None:
        """A new message made in Python with such a body is still refused."""
        self.assertRaises(MessageError, Message.create, "org.example.dev.a", {"text": "\ud800"})


class LiveCommandTests(LiveCase):
    """
    C{fedhub record} and C{fedhub tail} given such a message by the shared
    RabbitMQ.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(self.directory)
        self.prefix = f"fedhubtest.surrogates.{uuid.uuid4().hex}"

    async def publish(self, message: Message) -> None:
        """
        Publish through a bus of the test's own.
        """
        bus = await self.start_bus()
        await bus.publish(message)

    async def run_for_one(self, command: str, *args: str, message: Message) -> Any:
        """
        Run C{fedhub COMMAND ARGS --count 1} on the test's topics until it
        follows, publish C{message}, and wait for the command to exit 0.
        """
        process = spawn(command, "-c", self.config, *args, "--topic", f"{self.prefix}.#",
                        "--count", "1")
        self.addCleanup(process.kill)
        await self.wait_for(lambda: b"following" in process.err or process.ended.called,
                            f"{command} to follow", 30)
        await self.publish(message)
        await self.wait_for(lambda: process.ended.called, "the command to end", 30)
        self.assertEqual(await process.ended, 0, process.stderr)
        return process

    async def test_record_command(self) -> None:
        """fedhub record records such a message and exits 0; the file loads back to it."""
        path = self.directory / "recorded.jsonl"
        message = odd_message(f"{self.prefix}.a")
        await self.run_for_one("record", str(path), message=message)
        (recorded,) = list(iter_loads(path.read_bytes().split(b"\n")))
        self.assertEqual(recorded.evolve(queue=None), message)

    async def test_tail_json_command(self) -> None:
        """fedhub tail --format json prints such a message and exits 0; the line loads back to it."""
        message = odd_message(f"{self.prefix}.a")
        process = await self.run_for_one("tail", "--format", "json", message=message)
        (shown,) = loads(bytes(process.out))
        self.assertEqual(shown.evolve(queue=None), message)

    async def test_tail_pretty_command(self) -> None:
        """fedhub tail --format pretty prints such a message, escaped, and exits 0."""
        process = await self.run_for_one("tail", "--format", "pretty",
                                         message=odd_message(f"{self.prefix}.a"))
        self.assertIn(b'    \\udcffname: "value"\n', bytes(process.out))

    async def test_record_then_replay(self) -> None:
        """A message whose body holds lone surrogates is recorded, and fedhub replay publishes it as it arrived (exit 0)."""
        path = self.directory / "recorded.jsonl"
        message = odd_body_message(f"{self.prefix}.body")
        await self.run_for_one("record", str(path), message=message)

        bus = await self.start_bus()
        queue = await self.queue(bus, f"{self.prefix}.#")
        collector = Collector()
        await bus.subscribe(queue, collector, 10)
        result = await run_cli("replay", "-c", self.config, str(path))
        self.assertEqual(await result.ended, 0, result.stderr)
        await self.wait_for(lambda: len(collector.deliveries) == 1, "the replayed message", 30)
        self.assertEqual(collector.deliveries[0].message.evolve(queue=None), message)
