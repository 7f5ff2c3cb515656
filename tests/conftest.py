"""
Test-run setup shared by every test module.

Like Twisted's trial runner, the run works inside a scratch directory, so
C{TestCase.mktemp()} paths and anything a test writes relative to the working
directory never land in the checkout.  Tests find their data relative to
their own file (C{tests/data/...}), never relative to the working directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def scratch_directory() -> Iterator[str]:
    """
    Run the whole session in a fresh temporary directory.
    """
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fedhub-tests-") as scratch:
        os.chdir(scratch)
        try:
            yield scratch
        finally:
            os.chdir(previous)
