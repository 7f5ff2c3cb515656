"""
The twistd glue: C{twistd fedhub [--config FILE]}.

This is the edge where the global reactor is touched; everything below it
takes the reactor as a parameter.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, Service
from twisted.python import usage

from fedhub import __version__
from fedhub.config import (
    Config,
    default_config,
    exposed_password,
    load_config,
    locate_problems_in,
)
from fedhub.errors import ConfigError, FedhubError
from fedhub.logs import HubLogger

#: The file in the state directory that a running hub holds locked.
LOCK_FILE = "hub.lock"


class Options(usage.Options):
    """
    Command-line options of C{twistd fedhub}.
    """

    synopsis = "[--config FILE]"
    longdesc = (
        "Run the fedhub hub. With no --config, it runs the built-in default: "
        "an in-process bus (messages do not leave the process) with a log consumer, "
        "a Bugzilla mail listener on 127.0.0.1:8025 and the status page on 127.0.0.1:8070."
    )
    optParameters = [
        ["config", "c", None, "The hub's TOML configuration file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        # twistd makes these options as soon as it knows it runs fedhub:
        # the earliest moment fedhub's code knows it is the hub (twistd
        # imports the plugin modules before, as any program listing
        # plugins does).
        starting_hangups.hold()

    def opt_version(self) -> None:
        """
        Print fedhub's version and exit.
        """
        print(f"fedhub {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        # Imported here: the hub's modules are not needed for --help.
        from fedhub.hub import start_problems

        path = self["config"]
        try:
            config = load_config(path) if path else default_config()
            problems = start_problems(config)
            if problems:
                # Files the hub could not use are refused before anything
                # starts, as check-config refuses them (with their lines).
                raise ConfigError(locate_problems_in(path, problems) if path else problems, path)
        except ConfigError as e:
            # The problems alone, as check-config prints them: not after
            # twistd's usage text, which a usage error would print first.
            sys.stderr.write(f"twistd fedhub: {e}\n")
            raise SystemExit(1) from None
        self["loaded"] = config


class StartingHangups:
    """
    Keeps the SIGHUPs that arrive while the hub starts, before it handles
    them itself (see L{GracefulStop}), so that they neither kill it nor
    go unheeded.

    Python leaves SIGHUP at the system's default, which ends the process,
    and L{GracefulStop} can install the hub's own handler only once the
    reactor runs.  In between, twistd reads the configuration, builds the
    hub and starts its services, for as long as that takes: a SIGHUP then (a
    C{postrotate} script that signals the hub while systemd restarts it)
    would end the hub.  L{hold} replaces the default with a handler that
    only counts the signal; L{GracefulStop} takes the count once it handles
    SIGHUP and reopens the files then if any came.  Ignoring them instead
    would be wrong: services open their files when they start, before the
    reactor runs, so a signal during start-up can be about a file the hub
    already has open and keeps writing to (with C{follow_rotation = false},
    for ever).  Reopening a file opened after the rotation costs a close
    and an open.

    @ivar received: The SIGHUPs counted since the last L{take}.
    """

    def __init__(self) -> None:
        self.received = 0

    def hold(self) -> None:
        """
        Count SIGHUP instead of dying of it, when its handler is still the
        system's (the default, or ignored): a handler someone installed is
        left alone.
        """
        if signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN):
            return
        try:
            signal.signal(signal.SIGHUP, self._received)
        except ValueError:
            # Not the main thread (the options made by an embedding program):
            # only the main thread handles signals.
            pass

    def _received(self, signum: int, frame: object) -> None:
        self.received += 1

    def take(self) -> int:
        """
        How many SIGHUPs came since the last call.
        """
        received, self.received = self.received, 0
        return received


#: The SIGHUPs of this process's start-up: held by L{Options}, taken by the
#: hub's L{GracefulStop}.
starting_hangups = StartingHangups()


class GracefulStop(Service):
    """
    Makes SIGTERM and SIGINT stop the reactor like twistd does, draining
    every service, but without twistd's re-raising of the signal afterwards:
    a hub that stopped cleanly exits with status 0.  SIGHUP calls
    C{on_hangup} (reopening files after log rotation); one that came while
    the hub started, kept by C{starting}, calls it once the reactor runs.
    Once the reactor has stopped, all three are ignored while the process
    exits.
    """

    log = HubLogger()

    def __init__(
        self,
        reactor: Any,
        on_hangup: Callable[[], object] | None = None,
        starting: StartingHangups | None = None,
    ) -> None:
        self.reactor = reactor
        self.on_hangup = on_hangup
        self.starting = starting
        self.stopping = False

    def startService(self) -> None:
        super().startService()
        # The reactor installs its own handlers when it starts running, after
        # services started: replace them once it runs.
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._received)
        if self.on_hangup is not None:
            signal.signal(signal.SIGHUP, self._hangup)
        self.reactor.addSystemEventTrigger("after", "shutdown", self._ignore)
        self.log.info("Hub running; SIGTERM or SIGINT stops it")
        # Taken after the handler above is in place: a SIGHUP arrives either
        # before (counted) or after (handled), never in between.
        if self.on_hangup is not None and self.starting is not None and self.starting.take():
            self.log.info("Received SIGHUP while starting: reopening files now")
            self.on_hangup()

    def _ignore(self) -> None:
        """
        Ignore the signals once the reactor has stopped.  The process still
        has its exit ahead (twistd's last lines, the interpreter's
        shutdown), during which Python puts the default handlers back: a
        second SIGTERM then would kill a hub that stopped cleanly, and it
        would exit with the signal instead of status 0.
        """
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)

    def _hangup(self, signum: int, frame: object) -> None:
        self.log.info("Received SIGHUP: reopening files")
        if self.on_hangup is not None:
            self.reactor.callFromThread(self.on_hangup)

    def _received(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            self.log.info("Received {signal} again: already stopping", signal=name)
            return
        self.stopping = True
        self.log.info("Received {signal}: stopping (draining in-flight work)", signal=name)
        self.reactor.callFromThread(self.reactor.stop)


class StateDirectoryInUse(FedhubError):
    """
    The hub's state directory could not be locked: another hub holds it, or
    it could not be created or opened.

    @ivar directory: The state directory.
    @ivar pid: The process id the holder recorded, when known.
    @ivar reason: Why it could not be locked, when not held by another hub.
    """

    def __init__(self, directory: str, pid: int | None = None, reason: str | None = None) -> None:
        if reason is not None:
            text = f"the state directory {directory} can not be locked: {reason}"
        else:
            text = f"the state directory {directory} is in use by another hub"
            if pid is not None:
                text += f" (pid {pid})"
        super().__init__(text)
        self.directory = directory
        self.pid = pid
        self.reason = reason


class StateLock(Service):
    """
    An exclusive C{flock} on C{<state_dir>/hub.lock}, held from before the
    hub starts until its process ends, so that two hubs never share a state
    directory (their consumers would compete for the same queues and write
    the same files).  The file holds the holder's pid, for the refusal.

    Only the hub takes this lock: the commands that work beside a running
    hub (C{fedhub inject-mail}, C{fedhub outbox}) do not.  Stopping the
    service keeps the lock (a stopping hub still writes its state); the
    operating system releases it when the process ends, or when this object
    is released or collected.

    @ivar directory: The state directory.
    @ivar path: The lock file.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """
        Whether this object holds the lock.
        """
        return self._fd is not None

    def acquire(self) -> None:
        """
        Create the state directory if needed, take the lock without waiting
        and record this process's pid in the file.

        @raise StateDirectoryInUse: when another process (or another
            L{StateLock}) holds it, or it can not be created or opened.
        """
        if self._fd is not None:
            return
        try:
            # As the hub creates each directory of its state: only its user
            # may read what it keeps there.
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            reason = e.strerror or str(e)
            if os.path.exists(self.directory) and not os.path.isdir(self.directory):
                reason = "it is not a directory"
            if os.path.islink(self.directory) and not os.path.exists(self.directory):
                # makedirs says "File exists" of a link to nowhere.
                reason = f"it is a symbolic link to {os.readlink(self.directory)!r}, which does not exist"
            raise StateDirectoryInUse(self.directory, reason=reason) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _recorded_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateDirectoryInUse(self.directory, pid) from None
            raise StateDirectoryInUse(self.directory, reason=e.strerror or str(e)) from None
        self._fd = fd
        self._record_pid()

    def _record_pid(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            # The pid is only for the message of a refused hub; the lock
            # holds without it.
            pass

    def release(self) -> None:
        """
        Let go of the lock (the file stays, for the next hub to lock).
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def startService(self) -> None:
        super().startService()
        # twistd forks between building the service and starting it when it
        # daemonizes: record the pid of the process that runs the hub.
        self._record_pid()

    def __del__(self) -> None:
        self.release()


def hub_running(directory: str) -> bool:
    """
    Whether a hub holds the lock of the state directory C{directory} (see
    L{StateLock}), for a command that finds one of its files locked: by
    the hub, or by another process.  Tested with a shared lock taken and
    let go at once, without waiting.
    """
    try:
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


def _recorded_pid(fd: int) -> int | None:
    """
    The pid a lock file holds, or C{None} when it holds none.
    """
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        pid = int(text)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def makeService(options: Options | dict[str, Any]) -> IService:
    """
    Build the hub's service tree from parsed options.
    """
    from twisted.internet import reactor

    from fedhub.hub import Hub, bridge_warnings, certificate_warnings
    from fedhub.logs import LEVELS, set_log_level
    from fedhub.systemd import NotifyService

    config: Config = options["loaded"] if "loaded" in options else default_config()
    set_log_level(LEVELS[config.hub.log_level])
    exposed = exposed_password(config)
    log = HubLogger(namespace="fedhub.tap")
    warnings = [exposed] if exposed is not None else []
    for warning in warnings + certificate_warnings(config) + bridge_warnings(config):
        log.warn("{warning}", warning=warning)
    # Before anything is built: a second hub on the same state directory is
    # refused with one line, as a configuration problem is.
    lock = StateLock(config.hub.state_dir)
    try:
        lock.acquire()
    except StateDirectoryInUse as e:
        sys.stderr.write(f"twistd fedhub: {e}\n")
        raise SystemExit(1) from None
    try:
        hub = Hub(config, reactor)
    except ConfigError as e:
        lock.release()
        # A plugin refused its component: one message naming it and its
        # line, as check-config prints it, rather than a traceback.
        path = options.get("config")
        if path:
            e = ConfigError(locate_problems_in(path, e.problems), e.source)
        sys.stderr.write(f"twistd fedhub: {e}\n")
        raise SystemExit(1) from None
    except BaseException:
        lock.release()
        raise
    lock.setName("state-lock")
    lock.setServiceParent(hub)
    GracefulStop(reactor, on_hangup=hub.reopen_files, starting=starting_hangups).setServiceParent(hub)
    NotifyService(reactor).setServiceParent(hub)
    return hub
