"""
Tests for the C{exec} consumer: argument templates, option checks, and runs
of real (tiny Python) commands on the real reactor: exit statuses mapped to
verdicts, standard input, environment, timeouts that kill the process group,
the bound on runs at once, coalescing and stopping.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from fedhub.consumers import exec as exec_module
from fedhub.consumers.exec import (
    ExecHandler,
    ExecPlugin,
    TemplateError,
    TemplateField,
    parse_template,
    render_template,
    session_processes,
)
from fedhub.errors import ConfigError, NotHandled
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.message import Message, dump_line, from_amqp, loads
from fedhub.testing import ConsumerHarness, Settled

PY = sys.executable
TOPIC = "org.example.dev.pkg.update"


def script(code: str) -> list[str]:
    """
    A command running C{code} with this interpreter.
    """
    return [PY, "-c", textwrap.dedent(code)]


def sample(**body: Any) -> Message:
    """
    A message with a nested body to template from.
    """
    return Message.create(
        TOPIC,
        body or {"pkg": {"name": "kernel", "builds": [1, 2]}, "n": 3, "ok": True},
        headers={"fedora_messaging_rpm_kernel": True},
    )


class TemplateTests(SynchronousTestCase):
    """
    The argument template language.
    """

    def test_fields_and_literals(self) -> None:
        """A template splits into literal text and fields with their keys."""
        self.assertEqual(
            parse_template("a-{topic}/{body[pkg][name]}{{x}}"),
            ("a-", TemplateField("topic"), "/", TemplateField("body", ("pkg", "name")), "{x}"),
        )

    def test_render(self) -> None:
        """Strings go in as they are, other values as compact JSON."""
        message = sample()
        render = lambda text: render_template(parse_template(text), message)  # noqa: E731
        self.assertEqual(render("{topic}"), TOPIC)
        self.assertEqual(render("{id}"), message.id)
        self.assertEqual(render("{body[pkg][name]}"), "kernel")
        self.assertEqual(render("{body[pkg][builds][1]}"), "2")
        self.assertEqual(render("{body[pkg][builds]}"), "[1,2]")
        self.assertEqual(render("{body[ok]}"), "true")
        self.assertEqual(render("{headers[fedora_messaging_rpm_kernel]}"), "true")
        self.assertEqual(render("{severity}-{priority}-{schema}"), "20-0-base.message")
        self.assertEqual(render("}}{{"), "}{")

    def test_no_attribute_access(self) -> None:
        """Format-string tricks (attributes, format specs, positions) are refused."""
        for text in ("{topic.__class__}", "{body!r}", "{topic:>10}", "{0}", "{}", "{message}"):
            self.assertRaises(TemplateError, parse_template, text)

    def test_malformed(self) -> None:
        """Unbalanced braces, empty keys and keys on scalar fields are refused."""
        for text in ("{topic", "topic}", "{body[}", "{body[]}", "{topic[a]}", "{body[a]x}"):
            self.assertRaises(TemplateError, parse_template, text)

    def test_missing_key(self) -> None:
        """A key the message lacks is a TemplateError naming it."""
        message = sample()
        with self.assertRaises(TemplateError) as caught:
            render_template(parse_template("{body[pkg][version]}"), message)
        self.assertIn("'version'", caught.exception.reason)
        self.assertRaises(TemplateError, render_template, parse_template("{body[pkg][builds][5]}"),
                          message)
        self.assertRaises(TemplateError, render_template, parse_template("{body[n][x]}"), message)

    def test_nul_refused(self) -> None:
        """A value holding NUL can not become an argument."""
        message = Message.create(TOPIC, {"x": "a\x00b"})
        self.assertRaises(TemplateError, render_template, parse_template("{body[x]}"), message)


class OptionTests(SynchronousTestCase):
    """
    The plugin's options, checked as a configuration would check them.
    """

    def test_provides(self) -> None:
        """The plugin and its handler provide their interfaces."""
        plugin = ExecPlugin()
        verifyObject(IConsumerPlugin, plugin)
        harness = ConsumerHarness(plugin, {"command": ["/bin/true"]})
        verifyObject(IMessageHandler, harness.handler)

    def test_bad_commands(self) -> None:
        """
        An empty command, a templated program, a bad template or a relative
        program path (checked from the hub's directory, run from cwd) is a
        ConfigError.
        """
        for command in ([], [""], ["{body[prog]}"], ["/bin/echo", "{nope}"], ["/bin/echo", "{"],
                        ["./tool"], ["bin/tool", "x"]):
            with self.assertRaises(ConfigError, msg=repr(command)) as caught:
                ConsumerHarness(ExecPlugin(), {"command": command})
            self.assertIn("options.command", str(caught.exception))

    def test_bad_numbers(self) -> None:
        """Timeouts must be positive, coalesce not negative, exit statuses 1..255."""
        for options in (
            {"timeout": 0},
            {"kill_grace": -1},
            {"max_running": 0},
            {"coalesce": -1},
            {"retry_codes": [0]},
            {"retry_codes": [256]},
            {"max_output": 10},
            {"cwd": "relative/dir"},
            {"env": {"A=B": "x"}},
        ):
            self.assertRaises(ConfigError, ConsumerHarness, ExecPlugin(),
                              {"command": ["/bin/true"], **options})

    def test_missing_program(self) -> None:
        """start() refuses a program that is not found, so nothing is consumed."""
        for program in ("/nonexistent/fedhub-test-program", "fedhub-test-no-such-program"):
            harness = ConsumerHarness(ExecPlugin(), {"command": [program]})
            self.assertRaises(ConfigError, harness.handler.start)

    def test_program_on_path(self) -> None:
        """A bare program name is looked up on the PATH the command will get."""
        harness = ConsumerHarness(ExecPlugin(), {"command": [os.path.basename(PY)],
                                                 "env": {"PATH": os.path.dirname(PY)}})
        harness.handler.start()


class SessionTests(SynchronousTestCase):
    """
    Finding the processes of a session in a C{/proc}-like tree.
    """

    def proc(self, stats: Mapping[str, bytes], me: int | None = None) -> str:
        """
        A directory holding C{NAME/stat} for each name and content given,
        and C{self} naming this process (or C{me}), as C{/proc} does.
        """
        root = Path(self.mktemp())
        root.mkdir()
        for name, content in stats.items():
            (root / name).mkdir()
            (root / name / "stat").write_bytes(content)
        (root / "self").symlink_to(str(os.getpid() if me is None else me))
        return str(root)

    def test_members(self) -> None:
        """Processes whose session (field 6) matches are found, whatever their command name holds; zombies and others are not."""
        root = self.proc({
            "100": b"100 (sh) S 1 100 100 0 -1 4194560 0 0\n",
            # A command name may hold spaces, parentheses and digits.
            "101": b"101 (a) 7 S 1 100 (x) R 100 555 100 0 -1 0\n",
            "102": b"102 (gone) Z 100 100 100 0 -1 0\n",
            "103": b"103 (other) S 1 103 103 0 -1 0\n",
            "104": b"104 (x) S 1 100 1000 0 -1 0\n",
            "105": b"nonsense",
            "106": b"106 (short) S 1",
            "thread-self": b"100 (sh) S 1 100 100 0 -1 0\n",
        })
        (Path(root) / "107").mkdir()
        self.assertEqual(session_processes(100, root), {100, 101})
        self.assertEqual(session_processes(103, root), {103})
        self.assertEqual(session_processes(999, root), set())
        self.assertEqual(session_processes(1000, root), {104})

    def test_only_processes_made_since_the_session(self) -> None:
        """
        Where C{loadavg} gives the last process id, only processes numbered
        from the session's to it are looked at (around the end of the range
        when the numbers wrapped); an older one, whatever its stat file
        says, is not.
        """
        stats = {
            "90": b"90 (older) S 1 100 100 0 -1 0\n",
            "100": b"100 (sh) S 1 100 100 0 -1 0\n",
            "101": b"101 (child) S 100 100 100 0 -1 0\n",
            "150": b"150 (newer) S 1 100 100 0 -1 0\n",
        }
        root = self.proc(stats)
        (Path(root) / "loadavg").write_bytes(b"0.10 0.20 0.30 1/123 120\n")
        self.assertEqual(session_processes(100, root), {100, 101})
        # Too many numbers to look up one by one: the listing, narrowed.
        (Path(root) / "loadavg").write_bytes(b"0.10 0.20 0.30 1/123 100000\n")
        self.assertEqual(session_processes(100, root), {100, 101, 150})
        # The numbers wrapped: from the session's to the end, then from the
        # start to the last one.
        (Path(root) / "loadavg").write_bytes(b"0.10 0.20 0.30 1/123 95\n")
        self.assertEqual(session_processes(100, root), {90, 100, 101, 150})
        (Path(root) / "loadavg").write_bytes(b"garbled\n")
        self.assertEqual(session_processes(100, root), {90, 100, 101, 150})

    def test_no_proc(self) -> None:
        """Without a readable /proc, None says the session can not be listed."""
        self.assertIsNone(session_processes(1, str(Path(self.mktemp()) / "none")))

    def test_other_namespace(self) -> None:
        """A /proc whose self is another process (another pid namespace) is not used."""
        root = self.proc({"100": b"100 (sh) S 1 100 100 0 -1 0\n"}, me=os.getpid() + 1)
        self.assertIsNone(session_processes(100, root))
        self.assertEqual(session_processes(100, self.proc({"100": b"100 (sh) S 1 100 100\n"})),
                         {100})

    def test_this_process(self) -> None:
        """On the real /proc, this process is in its own session's list."""
        found = session_processes(os.getsid(0))
        if found is None:
            raise self.skipTest("no /proc")
        self.assertIn(os.getpid(), found)


