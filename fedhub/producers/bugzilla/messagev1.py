"""
Message bodies in the format of C{bugzilla2fedmsg} (schema
C{bugzilla2fedmsg.messageV1}, published by the C{bugzilla2fedmsg-schema}
package), the format Fedora's consumers of Bugzilla messages read.

Both producers that speak it build their bodies here, from bugs and
comments as the Bugzilla web service returns them (times already in epoch
seconds, see L{fedhub.producers.bugzilla.api}):

  - the Bugzilla poller (L{fedhub.producers.bugzilla_poll}), from bug
    history and comments;
  - the bugmail producer's enrichment
    (L{fedhub.producers.bugzilla.enrich}), from the event a mail describes
    and the bug fetched for it.

A body is C{{"bug": ..., "event": ...}} with an optional C{comment} and
C{attachment}; see L{build_body}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "SCHEMA",
    "attachment_object",
    "bug_object",
    "build_body",
    "comment_object",
    "event_object",
    "user_object",
]

#: The schema name of these bodies (an entry point of C{bugzilla2fedmsg-schema}).
SCHEMA = "bugzilla2fedmsg.messageV1"


def user_object(login: Any, detail: Any = None) -> dict[str, Any]:
    """
    A user as the schema has it: C{login}, and C{real_name} and C{id} when
    C{detail} (a C{*_detail} value of the web service) gives them.
    """
    user: dict[str, Any] = {"login": login if isinstance(login, str) else ""}
    if isinstance(detail, Mapping):
        if isinstance(detail.get("real_name"), str):
            user["real_name"] = detail["real_name"]
        if isinstance(detail.get("id"), int) and not isinstance(detail.get("id"), bool):
            user["id"] = detail["id"]
    return user


def _first(value: Any) -> str:
    """
    Red Hat's Bugzilla has lists where upstream has one string (component, version).
    """
    if isinstance(value, list):
        value = value[0] if value else ""
    return value if isinstance(value, str) else ""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def bug_object(bug: Mapping[str, Any]) -> dict[str, Any]:
    """
    The C{bug} object of a body, from a bug as the web service returns it.
    """
    qa = bug.get("qa_contact")
    alias = bug.get("alias")
    return {
        "id": bug.get("id"),
        "alias": list(alias) if isinstance(alias, list) else ([alias] if alias else []),
        "assigned_to": user_object(bug.get("assigned_to"), bug.get("assigned_to_detail")),
        "classification": _text(bug.get("classification")),
        "component": {"name": _first(bug.get("component"))},
        "creation_time": bug.get("creation_time"),
        "flags": list(bug.get("flags") or []),
        "is_private": bool(bug.get("groups")),
        "keywords": list(bug.get("keywords") or []),
        "last_change_time": bug.get("last_change_time"),
        "operating_system": _text(bug.get("op_sys")),
        "platform": _text(bug.get("platform")),
        "priority": _text(bug.get("priority")),
        "product": {"name": _first(bug.get("product"))},
        "qa_contact": user_object(qa, bug.get("qa_contact_detail")) if qa else None,
        "reporter": user_object(bug.get("creator"), bug.get("creator_detail")),
        "resolution": _text(bug.get("resolution")),
        "severity": _text(bug.get("severity")),
        "status": {"name": _text(bug.get("status"))},
        "summary": _text(bug.get("summary")),
        "url": _text(bug.get("url")),
        "version": {"name": _first(bug.get("version"))},
        "whiteboard": _text(bug.get("whiteboard")),
    }


def event_object(
    bug_id: int,
    action: str,
    target: str,
    when: float,
    user: Mapping[str, Any],
    changes: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """
    The C{event} object: what happened (C{action} C{create} or C{modify} to
    a C{target} C{bug}, C{comment} or C{attachment}), when (epoch seconds),
    by whom, and for a modification its C{changes} (each C{field},
    C{removed}, C{added}, maybe C{attachment_id}).
    """
    event: dict[str, Any] = {
        "action": action,
        "bug_id": bug_id,
        "target": target,
        "time": when,
        "user": dict(user),
        "change_set": f"{bug_id}.{int(when)}",
        "routing_key": f"{target}.{action}",
    }
    if changes is not None:
        event["changes"] = [dict(change) for change in changes]
    return event


def comment_object(comment: Mapping[str, Any], when: float | None = None) -> dict[str, Any]:
    """
    The C{comment} object, from a comment as C{Bug.comments} returns it;
    C{when} is its time when already known.
    """
    if when is None:
        when = comment.get("creation_time") or comment.get("time")
    return {
        "body": _text(comment.get("text")),
        "creation_time": when,
        "id": comment.get("id"),
        "is_private": bool(comment.get("is_private")),
        "number": comment.get("count"),
    }


def attachment_object(attachment: Mapping[str, Any]) -> dict[str, Any]:
    """
    The C{attachment} object, from an attachment as C{Bug.attachments}
    returns it (its C{summary} is the description Bugzilla shows).
    """
    description = attachment.get("summary")
    if not isinstance(description, str):
        description = attachment.get("description")
    return {
        "content_type": _text(attachment.get("content_type")),
        "creation_time": attachment.get("creation_time"),
        "description": _text(description),
        "file_name": _text(attachment.get("file_name")),
        "flags": list(attachment.get("flags") or []),
        "id": attachment.get("id"),
        "is_obsolete": bool(attachment.get("is_obsolete")),
        "is_patch": bool(attachment.get("is_patch")),
        "is_private": bool(attachment.get("is_private")),
        "last_change_time": attachment.get("last_change_time"),
    }


def build_body(
    bug: Mapping[str, Any],
    event: Mapping[str, Any],
    *,
    comment: Mapping[str, Any] | None = None,
    attachment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    A whole body: the bug (as the web service returns it) and an
    L{event_object}, with a L{comment_object} and L{attachment_object}
    when given.
    """
    body: dict[str, Any] = {"bug": bug_object(bug), "event": dict(event)}
    if comment is not None:
        body["comment"] = dict(comment)
    if attachment is not None:
        body["attachment"] = dict(attachment)
    return body
