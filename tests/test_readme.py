"""
The README's code examples run as written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


class ReadmeTests(SynchronousTestCase):
    """
    The plugin-writing example and its test.
    """

    def test_plugin_example(self) -> None:
        """The Greeter plugin of the README builds, handles a message, and its harness test passes."""
        blocks = python_blocks()
        plugin_code = next(b for b in blocks if "class GreeterPlugin" in b)
        test_code = next(b for b in blocks if "class GreeterTests" in b)
        namespace: dict[str, Any] = {}
        exec(compile(plugin_code, "README plugin", "exec"), namespace)
        exec(compile(test_code, "README test", "exec"), namespace)
        case = namespace["GreeterTests"]("test_greets")
        from twisted.trial.reporter import TestResult

        outcome = TestResult()
        case.run(outcome)
        self.assertEqual((outcome.errors, outcome.failures), ([], []))
        self.assertEqual(outcome.successes, 1)
