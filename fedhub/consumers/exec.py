"""
The C{exec} consumer: run a command for each message, or once for each burst
of messages (the replacement for a cron job that scrapes for changes).

The command is an argument list, never a shell string.  Each run gets:

  - on standard input, the serialized message (one JSON line, as
    L{fedhub.message.dump_line} writes it), unless C{stdin = false}; a
    coalesced run gets every message of its batch, one line each;
  - arguments templated from the message: C{{topic}}, C{{id}},
    C{{schema}}, C{{severity}}, C{{priority}}, C{{body}},
    C{{body[key]}}, C{{body[key][0]}}, C{{headers[name]}}; C{{{}} and
    C{}}} stand for braces.  Only these lookups exist: no attribute access,
    no format specifications.  The program itself (the first element) can
    not be templated;
  - an environment made only of the variables named in C{pass_env} (taken
    from the hub's environment), those in C{env}, and C{FEDHUB_TOPIC},
    C{FEDHUB_MSG_ID}, C{FEDHUB_CONSUMER} and C{FEDHUB_MESSAGE_COUNT}.

Each run is started in its own session (so its own process group) by a tiny
launcher, C{sys.executable -I -S -c ...}, that calls C{setsid()}, puts
back the default actions of C{SIGPIPE} and C{SIGXFSZ} (which the interpreter
ignores) and then C{execvp()}s the command; Twisted's C{spawnProcess} has no
such option.  A run that passes C{timeout} gets C{SIGTERM} sent to every
process of its session (process groups a command made within it included;
where C{/proc} can not be read, to its process group only), then C{SIGKILL}
after C{kill_grace} seconds.  When the command exits, whatever it left in
its session gets the same treatment, and the run ends once they are gone;
its verdict is the command's own exit status.  A process that started a
session of its own is out of reach: that is how a daemon outlives a run.
When the hub stops, runs still going get C{SIGTERM}, and C{SIGKILL} at the
latest when the consumer stops waiting for them.

Verdicts: exit status 0 acknowledges; a status in C{retry_codes} (default
75, C{EX_TEMPFAIL}) is a L{Retry}; any other status, a signal, a timeout or
a program that can not be started is a L{DeadLetter} whose reason has the
status and the last lines of standard error.  A run that can not even be
spawned is a L{Retry}, unless its arguments and environment are too long
(L{SPAWN_NEVER_ERRORS}): a L{DeadLetter} then.  At most C{max_output} bytes of
each output stream are kept (the last ones); the rest is read and discarded,
so a chatty command never blocks on a full pipe.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    gatherResults,
    succeed,
)
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from fedhub.config import Option
from fedhub.errors import ConfigError, ConfigProblem, DeadLetter, FedhubError, NotHandled, Retry
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.logs import HubLogger
from fedhub.message import Message, dump_line
from fedhub.plugins import PluginContext
from fedhub.text import ascii_digits, escape_control

__all__ = [
    "ExecPlugin",
    "ExecHandler",
    "ExecSettings",
    "RunResult",
    "TemplateError",
    "TemplateField",
    "parse_template",
    "render_template",
    "session_processes",
]

#: Exit status of a command that asks to be run again later (C{EX_TEMPFAIL}).
EX_TEMPFAIL = 75

#: The variables a command inherits from the hub's environment by default.
DEFAULT_PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")

#: The search path a command gets when the hub's environment has none.
FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"

#: How many lines of standard error a dead-letter reason quotes.
REASON_LINES = 10

#: Seconds between looks at whether the processes a command left behind are
#: gone, once its output pipes are closed.
LEFTOVER_POLL = 0.05

#: How a run whose working directory can not be entered exits: C{EX_TEMPFAIL},
#: so that the message is retried (a directory gone with an unmounted disk,
#: say), as the default C{retry_codes} say.
CWD_MISSING_STATUS = 75

#: Runs the command in a new session (its own process group), so that a
#: timeout can signal everything it started (see L{session_processes}), in
#: the working directory given as its first argument (none: the hub's).
#: Changing directory here, not in C{spawnProcess}, lets Twisted spawn
#: without forking the hub, and names the error.  Exit statuses 126 and 127
#: are the shell's for "not executable" and "not found"; a working
#: directory that is gone exits with L{CWD_MISSING_STATUS}.
LAUNCHER = (
    "import os, signal, sys\n"
    "os.setsid()\n"
    "if sys.argv[1]:\n"
    "    try:\n"
    "        os.chdir(sys.argv[1])\n"
    "    except OSError as e:\n"
    "        sys.stderr.write('fedhub exec: can not change to %r: %s\\n' % (sys.argv[1], e.strerror))\n"
    "        sys.stderr.flush()\n"
    f"        os._exit({CWD_MISSING_STATUS})\n"
    "del sys.argv[1]\n"
    # The interpreter ignores these two at start-up, and an ignored signal
    # stays ignored across exec: give the command the defaults a shell
    # would, so that a pipeline's writer dies of SIGPIPE.
    "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
    "try:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "except OSError as e:\n"
    "    sys.stderr.write('fedhub exec: can not run %r: %s\\n' % (sys.argv[1], e.strerror))\n"
    "    sys.stderr.flush()\n"
    "    os._exit(127 if isinstance(e, FileNotFoundError) else 126)\n"
)

#: Where the kernel lists processes (Linux); without it a run is reached
#: through its process group alone.
PROC = "/proc"

#: At most how many times a run's session is listed to signal it: each
#: listing after the first finds what was forked while signalling.
SCAN_ROUNDS = 5

#: Errors of starting a run that no later attempt for the same message can
#: avoid: the arguments and environment (both made from the message) are
#: too long (C{E2BIG}), for all of them or for one argument.  Its messages
#: are dead-lettered at once; any other error starting a run (C{EAGAIN},
#: C{ENOMEM}, C{EMFILE}, ...: none comes from the message) is a L{Retry}.
SPAWN_NEVER_ERRORS = frozenset({errno.E2BIG})

#: The message fields a template may name; C{body} and C{headers} take keys.
TEMPLATE_ROOTS = frozenset({"topic", "id", "schema", "severity", "priority", "body", "headers"})


# --- argument templates ---------------------------------------------------


class TemplateError(FedhubError):
    """
    An argument template is malformed, or names something a message lacks.

    @ivar reason: What is wrong.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class TemplateField:
    """
    One C{{...}} field of an argument template.

    @ivar root: The message field (one of L{TEMPLATE_ROOTS}).
    @ivar keys: The keys looked up in it, in order (C{body[a][0]} has
        C{("a", "0")}).
    """

    root: str
    keys: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "{" + self.root + "".join(f"[{key}]" for key in self.keys) + "}"


