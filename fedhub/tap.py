"""
The twistd glue: C{twistd fedhub [--config FILE]}.

This is the edge where the global reactor is touched; everything below it
takes the reactor as a parameter.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from fedhub import __version__
from fedhub.config import Config, default_config, load_config
from fedhub.errors import ConfigError


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
        path = self["config"]
        try:
            self["loaded"] = load_config(path) if path else default_config()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options | dict[str, Any]) -> IService:
    """
    Build the hub's service tree from parsed options.
    """
    from twisted.internet import reactor

    from fedhub.hub import Hub

    config: Config = options["loaded"] if "loaded" in options else default_config()
    return Hub(config, reactor)
