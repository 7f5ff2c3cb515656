"""
Tests for the hub's lock on its state directory: one C{twistd fedhub} per
C{[hub] state_dir}; a second refuses to start, with one line naming the
directory and the pid of the hub that holds it, while the commands that
work beside a running hub (C{fedhub inject-mail}, C{fedhub outbox}) are not
held up by the lock.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import argparse
import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli import inject_mail, outbox
from fedhub.cli.inject_mail import EX_OK
from fedhub.hub import Hub
from fedhub.tap import LOCK_FILE, Options, StateLock, makeService
from tests.processes import reap
from tests.test_ops import read_until
from tests.test_smtp_server import CHANGED, sample

CONFIG = """\
[hub]
topic_prefix = "org.example"
environment = "prod"
state_dir = "{state}"

[domains.community]
broker = "memory"

[[producers]]
name = "bugzilla-mail"
plugin = "bugzilla-smtp"
domain = "community"
recipients = ["bugs@example.org"]
listen = "tcp:0:interface=127.0.0.1"

[[consumers]]
name = "record"
plugin = "record"
domain = "community"
topics = ["#"]
"""

BIN = Path(sys.executable).parent


def write_config(directory: Path, state: Path) -> str:
    """
    Write a hub configuration with its state in C{state}; return its path.
    """
    path = directory / "hub.toml"
    path.write_text(CONFIG.format(state=state))
    return str(path)


def lock_of(hub: Hub) -> StateLock:
    """
    The state lock among a hub's services.
    """
    [lock] = [s for s in hub if isinstance(s, StateLock)]
    return lock


class MakeServiceTests(SynchronousTestCase):
    """
    C{makeService} takes the lock before anything starts, and refuses a
    state directory another hub holds.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir(parents=True)
        self.state = self.directory / "state"
        self.config = write_config(self.directory, self.state)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def make(self) -> Hub:
        options = Options()
        options.parseOptions(["--config", self.config])
        hub = makeService(options)
        assert isinstance(hub, Hub)
        self.addCleanup(lock_of(hub).release)
        return hub

    def refusal(self) -> None:
        options = Options()
        options.parseOptions(["--config", self.config])
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertEqual(error.code, 1)

    def test_lock_taken_before_start(self) -> None:
        """The hub holds C{hub.lock} in its state directory, created 0700 and 0600, with its pid, before it starts."""
        hub = self.make()
        self.assertFalse(hub.running)
        self.assertEqual(stat.S_IMODE(self.state.stat().st_mode), 0o700)
        path = self.state / LOCK_FILE
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(path.read_text(), f"{os.getpid()}\n")
        self.assertEqual(self.stderr.getvalue(), "")

    def test_second_hub_refused(self) -> None:
        """A second hub on the same state directory exits 1 with one line naming the directory and the holder's pid."""
        self.make()
        self.refusal()
        self.assertEqual(
            self.stderr.getvalue(),
            f"twistd fedhub: the state directory {self.state} is in use by another hub "
            f"(pid {os.getpid()})\n",
        )

    def test_refused_without_recorded_pid(self) -> None:
        """When the lock file holds no pid, the refusal names the directory alone."""
        hub = self.make()
        (self.state / LOCK_FILE).write_text("not a pid\n")
        self.refusal()
        self.assertEqual(
            self.stderr.getvalue(),
            f"twistd fedhub: the state directory {self.state} is in use by another hub\n",
        )
        self.assertTrue(lock_of(hub).held)

    def test_free_after_release(self) -> None:
        """Once the first hub let go of the lock, another hub on the directory is built."""
        first = self.make()
        lock_of(first).release()
        self.assertFalse(lock_of(first).held)
        second = self.make()
        self.assertTrue(lock_of(second).held)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_start_records_pid(self) -> None:
        """Starting the hub records its pid again (twistd forks between building and starting when it daemonizes)."""
        hub = self.make()
        path = self.state / LOCK_FILE
        path.write_text("1\n")
        lock = lock_of(hub)
        lock.startService()
        self.addCleanup(lock.stopService)
        self.assertEqual(path.read_text(), f"{os.getpid()}\n")

    def test_stop_keeps_lock(self) -> None:
        """Stopping keeps the lock: a stopping hub may still write its state until the process ends."""
        hub = self.make()
        lock = lock_of(hub)
        lock.startService()
        lock.stopService()
        self.assertTrue(lock.held)
        self.refusal()

    def test_unusable_state_directory(self) -> None:
        """A state directory that can not be created refuses the hub with one line giving the reason."""
        self.state.write_text("a file where the directory should be\n")
        self.refusal()
        [line] = self.stderr.getvalue().splitlines()
        self.assertTrue(
            line.startswith(f"twistd fedhub: the state directory {self.state} can not be locked: "),
            line,
        )

    def test_state_directory_dangling_link(self) -> None:
        """A state directory that is a symbolic link to nowhere is refused saying so."""
        self.state.symlink_to(self.state.parent / "gone")
        self.refusal()
        [line] = self.stderr.getvalue().splitlines()
        self.assertEqual(
            line,
            f"twistd fedhub: the state directory {self.state} can not be locked: it is a symbolic "
            f"link to {str(self.state.parent / 'gone')!r}, which does not exist",
        )

    def test_lock_released_when_build_fails(self) -> None:
        """A hub whose build is refused after the lock was taken does not keep the directory locked."""
        path = self.directory / "bad.toml"
        path.write_text(
            f'[hub]\nstate_dir = "{self.state}"\n[domains.a]\nbroker = "memory"\n'
            '[[consumers]]\nname = "b"\nplugin = "bridge"\ndomain = "a"\ntopics = ["#"]\n'
            'to_domain = "nowhere"\nallow = ["#"]\n'
        )
        options = Options()
        options.parseOptions(["--config", str(path)])
        self.assertRaises(SystemExit, makeService, options)
        self.assertIn("consumers[0].to_domain", self.stderr.getvalue())
        hub = self.make()
        self.assertTrue(lock_of(hub).held)

    def test_inject_mail_while_held(self) -> None:
        """C{fedhub inject-mail} spools a mail for the hub while the hub holds the lock."""
        self.make()
        mail = self.directory / "mail.eml"
        mail.write_bytes(sample(CHANGED))
        parser = argparse.ArgumentParser()
        inject_mail.add_arguments(parser)
        args = parser.parse_args(["--config", self.config, "--input", str(mail)])
        self.assertEqual(inject_mail.run(args), EX_OK)
        spooled = [p for p in (self.state / "spool" / "community").iterdir() if p.name.endswith(".msg")]
        self.assertEqual(len(spooled), 1)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_outbox_while_held(self) -> None:
        """C{fedhub outbox list} works while the lock is held."""
        self.make()
        parser = argparse.ArgumentParser()
        outbox.add_arguments(parser)
        out = io.StringIO()
        args = parser.parse_args(["list", "--config", self.config])
        self.assertEqual(outbox.run(args, out), 0)
        self.assertIn("has no failed messages", out.getvalue())