Template = tuple["str | TemplateField", ...]


def parse_template(text: str) -> Template:
    """
    Split an argument template into literal text and L{TemplateField}s.

    @raise TemplateError: for an unbalanced brace, an unknown field name, an
        empty key or keys on a field that takes none.
    """
    parts: list[str | TemplateField] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "}":
            if text.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise TemplateError(f"single '}}' at position {i}; write '}}}}' for a brace")
        if char != "{":
            literal.append(char)
            i += 1
            continue
        if text.startswith("{{", i):
            literal.append("{")
            i += 2
            continue
        start = i
        i += 1
        j = i
        while j < n and (text[j].isalnum() or text[j] == "_"):
            j += 1
        root = text[i:j]
        if root not in TEMPLATE_ROOTS:
            known = ", ".join(sorted(TEMPLATE_ROOTS))
            raise TemplateError(f"unknown field {root!r} at position {start} (known: {known})")
        keys: list[str] = []
        while j < n and text[j] == "[":
            end = text.find("]", j + 1)
            if end < 0:
                raise TemplateError(f"'[' without ']' at position {j}")
            key = text[j + 1 : end]
            if not key:
                raise TemplateError(f"empty key at position {j}")
            keys.append(key)
            j = end + 1
        if j >= n or text[j] != "}":
            raise TemplateError(f"field at position {start} is not closed by '}}'")
        if keys and root not in ("body", "headers"):
            raise TemplateError(f"field {root!r} takes no keys")
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(TemplateField(root, tuple(keys)))
        i = j + 1
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def _field_value(message: Message, spec: TemplateField) -> object:
    value: object
    if spec.root == "body":
        value = message.body
    elif spec.root == "headers":
        value = message.wire_headers()
    else:
        value = getattr(message, spec.root)
    walked = spec.root
    for key in spec.keys:
        if isinstance(value, Mapping):
            if key not in value:
                raise TemplateError(f"{walked} has no key {key!r}")
            value = value[key]
        elif isinstance(value, list) and ascii_digits(key):
            index = int(key)
            if index >= len(value):
                raise TemplateError(f"{walked} has no element {index}")
            value = value[index]
        else:
            raise TemplateError(f"{walked} is a {type(value).__name__}; it has no key {key!r}")
        walked += f"[{key}]"
    return value


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(
        value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str
    )


def render_template(template: Template, message: Message) -> str:
    """
    Fill a parsed template from a message.  Strings are put in as they are;
    numbers, booleans, C{null}, objects and arrays as compact JSON.

    @raise TemplateError: when the message lacks a named key, or a value
        holds a NUL character (which no argument can carry).
    """
    out: list[str] = []
    for part in template:
        if isinstance(part, str):
            out.append(part)
            continue
        text = _as_text(_field_value(message, part))
        if "\x00" in text:
            raise TemplateError(f"{part} holds a NUL character")
        out.append(text)
    return "".join(out)


# --- settings -------------------------------------------------------------


def _check_command(value: list[str]) -> str | None:
    if not value:
        return "must name at least the program"
    if not value[0]:
        return "the program can not be empty"
    if "/" in value[0] and not value[0].startswith("/"):
        # Checked at start from the hub's directory, run from cwd: a
        # relative path would name two programs.
        return (f"the program {value[0]!r} must be an absolute path, or a name looked up on "
                "PATH (no slash)")
    for position, item in enumerate(value):
        if "\x00" in item:
            return f"element {position} holds a NUL character"
        try:
            template = parse_template(item)
        except TemplateError as e:
            return f"element {position}: {e.reason}"
        if position == 0 and any(isinstance(part, TemplateField) for part in template):
            return "the program (element 0) can not come from the message"
    return None


