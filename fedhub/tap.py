"""
The twistd glue: C{twistd fedhub [--config FILE]}.

This is the edge where the global reactor is touched; everything below it
takes the reactor as a parameter.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, Service
from twisted.python import usage

from fedhub import __version__
from fedhub.config import Config, default_config, load_config
from fedhub.errors import ConfigError
from fedhub.logs import HubLogger


class Options(usage.Options):
    """
    Command-line options of C{twistd fedhub}.
    """

    synopsis = "[--config FILE]"
    longdesc = (
        "Run the fedhub hub. With no --config, it runs the built-in default: "
        "an in-process bus (messages do not leave the process) with a log consumer."
    )
    optParameters = [
        ["config", "c", None, "The hub's TOML configuration file."],
    ]

    def opt_version(self) -> None:
        """
        Print fedhub's version and exit.
        """
        print(f"fedhub {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        # Imported here: the hub's modules are not needed for --help.
        from fedhub.hub import file_problems, tls_problems
        from fedhub.plugins import find_plugin

        path = self["config"]
        try:
            config = load_config(path) if path else default_config()
            problems = [p for domain in config.domains.values() for p in tls_problems(domain)]
            for component in config.components:
                problems.extend(
                    file_problems(component, find_plugin(component.kind, component.plugin))
                )
            if problems:
                # Files the hub could not use are refused before anything
                # starts, as check-config refuses them.
                raise ConfigError(problems, path)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["loaded"] = config


class GracefulStop(Service):
    """
    Makes SIGTERM and SIGINT stop the reactor like twistd does, draining
    every service, but without twistd's re-raising of the signal afterwards:
    a hub that stopped cleanly exits with status 0.  SIGHUP calls
    C{on_hangup} (reopening files after log rotation).
    """

    log = HubLogger()

    def __init__(self, reactor: Any, on_hangup: Callable[[], object] | None = None) -> None:
        self.reactor = reactor
        self.on_hangup = on_hangup
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
        self.log.info("Hub running; SIGTERM or SIGINT stops it")

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


def makeService(options: Options | dict[str, Any]) -> IService:
    """
    Build the hub's service tree from parsed options.
    """
    from twisted.internet import reactor

    from fedhub.hub import Hub
    from fedhub.logs import LEVELS, set_log_level
    from fedhub.systemd import NotifyService

    config: Config = options["loaded"] if "loaded" in options else default_config()
    set_log_level(LEVELS[config.hub.log_level])
    try:
        hub = Hub(config, reactor)
    except ConfigError as e:
        # A plugin refused its component: one message naming it, as for
        # any other configuration problem, rather than a traceback.
        sys.stderr.write(f"twistd fedhub: {e}\n")
        raise SystemExit(1) from None
    GracefulStop(reactor, on_hangup=hub.reopen_files).setServiceParent(hub)
    NotifyService(reactor).setServiceParent(hub)
    return hub