class SpawnErrorTests(SynchronousTestCase):
    """
    A command that can not be spawned: retried when a later attempt may
    succeed, dead-lettered when it never can for that message.
    """

    def settle(self, number: int, **options: Any) -> Settled:
        harness = ConsumerHarness(ExecPlugin(), {"command": ["/bin/true"], **options})
        harness.start()
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        handler.reactor = FailingReactor(harness.clock, number)
        settled = self.successResultOf(harness.deliver(sample()))
        self.assertEqual(handler.runs, 0)
        self.successResultOf(harness.stop())
        return settled

    def test_transient_errors_retry(self) -> None:
        """Out of processes, memory or file descriptors: the message is retried."""
        for number in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
            settled = self.settle(number)
            self.assertEqual(settled.outcome, "retried", errno.errorcode[number])
            self.assertIn(os.strerror(number), settled.reason or "")

    def test_too_long_dead_letters(self) -> None:
        """Arguments and environment too long (E2BIG) never fit: dead-lettered at once."""
        settled = self.settle(errno.E2BIG)
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("Argument list too long", settled.reason or "")

    def test_too_long_dead_letters_batch(self) -> None:
        """A coalesced batch whose run is too long dead-letters every message of it."""
        harness = ConsumerHarness(ExecPlugin(), {"command": ["/bin/true"], "coalesce": 1.0},
                                  concurrency=5)
        harness.start()
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        handler.reactor = FailingReactor(harness.clock, errno.E2BIG)
        waiting = [harness.deliver(sample()) for _ in range(3)]
        harness.advance(1.0)
        settled = [self.successResultOf(d) for d in waiting]
        self.assertEqual([s.outcome for s in settled], ["dead_lettered"] * 3)
        self.successResultOf(harness.stop())


