"""
Text helpers for logs and terminals: escaping untrusted text and summarizing
messages in one line.
"""

from __future__ import annotations

import ipaddress
import json
import re

from fedhub.message import Message

#: The extra header a producer may set to give its message a human summary.
SUMMARY_HEADER = "fedhub_summary"

#: Control characters, line and paragraph separators, the invisible marks
#: that reorder how text is shown (bidirectional embeddings, overrides and
#: isolates), and lone surrogates (JSON's \\ud800 escapes), which no output
#: can encode.
_CONTROL = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def ascii_digits(text: str) -> bool:
    """
    Whether C{text} is a decimal number written with ASCII digits only:
    C{str.isdigit} alone says yes to C{"²"} and to other scripts' digits,
    which C{int} refuses or reads as another number.
    """
    return text.isascii() and text.isdigit()


def is_ip_address(text: str) -> bool:
    """
    Whether C{text} is an IPv4 or IPv6 address (not a host name).
    """
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def escape_control(text: str, limit: int | None = None) -> str:
    """
    Replace control characters (newlines included) by visible escapes, so
    untrusted text can not forge log lines or drive a terminal; optionally
    cut it to C{limit} characters, marking the cut with an ellipsis.
    """
    if limit is not None:
        # Escapes only lengthen: the rest can not show.
        text = text[: limit + 1]
    escaped = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    if limit is not None and len(escaped) > limit:
        escaped = escaped[: max(0, limit - 1)] + "…"
    return escaped


def summarize(message: Message, limit: int = 160) -> str:
    """
    A one-line human summary of a message: the producer's own summary
    (header C{fedhub_summary}), else a C{summary} string in the body, else the
    body itself as compact JSON, cut to C{limit} characters and escaped.
    """
    summary = message.headers.get(SUMMARY_HEADER)
    if not isinstance(summary, str):
        summary = message.body.get("summary")
    if not isinstance(summary, str):
        # Only as much of the body as the summary shows is encoded (escapes
        # only lengthen it): a large body costs no more than a small one.
        parts: list[str] = []
        size = 0
        for chunk in _SUMMARY_JSON.iterencode(message.body):
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                break
        summary = "".join(parts)
    return escape_control(summary, limit)


#: Encodes a body for L{summarize} as compact JSON, piece by piece.
_SUMMARY_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)
