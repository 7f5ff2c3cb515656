"""
A parse worker: the child process a L{fedhub.producers.bugzilla.workers.ParserPool}
runs, which parses bugmail so the hub's reactor thread does not have to.

Started as C{python -m fedhub.producers.bugzilla.parse_worker [--parent PID]}.
It talks over its standard input and output in frames: a 4-byte big-endian
length, then that many bytes of payload.

  - First the worker sends one frame, C{{"ready": 1, "pid": <its pid>}}, once
    it has imported the parser.
  - Then, for every request frame (the raw mail, at most
    L{MAX_REQUEST_BYTES}), it sends one response frame, a UTF-8 (in fact
    ASCII) JSON object, one of:
      - C{{"event": <BugEvent.to_json()>, "fingerprint": <hex>}}, the
        fingerprint as L{fedhub.producers.bugzilla.producer.event_fingerprint}
        computes it (with the same code, L{fedhub.producers.bugzilla.fingerprint});
      - C{{"error": {"class": "NotBugmail" | "MalformedBugmail" |
        "BugmailError", "reason": ..., "code": ...}}} when the parser refused
        the mail;
      - C{{"unexpected": {"type": <exception class name>, "detail": <the end
        of its traceback>}}} for anything else (a bug).
  - When its standard input ends it exits (status 0); so does it, killed by
    the kernel, when its parent process dies (Linux), or when a frame is
    broken (status 2).  It ignores SIGINT and SIGTERM, which are meant for
    the hub when they reach its process group.

Nothing here imports Twisted: the worker starts fast and stays small.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import IO, Any

from fedhub.producers.bugzilla.fingerprint import body_of, fingerprint_of
from fedhub.producers.bugzilla.parser import (
    MAX_MAIL_BYTES,
    BugmailError,
    MalformedBugmail,
    NotBugmail,
    parse_bugmail,
)

__all__ = [
    "FRAME_HEADER",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "REFUSALS",
    "encode_response",
    "handle",
    "main",
    "serve",
]

#: The length prefix of every frame.
FRAME_HEADER = struct.Struct(">I")
#: The largest request: the parser refuses anything bigger unread.
MAX_REQUEST_BYTES = MAX_MAIL_BYTES
#: The largest response.  An event's JSON repeats its first comment and may
#: escape every character of it, so it can be several times the mail; one
#: bigger than this is refused as too large, never sent.
MAX_RESPONSE_BYTES = 8 * MAX_MAIL_BYTES + 64 * 1024

#: The longest traceback excerpt of an unexpected error.
_DETAIL_CHARS = 2000

# ensure_ascii: the event's text may hold lone surrogates (the fingerprint
# keeps them), which only an escaped form carries through UTF-8.
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


#: The parser's refusals by the name a worker reports them under, the most
#: specific first: the hub raises the same class again.
REFUSALS: Mapping[str, type[BugmailError]] = {
    "NotBugmail": NotBugmail,
    "MalformedBugmail": MalformedBugmail,
    "BugmailError": BugmailError,
}


def _error_class(error: BugmailError) -> str:
    return next(name for name, cls in REFUSALS.items() if isinstance(error, cls))


def handle(raw: bytes) -> dict[str, Any]:
    """
    The response to one mail: its event and fingerprint, or the parser's
    refusal.  Anything else the parser raises propagates (L{serve} reports it).
    """
    try:
        event = parse_bugmail(raw)
    except BugmailError as e:
        return {"error": {"class": _error_class(e), "reason": e.reason, "code": e.code}}
    data = event.to_json()
    return {"event": data, "fingerprint": fingerprint_of(body_of(data))}


def _unexpected(error: BaseException) -> dict[str, Any]:
    detail = "".join(traceback.format_exception(error))[-_DETAIL_CHARS:]
    return {"unexpected": {"type": type(error).__name__, "detail": detail}}


def encode_response(response: dict[str, Any]) -> bytes:
    """
    The payload of a response frame; a response too large to send becomes
    the refusal of the mail as too large.
    """
    try:
        payload = _encode(response).encode("ascii")
    except Exception as e:  # not JSON-serialisable: a bug, reported as one
        payload = _encode(_unexpected(e)).encode("ascii")
    if len(payload) > MAX_RESPONSE_BYTES:
        payload = _encode({"error": {
            "class": "MalformedBugmail",
            "reason": f"the parsed event is larger than {MAX_RESPONSE_BYTES} bytes",
            "code": "too_large",
        }}).encode("ascii")
    return payload


def _write_frame(out: IO[bytes], payload: bytes) -> None:
    out.write(FRAME_HEADER.pack(len(payload)))
    out.write(payload)
    out.flush()


def serve(
    requests: IO[bytes],
    responses: IO[bytes],
    handler: Callable[[bytes], dict[str, Any]] = handle,
) -> int:
    """
    Answer request frames from C{requests} on C{responses} until the input
    ends; the exit status.
    """
    _write_frame(responses, encode_response({"ready": 1, "pid": os.getpid()}))
    while True:
        header = requests.read(FRAME_HEADER.size)
        if not header:
            return 0
        if len(header) < FRAME_HEADER.size:
            return 2
        (size,) = FRAME_HEADER.unpack(header)
        if size > MAX_REQUEST_BYTES:
            return 2
        raw = requests.read(size)
        if len(raw) < size:
            return 2
        try:
            response = handler(raw)
        except Exception as e:
            response = _unexpected(e)
        del raw
        _write_frame(responses, encode_response(response))


def _die_with_parent(parent: int) -> None:
    """
    Have the kernel kill this process when its parent dies (Linux), so no
    worker outlives a hub killed with SIGKILL in the middle of a parse.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass  # elsewhere the end of standard input is the only signal
    if os.getppid() != parent:
        # The parent died before the request above took effect.
        os._exit(0)


def main(argv: list[str] | None = None, handler: Callable[[bytes], dict[str, Any]] = handle) -> int:
    """
    Run a worker on this process's standard input and output; the exit status.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--parent" and args[1].isdigit():
        _die_with_parent(int(args[1]))
    elif args:
        sys.stderr.write("usage: python -m fedhub.producers.bugzilla.parse_worker [--parent PID]\n")
        return 64
    # The hub stops its workers by closing their input (and kills them with
    # SIGKILL when they take too long).  A Ctrl-C meant for the hub in a
    # terminal reaches them too, and so does a SIGTERM sent to the hub's
    # whole process group (timeout(1), some service managers): neither may
    # end them mid-mail, before the hub has stopped taking mail.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Frames go over private copies of the descriptors; anything else that
    # writes to standard output (a warning, a stray print) lands on standard
    # error, which the hub logs, and can not break a frame.
    requests = os.fdopen(os.dup(0), "rb")
    responses = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        return serve(requests, responses, handler)
    except BrokenPipeError:
        return 0
    finally:
        try:
            responses.close()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
