"""
Tests for the commands' output on a terminal whose encoding can not show
every character (C{PYTHONIOENCODING=ascii}, a latin-1 locale): what it can
not show is written as C{\\uXXXX} escapes and the command goes on
(L{fedhub.cli.main}).

The first part runs L{fedhub.cli.main.main} in this process with standard
output replaced; the second runs C{fedhub tail} as a subprocess against the
shared RabbitMQ (a missing broker fails under C{CI=true}, skips elsewhere).
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from typing import Any

import os
import subprocess

import io
import json
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fedhub.cli.main import escape_unencodable, main
from fedhub.errors import MessageNacked
from fedhub.message import Message, iter_loads
from fedhub.outbox import Outbox, SynchronousExecutor
from tests.test_amqp_bus import LiveCase
from tests.test_cli_publish import CLIProcess, spawn, write_config
from tests.test_outbox import FakeBus

WHEN = datetime(2026, 11, 28, 6, 0, 0, tzinfo=timezone.utc)

#: Text with characters of latin-1, of the rest of the BMP and beyond it.
TEXT = "caf\u00e9 \u20ac \U0001f600"
#: L{TEXT} as written to an ASCII output.
TEXT_IN_ASCII = "caf\\u00e9 \\u20ac \\ud83d\\ude00"


def terminal(encoding: str, errors: str = "strict") -> io.TextIOWrapper:
    """
    A text output like C{sys.stdout} on a terminal of C{encoding}.
    """
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors, write_through=True)


def written(stream: io.TextIOWrapper) -> bytes:
    """
    The bytes written to a L{terminal}.
    """
    stream.flush()
    raw = stream.buffer
    assert isinstance(raw, io.BytesIO)
    return raw.getvalue()


class EscapeTests(SynchronousTestCase):
    """
    The error handler that writes what an encoding can not hold.
    """

    def test_json_escapes(self) -> None:
        """Each character is a JSON escape, a surrogate pair beyond U+FFFF, a lone surrogate as itself."""
        error = UnicodeEncodeError("ascii", "a\u00e9\U0001f600\ud800b", 1, 4, "ordinal not in range")
        self.assertEqual(escape_unencodable(error), ("\\u00e9\\ud83d\\ude00\\ud800", 4))

    def test_same_json_value(self) -> None:
        """Escaped inside a JSON document, the text loads back the same."""
        document = json.dumps({TEXT: [TEXT, "\\" + TEXT]}, ensure_ascii=False)
        ascii_form = document.encode("ascii", "fedhub-escape").decode("ascii")
        self.assertEqual(json.loads(ascii_form), {TEXT: [TEXT, "\\" + TEXT]})

    def test_decoding_refused(self) -> None:
        """Only encoding errors are handled: a decoding error is raised again."""
        error = UnicodeDecodeError("ascii", b"\xff", 0, 1, "ordinal not in range")
        self.assertRaises(UnicodeDecodeError, escape_unencodable, error)


class MainOutputTests(SynchronousTestCase):
    """
    L{main} on an output that can not hold every character.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def run_main(self, stdout: io.TextIOWrapper, *argv: str) -> int:
        self.patch(sys, "stdout", stdout)
        return main(list(argv))

    def test_check_config_ascii(self) -> None:
        """check-config names a file whose path is not ASCII on an ASCII output, then restores the output."""
        config = write_config(self.directory / TEXT)
        stdout = terminal("ascii")
        self.assertEqual(self.run_main(stdout, "check-config", config), 0, self.stderr.getvalue())
        text = written(stdout).decode("ascii")
        self.assertTrue(text.startswith(config.replace(TEXT, TEXT_IN_ASCII) + ": OK"), text)
        self.assertEqual(stdout.errors, "strict")

    def test_latin1_keeps_what_it_can(self) -> None:
        """A latin-1 output gets the characters latin-1 has as they are, only the others escaped."""
        config = write_config(self.directory / TEXT)
        stdout = terminal("latin-1")
        self.assertEqual(self.run_main(stdout, "check-config", config), 0, self.stderr.getvalue())
        self.assertIn("caf\u00e9 \\u20ac \\ud83d\\ude00".encode("latin-1"), written(stdout))

    def test_chosen_error_handler_kept(self) -> None:
        """An output whose error handler was chosen (PYTHONIOENCODING=ascii:replace) keeps it."""
        config = write_config(self.directory / TEXT)
        stdout = terminal("ascii", "replace")
        self.assertEqual(self.run_main(stdout, "check-config", config), 0, self.stderr.getvalue())
        self.assertIn(b"caf? ? ?", written(stdout))
        self.assertEqual(stdout.errors, "replace")

    def test_outbox_list_ascii(self) -> None:
        """outbox list shows a failed message whose topic and reason are not ASCII on an ASCII output."""
        config = write_config(self.directory)
        clock = Clock()
        bus = FakeBus()
        outbox = Outbox("test", str(self.directory / "state" / "outbox" / "test"), bus, clock,
                        executor=SynchronousExecutor())
        outbox.startService()
        message = Message.create(f"org.example.dev.{TEXT.replace(' ', '.')}", {}, sent_at=WHEN)
        outbox.publish(message)
        bus.fail_next(MessageNacked(f"refus\u00e9 {TEXT}", message.id))
        self.successResultOf(outbox.stopService())
        stdout = terminal("ascii")
        status = self.run_main(stdout, "outbox", "list", "-c", config)
        self.assertEqual(status, 0, self.stderr.getvalue())
        lines = written(stdout).decode("ascii").splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(lines[1].split()[2], "org.example.dev." + TEXT_IN_ASCII.replace(" ", "."))
        self.assertTrue(lines[1].endswith(f"refus\\u00e9 {TEXT_IN_ASCII}"), lines[1])

    def test_failing_command_restores(self) -> None:
        """A command that fails leaves standard output as it found it."""
        stdout = terminal("ascii")
        self.assertEqual(self.run_main(stdout, "check-config", str(self.directory / "missing.toml")), 78)
        self.assertEqual(stdout.errors, "strict")


