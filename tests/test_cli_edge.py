"""
Tests for how the C{fedhub} command line (L{fedhub.cli.main}) ends when it
is interrupted outside the reactor.
"""

from __future__ import annotations

import argparse
import io
import signal
import subprocess
import sys
import time
import types
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli import check_config
from fedhub.cli.main import main
from tests.processes import reaped


def interrupted(command: list[str], after: float, **popen: Any) -> tuple[int, bytes]:
    """
    Run C{command}, send it SIGINT C{after} seconds later, and return its
    exit status and standard error.
    """
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    with reaped(child):
        time.sleep(after)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=30)
    return child.returncode, stderr


class InterruptTests(SynchronousTestCase):
    """
    Ctrl-C in a command that does not run the reactor.
    """

    def test_keyboard_interrupt(self) -> None:
        """A KeyboardInterrupt in a command is one line on stderr and status 130, not a traceback."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)

        def interrupted(args: argparse.Namespace) -> int:
            raise KeyboardInterrupt()

        self.patch(check_config, "run", interrupted)
        self.assertEqual(main(["check-config", "hub.toml"]), 130)
        self.assertEqual(err.getvalue(), "fedhub check-config: interrupted\n")


class EarlyInterruptTests(SynchronousTestCase):
    """
    Ctrl-C while the console script is still importing the commands.
    """

    def replace_main(self, module: types.ModuleType) -> None:
        """
        Make C{module} what the console script imports as
        C{fedhub.cli.main} for the rest of the test.
        """
        real = sys.modules["fedhub.cli.main"]
        sys.modules["fedhub.cli.main"] = module
        self.addCleanup(sys.modules.__setitem__, "fedhub.cli.main", real)

    def test_interrupted_import(self) -> None:
        """A KeyboardInterrupt while fedhub.cli.main is imported ends the script with one line and status 130."""
        import fedhub.cli

        class Importing(types.ModuleType):
            def __getattr__(self, name: str) -> object:
                raise KeyboardInterrupt()

        self.replace_main(Importing("fedhub.cli.main"))
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.patch(sys, "argv", ["fedhub", "-q", "publish", "--topic", "t"])
        with self.assertRaises(SystemExit) as caught:
            fedhub.cli.entry()
        self.assertEqual(caught.exception.code, 130)
        self.assertEqual(err.getvalue(), "fedhub publish: interrupted\n")

    def test_done_command_ignores_late_interrupt(self) -> None:
        """Once the command has returned, SIGINT is ignored while the process exits with its status."""
        import fedhub.cli

        done = types.ModuleType("fedhub.cli.main")
        done.main = lambda: 0  # type: ignore[attr-defined]
        self.replace_main(done)
        previous = signal.getsignal(signal.SIGINT)
        self.addCleanup(signal.signal, signal.SIGINT, previous)
        with self.assertRaises(SystemExit) as caught:
            fedhub.cli.entry()
        self.assertEqual(caught.exception.code, 0)
        self.assertIs(signal.getsignal(signal.SIGINT), signal.SIG_IGN)

    def test_earlier_entry_point(self) -> None:
        """The console script's earlier name, fedhub.cli.main:entry, still runs the command."""
        from fedhub.cli import main as module

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.patch(sys, "argv", ["fedhub", "check-config", "/nonexistent/hub.toml"])
        with self.assertRaises(SystemExit) as caught:
            module.entry()
        self.assertEqual(caught.exception.code, 78)
        self.assertIn("can not read it", err.getvalue())

    def test_script_interrupted_early(self) -> None:
        """
        SIGINT at several moments of a real command's first second (its
        imports, then the command) never ends it with a traceback.
        """
        for delay in (0.1, 0.2, 0.3, 0.8):
            status, stderr = interrupted(
                [sys.executable, "-m", "fedhub.cli", "check-config", "/nonexistent/hub.toml"], delay
            )
            self.assertNotIn(b"Traceback", stderr, delay)
            # Interrupted (130), killed by the signal before Python took it
            # over (-2), or done before it came (78: no such file).
            self.assertIn(status, (130, -signal.SIGINT, 78), (delay, stderr))


class IgnoredSignalTests(SynchronousTestCase):
    """
    A command started with SIGINT ignored (a script's `fedhub publish &`,
    nohup) leaves it ignored, as Unix commands do.
    """

    def test_ignored_sigint_stays_ignored(self) -> None:
        """
        SIGINT while publishing to a broker that is not there: ignored, the
        command ends on its timeout (75), not as interrupted (130).
        """
        import os
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        directory = self.mktemp()
        os.makedirs(directory)
        config = os.path.join(directory, "hub.toml")
        with open(config, "w") as f:
            f.write(f'[hub]\nstate_dir = "{directory}/state"\n'
                    f'[domains.d]\nbroker = "amqp://guest:guest@127.0.0.1:{port}/"\n')
        status, stderr = interrupted(
            [sys.executable, "-c", "import sys; from fedhub.cli.main import main; sys.exit(main())",
             "publish", "-c", config, "--topic", "org.example.t", "--body", "{}", "-t", "6"],
            3,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        self.assertEqual(status, 75, stderr)
        self.assertNotIn(b"interrupted", stderr)