def _check_env(value: dict[str, Any]) -> str | None:
    for name, item in value.items():
        if not name or "=" in name or "\x00" in name:
            return f"{name!r} is not a valid variable name"
        if not isinstance(item, str):
            return f"value of {name!r} must be a string"
        if "\x00" in item:
            return f"value of {name!r} holds a NUL character"
    return None


def _check_names(value: list[str]) -> str | None:
    for name in value:
        if not name or "=" in name or "\x00" in name:
            return f"{name!r} is not a valid variable name"
    return None


def _check_positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _check_not_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _check_codes(value: list[int]) -> str | None:
    for code in value:
        if not 1 <= code <= 255:
            return f"exit status {code} is not within 1..255"
    return None


def _check_cwd(value: str) -> str | None:
    return None if os.path.isabs(value) else "must be an absolute path"


def _check_output(value: int) -> str | None:
    return None if value >= 1024 else "must be at least 1024 bytes"


@dataclass(frozen=True)
class ExecSettings:
    """
    The checked options of one C{exec} consumer.

    @ivar command: The argument templates; element 0 is the program.
    @ivar stdin: Whether the serialized message goes to standard input.
    @ivar env: Extra environment variables.
    @ivar pass_env: Variables taken from the hub's environment.
    @ivar cwd: The working directory, or C{None} for the hub's.
    @ivar timeout: Seconds a run may take before its processes are
        signalled.
    @ivar kill_grace: Seconds between C{SIGTERM} and C{SIGKILL}.
    @ivar max_running: Runs at once, across messages.
    @ivar max_output: Bytes of each output stream kept (the last ones).
    @ivar retry_codes: Exit statuses that mean "retry later".
    @ivar coalesce: Seconds a batch collects messages before its one run;
        0 runs once per message.
    """

    command: tuple[Template, ...]
    stdin: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] = DEFAULT_PASS_ENV
    cwd: str | None = None
    timeout: float = 300.0
    kill_grace: float = 5.0
    max_running: int = 1
    max_output: int = 64 * 1024
    retry_codes: frozenset[int] = frozenset({EX_TEMPFAIL})
    coalesce: float = 0.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ExecSettings:
        """
        Settings from a plugin's checked options.
        """
        return cls(
            command=tuple(parse_template(item) for item in options["command"]),
            stdin=bool(options.get("stdin", True)),
            env=dict(options.get("env") or {}),
            pass_env=tuple(options.get("pass_env", DEFAULT_PASS_ENV)),
            cwd=options.get("cwd"),
            timeout=float(options.get("timeout", 300.0)),
            kill_grace=float(options.get("kill_grace", 5.0)),
            max_running=int(options.get("max_running", 1)),
            max_output=int(options.get("max_output", 64 * 1024)),
            retry_codes=frozenset(options.get("retry_codes", (EX_TEMPFAIL,))),
            coalesce=float(options.get("coalesce", 0.0)),
        )

    @property
    def program(self) -> str:
        """
        The program to run (element 0, never templated).
        """
        first = self.command[0]
        return "".join(part for part in first if isinstance(part, str))


# --- running one command ----------------------------------------------------


#: Up to how many process numbers a session's listing looks up one by one,
#: rather than listing every process.
DIRECT_LOOKUPS = 512


def _last_pid(root: str) -> int | None:
    """
    The process id given out last, from C{loadavg} (its fifth field) in
    the C{/proc} at C{root}, or C{None} when it can not be read.
    """
    try:
        with open(os.path.join(root, "loadavg"), "rb") as f:
            return int(f.read(256).split()[4])
    except (OSError, IndexError, ValueError):
        return None


def session_processes(
    session: int, proc: str | None = None, among: Iterable[int] | None = None
) -> set[int] | None:
    """
    The live processes of a session, from C{/proc/PID/stat} (Linux): those
    whose session id (its sixth field) is C{session}, zombies left out.
    Only processes made since the session's leader are looked at (see
    L{_last_pid}).

    @param proc: Where processes are listed; by default L{PROC}.
    @param among: Look only at these process ids rather than at all.
    @return: Their process ids, or C{None} when processes can not be listed
        there: no C{/proc}, or one whose C{self} is not this process (that
        of another pid namespace, whose numbers mean other processes).
    """
    root = PROC if proc is None else proc
    names: Iterable[str]
    if among is None:
        try:
            if os.readlink(os.path.join(root, "self")) != str(os.getpid()):
                return None
        except OSError:
            return None
        # Only processes made since the session began can be in it: their
        # numbers run from the session's to the last one given out, around
        # the end of the range if the numbers wrapped meanwhile.  Few
        # numbers: each is looked up; else the listing is narrowed to them.
        # (Opening every process's stat file costs milliseconds on a busy
        # host; listing them, a fraction of that.)
        last = _last_pid(root)
        if last is not None and session <= last < session + DIRECT_LOOKUPS:
            names = [str(pid) for pid in range(session, last + 1)]
        else:
            try:
                names = os.listdir(root)
            except OSError:
                return None
            if last is not None and last >= session:
                names = [n for n in names if n.isdigit() and session <= int(n) <= last]
            elif last is not None:
                names = [n for n in names if n.isdigit() and (int(n) >= session or int(n) <= last)]
    else:
        names = [str(pid) for pid in among]
    found: set[int] = set()
    for name in names:
        if not name.isdigit():
            continue
        try:
            fd = os.open(os.path.join(root, name, "stat"), os.O_RDONLY)
        except OSError:
            # It ended meanwhile.
            continue
        try:
            # The fields looked at come well within the first bytes.
            stat = os.read(fd, 512)
        except OSError:
            continue
        finally:
            os.close(fd)
        # The command name (field 2) is in parentheses and may hold any
        # character, parentheses and spaces included: the fields after it
        # start after the last ')'.
        end = stat.rfind(b")")
        if end < 0:
            continue
        # state, ppid, pgrp, session, then the rest
        fields = stat[end + 1 :].split(None, 4)
        if len(fields) < 4 or fields[0] in (b"Z", b"X", b"x"):
            continue
        try:
            if int(fields[3]) == session:
                found.add(int(name))
        except ValueError:
            continue
    return found