class LiveTailEncodingTests(LiveCase):
    """
    C{fedhub tail} on an output that can not hold every character, against
    the shared RabbitMQ.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(self.directory)
        self.prefix = f"fedhubtest.tailenc.{uuid.uuid4().hex}"

    async def tail(self, encoding: str, *args: str) -> CLIProcess:
        process = spawn("tail", "-c", self.config, "--topic", f"{self.prefix}.#", "--count", "1", *args,
                        env={"PYTHONIOENCODING": encoding})
        self.addCleanup(process.kill)
        await self.wait_for(lambda: b"following" in process.err or process.ended.called,
                            "the tail to follow", 30)
        self.assertFalse(process.ended.called, process.stderr)
        return process

    async def publish(self, message: Message) -> None:
        bus = await self.start_bus()
        await self.queue(bus, f"{self.prefix}.#")
        await bus.publish(message)

    def message(self) -> Message:
        return Message.create(f"{self.prefix}.caf\u00e9", {"summary": TEXT}, sent_at=WHEN)

    async def test_ascii_formats(self) -> None:
        """On an ASCII output every format escapes what ASCII lacks and exits 0; json stays the same JSON."""
        for form in ("terse", "pretty", "json"):
            message = self.message()
            process = await self.tail("ascii", "--format", form)
            await self.publish(message)
            self.assertEqual(await process.ended, 0, process.stderr)
            out = bytes(process.out).decode("ascii")
            if form == "terse":
                self.assertEqual(out, f"2026-11-28T06:00:00+00:00 {self.prefix}.caf\\u00e9 {TEXT_IN_ASCII}\n")
            elif form == "pretty":
                self.assertIn(f'      "summary": "{TEXT_IN_ASCII}"\n', out)
                self.assertEqual(out.splitlines()[0], f"{self.prefix}.caf\\u00e9")
            else:
                received = list(iter_loads(out.splitlines()))
                self.assertEqual([(m.id, m.topic, dict(m.body)) for m in received],
                                 [(message.id, message.topic, {"summary": TEXT})])

    async def test_latin1(self) -> None:
        """On a latin-1 output, latin-1 characters are written as they are and only the others escaped."""
        process = await self.tail("latin-1")
        await self.publish(self.message())
        self.assertEqual(await process.ended, 0, process.stderr)
        self.assertEqual(
            bytes(process.out),
            f"2026-11-28T06:00:00+00:00 {self.prefix}.caf\u00e9 caf\u00e9 \\u20ac \\ud83d\\ude00\n".encode("latin-1"),
        )


class StandardOutputFailureTests(SynchronousTestCase):
    """
    A command whose standard output can not be written (a full disk, a
    reader gone) ends with one line and the documented status, never a
    traceback.
    """

    def run_cli(self, stdout: Any, *argv: str) -> subprocess.CompletedProcess[bytes]:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root}
        return subprocess.run(
            [sys.executable, "-m", "fedhub.cli", *argv], stdout=stdout, stderr=subprocess.PIPE,
            env=env, timeout=120, check=False,
        )

    def config(self) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('[domains.a]\nbroker = "memory"\n')
        return path

    def test_full_disk(self) -> None:
        """Standard output on a full disk: status 74 and one line saying so."""
        if not os.path.exists("/dev/full"):
            raise SkipTest("no /dev/full")
        with open("/dev/full", "w") as full:
            done = self.run_cli(full, "check-config", self.config())
        self.assertEqual(done.returncode, 74, done.stderr)
        self.assertEqual(done.stderr.decode().splitlines(),
                         ["fedhub check-config: can not write standard output: No space left on device"])

    def test_reader_gone(self) -> None:
        """A reader that went away ends the command quietly with 0."""
        read, write = os.pipe()
        os.close(read)
        with os.fdopen(write, "w") as closed:
            done = self.run_cli(closed, "check-config", self.config())
        self.assertEqual((done.returncode, done.stderr), (0, b""))

    def run_closed(self, *argv: str, closing: int) -> subprocess.CompletedProcess[bytes]:
        """
        Run C{fedhub ARGV...} started with file descriptor C{closing} (0 or
        1) closed, as C{<&-} or C{>&-} in a shell leaves it.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root}
        return subprocess.run(
            ["/bin/sh", "-c", f'exec "$0" -m fedhub.cli "$@" {closing}>&-', sys.executable, *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            timeout=120, check=False,
        )

    def test_standard_output_closed(self) -> None:
        """Standard output closed: what the command would print fails with 74 and one line, not lost without a word."""
        done = self.run_closed("check-config", self.config(), closing=1)
        self.assertEqual(done.returncode, 74, done.stderr)
        self.assertEqual(done.stderr.decode().splitlines(),
                         ["fedhub check-config: can not write standard output: it is closed"])

    def test_standard_input_closed(self) -> None:
        """publish and replay of standard input when it is closed: 66 and one line, no traceback."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('[domains.a]\nbroker = "amqp://127.0.0.1:5672/"\n')
        for argv in (["publish", "-c", path, "-f", "-"], ["replay", "-c", path, "-"]):
            done = self.run_closed(*argv, closing=0)
            self.assertEqual(done.returncode, 66, done.stderr)
            self.assertEqual(done.stderr.decode().splitlines(),
                             [f"fedhub {argv[0]}: can not read standard input: it is closed"])
