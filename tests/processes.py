"""
Child processes that tests start: never left running after the test.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

Process = TypeVar("Process", bound="subprocess.Popen[Any]")


def reap(process: subprocess.Popen[Any]) -> None:
    """
    Kill C{process} if it still runs, and wait for it: no child left behind,
    and no zombie.
    """
    if process.poll() is None:
        process.kill()
        process.wait()


@contextmanager
def reaped(process: Process) -> Iterator[Process]:
    """
    Hand back C{process}, and L{reap} it on the way out however the block
    ends.  (C{Popen}'s own context manager only waits, which never ends
    for a child that does not exit by itself.)
    """
    try:
        yield process
    finally:
        reap(process)
