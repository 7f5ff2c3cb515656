"""
A parse worker that misbehaves on request, for tests/test_bugzilla_workers.py.

Run as C{python tests/parse_worker_fake.py [--silent | --exit N]}.  It speaks
the protocol of L{fedhub.producers.bugzilla.parse_worker} (and parses with
its L{handle}), except when a mail starts with one of these lines:

  - C{SLEEP <seconds>}: sleep that long, then parse the rest of the mail;
  - C{EXIT}: exit at once with status 3, answering nothing;
  - C{RAISE}: raise an unexpected error;
  - C{ODD}: answer a JSON object of no known kind;
  - C{HUGE}: announce a frame larger than any answer may be, then hang;
  - C{NOISE}: write a few lines on standard error, then parse the rest.

C{--silent}: never say ready (hang at start).  C{--exit N}: exit at start
with status N, as a worker that can not start at all.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from fedhub.producers.bugzilla import parse_worker

_streams: dict[str, IO[bytes]] = {}


def _rest(raw: bytes) -> tuple[bytes, bytes]:
    first, _, rest = raw.partition(b"\n")
    return first, rest


def handler(raw: bytes) -> dict[str, Any]:
    first, rest = _rest(raw)
    if first.startswith(b"SLEEP "):
        time.sleep(float(first[6:]))
        return parse_worker.handle(rest)
    if first == b"EXIT":
        os._exit(3)
    if first == b"RAISE":
        raise RuntimeError("a bug in the parser")
    if first == b"ODD":
        return {"something": "else"}
    if first == b"HUGE":
        out = _streams["out"]
        out.write(parse_worker.FRAME_HEADER.pack(parse_worker.MAX_RESPONSE_BYTES + 1))
        out.flush()
        time.sleep(600)
    if first == b"NOISE":
        sys.stderr.write("first noisy line\nsecond noisy line\n")
        sys.stderr.flush()
        return parse_worker.handle(rest)
    return parse_worker.handle(raw)


def main(argv: list[str]) -> int:
    # Never outlive a test run that dies.
    parse_worker._die_with_parent(os.getppid())
    if argv[:1] == ["--exit"]:
        return int(argv[1])
    if argv[:1] == ["--silent"]:
        time.sleep(600)
        return 0
    requests = os.fdopen(os.dup(0), "rb")
    responses = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _streams["out"] = responses
    return parse_worker.serve(requests, responses, handler)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
