"""
The package type-checks: mypy (with the zope.interface plugin) over
C{fedhub/} and the twistd plugin files, with the settings in C{setup.cfg}.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


class TypingTests(SynchronousTestCase):
    """
    mypy finds no problem.
    """

    def test_mypy(self) -> None:
        """mypy --config-file setup.cfg reports no error in fedhub/ or twisted/plugins/."""
        plugins = sorted(str(p) for p in (ROOT / "twisted" / "plugins").glob("fedhub_*.py"))
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg"),
             "--cache-dir", str(ROOT / ".mypy_cache"), str(ROOT / "fedhub"), *plugins],
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "MYPYPATH"},
            timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