class TwistdTests(SynchronousTestCase):
    """
    Two C{twistd fedhub} processes on one state directory.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        self.state = self.directory / "state"
        self.config = write_config(self.directory, self.state)
        self.env = dict(os.environ, TMPDIR=str(self.directory))

    def twistd(self) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "fedhub", "--config", self.config],
            cwd=str(self.directory),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def end() -> None:
            reap(process)
            if process.stdout is not None:
                process.stdout.close()

        self.addCleanup(end)
        return process

    def fedhub(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "fedhub"), *argv],
            cwd=str(self.directory),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_second_hub_refused_and_commands_work(self) -> None:
        """
        While one hub runs, a second on its state directory exits 1 with one
        line and starts nothing; inject-mail and outbox work beside the
        first; once it exited, the directory is free.
        """
        first = self.twistd()
        started = read_until(first, "Hub running")
        self.assertIn("Hub running", "".join(started), "".join(started))

        second = self.twistd()
        lines = read_until(second, "Hub running")
        self.assertFalse(any("Hub running" in line for line in lines), "".join(lines))
        second.wait(timeout=60)
        self.assertEqual(second.returncode, 1, "".join(lines))
        self.assertEqual(
            lines,
            [f"twistd fedhub: the state directory {self.state} is in use by another hub "
             f"(pid {first.pid})\n"],
        )

        mail = self.directory / "mail.eml"
        mail.write_bytes(sample(CHANGED))
        injected = self.fedhub("inject-mail", "--config", self.config, "--input", str(mail))
        self.assertEqual(injected.returncode, 0, injected.stderr)
        # The running hub imports the spooled mail and its record consumer
        # writes the message.
        record = self.state / "components" / "record" / "messages.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if record.exists() and "bugzilla.bug.update" in record.read_text():
                break
            time.sleep(0.1)
        self.assertIn("bugzilla.bug.update", record.read_text() if record.exists() else "")
        self.assertEqual(len(record.read_text().splitlines()), 1)

        listed = self.fedhub("outbox", "list", "--config", self.config)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("no failed messages", listed.stdout)

        first.send_signal(signal.SIGTERM)
        rest, _ = first.communicate(timeout=60)
        self.assertEqual(first.returncode, 0, rest)

        options = Options()
        options.parseOptions(["--config", self.config])
        hub = makeService(options)
        assert isinstance(hub, Hub)
        lock = lock_of(hub)
        self.assertTrue(lock.held)
        lock.release()