class FailingReactor:
    """
    A L{Clock} whose C{spawnProcess} fails with C{OSError(number)}.
    """

    def __init__(self, clock: Clock, number: int) -> None:
        self.clock = clock
        self.number = number

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(self.number, os.strerror(self.number))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.clock, name)


class ProcessCase(TestCase):
    """
    Commands run as real processes on the real reactor.
    """

    timeout = 60

    def out(self, name: str = "out") -> Path:
        """
        A file path for a command to write to.
        """
        path = Path(self.mktemp()).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(name)

    @inlineCallbacks
    def wait_for(self, condition: Callable[[], bool], limit: float = 20.0) -> Any:
        """
        Wait until C{condition()} holds, polling the real reactor.
        """
        waited = 0.0
        while not condition():
            if waited > limit:
                self.fail("condition never held")
            yield deferLater(reactor, 0.02, lambda: None)
            waited += 0.02


class RunTests(ProcessCase):
    """
    Real runs on the real reactor.
    """

    def harness(self, options: Mapping[str, Any], **kwargs: Any) -> ConsumerHarness:
        """
        A started harness on the real reactor, stopped after the test.
        """
        harness = ConsumerHarness(ExecPlugin(), options, reactor=reactor, **kwargs)
        harness.start()
        self.addCleanup(harness.stop)
        return harness

    def logged(self) -> list[dict[str, Any]]:
        """
        The events logged from now on, until the test ends.
        """
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    @inlineCallbacks
    def test_exit_zero_acks_with_stdin(self) -> Any:
        """Exit 0 acknowledges; standard input is the serialized message."""
        out = self.out()
        harness = self.harness({"command": script(
            "import sys, shutil; shutil.copyfileobj(sys.stdin, open(sys.argv[1], 'w'))"
        ) + [str(out)]})
        message = sample()
        settled: Settled = yield harness.deliver(message)
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(out.read_text(), dump_line(message.evolve(queue="fedhub.test")))
        self.assertEqual(loads(out.read_text())[0].id, message.id)

    @inlineCallbacks
    def test_no_stdin(self) -> Any:
        """With stdin = false the command reads end-of-file at once."""
        out = self.out()
        harness = self.harness({"stdin": False, "command": script(
            "import sys; open(sys.argv[1], 'w').write(repr(sys.stdin.read()))"
        ) + [str(out)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(out.read_text(), "''")

    @inlineCallbacks
    def test_tempfail_retries(self) -> Any:
        """Exit status 75 (EX_TEMPFAIL) is a retry."""
        harness = self.harness({"command": script("import sys; sys.exit(75)")})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "retried")
        self.assertIn("exit status 75", settled.reason or "")

    @inlineCallbacks
    def test_configured_retry_codes(self) -> Any:
        """retry_codes replaces the statuses that mean retry."""
        harness = self.harness({"command": script("import sys; sys.exit(75)"),
                                "retry_codes": [9]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")

    @inlineCallbacks
    def test_failure_dead_letters_with_stderr(self) -> Any:
        """Another status dead-letters, the reason holding the status and the last stderr lines."""
        harness = self.harness({"command": script("""
            import sys
            for n in range(30):
                print('line', n, file=sys.stderr)
            print('the real problem\\x1b[31m', file=sys.stderr)
            sys.exit(3)
        """)})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        reason = settled.reason or ""
        self.assertIn("exit status 3", reason)
        self.assertIn("the real problem\\x1b[31m", reason)
        self.assertIn("line 29", reason)
        self.assertNotIn("line 5\\n", reason)
        self.assertNotIn("\x1b", reason)

    @inlineCallbacks
    def test_large_output_is_bounded(self) -> Any:
        """Megabytes of output neither block the command nor are kept whole."""
        harness = self.harness({"max_output": 4096, "command": script("""
            import sys
            sys.stdout.write('x' * 3000000)
            sys.stderr.write('y' * 3000000 + '\\nlast words\\n')
            sys.exit(1)
        """)})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("last words", settled.reason or "")
        self.assertLess(len(settled.reason or ""), 1000)

    @inlineCallbacks
    def test_exec_failure(self) -> Any:
        """A program the launcher can not execute dead-letters with status 126 and the error."""
        target = self.out("garbage")
        target.write_bytes(b"\x00\x01\x02 not a program")
        target.chmod(0o755)
        harness = self.harness({"command": [str(target)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("exit status 126", settled.reason or "")
        self.assertIn("can not run", settled.reason or "")

    @inlineCallbacks
    def test_templated_arguments(self) -> Any:
        """Arguments are filled from the message, one argument per element, no shell."""
        out = self.out()
        harness = self.harness({"command": script(
            "import sys, json; json.dump(sys.argv[2:], open(sys.argv[1], 'w'))"
        ) + [str(out), "{topic}", "--", "{body[pkg][name]}", "id={id}", "{body[pkg][builds]}",
             "$(touch x) {{literal}}"]})
        message = sample()
        settled: Settled = yield harness.deliver(message)
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(
            json.loads(out.read_text()),
            [TOPIC, "--", "kernel", f"id={message.id}", "[1,2]", "$(touch x) {literal}"],
        )

    @inlineCallbacks
    def test_missing_key_dead_letters_without_running(self) -> Any:
        """A message lacking a templated key is dead-lettered and nothing runs."""
        harness = self.harness({"command": ["/bin/true", "{body[missing]}"]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("'missing'", settled.reason or "")
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        self.assertEqual(handler.runs, 0)

    @inlineCallbacks
    def test_environment(self) -> Any:
        """The command sees FEDHUB_* variables, env and pass_env, and nothing else."""
        out = self.out()
        os.environ["FEDHUB_TEST_SECRET"] = "do-not-leak"
        self.addCleanup(os.environ.pop, "FEDHUB_TEST_SECRET", None)
        harness = self.harness({"env": {"EXTRA": "yes"}, "command": script(
            "import os, sys, json; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
        ) + [str(out)]}, name="envcheck")
        message = sample()
        settled: Settled = yield harness.deliver(message)
        self.assertEqual(settled.outcome, "acked")
        env = json.loads(out.read_text())
        self.assertEqual(env["FEDHUB_TOPIC"], TOPIC)
        self.assertEqual(env["FEDHUB_MSG_ID"], message.id)
        self.assertEqual(env["FEDHUB_CONSUMER"], "envcheck")
        self.assertEqual(env["FEDHUB_MESSAGE_COUNT"], "1")
        self.assertEqual(env["EXTRA"], "yes")
        self.assertNotIn("FEDHUB_TEST_SECRET", env)
        allowed = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "EXTRA", "FEDHUB_TOPIC",
                   "FEDHUB_MSG_ID", "FEDHUB_CONSUMER", "FEDHUB_MESSAGE_COUNT", "LC_CTYPE"}
        # LC_CTYPE may be set by the interpreter itself (PEP 538 coercion).
        self.assertEqual(set(env) - allowed, set())

    @inlineCallbacks
    def test_timeout_kills_process_group(self) -> Any:
        """A run past its timeout gets its whole process group killed and is dead-lettered."""
        pids = self.out("pids")
        # Time for a loaded machine to start both interpreters and write
        # their pids before the timeout.
        harness = self.harness({"timeout": 3.0, "kill_grace": 0.5, "command": script("""
            import os, subprocess, sys, time
            child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
            open(sys.argv[1], 'w').write('%d %d' % (os.getpid(), child.pid))
            time.sleep(60)
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("timed out", settled.reason or "")
        self.assertIn(f"signal {signal.SIGTERM.value}", settled.reason or "")
        _, child = (int(p) for p in pids.read_text().split())
        yield self.wait_for(lambda: not alive(child))

    @inlineCallbacks
    def test_timeout_escalates_to_sigkill(self) -> Any:
        """A command that ignores SIGTERM is killed with SIGKILL after the grace period."""
        ready = self.out("ready")
        # The timeout leaves a loaded machine time to start Python and
        # ignore SIGTERM: a SIGTERM before that would end the run by itself.
        harness = self.harness({"timeout": 5.0, "kill_grace": 0.3, "command": script("""
            import signal, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open(sys.argv[1], 'w').write('ready')
            time.sleep(60)
        """) + [str(ready)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(ready.read_text(), "ready")
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn(f"signal {signal.SIGKILL.value}", settled.reason or "")

    def reap_later(self, pids: Path) -> None:
        """
        After the test, kill whatever process C{pids} names that still
        lives, so a failing test leaves nothing behind.
        """

        def kill() -> None:
            if not pids.exists():
                return
            for pid in pids.read_text().split():
                if alive(int(pid)):
                    os.kill(int(pid), signal.SIGKILL)

        self.addCleanup(kill)

    @inlineCallbacks
    def test_leftovers_terminated_after_exit(self) -> Any:
        """Processes a command leaves in its group get SIGTERM when it exits, with a warning; its status decides."""
        pids = self.out("pids")
        self.reap_later(pids)
        events = self.logged()
        harness = self.harness({"kill_grace": 1.0, "command": script("""
            import subprocess, sys
            child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
            open(sys.argv[1], 'w').write(str(child.pid))
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "acked")
        yield self.wait_for(lambda: not alive(int(pids.read_text())), limit=5.0)
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn
                    and "leaving processes" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["program"], PY)

    @inlineCallbacks
    def test_leftovers_killed_after_grace(self) -> Any:
        """A leftover that ignores SIGTERM and holds no pipe gets SIGKILL before the run ends."""
        pids = self.out("pids")
        self.reap_later(pids)
        harness = self.harness({"kill_grace": 0.5, "command": script("""
            import os, subprocess, sys, time
            child = subprocess.Popen(
                [sys.executable, '-c', 'import signal, sys, time\\n'
                 'signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n'
                 'open(sys.argv[1], "w").write("ready")\\n'
                 'time.sleep(60)', sys.argv[1] + '.ready'],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            open(sys.argv[1], 'w').write(str(child.pid))
            while not os.path.exists(sys.argv[1] + '.ready'):
                time.sleep(0.01)
            sys.exit(3)
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("exit status 3", settled.reason or "")
        yield self.wait_for(lambda: not alive(int(pids.read_text())), limit=5.0)

    @inlineCallbacks
    def test_timeout_after_exit_keeps_exit_status(self) -> Any:
        """A timeout passing after the command exited 0, while a leftover holds its pipes, does not fail it."""
        pids = self.out("pids")
        self.reap_later(pids)
        # The command must exit before the timeout, and the timeout pass
        # while the leftover lives on until its SIGKILL (kill_grace later).
        harness = self.harness({"timeout": 2.0, "kill_grace": 4.0, "command": script("""
            import os, subprocess, sys, time
            child = subprocess.Popen(
                [sys.executable, '-c', 'import signal, sys, time\\n'
                 'signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n'
                 'open(sys.argv[1], "w").write("ready")\\n'
                 'time.sleep(60)', sys.argv[1] + '.ready'])
            open(sys.argv[1], 'w').write(str(child.pid))
            while not os.path.exists(sys.argv[1] + '.ready'):
                time.sleep(0.01)
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "acked")
        yield self.wait_for(lambda: not alive(int(pids.read_text())), limit=5.0)

    @inlineCallbacks
    def test_timeout_reaches_other_process_groups(self) -> Any:
        """A timeout reaches a child that made its own process group, as long as it stays in the run's session."""
        pids = self.out("pids")
        self.reap_later(pids)
        harness = self.harness({"timeout": 1.0, "kill_grace": 0.5, "command": script("""
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],
                                     process_group=0)
            open(sys.argv[1], 'w').write(str(child.pid))
            time.sleep(60)
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("timed out", settled.reason or "")
        yield self.wait_for(lambda: not alive(int(pids.read_text())), limit=5.0)

    @inlineCallbacks
    def test_leftovers_in_other_groups_terminated_after_exit(self) -> Any:
        """A child in a process group of its own, left when the command exits, gets SIGTERM with a warning."""
        pids = self.out("pids")
        self.reap_later(pids)
        events = self.logged()
        harness = self.harness({"kill_grace": 30, "command": script("""
            import subprocess, sys
            child = subprocess.Popen(
                [sys.executable, '-c', 'import time; time.sleep(60)'], process_group=0,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            open(sys.argv[1], 'w').write(str(child.pid))
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "acked")
        # The run ended once the child was gone, long before kill_grace.
        self.assertFalse(alive(int(pids.read_text())))
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn
                    and "leaving processes" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    @inlineCallbacks
    def test_leftover_group_holding_pipes(self) -> Any:
        """A child in a process group of its own that holds the output pipes gets SIGTERM when the command exits; the run then ends."""
        pids = self.out("pids")
        self.reap_later(pids)
        harness = self.harness({"kill_grace": 3, "command": script("""
            import subprocess, sys
            child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],
                                     process_group=0)
            open(sys.argv[1], 'w').write(str(child.pid))
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "acked")
        self.assertFalse(alive(int(pids.read_text())))

    @inlineCallbacks
    def test_own_session_outlives_run(self) -> Any:
        """A child that starts its own session (a daemon) is left alone, without a warning."""
        pids = self.out("pids")
        self.reap_later(pids)
        events = self.logged()
        harness = self.harness({"kill_grace": 0.2, "command": script("""
            import subprocess, sys
            child = subprocess.Popen(
                [sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            open(sys.argv[1], 'w').write(str(child.pid))
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "acked")
        yield deferLater(reactor, 0.4, lambda: None)
        self.assertTrue(alive(int(pids.read_text())))
        self.assertEqual([e for e in events if "leaving processes" in e.get("log_format", "")],
                         [])

    @inlineCallbacks
    def test_without_proc_process_group_still_reached(self) -> Any:
        """Where /proc can not be read, a timeout still reaches the run's process group."""
        self.patch(exec_module, "PROC", str(Path(self.mktemp()) / "no-proc"))
        pids = self.out("pids")
        self.reap_later(pids)
        harness = self.harness({"timeout": 1.0, "kill_grace": 0.5, "command": script("""
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
            open(sys.argv[1], 'w').write(str(child.pid))
            time.sleep(60)
        """) + [str(pids)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        yield self.wait_for(lambda: not alive(int(pids.read_text())), limit=5.0)

    @inlineCallbacks
    def test_cwd(self) -> Any:
        """The command runs in the configured working directory."""
        where = Path(self.mktemp()).absolute()
        where.mkdir()
        seen = self.out("cwd")
        harness = self.harness({"cwd": str(where), "command": script("""
            import os, sys
            open(sys.argv[1], 'w').write(os.getcwd())
        """) + [str(seen)]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(seen.read_text(), str(where))

    @inlineCallbacks
    def test_cwd_gone_retries(self) -> Any:
        """A working directory removed after the start makes the message retried, saying why."""
        where = Path(self.mktemp()).absolute()
        where.mkdir()
        harness = self.harness({"cwd": str(where), "command": ["/bin/true"]})
        where.rmdir()
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "retried")
        self.assertIn(f"exit status {exec_module.CWD_MISSING_STATUS}", settled.reason or "")
        self.assertIn(f"can not change to {str(where)!r}: No such file or directory", settled.reason or "")

    @inlineCallbacks
    def test_argument_list_too_long_dead_letters(self) -> Any:
        """An argument too long for the system dead-letters the message at once, nothing runs, with or without a cwd."""
        where = Path(self.mktemp()).absolute()
        where.mkdir()
        for options in ({}, {"cwd": str(where)}):
            harness = self.harness({**options, "command": ["/bin/true", "{body[a]}"]})
            settled: Settled = yield harness.deliver(Message.create(TOPIC, {"a": "x" * 200_000}))
            self.assertEqual(settled.outcome, "dead_lettered")
            self.assertIn("Argument list too long", settled.reason or "")
            handler = harness.handler
            assert isinstance(handler, ExecHandler)
            self.assertEqual(handler.runs, 0)

    @inlineCallbacks
    def test_max_running(self) -> Any:
        """At most max_running commands run at once; the others wait their turn."""
        log = self.out("log")
        release = self.out("release")
        harness = self.harness({"max_running": 2, "command": script("""
            import os, sys, time
            log, release = sys.argv[1:3]
            def note(word):
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, (word + '\\n').encode()); os.close(fd)
            note('start')
            for _ in range(2000):
                if os.path.exists(release):
                    break
                time.sleep(0.01)
            note('end')
        """) + [str(log), str(release)]}, concurrency=5)
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        # Runs may take long: the consumer holds only what it handles.
        self.assertEqual(harness.service.prefetch, 5)
        results = gatherResults([harness.deliver(sample()) for _ in range(5)])
        yield self.wait_for(lambda: log.exists() and log.read_text().count("start") == 2)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(handler.runs, 2)
        self.assertEqual(log.read_text().count("start"), 2)
        release.write_text("go")
        settled = yield results
        self.assertEqual([s.outcome for s in settled], ["acked"] * 5)
        self.assertEqual(handler.runs, 5)
        running = peak = 0
        for word in log.read_text().split():
            running += 1 if word == "start" else -1
            peak = max(peak, running)
        self.assertEqual(peak, 2)

    def blocking(self, log: Path, release: Path, **options: Any) -> dict[str, Any]:
        """
        Options of a command that notes its start and end in C{log} and
        waits for C{release} to exist.
        """
        return {"command": script("""
            import os, sys, time
            log, release = sys.argv[1:3]
            def note(word):
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, (word + ' ' + os.environ['FEDHUB_MSG_ID'] + '\\n').encode())
                os.close(fd)
            note('start')
            while not os.path.exists(release):
                time.sleep(0.01)
            note('end')
        """) + [str(log), str(release)], **options}

    @inlineCallbacks
    def test_abandoned_waiting_run_never_begins(self) -> Any:
        """
        A message waiting for a free run whose call the consumer abandons
        (its channel closed) never runs: its call fails with NotHandled, and
        the one after it takes the free run.
        """
        log, release = self.out("log"), self.out("release")
        harness = self.harness(self.blocking(log, release, max_running=1), concurrency=3)
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        first, second, third = sample(), sample(), sample()
        running = handler.handle(first)
        waiting = handler.handle(second)
        after = handler.handle(third)
        yield self.wait_for(lambda: log.exists())
        handler.abandon(second)
        failure = self.failureResultOf(waiting, NotHandled)
        self.assertEqual(failure.value.reason, "abandoned before its run began")
        handler.abandon(second)  # again, or for a call already begun: nothing
        handler.abandon(first)
        release.write_text("go")
        yield running
        yield after
        self.assertEqual(handler.runs, 2)
        started = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start")]
        self.assertEqual(started, [first.id, third.id])

    @inlineCallbacks
    def test_stopping_gives_back_waiting_runs(self) -> Any:
        """
        When the consumer stops, messages waiting for a free run go back to
        the queue at once instead of being begun during the drain (and
        killed half-way when it ends); the run going finishes.
        """
        log, release = self.out("log"), self.out("release")
        harness = ConsumerHarness(ExecPlugin(), self.blocking(log, release, max_running=1),
                                  reactor=reactor, concurrency=3, drain_timeout=20)
        harness.start()
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        results = [harness.deliver(sample()) for _ in range(3)]
        yield self.wait_for(lambda: log.exists() and harness.service.in_flight == 3)
        stopped = harness.stop()
        yield self.wait_for(lambda: harness.service.in_flight == 1)
        release.write_text("go")
        yield stopped
        settled = yield gatherResults(results)
        self.assertEqual([s.outcome for s in settled], ["acked", "requeued", "requeued"])
        self.assertEqual(settled[1].reason, "not handled: the consumer is stopping")
        self.assertEqual(handler.runs, 1)

    @inlineCallbacks
    def test_coalesce_bad_message_alone_dead_lettered(self) -> Any:
        """
        A message the command can not be built from is dead-lettered when it
        joins; the batch it would have joined runs without it.
        """
        out = self.out("runs")
        harness = self.harness({"coalesce": 0.3, "command": script("""
            import os, sys
            open(sys.argv[1], "a").write(os.environ['FEDHUB_MESSAGE_COUNT'] + "\\n")
        """) + [str(out), "{body[n]}"]}, concurrency=10)
        good = [sample() for _ in range(3)]
        bad = Message.create(TOPIC, {"no_n": 1})
        settled = yield gatherResults([harness.deliver(m) for m in good[:2] + [bad] + good[2:]])
        self.assertEqual([s.outcome for s in settled], ["acked", "acked", "dead_lettered", "acked"])
        self.assertIn("can not build the command", settled[2].reason or "")
        self.assertEqual(out.read_text(), "3\n")

    @inlineCallbacks
    def test_coalesce_same_message_one_line(self) -> Any:
        """
        A copy of a message already in the open batch (delivered again) shares
        its line: the command reads it once; both calls get the run's verdict.
        An abandoned call leaves the batch.
        """
        out = self.out("runs")
        harness = self.harness({"coalesce": 0.3, "command": script("""
            import os, sys
            open(sys.argv[1], "a").write(os.environ['FEDHUB_MESSAGE_COUNT'] + " "
                                         + str(len(sys.stdin.readlines())) + "\\n")
        """) + [str(out)]}, concurrency=10)
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        message, gone, other = sample(), sample(), sample()
        calls = [handler.handle(message), handler.handle(message.evolve(redelivered=True)),
                 handler.handle(gone), handler.handle(other)]
        handler.abandon(gone)
        self.failureResultOf(calls[2], NotHandled)
        yield gatherResults([calls[0], calls[1], calls[3]])
        self.assertEqual(out.read_text(), "2 2\n")
        # The first of two copies abandoned: the line stays for the other.
        first = sample()
        again = first.evolve(redelivered=True)
        calls = [handler.handle(first), handler.handle(again)]
        handler.abandon(first)
        self.failureResultOf(calls[0], NotHandled)
        yield calls[1]
        self.assertEqual(out.read_text(), "2 2\n1 1\n")
        self.assertEqual(handler.runs, 2)
        # The only message of a batch abandoned: no run at all.
        lone = sample()
        call = handler.handle(lone)
        handler.abandon(lone)
        self.failureResultOf(call, NotHandled)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(handler.runs, 2)

    @inlineCallbacks
    def test_coalesce_one_run_per_burst(self) -> Any:
        """A burst shares one run: stdin has every message in order; all are acked after it."""
        out = self.out("runs")
        harness = self.harness({"coalesce": 0.3, "command": script("""
            import os, sys
            data = sys.stdin.read()
            fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, (os.environ['FEDHUB_MESSAGE_COUNT'] + ' ' + os.environ['FEDHUB_MSG_ID']
                          + '\\n' + data + '--\\n').encode())
            os.close(fd)
        """) + [str(out)]}, concurrency=10)
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        burst = [sample() for _ in range(5)]
        settled = yield gatherResults([harness.deliver(m) for m in burst])
        self.assertEqual([s.outcome for s in settled], ["acked"] * 5)
        self.assertEqual(handler.runs, 1)
        (run,) = out.read_text().split("--\n")[:-1]
        head, _, lines = run.partition("\n")
        self.assertEqual(head, f"5 {burst[-1].id}")
        self.assertEqual([m.id for m in loads(lines)], [m.id for m in burst])
        later: Settled = yield harness.deliver(sample())
        self.assertEqual(later.outcome, "acked")
        self.assertEqual(handler.runs, 2)

    @inlineCallbacks
    def test_coalesced_batch_runs_when_stopping(self) -> Any:
        """A batch still collecting when the consumer stops runs at once, not after coalesce; its messages are acked."""
        out = self.out("runs")
        harness = ConsumerHarness(
            ExecPlugin(),
            {"coalesce": 3600, "command": script("""
                import sys
                open(sys.argv[1], "a").write(sys.stdin.read())
            """) + [str(out)]},
            reactor=reactor,
            concurrency=10,
        )
        harness.start()
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        burst = [sample() for _ in range(3)]
        waiting = [harness.deliver(m) for m in burst]
        yield self.wait_for(lambda: harness.service.in_flight == 3)
        self.assertEqual(handler.runs, 0)
        yield harness.stop()
        settled = yield gatherResults(waiting)
        self.assertEqual([s.outcome for s in settled], ["acked"] * 3)
        self.assertEqual(handler.runs, 1)
        self.assertEqual([m.id for m in loads(out.read_text())], [m.id for m in burst])

    @inlineCallbacks
    def test_coalesce_waits_for_previous_run(self) -> Any:
        """Messages arriving while a coalesced run is going form the next batch; runs never overlap."""
        log = self.out("log")
        release = self.out("release")
        harness = self.harness({"coalesce": 0.05, "command": script("""
            import os, sys, time
            log, release = sys.argv[1:3]
            def note(word):
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, (word + '\\n').encode()); os.close(fd)
            note('start ' + os.environ['FEDHUB_MESSAGE_COUNT'])
            while not os.path.exists(release):
                time.sleep(0.01)
            note('end')
        """) + [str(log), str(release)]}, concurrency=10)
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        first = harness.deliver(sample())
        yield self.wait_for(lambda: log.exists())
        rest = gatherResults([harness.deliver(sample()) for _ in range(3)])
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(handler.runs, 1)
        release.write_text("go")
        settled = yield gatherResults([first, rest])
        self.assertEqual(settled[0].outcome, "acked")
        self.assertEqual([s.outcome for s in settled[1]], ["acked"] * 3)
        self.assertEqual(log.read_text().split("\n"), ["start 1", "end", "start 3", "end", ""])

    @inlineCallbacks
    def test_coalesce_failure_settles_every_message(self) -> Any:
        """Every message of a batch gets the verdict of the run it shared."""
        harness = self.harness({"coalesce": 0.1, "command": script("import sys; sys.exit(75)")},
                               concurrency=10)
        settled = yield gatherResults([harness.deliver(sample()) for _ in range(3)])
        self.assertEqual([s.outcome for s in settled], ["retried"] * 3)
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        self.assertEqual(handler.runs, 1)

    @inlineCallbacks
    def test_stop_terminates_runs(self) -> Any:
        """Stopping terminates a run still going, and does not dead-letter its message."""
        pids = self.out("pids")
        harness = ConsumerHarness(ExecPlugin(), {"kill_grace": 0.5, "command": script("""
            import os, sys, time
            open(sys.argv[1], 'w').write(str(os.getpid()))
            time.sleep(60)
        """) + [str(pids)]}, reactor=reactor)
        harness.start()
        harness.service.drain_timeout = 0.2
        harness.deliver(sample())
        yield self.wait_for(lambda: pids.exists() and pids.read_text() != "")
        pid = int(pids.read_text())
        yield harness.stop()
        self.assertFalse(alive(pid))
        self.assertEqual([s.outcome for s in harness.settled], [])

    @inlineCallbacks
    def test_command_gets_default_sigpipe(self) -> Any:
        """A command starts with SIGPIPE at its default action, so it dies of it, as from a shell."""
        harness = self.harness({"command": ["/bin/sh", "-c", "kill -PIPE $$; exit 0"]})
        settled: Settled = yield harness.deliver(sample())
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn(f"killed by signal {signal.SIGPIPE.value}", settled.reason or "")

    @inlineCallbacks
    def test_coalesce_header_name_not_utf8(self) -> Any:
        """A message whose header name is not UTF-8 still runs with its batch; nothing hangs."""
        out = self.out()
        harness = self.harness({"coalesce": 0.05, "command": script(
            "import sys, shutil; shutil.copyfileobj(sys.stdin.buffer, open(sys.argv[1], 'wb'))"
        ) + [str(out)]}, concurrency=5)
        odd = from_amqp(TOPIC, {"headers": {"\udcffname": True}}, b'{"n": 1}')
        settled: list[Settled] = []
        for message in (odd, sample()):
            harness.deliver(message).addCallback(settled.append)
        yield self.wait_for(lambda: len(settled) == 2, limit=10.0)
        self.assertEqual([s.outcome for s in settled], ["acked"] * 2)
        first, second = loads(out.read_bytes())
        self.assertEqual(first.id, odd.id)
        self.assertIs(first.headers["\udcffname"], True)

    @inlineCallbacks
    def test_coalesce_unforeseen_error_settles_batch(self) -> Any:
        """A coalesced run that fails to start in an unforeseen way settles its batch; the next batch runs."""
        refusing = RefusingReactor(reactor)
        harness = self.harness({"coalesce": 0.05, "command": ["/bin/true"]}, concurrency=5)
        handler = harness.handler
        assert isinstance(handler, ExecHandler)
        handler.reactor = refusing
        settled: list[Settled] = []
        harness.deliver(sample()).addCallback(settled.append)
        yield self.wait_for(lambda: len(settled) == 1, limit=10.0)
        self.assertEqual(settled[0].outcome, "retried")
        self.assertIn("ValueError", settled[0].reason or "")
        # The runner logs an error no plugin foresaw.
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        refusing.refuse = False
        later: Settled = yield harness.deliver(sample())
        self.assertEqual(later.outcome, "acked")
        self.assertEqual(handler.runs, 1)


class RefusingReactor:
    """
    A reactor whose C{spawnProcess} raises C{ValueError} while C{refuse} is
    true; everything else is the real reactor's.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self.refuse = True

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        if self.refuse:
            raise ValueError("refused by the test")
        return self.real.spawnProcess(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def alive(pid: int) -> bool:
    """
    Whether a process exists and is not a zombie.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
