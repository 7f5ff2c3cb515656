"""
Test-run setup shared by every test module.

Like Twisted's trial runner, the run works inside a scratch directory, so
C{TestCase.mktemp()} paths and anything a test writes relative to the working
directory never land in the checkout.  Tests find their data relative to
their own file (C{tests/data/...}), never relative to the working directory.
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher


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


#: What must never appear in a log line: private key material, and URLs with
#: a password in them (fedhub logs broker URLs with the password masked).
SECRET_PATTERNS = (
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:(?!\*\*\*@)[^/\s@]+@", re.IGNORECASE),
)


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_logs() -> Iterator[list[str]]:
    """
    Watch every log event of the whole run; fail the run if any carries key
    material or a password.
    """
    leaks: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        try:
            text = formatEvent(event)
            fields = " ".join(repr(v) for k, v in event.items() if not k.startswith("log_"))
        except Exception:
            return
        for pattern in SECRET_PATTERNS:
            for candidate in (text, fields):
                match = pattern.search(candidate)
                if match:
                    leaks.append(f"{event.get('log_namespace')}: ...{candidate[max(0, match.start() - 40):match.end() + 10]}...")

    globalLogPublisher.addObserver(observe)
    try:
        yield leaks
    finally:
        globalLogPublisher.removeObserver(observe)
    if leaks:
        pytest.fail("secrets in logs:\n" + "\n".join(leaks[:10]), pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """
    Refuse an C{async def} test on a C{SynchronousTestCase}: trial's
    synchronous case calls it and drops the coroutine, so it would pass
    without running a line.  Such a test belongs on a C{TestCase}.
    """
    from twisted.trial.unittest import SynchronousTestCase, TestCase

    wrong = []
    for item in items:
        cls = getattr(item, "cls", None)
        function = getattr(item, "function", None)
        if (
            cls is not None
            and issubclass(cls, SynchronousTestCase)
            and not issubclass(cls, TestCase)
            and inspect.iscoroutinefunction(function)
        ):
            wrong.append(item.nodeid)
    if wrong:
        raise pytest.UsageError(
            "async tests on a SynchronousTestCase never run: " + ", ".join(wrong)
        )
