"""
The message body of a bug event and its fingerprint, with nothing but the
standard library: the producer (L{fedhub.producers.bugzilla.producer}) and
the parse worker (L{fedhub.producers.bugzilla.parse_worker}) compute them
with this same code, so a fingerprint made in a worker process is the one
the hub would have made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["RECIPIENT_HEADERS", "RECIPIENT_KEYS", "body_of", "fingerprint_of"]

#: Keys of L{BugEvent.to_json} that differ between the copies Bugzilla sends
#: to each recipient of one event; the message body leaves them out.
RECIPIENT_KEYS = frozenset({"message_id", "reasons", "watch_reason"})
#: Headers that differ per recipient (compared case-insensitively).
RECIPIENT_HEADERS = frozenset({"x-bugzilla-reason", "x-bugzilla-watch-reason"})

#: The JSON a fingerprint hashes: json.dumps(body, ensure_ascii=False,
#: sort_keys=True, separators=(",", ":")), with the encoder made once
#: (json.dumps builds one on every call with these options).
_fingerprint_json = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode


def body_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """
    The message body of an event's L{BugEvent.to_json}: C{data} without the
    parts that differ per recipient (L{RECIPIENT_KEYS}, L{RECIPIENT_HEADERS}).
    The body shares C{data}'s lists and objects.
    """
    body = {key: value for key, value in data.items() if key not in RECIPIENT_KEYS}
    headers = body.get("headers") or {}
    body["headers"] = {
        name: value for name, value in headers.items() if name.lower() not in RECIPIENT_HEADERS
    }
    return body


def fingerprint_of(body: Mapping[str, Any]) -> str:
    """
    The hex SHA-256 of a body's canonical JSON (sorted keys, no spaces,
    UTF-8; lone surrogates, which a mail can smuggle in, kept as such).
    """
    blob = _fingerprint_json(body)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