class _Tail:
    """
    The last C{limit} bytes of a stream, and how many bytes it had.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        self.data += data
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.data)


@dataclass(frozen=True)
class RunResult:
    """
    How one run of a command ended.

    @ivar exit_code: Its exit status, or C{None} when a signal ended it.
    @ivar signal: The signal that ended it, or C{None}.
    @ivar timed_out: Whether it was killed for passing its timeout.
    @ivar stdout: The last bytes of its standard output.
    @ivar stderr: The last bytes of its standard error.
    @ivar stdout_truncated: Whether earlier output was discarded.
    @ivar stderr_truncated: Likewise for standard error.
    @ivar left_processes: Whether it exited leaving processes in its
        session, which were then terminated.
    """

    exit_code: int | None
    signal: int | None
    timed_out: bool
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    left_processes: bool = False

    def stderr_lines(self, count: int = REASON_LINES, limit: int = 600) -> str:
        """
        The last C{count} lines of standard error, escaped, at most C{limit}
        characters (the end is kept).
        """
        text = self.stderr.decode("utf-8", "replace").rstrip("\n")
        lines = text.split("\n")[-count:]
        escaped = escape_control("\n".join(lines))
        if len(escaped) > limit:
            escaped = "…" + escaped[-(limit - 1) :]
        return escaped

    def describe(self) -> str:
        """
        What happened, in a few words.
        """
        if self.timed_out:
            how = "timed out and was killed"
            if self.signal is not None:
                how += f" (signal {self.signal})"
        elif self.signal is not None:
            how = f"killed by signal {self.signal}"
        else:
            how = f"exit status {self.exit_code}"
        return how


class _CommandProtocol(ProcessProtocol):
    """
    Feeds standard input, keeps the tails of the output and reports the end.
    """

    def __init__(self, run: _Run, stdin: bytes | None, limit: int) -> None:
        self.run = run
        self.stdin = stdin
        self.out = _Tail(limit)
        self.err = _Tail(limit)

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.feed(data)

    def errReceived(self, data: bytes) -> None:
        self.err.feed(data)

    def processExited(self, reason: Failure) -> None:
        self.run.exited()

    def processEnded(self, reason: Failure) -> None:
        self.run.ended(reason)


class _Run:
    """
    One process: started through the launcher, watched by a timeout.
    """

    def __init__(
        self,
        reactor: Any,
        argv: Sequence[str],
        env: Mapping[str, str],
        stdin: bytes | None,
        settings: ExecSettings,
    ) -> None:
        self.reactor = reactor
        self.argv = list(argv)
        self.env = dict(env)
        self.settings = settings
        self.protocol = _CommandProtocol(self, stdin, settings.max_output)
        self.done: Deferred[RunResult] = Deferred()
        self.timed_out = False
        self.finished = False
        self.pgid: int | None = None
        self.transport: Any = None
        self.main_exited = False
        self.left_processes = False
        self._killed = False
        # The processes of its session seen alive last.
        self._members: set[int] = set()
        self._reason: Failure | None = None
        self._timers: list[IDelayedCall] = []
        self._waiting: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        """
        A Deferred that fires when the process has ended, whatever is
        chained on L{done}.
        """
        d: Deferred[None] = Deferred()
        if self.finished:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    def start(self) -> Deferred[RunResult]:
        """
        Spawn the process.

        @raise OSError: when it can not be spawned (no fork, no pipes).
        """
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, self.settings.cwd or "", *self.argv]
        self.transport = self.reactor.spawnProcess(
            self.protocol, sys.executable, launcher, env=self.env
        )
        self.pgid = self.transport.pid
        self._later(self.settings.timeout, self._expire)
        return self.done

    def _later(self, delay: float, fn: Any) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self.reactor.callLater(delay, fn))

    def _reach(self, number: int) -> bool:
        """
        Send signal C{number} to every process of the run's session (where
        processes can be listed, see L{session_processes}), else to its
        process group: whether any process was there.

        The session is listed again after signalling, to reach processes
        forked meanwhile, until a listing finds no new one (at most
        L{SCAN_ROUNDS} listings).  A process that started a session of its
        own is not reached: that is how a daemon outlives a run.
        """
        if self.pgid is None:
            return False
        session = self.pgid
        found = session_processes(session)
        if found is None:
            try:
                os.killpg(self.pgid, number)
            except OSError:
                return False
            return True
        signalled: set[int] = set()
        for _ in range(SCAN_ROUNDS):
            new = found - signalled
            if not new:
                break
            for pid in new:
                try:
                    os.kill(pid, number)
                except OSError:
                    # It ended since the listing.
                    pass
            signalled |= new
            found = session_processes(session) or set()
        self._members = found
        return bool(signalled)

    def _signal(self, number: int) -> None:
        if self.finished:
            return
        if self._reach(number):
            return
        # The launcher has not made its session yet (or the command is
        # gone): signal the process alone.
        try:
            self.transport.signalProcess(number)
        except Exception:
            # It is gone already (ProcessExitedAlready).
            pass

    def _expire(self) -> None:
        if self.main_exited:
            # The command ended in time; its exit status stands.  What it
            # left behind was signalled when it exited and gets SIGKILL on
            # that schedule.
            return
        self.timed_out = True
        self.terminate()

    def terminate(self) -> None:
        """
        C{SIGTERM} to the run's processes now, C{SIGKILL} after the grace
        period.
        """
        if self.finished:
            return
        self._signal(signal.SIGTERM)
        self._later(self.settings.kill_grace, self._kill)

    def kill(self) -> None:
        """
        C{SIGKILL} to the run's processes now, without a grace period; the
        run ends once the command's end is reported (its output pipes are
        closed for it, should processes out of reach hold them).
        """
        if self.finished:
            return
        self._signal(signal.SIGKILL)
        self._killed = True
        # Never ends the run from here: the caller may be tearing down.
        self._close_pipes()

    def _kill(self) -> None:
        self._signal(signal.SIGKILL)
        self._killed = True
        if self._reason is not None:
            # The pipes are closed already; only leftovers kept the run.
            self._finish()
        else:
            self._close_pipes()

    def _close_pipes(self) -> None:
        # A process that left children holding its output pipes would keep
        # the run open; closing our ends lets it end.
        if not self.finished and self._reason is None and self.transport is not None:
            self.transport.loseConnection()

    def exited(self) -> None:
        """
        The process exited.  Whatever it left in its session gets
        C{SIGTERM} now and C{SIGKILL} after the grace period (when its
        output pipes, which those processes may hold, are closed too), so
        that nothing a run started outlives it.
        """
        self.main_exited = True
        if self._reach(signal.SIGTERM) and not self.timed_out:
            self.left_processes = True
        self._later(self.settings.kill_grace, self._kill)

    def _leftovers_alive(self) -> bool:
        """
        Whether processes of the run are left.  Those seen last are looked
        at first (a few files); only when they are gone is the whole
        session listed again, for processes they forked meanwhile.
        """
        if self.pgid is None:
            return False
        if self._members:
            self._members = session_processes(self.pgid, among=self._members) or set()
            if self._members:
                return True
        found = session_processes(self.pgid)
        if found is None:
            try:
                os.killpg(self.pgid, 0)
            except OSError:
                return False
            return True
        self._members = found
        return bool(found)

    def ended(self, reason: Failure) -> None:
        """
        The process exited and its pipes are closed: report the result once
        nothing is left of its session (or all of it got C{SIGKILL}).
        """
        if self.finished:
            return
        self._reason = reason
        self._await_group()

    def _await_group(self) -> None:
        if self.finished:
            return
        if self._killed or not self._leftovers_alive():
            self._finish()
        else:
            self._later(LEFTOVER_POLL, self._await_group)

    def _finish(self) -> None:
        if self.finished:
            return
        reason = self._reason
        assert reason is not None
        self.finished = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        value = reason.value
        exit_code: int | None
        number: int | None
        if isinstance(value, ProcessDone):
            exit_code, number = 0, None
        elif isinstance(value, ProcessTerminated):
            exit_code, number = value.exitCode, value.signal
        else:
            exit_code, number = None, None
        out, err = self.protocol.out, self.protocol.err
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        self.done.callback(
            RunResult(
                exit_code=exit_code,
                signal=number,
                timed_out=self.timed_out,
                stdout=bytes(out.data),
                stderr=bytes(err.data),
                stdout_truncated=out.truncated,
                stderr_truncated=err.truncated,
                left_processes=self.left_processes,
            )
        )


# --- the handler --------------------------------------------------------------


def _encoded_size(text: str) -> int:
    """
    About how many bytes C{text} takes as an argument or variable.
    """
    return len(text.encode("utf-8", "surrogatepass"))


def _serialized(messages: Sequence[Message]) -> bytes:
    """
    The messages as standard input: one serialized line each, in UTF-8.
    """
    return "".join(dump_line(m) for m in messages).encode("utf-8")


@dataclass
class _Batch:
    """
    Messages that share one coalesced run, with the calls waiting for it
    (by the identity of the message each call was for).
    """

    #: One line per message id, in the order they came.
    messages: list[Message] = field(default_factory=list)
    #: The calls waiting for the run: by the identity of each call's
    #: message, its id and its waiter.
    waiters: dict[int, tuple[str, Deferred[None]]] = field(default_factory=dict)
    timer: IDelayedCall | None = None
    due: bool = False

    def add(self, message: Message) -> Deferred[None]:
        """
        Add a call for C{message}; a message with the same id as one already
        here (a copy delivered again) shares its line instead of adding one.
        """
        waiter: Deferred[None] = Deferred()
        if not any(m.id == message.id for m in self.messages):
            self.messages.append(message)
        self.waiters[id(message)] = (message.id, waiter)
        return waiter

    def remove(self, message: Message) -> Deferred[None] | None:
        """
        Take out the call for C{message} (this very object); its waiter, or
        C{None}.  Its line goes only with the last call sharing it.
        """
        entry = self.waiters.pop(id(message), None)
        if entry is None:
            return None
        message_id, waiter = entry
        if all(other != message_id for other, _ in self.waiters.values()):
            self.messages = [m for m in self.messages if m.id != message_id]
        return waiter


@implementer(IMessageHandler)
class ExecHandler:
    """
    Runs a command per message, or per batch of messages when coalescing.

    @ivar runs: How many runs were started.
    """

    log = HubLogger()
    #: Runs may take minutes: its consumer holds no messages beyond those
    #: it handles, so none waits unacknowledged behind a run (see
    #: L{fedhub.consumers.runner.prefetch_for}).
    long_running = True

    def __init__(
        self, name: str, topics: tuple[str, ...], reactor: Any, settings: ExecSettings
    ) -> None:
        self.name = name
        self.topics = topics
        self.reactor = reactor
        self.settings = settings
        self.runs = 0
        self._semaphore = DeferredSemaphore(settings.max_running)
        self._base_env: dict[str, str] = {}
        self._running: set[_Run] = set()
        self._batch: _Batch | None = None
        self._batch_running = False
        self._stopping = False
        self._draining = False
        # Calls waiting for a free run, by the identity of their message.
        self._queued: dict[int, Deferred[Any]] = {}

    # lifecycle

    def start(self) -> None:
        """
        Build the base environment and check that the program exists.

        @raise ConfigError: when the program can not be found or run.
        """
        self._stopping = self._draining = False
        env = {name: os.environ[name] for name in self.settings.pass_env if name in os.environ}
        env.setdefault("PATH", FALLBACK_PATH)
        env.update(self.settings.env)
        self._base_env = env
        program = self.settings.program
        if "/" in program:
            found: str | None = program if os.access(program, os.X_OK) else None
        else:
            found = shutil.which(program, path=env["PATH"])
        if found is None or not os.path.isfile(found):
            raise ConfigError(
                [ConfigProblem(f"{self.name}.command", f"can not run {program!r}: not found "
                               "or not executable")]
            )
        if self.settings.cwd is not None and not os.path.isdir(self.settings.cwd):
            raise ConfigError(
                [ConfigProblem(f"{self.name}.cwd", f"{self.settings.cwd!r} is not a directory")]
            )

    def drain(self) -> None:
        """
        The consumer is stopping: a batch still collecting messages runs now
        (once the run going, if any, ends) rather than after C{coalesce};
        messages waiting for a free run are given back to the queue
        (L{NotHandled}) rather than begun, to be killed half-way when the
        drain ends.
        """
        self._draining = True
        for waiting in list(self._queued.values()):
            waiting.cancel()
        batch = self._batch
        if batch is not None and batch.timer is not None and batch.timer.active():
            batch.timer.cancel()
            self._batch_due(batch)

    def abandon(self, message: Message) -> None:
        """
        The consumer forgot the call for C{message}: its channel closed, and
        the broker delivers it again.  If its run has not begun it never
        will (it would run the message twice): it leaves the queue of calls
        waiting for a run, or the batch still collecting, and its call
        fails with L{NotHandled}.
        """
        waiting = self._queued.get(id(message))
        if waiting is not None:
            waiting.cancel()
            return
        batch = self._batch
        if batch is not None:
            waiter = batch.remove(message)
            if waiter is not None:
                if not batch.waiters:
                    if batch.timer is not None and batch.timer.active():
                        batch.timer.cancel()
                    self._batch = None
                waiter.errback(NotHandled("abandoned before its run began"))

    def stop(self) -> Deferred[None]:
        """
        Terminate the runs still going (C{SIGTERM}, then C{SIGKILL}) and wait
        for them to end.  Messages of those runs, and of a batch that never
        ran, are left unsettled: the runner gave up on them before calling
        this, and they went back to the queue.

        @return: A Deferred that fires once every run ended.  Cancelling it
            (as the runner does when it stops waiting) sends C{SIGKILL} at
            once to whatever every remaining run started, and fails it with
            C{CancelledError}, so that nothing outlives the hub.
        """
        self._stopping = True
        if self._batch is not None:
            if self._batch.timer is not None and self._batch.timer.active():
                self._batch.timer.cancel()
            self._batch = None
        runs = list(self._running)
        if not runs:
            return succeed(None)
        waits = [run.wait() for run in runs]
        for run in runs:
            run.terminate()
        cancelled: list[bool] = []

        def kill(stopped: Deferred[None]) -> None:
            # Called before the Deferred fails with CancelledError: the
            # signals are sent before the hub goes on stopping.
            cancelled.append(True)
            going = [run for run in self._running if not run.finished]
            for run in going:
                run.kill()
            if going:
                self.log.warn(
                    "Consumer {consumer}: sent SIGKILL to {count} run(s) of {program} still "
                    "going when its stop timed out",
                    consumer=self.name,
                    count=len(going),
                    program=self.settings.program,
                )

        stopped: Deferred[None] = Deferred(kill)

        def ended(_: object) -> None:
            if not cancelled and not stopped.called:
                stopped.callback(None)

        gatherResults(waits, consumeErrors=True).addBoth(ended)
        return stopped

    @property
    def running(self) -> int:
        """
        How many runs are going (started, and not yet ended).
        """
        return sum(1 for run in self._running if not run.finished)

    # messages

    def handle(self, message: Message) -> Deferred[None]:
        """
        Run the command for C{message} (or add it to the open batch).
        """
        if self.settings.coalesce > 0:
            return self._join_batch(message)
        argv = self._argv(message)
        env = self._env(message, 1)
        stdin = _serialized([message]) if self.settings.stdin else None
        semaphore = self._semaphore
        key = id(message)

        def begin(_: object) -> Deferred[RunResult]:
            self._queued.pop(key, None)
            if self._draining:
                semaphore.release()
                raise NotHandled("the consumer is stopping")
            try:
                running = self._spawn(argv, env, stdin, [message])
            except BaseException:
                semaphore.release()
                raise

            def release(result: object) -> object:
                semaphore.release()
                return result

            return running.addBoth(release)

        def dropped(failure: Failure) -> Deferred[RunResult]:
            # The wait for a run was cancelled: by abandon() or drain().  (A
            # run, once begun, is never cancelled.)
            failure.trap(CancelledError)
            self._queued.pop(key, None)
            raise NotHandled(
                "the consumer is stopping" if self._draining else "abandoned before its run began"
            )

        waiting: Deferred[Any] = semaphore.acquire()
        if not waiting.called:
            self._queued[key] = waiting
        d: Deferred[RunResult] = waiting.addCallback(begin)
        d.addErrback(dropped)
        return d.addCallback(self._verdict, [message])

    def _argv(self, message: Message) -> list[str]:
        """
        The command line for C{message}, its arguments templated from it.

        @raise DeadLetter: when no command can be run for it: a template
            names what it lacks, or its id (given in the environment) holds
            a NUL character.
        """
        try:
            argv = [render_template(template, message) for template in self.settings.command]
        except TemplateError as e:
            raise DeadLetter(f"can not build the command: {e.reason}") from None
        if "\x00" in message.id:
            raise DeadLetter("the message id holds a NUL character")
        return argv

    def _env(self, newest: Message, count: int) -> dict[str, str]:
        env = dict(self._base_env)
        env["FEDHUB_TOPIC"] = newest.topic
        env["FEDHUB_MSG_ID"] = newest.id
        env["FEDHUB_CONSUMER"] = self.name
        env["FEDHUB_MESSAGE_COUNT"] = str(count)
        return env

    def _spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        stdin: bytes | None,
        messages: list[Message],
    ) -> Deferred[RunResult]:
        if self._stopping:
            # Never settled: the runner stopped waiting for these messages.
            return Deferred()
        run = _Run(self.reactor, argv, env, stdin, self.settings)
        try:
            done = run.start()
        except OSError as e:
            reason = f"can not start {self.settings.program!r}: {e.strerror or e}"
            if e.errno in SPAWN_NEVER_ERRORS:
                # Running this message again can not help.
                size = sum(_encoded_size(item) + 1 for item in argv)
                size += sum(_encoded_size(f"{k}={v}") + 1 for k, v in env.items())
                raise DeadLetter(
                    f"{reason} (arguments and environment: about {size} bytes)"
                ) from None
            # Out of processes, memory or file descriptors: that may pass.
            raise Retry(reason) from None
        self.runs += 1
        self._running.add(run)
        newest = messages[-1]
        self.log.debug(
            "Consumer {consumer} started {program} (pid {pid}) for {msg_id} ({topic}), "
            "{count} message(s)",
            consumer=self.name,
            program=self.settings.program,
            pid=run.pgid,
            msg_id=newest.id,
            topic=newest.topic,
            count=len(messages),
        )

        def finished(result: RunResult) -> RunResult:
            self._running.discard(run)
            return result

        return done.addCallback(finished)

    def _verdict(self, result: RunResult, messages: list[Message]) -> Deferred[None] | None:
        if self._stopping:
            # Terminated by stop(): leave the messages to the queue.
            return Deferred()
        newest = messages[-1]
        fields = {
            "consumer": self.name,
            "msg_id": newest.id,
            "topic": newest.topic,
            "program": self.settings.program,
            "count": len(messages),
        }
        if result.left_processes:
            self.log.warn(
                "Consumer {consumer}: {program} exited leaving processes in its session; "
                "they were terminated (a process meant to outlive a run must start its "
                "own session)",
                **fields,
            )
        if result.exit_code == 0 and result.signal is None and not result.timed_out:
            self.log.info(
                "Consumer {consumer} ran {program} for {msg_id} ({topic}), {count} "
                "message(s): exit status 0",
                **fields,
            )
            return None
        how = result.describe()
        stderr = result.stderr_lines()
        reason = f"{self.settings.program}: {how}"
        if stderr:
            reason += f"; stderr: {stderr}"
        self.log.warn(
            "Consumer {consumer} ran {program} for {msg_id} ({topic}), {count} "
            "message(s): {how}; stderr: {stderr}",
            how=how,
            stderr=stderr or "-",
            **fields,
        )
        if (
            not result.timed_out
            and result.signal is None
            and result.exit_code in self.settings.retry_codes
        ):
            raise Retry(reason)
        raise DeadLetter(reason)

    # coalescing

    def _join_batch(self, message: Message) -> Deferred[None]:
        # The command is built from a batch's newest message: one it can not
        # be built from is dead-lettered alone, not with the whole batch.
        self._argv(message)
        if self._batch is None:
            batch = _Batch()
            batch.timer = self.reactor.callLater(self.settings.coalesce, self._batch_due, batch)
            self._batch = batch
        return self._batch.add(message)

    def _batch_due(self, batch: _Batch) -> None:
        batch.timer = None
        batch.due = True
        if not self._batch_running:
            self._run_batch(batch)

    def _run_batch(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None
        self._batch_running = True
        messages = list(batch.messages)
        if not messages:
            # Every call left it (abandoned): nothing to run.
            self._settle_batch(batch, None)
            return
        newest = messages[-1]
        try:
            argv = self._argv(newest)
        except DeadLetter as e:
            self._settle_batch(batch, e)
            return
        env = self._env(newest, len(messages))
        try:
            stdin = _serialized(messages) if self.settings.stdin else None
            d = self._spawn(argv, env, stdin, messages)
        except Exception as e:
            # Called from a timer or another batch's end: an exception left
            # to escape would leave this batch, and every later one, waiting
            # for ever.  Its messages get the consumer's on_error policy.
            self._settle_batch(batch, Failure(e))
            return
        d.addCallback(self._verdict, messages)
        d.addBoth(lambda outcome: self._settle_batch(batch, outcome))

    def _settle_batch(self, batch: _Batch, outcome: object) -> None:
        self._batch_running = False
        for _, waiter in batch.waiters.values():
            if isinstance(outcome, (Failure, BaseException)):
                waiter.errback(outcome)
            else:
                waiter.callback(None)
        # Failures were handed to every waiter; do not log them again here.
        if self._batch is not None and self._batch.due and not self._stopping:
            self._run_batch(self._batch)


# --- the plugin ---------------------------------------------------------------


@implementer(IPlugin, IConsumerPlugin)
class ExecPlugin:
    """
    The plugin that builds L{ExecHandler}s.
    """

    name = "exec"
    description = "Run a command (an argument list, no shell) for each message or burst of messages."
    options: Mapping[str, Option] = {
        "command": Option(
            list,
            help="program and arguments; {topic}, {id}, {body[key]}, {headers[name]} are "
            "filled from the message",
            check=_check_command,
            items=str,
        ),
        "stdin": Option(bool, True, "write the serialized message to standard input"),
        "env": Option(dict, {}, "extra environment variables (strings)", check=_check_env),
        "pass_env": Option(
            list,
            list(DEFAULT_PASS_ENV),
            "variables taken from the hub's environment",
            check=_check_names,
            items=str,
        ),
        "cwd": Option(str, None, "working directory (absolute); default the hub's",
                      check=_check_cwd),
        "timeout": Option(float, 300.0, "seconds before the run is killed", _check_positive),
        "kill_grace": Option(float, 5.0, "seconds between SIGTERM and SIGKILL", _check_positive),
        "max_running": Option(int, 1, "runs at once across messages", _check_positive),
        "max_output": Option(int, 64 * 1024, "bytes of stdout and of stderr kept",
                             _check_output),
        "retry_codes": Option(list, [EX_TEMPFAIL], "exit statuses that mean retry later",
                              check=_check_codes, items=int),
        "coalesce": Option(float, 0.0, "seconds a batch of messages waits for its one run; "
                           "0 runs once per message", _check_not_negative),
    }

    def build(self, context: PluginContext) -> ExecHandler:
        """
        Build a handler; no process is started before a message comes.
        """
        topics: tuple[str, ...] = ("#",)
        if context.component is not None and context.component.topics:
            topics = tuple(context.component.topics)
        return ExecHandler(
            context.name, topics, context.reactor, ExecSettings.from_options(context.options)
        )
