"""
Tests for how the C{fedhub} command line (L{fedhub.cli.main}) ends when it
is interrupted outside the reactor.
"""

from __future__ import annotations

import argparse
import io
import sys

from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli import check_config
from fedhub.cli.main import main


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
